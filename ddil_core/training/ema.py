"""Exponential moving average of a network's parameters (of its trainable ones: a LoRA network's adapters)."""
from __future__ import annotations

import torch

from ddil_core.models.trainable import has_frozen_parameters, trainable_state_dict


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in trainable_state_dict(module).items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        live = module.state_dict()
        live = {k: live[k] for k in self.shadow}
        floats = [k for k, v in live.items() if v.dtype.is_floating_point]
        # one fused call over all tensors instead of a kernel (or a CPU loop iteration) per tensor
        torch._foreach_lerp_([self.shadow[k] for k in floats], [live[k].float() for k in floats], 1.0 - self.decay)
        for k, v in live.items():
            if not v.dtype.is_floating_point:
                self.shadow[k].copy_(v)

    def copy_to(self, module: torch.nn.Module) -> None:
        current = module.state_dict()
        module.load_state_dict({k: v.to(current[k].dtype) for k, v in self.shadow.items()},
                               strict=not has_frozen_parameters(module))
