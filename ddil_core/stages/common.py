"""What every stage shares: the run around a stage (output checks, lock, telemetry) and the latent cache reader.
The teacher is models/teacher.py."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from ddil_core.config import Config
from ddil_core.data.locks import output_lock
from ddil_core.data.shards import ShardError, disk_full_is_clear, load_shards, read_manifest
from ddil_core.models.conditioning import Cond
from ddil_core.models.teacher import Teacher
from ddil_core.stages.outputs import (RESOLVED, OutputError, check_out_path, check_rerun, config_differences,
                                     location_error, missing_folders, recorded_config, remove_if_empty,
                                     write_resolved_config)
from ddil_core.telemetry.settings import stage_telemetry, telemetry_settings  # noqa: F401 (re-exported)
from ddil_core.telemetry.stage import StageTelemetry

log = logging.getLogger(__name__)
__all__ = ["RESOLVED", "OutputError", "StageRun", "write_resolved_config", "stage_run", "read_latent_cache"]


def is_main_process() -> bool:
    """Rank 0 of a multi-process launch (torchrun / accelerate set RANK), or a plain single process."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class StageRun:
    """What stage_run hands its stage: telemetry, and whether an earlier output of another config must be discarded
    (--restart) once the stage has validated its inputs, before it writes."""

    telemetry: StageTelemetry
    replace_previous: bool = False

    def __getattr__(self, name):  # the stage's telemetry calls (progress, log_train, ...) go straight through
        if name == "telemetry":
            raise AttributeError(name)
        return getattr(self.telemetry, name)


@contextlib.contextmanager
def stage_run(config: Config, stage: str, out: Path, serve: bool = False, restart: bool = False,
              inputs: tuple = (), **rerun):
    """What every stage does around its work, in this order, before any of it: the output path is checked (a
    folder that can be made, apart from the inputs; outputs.py), the rerun rule is applied against what the folder
    records, one writer per output folder (the lock beside it, which also proves the location writable), and
    telemetry pushed at the end (success or failure). A full disk is one line naming the folder. When the stage
    fails, folders this run created on the way to `out` are removed again if they are still empty. Only rank 0 of a
    multi-process launch takes the lock and reports (every rank checks)."""
    out = Path(out)
    check_out_path(out, "folder", inputs)
    replace = check_rerun(out, config, stage, restart, **rerun)  # rerun: may_differ, effective (outputs.py)
    if not is_main_process():
        with StageTelemetry(stage, "ddil", None) as quiet:
            yield StageRun(quiet, replace)
        return
    created = missing_folders(out)
    try:
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(output_lock(out))
            except OSError as exc:  # read-only, full, not a folder: named before any work
                raise location_error(out, exc) from None
            telemetry = stack.enter_context(stage_telemetry(config, stage, out, serve))
            stack.enter_context(disk_full_is_clear(out))
            yield StageRun(telemetry, replace)
    except BaseException:
        remove_if_empty(created)
        raise


@dataclass
class LatentCache:
    latents: torch.Tensor  # [N, C, H, W] float16 (or ShardRows, streaming)
    cond: Cond  # [N, ...]
    uncond: Cond  # [1, ...]
    captions: list[str]
    manifest: dict

    @property
    def bounds(self) -> Optional[torch.Tensor]:
        b = self.manifest.get("latent_bounds")
        return torch.tensor(b, dtype=torch.float32) if b else None


def cache_digest(manifest: dict) -> str:
    """The identity of a latent cache: a digest of its shards' sha256 (latents and prompt embeddings)."""
    return hashlib.sha256(json.dumps([e["sha256"] for e in manifest["shards"]]).encode()).hexdigest()[:16]


