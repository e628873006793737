"""Text conditioning as the diffusers pipelines compute it, as a dict of batched tensors:
SD 1.5: {"encoder_hidden_states"}; SDXL: {"encoder_hidden_states", "text_embeds", "time_ids"}.

Kept as plain tensors so latent caches can store them and training can index and concatenate them.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)
Cond = dict[str, torch.Tensor]


def _tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    full = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if full.shape[-1] > ids.shape[-1]:
        log.warning("a caption was truncated to %d tokens (the text encoder's limit)", tokenizer.model_max_length)
    return ids


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], resolution: int) -> Cond:
    """The conditional embeddings of `prompts` (StableDiffusionPipeline / StableDiffusionXLPipeline.encode_prompt)."""
    device = pipe.unet.device
    if getattr(pipe, "text_encoder_2", None) is None:
        enc = pipe.text_encoder
        ids = _tokenize(pipe.tokenizer, prompts).to(device)
        mask = None
        if getattr(enc.config, "use_attention_mask", False):
            mask = (ids != pipe.tokenizer.pad_token_id).long()
        return {"encoder_hidden_states": enc(ids, attention_mask=mask)[0]}
    hidden, pooled = [], None
    for tokenizer, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        out = enc(_tokenize(tokenizer, prompts).to(device), output_hidden_states=True)
        if out[0].ndim == 2:
            pooled = out[0]  # the pooled projection of the second encoder
        hidden.append(out.hidden_states[-2])  # SDXL uses the penultimate layer
    h = resolution
    time_ids = torch.tensor([[h, h, 0, 0, h, h]], dtype=pooled.dtype, device=device).repeat(len(prompts), 1)
    return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled, "time_ids": time_ids}


@torch.no_grad()
def encode_unconditional(pipe, resolution: int) -> Cond:
    """The embedding of the empty prompt used for classifier-free guidance, batch 1. SDXL pipelines with
    force_zeros_for_empty_prompt (the default) use zeros, as diffusers does."""
    cond = encode_prompts(pipe, [""], resolution)
    if getattr(pipe, "text_encoder_2", None) is not None and pipe.config.get("force_zeros_for_empty_prompt", True):
        cond = {k: (v if k == "time_ids" else torch.zeros_like(v)) for k, v in cond.items()}
    return cond


def index_cond(cond: Cond, idx) -> Cond:
    return {k: v[idx] for k, v in cond.items()}


def cat_cond(conds: list[Cond]) -> Cond:
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def expand_cond(cond: Cond, n: int) -> Cond:
    return {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()}


def unet_kwargs(cond: Cond) -> dict:
    kwargs = {"encoder_hidden_states": cond["encoder_hidden_states"]}
    if "text_embeds" in cond:
        kwargs["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
    return kwargs
