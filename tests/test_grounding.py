"""The grounding loss: object masks and word positions of shapes captions, cross-attention taps that leave the
U-Net's output unchanged, a loss that is 0 for attention inside the object and 1 outside, and training with it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distill_sd.cli import main
from distill_sd.kd import CrossAttentionMaps, grounding_loss
from distill_sd.shapes import PALETTE, export_image_folder, render_scene, sample_scenes
from distill_sd.shapes.grounding import add_grounding, object_masks, object_word_tokens
from distill_sd.shapes.teacher import teacher_dir


@pytest.fixture(scope="module")
def teacher():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(teacher_dir())


def test_word_tokens_name_each_objects_words(teacher):
    tok = teacher.tokenizer
    scenes = [s for s in sample_scenes(200, seed=3) if len(s.objects) == 2]
    with_size = next(s for s in scenes if s.mentions_size)
    without = next(s for s in scenes if not s.mentions_size)
    for scene in (with_size, without):
        ids = tok(scene.caption, padding="max_length", max_length=77).input_ids
        words = [[tok.decode([ids[p]]).strip() for p in positions] for positions in object_word_tokens(scene, tok)]
        expected = [([o.size] if scene.mentions_size else []) + [o.colour, o.shape] for o in scene.objects]
        assert ["".join(w) for w in words] == ["".join(e) for e in expected], scene.caption


def test_object_masks_are_the_objects_pixels():
    scene = next(s for s in sample_scenes(50, seed=1) if len(s.objects) == 2)
    masks = object_masks(scene, 64)
    image = np.asarray(render_scene(scene, 64))
    assert masks.shape == (2, 64, 64) and not (masks[0] & masks[1]).any()
    for mask, obj in zip(masks, scene.objects):
        assert mask.sum() > 20 and (image[mask] == PALETTE[obj.colour]).all()


def test_grounding_loss_is_zero_inside_and_one_outside():
    masks = torch.zeros(1, 2, 4, 4)
    masks[0, 0, :2, :2] = 1  # object 0 top-left, object 1 bottom-right
    masks[0, 1, 2:, 2:] = 1
    tokens = torch.tensor([[[1, 2], [4, -1]]])
    inside = torch.full((1, 16, 6), 1e-6)
    inside[0, [0, 1, 4, 5], 1:3] = 1.0  # words 1, 2 look at object 0's cells
    inside[0, [10, 11, 14, 15], 4] = 1.0  # word 4 at object 1's
    assert grounding_loss([inside], masks, tokens).item() == pytest.approx(0.0, abs=1e-4)
    swapped = torch.tensor([[[4, -1], [1, 2]]])  # each object's words attend to the other object
    assert grounding_loss([inside], masks, swapped).item() == pytest.approx(1.0, abs=1e-4)
    # a coarser layer (2x2 queries) is scored against the pooled masks
    coarse = torch.zeros(1, 4, 6)
    coarse[0, 0, 1:3], coarse[0, 3, 4] = 1.0, 1.0
    assert grounding_loss([coarse], masks, tokens).item() == pytest.approx(0.0, abs=1e-6)
    nothing = torch.full_like(tokens, -1)
    loss = grounding_loss([inside.requires_grad_()], masks, nothing)
    assert loss.item() == 0.0 and loss.requires_grad


def test_attention_taps_keep_the_output_and_skip_coarse_layers(teacher):
    unet = teacher.unet
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500])
    text = torch.randn(2, 77, 48, generator=g)
    with torch.no_grad():
        plain = unet(x, t, text).sample
        maps = CrossAttentionMaps(unet)
        tapped = unet(x, t, text).sample
        taken = maps.take()
        maps.remove()
    assert torch.allclose(plain, tapped, atol=1e-5)
    # 16x16 (down 0, up 3) and 8x8 (down 1, up 2) layers, 2 per down and 3 per up block; no 4x4 or mid-block map
    assert sorted({m.shape[1] for m in taken}) == [64, 256] and len(taken) == 10
    assert all(torch.allclose(m.sum(-1), torch.ones(())) for m in taken)
    assert maps.take() == [] and all(".attn2." in name for name in maps.layers)
    assert type(unet.attn_processors[maps.layers[0]]).__name__ != "_Tap"


def test_finetune_with_grounding_moves_attention_into_the_objects(teacher, tmp_path):
    data = export_image_folder(tmp_path / "data", 64, seed=0)
    cache = tmp_path / "cache"
    assert main(["cache", "--base", str(teacher_dir()), "--data", str(data), "--out", str(cache),
                 "--resolution", "64"]) == 0
    base = ["finetune", "--student", str(teacher_dir()), "--train_batch_size", "8", "--max_train_steps", "12",
            "--learning_rate", "1e-3", "--report_to", "none", "--no-progress", "--cache", str(cache)]
    assert main([*base, "--out", str(tmp_path / "no"), "--loss_ground", "1"]) == 2  # no masks in the cache yet
    add_grounding(cache, data, teacher.tokenizer)
    stored = load_file(str(cache / "grounding.safetensors"))
    assert stored["masks"].shape == (64, 2, 16, 16) and (stored["tokens"][:, 0] >= 0).any()
    assert main([*base, "--out", str(tmp_path / "run"), "--loss_ground", "1"]) == 0
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    first, last = np.mean([h["ground"] for h in history[:3]]), np.mean([h["ground"] for h in history[-3:]])
    assert last < 0.8 * first, (first, last)


def test_teacher_grounding_cycle_flag():
    import argparse

    from distill_sd.shapes.teacher import parse_grounding

    assert parse_grounding("1500:1e-4:0.1") == (1500, 1e-4, 0.1)
    for bad in ("1500:1e-4", "0:1e-4:0.1", "1500:1e-4:0", "a:b:c", "1:2:3:4"):
        with pytest.raises(argparse.ArgumentTypeError, match="STEPS:LEARNING_RATE:WEIGHT"):
            parse_grounding(bad)
