"""A small digit classifier: the offline feature extractor and prompt-adherence judge of the digits demo.

Two 3x3 convolutions (32, 64) with pooling, fc 128, fc 10 (docs/demo.md: 99% on held-out digits in under a
minute). Its 128-d penultimate activations are the feature space for Fréchet distance, density/coverage and
diversity when no Inception/CLIP weights can be had. Saved as config.json + model.safetensors.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from safetensors.torch import load_file, save_file

from ddil_core.config.redaction import redacted_json
from ddil_core.data.shards import publish_dir, staging_dir
from ddil_core.progress import progress_iter


class DigitClassifier(nn.Module):
    def __init__(self, resolution: int = 16, num_classes: int = 10, feature_dim: int = 128):
        super().__init__()
        self.config = {"resolution": resolution, "num_classes": num_classes, "feature_dim": feature_dim}
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * (resolution // 4) ** 2, feature_dim)
        self.fc2 = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] (resized to the training resolution) -> [B, feature_dim]."""
        r = self.config["resolution"]
        if images.shape[-1] != r or images.shape[-2] != r:
            images = F.interpolate(images, size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        x = images * 2 - 1
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(images))

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        tmp = staging_dir(folder)
        (tmp / "config.json").write_text(redacted_json({"class": "DigitClassifier", **self.config}, indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp / "model.safetensors"))
        publish_dir(tmp, folder)

    @classmethod
    def load(cls, folder: Path) -> "DigitClassifier":
        folder = Path(folder)
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise FileNotFoundError(f"{folder}: not a classifier folder (config.json: {exc})") from None
        config.pop("class", None)
        model = cls(**config)
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model.eval()


def train_digit_classifier(images: torch.Tensor, labels: torch.Tensor, steps: int = 600, batch_size: int = 128,
                           lr: float = 2e-3, seed: int = 0) -> DigitClassifier:
    """Train on images [N, 3, H, W] in [0, 1] with light shift augmentation; deterministic for a seed."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier(resolution=images.shape[-1])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    for _ in progress_iter(range(steps), steps, "prepare-demo: classifier", unit="step"):
        idx = torch.randint(len(images), (batch_size,), generator=g)
        x = images[idx]
        shift = torch.randint(-1, 2, (2,), generator=g).tolist()
        x = torch.roll(x, shifts=shift, dims=(-2, -1))
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()
