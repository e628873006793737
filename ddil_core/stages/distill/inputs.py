"""What distill checks about its inputs before any work (no silent success on inconsistent data).

Teacher rollouts are checked against what teacher-rollouts recorded in each manifest and against this run: the
teacher (family and UNet fingerprint), the latent cache they were made from (its shards' digest), the grid
(rollouts.teacher_steps on the teacher's T), the CFG scale, the reflection, rollouts.num_samples and seed, and,
for a fan-out, that the shards are one complete set. Every refusal names both sides. Then every grid the objective
will train on (each PD stage's) must lie in [0, T) and, when the teacher source reads these rollouts, inside their
grid, so a mismatch is found now instead of in the middle of training.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ddil_core.config import Config, ConfigError
from ddil_core.data.shards import ShardError, load_shards, read_manifest
from ddil_core.method.grid import StudentGrid
from ddil_core.models.teacher import Teacher, rollout_guidance, rollout_reflection
from ddil_core.stages.common import LatentCache, cache_digest

REQUIRED = ("family", "unet", "latents_digest", "timesteps", "teacher_steps", "guidance_scale", "shard",
            "num_shards", "num_samples", "seed", "reflection_settings")


def rollout_folders(folders: Sequence[Path]) -> list[Path]:
    """The rollout folders: each given folder, or the rollout folders inside it (the shards of a fan-out)."""
    dirs: list[Path] = []
    for folder in map(Path, folders):
        if (folder / "manifest.json").exists():
            dirs.append(folder)
        else:
            sub = sorted(p for p in folder.glob("*") if (p / "manifest.json").exists()) if folder.is_dir() else []
            if not sub:
                raise ShardError(f"{folder}: no teacher rollouts here (no manifest.json)")
            dirs.extend(sub)
    return dirs


def check_rollout_manifest(folder: Path, manifest: dict, teacher: Teacher, cache: LatentCache, cache_folder: Path,
                           config: Config) -> None:
    """One rollouts folder against the teacher, the latent cache and the config; raises ShardError naming both."""
    missing = [key for key in REQUIRED if key not in manifest]
    if missing:
        raise ShardError(f"{folder}: the rollouts manifest records no {', '.join(missing)} (made by an older ddil?); "
                         "rerun teacher-rollouts")
    r = config.rollouts
    problems = []
    if manifest["family"] != teacher.family:
        problems.append(f"they were made by an {manifest['family']} teacher, this run's teacher {teacher.uri} is "
                        f"{teacher.family}")
    elif manifest["unet"] != teacher.unet_id():
        problems.append(f"they were made by teacher {manifest.get('teacher')} (UNet {manifest['unet']}), this run's "
                        f"teacher {teacher.uri} has UNet {teacher.unet_id()}")
    digest = cache_digest(cache.manifest)
    if manifest["latents_digest"] != digest:
        problems.append(f"they were made from another latent cache ({manifest.get('latents_count')} samples, digest "
                        f"{manifest['latents_digest']}), --latents {cache_folder} is digest {digest} "
                        f"({cache.latents.shape[0]} samples)")
    expected = list(StudentGrid.ddim_trailing(teacher.schedule.num_train_timesteps, r.teacher_steps).steps)
    if manifest["timesteps"] != expected:
        problems.append(f"they hold {manifest['teacher_steps']} teacher steps ({manifest['timesteps']}), the config "
                        f"says rollouts.teacher_steps = {r.teacher_steps} ({expected})")
    guidance = rollout_guidance(config)
    if manifest["guidance_scale"] != guidance:
        key = "rollouts.guidance_scale" if r.guidance_scale is not None else "objective.guidance_scale"
        problems.append(f"they were made with CFG scale {manifest['guidance_scale']}, the config says {key} = "
                        f"{guidance}")
    reflection = rollout_reflection(config)
    if manifest["reflection_settings"] != reflection:
        problems.append(f"they were made with reflection {manifest['reflection_settings']}, the config's "
                        f"ddil.reflection gives {reflection} for teacher rollouts")
    for key in ("num_samples", "seed"):
        if manifest[key] != getattr(r, key):
            problems.append(f"they were made with rollouts.{key} = {manifest[key]}, the config says {getattr(r, key)}")
    if problems:
        raise ShardError(f"{folder}: these teacher rollouts do not belong to this run: " + "; ".join(problems))


def read_rollouts(folders: Sequence[Path], cache: LatentCache, cache_folder: Path, teacher: Teacher,
                  config: Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher rollouts from one or more folders (the shards of a fan-out), or from a folder of such folders, each
    checked (check_rollout_manifest) before its shards are read, then as a set: shards 0 .. N-1 of one fan-out,
    each once. Returns states [R, K, C, H, W], timesteps [K], prompt refs [R], final images [R, C, H, W]; with
    training.streaming states and images are ShardRows read from the shards on demand (data/streaming.py)."""
    dirs = rollout_folders(folders)
    manifests = []
    for folder in dirs:
        manifest = read_manifest(folder, kind="rollouts")
        check_rollout_manifest(folder, manifest, teacher, cache, cache_folder, config)
        manifests.append(manifest)
    check_shard_set(dirs, manifests)
    states, refs, finals, files = [], [], [], []
    shape = (config.rollouts.teacher_steps, *teacher.latent_shape)
    for folder in dirs:
        if config.training.streaming:
            from ddil_core.data.shards import verified_shards
            from ddil_core.data.streaming import ShardRows, tensor_keys

            folder_files, _ = verified_shards(folder, "rollouts")
            files += folder_files
            tensors = {key: ShardRows(folder_files, key) for key in tensor_keys(folder_files)}
            if "ref" in tensors:
                tensors["ref"] = tensors["ref"].load()
        else:
            tensors, _ = load_shards(folder, kind="rollouts")
        if not {"states", "ref", "x0"} <= set(tensors):
            raise ShardError(f"{folder}: the shards hold {sorted(tensors)}, not rollout states, final images and "
                             "prompt refs")
        if tuple(tensors["states"].shape[1:]) != shape:
            raise ShardError(f"{folder}: rollout states of shape {tuple(tensors['states'].shape[1:])}, this run "
                             f"needs {shape}")
        if not (_finite(tensors["states"]) and _finite(tensors["x0"])):
            raise ShardError(f"{folder}: the rollout states hold non-finite values (NaN or infinity)")
        ref = tensors["ref"]
        if ref.numel() and (int(ref.min()) < 0 or int(ref.max()) >= cache.latents.shape[0]):
            raise ShardError(f"{folder}: rollout prompt refs outside the latent cache's {cache.latents.shape[0]} "
                             "samples")
        states.append(tensors["states"])
        refs.append(ref)
        finals.append(tensors["x0"])
    timesteps = torch.tensor(manifests[0]["timesteps"])
    if config.training.streaming:
        return ShardRows(files, "states"), timesteps, torch.cat(refs), ShardRows(files, "x0")
    return torch.cat(states), timesteps, torch.cat(refs), torch.cat(finals)


