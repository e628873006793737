"""Per-prompt diversity: mean pairwise distance among the K samples of one prompt, averaged over prompts.

The offline stand-in for LPIPS-diversity (docs/method.md section 7): distance in whatever feature space the
caller embeds images into.
"""
from __future__ import annotations

import numpy as np
import torch


def mean_pairwise_distance(features_by_prompt) -> float:
    """features_by_prompt: list of [K, D] (torch or numpy), one per prompt, K >= 2.

    Mean euclidean distance over the K(K-1)/2 distinct pairs of each prompt, then the mean over prompts
    (each prompt weighs the same whatever its K).
    """
    if len(features_by_prompt) == 0:
        raise ValueError("no prompts")
    per_prompt = []
    for i, feats in enumerate(features_by_prompt):
        t = feats if isinstance(feats, torch.Tensor) else torch.as_tensor(np.asarray(feats))
        t = t.detach().to("cpu", torch.float64).flatten(1)  # images [K, C, H, W] count as vectors
        if t.shape[0] < 2:
            raise ValueError(f"prompt {i} has {t.shape[0]} sample(s); a pairwise distance needs at least 2")
        per_prompt.append(torch.pdist(t).mean())
    return float(torch.stack(per_prompt).mean())
