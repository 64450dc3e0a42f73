"""Reference architectures: the exact SD-1.5, SD-2.1 and SDXL configs, and random-weight pipelines of them.

No weights can be downloaded here, so full-size work (parameter counts, MACs, timing, surgery) runs on
pipelines with these exact shapes and *random* weights: their images are noise. `narrow=True` keeps the
block topology (stages, layers, transformer depths, text-encoder/VAE structure) with small widths, for
tests that need real forwards in seconds.

The tokenizer is the real CLIP BPE tokenizer (49,408 tokens), generated offline from the BPE merges
shipped in `assets/` (MIT, from OpenAI CLIP via open_clip).
"""

from __future__ import annotations

import gzip
import json
import tempfile
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

ARCHS = ("sd15", "sd21", "sdxl")
NOISE_WARNING = "random weights: this pipeline's images are noise (it exists for shapes, timing and tests)"

_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}

_SD_UNET = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32, "out_channels": 4,
    "sample_size": 64, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
_SD_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 512, "scaling_factor": 0.18215,
}
_CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
           "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
           "projection_dim": 768, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
_OPENCLIP_H = dict(_CLIP_L, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                   num_attention_heads=16, hidden_act="gelu", projection_dim=512)
_OPENCLIP_BIGG = dict(_CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                      num_attention_heads=20, hidden_act="gelu", projection_dim=1280)

# Narrow widths: same topology, about 1/10 of every width; text encoders keep 2 layers (SDXL reads the
# penultimate hidden state) and the real vocabulary.
_NARROW_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                "projection_dim": 32}
_NARROW_VAE = {"block_out_channels": [16, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 8,
               "sample_size": 64}

ARCH_SPECS: dict[str, dict[str, Any]] = {
    "sd15": {
        "title": "Stable Diffusion 1.5",
        "resolution": 512,
        "unet": _SD_UNET,
        "vae": _SD_VAE,
        "text_encoders": [("CLIPTextModel", _CLIP_L)],
        "pad_token": "<|endoftext|>",
        "scheduler": ("PNDMScheduler", dict(_BETAS, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)),
        "narrow": {"unet": {"block_out_channels": [32, 64, 128, 128], "norm_num_groups": 8,
                            "attention_head_dim": 4, "cross_attention_dim": 32, "sample_size": 8}},
    },
    "sd21": {
        "title": "Stable Diffusion 2.1 (768, v-prediction)",
        "resolution": 768,
        "unet": dict(_SD_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                     use_linear_projection=True, upcast_attention=True, sample_size=96),
        "vae": dict(_SD_VAE, sample_size=768),
        "text_encoders": [("CLIPTextModel", _OPENCLIP_H)],
        "pad_token": "!",
        "scheduler": ("DDIMScheduler", dict(_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                            prediction_type="v_prediction")),
        "narrow": {"unet": {"block_out_channels": [32, 64, 128, 128], "norm_num_groups": 8,
                            "attention_head_dim": [1, 2, 4, 4], "cross_attention_dim": 32, "sample_size": 8}},
    },
    "sdxl": {
        "title": "Stable Diffusion XL 1.0 (base)",
        "resolution": 1024,
        "unet": dict(_SD_UNET, addition_embed_type="text_time", addition_time_embed_dim=256,
                     attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280],
                     cross_attention_dim=2048,
                     down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                     up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                     projection_class_embeddings_input_dim=2816, sample_size=128,
                     transformer_layers_per_block=[1, 2, 10], use_linear_projection=True),
        "vae": dict(_SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        "text_encoders": [("CLIPTextModel", _CLIP_L), ("CLIPTextModelWithProjection", _OPENCLIP_BIGG)],
        "pad_token": "!",  # tokenizer_2 (bigG); tokenizer 1 pads with <|endoftext|>
        "scheduler": ("EulerDiscreteScheduler", dict(_BETAS, steps_offset=1, timestep_spacing="leading")),
        "narrow": {"unet": {"block_out_channels": [32, 64, 128], "norm_num_groups": 8,
                            "attention_head_dim": [1, 2, 4], "cross_attention_dim": 64,
                            "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 32 + 6 * 8,
                            "sample_size": 8}},
    },
}


def check_arch(arch: str) -> dict[str, Any]:
    from distill_sd.errors import UserError

    if arch not in ARCH_SPECS:
        raise UserError(f"unknown architecture '{arch}'; choose one of {', '.join(ARCHS)}")
    return ARCH_SPECS[arch]


def unet_config(arch: str, narrow: bool = False) -> dict[str, Any]:
    spec = check_arch(arch)
    return dict(spec["unet"], **(spec["narrow"]["unet"] if narrow else {}))


def vae_config(arch: str, narrow: bool = False) -> dict[str, Any]:
    spec = check_arch(arch)
    return dict(spec["vae"], **(_NARROW_VAE if narrow else {}))


def text_encoder_configs(arch: str, narrow: bool = False) -> list[tuple[str, dict[str, Any]]]:
    return [(cls, dict(cfg, **(_NARROW_TEXT if narrow else {}))) for cls, cfg in check_arch(arch)["text_encoders"]]


# ------------------------------------------------------------------------------------------ tokenizer

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def clip_vocab_files() -> tuple[str, list[str]]:
    """(vocab.json text, merges lines) of CLIP's tokenizer, derived exactly as CLIP derives them."""
    raw = resources.files("distill_sd").joinpath("assets", "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # CLIP keeps 48,894 merges after the header line
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), merges


def write_clip_tokenizer(out_dir: Path, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """Write a complete CLIP tokenizer (49,408 tokens, 77 positions) to `out_dir` and return it loaded."""
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_json, merges = clip_vocab_files()
    (out_dir / "vocab.json").write_text(vocab_json, encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    # transformers 5 ignores vocab_file/merges_file given to the constructor: load from the directory.
    tok = CLIPTokenizer.from_pretrained(out_dir, model_max_length=77, pad_token=pad_token,
                                        bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                        unk_token="<|endoftext|>")
    tok.save_pretrained(out_dir)
    return tok


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        return write_clip_tokenizer(Path(tmp), pad_token)


# ------------------------------------------------------------------------------------------ pipelines

def reference_pipeline(arch: str, narrow: bool = False, seed: int = 0,
                       dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """A complete pipeline of the exact `arch` shapes with random weights (seeded). Its images are noise."""
    spec = check_arch(arch)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(unet_config(arch, narrow))
    vae = AutoencoderKL.from_config(vae_config(arch, narrow))
    encoders = []
    for cls_name, cfg in text_encoder_configs(arch, narrow):
        cls = CLIPTextModelWithProjection if cls_name == "CLIPTextModelWithProjection" else CLIPTextModel
        encoders.append(cls(CLIPTextConfig(**cfg)))
    sched_name, sched_cfg = spec["scheduler"]
    scheduler = {"PNDMScheduler": PNDMScheduler, "DDIMScheduler": DDIMScheduler,
                 "EulerDiscreteScheduler": EulerDiscreteScheduler}[sched_name].from_config(sched_cfg)
    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
            tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(pad_token=spec["pad_token"]),
            unet=unet, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=encoders[0], tokenizer=clip_tokenizer(pad_token=spec["pad_token"]),
            unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