def _finite(tensor) -> bool:
    return bool(torch.isfinite(tensor).all()) if isinstance(tensor, torch.Tensor) else tensor.all_finite()


def check_shard_set(dirs: list[Path], manifests: list[dict]) -> None:
    """The rollout folders are one fan-out: the same --num-shards, each shard once, none missing."""
    totals = {m["num_shards"] for m in manifests}
    if len(totals) != 1:
        raise ShardError(f"{dirs[0]} and the other rollout folders come from different fan-outs (--num-shards "
                         f"{sorted(totals)})")
    total = totals.pop()
    seen: dict[int, Path] = {}
    for folder, m in zip(dirs, manifests):
        if m["shard"] in seen:
            raise ShardError(f"{folder}: rollout shard {m['shard']} of {total} is also given as {seen[m['shard']]}")
        seen[m["shard"]] = folder
    missing = sorted(set(range(total)) - set(seen))
    if missing:
        raise ShardError(f"{dirs[0]}: rollout shards {missing} of {total} are missing (pass every shard's folder, "
                         "or the folder holding them)")


def training_grids(objective, num_train_timesteps: int) -> list[StudentGrid]:
    """Every student grid the objective trains on: each PD stage's (teacher_steps/2, ..., student_steps), else its
    one grid."""
    stages = getattr(objective, "stages", None)
    if stages:
        return [StudentGrid.ddim_trailing(num_train_timesteps, n) for n in stages]
    return [objective.grid()]


def check_grids(objective, num_train_timesteps: int, rollout_timesteps, config: Config) -> None:
    """Each training grid inside [0, T) and, when the teacher source reads precomputed rollouts, inside their grid."""
    T = num_train_timesteps
    for grid in training_grids(objective, T):
        outside = [t for t in grid.steps if not 0 <= t < T]
        if outside:
            raise ConfigError(f"objective.{config.objective.name}: the student grid {list(grid.steps)} has "
                              f"timesteps {outside} outside the teacher's [0, {T})")
        if rollout_timesteps is None:
            continue
        have = set(rollout_timesteps.tolist())
        absent = [t for t in grid.steps if t not in have]
        if absent:
            raise ConfigError(
                f"objective.student_steps = {config.objective.student_steps} ({config.objective.name}): the student "
                f"grid {list(grid.steps)} has timesteps {absent} that are not in the teacher rollouts' grid "
                f"{rollout_timesteps.tolist()} (rollouts.teacher_steps = {config.rollouts.teacher_steps}); choose "
                "rollouts.teacher_steps so the teacher's grid passes through every student timestep")
