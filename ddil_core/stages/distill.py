"""Stage distill: train the few-step student with DDIL over the chosen base objective.

Writes DIR/student/ (a diffusers pipeline of the teacher's class with the student's UNet and scheduler),
DIR/checkpoints/ (resumable), DIR/buffer/ (the replay buffer as shards), DIR/train_log.jsonl and
DIR/resolved_config.yaml. Rerunning on an existing DIR resumes from its newest checkpoint.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ddil_core.config import Config, ConfigError
from ddil_core.data.shards import ShardError, load_shards
from ddil_core.method.buffer import ReplayBuffer
from ddil_core.method.mixture import DDILMixture, TrainingData
from ddil_core.method.objectives import ObjectiveContext, build_objective
from ddil_core.method.rollouts import teacher_interval_step
from ddil_core.models.denoiser import Denoiser
from ddil_core.models.pipeline_io import LORA_WEIGHTS, save_fused_student, save_student_pipeline
from ddil_core.stages.common import (is_main_process, load_teacher, read_latent_cache, stage_run,
                                     write_resolved_config)
from ddil_core.training.loop import Trainer

log = logging.getLogger(__name__)


def read_rollouts(folders: Sequence[Path], cache_count: int, streaming: bool = False) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher rollouts (states, timesteps, prompt refs, final images) from one or more folders (the shards of a
    fan-out), or from a folder of such folders; streaming: states and images as ShardRows read on demand."""
    dirs: list[Path] = []
    for folder in map(Path, folders):
        if (folder / "manifest.json").exists():
            dirs.append(folder)
        else:
            sub = sorted(p for p in folder.glob("*") if (p / "manifest.json").exists()) if folder.is_dir() else []
            if not sub:
                raise ShardError(f"{folder}: no teacher rollouts here (no manifest.json)")
            dirs.extend(sub)
    states, refs, finals, timesteps, files = [], [], [], None, []
    for folder in dirs:
        if streaming:
            from ddil_core.data.streaming import verified_shards

            shard_files, manifest = verified_shards(folder, "rollouts")
            files += shard_files
        else:
            tensors, manifest = load_shards(folder, kind="rollouts")
        if manifest.get("latents_count") != cache_count:
            raise ShardError(f"{folder}: rollouts were made from a latent cache of {manifest.get('latents_count')} "
                             f"samples, this cache has {cache_count}")
        ts = torch.tensor(manifest["timesteps"])
        if timesteps is not None and not torch.equal(ts, timesteps):
            raise ShardError(f"{folder}: rollout timesteps differ from the other rollout shards")
        timesteps = ts
        if not streaming:
            states.append(tensors["states"])
            refs.append(tensors["ref"])
            finals.append(tensors["x0"])
    if streaming:
        from ddil_core.data.streaming import ShardRows

        return ShardRows(files, "states"), timesteps, ShardRows(files, "ref").load(), ShardRows(files, "x0")
    return torch.cat(states), timesteps, torch.cat(refs), torch.cat(finals)


def objective_context(config: Config, teacher, cache, device: torch.device | str = "cpu") -> ObjectiveContext:
    """What an objective needs from the stage: the frozen teacher, its schedules, the unconditional embedding and
    the latent cache's reflection bounds."""
    return ObjectiveContext(
        config=config, teacher_unet=teacher.unet, schedule=teacher.train_schedule,
        teacher_scheduler_config=dict(teacher.pipe.scheduler.config),
        uncond={k: v.to(device, torch.float32) for k, v in cache.uncond.items()},
        reflection_bound=cache.bounds, device=torch.device(device), family=teacher.family,
        latent_side=teacher.latent_shape[-1],
    )


