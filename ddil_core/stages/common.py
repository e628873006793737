"""What every stage shares: resolved-config records, the teacher bundle, the latent cache reader."""
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

from ddil_core.config import Config, dump_config
from ddil_core.data.locks import output_lock
from ddil_core.data.shards import ShardError, load_shards
from ddil_core.math.schedule import NoiseSchedule
from ddil_core.models.conditioning import Cond
from ddil_core.models.pipeline_io import family_of, load_pipeline
from ddil_core.telemetry import StageTelemetry

log = logging.getLogger(__name__)
RESOLVED = "resolved_config.yaml"


def stage_telemetry(config: Config, stage: str, out: Path, serve: bool = False) -> StageTelemetry:
    """Prometheus telemetry of one stage; the run id is telemetry.run_id, $DDIL_RUN_ID, or the run folder's name."""
    t = config.telemetry
    run_id = t.run_id or os.environ.get("DDIL_RUN_ID") or Path(out).resolve().parent.name or "ddil"
    return StageTelemetry(stage, run_id, t.pushgateway, t.push_interval_s, t.metrics_port if serve else None)


def is_main_process() -> bool:
    """Rank 0 of a multi-process launch (torchrun / accelerate set RANK), or a plain single process."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def stage_run(config: Config, stage: str, out: Path, serve: bool = False):
    """What every stage does around its work: one writer per output folder, and telemetry pushed at the end
    (success or failure). Only rank 0 of a multi-process launch takes the lock and reports."""
    if not is_main_process():
        with StageTelemetry(stage, "ddil", None) as quiet:
            yield quiet
        return
    with output_lock(out), stage_telemetry(config, stage, out, serve) as telemetry:
        yield telemetry


def write_resolved_config(folder: Path, config: Config) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / RESOLVED).write_text(dump_config(config))


@dataclass
class Teacher:
    pipe: object
    family: str
    resolution: int
    schedule: NoiseSchedule  # as configured (for sampling like the pipeline)
    train_schedule: NoiseSchedule  # final alpha 1: the last student step returns its x0 estimate

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.pipe.vae_scale_factor
        return (self.pipe.unet.config.in_channels, side, side)

    def vae_id(self) -> str:
        """A fingerprint of the VAE (config and weights' first/last tensors) to match caches to teachers."""
        config = {k: v for k, v in self.pipe.vae.config.items() if not k.startswith("_")}  # "_" keys vary per load
        h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
        sd = self.pipe.vae.state_dict()
        for key in (next(iter(sd)), list(sd)[-1]):
            h.update(sd[key].float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]


def load_teacher(config: Config, device: torch.device | str = "cpu") -> Teacher:
    m = config.model
    pipe = load_pipeline(m.teacher, m.family, m.allow_pickle)
    pipe.to(device)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.eval().requires_grad_(False)
    resolution = m.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    sched_cfg = dict(pipe.scheduler.config)
    return Teacher(pipe, family_of(pipe), resolution, NoiseSchedule.from_config(sched_cfg),
                   NoiseSchedule.from_config(sched_cfg, set_alpha_to_one=True))


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


def read_latent_cache(folder: Path, teacher: Optional[Teacher] = None, streaming: bool = False) -> LatentCache:
    """The latent cache in memory, or (streaming) as ShardRows read from its shards on demand (data/streaming.py)."""
    folder = Path(folder)
    if streaming:
        from ddil_core.data.streaming import ShardRows, tensor_keys, verified_shards

        files, manifest = verified_shards(folder, "latents")
        tensors = {key: ShardRows(files, key) for key in tensor_keys(files)}
    else:
        tensors, manifest = load_shards(folder, kind="latents")
    if teacher is not None:
        check_cache_matches(manifest, teacher, folder)
    cond = {k[len("cond."):]: v for k, v in tensors.items() if k.startswith("cond.")}
    uncond_path = folder / "uncond.safetensors"
    if not uncond_path.exists():
        raise ShardError(f"{uncond_path}: missing (the latent cache is incomplete)")
    captions = json.loads((folder / "captions.json").read_text())
    return LatentCache(tensors["latents"], cond, load_file(str(uncond_path)), captions, manifest)


def check_cache_matches(manifest: dict, teacher: Teacher, folder: Path) -> None:
    """A latent cache made with another VAE, resolution or family cannot train this teacher's student."""
    problems = []
    if manifest.get("vae_id") != teacher.vae_id():
        problems.append(f"its VAE ({manifest.get('vae_id')}) is not the teacher's ({teacher.vae_id()})")
    if manifest.get("resolution") != teacher.resolution:
        problems.append(f"it was cached at resolution {manifest.get('resolution')}, the teacher runs at {teacher.resolution}")
    if manifest.get("family") != teacher.family:
        problems.append(f"it holds {manifest.get('family')} text embeddings, the teacher is {teacher.family}")
    if problems:
        raise ShardError(f"{folder}: latent cache does not match the teacher: " + "; ".join(problems))

