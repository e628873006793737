"""Sharded safetensors datasets with a manifest: what cache-latents, teacher-rollouts and the replay buffer write.

A folder holds shard-00000.safetensors, ... and manifest.json with counts, shapes and per-shard sha256.
Writers build the folder under a temporary name and rename it when complete (design.md: artifact rule), so a
reader never sees a half-written folder; readers verify every shard's sha256 against the manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"


class ShardError(RuntimeError):
    """A shard folder is missing, unreadable or does not match its manifest; the message names the file."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False))
    os.replace(tmp, path)


def staging_dir(final: Path) -> Path:
    """A fresh temporary sibling of `final` to build an output in."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish_dir(tmp: Path, final: Path) -> None:
    """Replace `final` by the completed `tmp` folder (rename; the old one is removed first)."""
    final = Path(final)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


class ShardWriter:
    """Accumulates batches of tensors (first dimension = sample) and writes fixed-size shards."""

    def __init__(self, folder: Path, kind: str, shard_size: int):
        self.folder, self.kind, self.shard_size = Path(folder), kind, shard_size
        self.folder.mkdir(parents=True, exist_ok=True)
        self._pending: dict[str, list[torch.Tensor]] = {}
        self._pending_count = 0
        self.shards: list[dict] = []
        self.count = 0
        self.shapes: dict[str, list[int]] = {}

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        n = {v.shape[0] for v in batch.values()}
        if len(n) != 1:
            raise ValueError(f"batch tensors disagree on the number of samples: {n}")
        for key, value in batch.items():
            self._pending.setdefault(key, []).append(value.detach().cpu().contiguous())
            self.shapes[key] = list(value.shape[1:])
        self._pending_count += n.pop()
        while self._pending_count >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, n: int) -> None:
        joined = {k: torch.cat(v) for k, v in self._pending.items()}
        shard = {k: v[:n].contiguous() for k, v in joined.items()}
        self._pending = {k: [v[n:]] for k, v in joined.items()}
        self._pending_count -= n
        name = f"shard-{len(self.shards):05d}.safetensors"
        path = self.folder / name
        save_file(shard, str(path))
        self.shards.append({"file": name, "count": n, "sha256": sha256_file(path)})
        self.count += n

    def finish(self, **extra: Any) -> dict:
        if self._pending_count:
            self._flush(self._pending_count)
        manifest = {"kind": self.kind, "count": self.count, "shapes": self.shapes, "shards": self.shards, **extra}
        write_json_atomic(self.folder / MANIFEST, manifest)
        return manifest


def read_manifest(folder: Path, kind: Optional[str] = None) -> dict:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise ShardError(f"{path}: no manifest (is '{folder}' an output of the right stage?)")
    try:
        manifest = json.loads(path.read_text())
        _ = manifest["shards"], manifest["count"], manifest["kind"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ShardError(f"{path}: unreadable manifest ({type(exc).__name__}: {exc})") from None
    if kind and manifest["kind"] != kind:
        raise ShardError(f"{path}: holds '{manifest['kind']}' shards, expected '{kind}'")
    return manifest


def load_shards(folder: Path, kind: Optional[str] = None, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """All shards of a folder concatenated, after checking each file's sha256 against the manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder, kind)
    parts: dict[str, list[torch.Tensor]] = {}
    for entry in manifest["shards"]:
        path = folder / entry["file"]
        if not path.exists():
            raise ShardError(f"{path}: listed in the manifest but missing")
        if verify and sha256_file(path) != entry["sha256"]:
            raise ShardError(f"{path}: sha256 does not match the manifest (corrupt or modified shard)")
        try:
            tensors = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise ShardError(f"{path}: unreadable shard ({exc})") from None
        for key, value in tensors.items():
            parts.setdefault(key, []).append(value)
    data = {k: torch.cat(v) for k, v in parts.items()}
    return data, manifest
