"""Stage teacher-rollouts: the teacher's own reverse process from pure noise, recorded at every timestep of its
DDIM grid (DDIL's teacher-backward source). The teacher is frozen, so these are computed once, offline, and can be
sharded (`--shard I --num-shards N`) so KFP fans them out; rollout i always uses seed `rollouts.seed + i`, so the
result does not depend on the sharding.

Resumable like cache-latents: built in the hidden folder `.OUT.partial`, where every complete shard is recorded
(rollouts [k * rollouts.shard_size, (k + 1) * rollouts.shard_size) of this stage's share, in batches that never span
two shards). SIGTERM/SIGINT stops between batches with `Preempted` (exit 143) and keeps that folder; a rerun with
the same teacher, latent cache and config reuses every recorded shard whose sha256 still matches.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import torch

from ddil_core.config import Config, ConfigError
from ddil_core.data.shards import ResumableStaging, ShardWriter, disk_full_is_clear, sha256_file
from ddil_core.method.grid import StudentGrid
from ddil_core.method.rollouts import NO_REFLECTION, ddim_sample, resolve_reflection
from ddil_core.models.conditioning import index_cond
from ddil_core.models.denoiser import Denoiser
from ddil_core.progress import Progress
from ddil_core.models.teacher import load_teacher, rollout_guidance, rollout_reflection
from ddil_core.stages.common import cache_digest, read_latent_cache, stage_run, write_resolved_config
from ddil_core.training.loop import Preempted, _StopFlag

log = logging.getLogger(__name__)


def rollout_prompt_refs(num_samples: int, num_prompts: int, seed: int) -> torch.Tensor:
    """Which cached prompt each rollout uses: a seeded permutation of the cache, cycled."""
    perm = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed))
    return perm[torch.arange(num_samples) % num_prompts]


def teacher_rollouts(config: Config, latents: str | Path, out: str | Path, shard: int = 0, num_shards: int = 1,
                     restart: bool = False) -> dict:
    """`restart`: start over when OUT holds rollouts of another config (outputs.py: the rerun rule)."""
    if not (isinstance(shard, int) and isinstance(num_shards, int) and 0 <= shard < num_shards):
        raise ConfigError(f"--shard {shard} must be in [0, --num-shards {num_shards})")
    inputs = (config.model.teacher, latents)
    with _StopFlag() as stop, stage_run(config, "teacher-rollouts", Path(out), restart=restart,
                                        inputs=inputs) as run:
        with disk_full_is_clear(Path(out)):
            return _teacher_rollouts(config, Path(latents), Path(out), shard, num_shards, run, stop,
                                     run.replace_previous)


def _teacher_rollouts(config: Config, latents: Path, out: Path, shard: int, num_shards: int, telemetry,
                      stop, fresh: bool = False) -> dict:
    rcfg = config.rollouts
    teacher = load_teacher(config, stage="teacher-rollouts")
    cache = read_latent_cache(Path(latents), teacher, config)
    grid = StudentGrid.ddim_trailing(teacher.schedule.num_train_timesteps, rcfg.teacher_steps)
    # Rollouts use the training schedule (final alpha 1), like every student/teacher step during distillation.
    denoiser = Denoiser(teacher.unet, teacher.train_schedule)
    guidance = rollout_guidance(config)
    refl_cfg = config.ddil.reflection
    reflection = resolve_reflection(refl_cfg, "teacher_rollouts", cache.bounds, teacher.family)
    refs = rollout_prompt_refs(rcfg.num_samples, cache.latents.shape[0], rcfg.seed)
    mine = torch.arange(rcfg.num_samples)[shard::num_shards]
    fingerprint = {  # everything a rollout depends on besides its id
        "stage": "teacher-rollouts", "format": 1, "teacher": config.model.teacher,
        "unet": teacher.unet_id(), "scheduler": dict(teacher.pipe.scheduler.config),
        "latents": [e["sha256"] for e in cache.manifest["shards"]],
        "uncond": sha256_file(Path(latents) / "uncond.safetensors"), "bounds": cache.manifest.get("latent_bounds"),
        "rollouts": dataclasses.asdict(rcfg), "guidance": guidance, "reflection": dataclasses.asdict(refl_cfg),
        "shard": shard, "num_shards": num_shards,
    }
    staging = ResumableStaging(out, fingerprint, fresh=fresh)
    chunks = [mine[first:first + rcfg.shard_size] for first in range(0, len(mine), rcfg.shard_size)]
    digests = [hashlib.sha256(",".join(map(str, c.tolist())).encode()).hexdigest() for c in chunks]
    progress = Progress("teacher-rollouts", len(mine), unit="rollout", telemetry=telemetry)
    try:
        writer = ShardWriter(staging.folder, "rollouts", rcfg.shard_size)
        reused = 0
        for index, chunk in enumerate(chunks):
            first = index * rcfg.shard_size
            entry = staging.reusable(index, digests[index])
            if entry is not None and entry["count"] == len(chunk):
                writer.adopt(entry)
                reused += 1
                progress.update_to(first + len(chunk))
                continue
            for start in range(0, len(chunk), rcfg.batch_size):
                if stop.signal is not None:
                    raise Preempted(f"stopped by signal {stop.signal}; {len(writer.shards)} complete shards kept "
                                    f"in {staging.folder}: rerun to resume", signum=stop.signal)
                ids = chunk[start:start + rcfg.batch_size]
                noise = torch.stack([torch.randn(teacher.latent_shape,
                                                 generator=torch.Generator().manual_seed(rcfg.seed + int(i)))
                                     for i in ids])
                cond = {k: v.float() for k, v in index_cond(cache.cond, refs[ids]).items()}
                uncond = {k: v.float() for k, v in cache.uncond.items()}
                states = torch.empty(len(ids), rcfg.teacher_steps, *teacher.latent_shape)

                def record(i, x):
                    states[:, i] = x

                x0 = ddim_sample(denoiser, noise, grid.timesteps, grid.prev_timesteps, cond, uncond, guidance,
                                 reflection, record)
                writer.add({"states": states.half(), "x0": x0.half(), "ref": refs[ids], "seed": rcfg.seed + ids})
                progress.update_to(first + start + len(ids))
            if len(chunk) == rcfg.shard_size:  # a full shard was written: record it for a rerun
                staging.record(writer.shards, digests)
        if reused:
            log.info("teacher-rollouts: reused %d shards of an interrupted run", reused)
        write_resolved_config(staging.folder, config, "teacher-rollouts")
        # What distill checks these rollouts against (stages/rollouts_check.py): the teacher (family, UNet
        # fingerprint), the latent cache (its shards' digest and size), the grid, the guidance, the reflection.
        manifest = writer.finish(
            timesteps=grid.timesteps.tolist(), teacher_steps=rcfg.teacher_steps, guidance_scale=guidance,
            teacher=config.model.teacher, family=teacher.family, unet=teacher.unet_id(),
            num_train_timesteps=teacher.schedule.num_train_timesteps,
            shard=shard, num_shards=num_shards, num_samples=rcfg.num_samples, seed=rcfg.seed,
            latents_count=int(cache.latents.shape[0]), latents_digest=cache_digest(cache.manifest),
            reflection=refl_cfg.mode if reflection is not NO_REFLECTION else "off",
            reflection_settings=rollout_reflection(config),
        )
        staging.publish(manifest)
    except (Preempted, KeyboardInterrupt):
        raise  # the partial folder stays for the rerun
    except BaseException:
        staging.discard()
        raise
    finally:
        progress.close()
    log.info("wrote %d teacher rollouts (shard %d of %d) into %s", manifest["count"], shard, num_shards, out)
    return manifest
