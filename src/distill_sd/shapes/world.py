"""The shapes world: a procedural, captioned image dataset that needs no downloads.

A tiny text-to-image model cannot be judged on real photos, so we train and evaluate it on a
world whose ground truth is known exactly: one or two flat-coloured shapes on a plain
background, described by a templated caption. Everything is deterministic by seed, and every
scene carries its attribute record so that `distill_sd.shapes.scorer` can check a generated
image against the caption without a learned judge.

Design choices that the scorer relies on:
  * colours come from a small palette of saturated, well-separated colours, and the two objects
    of a scene never share a colour, so colour segmentation separates them;
  * objects never overlap or touch, so each object is one connected component;
  * shapes are axis-aligned and triangles point up, so shapes differ in simple moments (a
    triangle's mass is skewed towards its base; a square's corners weigh in its 4th moments);
  * single objects sit near one of five anchor points, and two-object relations are always
    clear (the dominant axis of the offset is unambiguous).

Compositional generalisation is measured with held-out (shape, colour) combinations that never
appear in the training split: every shape and every colour is still seen in training, only
those pairings are not.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageDraw

from distill_sd.errors import UserError

Split = Literal["train", "heldout", "all"]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
OBJECT_COUNTS: tuple[int, ...] = (1, 2)  # objects per scene

# Saturated colours, pairwise RGB distance >= 130 and far from the background, so a nearest-colour
# classifier with a distance threshold segments them even after blur and noise.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (160, 40, 210),
    "cyan": (20, 200, 210),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)

# Light grey rather than white: still far from every palette colour, and not the value a
# diffusion model collapses to when it saturates.
BACKGROUND: tuple[int, int, int] = (230, 230, 230)

# Anchor points (normalised x, y; y grows downwards) that single objects are placed near and that
# the scorer uses to name the region of a detected object.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "centre": (0.5, 0.5),
}
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
# Max offset of a single object's centre from its anchor; < half the anchor spacing (0.125).
POSITION_JITTER = 0.08

# Relation r in "A r B" -> (axis, sign): A's coordinate on `axis` minus B's has sign `sign`.
RELATIONS: dict[str, tuple[int, int]] = {
    "to the left of": (0, -1),
    "to the right of": (0, 1),
    "above": (1, -1),
    "below": (1, 1),
}

# Bounding-box side as a fraction of the image side. The gap between the ranges leaves the scorer
# a clean threshold (SIZE_THRESHOLD) that survives blur.
SIZE_RANGES: dict[str, tuple[float, float]] = {"small": (0.18, 0.23), "large": (0.30, 0.36)}
SIZE_THRESHOLD = 0.265

# (shape, colour) pairs that never appear in the training split. One per shape and at most one per
# colour (3 of 18 = 17%), so every shape and every colour is still seen in training.
HELDOUT_COMBOS: frozenset[tuple[str, str]] = frozenset(
    {("circle", "green"), ("square", "purple"), ("triangle", "yellow")}
)

DEFAULT_SIZE = 64
# Depth of the centre of mass below the top of the bounding box, as a fraction of its side.
_CENTROID_DEPTH: dict[str, float] = {"circle": 0.5, "square": 0.5, "triangle": 2 / 3}
_MIN_GAP = 0.06  # minimum empty space between two objects' boxes (normalised)
_BORDER = 0.03  # minimum empty space between an object and the image edge (normalised)


@dataclass(frozen=True)
class SceneObject:
    """One drawn object, normalised to the image side.

    `centre` is the centre of mass (what the scorer measures; for a triangle it sits 2/3 of the way
    down its box), `extent` the side of its square bounding box.
    """

    shape: str
    colour: str
    size: str
    position: str
    centre: tuple[float, float]
    extent: float


@dataclass(frozen=True)
class Scene:
    """A scene's attribute record: what is drawn and what the caption claims about it.

    `relation` (two-object scenes only) reads "objects[0] <relation> objects[1]". The `mentions_*`
    flags say whether the caption states sizes / the single object's position; the scorer only
    checks what the caption states.
    """

    objects: tuple[SceneObject, ...]
    relation: str | None
    caption: str
    mentions_size: bool
    mentions_position: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as stored under "attributes" in metadata.jsonl."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        """Inverse of `to_dict` (JSON turns tuples into lists; this restores them)."""
        objects = tuple(SceneObject(**{**o, "centre": tuple(o["centre"])}) for o in data["objects"])
        return cls(
            objects=objects,
            relation=data["relation"],
            caption=data["caption"],
            mentions_size=data["mentions_size"],
            mentions_position=data["mentions_position"],
        )


def nearest_position(centre: tuple[float, float]) -> str:
    """Name of the anchor closest to a normalised centre (shared with the scorer)."""
    x, y = centre
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - x) ** 2 + (POSITIONS[p][1] - y) ** 2)


def object_box(shape: str, centre: tuple[float, float], extent: float) -> tuple[float, float, float, float]:
    """Normalised bounding box (x0, y0, x1, y1) of an object with this centre of mass."""
    top = centre[1] - _CENTROID_DEPTH[shape] * extent
    return (centre[0] - extent / 2, top, centre[0] + extent / 2, top + extent)


def sample_scenes(n: int, seed: int, split: Split = "train", two_object_share: float | None = None) -> list[Scene]:
    """Draw `n` scenes. Scene i depends only on (seed, split, i), so prefixes are stable.

    "train" never contains a HELDOUT_COMBOS object; "heldout" always contains at least one;
    "all" is unrestricted. About half the scenes have two objects; `two_object_share` (0 to 1) makes it exactly
    round(n * share) of them instead: the same per-index scenes, in order, with those of the over-represented
    count skipped once their quota is full (prefixes are then no longer stable).
    """
    if split not in ("train", "heldout", "all"):
        raise UserError(f"unknown split {split!r}: use 'train', 'heldout' or 'all'")
    if two_object_share is None:
        return [_scene_at(seed, split, i) for i in range(n)]
    if not 0.0 <= two_object_share <= 1.0:
        raise UserError(f"two-object share must be between 0 and 1, got {two_object_share}")
    quota = {2: round(n * two_object_share)}
    quota[1] = n - quota[2]
    scenes: list[Scene] = []
    i = 0
    while len(scenes) < n:
        scene = _scene_at(seed, split, i)
        i += 1
        if quota[len(scene.objects)] > 0:
            quota[len(scene.objects)] -= 1
            scenes.append(scene)
    return scenes


def heldout_prompts(n: int, seed: int) -> list[Scene]:
    """The evaluation prompts for compositional generalisation: `n` held-out-split scenes.

    A thin name over `sample_scenes(..., split="heldout")` so evaluation code states its intent.
    """
    return sample_scenes(n, seed, split="heldout")


def render_scene(scene: Scene, size: int = DEFAULT_SIZE) -> Image.Image:
    """Draw a scene as a crisp (non-antialiased) RGB image of `size` x `size` pixels."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        side = max(2, round(obj.extent * size))
        box = object_box(obj.shape, obj.centre, obj.extent)
        x0, y0 = round(box[0] * size), round(box[1] * size)
        x1, y1 = x0 + side - 1, y0 + side - 1
        fill = PALETTE[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


def generate(
    n: int, seed: int, split: Split = "train", size: int = DEFAULT_SIZE, two_object_share: float | None = None
) -> Iterator[tuple[Image.Image, Scene]]:
    """Yield (image, scene) pairs for `sample_scenes(n, seed, split, two_object_share)`."""
    for scene in sample_scenes(n, seed, split, two_object_share):
        yield render_scene(scene, size), scene


def export_image_folder(
    out_dir: str | Path, n: int, seed: int, split: Split = "train", size: int = DEFAULT_SIZE,
    two_object_share: float | None = None,
) -> Path:
    """Write an HF "imagefolder" dataset: 000000.png, ... plus metadata.jsonl.

    Each metadata line is {"file_name", "text": caption, "attributes": Scene.to_dict()}. Refuses a
    non-empty `out_dir` so a rerun never silently mixes two datasets.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty directory: choose a new or empty one")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as meta:
        for i, (image, scene) in enumerate(generate(n, seed, split, size, two_object_share)):
            file_name = f"{i:06d}.png"
            image.save(out / file_name)
            record = {"file_name": file_name, "text": scene.caption, "attributes": scene.to_dict()}
            meta.write(json.dumps(record) + "\n")
    return out


def _scene_at(seed: int, split: Split, i: int) -> Scene:
    """Scene i of (seed, split): its own random stream, so it depends on nothing else."""
    return _sample_scene(random.Random(f"shapes:{seed}:{split}:{i}"), split)


def _sample_scene(rng: random.Random, split: Split) -> Scene:
    n_objects = rng.choice(OBJECT_COUNTS)
    combos = _sample_combos(rng, n_objects, split)
    mentions_size = rng.random() < 0.5
    if n_objects == 1:
        [(shape, colour)] = combos
        size = rng.choice(tuple(SIZE_RANGES))
        position = rng.choice(tuple(POSITIONS))
        extent = rng.uniform(*SIZE_RANGES[size])
        centre = tuple(
            min(max(anchor + rng.uniform(-POSITION_JITTER, POSITION_JITTER), lo), hi)
            for anchor, (lo, hi) in zip(POSITIONS[position], _centre_bounds(shape, extent))
        )
        obj = SceneObject(shape, colour, size, position, centre, extent)
        mentions_position = rng.random() < 0.5
        caption = _describe(obj, mentions_size)
        if mentions_position:
            caption += " " + POSITION_PHRASES[position]
        return Scene((obj,), None, caption, mentions_size, mentions_position)

    relation = rng.choice(tuple(RELATIONS))
    sizes = [rng.choice(tuple(SIZE_RANGES)) for _ in combos]
    extents = [rng.uniform(*SIZE_RANGES[s]) for s in sizes]
    centres = _place_pair(rng, relation, [shape for shape, _ in combos], extents)
    objects = tuple(
        SceneObject(shape, colour, size, nearest_position(centre), centre, extent)
        for (shape, colour), size, centre, extent in zip(combos, sizes, centres, extents)
    )
    caption = f"{_describe(objects[0], mentions_size)} {relation} {_describe(objects[1], mentions_size)}"
    return Scene(objects, relation, caption, mentions_size, False)


def _sample_combos(rng: random.Random, n_objects: int, split: Split) -> list[tuple[str, str]]:
    """(shape, colour) per object, with distinct colours and the split's held-out rule."""
    allowed = [(s, c) for s in SHAPES for c in COLOURS if split != "train" or (s, c) not in HELDOUT_COMBOS]
    combos: list[tuple[str, str]] = []
    if split == "heldout":
        combos.append(rng.choice(sorted(HELDOUT_COMBOS)))
    while len(combos) < n_objects:
        used = {c for _, c in combos}
        combos.append(rng.choice([sc for sc in allowed if sc[1] not in used]))
    rng.shuffle(combos)
    return combos


def _place_pair(
    rng: random.Random, relation: str, shapes: list[str], extents: list[float]
) -> list[tuple[float, float]]:
    """Centres for "A relation B": the relation is unambiguous and the boxes are well apart."""
    axis, sign = RELATIONS[relation]
    while True:
        centres = [
            tuple(rng.uniform(lo, hi) for lo, hi in _centre_bounds(shape, extent))
            for shape, extent in zip(shapes, extents)
        ]
        delta = [centres[0][k] - centres[1][k] for k in (0, 1)]
        main, other = delta[axis] * sign, abs(delta[1 - axis])
        a, b = (object_box(*obj) for obj in zip(shapes, centres, extents))
        gap = max(a[0] - b[2], b[0] - a[2], a[1] - b[3], b[1] - a[3])
        if main >= 0.3 and other <= 0.5 * main and gap >= _MIN_GAP:
            return centres


def _centre_bounds(shape: str, extent: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """Per-axis (lo, hi) range of centres that keep the object's box _BORDER inside the image."""
    depth = _CENTROID_DEPTH[shape] * extent
    return (
        (extent / 2 + _BORDER, 1 - extent / 2 - _BORDER),
        (depth + _BORDER, 1 - (extent - depth) - _BORDER),
    )


def _describe(obj: SceneObject, mentions_size: bool) -> str:
    return f"a {obj.size} {obj.colour} {obj.shape}" if mentions_size else f"a {obj.colour} {obj.shape}"
