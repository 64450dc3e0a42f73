"""Where each object of a shapes caption is: its mask and the tokens of its words, for the grounding loss.

The shapes world knows exactly which pixels each object covers and which words of the caption name it
("a *small red circle* to the left of a *blue square*"), so a U-Net can be told where each word should look
(kd.grounding_loss, TokenCompose's token loss). `add_grounding` writes that beside a `distill-sd cache` of an
exported shapes folder, as `grounding.safetensors`:

    masks   [N, 2, h, w] float16   each object's share of every latent cell (0 for a missing second object)
    tokens  [N, 2, 4]    int64     positions, in the 77-token prompt, of the object's size, colour and shape
                                   words (a word the tokenizer splits takes several), -1 where unused

Rows follow the cache's examples; any other source of masks and word positions can write the same file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from distill_sd.cache import GROUNDING_FILE, CachedExamples
from distill_sd.errors import UserError
from distill_sd.shapes.world import PALETTE, Scene, render_scene

MAX_OBJECTS, MAX_WORD_TOKENS = 2, 4


def object_masks(scene: Scene, size: int) -> np.ndarray:
    """[objects, size, size] booleans: the pixels of the rendered scene in each object's colour."""
    image = np.asarray(render_scene(scene, size))
    return np.stack([(image == np.array(PALETTE[o.colour], dtype=np.uint8)).all(-1) for o in scene.objects])


def object_word_tokens(scene: Scene, tokenizer: Any, lengths: dict[str, int] | None = None) -> list[list[int]]:
    """Per object, the prompt positions of the tokens of its size, colour and shape words.

    Captions read "a [size] colour shape[ relation a [size] colour shape][ position phrase]": object k's words
    are the k-th run of its own attribute words. CLIP's tokenizer splits on spaces before BPE, so a word's
    tokens are those of the word alone, and position 0 is the start-of-text token. `lengths` memoises each
    word's token count across calls (a caption world has a few dozen words).
    """
    lengths = {} if lengths is None else lengths
    positions: list[list[int]] = [[] for _ in scene.objects]
    k, at = 0, 1
    for word in scene.caption.split(" "):
        if word not in lengths:
            lengths[word] = len(tokenizer(word, add_special_tokens=False).input_ids)
        n = lengths[word]
        if k < len(scene.objects) and word in (scene.objects[k].size, scene.objects[k].colour, scene.objects[k].shape):
            if word != scene.objects[k].size or scene.mentions_size:
                positions[k] += range(at, at + n)
            if word == scene.objects[k].shape:
                k += 1
        at += n
    return positions


def add_grounding(cache: str | Path, data: str | Path, tokenizer: Any) -> Path:
    """Write `cache/grounding.safetensors` for a cache of the exported shapes folder `data`."""
    cache, data = Path(cache), Path(data)
    examples = CachedExamples(cache)
    index = examples.index
    records = {}
    for line in (data / "metadata.jsonl").read_text("utf-8").splitlines():
        row = json.loads(line)
        if "attributes" not in row:
            raise UserError(f"{data / 'metadata.jsonl'} has no 'attributes': grounding needs a shapes export")
        records[row["file_name"]] = Scene.from_dict(row["attributes"])
    resolution, latent = index["resolution"], examples[0]["latent_mean"].shape[-1]
    lengths: dict[str, int] = {}
    n = index["count"]
    masks = torch.zeros(n, MAX_OBJECTS, latent, latent, dtype=torch.float16)
    tokens = torch.full((n, MAX_OBJECTS, MAX_WORD_TOKENS), -1, dtype=torch.long)
    for i, key in enumerate(tqdm(index["keys"], desc="grounding", unit="image")):
        if key not in records:
            raise UserError(f"cache example {key!r} is not in {data / 'metadata.jsonl'}: was the cache made from it?")
        scene = records[key]
        pixel = torch.from_numpy(object_masks(scene, resolution)).float()
        masks[i, :len(scene.objects)] = torch.nn.functional.adaptive_avg_pool2d(pixel, latent).half()
        for k, words in enumerate(object_word_tokens(scene, tokenizer, lengths)):
            tokens[i, k, :len(words)] = torch.tensor(words[:MAX_WORD_TOKENS])
    out = cache / GROUNDING_FILE
    save_file({"masks": masks, "tokens": tokens}, str(out))
    return out


def main() -> int:
    import argparse
    import sys

    from distill_sd.models import load_teacher

    p = argparse.ArgumentParser(description="Add object masks and word positions to a cache of a shapes export.")
    p.add_argument("cache", help="a `distill-sd cache` folder made from DATA")
    p.add_argument("data", help="the exported shapes image folder (metadata.jsonl with attributes)")
    a = p.parse_args()

    try:
        if not (Path(a.cache) / "cache.json").is_file():
            raise UserError(f"'{a.cache}' is not a distill-sd cache (no cache.json)")
        if not (Path(a.data) / "metadata.jsonl").is_file():
            raise UserError(f"'{a.data}' has no metadata.jsonl: give the exported shapes folder the cache was made from")
        base = json.loads((Path(a.cache) / "cache.json").read_text())["base"]
        print(add_grounding(a.cache, a.data, load_teacher(base).pipeline.tokenizer))
    except UserError as e:
        print(f"distill_sd.shapes.grounding: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
