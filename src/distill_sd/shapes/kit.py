"""The shapes teacher "kit": a complete SD-1-style pipeline directory that pretraining starts from.

`build_kit` assembles a stock `StableDiffusionPipeline` (diffusers format, safetensors) whose frozen
parts are final and whose U-Net is random: `distill-sd pretrain` then trains only the U-Net on the
shapes world, and the result is a small teacher with SD-1's exact block topology, so block removal
and distillation run on it exactly as on SD-1.5. Choices (and why):

  * tokenizer: the real CLIP BPE tokenizer (49,408 tokens, 77 positions, pads with <|endoftext|>),
    written from the vocabulary the package ships, so prompts are tokenised exactly as in SD-1.
  * text encoder: a small `CLIPTextModel` (hidden 48, 2 layers, 4 heads, MLP 96, real vocabulary
    and special-token ids), seeded, taught to read shapes captions and then frozen, as SD's CLIP is:
    teacher and students share it. Width 48 keeps the whole teacher under its 25 MB budget: the real
    vocabulary's 49,408-row token table is 4.7 MB in fp16 (6.3 MB at 64). Two steps:
    - init: token embeddings at std 1 and position embeddings at std 0.5 (TEXT_EMBEDDING_STD) instead of
      transformers' 0.02. At 0.02 the residual stream is dominated by the attention layers' near-uniform
      average over the prefix, so "a red circle" and "a blue circle" differ little (cosine 0.87 at the
      colour token); at unit scale each output is its own token plus its position (cosine 0.36).
    - reading (READER_STEPS of `shapes.reader.pretrain_reader`, about 4 minutes on one core): a random
      encoder keeps words apart but cannot say which colour goes with which shape or where each object
      goes, and a U-Net trained on it learns one-object captions but not two-object ones. A short
      supervised task on captions alone (no images) teaches the encoder to put the scene, region by
      region, into its end-of-text and padding states -- the offline stand-in for CLIP's pretraining.
    `build_kit(..., reader_steps=0, text_embedding_std=None)` builds the plain random encoder for comparison.
  * VAE: the shapes `AutoencoderKL` of `distill_sd.shapes.vae` (spatial factor 4: 64x64 images,
    4x16x16 latents), with its measured `scaling_factor`.
  * scheduler: `DDPMScheduler` with SD-1's training noise schedule (scaled_linear betas 0.00085 ->
    0.012, 1000 steps, epsilon prediction, no sample clipping), so training and the distillation
    code see SD's exact noise levels; any SD sampler can be swapped in for inference.
  * U-Net: `UNet2DConditionModel` with SD-1's topology (down: 3 x CrossAttnDownBlock2D +
    DownBlock2D; mid: UNetMidBlock2DCrossAttn; up: UpBlock2D + 3 x CrossAttnUpBlock2D; 2 layers per
    block) at small widths (default 32, 64, 128, 128; GroupNorm 8 groups so every width divides),
    4 attention heads, cross-attention width 64 (= the text encoder's hidden size), sample size 16
    (the latent side: the pipeline's default output is 16 x 4 = 64 px), 4 in/out channels.
  * no safety checker / feature extractor: there is nothing to filter in the shapes world and they
    would need downloaded weights.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from distill_sd.errors import UserError

TEXT_WIDTH = 48  # the text encoder's hidden size, and so the U-Net's cross-attention width

SHAPES_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 4,  # diffusers' legacy name: SD-1 uses it as the number of heads
    "block_out_channels": [32, 64, 128, 128],
    "center_input_sample": False,
    "cross_attention_dim": TEXT_WIDTH,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
    "norm_num_groups": 8,
    "out_channels": 4,
    "sample_size": 16,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}

SHAPES_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": TEXT_WIDTH,
    "intermediate_size": 2 * TEXT_WIDTH,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": TEXT_WIDTH,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}

SHAPES_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "clip_sample": False,
    "steps_offset": 1,
}

# Init std of the frozen text encoder's (token, position) embeddings; transformers' default is 0.02 for both.
TEXT_EMBEDDING_STD: tuple[float, float] = (1.0, 0.5)

# Steps of caption-reading pretraining for the text encoder (shapes.reader); 0 leaves it random.
READER_STEPS = 1500

DEFAULT_VAE_DIR = Path(__file__).parent / "assets" / "vae"


def shapes_unet_config(block_out_channels: tuple[int, ...] | list[int] | None = None,
                       sample_size: int | None = None) -> dict[str, Any]:
    """SHAPES_UNET_CONFIG, optionally with other widths (4 of them, each divisible by 8) or latent side."""
    cfg = dict(SHAPES_UNET_CONFIG)
    if block_out_channels is not None:
        widths = [int(w) for w in block_out_channels]
        if len(widths) != 4 or any(w <= 0 or w % cfg["norm_num_groups"] for w in widths):
            raise UserError(f"U-Net widths must be 4 positive multiples of {cfg['norm_num_groups']}, got {widths}")
        cfg["block_out_channels"] = widths
    if sample_size is not None:
        cfg["sample_size"] = int(sample_size)
    return cfg


def build_kit(out_dir: str | Path, vae_dir: str | Path | None = None, seed: int = 0,
              block_out_channels: tuple[int, ...] | list[int] | None = None,
              text_embedding_std: tuple[float, float] | None = TEXT_EMBEDDING_STD,
              reader_steps: int = READER_STEPS, reader_nouns: bool = False) -> Path:
    """Write the shapes teacher kit (a StableDiffusionPipeline directory) to `out_dir` and return it.

    `vae_dir` is a trained shapes VAE (default: the one shipped in distill_sd/shapes/assets/vae).
    The text encoder and U-Net are randomly initialised from `seed`; `text_embedding_std` sets the std of the
    text encoder's token and position embeddings (None: transformers' default); `reader_steps` of
    `shapes.reader.pretrain_reader` teach it to read captions (0: leave it random). Refuses a non-empty `out_dir`.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from distill_sd.models import check_new_output_dir, save_pipeline
    from distill_sd.reference import write_clip_tokenizer

    out = Path(out_dir)
    check_new_output_dir(out)  # before minutes of reading pretraining, not after
    vae_path = Path(vae_dir) if vae_dir is not None else DEFAULT_VAE_DIR
    if not (vae_path / "config.json").is_file():
        raise UserError(f"no VAE at '{vae_path}': train one with `python -m distill_sd.shapes.vae --out DIR`")
    vae = AutoencoderKL.from_pretrained(vae_path, torch_dtype=torch.float32).eval()
    vae.requires_grad_(False)
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if vae.config.sample_size % vae_factor:
        raise UserError(f"VAE sample_size {vae.config.sample_size} is not a multiple of its factor {vae_factor}")

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_clip_tokenizer(Path(tmp))

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**SHAPES_TEXT_ENCODER_CONFIG)).eval()
    text_encoder.requires_grad_(False)
    if text_embedding_std is not None:
        text_model = getattr(text_encoder, "text_model", text_encoder)  # transformers 4 wraps it; 5 does not
        embeddings = text_model.embeddings.token_embedding, text_model.embeddings.position_embedding
        for module, std in zip(embeddings, text_embedding_std):
            torch.nn.init.normal_(module.weight, std=std)
    if reader_steps:
        from distill_sd.shapes.reader import pretrain_reader

        pretrain_reader(text_encoder, tokenizer, steps=reader_steps, seed=seed, nouns=reader_nouns)
    torch.manual_seed(seed + 1)
    unet_cfg = shapes_unet_config(block_out_channels, sample_size=vae.config.sample_size // vae_factor)
    unet = UNet2DConditionModel.from_config(unet_cfg)
    scheduler = DDPMScheduler.from_config(SHAPES_SCHEDULER_CONFIG)

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    card = (
        "# shapes teacher kit\n\n"
        "Stable Diffusion 1 topology at small widths for the offline shapes world "
        f"({vae.config.sample_size}x{vae.config.sample_size} images, "
        f"{vae.config.latent_channels}x{unet_cfg['sample_size']}x{unet_cfg['sample_size']} latents).\n"
        f"Tokenizer, text encoder (taught to read captions for {reader_steps} steps"
        f"{', with noun targets' if reader_nouns else ''}, then frozen), VAE and "
        "scheduler are final; the U-Net is "
        f"randomly initialised (seed {seed}) and is what `distill-sd pretrain` trains. "
        "Written by `distill_sd.shapes.kit.build_kit`.\n"
    )
    return save_pipeline(pipe, out, card=card)
