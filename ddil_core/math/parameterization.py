"""Conversions between x0, eps and v predictions, and classifier-free guidance (docs/method.md section 3)."""
from __future__ import annotations

import torch


def to_x0_eps(model_output: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, s: torch.Tensor, prediction_type: str):
    """(x0, eps) from a network output of the given prediction type at state x_t = a x0 + s eps."""
    if prediction_type == "epsilon":
        eps = model_output
        return (x_t - s * eps) / a, eps
    if prediction_type == "sample":
        x0 = model_output
        return x0, (x_t - a * x0) / s
    if prediction_type == "v_prediction":  # v = a eps - s x0  =>  x0 = a x_t - s v, eps = s x_t + a v
        return a * x_t - s * model_output, s * x_t + a * model_output
    raise ValueError(f"unknown prediction_type '{prediction_type}'")


def x0_to_eps(x0: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (x_t - a * x0) / s


def to_model_output(x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, s: torch.Tensor, prediction_type: str):
    """The network output that encodes (x0, eps) in the given prediction type."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return a * eps - s * x0
    raise ValueError(f"unknown prediction_type '{prediction_type}'")


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, scale) -> torch.Tensor:
    """Imagen form: out_u + w (out_c - out_u); w = 1 is the conditional output alone."""
    return uncond + scale * (cond - uncond)
