"""Stage distill: train the few-step student with DDIL over the chosen base objective.

Writes DIR/student/ (a diffusers pipeline of the teacher's class with the student's UNet and scheduler),
DIR/checkpoints/ (resumable), DIR/buffer/ (the replay buffer as shards; empty without a buffer), DIR/train_log.jsonl
and DIR/resolved_config.yaml. Rerunning on an existing DIR with the same config resumes from its newest checkpoint; with
another config it is refused naming the keys that differ, unless `restart` (`--restart`) starts over.

Before DIR is touched every input is checked (the teacher's weights and schedule, the latent cache against the
teacher, the rollouts against both and the config, every training grid: stages/distill/inputs.py), so bad input
exits 2 leaving no DIR. A student is written only when at least one update was applied to it and all its weights
are finite (else BrokenStudent, exit 1; DIR keeps its checkpoints and train log to look at, no student).
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ddil_core.config import Config, ConfigError, resolved_dict
from ddil_core.method.buffer import ReplayBuffer
from ddil_core.method.batch import TrainingData
from ddil_core.method.mixture import DDILMixture
from ddil_core.method.objectives import ObjectiveContext, build_objective
from ddil_core.method.rollouts import student_rollout, teacher_interval_step
from ddil_core.models.denoiser import Denoiser
from ddil_core.models.pipeline_io import LORA_WEIGHTS, save_fused_student, save_student_pipeline
from ddil_core.progress import Progress
from ddil_core.registry.lineage import training_lineage
from ddil_core.models.teacher import load_teacher, rollout_guidance
from ddil_core.stages.common import read_latent_cache, stage_run, write_resolved_config
from ddil_core.stages.distill.inputs import check_grids, read_rollouts
from ddil_core.stages.distill.watching import build_watch
from ddil_core.training.checkpoint import latest_checkpoint
from ddil_core.training.loop import NonFiniteLoss, Trainer

log = logging.getLogger(__name__)
# The config sections that describe how a student was made: recorded in ddil_student.json, checked by register.
STUDENT_SECTIONS = ("model", "data", "ddil", "objective", "rollouts", "training")


class BrokenStudent(NonFiniteLoss):
    """Training ended without a usable student (non-finite weights, or no update applied): none is written."""


def distill(config: Config, latents: str | Path, rollouts: Sequence[str | Path], out: str | Path,
            on_log: Optional[Callable[[dict], None]] = None, on_checkpoint: Optional[Callable[[], None]] = None,
            restart: bool = False) -> Path:
    """`restart`: when OUT holds a run of another config, discard it (checkpoints, student, log) and start over;
    without it such a rerun is refused naming the keys that differ. The same config resumes."""
    out = Path(out)
    inputs = (config.model.teacher, latents, *rollouts)
    with stage_run(config, "distill", out, serve=True, restart=restart, inputs=inputs,
                   may_differ=("training.steps",), effective=effective_plan) as run:

        def log_record(record):
            run.log_train(record["step"], record)
            if on_log:
                on_log(record)

        def checkpoint_written():
            run.checkpoint_written()
            if on_checkpoint:
                on_checkpoint()

        return _distill(config, Path(latents), rollouts, out, log_record, checkpoint_written, run.replace_previous)


def objective_context(config: Config, teacher, cache, device: torch.device | str = "cpu") -> ObjectiveContext:
    """What an objective needs from the stage: the frozen teacher, its schedules, the unconditional embedding and
    the latent cache's reflection bounds."""
    return ObjectiveContext(
        config=config, teacher_unet=teacher.unet, schedule=teacher.train_schedule,
        teacher_scheduler_config=dict(teacher.pipe.scheduler.config),
        uncond={k: v.to(device, torch.float32) for k, v in cache.uncond.items()},
        reflection_bound=cache.bounds, device=torch.device(device), family=teacher.family,
        latent_side=teacher.latent_shape[-1], **_prompt_encodings(config, teacher, device),
    )


def _prompt_encodings(config: Config, teacher, device) -> dict:
    """TDD's float32 "" and the pipeline's own unconditional embedding (its dropped captions and its student's CFG)."""
    if config.objective.name != "tdd":
        return {}
    from ddil_core.models.conditioning import encode_prompts, encode_unconditional

    def f32(cond):
        return {k: v.to(device, torch.float32) for k, v in cond.items()}

    return {"empty_prompt": f32(encode_prompts(teacher.pipe, [""], teacher.resolution)),
            "pipeline_uncond": f32(encode_unconditional(teacher.pipe, teacher.resolution))}


