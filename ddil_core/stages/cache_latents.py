"""Stage cache-latents: encode a dataset once with the teacher's VAE and text encoder(s).

Writes fp16 latent shards with the prompt embeddings, captions, the unconditional embedding, and a manifest with
counts, shapes, per-shard sha256, the VAE fingerprint, resolution, and per-channel latent bounds (a high percentile
of the cached |x0|) that reflection uses as its static bound.

Resumable: the output is built in the hidden folder `.OUT.partial` and every complete shard is recorded there with a
digest of the samples it holds. SIGTERM/SIGINT (a preempted pod) stops at the next sample with `Preempted` (exit
143) and keeps that folder; a SIGKILL leaves it too. A rerun with the same teacher and config reads the dataset
again (shard boundaries are fixed by the data order, data.shard_size and the bad-sample policy) and reuses each
recorded shard whose file still has its sha256 and whose samples have the same digest, encoding only the rest.
Any other error removes the folder: nothing half-written is left.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ddil_core.config import Config
from ddil_core.data.datasets import SkipReport
from ddil_core.data.loader import load_samples
from ddil_core.data.shards import ResumableStaging, ShardWriter, disk_full_is_clear
from ddil_core.models.conditioning import EmbeddingCache, encode_unconditional
from ddil_core.models.latents import encode_images
from ddil_core.progress import progress_iter
from ddil_core.models.teacher import load_teacher
from ddil_core.stages.common import stage_run, write_resolved_config
from ddil_core.training.loop import Preempted, _StopFlag

log = logging.getLogger(__name__)
MAX_BOUND_SAMPLES = 1 << 20  # per channel: enough for a stable percentile
RESUME_FORMAT = 2  # bump when the shard layout or the digest changes: older partial folders are not reused


def cache_latents(config: Config, out: str | Path, restart: bool = False) -> dict:
    """`restart`: start over when OUT holds a cache of another config (outputs.py: the rerun rule)."""
    inputs = (config.model.teacher, config.data.dataset, config.data.images)
    with _StopFlag() as stop, stage_run(config, "cache-latents", Path(out), restart=restart, inputs=inputs) as run:
        with disk_full_is_clear(Path(out)):
            return _cache_latents(config, Path(out), run, stop, fresh=run.replace_previous)


def _bound_samples(latents: torch.Tensor) -> torch.Tensor:
    """Per-channel |x| values of one encode batch, from the fp16 values stored in the cache."""
    per_channel = latents.float().abs().transpose(0, 1).reshape(latents.shape[1], -1)
    return per_channel[:, : max(1, MAX_BOUND_SAMPLES // 64)]


class _Restart(Exception):
    """A recorded shard's samples changed: read the dataset again, rebuilding from that shard on."""


def _cache_latents(config: Config, out: Path, telemetry, stop, fresh: bool = False) -> dict:
    teacher = load_teacher(config, stage="cache-latents")
    pipe, res, dcfg = teacher.pipe, teacher.resolution, config.data
    fingerprint = {  # what turns samples into shards; the samples themselves (data order, data.limit, the bad-sample
        # policy, file contents) are checked shard by shard through the digests
        "stage": "cache-latents", "format": RESUME_FORMAT, "teacher": config.model.teacher, "family": teacher.family,
        "vae_id": teacher.vae_id(), "text_encoders": teacher.text_encoder_ids(),
        "resolution": res, "dataset": dcfg.dataset, "images": dcfg.images, "shard_size": dcfg.shard_size,
        "batch_size": dcfg.batch_size,
    }
    staging = ResumableStaging(out, fingerprint, fresh=fresh)
    if staging.previous:
        log.info("cache-latents: resuming: %d shards of an interrupted run in %s", len(staging.previous),
                 staging.folder)
    try:
        while True:
            try:
                manifest, skips = _encode_all(config, teacher, staging, telemetry, stop)
                break
            except _Restart as why:
                log.info("cache-latents: %s; reading the dataset again", why)
        uncond = encode_unconditional(pipe, res)
        save_file({k: v.half().contiguous() for k, v in uncond.items()}, str(staging.folder / "uncond.safetensors"))
        write_resolved_config(staging.folder, config, "cache-latents")
        staging.publish(manifest)
    except (Preempted, KeyboardInterrupt):
        raise  # the partial folder stays for the rerun
    except BaseException:
        staging.discard()
        raise
    log.info("cached %d latents into %s (%d skipped)", manifest["count"], out, skips.skipped)
    return manifest


