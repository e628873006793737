"""Sharded training of the trainable networks over the processes: FSDP2 (torch.distributed.fsdp.fully_shard), what
accelerate's FSDP plugin applies with fsdp_version 2 (configs/accelerate/fsdp.yaml).

Why the loop shards by itself instead of `accelerator.prepare`: the objectives call their networks several times
per update and outside any single forward (student rollouts, DMD2's generator and fake score, the GAN head), each
network has its own optimiser, and the loop averages gradients itself; and accelerate 1.15 on a CPU turns an FSDP
launch into plain DDP (DistributedType MULTI_CPU), which would leave the sharded path untested. fully_shard runs on
gloo, so tests/training/test_fsdp.py trains on 2 CPU processes with the same code a GPU node runs.

Units: each down block, the mid block and each up block of a diffusers UNet is its own unit (its parameters are
gathered only while it runs, and freed after), the UNet itself holds the rest; any other child with parameters
is a unit of its own. Gradients are reduce-scattered (averaged) by FSDP in backward. The objective says which
networks may be sharded (Objective.shardable: DMD2 with its GAN keeps the fake score whole, see dmd2.py); the others
are replicated and their gradients averaged by the loop as without FSDP.

Checkpoints keep everything, the optimiser state included (the DMD2 anchor's FSDP checkpoints drop it): model
tensors are gathered in full (DTensor.full_tensor), optimiser states with torch.distributed.checkpoint's
get_optimizer_state_dict(full_state_dict) on rank 0; every rank reads the same checkpoint back and keeps its shard
(set_model_state_dict / set_optimizer_state_dict with full_state_dict), so a resumed run continues exactly.
"""
from __future__ import annotations

import torch

from ddil_core.config import Config, ConfigError


def fsdp_requested(config: Config, accelerator) -> bool:
    from accelerate.utils import DistributedType

    return bool(config.training.fsdp) or accelerator.distributed_type == DistributedType.FSDP


def check_supported(config: Config, objective_name: str, stages: int) -> None:
    """What sharded training does not do yet, refused with the reason (each would need its own sharded copy)."""
    t, why = config.training, []
    if t.lora.rank or config.objective.dmd2.fake_lora.rank:
        why.append("LoRA (its adapters are small: train them unsharded)")
    if t.ema.enabled:
        why.append("training.ema (the EMA copy would need sharding too)")
    if objective_name == "lcm":
        why.append("objective lcm (its EMA target network would need sharding too)")
    if objective_name == "tdd" and config.objective.tdd.ema_decay > 0:
        why.append("objective.tdd.ema_decay > 0 (its EMA target network would need sharding too; 0 uses the student)")
    if objective_name == "pd" and stages > 1:
        why.append("progressive distillation over several stages (the hand-off copies the sharded student)")
    if why:
        raise ConfigError("training.fsdp: not supported with " + "; ".join(why))


def shard(module: torch.nn.Module, mesh) -> None:
    """fully_shard `module`'s UNets block by block, and its other children with parameters."""
    from diffusers import UNet2DConditionModel
    from torch.distributed.fsdp import fully_shard

    unets = [module] if isinstance(module, UNet2DConditionModel) else [
        m for m in module.children() if isinstance(m, UNet2DConditionModel)]
    for unet in unets:
        for block in (*unet.down_blocks, unet.mid_block, *unet.up_blocks):
            if block is not None:
                fully_shard(block, mesh=mesh)
        fully_shard(unet, mesh=mesh)
    if module in unets:
        return
    for child in module.children():  # e.g. DMD2's GAN head beside the fake score's UNet
        if child not in unets and any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)


def device_mesh(world: int, device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world,))


def full_tensors(state: dict) -> dict:
    """Every DTensor of a (nested) state gathered in full; a collective: every rank calls it."""
    from torch.distributed.tensor import DTensor

    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out[key] = full_tensors(value)
        elif isinstance(value, DTensor):
            out[key] = value.full_tensor()
        else:
            out[key] = value
    return out


def optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The full optimiser state (keyed by parameter name) on rank 0; a collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_model(module: torch.nn.Module, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))


def load_optimizer(module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))
