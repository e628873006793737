"""Target-Driven Distillation's target timestep selection and its DDIM jump (Wang et al. 2024, "Target-Driven
Distillation: Consistency Distillation with Target Timestep Selection and Decoupled Guidance", arXiv 2409.01347;
code: RedAIGC/Target-Driven-Distillation train/SDXL/train_tdd.py, DDIMSolver.set_timesteps_s, select_s, tdd_step).

- The teacher's solver grid G = {k, 2k, ..., T} - 1 with k = T // N (N = 250: skip 4).
- The k-step inference schedule on G takes the indices floor(linspace(0, N, k, endpoint=False)) of G reversed (the
  TCD/TDD inference rule, diffusers' TCDScheduler.set_timesteps).
- The candidate set M: the union of the k-step schedules for k_min <= k <= k_max, sorted, with 0 prepended and the
  largest value (T - 1) dropped (22 values for 4..8 steps on the 250-grid).
- Per sample, from t_n (the end of the teacher's solver step): tau = max{m in M: m <= t_n}; c uniform in
  {m in M: max(tau - window, 0) <= m <= tau}; s = floor((1 - u * s_ratio) c), u ~ U[0, 1).
"""
from __future__ import annotations

import numpy as np
import torch


def solver_timesteps(num_train_timesteps: int, num_ddim_timesteps: int) -> torch.Tensor:
    """G = (1..N) * (T // N) - 1, ascending (DDIMSolver.ddim_timesteps)."""
    skip = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1) * skip - 1


def inference_schedule(grid: torch.Tensor, num_steps: int) -> torch.Tensor:
    """The descending `num_steps`-step schedule on the ascending solver grid `grid` (TCDScheduler.set_timesteps)."""
    reversed_grid = grid.flip(0)
    index = np.floor(np.linspace(0, len(reversed_grid), num=num_steps, endpoint=False)).astype(np.int64)
    return reversed_grid[torch.from_numpy(index)]


def candidate_targets(grid: torch.Tensor, k_min: int, k_max: int) -> torch.Tensor:
    """M: the union of the k-step schedules, k_min <= k <= k_max, ascending, with 0 first and the largest dropped."""
    union = torch.unique(torch.cat([inference_schedule(grid, k) for k in range(k_min, k_max + 1)]))
    return torch.cat([torch.zeros(1, dtype=union.dtype), union])[:-1]


def default_window(num_train_timesteps: int, k_min: int) -> int:
    """The reference's hard-coded 260 (select_s): one k_min-step interval of T plus 10 of slack."""
    return num_train_timesteps // k_min + 10


def anchors(t_n: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """tau = the largest candidate <= t_n, per sample (candidates ascending, candidates[0] = 0 <= t_n)."""
    return candidates[torch.searchsorted(candidates, t_n.to(candidates.dtype), right=True) - 1]


def window_mask(tau: torch.Tensor, candidates: torch.Tensor, window: int) -> torch.Tensor:
    """[B, |M|]: the candidates in [max(tau - window, 0), tau]."""
    low = (tau - window).clamp(min=0).unsqueeze(1)
    return (candidates.unsqueeze(0) >= low) & (candidates.unsqueeze(0) <= tau.unsqueeze(1))


def target_timesteps(t_n: torch.Tensor, candidates: torch.Tensor, window: int, s_ratio: float,
                     u_pick: torch.Tensor, u_offset: torch.Tensor) -> torch.Tensor:
    """s per sample: the floor(u_pick |C|)-th candidate c of the window C below tau (a uniform pick for u_pick ~
    U[0, 1)), then s = floor((1 - u_offset s_ratio) c). Vectorised; the reference loops over the samples."""
    candidates = candidates.to(t_n.device)
    mask = window_mask(anchors(t_n, candidates), candidates, window)
    count = mask.sum(1)
    pick = (u_pick.to(t_n.device) * count).floor().long().clamp(max=count - 1)
    first = mask.long().argmax(1)  # the window is a contiguous run of the ascending candidates
    c = candidates[first + pick]
    # float32, as the reference computes it (torch.rand * s_ratio times the integer candidate)
    return torch.floor((1 - u_offset.to(t_n.device).float() * s_ratio) * c).long()


def ddim_jump(x0: torch.Tensor, eps: torch.Tensor, a_s: torch.Tensor, s_s: torch.Tensor) -> torch.Tensor:
    """x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps: the state at s that x0 and eps predict (tdd_step)."""
    return a_s * x0 + s_s * eps
