"""The kit's text encoder learns to read shapes captions (shapes.reader): region targets are right, and a
short pretraining makes a linear probe on the end-of-text/pad states read whole captions."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from distill_sd.errors import UserError
from distill_sd.reference import write_clip_tokenizer
from distill_sd.shapes import sample_scenes
from distill_sd.shapes.kit import SHAPES_TEXT_ENCODER_CONFIG
from distill_sd.shapes.reader import ATTRIBUTES, REGIONS, pretrain_reader, reader_accuracy, scene_targets


def _table(scene) -> dict[str, tuple[str, str, str]]:
    """scene_targets decoded back to {region: (colour, shape, size)} for the occupied regions."""
    t = scene_targets(scene)
    out = {}
    for r, region in enumerate(REGIONS):
        values = tuple(vals[t[r * len(ATTRIBUTES) + k]] for k, (_, vals) in enumerate(ATTRIBUTES))
        if values[0] != "none":
            out[region] = values
    return out


def test_scene_targets_put_objects_in_the_caption_regions():
    scenes = sample_scenes(200, seed=0, split="all")
    pair = next(s for s in scenes if s.relation == "to the left of" and s.mentions_size)
    a, b = pair.objects
    assert _table(pair) == {"left": (a.colour, a.shape, a.size), "right": (b.colour, b.shape, b.size)}
    above = next(s for s in scenes if s.relation == "above" and not s.mentions_size)
    a, b = above.objects
    assert _table(above) == {"top": (a.colour, a.shape, "none"), "bottom": (b.colour, b.shape, "none")}
    placed = next(s for s in scenes if s.relation is None and s.mentions_position)
    assert list(_table(placed)) == [placed.objects[0].position]
    free = next(s for s in scenes if s.relation is None and not s.mentions_position)
    assert list(_table(free)) == ["anywhere"]


def test_pretrain_reader_learns_to_read_and_freezes():
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_clip_tokenizer(Path(tmp))
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(**SHAPES_TEXT_ENCODER_CONFIG))
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    probe = pretrain_reader(encoder, tokenizer, steps=200, captions=2000, seed=0, progress=False)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert any(not torch.equal(v, encoder.state_dict()[k]) for k, v in before.items())
    # A whole caption read right means every region's colour, shape and size: chance is far below 1 %.
    assert reader_accuracy(encoder, probe, tokenizer, sample_scenes(200, seed=1, split="train")) > 0.25


def test_pretrain_reader_refuses_too_few_steps():
    encoder = CLIPTextModel(CLIPTextConfig(**SHAPES_TEXT_ENCODER_CONFIG))
    with pytest.raises(UserError, match="at least 20"):
        pretrain_reader(encoder, None, steps=5)
