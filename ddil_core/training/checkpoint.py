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

from ddil_core.config.redaction import redacted_json
from ddil_core.data.shards import (is_disk_full, remove_stale_staging, sha256_file, staging_dir,
                                  write_json_atomic)

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
    _remove_leftovers(root)
    final = root / f"step-{step:07d}"
    tmp = staging_dir(final)
    try:
        for stem, sd in tensors.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp / f"{stem}.safetensors"))
        torch.save(pickled, tmp / "optimizers.pt")
        (tmp / "state.json").write_text(redacted_json(state, indent=2))
        if buffer is not None:
            buffer.save(tmp / "buffer")
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        write_json_atomic(tmp / MANIFEST, {"step": step, "files": {f: sha256_file(tmp / f) for f in files}})
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, Exception) and is_disk_full(exc):
            raise CheckpointError(f"{root}: no space left on device while writing checkpoint step {step}; free "
                                  "space, then rerun to resume from the previous checkpoint") from None
        raise
    if final.exists():
        _retire(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(root)[:-keep]:
        _retire(old)
    return final


def _retire(folder: Path) -> None:
    """Remove a checkpoint folder by first renaming it to a hidden name (atomic), so a process killed while deleting
    never leaves a half-deleted step-* folder that still looks like a checkpoint."""
    trash = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_leftovers(root: Path) -> None:
    """Hidden staging or retired folders of a process killed while saving (the stage's output lock guarantees no
    other writer): they are never resumed from, only removed."""
    for path in root.iterdir():
        if path.name.startswith(".step-") and ".old-" in path.name:
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(".step-") and ".tmp-" in path.name:
            remove_stale_staging(path.with_name(path.name[1:].split(".tmp-")[0]))


def verify_checkpoint(folder: Path) -> dict:
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{folder / MANIFEST}: unreadable checkpoint manifest ({type(exc).__name__}: {exc})") from None
    for name, digest in files.items():
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
