"""The replay buffer of student-backward states (DDIL paper v2: "lightweight replay buffer").

A bounded store of (x_t, grid index k, prompt reference, training step when made). Each batch inserts a fraction of
fresh student rollouts and draws its student share from the buffer, so the costly no-grad rollouts are amortised.
Eviction is FIFO (oldest first) or reservoir (every state ever inserted equally likely to be kept). Preallocated
tensors, vectorised inserts and draws: no per-sample Python loops. Saved as shards so it versions with DVC.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ddil_core.data.shards import ShardError, sha256_file, write_json_atomic


class ReplayBuffer:
    def __init__(self, capacity: int, eviction: str = "fifo"):
        if eviction not in ("fifo", "reservoir"):
            raise ValueError(f"unknown buffer eviction '{eviction}' (fifo or reservoir)")
        self.capacity, self.eviction = capacity, eviction
        self.x: torch.Tensor | None = None
        self.k = torch.zeros(capacity, dtype=torch.long)
        self.ref = torch.zeros(capacity, dtype=torch.long)
        self.made_step = torch.zeros(capacity, dtype=torch.long)
        self.size = 0  # filled slots
        self.seen = 0  # states ever offered
        self.next_slot = 0  # FIFO write position

    def __len__(self) -> int:
        return self.size

    def clear(self) -> None:
        self.size = self.seen = self.next_slot = 0

    def insert(self, x: torch.Tensor, k: torch.Tensor, ref: torch.Tensor, step: int, generator: torch.Generator) -> None:
        n = x.shape[0]
        if self.x is None:
            self.x = torch.zeros(self.capacity, *x.shape[1:], dtype=x.dtype)
        if self.eviction == "fifo":
            slots = (self.next_slot + torch.arange(n)) % self.capacity
            keep = torch.ones(n, dtype=torch.bool)
            if n > self.capacity:  # only the newest `capacity` survive
                keep[: n - self.capacity] = False
            self.next_slot = int((self.next_slot + n) % self.capacity)
        else:
            # Reservoir sampling (Vitter's algorithm R): item number i (0-based) fills a free slot while there is
            # one, else replaces a uniform slot j < i + 1 when j < capacity.
            i = self.seen + torch.arange(n)
            j = (torch.rand(n, generator=generator, dtype=torch.float64) * (i + 1).double()).long()
            slots = torch.where(i < self.capacity, i, j)
            keep = slots < self.capacity
        self.seen += n
        slots, rows = slots[keep], torch.arange(n)[keep]
        # Later writes to the same slot win, as in a sequential loop.
        order = torch.arange(len(slots))
        last = torch.zeros(self.capacity, dtype=torch.long).scatter_reduce(0, slots, order, "amax", include_self=False)
        winners = last[slots] == order
        slots, rows = slots[winners], rows[winners]
        self.x[slots] = x[rows].to(self.x.dtype).cpu()
        self.k[slots], self.ref[slots] = k[rows].cpu(), ref[rows].cpu()
        self.made_step[slots] = step
        self.size = min(self.capacity, self.size + n) if self.eviction == "fifo" else min(self.capacity, self.seen)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Indices of n stored states: without replacement when there are enough, else with."""
        if self.size == 0:
            raise RuntimeError("sampling from an empty replay buffer")
        if n <= self.size:
            return torch.randperm(self.size, generator=generator)[:n]
        return torch.randint(self.size, (n,), generator=generator)

    def mean_age(self, step: int) -> float:
        return float((step - self.made_step[: self.size]).float().mean()) if self.size else 0.0

    # -- persistence: one safetensors shard plus a JSON manifest with its sha256

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"k": self.k[: self.size].clone(), "ref": self.ref[: self.size].clone(),
                   "made_step": self.made_step[: self.size].clone()}
        if self.x is not None:
            tensors["x"] = self.x[: self.size].clone()
        save_file(tensors, str(folder / "shard-00000.safetensors"))
        write_json_atomic(folder / "manifest.json", {
            "kind": "replay-buffer", "count": self.size, "capacity": self.capacity, "eviction": self.eviction,
            "seen": self.seen, "next_slot": self.next_slot,
            "shards": [{"file": "shard-00000.safetensors", "count": self.size,
                        "sha256": sha256_file(folder / "shard-00000.safetensors")}],
        })

    def load(self, folder: Path) -> None:
        folder = Path(folder)
        manifest_path = folder / "manifest.json"
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ShardError(f"{manifest_path}: unreadable replay-buffer manifest ({exc})") from None
        shard = folder / manifest["shards"][0]["file"]
        if sha256_file(shard) != manifest["shards"][0]["sha256"]:
            raise ShardError(f"{shard}: sha256 does not match the manifest (corrupt replay buffer)")
        tensors = load_file(str(shard))
        n = manifest["count"]
        self.size, self.seen, self.next_slot = n, manifest["seen"], manifest["next_slot"]
        if "x" in tensors:
            self.x = torch.zeros(self.capacity, *tensors["x"].shape[1:], dtype=tensors["x"].dtype)
            self.x[:n] = tensors["x"]
        self.k[:n], self.ref[:n], self.made_step[:n] = tensors["k"], tensors["ref"], tensors["made_step"]