def distill(config: Config, latents: str | Path, rollouts: Sequence[str | Path], out: str | Path,
            on_log: Optional[Callable[[dict], None]] = None, on_checkpoint: Optional[Callable[[], None]] = None) -> Path:
    out = Path(out)
    with stage_run(config, "distill", out, serve=True) as telemetry:

        def log_record(record):
            telemetry.log_train(record["step"], record)
            if on_log:
                on_log(record)

        def checkpoint_written():
            telemetry.checkpoint_written()
            if on_checkpoint:
                on_checkpoint()

        return _distill(config, Path(latents), rollouts, out, log_record, checkpoint_written)


def _distill(config, latents, rollouts, out, on_log, on_checkpoint) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        write_resolved_config(out, config)
    if config.model.dtype != "float32" and config.training.mixed_precision == "no":
        raise ConfigError(f"model.dtype = {config.model.dtype} needs training.mixed_precision = bf16 or fp16: the "
                          "frozen half-precision networks get their inputs cast by autocast")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = load_teacher(config, device)
    streaming = config.training.streaming
    cache = read_latent_cache(Path(latents), teacher, streaming=streaming)
    if config.model.dtype != "float32":  # a half-precision frozen teacher saves memory on GPUs
        teacher.unet.to(getattr(torch, config.model.dtype))
    ctx = objective_context(config, teacher, cache, device)
    objective = build_objective(config.objective.name, ctx)
    data = TrainingData(cache.latents, cache.cond)
    wants_pairs = objective.needs_teacher_pairs
    if rollouts and (wants_pairs or (config.ddil.priors.teacher > 0 and config.ddil.teacher_mode == "precomputed")):
        data.rollout_states, data.rollout_timesteps, data.rollout_ref, data.rollout_x0 = read_rollouts(
            rollouts, cache.latents.shape[0], streaming=streaming)
    bcfg = config.ddil.buffer
    buffer = ReplayBuffer(bcfg.capacity, bcfg.eviction) if bcfg.enabled and config.ddil.priors.student > 0 else None
    teacher_step = None
    if config.ddil.teacher_mode != "precomputed":  # online teacher-then-student or per-step mixed rollouts
        guidance = config.rollouts.guidance_scale
        teacher_step = teacher_interval_step(
            Denoiser(teacher.unet, teacher.train_schedule), config.rollouts.teacher_steps, ctx.uncond,
            guidance if guidance is not None else config.objective.guidance_scale, ctx.reflection("teacher_rollouts"))
    mixture = DDILMixture(config.ddil, data, teacher.train_schedule, objective.grid(), objective.student_step,
                          buffer, device, forward_timesteps=objective.forward_timesteps(), teacher_step=teacher_step,
                          pure_noise_first_step=objective.pure_noise_first_step, teacher_pairs=wants_pairs)
    trainer = Trainer(config, objective, mixture, out, on_log=on_log, on_checkpoint=on_checkpoint)
    trainer.resume()
    trainer.train()
    full = trainer.full_state("student") if trainer.fsdp else None  # gathered from the shards on every rank
    if not trainer.is_main:
        trainer.accelerator.wait_for_everyone()
        return out / "student"
    student = objective.trainable()["student"]
    if full is not None:  # an unsharded copy to write (sharded training is full fine-tuning: the teacher's layout)
        student = copy.deepcopy(teacher.unet).float()
        student.load_state_dict(full)
    if trainer.ema is not None:
        trainer.ema.copy_to(student)
    lora = config.training.lora
    info = {**objective.student_info(), "teacher": config.model.teacher, "steps_trained": trainer.step,
            "priors": vars(config.ddil.priors)}
    if lora.rank:  # the folder is the teacher's pipeline: load the adapters with pipe.load_lora_weights(folder)
        info["lora"] = {"rank": lora.rank, "alpha": lora.alpha or lora.rank, "weights": LORA_WEIGHTS}
    save_student_pipeline(teacher.pipe, student, objective.student_scheduler(), out / "student", info)
    if lora.rank and lora.save_fused:
        save_fused_student(out / "student", out / "student-fused")
    if buffer is not None:
        buffer.save(out / "buffer")
    log.info("student written to %s", out / "student")
    trainer.accelerator.wait_for_everyone()
    return out / "student"