def effective_plan(config: dict) -> dict:
    """A config dict with PD's steps_per_stage resolved as PD resolves it (training.steps split over the stages), so
    a resume that changes training.steps is refused exactly when it moves a stage hand-off of the checkpointed run
    (with one stage there is no hand-off: its length is the run's, free to grow)."""
    from ddil_core.method.objectives.pd import stage_steps

    try:
        o = config["objective"]
        if o["name"] == "pd":
            n = len(stage_steps(int(o["pd"]["teacher_steps"]), int(o["student_steps"])))
            config = copy.deepcopy(config)
            pd = config["objective"]["pd"]
            if n <= 1:  # one stage: its length is the run's length, which may grow like training.steps
                pd["steps_per_stage"] = None
            elif pd["steps_per_stage"] is None:
                pd["steps_per_stage"] = max(1, int(config["training"]["steps"]) // n)
    except (KeyError, TypeError, ValueError):  # an unreadable record: compared as it is
        pass
    return config


def _distill(config, latents, rollouts, out, on_log, on_checkpoint, replace_previous=False) -> Path:
    # Everything is checked before OUT is touched: the teacher, the latent cache, the rollouts and the grids.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = load_teacher(config, device, stage="distill")
    T = teacher.schedule.num_train_timesteps
    cache = read_latent_cache(Path(latents), teacher, config, streaming=config.training.streaming)
    ddil = config.ddil
    refl = ddil.reflection
    if refl.mode == "static" and refl.bound is None and cache.bounds is None:
        raise ConfigError(f"ddil.reflection.mode = static needs ddil.reflection.bound, or a latent cache with bounds "
                          f"({latents} records none)")
    if config.model.dtype == "float16" and device.type != "cuda":
        raise ConfigError("model.dtype = float16 needs a GPU (autocast on a CPU runs bfloat16 only); use bfloat16 "
                          "or float32 here")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if config.training.batch_size % world:
        raise ConfigError(f"training.batch_size = {config.training.batch_size} must be divisible by the {world} "
                          "processes")
    if config.model.dtype != "float32":  # a half-precision frozen teacher saves memory on GPUs
        teacher.unet_id()  # fingerprinted as loaded, before the cast: the rollouts recorded those weights
        teacher.unet.to(getattr(torch, config.model.dtype))
    ctx = objective_context(config, teacher, cache, device)
    objective = build_objective(config.objective.name, ctx)
    data = TrainingData(cache.latents, cache.cond)
    wants_pairs = objective.needs_teacher_pairs  # DMD2's regression on the teacher's noise-image pairs
    uses_rollouts = wants_pairs or (ddil.priors.teacher > 0 and ddil.teacher_mode == "precomputed")
    if uses_rollouts and not rollouts:
        raise ConfigError("ddil.priors.teacher > 0 with ddil.teacher_mode = precomputed, or "
                          "objective.dmd2.regression_weight > 0, needs teacher rollouts: run teacher-rollouts and pass "
                          "--rollouts")
    if uses_rollouts:
        data.rollout_states, data.rollout_timesteps, data.rollout_ref, data.rollout_x0 = read_rollouts(
            rollouts, cache, Path(latents), teacher, config)
    elif rollouts:
        log.info("distill: --rollouts not read (ddil.priors.teacher = %g, teacher_mode %s)", ddil.priors.teacher,
                 ddil.teacher_mode)
    check_grids(objective, T, data.rollout_timesteps, config)
    bcfg = ddil.buffer
    buffer = ReplayBuffer(bcfg.capacity, bcfg.eviction) if bcfg.enabled and ddil.priors.student > 0 else None
    teacher_step = None
    if ddil.teacher_mode != "precomputed":  # online teacher-then-student or per-step mixed rollouts
        teacher_step = teacher_interval_step(
            Denoiser(teacher.unet, teacher.train_schedule), config.rollouts.teacher_steps, ctx.uncond,
            rollout_guidance(config), ctx.reflection("teacher_rollouts"))
    mixture = DDILMixture(ddil, data, teacher.train_schedule, objective.grid(), objective.student_step,
                          buffer, device, forward_timesteps=objective.forward_timesteps(), teacher_step=teacher_step,
                          pure_noise_first_step=objective.pure_noise_first_step, teacher_pairs=wants_pairs)
    trainer = Trainer(config, objective, mixture, out, on_log=on_log, on_checkpoint=on_checkpoint)
    trainer.watch = build_watch(config, objective, trainer, teacher, cache, ctx, device)

    done = latest_checkpoint(out / "checkpoints") if not replace_previous else None
    if done is not None and int(done.name.split("-")[-1]) > objective.total_steps():
        raise ConfigError(f"{out}: its newest checkpoint ({done.name}) is beyond the {objective.total_steps()} steps "
                          "this config trains; raise training.steps, or pass --restart to start over")
    # Inputs are good: now OUT is made (or, on --restart, an earlier run of another config is discarded first).
    if replace_previous and trainer.is_main:
        log.warning("distill: --restart: removing the earlier run in %s", out)
        shutil.rmtree(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    if trainer.is_main:
        write_resolved_config(out, config, "distill")
    trainer.accelerator.wait_for_everyone()
    try:
        return _train_and_publish(config, objective, trainer, teacher, cache, buffer, out, latents, rollouts)
    except Exception:  # an error (not an interruption, which keeps its state like a SIGKILL would)
        if created and trainer.is_main and latest_checkpoint(out / "checkpoints") is None:
            shutil.rmtree(out, ignore_errors=True)  # nothing to resume from: leave no folder behind
        raise


def headline_loss(record: dict) -> Optional[float]:
    """The loss shown beside the progress: the objective's first loss term over all states of the interval
    (PD and LCM have one term; DMD2's first is the generator's)."""
    for means in (record.get("loss") or {}).values():
        if isinstance(means, dict) and "all" in means:
            return float(means["all"])
    return None


def _train_and_publish(config, objective, trainer, teacher, cache, buffer, out: Path, latents, rollouts) -> Path:
    trainer.resume()
    log_record = trainer.on_log
    with Progress("distill", objective.total_steps(), unit="step", initial=trainer.step,
                  enabled=trainer.is_main) as progress:

        def log_and_show(record: dict) -> None:
            loss = headline_loss(record)
            if loss is not None:
                progress.note(loss=loss)
            if log_record is not None:
                log_record(record)

        trainer.on_log, trainer.on_step = log_and_show, progress.update_to
        if trainer.watch is not None and trainer.step == 0:  # the starting point: the teacher-initialised student
            trainer.watch.evaluate(trainer)
        trainer.train()
    sharded = "student" in trainer.sharded
    full = trainer.full_state("student") if sharded else None  # gathered from the shards, on every rank
    if sharded:  # every rank checks: the student's own sampler gathers its shards as it runs
        check_trained_student(objective.trainable()["student"], trainer, out, objective, cache, list(full.values()))
    if not trainer.is_main:
        trainer.accelerator.wait_for_everyone()
        return out / "student"
    student = objective.trainable()["student"]
    if sharded:  # an unsharded copy to write (sharded training is full fine-tuning: the teacher's layout)
        student = copy.deepcopy(teacher.unet).float()
        student.load_state_dict(full)
    if trainer.ema is not None:
        trainer.ema.copy_to(student)
    if not sharded:
        check_trained_student(student, trainer, out, objective, cache)
    lora = config.training.lora
    info = {**objective.student_info(), "teacher": config.model.teacher, "teacher_unet": teacher.unet_id(),
            "teacher_family": teacher.family, "steps_trained": trainer.step,
            "updates_applied": trainer.student_updates, "priors": vars(config.ddil.priors),
            "config": {k: v for k, v in resolved_dict(config).items() if k in STUDENT_SECTIONS},
            "lineage": training_lineage(config, latents, rollouts)}
    if lora.rank:  # the folder is the teacher's pipeline: load the adapters with pipe.load_lora_weights(folder)
        info["lora"] = {"rank": lora.rank, "alpha": lora.alpha or lora.rank, "weights": LORA_WEIGHTS}
    save_student_pipeline(teacher.pipe, student, objective.student_scheduler(), out / "student", info)
    if lora.rank and lora.save_fused:
        save_fused_student(out / "student", out / "student-fused")
    if buffer is not None:
        buffer.save(out / "buffer")
    else:  # no replay buffer in this run: an empty folder, so the stage writes the same outputs (dvc.yaml outs)
        (out / "buffer").mkdir(exist_ok=True)
    log.info("student written to %s", out / "student")
    trainer.accelerator.wait_for_everyone()
    return out / "student"


def check_trained_student(student: torch.nn.Module, trainer: Trainer, out: Path, objective, cache,
                  tensors: Optional[list] = None) -> None:
    """Never publish a broken student: at least one update applied to it, every weight finite,
    and its own sampler, run on two cached prompts from fixed noise, ends in finite latents. `tensors`: the weights
    to check when they are not the student's own (sharded: gathered in full)."""
    if trainer.student_updates < 1:
        raise BrokenStudent(
            f"{out}: no update was applied to the student in {trainer.step} steps ({trainer.nonfinite_total} skipped "
            "as non-finite); no student written: check the teacher, the data and training.lr")
    tensors = tensors if tensors is not None else [*student.parameters(), *student.buffers()]
    bad = sum(int((~torch.isfinite(t)).sum()) for t in tensors if t.is_floating_point())
    if bad:
        total = sum(t.numel() for t in tensors if t.is_floating_point())
        raise BrokenStudent(
            f"{out}: the trained student has {bad} non-finite weights of {total}; no student written: lower "
            "training.lr or training.grad_clip, enable reflection, or check the data")
    device = next(student.parameters()).device
    generator = torch.Generator().manual_seed(0)
    n = min(2, cache.latents.shape[0])
    x = torch.randn(n, *cache.latents.shape[1:], generator=generator).to(device)
    cond = {k: v[:n].to(device, torch.float32) for k, v in cache.cond.items()}
    steps = objective.grid().num_steps
    sample = student_rollout(lambda z, k, c: objective.student_step(z, k, c, generator), x, steps, cond)
    if not bool(torch.isfinite(sample).all()):
        raise BrokenStudent(
            f"{out}: the trained student's own {steps}-step sampler gives non-finite latents (NaN or infinity); no "
            "student written: training diverged, lower training.lr, enable training.grad_clip or reflection")
