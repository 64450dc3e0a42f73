"""What the frozen parts of a pipeline give the U-Net: latents from the VAE, conditioning from the text encoders.

One place for SD-1/SD-2 (one text encoder) and SDXL (two encoders, pooled embedding, size/crop time ids), used
by training on the fly and by `distill-sd cache` ahead of time, so both produce identical inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline


def is_sdxl(pipe: DiffusionPipeline) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


@dataclass
class TextConditioning:
    embeds: torch.Tensor  # B x tokens x cross_attention_dim
    pooled: torch.Tensor | None = None  # SDXL: B x pooled dim

    def unet_kwargs(self, resolution: int) -> dict:
        """encoder_hidden_states (and SDXL's added_cond_kwargs: uncropped square image of `resolution`)."""
        kwargs = {"encoder_hidden_states": self.embeds}
        if self.pooled is not None:
            b = self.pooled.shape[0]
            ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=self.pooled.dtype,
                               device=self.pooled.device).expand(b, 6)
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": ids}
        return kwargs


@torch.no_grad()
def encode_text(pipe: DiffusionPipeline, captions: list[str], device: torch.device) -> TextConditioning:
    """The pipeline's own prompt encoding (the same tensors it conditions on at inference)."""
    if is_sdxl(pipe):
        embeds, _, pooled, _ = pipe.encode_prompt(captions, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return TextConditioning(embeds, pooled)
    embeds, _ = pipe.encode_prompt(captions, device=device, num_images_per_prompt=1,
                                   do_classifier_free_guidance=False)
    return TextConditioning(embeds)


@torch.no_grad()
def encode_latent_dist(pipe: DiffusionPipeline, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE posterior, unscaled; SDXL's VAE runs in fp32 where its config asks (force_upcast)."""
    vae = pipe.vae
    dtype = torch.float32 if getattr(vae.config, "force_upcast", False) else vae.dtype
    if vae.dtype != dtype:
        vae.to(dtype)
    dist = vae.encode(pixels.to(vae.device, dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


def sample_latents(mean: torch.Tensor, std: torch.Tensor, scaling_factor: float,
                   generator: torch.Generator | None) -> torch.Tensor:
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * noise) * scaling_factor


def end_of_text_positions(tokenizer, captions: list[str]) -> torch.Tensor:
    """Where each caption's first end-of-text token sits in the pipeline's tokenisation: the state a CLIP text
    encoder pools, the last one that has read the whole caption (its attention is causal)."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return first_token_positions(ids, tokenizer.eos_token_id)


def first_token_positions(ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """Per row of `ids` (B x tokens), the index of the first `token_id` (0 where there is none)."""
    return (ids == token_id).int().argmax(dim=1)


def replace_word_states(embeds: torch.Tensor, eot: torch.Tensor, source: str = "eot",
                        rows: torch.Tensor | None = None) -> torch.Tensor:
    """`embeds` (B x tokens x dim) with the states at the word tokens (after the start token, before the
    end-of-text token at `eot`) replaced by the caption's end-of-text state (`source="eot"`: the encoder's summary
    of the caption) or by the start state (`"start"`: the same for every caption); only in `rows` (B bools) if
    given. Start, end-of-text and padding states are kept."""
    if source not in ("eot", "start"):
        raise ValueError(f"source must be 'eot' or 'start', got {source!r}")
    eot = eot.to(embeds.device)
    position = torch.arange(embeds.shape[1], device=embeds.device)
    words = (position > 0) & (position < eot[:, None])
    if rows is not None:
        words = words & rows.to(embeds.device)[:, None]
    at = eot if source == "eot" else torch.zeros_like(eot)
    state = embeds[torch.arange(len(embeds), device=embeds.device), at]
    return torch.where(words[..., None], state[:, None, :].expand_as(embeds), embeds)
