"""The trainable copies of the teacher every objective builds (student, DMD2's fake score), and what memory at scale
changes about them (docs/performance.md "what fits where").

- Full fine-tuning (training.lora.rank = 0, the default): an fp32 copy of every weight, as before. Under
  training.mixed_precision the forward runs in bf16/fp16 autocast on these fp32 master weights.
- LoRA (rank > 0): the copy stays frozen in the teacher's dtype (model.dtype: bf16 at scale) and peft adds
  low-rank adapters in fp32 to `target_modules`, initialised so the student starts as the teacher (B = 0). The
  targets and the gaussian init are diffusers' examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py.
- Gradient checkpointing (training.gradient_checkpointing): diffusers' enable_gradient_checkpointing, which only
  recomputes when grad is enabled, so the no-grad student rollouts of DDIL run exactly as without it.

Checkpoints of a LoRA network keep only its trainable tensors (the frozen base is the teacher, rebuilt at start).
"""
from __future__ import annotations

import copy
from typing import Callable, Optional

import torch


def trainable_copy(unet, lora, checkpointing: bool, build: Optional[Callable] = None) -> torch.nn.Module:
    """A trainable copy of `unet` (build(unet) when given, e.g. LCM's copy with a guidance embedding)."""
    net = build(unet) if build is not None else copy.deepcopy(unet)
    if not lora.rank:
        net = net.float().train().requires_grad_(True)
    else:
        add_lora(net, lora)
        net.train()
    if checkpointing:
        net.enable_gradient_checkpointing()
    return net


def add_lora(net, lora) -> None:
    """Freeze `net` and add peft LoRA adapters (fp32) to its target modules, in place."""
    from peft import LoraConfig

    net.requires_grad_(False)
    net.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank, target_modules=list(lora.target_modules),
                               init_lora_weights="gaussian"))
    for p in net.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def has_frozen_parameters(module: torch.nn.Module) -> bool:
    return any(not p.requires_grad for p in module.parameters())


def trainable_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint needs to restore `module`: the whole state dict, or for a network with a frozen base (LoRA)
    only its trainable parameters and its buffers."""
    state = module.state_dict()
    if not has_frozen_parameters(module):
        return state
    frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
    return {k: v for k, v in state.items() if k not in frozen}


def load_trainable_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of trainable_state_dict: only frozen parameters may be missing."""
    if not has_frozen_parameters(module):
        module.load_state_dict(state)
        return
    missing, unexpected = module.load_state_dict(state, strict=False)
    frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
    if unexpected or set(missing) - frozen:
        raise RuntimeError(f"checkpoint does not fit the network: missing {sorted(set(missing) - frozen)[:5]}, "
                           f"unexpected {unexpected[:5]}")


def uses_lora(module: torch.nn.Module) -> bool:
    return bool(getattr(module, "peft_config", None))


def lora_layers(unet) -> dict[str, torch.Tensor]:
    """The student's LoRA weights as save_lora_weights writes them and load_lora_weights reads them: peft's state
    dict (lora_A / lora_B keys). Not convert_state_dict_to_diffusers: in diffusers 0.42 it rewrites the attention
    layers' keys to the old `lora.down` form, which load_lora_weights then skips (a silently partial student)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)


def lora_metadata(unet) -> dict:
    """The adapter's LoraConfig (rank, lora_alpha, targets) as diffusers stores it beside the weights
    (save_lora_weights' unet_lora_adapter_metadata): without it load_lora_weights takes alpha = rank, and a student
    trained at alpha / rank != 1 reloads at the wrong strength (RedAIGC/Target-Driven-Distillation's SDXL export, r 64
    and the PEFT default alpha 8, reloads 8x too strong)."""
    config = unet.peft_config[next(iter(unet.peft_config))].to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}


class TargetNetwork:
    """The EMA target network of consistency distillation (LCM, TDD): a frozen copy of the student (`module`) that
    follows its trained weights, every weight or a LoRA student's adapters (the frozen base never changes), and is
    saved with a checkpoint as `target.*` tensors of those weights only."""

    def __init__(self, student: torch.nn.Module, decay: float):
        self.module = copy.deepcopy(student).eval().requires_grad_(False)
        self.decay = decay
        self._trained = set(trainable_state_dict(student))
        self._pairs = [(p_t, p_s) for (name, p_t), p_s in zip(self.module.named_parameters(), student.parameters())
                       if name in self._trained]

    @torch.no_grad()
    def update(self) -> None:
        """target <- decay * target + (1 - decay) * student, in one fused call over all tensors."""
        targets = [p_t for p_t, _ in self._pairs]
        torch._foreach_lerp_(targets, [p_s.detach().to(p_t.dtype) for p_t, p_s in self._pairs], 1.0 - self.decay)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"target.{k}": v for k, v in self.module.state_dict().items() if k in self._trained}

    def load(self, tensors: dict[str, torch.Tensor], strict: bool) -> None:
        self.module.load_state_dict({k[len("target."):]: v for k, v in tensors.items() if k.startswith("target.")},
                                    strict=strict)
