"""Samples decoded into tensors in dataset order, by worker processes so reading and decoding overlap the encoders.

`load_samples` is what cache-latents reads: every good sample as a `LoadedSample` (key, caption, image tensor and a
digest of the three), in the dataset's fixed order whatever the number of workers. With `num_workers` = n > 0, a
torch DataLoader runs n processes; every worker lists the dataset and loads the chunks c = w mod n of consecutive
positions, yielding one item per chunk whatever its samples (good ones, or the error that made one bad), so the
DataLoader's round-robin over workers returns chunks 0, 1, 2, ... in order. The bad-sample policy, `limit` and the
skip report are applied in the main process, as `iter_samples` does, so the result does not depend on n. (Webdataset
tars are read whole by every worker, which decodes only its own chunks.)
"""
from __future__ import annotations

import hashlib
import os
import signal
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ddil_core.data.datasets import (DatasetError, SkipReport, as_dataset_error, good_samples, image_to_tensor,
                                     list_samples)


@dataclass
class LoadedSample:
    key: str
    caption: str
    image: torch.Tensor  # [3, H, W] in [-1, 1]
    digest: bytes  # sha256 of key, caption and pixels: what a resumed cache-latents compares


def sample_digest(key: str, caption: str, image: torch.Tensor) -> bytes:
    h = hashlib.sha256()
    for part in (key.encode(), b"\0", caption.encode(), b"\0", image.numpy().tobytes()):
        h.update(part)
    return h.digest()


class _Chunks(IterableDataset):
    """Worker w of n reads the chunks c = w, w + n, ... of `chunk` consecutive dataset positions and yields one item
    per chunk, (c, entries, images): entries[j] is (key, caption, digest) for a good sample or the exception that
    made position c * chunk + j bad; the good samples' images come stacked in one tensor (one transfer per chunk).
    An error of the listing itself comes as (None, exception, None)."""

    def __init__(self, uri: str, images: Optional[str], resolution: int, chunk: int):
        self.uri, self.images, self.resolution, self.chunk = uri, images, resolution, chunk

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        entries, tensors = [], []
        try:
            for i, (key, load) in enumerate(list_samples(self.uri, self.images, self.resolution)):
                c = i // self.chunk
                if c % workers != worker:
                    continue
                try:
                    sample = load()
                    image = image_to_tensor(sample.image, self.resolution)
                    entries.append((sample.key, sample.caption, sample_digest(sample.key, sample.caption, image)))
                    tensors.append(image)
                except Exception as exc:  # the main process applies the bad-sample policy, in order
                    entries.append(self._portable(exc))
                if len(entries) == self.chunk:
                    yield c, entries, torch.stack(tensors) if tensors else None
                    entries, tensors = [], []
        except Exception as exc:
            yield None, self._portable(exc), None
            return
        if entries:
            yield c, entries, torch.stack(tensors) if tensors else None

    def _portable(self, exc: Exception) -> Exception:
        """Every failure as the DatasetError naming the path (StorageError for the storage itself): one line, and
        it crosses the process boundary intact."""
        return as_dataset_error(self.uri, self.uri, exc)


def _worker_signals(_worker_id: int) -> None:
    # A group-wide Ctrl-C or SIGTERM is the main process's to handle (a preempted pod keeps its partial cache and
    # closes the workers); a worker killed by it would race that with a DataLoader error. So SIGINT is ignored and
    # SIGTERM ends the worker with exit code 0, which the DataLoader does not report as a failure. SIGTERM must still
    # end it: it is how multiprocessing stops daemon workers at interpreter exit (a loader never closed, e.g. one
    # held by a traceback), and an ignored SIGTERM there hangs the exit forever.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda _signum, _frame: os._exit(0))


def load_samples(uri: str, images: Optional[str] = None, policy: str = "fail", limit: Optional[int] = None,
                 skips: Optional[SkipReport] = None, resolution: int = 16, num_workers: int = 0,
                 chunk: int = 16) -> Iterator[LoadedSample]:
    """Every good sample of a dataset as tensors, in order; bad samples raise (policy fail) or are counted (skip)."""
    chunks = _Chunks(uri, images, resolution, chunk)
    if num_workers > 0:
        items = DataLoader(chunks, batch_size=None, num_workers=num_workers, prefetch_factor=4,
                           worker_init_fn=_worker_signals, multiprocessing_context="fork")
    else:
        items = chunks
    yield from good_samples(_in_order(items), uri, policy, limit, skips)


def _in_order(items) -> Iterator[LoadedSample | DatasetError]:
    """The chunks' entries in dataset order: each good sample, or the DatasetError of a bad one."""
    for expected, (c, entries, images) in enumerate(items):
        if c is None:
            raise entries
        if c != expected:  # the round-robin over workers must return chunks in order
            raise RuntimeError(f"data loader: chunk {c} arrived in place of chunk {expected}")
        good = 0
        for entry in entries:
            if isinstance(entry, DatasetError):
                yield entry
            elif isinstance(entry, BaseException):
                raise entry
            else:
                key, caption, digest = entry
                yield LoadedSample(key, caption, images[good], digest)
                good += 1
