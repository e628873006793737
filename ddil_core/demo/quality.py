"""How good a digits generator is, judged by the demo classifier: prompted-digit accuracy and Fréchet distance
in the classifier's 128-d features against the held-out digits (docs/demo.md)."""
from __future__ import annotations

import torch

from ddil_core.metrics.fid import frechet_distance
from ddil_core.data.digits import digit_caption


def digit_prompts(images_per_digit: int) -> tuple[list[str], torch.Tensor]:
    """'a handwritten digit zero' ... 'nine', each repeated; (prompts, labels), digit-major order."""
    labels = torch.arange(10).repeat_interleave(images_per_digit)
    return [digit_caption(i) for i in labels], labels


@torch.no_grad()
def classify(classifier, images01: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [N, 128], predicted labels [N]) of images in [0, 1]."""
    feats, preds = [], []
    for i in range(0, len(images01), batch_size):
        f = classifier.features(images01[i:i + batch_size].float())
        feats.append(f)
        preds.append(classifier.fc2(f).argmax(1))
    return torch.cat(feats), torch.cat(preds)


def score(classifier, images01: torch.Tensor, labels: torch.Tensor, reference_features: torch.Tensor) -> dict:
    feats, preds = classify(classifier, images01)
    correct = (preds == labels).float()
    per_digit = [float(correct[labels == d].mean()) for d in range(10) if (labels == d).any()]
    return {"accuracy": float(correct.mean()), "fid": frechet_distance(reference_features, feats),
            "min_digit_accuracy": min(per_digit), "num_images": int(len(images01))}
