"""Exponential moving average of a network's parameters."""
from __future__ import annotations

import torch


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        live = module.state_dict()
        floats = [k for k, v in live.items() if v.dtype.is_floating_point]
        # one fused call over all tensors instead of a kernel (or a CPU loop iteration) per tensor
        torch._foreach_lerp_([self.shadow[k] for k in floats], [live[k].float() for k in floats], 1.0 - self.decay)
        for k, v in live.items():
            if not v.dtype.is_floating_point:
                self.shadow[k].copy_(v)

    def copy_to(self, module: torch.nn.Module) -> None:
        module.load_state_dict({k: v.to(module.state_dict()[k].dtype) for k, v in self.shadow.items()})
