"""Training data read from the shards on demand (training.streaming): the latent cache, its prompt embeddings and the
teacher rollouts stay on disk, and each batch reads only its rows, so host memory does not grow with the cache.

`ShardRows` is one tensor of a shard folder (or of several: the fan-out of teacher-rollouts) that indexes like the
in-memory tensor `load_shards` would give (`rows[idx]`, `rows[idx, pos]`, `.shape`, `.dtype`), and returns the same
values, so the DDIL mixture draws the same batches from it for the same seed (tests/training/test_scale.py).

Rows are read with positioned reads (os.pread) at offsets from the safetensors header (the format: an 8-byte
little-endian header length, a JSON header with each tensor's dtype, shape and data_offsets, then the bytes;
huggingface/safetensors README), not memory-mapped: pages of a mapped file count in the process's resident memory
once touched, and over a long run would grow it to the size of the cache. The files' sha256 are checked against the
manifest when opened, as load_shards does.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Sequence

import torch

from ddil_core.data.shards import ShardError

DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


class ShardRows:
    """Tensor `key` of the given shard files, concatenated along dim 0, read on demand."""

    def __init__(self, files: Sequence[tuple[Path, int]], key: str):
        self.key, self._parts, starts, self._fds = key, [], [0], []
        row_shape = dtype = None
        for path, count in files:
            try:
                header, base = _header(path)
                meta = header[key]
            except (OSError, ValueError, KeyError, struct.error) as exc:
                raise ShardError(f"{path}: no readable tensor '{key}' ({type(exc).__name__}: {exc})") from None
            shape, dt = list(meta["shape"]), DTYPES.get(meta["dtype"])
            if dt is None or not shape or shape[0] != count:
                raise ShardError(f"{path}: tensor '{key}' has dtype {meta['dtype']} and shape {shape}, expected "
                                 f"{count} rows")
            if row_shape is not None and (shape[1:] != row_shape or dt != dtype):
                raise ShardError(f"{path}: tensor '{key}' rows are {shape[1:]} {dt}, the other shards' {row_shape} {dtype}")
            row_shape, dtype = shape[1:], dt
            self._fds.append(os.open(path, os.O_RDONLY))
            self._parts.append(base + meta["data_offsets"][0])
            starts.append(starts[-1] + count)
        if row_shape is None:
            raise ShardError(f"no shards hold tensor '{key}'")
        self._starts = torch.tensor(starts)
        self.dtype, self.row_shape = dtype, row_shape
        self._item = torch.empty((), dtype=dtype).element_size()
        self._row_numel = int(torch.tensor(row_shape).prod()) if row_shape else 1
        self.shape = torch.Size([starts[-1], *row_shape])

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, row: int, sub: int = 0, numel: int | None = None) -> torch.Tensor:
        """`numel` elements from element `sub` of row `row`."""
        if not 0 <= row < self.shape[0]:
            raise IndexError(f"row {row} of '{self.key}' is outside [0, {self.shape[0]})")
        part = int(torch.searchsorted(self._starts, row, right=True)) - 1
        numel = self._row_numel if numel is None else numel
        offset = self._parts[part] + ((row - int(self._starts[part])) * self._row_numel + sub) * self._item
        data = os.pread(self._fds[part], numel * self._item, offset)
        return torch.frombuffer(bytearray(data), dtype=self.dtype)

    def __getitem__(self, index) -> torch.Tensor:
        """rows[idx] -> [n, *row]; rows[idx, pos] -> [n, *row[1:]] (rollout states at one grid position each)."""
        if isinstance(index, tuple):
            rows, pos = (torch.as_tensor(i).reshape(-1) for i in index)
            inner = self.row_shape[1:]
            sub_numel = self._row_numel // self.row_shape[0]
            out = [self._read(int(r), int(p) * sub_numel, sub_numel) for r, p in zip(rows.tolist(), pos.tolist())]
            return torch.stack(out).reshape(len(out), *inner) if out else torch.empty(0, *inner, dtype=self.dtype)
        rows = torch.arange(self.shape[0])[index] if isinstance(index, slice) else torch.as_tensor(index)
        single = rows.ndim == 0
        rows = rows.reshape(-1)
        out = [self._read(int(r)) for r in rows.tolist()]
        stacked = torch.stack(out).reshape(len(out), *self.row_shape) if out else torch.empty(0, *self.row_shape,
                                                                                              dtype=self.dtype)
        return stacked[0] if single else stacked

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def all_finite(self, chunk_bytes: int = 64 << 20) -> bool:
        """No NaN or infinity in any row: each shard read in contiguous chunks (bounded memory)."""
        row_bytes = self._row_numel * self._item
        per_chunk = max(1, chunk_bytes // row_bytes)
        for part, fd in enumerate(self._fds):
            count = int(self._starts[part + 1] - self._starts[part])
            for first in range(0, count, per_chunk):
                n = min(per_chunk, count - first)
                data = os.pread(fd, n * row_bytes, self._parts[part] + first * row_bytes)
                if not bool(torch.isfinite(torch.frombuffer(bytearray(data), dtype=self.dtype)).all()):
                    return False
        return True

    def load(self) -> torch.Tensor:
        """All rows in memory (small tensors such as rollout prompt references)."""
        return self[torch.arange(self.shape[0])]

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def tensor_keys(files: Sequence[tuple[Path, int]]) -> list[str]:
    if not files:
        return []
    header, _ = _header(files[0][0])
    return [k for k in header if k != "__metadata__"]
