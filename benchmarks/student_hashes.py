"""The sha256 of tiny PD, LCM and DMD2 students trained with the default config: run it at two commits to check that
a refactoring left every student bit-identical (same numbers printed at both).

    python benchmarks/student_hashes.py             # about a minute on 2 cores
    git stash; python benchmarks/student_hashes.py; git stash pop; python benchmarks/student_hashes.py
"""
from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OBJECTIVES = {"pd": [], "lcm": ["objective.name=lcm"],
              "dmd2": ["objective.name=dmd2", "objective.dmd2.dfake_gen_update_ratio=2"]}
BASE = ["model.teacher=tiny://sd15", "training.steps=4", "training.checkpoint_every=4", "rollouts.num_samples=8"]


def main() -> dict:
    from ddil_core.config import load_config
    from ddil_core.stages.cache_latents import cache_latents
    from ddil_core.stages.distill import distill
    from ddil_core.stages.teacher_rollouts import teacher_rollouts

    root = Path(tempfile.mkdtemp(prefix="ddil-hashes-"))
    config = load_config("tiny", BASE)
    cache_latents(config, root / "latents")
    teacher_rollouts(config, root / "latents", root / "rollouts")
    hashes = {}
    for name, extra in OBJECTIVES.items():
        student = distill(load_config("tiny", BASE + extra), root / "latents", [root / "rollouts"], root / name)
        data = (Path(student) / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
        hashes[name] = hashlib.sha256(data).hexdigest()[:16]
        print(name, hashes[name], flush=True)
    return hashes


if __name__ == "__main__":
    main()
