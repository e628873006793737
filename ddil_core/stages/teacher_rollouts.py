"""Stage teacher-rollouts: the teacher's own reverse process from pure noise, recorded at every timestep of its
DDIM grid (DDIL's teacher-backward source). The teacher is frozen, so these are computed once, offline, and can be
sharded (`--shard I --num-shards N`) so KFP fans them out; rollout i always uses seed `rollouts.seed + i`, so the
result does not depend on the sharding.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from ddil_core.config import Config
from ddil_core.data.shards import ShardWriter, publish_dir, staging_dir
from ddil_core.method.grid import StudentGrid
from ddil_core.method.rollouts import NO_REFLECTION, Reflection, ddim_sample
from ddil_core.models.conditioning import index_cond
from ddil_core.models.denoiser import Denoiser
from ddil_core.stages.common import load_teacher, read_latent_cache, stage_run, write_resolved_config

log = logging.getLogger(__name__)


def rollout_prompt_refs(num_samples: int, num_prompts: int, seed: int) -> torch.Tensor:
    """Which cached prompt each rollout uses: a seeded permutation of the cache, cycled."""
    perm = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed))
    return perm[torch.arange(num_samples) % num_prompts]


def teacher_rollouts(config: Config, latents: str | Path, out: str | Path, shard: int = 0, num_shards: int = 1) -> dict:
    if not 0 <= shard < num_shards:
        raise ValueError(f"--shard {shard} must be in [0, --num-shards {num_shards})")
    with stage_run(config, "teacher-rollouts", Path(out)) as telemetry:
        return _teacher_rollouts(config, Path(latents), Path(out), shard, num_shards, telemetry)


def _teacher_rollouts(config: Config, latents: Path, out: Path, shard: int, num_shards: int, telemetry) -> dict:
    rcfg = config.rollouts
    teacher = load_teacher(config)
    cache = read_latent_cache(Path(latents), teacher)
    grid = StudentGrid.ddim_trailing(teacher.schedule.num_train_timesteps, rcfg.teacher_steps)
    # Rollouts use the training schedule (final alpha 1), like every student/teacher step during distillation.
    denoiser = Denoiser(teacher.unet, teacher.train_schedule)
    guidance = rcfg.guidance_scale if rcfg.guidance_scale is not None else config.objective.guidance_scale
    refl_cfg = config.ddil.reflection
    reflection = NO_REFLECTION
    if refl_cfg.mode != "off" and "teacher_rollouts" in refl_cfg.apply_to:
        reflection = Reflection(refl_cfg.mode, refl_cfg.bound if refl_cfg.bound is not None else cache.bounds,
                                refl_cfg.percentile)
    refs = rollout_prompt_refs(rcfg.num_samples, cache.latents.shape[0], rcfg.seed)
    mine = torch.arange(rcfg.num_samples)[shard::num_shards]
    tmp = staging_dir(out)
    try:
        writer = ShardWriter(tmp, "rollouts", rcfg.shard_size)
        for start in range(0, len(mine), rcfg.batch_size):
            ids = mine[start:start + rcfg.batch_size]
            noise = torch.stack([torch.randn(teacher.latent_shape, generator=torch.Generator().manual_seed(rcfg.seed + int(i)))
                                 for i in ids])
            cond = {k: v.float() for k, v in index_cond(cache.cond, refs[ids]).items()}
            uncond = {k: v.float() for k, v in cache.uncond.items()}
            states = torch.empty(len(ids), rcfg.teacher_steps, *teacher.latent_shape)

            def record(i, x):
                states[:, i] = x

            x0 = ddim_sample(denoiser, noise, grid.timesteps, grid.prev_timesteps, cond, uncond, guidance,
                             reflection, record)
            writer.add({"states": states.half(), "x0": x0.half(), "ref": refs[ids], "seed": rcfg.seed + ids})
            telemetry.progress(start + len(ids), len(mine))
            log.info("teacher-rollouts: %d/%d rollouts", start + len(ids), len(mine))
        write_resolved_config(tmp, config)
        manifest = writer.finish(
            timesteps=grid.timesteps.tolist(), guidance_scale=guidance, teacher=config.model.teacher,
            shard=shard, num_shards=num_shards, latents_count=int(cache.latents.shape[0]),
            reflection=refl_cfg.mode if reflection is not NO_REFLECTION else "off",
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, out)
    log.info("wrote %d teacher rollouts (shard %d of %d) into %s", manifest["count"], shard, num_shards, out)
    return manifest
