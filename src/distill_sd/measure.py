"""Parameter counts, MACs and feature shapes of U-Nets, measured from configs on the meta device.

Nothing here allocates weights or computes numbers: the model is built on torch's meta device and a
forward pass propagates only shapes, so full-size SD-1.5 / SDXL configs are measured in well under a
second with no RAM.

How MACs are counted (the convention of thop, which BK-SDM's published figures use): for every
`nn.Conv2d`, output elements x (in_channels / groups) x kernel area; for every `nn.Linear`, output
elements x in_features. Bias additions, normalisation, activations and the attention matmuls (QK^T, AV,
which are functional ops, not modules) are not counted. Batch 1, 77 text tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import UNet2DConditionModel

VAE_SCALE = 8  # pixels per latent cell of every SD VAE


def meta_unet(config: Mapping[str, Any]) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(dict(config))


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def dummy_unet_inputs(config: Mapping[str, Any], batch: int = 1, latent_hw: tuple[int, int] = (64, 64),
                      tokens: int = 77, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None) -> dict[str, Any]:
    """Inputs of the right shapes for one U-Net forward (random on real devices, empty on meta)."""

    def make(*shape: int) -> torch.Tensor:
        if str(device) == "meta":
            return torch.empty(*shape, device="meta", dtype=dtype)
        return torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    cross = config["cross_attention_dim"]
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    inputs: dict[str, Any] = {
        "sample": make(batch, config.get("in_channels", 4), *latent_hw),
        "timestep": torch.full((batch,), 500, device=device, dtype=torch.long),
        "encoder_hidden_states": make(batch, tokens, cross),
    }
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text embedding + 6 size/crop ids
        time_dim = config["addition_time_embed_dim"]
        pooled = config["projection_class_embeddings_input_dim"] - 6 * time_dim
        inputs["added_cond_kwargs"] = {"text_embeds": make(batch, pooled),
                                       "time_ids": make(batch, 6)}
    return inputs


def first_tensor(output: Any) -> torch.Tensor:
    """The hidden states of a block's output (down blocks return (hidden, skips); others a tensor/dataclass)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return first_tensor(output[0])
    return first_tensor(output.sample)


@contextmanager
def _hooks(model: torch.nn.Module, fn_by_module: Iterable[tuple[torch.nn.Module, Any]]):
    handles = [m.register_forward_hook(fn) for m, fn in fn_by_module]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _meta_forward(model: UNet2DConditionModel, resolution: int, vae_scale: int = VAE_SCALE) -> None:
    side = resolution // vae_scale
    with torch.no_grad():
        model(**dummy_unet_inputs(model.config, latent_hw=(side, side), device="meta"))


def count_macs(model: UNet2DConditionModel, resolution: int = 512, vae_scale: int = VAE_SCALE) -> int:
    """MACs of one U-Net forward at `resolution` px (batch 1), thop convention (see module docstring)."""
    total = 0

    def conv(m: torch.nn.Conv2d, _: Any, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m: torch.nn.Linear, _: Any, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * m.in_features

    pairs = [(m, conv) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    pairs += [(m, linear) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with _hooks(model, pairs):
        _meta_forward(_on_meta(model), resolution, vae_scale)
    return total


def _on_meta(model: UNet2DConditionModel) -> UNet2DConditionModel:
    if any(not p.is_meta for p in model.parameters()):
        raise ValueError("measure on a meta-device model (build it with meta_unet(config))")
    return model


def output_shapes(model: UNet2DConditionModel, names: Iterable[str], resolution: int = 512) -> dict[str, tuple]:
    """Shapes of the named modules' outputs in one forward (batch 1)."""
    shapes: dict[str, tuple] = {}
    modules = dict(model.named_modules())

    def record(name: str):
        return lambda _m, _i, out: shapes.__setitem__(name, tuple(first_tensor(out).shape))

    with _hooks(model, [(modules[n], record(n)) for n in names]):
        _meta_forward(_on_meta(model), resolution)
    return shapes


def block_layout(model: UNet2DConditionModel) -> list[dict[str, Any]]:
    """One row per top-level block: type, layers, output channels, transformer depth per layer, params."""
    rows = []
    named = [("conv_in", model.conv_in), ("time_embedding", model.time_embedding)]
    if getattr(model, "add_embedding", None) is not None:
        named.append(("add_embedding", model.add_embedding))
    named += [(f"down_blocks.{i}", b) for i, b in enumerate(model.down_blocks)]
    if model.mid_block is not None:
        named.append(("mid_block", model.mid_block))
    named += [(f"up_blocks.{i}", b) for i, b in enumerate(model.up_blocks)]
    named += [("conv_norm_out", model.conv_norm_out), ("conv_out", model.conv_out)]
    for name, block in named:
        if block is None:
            continue
        resnets = getattr(block, "resnets", None)
        attentions = [a for a in getattr(block, "attentions", []) or [] if a is not None]
        rows.append({
            "block": name,
            "type": type(block).__name__,
            "layers": len(resnets) if resnets is not None else None,
            "out_channels": resnets[-1].out_channels if resnets else None,
            "transformer_depth": [len(a.transformer_blocks) for a in attentions] or None,
            "params": count_params(block),
        })
    return rows


def pipeline_unet_counts(pipe: Any, resolution: int) -> tuple[int, int]:
    """(parameters, MACs at `resolution` px) of the U-Net of a diffusers pipeline or of an exported one
    (`distill-sd export`), from its config on the meta device: the same figures for a model and its exports."""
    from distill_sd.export import ExportedPipeline

    unet = meta_unet(pipe.unet_config if isinstance(pipe, ExportedPipeline) else pipe.unet.config)
    return count_params(unet), count_macs(unet, resolution, pipe.vae_scale_factor)
