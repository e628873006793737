"""What evaluate measures against: the prompts (and the class each asks for, for adherence), the reference images
(their features, streamed), and the teacher, checked to be the one the students were distilled from."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ddil_core.config import Config, ConfigError
from ddil_core.config.checks import schedule_problems
from ddil_core.config.limits import MAX_PROMPT_FILE_BYTES, check_size, check_text
from ddil_core.data.datasets import DatasetError, SkipReport, image_to_tensor, iter_samples
from ddil_core.data.digits import DIGIT_WORDS, demo_source, digit_caption
from ddil_core.metrics.extractors import Extractor
from ddil_core.models.pipeline_io import ModelError
from ddil_core.models.teacher import check_finite_weights, module_fingerprint


def read_prompt_file(path: str) -> list[str]:
    """One prompt per non-blank line (surrounding whitespace stripped)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    check_size(p.stat().st_size, MAX_PROMPT_FILE_BYTES, f"{path}: prompts file")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: prompts file is not valid UTF-8") from None
    prompts = [check_text(line.strip(), f"{path}:{n}: prompt") for n, line in enumerate(lines, 1) if line.strip()]
    if not prompts:
        raise DatasetError(f"{path}: prompts file has no prompts (one per line)")
    return prompts


def default_prompts(reference_uri: str, captions: list[str]) -> list[str]:
    """demo://digits or demo://mnist: the ten digit captions in digit order; otherwise the distinct captions in data
    order."""
    if demo_source(reference_uri):
        return [digit_caption(i) for i in range(len(DIGIT_WORDS))]
    return list(dict.fromkeys(c.strip() for c in captions if c and c.strip()))


def evaluation_prompts(config: Config, file_prompts: Optional[list[str]], ref_uri: str,
                       captions: list[str]) -> list[str]:
    """The prompts evaluate samples and diagnose cycles noise by noise (noise i: prompt i mod len), one rule for both:
    the prompt file's, else the reference's distinct captions; the first evaluation.num_prompts."""
    return (file_prompts or default_prompts(ref_uri, captions))[: config.evaluation.num_prompts]


def adherence(predicted: torch.Tensor, wanted: list[int]) -> float:
    """Share of images whose predicted class is the prompted one (`wanted` per image)."""
    wanted_t = torch.as_tensor(wanted, dtype=torch.long)
    if predicted.shape[0] != wanted_t.shape[0]:
        raise ValueError(f"{predicted.shape[0]} predictions for {wanted_t.shape[0]} images")
    return float((predicted.long().cpu() == wanted_t).double().mean())


# ---------------------------------------------------------------------------------------------------- reference
def reference_uri(config: Config, reference: Optional[str]) -> str:
    if reference:
        return reference
    dataset = config.data.dataset
    source = demo_source(dataset)
    if source:
        return f"demo://{source}/eval"  # the held-out split: the teacher was trained on the other one
    return dataset


def reference_features(config: Config, uri: str, resolution: int, extractor: Extractor,
                       batch_size: int = 64) -> tuple[torch.Tensor, list[str], int]:
    """Features [N, D] of the reference images (streamed in batches, never all images in memory), their captions,
    and the number of bad samples skipped."""
    images_root = config.data.images if uri == config.data.dataset else None
    skips = SkipReport()
    feats, captions, batch = [], [], []
    for sample in iter_samples(uri, images_root, config.data.bad_sample_policy, config.evaluation.num_reference,
                               skips, resolution):
        batch.append(((image_to_tensor(sample.image, resolution) + 1) / 2).clamp(0, 1))
        captions.append(sample.caption)
        if len(batch) == batch_size:
            feats.append(extractor.features(torch.stack(batch)))
            batch.clear()
    if batch:
        feats.append(extractor.features(torch.stack(batch)))
    return torch.cat(feats), captions, skips.skipped


def check_teacher_of(teacher_pipe, teacher: str, config: Config, students: list) -> None:
    """Each (role, folder, info) student was distilled from this teacher, and the teacher's schedule fits the
    evaluation's step counts; its weights are finite."""
    problems = schedule_problems(config, teacher_pipe.scheduler.config.num_train_timesteps, "evaluate")
    if problems:
        raise ConfigError(f"{teacher}: " + "; ".join(problems))
    check_finite_weights(teacher_pipe, teacher)
    mine = module_fingerprint(teacher_pipe.unet)
    for role, folder, info in students:
        recorded = (info or {}).get("teacher_unet")
        if folder and recorded is not None and recorded != mine:
            raise ModelError(f"{folder}: this {role} was distilled from teacher {info.get('teacher')} (UNet "
                             f"{recorded}), not from --teacher {teacher} (UNet {mine}); evaluate it against its own "
                             "teacher")