def _encode_all(config: Config, teacher, staging: ResumableStaging, telemetry, stop):
    """One pass over the dataset: shard by shard, reusing recorded shards, encoding the others batch by batch
    (a batch never spans two shards, so a shard's contents do not depend on what came before it)."""
    pipe, res, dcfg = teacher.pipe, teacher.resolution, config.data
    writer = ShardWriter(staging.folder, "latents", dcfg.shard_size)
    skips = SkipReport()
    captions: list[str] = []
    keys: list[str] = []
    abs_values: list[torch.Tensor] = []
    digests: list[str] = []
    state = {"digest": hashlib.sha256(), "count": 0, "reused": 0}
    images, batch_captions, batch_keys = [], [], []
    embeddings = EmbeddingCache()  # repeated captions (class labels) run the text encoders once

    def encode_batch():
        lat = encode_images(pipe.vae, torch.stack(images)).half()
        cond = embeddings.encode(pipe, batch_captions, res, names=batch_keys)
        writer.add({"latents": lat, **{f"cond.{k}": v.half() for k, v in cond.items()}})
        abs_values.append(_bound_samples(lat))
        images.clear()
        batch_captions.clear()
        batch_keys.clear()

    def end_shard():
        """The current shard is complete (or the data ended): reuse the recorded one or write the encoded one."""
        index, digest = len(writer.shards), state["digest"].hexdigest()
        if index < len(staging.previous):  # its samples were only hashed: a recorded shard should hold them
            entry = staging.reusable(index, digest)
            if entry is None or entry["count"] != state["count"]:
                raise _Restart(f"the samples of recorded shard {index} changed")
            writer.adopt(entry)
            lat = load_file(str(staging.folder / entry["file"]))["latents"]
            abs_values.extend(_bound_samples(b) for b in lat.split(dcfg.batch_size))
            state["reused"] += 1
        elif images:
            encode_batch()
        digests.append(digest)
        if state["count"] == dcfg.shard_size:  # a full shard was written: record it for a rerun
            staging.record(writer.shards, digests)
        state.update(digest=hashlib.sha256(), count=0)

    samples = load_samples(dcfg.dataset, dcfg.images, dcfg.bad_sample_policy, dcfg.limit, skips, res,
                           dcfg.num_workers)
    # The total is known only with data.limit (counting a dataset would read it twice): without it, count and rate.
    for sample in progress_iter(samples, dcfg.limit, "cache-latents", unit="image", telemetry=telemetry):
        if stop.signal is not None:
            raise Preempted(f"stopped by signal {stop.signal} after {len(captions)} samples; {len(writer.shards)} "
                            f"complete shards kept in {staging.folder}: rerun to resume", signum=stop.signal)
        state["digest"].update(sample.digest)
        state["count"] += 1
        captions.append(sample.caption)
        keys.append(sample.key)
        if len(writer.shards) >= len(staging.previous):  # a shard to encode
            images.append(sample.image)
            batch_captions.append(sample.caption)
            batch_keys.append(sample.key)
            if len(images) == dcfg.batch_size and state["count"] < dcfg.shard_size:
                encode_batch()
        if state["count"] == dcfg.shard_size:
            end_shard()
    if state["count"]:
        end_shard()
    if stop.signal is not None:
        raise Preempted(f"stopped by signal {stop.signal}; {len(writer.shards)} complete shards kept in "
                        f"{staging.folder}: rerun to resume", signum=stop.signal)
    if state["reused"]:
        log.info("cache-latents: reused %d shards of the interrupted run", state["reused"])
    values = torch.cat(abs_values, dim=1)
    bounds = torch.quantile(values[:, :MAX_BOUND_SAMPLES], dcfg.latent_bound_percentile, dim=1)
    # the dataset's own captions and keys, copied verbatim: data, not a credential (the redaction would rewrite a
    # caption that reads like user:password@host)
    (staging.folder / "captions.json").write_text(json.dumps(captions))
    (staging.folder / "keys.json").write_text(json.dumps(keys))
    manifest = writer.finish(
        teacher=config.model.teacher, family=teacher.family, vae_id=teacher.vae_id(),
        text_encoders=teacher.text_encoder_ids(), unet=teacher.unet_id(), resolution=res,
        dataset=dcfg.dataset, dataset_sha256=hashlib.sha256("".join(digests).encode()).hexdigest(),  # lineage
        latent_bounds=bounds.tolist(), latent_bound_percentile=dcfg.latent_bound_percentile,
        skipped=skips.skipped, skip_reasons=skips.reasons,
    )
    return manifest, skips
