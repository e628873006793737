"""Shared fixtures: tiny latent caches and teacher rollouts, built once per test session."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
# Tiny models: one thread is faster than two fighting over a busy 2-core machine (and children inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*torchvision.*")
torch.set_num_threads(1)


def tiny_config(family: str = "sd15", *overrides: str):
    from ddil_core.config import load_config

    return load_config("tiny", [f"model.teacher=tiny://{family}", *overrides])


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """{family: (latents_dir, rollouts_dir)} for tiny://sd15 and tiny://sdxl."""
    from ddil_core.stages.cache_latents import cache_latents
    from ddil_core.stages.teacher_rollouts import teacher_rollouts

    root = tmp_path_factory.mktemp("tiny-data")
    out = {}
    for family in ("sd15", "sdxl"):
        config = tiny_config(family)
        cache_latents(config, root / family / "latents")
        teacher_rollouts(config, root / family / "latents", root / family / "rollouts")
        out[family] = (root / family / "latents", root / family / "rollouts")
    return out
