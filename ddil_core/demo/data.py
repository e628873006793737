"""The digits as tensors, exactly as the image folders written for the pipeline decode them, and those folders."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ddil_core.data.datasets import _digits, image_to_tensor
from ddil_core.data.digits import DIGIT_WORDS

RESOLUTION = 16


@dataclass
class DigitSet:
    keys: list[str]
    images: torch.Tensor  # [N, 3, 16, 16] in [-1, 1], from the 8-bit images (what the written PNGs hold)
    labels: torch.Tensor  # [N] long
    captions: list[str]
    pil: list  # the PIL images, written as PNG

    @property
    def images01(self) -> torch.Tensor:
        return (self.images + 1) / 2


def load_digits(split: str, source: str = "digits") -> DigitSet:
    """The train or eval split of demo://digits (1,500 / 297) or demo://mnist (4,000 / 1,000) at 16x16."""
    keys, images, labels, captions, pil = [], [], [], [], []
    for sample in _digits(split, RESOLUTION, source):
        keys.append(sample.key)
        images.append(image_to_tensor(sample.image, RESOLUTION))
        labels.append(DIGIT_WORDS.index(sample.caption.rsplit(" ", 1)[-1]))
        captions.append(sample.caption)
        pil.append(sample.image)
    return DigitSet(keys, torch.stack(images), torch.tensor(labels), captions, pil)


def write_image_folder(digits: DigitSet, folder: Path) -> None:
    """PNG files and captions.jsonl ({"file", "caption", "label"} per line): an image-folder dataset."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for key, image, caption, label in zip(digits.keys, digits.pil, digits.captions, digits.labels.tolist()):
        name = f"{key}.png"
        image.save(folder / name, format="PNG", optimize=False)
        lines.append(json.dumps({"file": name, "caption": caption, "label": int(label)}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
