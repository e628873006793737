"""Atomic, verified checkpoints: each is a folder step-NNNNNNN/ built under a temporary name and renamed, with a
manifest of every file's sha256. The newest complete one is resumed; a corrupt one is named and refused."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from ddil_core.data.shards import ShardError, sha256_file, staging_dir, write_json_atomic

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    pass


def checkpoint_dirs(root: Path) -> list[Path]:
    root = Path(root)
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / MANIFEST).exists())


def latest_checkpoint(root: Path) -> Optional[Path]:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def save_checkpoint(root: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict,
                    pickled: dict, buffer=None, keep: int = 2) -> Path:
    """tensors: file stem -> state dict (safetensors); state: JSON; pickled: torch.save'd plain containers
    (optimiser states; loaded back with weights_only=True)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = staging_dir(final)
    for stem, sd in tensors.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp / f"{stem}.safetensors"))
    torch.save(pickled, tmp / "optimizers.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    if buffer is not None:
        buffer.save(tmp / "buffer")
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    write_json_atomic(tmp / MANIFEST, {"step": step, "files": {f: sha256_file(tmp / f) for f in files}})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(folder: Path) -> dict:
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{folder / MANIFEST}: unreadable checkpoint manifest ({exc})") from None
    for name, digest in manifest["files"].items():
        path = folder / name
        if not path.exists():
            raise CheckpointError(f"{path}: missing from checkpoint")
        if sha256_file(path) != digest:
            raise CheckpointError(f"{path}: sha256 does not match the checkpoint manifest (corrupt checkpoint)")
    return manifest


def load_checkpoint(folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
    folder = Path(folder)
    verify_checkpoint(folder)
    tensors = {p.stem: load_file(str(p)) for p in folder.glob("*.safetensors")}
    state = json.loads((folder / "state.json").read_text())
    pickled = torch.load(folder / "optimizers.pt", weights_only=True)
    return tensors, state, pickled
