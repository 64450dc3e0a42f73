"""A small VAE for the shapes world: the frozen image autoencoder of the shapes teacher.

Stable Diffusion denoises in the latent space of a KL autoencoder; so does our small teacher.
This module trains a stock `diffusers.AutoencoderKL` on rendered shapes images, so the result
loads anywhere a diffusers VAE does.

Choices (and why):
  * 3 encoder/decoder blocks -> spatial factor 4: a 64x64 image becomes a 4x16x16 latent. SD-1
    uses factor 8 at 512 px; 16x16 latents keep the U-Net's four resolution levels (16, 8, 4, 2)
    meaningful while staying cheap on a CPU. 4 latent channels as in SD, so latents have SD's shape
    conventions.
  * small widths (16, 32, 64), one resnet per block, GroupNorm with 8 groups, no mid-block
    attention: flat-coloured shapes need no global context, and this is about 4x cheaper per step
    than (32, 64, 64) with attention, so it trains in minutes on two CPU cores (650k parameters,
    2.6 MB in fp32).
  * loss: L1 + MSE on pixels, weighted 5x on objects and their 1-pixel border. Objects cover a small
    part of an image: unweighted, the cheapest answer is to paint background, and the decoder
    learns object colours only very slowly (300 steps: 0.5% of held-out reconstructions correct
    unweighted vs 99.5% weighted). Plus an L1 term on horizontal/vertical pixel differences
    (edge-aware: keeps corners and apexes crisp, which the scorer's shape moments read) and a tiny
    KL weight (1e-6) that keeps the posterior's scale bounded without blurring reconstructions.
  * data: a pool of rendered train-split images (never a held-out colour/shape pairing), with
    random flips and 90-degree rotations so the decoder also sees shapes the way a diffusion model
    may misplace them.
  * bf16 autocast on CPU (about 2x faster, stable here); weights and optimiser stay fp32.
  * at most 2 threads (the target machine). On a machine busy with other work use `threads=1`:
    2-thread OpenMP regions stall when another process holds a core (measured 4-40x slower per
    step), while 1 thread only loses the 2x parallelism.
  * after training, `scaling_factor` = 1 / std of the latent means over a sample, as SD did, so
    scaled latents have unit variance for the diffusion model.

Run `python -m distill_sd.shapes.vae --out DIR` to train; `evaluate_vae` scores reconstructions of
held-out-split images with the shapes scorer.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from distill_sd.errors import UserError
from distill_sd.shapes.scorer import score_batch
from distill_sd.shapes.world import BACKGROUND, DEFAULT_SIZE, generate

DEFAULT_STEPS = 1000
DEFAULT_BATCH_SIZE = 32
DEFAULT_LR = 2e-3
DEFAULT_KL_WEIGHT = 1e-6
DEFAULT_EDGE_WEIGHT = 0.5
DEFAULT_FG_WEIGHT = 4.0
DEFAULT_MSE_WEIGHT = 1.0
DEFAULT_POOL_SIZE = 4096
DOWN_FACTOR = 4  # 3 blocks, two of which downsample


def shapes_vae_config(
    size: int = DEFAULT_SIZE,
    block_out_channels: tuple[int, ...] = (16, 32, 64),
    norm_num_groups: int = 8,
    mid_block_attention: bool = False,
) -> dict[str, Any]:
    """`AutoencoderKL` config of the shapes VAE (3 blocks: spatial factor 4, 4 latent channels)."""
    n = len(block_out_channels)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(block_out_channels),
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": norm_num_groups,
        "sample_size": size,
        "scaling_factor": 1.0,
        "mid_block_add_attention": mid_block_attention,
    }


def image_pool(n: int, seed: int, split: str = "train", size: int = DEFAULT_SIZE) -> torch.Tensor:
    """`n` rendered shapes images as a uint8 tensor (n, 3, size, size)."""
    arrays = np.stack([np.asarray(image, dtype=np.uint8) for image, _ in generate(n, seed, split, size)])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float in [-1, 1], the VAE's input range (as in SD)."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """VAE output in [-1, 1] (N, 3, H, W) -> uint8 HxWx3 arrays (N, H, W, 3)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips and 90-degree rotations (one draw per batch: cheap and deterministic)."""
    k = int(torch.randint(0, 4, (1,), generator=gen))
    if k:
        x = torch.rot90(x, k, dims=(2, 3))
    if int(torch.randint(0, 2, (1,), generator=gen)):
        x = torch.flip(x, dims=(3,))
    return x


def _pixel_weights(x: torch.Tensor, fg_weight: float) -> torch.Tensor:
    """Per-pixel weight 1 + fg_weight on objects and their 1-pixel border, 1 on the background.

    Objects cover a few percent of an image; unweighted, the loss is met by painting background
    and the decoder is slow to learn object colours."""
    background = to_model_space(torch.tensor(BACKGROUND, dtype=torch.uint8)).view(1, 3, 1, 1)
    fg = ((x - background).abs().amax(dim=1, keepdim=True) > 0.02).float()
    fg = F.max_pool2d(fg, 3, stride=1, padding=1)
    return 1.0 + fg_weight * fg


def _edge_loss(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and vertical pixel differences of output and target."""
    dx = (y[..., :, 1:] - y[..., :, :-1]) - (x[..., :, 1:] - x[..., :, :-1])
    dy = (y[..., 1:, :] - y[..., :-1, :]) - (x[..., 1:, :] - x[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def _lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to 2% of `lr`."""
    warmup = max(1, min(100, steps // 20))
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def latent_scaling_factor(vae, images: torch.Tensor, batch_size: int = 64) -> float:
    """1 / std of the posterior means of `images` (uint8 tensor), as SD computed its 0.18215."""
    means = [vae.encode(to_model_space(images[i : i + batch_size])).latent_dist.mean
             for i in range(0, len(images), batch_size)]
    return float(1.0 / torch.cat(means).float().std())


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Encode (posterior mean) and decode uint8 images in fp32; returns uint8 (N, H, W, 3)."""
    out = []
    for i in range(0, len(images), batch_size):
        z = vae.encode(to_model_space(images[i : i + batch_size])).latent_dist.mean
        out.append(to_uint8(vae.decode(z).sample))
    return np.concatenate(out)


def evaluate_vae(vae_or_dir, n: int = 500, seed: int = 1234, split: str = "heldout",
                 size: int = DEFAULT_SIZE) -> dict[str, float]:
    """Score reconstructions of `n` `split` images: the scorer's per-check accuracies plus
    `mean_abs_error` (pixel values 0..255) and `max_abs_error_p99` (99th percentile per pixel)."""
    from diffusers import AutoencoderKL

    vae = vae_or_dir
    if isinstance(vae_or_dir, (str, Path)):
        vae = AutoencoderKL.from_pretrained(vae_or_dir, torch_dtype=torch.float32)
    vae = vae.float().eval()
    records = [scene for _, scene in generate(n, seed, split, size)]
    images = image_pool(n, seed, split, size)
    recon = reconstruct(vae, images)
    err = np.abs(recon.astype(np.int16) - images.permute(0, 2, 3, 1).numpy().astype(np.int16))
    result = score_batch(list(recon), records)
    result["mean_abs_error"] = float(err.mean())
    result["abs_error_p99"] = float(np.percentile(err, 99))
    return result


def train_vae(
    out_dir: str | Path,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    size: int = DEFAULT_SIZE,
    *,
    lr: float = DEFAULT_LR,
    kl_weight: float = DEFAULT_KL_WEIGHT,
    edge_weight: float = DEFAULT_EDGE_WEIGHT,
    fg_weight: float = DEFAULT_FG_WEIGHT,
    mse_weight: float = DEFAULT_MSE_WEIGHT,
    pool_size: int = DEFAULT_POOL_SIZE,
    block_out_channels: tuple[int, ...] = (16, 32, 64),
    norm_num_groups: int = 8,
    bf16: bool = True,
    save_fp16: bool = False,
    threads: int = 2,
    progress: bool = True,
) -> Path:
    """Train the shapes VAE on train-split images and save it (diffusers format, safetensors).

    Deterministic for a given seed (and thread count). `threads` is capped at 2 (the target machine);
    on a busy machine 1 thread is much faster than 2, whose OpenMP barriers stall when another
    process holds a core. `save_fp16` stores fp16 weights (half the
    size); `AutoencoderKL.from_pretrained` upcasts them to fp32 unless told otherwise.
    """
    if steps < 1 or batch_size < 1:
        raise UserError(f"steps and batch size must be >= 1 (got steps={steps}, batch_size={batch_size})")
    if size % DOWN_FACTOR:
        raise UserError(f"image size must be a multiple of {DOWN_FACTOR}, got {size}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # as distill_sd.models: never overwrite
        raise UserError(f"output '{out}' already exists and is not empty; choose a new path or remove it first")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, threads)))
    try:
        start = time.perf_counter()
        vae, pool, final_l1 = _fit(steps, batch_size, seed, size, lr=lr, kl_weight=kl_weight,
                                   edge_weight=edge_weight, fg_weight=fg_weight, mse_weight=mse_weight,
                                   pool_size=pool_size, block_out_channels=tuple(block_out_channels),
                                   norm_num_groups=norm_num_groups, bf16=bf16, progress=progress)
        scaling = latent_scaling_factor(vae, pool[:512])
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous_threads)
    vae.register_to_config(scaling_factor=scaling)
    if save_fp16:
        vae = vae.to(torch.float16)
    out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out, safe_serialization=True)
    info = {"steps": steps, "batch_size": batch_size, "seed": seed, "size": size, "lr": lr,
            "kl_weight": kl_weight, "edge_weight": edge_weight, "fg_weight": fg_weight,
            "mse_weight": mse_weight, "pool_size": pool_size, "block_out_channels": list(block_out_channels),
            "norm_num_groups": norm_num_groups, "bf16": bf16, "save_fp16": save_fp16, "threads": threads,
            "scaling_factor": scaling, "train_seconds": round(seconds, 1), "final_l1": final_l1}
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out


