"""The frozen teacher of every stage: its pipeline, family, resolution and noise schedules, loaded and checked
before any work (finite weights; the config's resolution and step counts against its VAE and schedule), with the
fingerprints that tie caches, rollouts and students to it."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Optional

import torch

from ddil_core.config import Config, ConfigError
from ddil_core.config.checks import schedule_problems
from ddil_core.math.schedule import NoiseSchedule
from ddil_core.models.pipeline_io import ModelError, family_of, load_pipeline


@dataclass
class Teacher:
    pipe: object
    family: str
    resolution: int
    schedule: NoiseSchedule  # as configured (for sampling like the pipeline)
    train_schedule: NoiseSchedule  # final alpha 1: the last student step returns its x0 estimate
    uri: str = ""  # model.teacher, for messages
    unet_fingerprint: Optional[str] = None  # unet_id() of the weights as loaded (distill casts them to model.dtype)

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.pipe.vae_scale_factor
        return (self.pipe.unet.config.in_channels, side, side)

    def unet_id(self) -> str:
        """The UNet's fingerprint: what teacher-rollouts records and distill and evaluate compare. Taken once, so a
        bf16 copy of the frozen teacher (model.dtype) still matches the rollouts its fp32 weights made."""
        if self.unet_fingerprint is None:
            self.unet_fingerprint = module_fingerprint(self.pipe.unet)
        return self.unet_fingerprint

    def text_encoder_ids(self) -> list[str]:
        return [module_fingerprint(self.pipe.text_encoder),
                module_fingerprint(getattr(self.pipe, "text_encoder_2", None))]

    def vae_id(self) -> str:
        """A fingerprint of the VAE (config and weights' first/last tensors) to match caches to teachers."""
        config = {k: v for k, v in self.pipe.vae.config.items() if not k.startswith("_")}  # "_" keys vary per load
        h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
        sd = self.pipe.vae.state_dict()
        for key in (next(iter(sd)), list(sd)[-1]):
            h.update(sd[key].float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]


def load_teacher(config: Config, device: torch.device | str = "cpu", stage: Optional[str] = None) -> Teacher:
    """The frozen teacher, checked before any work: finite weights, and (for `stage`) the config's resolution and
    step counts against its VAE and noise schedule."""
    m = config.model
    pipe = load_pipeline(m.teacher, m.family, m.allow_pickle)
    check_finite_weights(pipe, m.teacher)
    if m.resolution is not None and m.resolution % pipe.vae_scale_factor:
        raise ConfigError(f"model.resolution = {m.resolution} must be a multiple of the teacher's VAE scale factor "
                          f"{pipe.vae_scale_factor}")
    if stage is not None:
        problems = schedule_problems(config, pipe.scheduler.config.num_train_timesteps, stage)
        if problems:
            raise ConfigError(f"{m.teacher}: " + "; ".join(problems))
    pipe.to(device)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.eval().requires_grad_(False)
    resolution = m.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    sched_cfg = dict(pipe.scheduler.config)
    return Teacher(pipe, family_of(pipe), resolution, NoiseSchedule.from_config(sched_cfg),
                   NoiseSchedule.from_config(sched_cfg, set_alpha_to_one=True), m.teacher)


def rollout_guidance(config: Config) -> float:
    """The CFG scale of the teacher's rollouts: rollouts.guidance_scale, else objective.guidance_scale."""
    r = config.rollouts
    return r.guidance_scale if r.guidance_scale is not None else config.objective.guidance_scale


def rollout_reflection(config: Config) -> dict:
    """The reflection the teacher's rollouts are made with, as teacher-rollouts records it (only what applies)."""
    r = config.ddil.reflection
    if r.mode == "off" or "teacher_rollouts" not in r.apply_to:
        return {"mode": "off"}
    if r.mode == "static":
        return {"mode": "static", "bound": r.bound}  # bound None: the latent cache's per-channel bounds
    return {"mode": "dynamic", "percentile": r.percentile}


def check_finite_weights(pipe, uri: str) -> None:
    """A teacher with NaN or infinite weights would label every state with garbage (every update then skipped)."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        for key, tensor in module.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise ModelError(f"{uri}: {name} weight '{key}' has {bad} non-finite values (NaN or infinity)")


# Config keys a save and reload add or change without changing the module (transformers writes the class and dtype).
VOLATILE_CONFIG_KEYS = ("transformers_version", "architectures", "dtype", "torch_dtype")


def module_fingerprint(module) -> str:
    """Like Teacher.vae_id: the config and the first and last weight tensors of a module, hashed."""
    if module is None:
        return "none"
    config = getattr(module, "config", None) or {}
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)  # transformers / diffusers configs
    config = {k: v for k, v in config.items() if not str(k).startswith("_") and k not in VOLATILE_CONFIG_KEYS}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    sd = module.state_dict()
    for key in (next(iter(sd)), list(sd)[-1]):
        h.update(sd[key].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
