"""Use every core of a CPU and still rebuild the same weights bit for bit: prepare-demo's data parallelism in threads.

torch's own intra-op threads make a step faster on an idle CPU but not reproducibly (the split of a reduction
depends on the thread count) and they stall on a shared one (demo/threads.py). Here each of `workers` threads runs
whole operations on one intra-op thread instead:

- training (`Replicas`): a batch is cut into `workers` shards in order; shard i runs forward and backward on copy i
  of the module in thread i (torch releases the GIL inside its operations), the copies' gradients are added into
  the module's in shard order, and the optimiser steps the module, whose weights the copies share. The result
  depends on `workers` only, never on the machine or its load; with one worker it is the plain loop, bit for bit.
- sampling (`map_ordered`): independent chunks (each image has its own seed) in `workers` threads, results in
  order; the images are the sequential ones, bit for bit.

Measured by benchmarks/demo_workers.py (docs/performance.md): on the project's idle 2-core machine a teacher update
is 1.34x faster as two shards in two threads than on one thread, 1.27x on two intra-op threads.
"""
from __future__ import annotations

import copy
import queue
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def map_ordered(fn: Callable[..., R], items: Iterable[T], workers: int,
                resources: Optional[Sequence[Any]] = None) -> Iterator[R]:
    """fn(item) for each item in `workers` threads, yielded in the items' order (lazily, so a caller can report
    progress). With `resources` (one per worker), fn(resource, item) holds one of them alone while it runs."""
    items = list(items)
    free: queue.SimpleQueue = queue.SimpleQueue()
    for resource in resources or []:
        free.put(resource)

    def call(item):
        if resources is None:
            return fn(item)
        resource = free.get()
        try:
            return fn(resource, item)
        finally:
            free.put(resource)

    if workers <= 1 or len(items) <= 1:
        yield from map(call, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        yield from pool.map(call, items)


def pipeline_copies(pipe, n: int) -> list:
    """A StableDiffusionPipeline `pipe` and n - 1 pipelines sharing its modules, each with a tokenizer of its own: a
    transformers fast tokenizer may refuse to be called from two threads at once ("Already borrowed")."""
    copies = [type(pipe)(**{**pipe.components, "tokenizer": copy.deepcopy(pipe.tokenizer)},
                         requires_safety_checker=False) for _ in range(n - 1)]
    return [pipe, *copies]


def shards(batch: Sequence[torch.Tensor], n: int) -> list[tuple[torch.Tensor, ...]]:
    """The batch's tensors (first dimension = the batch) cut into n contiguous shards, in order."""
    parts = [torch.tensor_split(t, n) for t in batch]
    return [tuple(p[i] for p in parts) for i in range(n) if len(parts[0][i])]


class Replicas:
    """`module` and workers - 1 copies of it, trained as one (see the module docstring). The copies' parameters and
    buffers share the module's storage, so the optimiser's in-place step updates every copy; each copy keeps gradients
    of its own."""

    def __init__(self, module: torch.nn.Module, workers: int = 1):
        if workers < 1:
            raise ValueError(f"workers: {workers} (at least 1)")
        self.module = module
        self.copies = [copy.deepcopy(module) for _ in range(workers - 1)]
        with torch.no_grad():
            for replica in self.copies:
                for p, q in zip(module.parameters(), replica.parameters()):
                    q.data = p.data
                for b, c in zip(module.buffers(), replica.buffers()):
                    c.data = b.data
        self.pool = ThreadPoolExecutor(workers - 1) if self.copies else None

    @property
    def workers(self) -> int:
        return 1 + len(self.copies)

    def backward(self, loss_of: Callable[..., torch.Tensor], batch: Sequence[torch.Tensor]) -> float:
        """Gradients of the batch's loss in module's .grad; returns the loss. loss_of(module, *tensors) is the mean
        loss of a shard; the batch's loss is the shard means weighted by shard size."""
        if not self.copies:
            loss = loss_of(self.module, *batch)
            loss.backward()
            return loss.item()
        size = len(batch[0])
        parts = shards(batch, self.workers)

        def run(args):
            replica, part = args
            loss = loss_of(replica, *part) * (len(part[0]) / size)
            loss.backward()
            return loss.item()

        modules = [self.module, *self.copies][:len(parts)]
        rest = [self.pool.submit(run, job) for job in zip(modules[1:], parts[1:])]
        values = [run((modules[0], parts[0]))] + [f.result() for f in rest]
        with torch.no_grad():
            for replica in modules[1:]:
                for p, q in zip(self.module.parameters(), replica.parameters()):
                    if q.grad is not None:
                        p.grad = q.grad.clone() if p.grad is None else p.grad.add_(q.grad)
                    q.grad = None
        return sum(values)

    def __enter__(self) -> "Replicas":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown()
