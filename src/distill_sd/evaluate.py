"""Exact evaluation in the shapes world: compositional accuracy and agreement with the teacher.

Each model draws one image per held-out prompt, with the same seed per prompt for every model, so a student's
image can be compared with the teacher's image of the same noise. The shapes scorer reads every image
exactly (colour segmentation + geometry): accuracy = fraction of images whose objects, colours, shapes,
sizes, positions and count all match the caption; agreement = fraction of images whose detected objects
(colour, shape, coarse position) equal those in the teacher's image for the same prompt and seed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distill_sd.shapes.scorer import aggregate_scores, detect_objects, largest_by_colour, score_image


@dataclass
class EvalResult:
    name: str
    images: list[Any] = field(repr=False, default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    seconds_per_image: float = 0.0
    agreement: float | None = None
    correct: list[bool] = field(repr=False, default_factory=list)  # per image, in prompt order
    unet_params: int = 0
    unet_macs: int = 0

    @property
    def accuracy(self) -> float:
        return self.scores["accuracy"]


@torch.inference_mode()
def sample_images(pipe: Any, captions: list[str], *, seed: int, steps: int, guidance: float,
                  batch_size: int = 16, progress: Any = None) -> tuple[list[Any], float]:
    """One image per caption; caption i always uses seed + i, whatever the batch layout."""
    images, seconds = [], []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start:start + batch_size]
        gens = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(chunk))]
        t = time.perf_counter()
        images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens).images
        seconds.append((time.perf_counter() - t) / len(chunk))
        if progress is not None:
            progress.update(len(chunk))
    return images, statistics.median(seconds)


def _signature(image: Any) -> tuple:
    return tuple(sorted((o.colour, o.shape, _cell(o.centre)) for o in detect_objects(image)))


def _cell(centre: tuple[float, float]) -> tuple[int, int]:
    return (min(int(centre[0] * 3), 2), min(int(centre[1] * 3), 2))  # a 3x3 grid: coarse position


def evaluate(name: str, pipe: Any, scenes: list[Any], *, seed: int, steps: int, guidance: float,
             reference: EvalResult | None = None, progress: Any = None) -> EvalResult:
    images, sec = sample_images(pipe, [s.caption for s in scenes], seed=seed, steps=steps, guidance=guidance,
                                progress=progress)
    per_image = [score_image(image, scene) for image, scene in zip(images, scenes, strict=True)]
    result = EvalResult(name, images, aggregate_scores(per_image, scenes), sec,
                        correct=[s.correct for s in per_image])
    if reference is not None:
        same = [_signature(a) == _signature(b) for a, b in zip(images, reference.images)]
        result.agreement = sum(same) / len(same)
    return result


def paired_ratio_interval(correct: list[bool], reference: list[bool], *, level: float = 0.9,
                          resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of accuracy(correct) / accuracy(reference) over the same prompts: each resample draws
    prompts with replacement and scores both models on the same draw (paired: the models saw the same prompts
    and noise, so prompt difficulty cancels). On 96 prompts a few points of "vs teacher" are within it."""
    import numpy as np

    if len(correct) != len(reference) or not correct:
        raise ValueError("paired_ratio_interval needs two equally long, non-empty lists of per-prompt results")
    a, b = np.asarray(correct, dtype=float), np.asarray(reference, dtype=float)
    picks = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    ratios = a[picks].sum(1) / np.maximum(b[picks].sum(1), 1)
    lo, hi = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _describe_drawn(o: Any) -> str:
    from distill_sd.shapes.world import SIZE_THRESHOLD, nearest_position

    size = "large" if o.extent >= SIZE_THRESHOLD else "small"
    return f"{size} {o.colour} {o.shape} ({nearest_position(o.centre)})"


def binding_failure(scene: Any, detected: Sequence[Any]) -> str | None:
    """How a two-object scene lost its colour-shape binding, if it did: "swap" when both colours are drawn, each
    with the other object's shape ("a red circle and a blue square" drawn as a red square and a blue circle);
    "leak" when one colour is missing and the other is drawn twice (both objects took one colour)."""
    if len(scene.objects) != 2:
        return None
    a, b = scene.objects
    largest = {colour: o.shape for colour, o in largest_by_colour(detected).items()}  # as the scorer matches
    drawn = [o.colour for o in detected]
    if a.shape != b.shape and largest.get(a.colour) == b.shape and largest.get(b.colour) == a.shape:
        return "swap"
    for kept, lost in ((a, b), (b, a)):
        if lost.colour not in drawn and drawn.count(kept.colour) >= 2:
            return "leak"
    return None


def write_failures(result: EvalResult, scenes: list[Any], folder: Path, *, seed: int, columns: int = 8) -> dict:
    """The images the scorer failed, for a person to look at: `folder`/failures.md (caption, failed checks, what
    was drawn) and, if any image failed, failures.png (the images with their captions). Returns the counts."""
    import textwrap

    from PIL import Image, ImageDraw

    from distill_sd.report import markdown_table
    from distill_sd.shapes.scorer import CHECKS

    folder.mkdir(parents=True, exist_ok=True)
    rows, failed = [], []
    binding = {"swap": 0, "leak": 0}
    for i, (image, scene) in enumerate(zip(result.images, scenes, strict=True)):
        score = score_image(image, scene)
        if score.correct:
            continue
        kind = binding_failure(scene, score.detected)
        if kind:
            binding[kind] += 1
        failed.append((image, scene))
        rows.append([i, seed + i, scene.caption, ", ".join(c for c in CHECKS if not getattr(score, c)),
                     "; ".join(_describe_drawn(o) for o in score.detected) or "nothing", kind or ""])
    two = sum(len(s.objects) == 2 for _, s in failed)
    counts = {"images": len(scenes), "failed": len(failed), "two_object_failed": two, "swaps": binding["swap"],
              "leaks": binding["leak"]}
    text = (f"# Failures of {result.name}\n\n{len(failed)} of {len(scenes)} images fail ({two} of them two-object "
            f"captions). Binding failures: {binding['swap']} swaps (both colours drawn, each with the other object's "
            f"shape), {binding['leak']} leaks (one colour missing, the other drawn twice).\n\n"
            + markdown_table(["#", "seed", "caption", "failed checks", "drawn", "binding"], rows) + "\n")
    (folder / "failures.md").write_text(text)
    (folder / "failures.png").unlink(missing_ok=True)  # none of an earlier run's images stays behind
    if failed:
        cell, line_h = 112, 11
        wrapped = [textwrap.wrap(s.caption, width=18) for _, s in failed]
        cap_h = 4 + line_h * max(len(w) for w in wrapped)
        n_cols = min(columns, len(failed))
        n_rows = -(-len(failed) // n_cols)
        sheet = Image.new("RGB", (n_cols * cell, n_rows * (cell + cap_h)), "white")
        draw = ImageDraw.Draw(sheet)
        for k, ((image, _), lines) in enumerate(zip(failed, wrapped)):
            x, y = (k % n_cols) * cell, (k // n_cols) * (cell + cap_h)
            draw.multiline_text((x + 2, y + 1), "\n".join(lines), fill="black", spacing=1)
            sheet.paste(image.resize((cell - 8, cell - 8), Image.Resampling.NEAREST), (x + 4, y + cap_h + 4))
        sheet.save(folder / "failures.png")
    return counts
