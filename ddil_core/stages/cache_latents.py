"""Stage cache-latents: encode a dataset once with the teacher's VAE and text encoder(s).

Writes fp16 latent shards with the prompt embeddings, captions, the unconditional embedding, and a manifest with
counts, shapes, per-shard sha256, the VAE fingerprint, resolution, and per-channel latent bounds (a high percentile
of |x0|) that reflection uses as its static bound.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from ddil_core.config import Config
from ddil_core.data.datasets import SkipReport, image_to_tensor, iter_samples
from ddil_core.data.shards import ShardWriter, publish_dir, staging_dir
from ddil_core.models.conditioning import encode_prompts, encode_unconditional
from ddil_core.models.latents import encode_images
from ddil_core.stages.common import load_teacher, stage_run, write_resolved_config

log = logging.getLogger(__name__)
MAX_BOUND_SAMPLES = 1 << 20  # per channel: enough for a stable percentile


def cache_latents(config: Config, out: str | Path) -> dict:
    with stage_run(config, "cache-latents", Path(out)) as telemetry:
        return _cache_latents(config, Path(out), telemetry)


def _cache_latents(config: Config, out: Path, telemetry) -> dict:
    teacher = load_teacher(config)
    pipe, res, dcfg = teacher.pipe, teacher.resolution, config.data
    tmp = staging_dir(out)
    try:
        writer = ShardWriter(tmp, "latents", dcfg.shard_size)
        skips = SkipReport()
        captions: list[str] = []
        keys: list[str] = []
        abs_values: list[torch.Tensor] = []
        images, batch_captions = [], []

        def flush():
            lat = encode_images(pipe.vae, torch.stack(images))
            cond = encode_prompts(pipe, batch_captions, res)
            writer.add({"latents": lat.half(), **{f"cond.{k}": v.half() for k, v in cond.items()}})
            per_channel = lat.abs().transpose(0, 1).reshape(lat.shape[1], -1)
            abs_values.append(per_channel[:, : max(1, MAX_BOUND_SAMPLES // 64)].float())
            images.clear()
            batch_captions.clear()

        samples = iter_samples(dcfg.dataset, dcfg.images, dcfg.bad_sample_policy, dcfg.limit, skips, res)
        for sample in samples:
            images.append(image_to_tensor(sample.image, res))
            batch_captions.append(sample.caption)
            captions.append(sample.caption)
            keys.append(sample.key)
            if len(images) == dcfg.batch_size:
                flush()
                telemetry.progress(len(captions), dcfg.limit or len(captions))
                if len(captions) % (dcfg.batch_size * 20) == 0:
                    log.info("cache-latents: %d images encoded", len(captions))
        if images:
            flush()
        values = torch.cat(abs_values, dim=1)
        bounds = torch.quantile(values[:, :MAX_BOUND_SAMPLES], dcfg.latent_bound_percentile, dim=1)
        uncond = encode_unconditional(pipe, res)
        save_file({k: v.half().contiguous() for k, v in uncond.items()}, str(tmp / "uncond.safetensors"))
        (tmp / "captions.json").write_text(json.dumps(captions))
        (tmp / "keys.json").write_text(json.dumps(keys))
        write_resolved_config(tmp, config)
        manifest = writer.finish(
            teacher=config.model.teacher, family=teacher.family, vae_id=teacher.vae_id(), resolution=res,
            dataset=dcfg.dataset, latent_bounds=bounds.tolist(), latent_bound_percentile=dcfg.latent_bound_percentile,
            skipped=skips.skipped, skip_reasons=skips.reasons,
        )
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, out)
    log.info("cached %d latents into %s (%d skipped)", manifest["count"], out, skips.skipped)
    return manifest
