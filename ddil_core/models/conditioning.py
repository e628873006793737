"""Text conditioning as the diffusers pipelines compute it, as a dict of batched tensors:
SD 1.5: {"encoder_hidden_states"}; SDXL: {"encoder_hidden_states", "text_embeds", "time_ids"}.

Kept as plain tensors so latent caches can store them and training can index and concatenate them.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Optional, Union

import torch

from ddil_core.models import placement

log = logging.getLogger(__name__)
Cond = dict[str, torch.Tensor]


def _tokenize(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, list[int]]:
    """Token ids padded to the encoder's length (diffusers' `padding="max_length", truncation=True`) and each
    prompt's untruncated token count: one tokenizer call when no prompt is too long, the usual case."""
    limit = tokenizer.model_max_length
    full = tokenizer(prompts, truncation=False).input_ids
    lengths = [len(ids) for ids in full]
    if max(lengths) <= limit and tokenizer.padding_side == "right" and tokenizer.pad_token_id is not None:
        ids = torch.full((len(prompts), limit), tokenizer.pad_token_id, dtype=torch.long)
        for row, tokens in enumerate(full):
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return ids, lengths
    ids = tokenizer(prompts, padding="max_length", max_length=limit, truncation=True, return_tensors="pt").input_ids
    return ids, lengths


def _warn_truncated(tokenizer, lengths: list[int], labels: Optional[list[str]]) -> None:
    for i, n in enumerate(lengths):
        if n > tokenizer.model_max_length:
            log.warning("%s of %d tokens truncated to %d (the text encoder's limit)",
                        f"{labels[i]}: caption" if labels else "a caption", n, tokenizer.model_max_length)


Size = Union[int, tuple[int, int]]  # an image side, or (height, width)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], resolution: Size, names: Optional[list[str]] = None) -> Cond:
    """The conditional embeddings of `prompts` (StableDiffusionPipeline / StableDiffusionXLPipeline.encode_prompt).
    `resolution`: the image's side or (height, width), SDXL's size conditioning (original and target size).

    Each distinct prompt is encoded once and its embedding repeated: the captions of class-labelled data and the
    images per prompt of evaluation repeat, and the text encoders then cost one pass per distinct prompt.
    `names` (one per prompt) names the samples in the warning about a caption longer than an encoder reads."""
    distinct = list(dict.fromkeys(prompts))
    position = {p: i for i, p in enumerate(distinct)}
    index = [position[p] for p in prompts]
    labels = None
    if names:  # a warning names the first sample of a caption and counts the others
        first = {i: names[row] for row, i in reversed(list(enumerate(index)))}
        count = Counter(index)
        labels = [f"sample '{first[i]}'" + (f" (and {count[i] - 1} more with this caption)" if count[i] > 1 else "")
                  for i in range(len(distinct))]
    cond = _encode_distinct(pipe, distinct, resolution, labels)
    if len(distinct) == len(prompts):
        return cond
    return index_cond(cond, torch.tensor(index, device=next(iter(cond.values())).device))


def _encode_distinct(pipe, prompts: list[str], resolution: Size, labels: Optional[list[str]]) -> Cond:
    device = placement(pipe.unet)[0]
    if getattr(pipe, "text_encoder_2", None) is None:
        enc = pipe.text_encoder
        ids, lengths = _tokenize(pipe.tokenizer, prompts)
        _warn_truncated(pipe.tokenizer, lengths, labels)
        ids = ids.to(device)
        mask = None
        if getattr(enc.config, "use_attention_mask", False):
            mask = (ids != pipe.tokenizer.pad_token_id).long()
        return {"encoder_hidden_states": enc(ids, attention_mask=mask)[0]}
    hidden, pooled = [], None
    for tokenizer, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids, lengths = _tokenize(tokenizer, prompts)
        _warn_truncated(tokenizer, lengths, labels)
        out = enc(ids.to(device), output_hidden_states=True)
        if out[0].ndim == 2:
            pooled = out[0]  # the pooled projection of the second encoder
        hidden.append(out.hidden_states[-2])  # SDXL uses the penultimate layer
    # diffusers' add_time_ids: original_size + crops_coords_top_left + target_size, each (height, width)
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=pooled.dtype, device=device).repeat(len(prompts), 1)
    return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled, "time_ids": time_ids}


@torch.no_grad()
def encode_unconditional(pipe, resolution: Size, negative_prompt: Optional[str] = None) -> Cond:
    """The embedding of the negative prompt (None: the empty prompt) used for classifier-free guidance, batch 1.
    SDXL pipelines with force_zeros_for_empty_prompt (the default) use zeros when no negative prompt is given, as
    diffusers does."""
    cond = encode_prompts(pipe, [negative_prompt or ""], resolution)
    if (negative_prompt is None and getattr(pipe, "text_encoder_2", None) is not None
            and pipe.config.get("force_zeros_for_empty_prompt", True)):
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


class EmbeddingCache:
    """Caption -> its embeddings, kept across batches up to `max_bytes`: a dataset whose captions repeat (class
    labels, templates) then runs the text encoders once per distinct caption, not once per batch (and warns once
    about a caption too long for them). Once full it stops adding: distinct-caption datasets such as COCO fill it and
    gain nothing, at no extra encoder cost."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes, self.bytes, self.rows = max_bytes, 0, {}

    def encode(self, pipe, prompts: list[str], resolution: int, names: Optional[list[str]] = None) -> Cond:
        missing = list(dict.fromkeys(p for p in prompts if p not in self.rows))
        if missing:
            first = {p: names[i] for i, p in reversed(list(enumerate(prompts)))} if names else None
            cond = encode_prompts(pipe, missing, resolution, [first[p] for p in missing] if first else None)
            fresh = {p: {k: v[i].clone() for k, v in cond.items()} for i, p in enumerate(missing)}
            for p, row in fresh.items():
                size = sum(v.numel() * v.element_size() for v in row.values())
                if self.bytes + size <= self.max_bytes:
                    self.rows[p], self.bytes = row, self.bytes + size
        else:
            fresh = {}
        rows = [self.rows.get(p) or fresh[p] for p in prompts]
        return {k: torch.stack([row[k] for row in rows]) for k in rows[0]}
