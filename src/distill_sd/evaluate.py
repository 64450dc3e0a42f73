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
from dataclasses import dataclass, field
from typing import Any

import torch

from distill_sd.shapes.scorer import aggregate_scores, detect_objects, score_image


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
