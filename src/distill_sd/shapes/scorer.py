"""Exact, learning-free scoring of generated shapes-world images against their captions.

A CLIP-style judge would be noisy and heavy; the shapes world is simple enough to parse
directly. Each image is resized to a fixed working resolution (so thresholds are size-free and
large images are denoised by the downscale), every pixel is assigned to its nearest palette
colour or the background (pixels far from all are rejected), connected components of each
colour are found with a small flood fill (scipy is not a dependency), components smaller than
a fraction of the image are dropped as noise, and each remaining component is described by
its colour, centre of mass, size and shape. Shape and size come from moments and area rather
than the bounding box, because blur eats corners and apexes and leaves stray edge pixels that
move a bounding box a lot and averages very little.

Checks per image (a check the caption does not state passes trivially):
  presence  at least as many objects are found as the caption names;
  colour    every named colour is found;
  shape     the largest object of each named colour has the named shape;
  size      ... and the named size (only if the caption states sizes);
  position  single object: its region is the named one (if stated);
            two objects: their centroids satisfy the named relation;
  count     exactly as many objects are found as the caption names (no extras).
`correct` is all of them; `score_batch` reports each check's accuracy and `accuracy`, the
fraction of fully correct images (compositional accuracy).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from distill_sd.shapes.world import (
    BACKGROUND,
    COLOURS,
    OBJECT_COUNTS,
    PALETTE,
    RELATIONS,
    SIZE_THRESHOLD,
    Scene,
    nearest_position,
)

WORK_SIZE = 64  # every image is scored at this resolution
COLOUR_THRESHOLD = 90.0  # max RGB distance from a palette colour (palette colours are >= 130 apart)
MIN_AREA_FRACTION = 0.005  # components smaller than this fraction of the image are noise
# Shape boundaries (see _classify_shape): skewness ~0.57 for a triangle vs 0 for circle and square;
# fourth-moment ratio 1.8 for a square vs 3 for a disc.
TRIANGLE_MIN_SKEW = 0.2
SQUARE_MAX_MOMENT_RATIO = 2.45

CHECKS: tuple[str, ...] = ("presence", "colour", "shape", "size", "position", "count")

_CLASS_COLOURS = np.array([PALETTE[c] for c in COLOURS] + [BACKGROUND], dtype=np.float32)
_BACKGROUND_CLASS = len(COLOURS)
_REJECTED = -1
_EPS = 1e-9
# Fraction of its bounding box each shape fills: turns an area into a box side, which unlike the
# measured box is not inflated by stray edge pixels.
_BOX_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}


@dataclass(frozen=True)
class DetectedObject:
    """One segmented object, normalised to the image side.

    `centre` is the centre of mass, `area` a fraction of the image, `extent` the bounding-box side
    that the detected shape has at that area (comparable to SceneObject.extent).
    """

    colour: str
    shape: str
    centre: tuple[float, float]
    extent: float
    area: float


@dataclass(frozen=True)
class ImageScore:
    """Per-image result: one boolean per check in CHECKS, `correct` = all pass."""

    presence: bool
    colour: bool
    shape: bool
    size: bool
    position: bool
    count: bool
    correct: bool
    detected: tuple[DetectedObject, ...]


def detect_objects(image: Image.Image | np.ndarray) -> list[DetectedObject]:
    """Segment an RGB image (PIL or HxWx3 uint8, any size) into palette-coloured objects."""
    pixels = _to_work_array(image)
    labels = _classify_pixels(pixels)
    min_area = MIN_AREA_FRACTION * WORK_SIZE * WORK_SIZE
    objects = []
    for cls, ys, xs in _components(labels):
        if len(ys) < min_area:
            continue
        shape = _classify_shape(xs, ys)
        area = len(ys) / (WORK_SIZE * WORK_SIZE)
        objects.append(
            DetectedObject(
                colour=COLOURS[cls],
                shape=shape,
                centre=((xs.mean() + 0.5) / WORK_SIZE, (ys.mean() + 0.5) / WORK_SIZE),
                extent=float(np.sqrt(area / _BOX_FILL[shape])),
                area=area,
            )
        )
    return objects


def largest_by_colour(detected: Sequence[DetectedObject]) -> dict[str, DetectedObject]:
    """The object each colour names: the largest detected object of that colour (a stray fleck of a colour
    never outvotes the object drawn in it)."""
    by_colour: dict[str, DetectedObject] = {}
    for obj in sorted(detected, key=lambda o: o.area):
        by_colour[obj.colour] = obj
    return by_colour


def score_image(image: Image.Image | np.ndarray, record: Scene | dict[str, Any]) -> ImageScore:
    """Score one image against the attribute record of the caption it was generated from."""
    scene = record if isinstance(record, Scene) else Scene.from_dict(record)
    detected = detect_objects(image)
    by_colour = largest_by_colour(detected)
    matches = [by_colour.get(o.colour) for o in scene.objects]
    found = [m for m in matches if m is not None]
    all_found = len(found) == len(matches)

    pairs = list(zip(found, scene.objects))
    checks = {
        "presence": len(detected) >= len(scene.objects),
        "colour": all_found,
        "shape": all_found and all(m.shape == o.shape for m, o in pairs),
        "size": all_found
        and (
            not scene.mentions_size
            or all((m.extent >= SIZE_THRESHOLD) == (o.size == "large") for m, o in pairs)
        ),
        "position": all_found and _position_holds(scene, found),
        "count": len(detected) == len(scene.objects),
    }
    return ImageScore(**checks, correct=all(checks.values()), detected=tuple(detected))


def count_key(k: int) -> str:
    """score_batch's key for the accuracy over captions naming k objects."""
    return f"accuracy_{k}obj"


