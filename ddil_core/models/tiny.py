"""tiny://sd15 and tiny://sdxl: deterministic tiny random pipelines built in-process, with a word-level tokenizer
made with the `tokenizers` library. This is how tests, CI and smoke runs work with no weights and no network.

Shapes: 16x16 RGB images, an AutoencoderKL with two blocks (8x8x4 latents), a UNet2DConditionModel with
block_out_channels (32, 64), CLIP text encoders of width 32. The SDXL variant adds a second text encoder with
projection and the text_time added conditioning, like SSD-1B/SDXL.
"""
from __future__ import annotations

import torch

from ddil_core.data.digits import DIGIT_WORDS

VOCAB_WORDS = (
    ["a", "an", "the", "of", "handwritten", "digit", "number", "photo", "picture", "image", "drawing", "with", "and",
     "on", "in", "cat", "dog", "person", "red", "blue", "green", "black", "white", "small", "large"] + DIGIT_WORDS
)
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]
MAX_LENGTH = 16
TINY_FAMILIES = ("sd15", "sdxl")


def build_tokenizer(words: list[str] = VOCAB_WORDS, max_length: int = MAX_LENGTH):
    """A lower-casing, whitespace word-level tokenizer wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + sorted(set(words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=max_length,
    )


def _text_encoder(tokenizer, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def tiny_unet(family: str, time_cond_proj_dim: int | None = None, **overrides):
    """The family's tiny UNet2DConditionModel; `overrides` replace its config keys (the demo teachers)."""
    from diffusers import UNet2DConditionModel

    kwargs = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8, norm_num_groups=8, time_cond_proj_dim=time_cond_proj_dim,
    )
    if family == "sdxl":  # two text encoders of width 32 concatenated, plus the text_time added conditioning
        kwargs.update(cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=6 * 8 + 32, transformer_layers_per_block=1)
    else:
        kwargs.update(cross_attention_dim=32)
    return UNet2DConditionModel(**{**kwargs, **overrides})


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8, sample_size=16,
    )


def tiny_scheduler():
    from diffusers import DDIMScheduler

    # SD's schedule; trailing spacing so that few-step grids start at t = 999.
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing",
        prediction_type="epsilon",
    )


def build_tiny_pipeline(family: str, seed: int = 0):
    """A deterministic tiny random pipeline of the given family ("sd15" or "sdxl")."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny family '{family}'; use tiny://sd15 or tiny://sdxl")
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    vae, unet = tiny_vae(), tiny_unet(family)
    text_encoder = _text_encoder(tokenizer, with_projection=False)
    if family == "sd15":
        return StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=tiny_scheduler(),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    text_encoder_2 = _text_encoder(tokenizer, with_projection=True)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=build_tokenizer(), unet=unet, scheduler=tiny_scheduler(),
    )
