"""Shapes world + scorer: determinism, held-out split, export layout, and scorer calibration.

The scorer thresholds asserted here are the contract the diffusion evaluation relies on: near
perfect on ground-truth renders (also blurred, noisy, rescaled), near zero on noise and on
mismatched captions.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time

import numpy as np
import pytest
from PIL import Image, ImageFilter

from distill_sd.errors import UserError
from distill_sd.shapes import (
    CHECKS,
    COLOURS,
    HELDOUT_COMBOS,
    PALETTE,
    SHAPES,
    Scene,
    export_image_folder,
    heldout_prompts,
    render_scene,
    sample_scenes,
    score_batch,
    score_image,
)
from distill_sd.shapes.world import object_box

N_SCORE = 300


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return sample_scenes(N_SCORE, seed=7, split="all")


@pytest.fixture(scope="module")
def images(scenes: list[Scene]) -> list[Image.Image]:
    return [render_scene(s) for s in scenes]


def _add_noise(image: Image.Image, sigma: float, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, sigma, (image.height, image.width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


# ---- world -------------------------------------------------------------------------------------


def test_sampling_is_deterministic_and_prefix_stable() -> None:
    a = sample_scenes(50, seed=3)
    assert a == sample_scenes(50, seed=3)
    assert a[:20] == sample_scenes(20, seed=3)
    assert a != sample_scenes(50, seed=4)
    assert render_scene(a[0]).tobytes() == render_scene(sample_scenes(1, seed=3)[0]).tobytes()


def test_scene_invariants() -> None:
    scenes = sample_scenes(600, seed=1, split="all")
    counts = {len(s.objects) for s in scenes}
    assert counts == {1, 2}
    for s in scenes:
        for o in s.objects:
            assert o.shape in SHAPES and o.colour in COLOURS
            assert o.colour in s.caption and o.shape in s.caption
            x0, y0, x1, y1 = object_box(o.shape, o.centre, o.extent)
            assert 0 < x0 and 0 < y0 and x1 < 1 and y1 < 1
        if len(s.objects) == 2:
            a, b = s.objects
            assert a.colour != b.colour
            assert s.relation is not None and s.relation in s.caption
            ba, bb = object_box(a.shape, a.centre, a.extent), object_box(b.shape, b.centre, b.extent)
            assert max(ba[0] - bb[2], bb[0] - ba[2], ba[1] - bb[3], bb[1] - ba[3]) > 0  # disjoint
    image = render_scene(scenes[0], size=48)
    assert image.mode == "RGB" and image.size == (48, 48)


def test_palette_is_well_separated() -> None:
    colours = np.array(list(PALETTE.values()), dtype=float)
    dists = np.linalg.norm(colours[:, None] - colours[None], axis=-1)
    assert len(colours) >= 6
    assert dists[~np.eye(len(colours), dtype=bool)].min() > 120


def test_heldout_combos_only_in_heldout_split() -> None:
    def combos(scenes: list[Scene]) -> set[tuple[str, str]]:
        return {(o.shape, o.colour) for s in scenes for o in s.objects}

    train = sample_scenes(1500, seed=0, split="train")
    heldout = sample_scenes(300, seed=0, split="heldout")
    assert 0.1 <= len(HELDOUT_COMBOS) / (len(SHAPES) * len(COLOURS)) <= 0.25
    assert not combos(train) & HELDOUT_COMBOS
    assert combos(train) == {(s, c) for s in SHAPES for c in COLOURS} - HELDOUT_COMBOS
    assert all(combos([s]) & HELDOUT_COMBOS for s in heldout)
    assert HELDOUT_COMBOS <= combos(heldout)
    assert heldout_prompts(40, seed=5) == sample_scenes(40, seed=5, split="heldout")


def test_unknown_split_is_a_user_error() -> None:
    with pytest.raises(UserError):
        sample_scenes(3, seed=0, split="eval")  # type: ignore[arg-type]


def test_two_object_share_sets_the_mix_and_keeps_the_split() -> None:
    plain = sample_scenes(400, seed=0, split="train")
    mixed = sample_scenes(400, seed=0, split="train", two_object_share=0.75)
    assert sum(len(s.objects) == 2 for s in mixed) == 300  # exactly round(n * share), where plain has about half
    assert 150 <= sum(len(s.objects) == 2 for s in plain) <= 250
    assert not {(o.shape, o.colour) for s in mixed for o in s.objects} & HELDOUT_COMBOS
    assert mixed == sample_scenes(400, seed=0, split="train", two_object_share=0.75)
    assert set(map(repr, mixed)) <= set(map(repr, sample_scenes(1200, seed=0, split="train")))  # the same scenes
    assert all(len(s.objects) == 1 for s in sample_scenes(20, seed=0, two_object_share=0.0))
    with pytest.raises(UserError):
        sample_scenes(3, seed=0, two_object_share=1.5)


def test_export_image_folder_layout(tmp_path) -> None:
    out = tmp_path / "shapes"
    export_image_folder(out, n=6, seed=2, split="train", size=32)
    assert sorted(p.name for p in out.iterdir()) == [f"{i:06d}.png" for i in range(6)] + ["metadata.jsonl"]
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    expected = sample_scenes(6, seed=2, split="train")
    for i, (line, scene) in enumerate(zip(lines, expected, strict=True)):
        assert line["file_name"] == f"{i:06d}.png"
        assert line["text"] == scene.caption
        assert Scene.from_dict(line["attributes"]) == scene
        with Image.open(out / line["file_name"]) as image:
            assert image.size == (32, 32)
    # the metadata record is a valid scorer input
    with Image.open(out / lines[0]["file_name"]) as image:
        assert score_image(image, lines[0]["attributes"]).correct


def test_export_refuses_non_empty_dir(tmp_path) -> None:
    export_image_folder(tmp_path / "empty-is-fine", n=1, seed=0)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x.txt").write_text("keep me")
    with pytest.raises(UserError):
        export_image_folder(tmp_path / "taken", n=1, seed=0)
    with pytest.raises(UserError):
        export_image_folder(tmp_path / "taken" / "x.txt", n=1, seed=0)
    assert (tmp_path / "taken" / "x.txt").read_text() == "keep me"


# ---- scorer ------------------------------------------------------------------------------------

VARIANTS = {
    "clean": lambda im, i: im,
    "blur": lambda im, i: im.filter(ImageFilter.GaussianBlur(1.0)),
    "noise": lambda im, i: _add_noise(im, 15, i),
    "blur+noise": lambda im, i: _add_noise(im.filter(ImageFilter.GaussianBlur(1.0)), 10, i),
    "down-up": lambda im, i: im.resize((32, 32), Image.Resampling.BILINEAR).resize((64, 64)),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_scorer_accepts_ground_truth(variant: str, scenes: list[Scene], images: list[Image.Image]) -> None:
    result = score_batch([VARIANTS[variant](im, i) for i, im in enumerate(images)], scenes)
    assert result["n"] == N_SCORE
    assert result["accuracy"] >= 0.99, result


def test_scorer_splits_accuracy_by_object_count(scenes: list[Scene], images: list[Image.Image]) -> None:
    blank = Image.new("RGB", (64, 64), (230, 230, 230))
    spoiled = [blank if len(s.objects) == 2 else im for s, im in zip(scenes, images)]  # every 2-object scene wrong
    result = score_batch(spoiled, scenes)
    twos = sum(len(s.objects) == 2 for s in scenes)
    assert 0 < twos < len(scenes)
    assert result["accuracy_1obj"] >= 0.99 and result["accuracy_2obj"] == 0
    assert result["accuracy"] == pytest.approx(result["accuracy_1obj"] * (len(scenes) - twos) / len(scenes))


def test_scorer_is_resolution_free(scenes: list[Scene]) -> None:
    subset = scenes[:60]
    assert score_batch([render_scene(s, size=256) for s in subset], subset)["accuracy"] >= 0.99
    arrays = [np.asarray(render_scene(s, size=48)) for s in subset]
    assert score_batch(arrays, [s.to_dict() for s in subset])["accuracy"] >= 0.99


def test_scorer_rejects_noise_and_blank(scenes: list[Scene]) -> None:
    rng = np.random.default_rng(0)
    uniform = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(100)]
    smooth = [
        np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((64, 64)))
        for _ in range(100)
    ]
    blank = [Image.new("RGB", (64, 64), (230, 230, 230))] * 20
    assert score_batch(uniform, scenes[:100])["accuracy"] <= 0.05
    assert score_batch(smooth, scenes[100:200])["accuracy"] <= 0.05
    result = score_batch(blank, scenes[:20])
    assert result["presence"] == 0 and result["accuracy"] == 0


def test_scorer_rejects_mismatched_captions(scenes: list[Scene], images: list[Image.Image]) -> None:
    order = list(range(N_SCORE))
    random.Random(0).shuffle(order)
    assert score_batch(images, [scenes[j] for j in order])["accuracy"] <= 0.15


def test_each_check_catches_its_error() -> None:
    single = next(
        s
        for s in sample_scenes(200, seed=9)
        if len(s.objects) == 1 and s.mentions_size and s.mentions_position
    )
    pair = next(s for s in sample_scenes(200, seed=9) if len(s.objects) == 2)
    obj = single.objects[0]

    def failed(scene: Scene, drawn: Scene) -> set[str]:
        result = score_image(render_scene(drawn), scene)
        assert result.correct == (not [c for c in CHECKS if not getattr(result, c)])
        return {c for c in CHECKS if not getattr(result, c)}

    other_shape = next(s for s in SHAPES if s != obj.shape)
    other_colour = next(c for c in COLOURS if c != obj.colour)
    other_size = "small" if obj.size == "large" else "large"
    other_extent = 0.2 if other_size == "small" else 0.33
    far_centre = (1 - obj.centre[0], 1 - obj.centre[1]) if obj.position != "centre" else (0.25, 0.5)
    assert failed(single, single) == set()
    assert failed(single, _with_object(single, shape=other_shape)) == {"shape"}
    assert "colour" in failed(single, _with_object(single, colour=other_colour))
    assert failed(single, _with_object(single, extent=other_extent)) == {"size"}
    assert failed(single, _with_object(single, centre=far_centre)) == {"position"}
    mirrored = tuple(dataclasses.replace(o, centre=(1 - o.centre[0], 1 - o.centre[1])) for o in pair.objects)
    assert failed(pair, dataclasses.replace(pair, objects=mirrored)) == {"position"}
    assert failed(single, pair) >= {"count"}


def _with_object(scene: Scene, **changes: object) -> Scene:
    return dataclasses.replace(scene, objects=(dataclasses.replace(scene.objects[0], **changes),))


def test_scoring_is_fast(images: list[Image.Image], scenes: list[Scene]) -> None:
    start = time.perf_counter()
    score_batch(images[:100], scenes[:100])
    assert time.perf_counter() - start < 2.0