def score_batch(
    images: Iterable[Image.Image | np.ndarray], records: Sequence[Scene | dict[str, Any]]
) -> dict[str, float]:
    """Per-check accuracy over a batch, plus `accuracy` (fraction of fully correct images), `n`, and the
    accuracy of the images whose caption names k objects, `count_key(k)` (one- and two-object scenes
    are different difficulties: binding two colours, shapes and a relation is where models fail)."""
    scenes = [r if isinstance(r, Scene) else Scene.from_dict(r) for r in records]
    return aggregate_scores([score_image(image, scene) for image, scene in zip(images, scenes, strict=True)], scenes)


def aggregate_scores(scores: Sequence[ImageScore], scenes: Sequence[Scene]) -> dict[str, float]:
    """score_batch's summary of already scored images (`scores[i]` scores an image of `scenes[i]`)."""
    if not scores:
        raise ValueError("scoring needs at least one image")
    result = {check: float(np.mean([getattr(s, check) for s in scores])) for check in CHECKS}
    result["accuracy"] = float(np.mean([s.correct for s in scores]))
    result["n"] = len(scores)
    for k in OBJECT_COUNTS:
        correct = [s.correct for s, scene in zip(scores, scenes) if len(scene.objects) == k]
        if correct:
            result[count_key(k)] = float(np.mean(correct))
    return result


def _classify_shape(xs: np.ndarray, ys: np.ndarray) -> str:
    """Name a component's shape from its central moments (averages, so robust to stray edge pixels).

    A triangle's mass lies towards its base, so its x or y marginal is clearly skewed, while
    circles and squares are symmetric. Between those two, (mu40 + mu04) / (2 mu22) is 1.8 for an
    axis-aligned square and 3 for a disc (fourth-order moments weigh the square's corners);
    blur rounds a square's corners and pushes it up, hence a boundary above the midpoint.
    """
    x, y = xs - xs.mean(), ys - ys.mean()
    var_x, var_y = (x * x).mean() + _EPS, (y * y).mean() + _EPS
    skew = np.hypot((x**3).mean() / var_x**1.5, (y**3).mean() / var_y**1.5)
    if skew > TRIANGLE_MIN_SKEW:
        return "triangle"
    squareness = ((x**4).mean() + (y**4).mean()) / (2 * (x * x * y * y).mean() + _EPS)
    return "square" if squareness < SQUARE_MAX_MOMENT_RATIO else "circle"


def _position_holds(scene: Scene, found: list[DetectedObject]) -> bool:
    """Two objects: "A <relation> B" holds when the offset between their centres has the relation's
    axis as its dominant axis, with the right sign. One object: its nearest anchor is the named one."""
    if scene.relation is None:
        return not scene.mentions_position or nearest_position(found[0].centre) == scene.objects[0].position
    axis, sign = RELATIONS[scene.relation]
    (ax, ay), (bx, by) = found[0].centre, found[1].centre
    delta = (ax - bx, ay - by)
    return bool(delta[axis] * sign > abs(delta[1 - axis]))


def _to_work_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 array, got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    image = image.convert("RGB")
    if image.size != (WORK_SIZE, WORK_SIZE):
        image = image.resize((WORK_SIZE, WORK_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def _classify_pixels(pixels: np.ndarray) -> np.ndarray:
    """HxW class map: palette index, background class, or _REJECTED (far from everything)."""
    dist = np.linalg.norm(pixels[:, :, None, :] - _CLASS_COLOURS[None, None], axis=-1)
    labels = dist.argmin(axis=-1)
    too_far = np.take_along_axis(dist, labels[..., None], axis=-1)[..., 0] > COLOUR_THRESHOLD
    labels[too_far] = _REJECTED
    return labels


def _components(labels: np.ndarray) -> Iterable[tuple[int, np.ndarray, np.ndarray]]:
    """4-connected components of palette-coloured pixels: (class, ys, xs) per component."""
    h, w = labels.shape
    flat = labels.ravel().tolist()
    seen = [not (0 <= c < _BACKGROUND_CLASS) for c in flat]
    for start in range(h * w):
        if seen[start]:
            continue
        cls = flat[start]
        seen[start] = True
        queue, members = deque([start]), [start]
        while queue:
            i = queue.popleft()
            y, x = divmod(i, w)
            for j, ok in ((i - w, y > 0), (i + w, y < h - 1), (i - 1, x > 0), (i + 1, x < w - 1)):
                if ok and not seen[j] and flat[j] == cls:
                    seen[j] = True
                    queue.append(j)
                    members.append(j)
        ys, xs = np.divmod(np.array(members), w)
        yield cls, ys, xs
