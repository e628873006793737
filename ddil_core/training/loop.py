"""The distillation training loop: DDIL mixture -> objective losses -> optimiser steps, on accelerate.

Short on purpose: the mixture makes states, the objective makes losses, this file steps optimisers, keeps EMA,
logs, checkpoints (every N steps, on SIGTERM/SIGINT, at the wall-clock guard) and resumes bit-exactly: every random
draw comes from explicit generators (one, or one per kind of draw: method/streams.py) whose states are checkpointed
with the weights, optimisers and buffer.

Several processes (`accelerate launch` / torchrun; gloo on CPU, NCCL on GPUs): every rank draws the same global
batch of DDIL states from the same generator (so all ranks agree on the student-rollout step count and hold the
same replay buffer), trains on its slice (the objective's per-sample draws too: method/draws.py), and gradients are
averaged across ranks before each optimiser step, so the update equals the single-process update on the global
batch. Rank 0 alone writes logs and checkpoints.

Memory at scale: training.grad_accum_steps splits the global batch of an update into micro-batches whose
gradients add up to the big batch's (the losses' per-sample draws are the big batch's too: method/draws.py);
training.fsdp shards the trainable networks (training/fsdp.py) and FSDP averages their gradients; LoRA networks
checkpoint their trainable tensors only (models/trainable.py).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ddil_core.config import Config
from ddil_core.config.redaction import redacted_json
from ddil_core.data.shards import ShardError
from ddil_core.method.draws import SampleDraws
from ddil_core.method.batch import SOURCES
from ddil_core.method.mixture import DDILMixture, scheduled_priors
from ddil_core.method.objectives.base import Objective, interval_means, per_source_sums
from ddil_core.method.streams import RandomStreams
from ddil_core.models.trainable import load_trainable_state, trainable_state_dict
from ddil_core.training import fsdp
from ddil_core.training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from ddil_core.training.ema import EMA
from ddil_core.training.train_log import bin_by_step, by_step

log = logging.getLogger(__name__)


class Preempted(BaseException):
    """SIGTERM/SIGINT (or the wall-clock guard) stopped a stage. A BaseException, as KeyboardInterrupt: no `except
    Exception` (a reader turning failures into bad input, a best-effort metric) can swallow a signal. `signum` is the
    signal that stopped it (SIGTERM for the wall-clock guard); the CLI exits 128 + signum (130 SIGINT, 143 SIGTERM)."""

    def __init__(self, message: str = "", signum: Optional[int] = None):
        super().__init__(message)
        self.signum = int(signum) if signum is not None else int(signal.SIGTERM)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class NonFiniteLoss(RuntimeError):
    pass


class _StopFlag:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps (restored on exit)."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def make_optimizer(module: torch.nn.Module, config: Config, lr: Optional[float] = None) -> torch.optim.Optimizer:
    t = config.training
    return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr or t.lr,
                             betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay)


class Trainer:
    def __init__(self, config: Config, objective: Objective, mixture: DDILMixture, out_dir: Path,
                 accelerator=None, on_log: Optional[Callable[[dict], None]] = None,
                 on_checkpoint: Optional[Callable[[], None]] = None, on_step: Optional[Callable[[int], None]] = None):
        from accelerate import Accelerator

        self.config, self.objective, self.mixture = config, objective, mixture
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.log_path = self.out_dir / "train_log.jsonl"
        self.accelerator = accelerator or Accelerator(mixed_precision=config.training.mixed_precision,
                                                      cpu=not torch.cuda.is_available())
        self.on_log, self.on_checkpoint = on_log, on_checkpoint
        self.on_step = on_step  # called with the step count after every step (the stage's progress bar)
        self.watch = None  # training/watch.py Watch: measures the student every training.eval_every updates
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        self.accum = config.training.grad_accum_steps
        if config.training.batch_size % (self.world * self.accum):
            raise ValueError(f"training.batch_size = {config.training.batch_size} must be divisible by the "
                             f"{self.world} processes x training.grad_accum_steps = {self.accum}")
        seed = config.training.seed
        self.streams = (RandomStreams.separate(seed) if config.training.random_streams == "separate" else
                        RandomStreams.single(torch.Generator().manual_seed(seed)))
        self.modules = objective.trainable()
        # frozen half-precision networks (model.dtype) need autocast wherever they run, the rollouts included
        self.rollout_autocast = config.model.dtype != "float32"
        self.fsdp = self.world > 1 and fsdp.fsdp_requested(config, self.accelerator)
        self.sharded: set[str] = set()
        if self.fsdp:
            fsdp.check_supported(config, objective.name, len(getattr(objective, "stages", [0])))
            mesh = fsdp.device_mesh(self.world, self.accelerator.device)
            self.sharded = set(objective.shardable())
            for name in self.sharded:
                fsdp.shard(self.modules[name], mesh)
        self.optimizers = {name: make_optimizer(m, config, objective.lr_for(name)) for name, m in self.modules.items()}
        self.ema = EMA(self.modules["student"], config.training.ema.decay) if config.training.ema.enabled else None
        self.step = 0
        self.student_updates = 0  # steps whose update reached the student (DMD2 updates it every few steps only)
        self.nonfinite_total = 0
        self.nonfinite_in_a_row = 0
        self._interval = self._new_interval()

    # -- state

    def _state_tensors(self) -> dict:
        tensors = {f"model_{name}": trainable_state_dict(m) for name, m in self.modules.items()}
        if self.ema is not None:
            tensors["ema"] = self.ema.shadow
        extra_json, extra_tensors = self.objective.extra_state()
        tensors["objective"] = extra_tensors
        tensors["rng"] = {"generator": self.streams.data.get_state(), "torch": torch.get_rng_state(),
                          **{f"stream_{kind}": state for kind, state in self.streams.get_state().items()}}
        if self.fsdp:  # every rank takes part in gathering the shards
            tensors = fsdp.full_tensors(tensors)
        return tensors, extra_json

    def full_state(self, name: str) -> dict:
        """A trainable network's whole state dict (gathered from the shards under FSDP: call on every rank)."""
        state = self.modules[name].state_dict()
        return fsdp.full_tensors(state) if name in self.sharded else state

    def _broadcast_int(self, value: int) -> int:
        """Rank 0's value on every rank (e.g. the student-rollout step count of a batch)."""
        t = torch.tensor([value], dtype=torch.long, device=self.accelerator.device)
        torch.distributed.broadcast(t, src=0)
        return int(t)

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a preempted pod stops all ranks at the same step)."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.accelerator.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def _average_gradients(self, module: torch.nn.Module) -> None:
        """All-reduce the gradients of one network as a single flat buffer (mean over ranks)."""
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if self.world == 1 or not grads or any(self.modules[n] is module for n in self.sharded):  # FSDP averaged them
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def save(self, root: Optional[Path] = None, keep: Optional[int] = None) -> Optional[Path]:
        """A checkpoint in `root` (default checkpoints/), keeping the newest `keep` (training.keep_checkpoints)."""
        if self.fsdp:  # gathered on every rank (collectives), written by rank 0
            tensors, extra_json = self._state_tensors()
            pickled = {name: fsdp.optimizer_state(self.modules[name], opt) if name in self.sharded else opt.state_dict()
                       for name, opt in self.optimizers.items()}
        if not self.is_main:  # one writer; the others wait so nobody runs ahead of a checkpoint
            self.accelerator.wait_for_everyone()
            return None
        if not self.fsdp:
            tensors, extra_json = self._state_tensors()
            pickled = {name: opt.state_dict() for name, opt in self.optimizers.items()}
        state = {"step": self.step, "nonfinite_total": self.nonfinite_total, "student_updates": self.student_updates,
                 "nonfinite_in_a_row": self.nonfinite_in_a_row, "objective": extra_json}
        buffer = self.mixture.buffer
        path = save_checkpoint(root or self.ckpt_dir, self.step, tensors, state, pickled, buffer,
                               keep=keep or self.config.training.keep_checkpoints)
        if self.on_checkpoint:
            self.on_checkpoint()
        self.accelerator.wait_for_everyone()
        return path

    def resume(self) -> bool:
        ckpt = latest_checkpoint(self.ckpt_dir)
        if ckpt is None:  # killed before its first checkpoint: start over, log included
            self._truncate_log(0)
            return False
        try:
            tensors, state, pickled = load_checkpoint(ckpt)  # every file's sha256 against its manifest first
            self._restore(tensors, state, pickled, ckpt)
        except (CheckpointError, ShardError):
            raise
        except Exception as exc:  # complete, verified files that still do not fit this run
            raise CheckpointError(f"{ckpt}: does not fit this run ({type(exc).__name__}: {exc}); rerun with "
                                  "--restart to start over") from None
        log.info("resumed from %s at step %d", ckpt, self.step)
        return True

    def _restore(self, tensors: dict, state: dict, pickled: dict, ckpt: Path) -> None:
        self.objective.load_extra_state(state["objective"], tensors.get("objective", {}))
        self.mixture.set_grid(self.objective.grid())
        for name, module in self.modules.items():
            self.optimizers[name] = make_optimizer(module, self.config, self.objective.lr_for(name))
            if name in self.sharded:  # every rank read the full state: each keeps its shard
                fsdp.load_model(module, tensors[f"model_{name}"])
                fsdp.load_optimizer(module, self.optimizers[name], pickled[name])
            else:
                load_trainable_state(module, tensors[f"model_{name}"])
                self.optimizers[name].load_state_dict(pickled[name])
        if self.ema is not None:
            self.ema.shadow = {k: v.clone() for k, v in tensors["ema"].items()}
        self.streams.data.set_state(tensors["rng"]["generator"])
        self.streams.set_state({k[len("stream_"):]: v for k, v in tensors["rng"].items() if k.startswith("stream_")})
        torch.set_rng_state(tensors["rng"]["torch"])
        if self.mixture.buffer is not None and (ckpt / "buffer").exists():
            self.mixture.buffer.load(ckpt / "buffer")
        self.step = state["step"]
        self.nonfinite_total, self.nonfinite_in_a_row = state["nonfinite_total"], state["nonfinite_in_a_row"]
        self.student_updates = state.get("student_updates", self.step - self.nonfinite_total)  # older checkpoints
        self._truncate_log(self.step)

    def _truncate_log(self, step: int) -> None:
        if not self.is_main or not self.log_path.exists():
            return
        keep = []
        for line in self.log_path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):  # a line torn by a kill mid-write
                continue
        tmp = self.log_path.with_name(f".{self.log_path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.log_path)

    # -- the loop

    def _new_interval(self) -> dict:
        return {"steps": 0, "counts": torch.zeros(3, dtype=torch.long), "loss": {}, "loss_k": {}, "time": {},
                "fresh": 0, "induced": 0, "wall": time.perf_counter(), "samples": 0}

    def train(self) -> None:
        cfg = self.config.training
        total = self.objective.total_steps()
        started = time.monotonic()
        with _StopFlag() as stop:
            while self.step < total:
                if self.objective.advance(self.step):
                    self.mixture.set_grid(self.objective.grid())
                    for name, module in self.modules.items():  # a new stage starts with fresh optimisers
                        self.optimizers[name] = make_optimizer(module, self.config, self.objective.lr_for(name))
                self.train_step()
                self.step += 1
                if self.step % cfg.log_every == 0 or self.step == total:
                    self.flush_log()
                if self.on_step is not None:
                    self.on_step(self.step)
                if self.step % cfg.checkpoint_every == 0 or self.step == total:
                    self.save()
                if self.watch is not None:
                    self.watch.after_update(self)
                out_of_time = bool(cfg.wall_clock_limit_s and time.monotonic() - started > cfg.wall_clock_limit_s)
                if self._any_rank(stop.signal is not None or out_of_time):
                    if self.step % cfg.checkpoint_every and self.step != total:
                        self.save()
                    why = f"signal {stop.signal}" if stop.signal is not None else (
                        "the wall-clock limit" if out_of_time else "another rank's stop")
                    raise Preempted(f"stopped by {why} at step {self.step}; checkpoint written, rerun to resume",
                                    signum=stop.signal)

    def train_step(self) -> None:
        acc, iv = self.accelerator, self._interval
        t0 = time.perf_counter()
        total = self.config.training.batch_size
        with acc.autocast() if self.rollout_autocast else contextlib.nullcontext():
            with self._rollout_weights():
                batch = self.mixture.sample(self.step, total, self.streams,
                                            self._broadcast_int if self.world > 1 else None)
        t1 = time.perf_counter()
        # micro-batch m holds rows [m * micro, (m + 1) * micro) of the global batch; this rank its share of each
        micro, shared = total // self.accum, ([] if self.accum > 1 else None)
        outputs, finite, backward = [], True, 0.0
        for m in range(self.accum):
            start = m * micro + self.rank * micro // self.world
            stop = m * micro + (self.rank + 1) * micro // self.world
            draws = SampleDraws(self.streams.loss, start, stop, total, shared)
            with acc.autocast():
                out = self.objective.loss(batch.slice(start, stop), self.step, draws)
            # one host sync for all losses (a GPU would otherwise wait once per loss)
            finite = bool(torch.stack([torch.isfinite(v).all() for v in out.losses.values()]).all())
            if self.world > 1:  # skip on every rank or on none
                flag = torch.tensor([float(finite)], device=self.accelerator.device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
                finite = bool(flag.item())
            outputs.append((out, batch.source[start:stop], batch.t[start:stop]))
            if not finite:
                break
            tb = time.perf_counter()
            self._backward(out.losses)
            backward += time.perf_counter() - tb
        t2 = time.perf_counter() - backward  # the backward passes count as the optimiser's part, as before
        if finite:
            self.nonfinite_in_a_row = 0
            for name in outputs[0][0].losses:  # each loss steps its own network only
                self._average_gradients(self.modules[name])
                if self.config.training.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.modules[name].parameters(), self.config.training.grad_clip)
                self.optimizers[name].step()
            for opt in self.optimizers.values():
                opt.zero_grad(set_to_none=True)
            self.student_updates += int("student" in out.losses)
            self.objective.after_update(self.step)
            if self.ema is not None:
                self.ema.update(self.modules["student"])
        else:
            for opt in self.optimizers.values():
                opt.zero_grad(set_to_none=True)
            self.nonfinite_total += 1
            self.nonfinite_in_a_row += 1
            log.warning("non-finite loss at step %d: update skipped (%d in a row)", self.step, self.nonfinite_in_a_row)
            if self.nonfinite_in_a_row >= self.config.training.max_nonfinite_in_a_row:
                raise NonFiniteLoss(
                    f"{self.nonfinite_in_a_row} non-finite losses in a row at step {self.step} "
                    f"(training.max_nonfinite_in_a_row = {self.config.training.max_nonfinite_in_a_row}); "
                    "lower training.lr, enable reflection, or check the data")
        self._account(iv, batch, outputs, t0, t1, t2)

    @contextlib.contextmanager
    def _rollout_weights(self):
        """The student's own rollouts by the EMA weights when ddil.rollout_policy = ema (the policy that ships):
        the EMA is swapped in for the batch's rollouts and the online weights put back after."""
        if self.config.ddil.rollout_policy != "ema" or self.ema is None or self.config.ddil.priors.student <= 0:
            yield
            return
        student = self.modules["student"]
        online = {k: v.detach().clone() for k, v in trainable_state_dict(student).items()}
        self.ema.copy_to(student)
        try:
            yield
        finally:
            load_trainable_state(student, online)

    def _backward(self, losses: dict) -> None:
        """Each loss's gradient reaches its own network only: what a loss leaves in another network's gradients
        is discarded, and a network's gradients add up over the micro-batches of an update."""
        for name, loss in losses.items():
            others = {n: [(p, p.grad) for p in m.parameters()] for n, m in self.modules.items() if n != name}
            for pairs in others.values():
                for p, _ in pairs:
                    p.grad = None
            (loss / self.accum if self.accum > 1 else loss).backward()
            for pairs in others.values():
                for p, grad in pairs:
                    p.grad = grad

    def _account(self, iv: dict, batch, outputs: list, t0: float, t1: float, t2: float) -> None:
        t3 = time.perf_counter()
        iv["steps"] += 1
        iv["counts"] += batch.counts
        iv["fresh"] += batch.fresh
        iv["induced"] += batch.student_induced
        timings = {"rollout": t1 - t0}
        grid = self.objective.grid().timesteps
        for out, source, t in outputs:
            for term, values in out.per_sample.items():  # the per-source loss by student grid index k (a proxy of
                bin_by_step(iv["loss_k"], term, values.detach().float(), source, t, grid)  # covariate shift)
            iv["samples"] += source.shape[0] * self.world
            if out.per_sample:
                source = source.to(next(iter(out.per_sample.values())).device)
            for term, values in out.per_sample.items():  # per-source sums and counts stay on the device until logged
                sums, counts = per_source_sums(values.detach().float(), source)
                acc_sums, acc_counts = iv["loss"].get(term, (0.0, 0.0))
                iv["loss"][term] = (acc_sums + sums, acc_counts + counts)
            for key, v in out.timings.items():
                timings[key] = timings.get(key, 0.0) + v
        timings["optimizer"] = t3 - t2
        for key, v in timings.items():
            iv["time"][key] = iv["time"].get(key, 0.0) + v

    def flush_log(self) -> None:
        iv = self._interval
        if not iv["steps"] or not self.is_main:
            self._interval = self._new_interval()
            return
        n = iv["steps"]
        counts = iv["counts"].double()
        buffer = self.mixture.buffer
        seconds = time.perf_counter() - iv["wall"]
        record = {
            "step": self.step,
            "stage": getattr(self.objective, "stage", 0),
            "student_steps": self.objective.grid().num_steps,
            "loss": {term: interval_means(*sums_counts) for term, sums_counts in iv["loss"].items()},
            "priors": dict(zip(SOURCES, scheduled_priors(self.config.ddil, self.step - 1).tolist())),
            "source_share": dict(zip(SOURCES, (counts / counts.sum()).tolist())),
            "source_count": dict(zip(SOURCES, iv["counts"].tolist())),
            "fresh_student_rollouts": iv["fresh"],
            # student states made by at least one student step (a rollout of 0 steps is pure noise)
            "student_induced_share": iv["induced"] / max(1, int(iv["counts"].sum())),
            "loss_by_step": {term: by_step(*held) for term, held in iv["loss_k"].items()},
            "buffer": {"size": len(buffer), "mean_age": buffer.mean_age(self.step)} if buffer is not None else None,
            "clip_fraction": self.objective.clip_fractions() or None,  # reflection: share of x0 elements clipped
            "seconds_per_update": seconds / n,
            "seconds_split": {k: v / n for k, v in iv["time"].items()},
            "samples_per_second": iv["samples"] / seconds if seconds > 0 else None,
            "nonfinite_skips": self.nonfinite_total,
        }
        if torch.cuda.is_available():
            record["gpu_memory_bytes"] = torch.cuda.max_memory_allocated()
        with open(self.log_path, "a") as f:
            f.write(redacted_json(record) + "\n")
        if self.on_log:
            self.on_log(record)
        self._interval = self._new_interval()