def _fit(steps: int, batch_size: int, seed: int, size: int, *, lr: float, kl_weight: float,
         edge_weight: float, fg_weight: float, mse_weight: float, pool_size: int,
         block_out_channels: tuple[int, ...], norm_num_groups: int, bf16: bool, progress: bool):
    """The training loop of `train_vae`: returns (vae in eval mode, the uint8 image pool, final L1 EMA)."""
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(shapes_vae_config(size, block_out_channels, norm_num_groups))
    vae.train()
    pool = image_pool(max(pool_size, batch_size), seed, "train", size)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)

    bar = tqdm(range(steps), desc="train vae", disable=not progress, dynamic_ncols=True)
    ema = None
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        idx = torch.randint(0, len(pool), (batch_size,), generator=gen)
        x = _augment(to_model_space(pool[idx]), gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            posterior = vae.encode(x).latent_dist
            noise = torch.randn(posterior.mean.shape, generator=gen)
            z = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)
            y = vae.decode(z).sample
        diff = y.float() - x
        weights = _pixel_weights(x, fg_weight)
        rec = (weights * (diff.abs() + mse_weight * diff.square())).sum() / (weights.sum() * 3)
        loss = rec + edge_weight * _edge_loss(y.float(), x) + kl_weight * posterior.kl().float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        l1 = float(diff.detach().abs().mean())
        ema = l1 if ema is None else 0.95 * ema + 0.05 * l1
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(l1=f"{ema:.4f}", loss=f"{float(loss.detach()):.4f}")
    bar.close()
    return vae.eval(), pool, ema


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m distill_sd.shapes.vae",
                                     description="Train the shapes-world VAE (diffusers AutoencoderKL).")
    parser.add_argument("--out", required=True, type=Path, help="output directory (save_pretrained)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="image side in pixels")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 or 2)")
    parser.add_argument("--fp32", action="store_true", help="train without bf16 autocast (about 2x slower)")
    parser.add_argument("--save-fp16", action="store_true", help="store fp16 weights (half the file size)")
    parser.add_argument("--eval", type=int, default=500, metavar="N",
                        help="score reconstructions of N held-out images after training (0: skip)")
    args = parser.parse_args(argv)
    try:
        out = train_vae(args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed, size=args.size,
                        lr=args.lr, bf16=not args.fp32, save_fp16=args.save_fp16,
                        threads=args.threads)
    except UserError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"saved {out}")
    if args.eval:
        result = evaluate_vae(out, n=args.eval, size=args.size)
        print(json.dumps(result, indent=2))
        info_path = out / "training.json"
        info = json.loads(info_path.read_text(encoding="utf-8"))
        info[f"eval_heldout_{args.eval}"] = result
        info_path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