def read_latent_cache(folder: Path, teacher: Optional[Teacher] = None, config: Optional[Config] = None,
                      streaming: bool = False) -> LatentCache:
    """A latent cache, checked against what cache-latents recorded (every shard's sha256, count and shapes; the
    captions, the unconditional embedding), given a teacher against the teacher (VAE, text encoders, resolution,
    family, latent shape), and given a config against the data.* it was made with (so the config a later stage
    records is the one that made its data). Non-finite latents or embeddings are refused: they would poison
    training."""
    folder = Path(folder)
    manifest = read_manifest(folder, kind="latents")
    if teacher is not None:
        check_cache_matches(manifest, teacher, folder)
    if config is not None:
        recorded = recorded_config(folder)
        if recorded is None:
            raise ShardError(f"{folder / RESOLVED}: missing or unreadable (the latent cache is incomplete)")
        diffs = config_differences(recorded, config, sections=("data",))
        if diffs:
            raise ShardError(f"{folder}: the latent cache was made with other data settings than this config ("
                             + "; ".join(d.replace(" -> ", " (cache) vs ", 1) + " (config)" for d in diffs[:6]) + ")")
    if streaming:
        from ddil_core.data.shards import verified_shards
        from ddil_core.data.streaming import ShardRows, tensor_keys

        files, manifest = verified_shards(folder, "latents")
        tensors = {key: ShardRows(files, key) for key in tensor_keys(files)}
    else:
        tensors, manifest = load_shards(folder, kind="latents")
    if "latents" not in tensors:
        raise ShardError(f"{folder}: the shards hold no 'latents' tensor (is this a latent cache?)")
    latents = tensors["latents"]
    if teacher is not None and tuple(latents.shape[1:]) != teacher.latent_shape:
        raise ShardError(f"{folder}: latents of shape {tuple(latents.shape[1:])}, the teacher's are "
                         f"{teacher.latent_shape}")
    cond = {k[len("cond."):]: v for k, v in tensors.items() if k.startswith("cond.")}
    uncond_path = folder / "uncond.safetensors"
    if not uncond_path.is_file():
        raise ShardError(f"{uncond_path}: missing (the latent cache is incomplete)")
    try:
        uncond = load_file(str(uncond_path))
    except Exception as exc:  # safetensors' own error types
        raise ShardError(f"{uncond_path}: unreadable ({' '.join(str(exc).split())})") from None
    if not cond or set(uncond) != set(cond):
        raise ShardError(f"{uncond_path}: holds {sorted(uncond)}, the shards' prompt embeddings are {sorted(cond)}")
    for name, tensor in (("latents", latents), *cond.items(), *(("uncond " + k, v) for k, v in uncond.items())):
        if tensor.is_floating_point() and not _all_finite(tensor):
            raise ShardError(f"{folder}: the cached {name} hold non-finite values (NaN or infinity); rebuild the cache")
    captions_path = folder / "captions.json"
    try:
        captions = json.loads(captions_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ShardError(f"{captions_path}: unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(captions, list) or len(captions) != latents.shape[0] or not all(isinstance(c, str)
                                                                                      for c in captions):
        raise ShardError(f"{captions_path}: expected a list of {latents.shape[0]} captions, one per cached latent")
    return LatentCache(latents, cond, uncond, captions, manifest)


def _all_finite(tensor) -> bool:
    if isinstance(tensor, torch.Tensor):
        return bool(torch.isfinite(tensor).all())
    return tensor.all_finite()  # ShardRows: chunk by chunk, never the whole cache in memory


def check_cache_matches(manifest: dict, teacher: Teacher, folder: Path) -> None:
    """A latent cache made with another VAE, text encoder, resolution or family cannot train this teacher's
    student; each difference is named with both sides."""
    missing = [key for key in ("vae_id", "text_encoders", "resolution", "family") if key not in manifest]
    if missing:
        raise ShardError(f"{folder}: the latent cache manifest records no {', '.join(missing)} (made by an older "
                         "ddil?); rerun cache-latents")
    problems = []
    if manifest.get("vae_id") != teacher.vae_id():
        problems.append(f"its VAE ({manifest.get('vae_id')}) is not the teacher's ({teacher.vae_id()})")
    if manifest.get("text_encoders") != teacher.text_encoder_ids():
        problems.append(f"its text encoders ({manifest.get('text_encoders')}) are not the teacher's "
                        f"({teacher.text_encoder_ids()})")
    if manifest.get("resolution") != teacher.resolution:
        problems.append(f"it was cached at resolution {manifest.get('resolution')}, the teacher runs at "
                        f"{teacher.resolution}")
    if manifest.get("family") != teacher.family:
        problems.append(f"it holds {manifest.get('family')} text embeddings, the teacher is {teacher.family}")
    if problems:
        raise ShardError(f"{folder}: latent cache does not match the teacher {teacher.uri}: " + "; ".join(problems))
