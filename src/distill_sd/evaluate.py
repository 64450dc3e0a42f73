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

from distill_sd.shapes import score_batch
from distill_sd.shapes.scorer import detect_objects


@dataclass
class EvalResult:
    name: str
    images: list[Any] = field(repr=False, default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    seconds_per_image: float = 0.0
    agreement: float | None = None
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
    result = EvalResult(name, images, score_batch(images, scenes), sec)
    if reference is not None:
        same = [_signature(a) == _signature(b) for a, b in zip(images, reference.images)]
        result.agreement = sum(same) / len(same)
    return result
