"""The per-source training loss by student grid index k, for train_log.jsonl: a free training-time proxy of
covariate shift (a loss that grows with k on the student's own states and not on the teacher's)."""
from __future__ import annotations

import torch

from ddil_core.method.batch import SOURCES


def bin_by_step(bins: dict, term: str, values: torch.Tensor, source: torch.Tensor, t: torch.Tensor,
                 grid: torch.Tensor) -> None:
    """Sums and counts of a term per (source, grid index k), k = N for a timestep off the grid (LCM's forward
    states on its solver grid), on the values' device; a grid that changed (a PD stage) restarts the bins."""
    n = len(grid)
    grid = grid.to(t.device)
    hit = t[:, None] == grid[None, :]
    k = torch.where(hit.any(1), hit.float().argmax(1), torch.full_like(t, n))
    key = (source.to(t.device) * (n + 1) + k).to(values.device)
    held = bins.get(term)
    if held is None or held[0] != n:
        held = (n, torch.zeros(3 * (n + 1), dtype=values.dtype, device=values.device),
                torch.zeros(3 * (n + 1), dtype=values.dtype, device=values.device))
    held[1].index_add_(0, key, values)
    held[2].index_add_(0, key, torch.ones_like(values))
    bins[term] = held


def by_step(n: int, sums: torch.Tensor, counts: torch.Tensor) -> dict:
    """{source: {k: mean}} of an interval's binned term ("off-grid" for k = N), sources and bins present only."""
    out = {}
    for i, (total, count) in enumerate(zip(sums.tolist(), counts.tolist())):
        if count:
            source, k = SOURCES[i // (n + 1)], i % (n + 1)
            out.setdefault(source, {})["off-grid" if k == n else str(k)] = total / count
    return out
