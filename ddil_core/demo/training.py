"""The optimisation loop the demo's VAE (vae.py) and teacher UNet (teacher.py) share: warm-up then cosine learning
rate, one batch per step (its random draws), its loss in `workers` data-parallel threads (parallel.py: Replicas),
gradient clipping at 1, an optional after-update hook (the teacher's EMA), a smoothed loss, progress (progress.py),
the thread tuner (threads.py) and the optional wall-clock guard.

Each model's draws and loss stay in its own file; with one worker this loop performs exactly the steps both loops
performed before, in the same order, so the same seed trains the same weights bit for bit.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Callable, Optional

import torch

from ddil_core.demo.parallel import Replicas
from ddil_core.demo.threads import ThreadTuner
from ddil_core.progress import Progress

log = logging.getLogger(__name__)


def warmup_cosine(step: int, steps: int, lr: float, warmup_steps: int, floor: float) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay from lr to floor * lr at `steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train_steps(name: str, module: torch.nn.Module, opt: torch.optim.Optimizer, steps: int,
                lr_at: Callable[[int], float], batch_at: Callable[[int], tuple[torch.Tensor, ...]],
                loss_of: Callable[..., torch.Tensor], loss_smoothing: tuple[float, float],
                max_seconds: Optional[float] = None, adapt_threads: bool = False,
                after_update: Optional[Callable[[int], None]] = None, workers: int = 1) -> dict:
    """Up to `steps` updates of `module`; returns {"steps", "steps_planned", "seconds", "final_loss", "threads",
    "workers"}. batch_at(step) draws a batch (tensors, the batch first); loss_of(module, *batch) is its mean loss.

    loss_smoothing (keep, take): the logged loss is keep * previous + take * this step's (two numbers, not one and
    its complement, so the recorded final_loss is the one the loops recorded before)."""
    keep, take = loss_smoothing
    tuner = ThreadTuner(adapt_threads)
    started = time.monotonic()
    done, loss_avg = 0, None
    with Replicas(module, workers) as replicas, Progress(f"prepare-demo: {name}", steps, unit="step") as progress:
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            batch = batch_at(step)
            opt.zero_grad(set_to_none=True)
            loss = replicas.backward(loss_of, batch)
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step()
            if after_update is not None:
                after_update(step)
            done = step + 1
            loss_avg = loss if loss_avg is None else keep * loss_avg + take * loss
            progress.note(loss=loss_avg)
            progress.update_to(done)
            tuner.step()
            if max_seconds is not None and time.monotonic() - started > max_seconds and done < steps:
                log.warning("%s: wall-clock guard (%.0f s) reached at step %d of %d", name, max_seconds, done, steps)
                break
    threads = tuner.describe()
    tuner.restore()
    return {"steps": done, "steps_planned": steps, "seconds": time.monotonic() - started, "final_loss": loss_avg,
            "threads": threads, "workers": replicas.workers}
