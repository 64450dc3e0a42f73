"""Latent and text-embedding caches: run the VAE encoder and text encoders once, not at every step.

Layout of a cache directory (all tensors float32 safetensors, readable with memory mapping):
    cache.json                  base pipeline, resolution, crop, keys, caption index per example
    latents-00000.safetensors   "mean", "std": the VAE posterior per example (unscaled), 1024 per shard
    text.safetensors            "embeds" (and SDXL "pooled") per *unique* caption; row 0 is the empty prompt
    grounding.safetensors       optional: "masks" [N, objects, h, w] and "tokens" [N, objects, words] per example,
                                where each object is and which prompt tokens name it (shapes.grounding writes
                                it), read by training's grounding loss (--loss_ground)
Storing the posterior rather than one sample keeps the VAE's sampling noise a per-step random draw.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from distill_sd.conditioning import TextConditioning, encode_latent_dist, encode_text
from distill_sd.data import DataStats, TrainingExamples, collate_skip_none, image_transform, open_dataset
from distill_sd.errors import UserError
from distill_sd.models import new_output_dir

SHARD_SIZE = 1024
GROUNDING_FILE = "grounding.safetensors"
CACHE_VERSION = 1


def build_cache(pipe: Any, base: str, data: str, out: Path, *, resolution: int, center_crop: bool = False,
                batch_size: int = 8, image_column: str = "image", caption_column: str = "text",
                allow_empty_captions: bool = False, instance_prompt: str | None = None,
                device: str | torch.device = "cpu") -> dict[str, Any]:
    """Encode every readable example of `data`; returns the cache index (also written as cache.json).
    `instance_prompt`: every image's caption (its own may then be missing)."""
    source = open_dataset(data, image_column=image_column, caption_column=caption_column,
                          allow_empty_captions=allow_empty_captions or instance_prompt is not None)
    examples = TrainingExamples(source, image_transform(resolution, center_crop=center_crop), instance_prompt)
    loader = DataLoader(examples, batch_size=batch_size, collate_fn=collate_skip_none)
    stats = DataStats()
    keys, caption_ids, captions = [], [], {"": 0}
    means, stds, shards = [], [], []
    with new_output_dir(out) as tmp:
        bar = tqdm(loader, desc="caching latents", unit="batch")
        for batch in bar:
            stats.count_batch(batch)
            if batch["pixel_values"] is None:
                continue
            mean, std = encode_latent_dist(pipe, batch["pixel_values"].to(device))
            means.append(mean.cpu())
            stds.append(std.cpu())
            keys += batch["key"]
            caption_ids += [captions.setdefault(c, len(captions)) for c in batch["caption"]]
            while sum(len(m) for m in means) >= SHARD_SIZE:
                shards.append(_write_shard(tmp, len(shards), means, stds, SHARD_SIZE))
            bar.set_postfix(images=len(keys), skipped=stats.skipped_corrupt)
        if means:
            shards.append(_write_shard(tmp, len(shards), means, stds, sum(len(m) for m in means)))
        if not keys:
            raise UserError(f"no readable images in {data}: nothing to cache ({stats.summary()})")
        texts = list(captions)
        embeds, pooled = [], []
        for i in tqdm(range(0, len(texts), 64), desc="caching text", unit="batch"):
            cond = encode_text(pipe, texts[i:i + 64], torch.device(device))
            embeds.append(cond.embeds.float().cpu())
            if cond.pooled is not None:
                pooled.append(cond.pooled.float().cpu())
        tensors = {"embeds": torch.cat(embeds)}
        if pooled:
            tensors["pooled"] = torch.cat(pooled)
        save_file(tensors, str(tmp / "text.safetensors"))
        index = {"version": CACHE_VERSION, "base": base, "data": data, "resolution": resolution,
                 "center_crop": center_crop, "scaling_factor": float(pipe.vae.config.scaling_factor),
                 "count": len(keys), "shards": shards, "shard_size": SHARD_SIZE, "keys": keys,
                 "caption_ids": caption_ids, "captions": texts, "skipped": stats.skipped_corrupt,
                 "skipped_examples": stats.skipped_examples}
        (tmp / "cache.json").write_text(json.dumps(index))
    print(f"cached {len(keys)} examples, {len(texts) - 1} distinct captions -> {out}  ({stats.summary()})")
    return index


def _write_shard(folder: Path, n: int, means: list, stds: list, count: int) -> str:
    mean, std = torch.cat(means), torch.cat(stds)
    name = f"latents-{n:05d}.safetensors"
    save_file({"mean": mean[:count].contiguous(), "std": std[:count].contiguous()}, str(folder / name))
    means[:] = [mean[count:]] if len(mean) > count else []
    stds[:] = [std[count:]] if len(std) > count else []
    return name


class CachedExamples(Dataset):
    """Map-style examples from a cache: {"index", "latent_mean", "latent_std", "caption_id"}."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index_file = self.folder / "cache.json"
        if not index_file.is_file():
            raise UserError(f"'{folder}' is not a distill-sd cache (no cache.json); create one with `distill-sd cache`")
        self.index = json.loads(index_file.read_text())
        if self.index.get("version") != CACHE_VERSION:
            raise UserError(f"cache '{folder}' has version {self.index.get('version')}; re-create it with this "
                            "version of distill-sd")
        with safe_open(str(self.folder / "text.safetensors"), framework="pt") as f:
            self.text = {k: f.get_tensor(k) for k in f.keys()}  # one row per unique caption: small
        self.grounding: dict[str, torch.Tensor] | None = None  # object masks and word positions, when present
        grounding = self.folder / GROUNDING_FILE
        if grounding.is_file():
            with safe_open(str(grounding), framework="pt") as f:
                self.grounding = {k: f.get_tensor(k) for k in ("masks", "tokens")}
            if len(self.grounding["masks"]) != self.index["count"]:
                raise UserError(f"{grounding} has {len(self.grounding['masks'])} rows for {self.index['count']} "
                                "cached examples; re-create it for this cache")
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return self.index["count"]

    def __getitem__(self, i: int) -> dict[str, Any]:
        shard, row = divmod(i, self.index["shard_size"])
        name = self.index["shards"][shard]
        if name not in self._handles:  # opened lazily per process: handles do not survive pickling
            self._handles[name] = safe_open(str(self.folder / name), framework="pt")
        f = self._handles[name]
        item = {"index": i, "latent_mean": f.get_slice("mean")[row], "latent_std": f.get_slice("std")[row],
                "caption_id": self.index["caption_ids"][i]}
        if self.grounding is not None:
            item["ground_masks"], item["ground_tokens"] = self.grounding["masks"][i], self.grounding["tokens"][i]
        return item

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}

    def text_conditioning(self, caption_ids: torch.Tensor, device: torch.device, dtype: torch.dtype) -> TextConditioning:
        ids = caption_ids.cpu()
        pooled = self.text.get("pooled")
        return TextConditioning(self.text["embeds"][ids].to(device, dtype),
                                None if pooled is None else pooled[ids].to(device, dtype))
