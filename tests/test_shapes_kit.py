"""Shapes VAE + teacher kit: a barely trained VAE gives the right latent shape, training is
deterministic by seed, and the kit is a stock StableDiffusionPipeline that makes 64x64 images.

Full-quality VAE training (minutes) is not run here; see distill_sd.shapes.vae.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from safetensors.torch import load_file

from distill_sd.errors import UserError
from distill_sd.shapes.kit import SHAPES_UNET_CONFIG, build_kit, shapes_unet_config
from distill_sd.shapes.vae import image_pool, to_model_space, train_vae
from distill_sd.shapes.world import sample_scenes

FAST = {"steps": 8, "batch_size": 4, "pool_size": 32, "threads": 1, "progress": False}


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return train_vae(tmp_path_factory.mktemp("vae") / "vae", seed=3, **FAST)


def test_vae_latent_shape_and_scaling(vae_dir):
    vae = AutoencoderKL.from_pretrained(vae_dir)
    assert (vae_dir / "diffusion_pytorch_model.safetensors").is_file()
    assert len(vae.config.block_out_channels) == 3 and vae.config.latent_channels == 4
    x = to_model_space(image_pool(2, seed=0, split="heldout"))
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        y = vae.decode(z).sample
    assert z.shape == (2, 4, 16, 16)
    assert y.shape == (2, 3, 64, 64)
    scale = vae.config.scaling_factor
    assert scale > 0 and scale != 1.0  # measured after training, not the config default
    assert json.loads((vae_dir / "training.json").read_text())["seed"] == 3


def test_train_vae_deterministic(vae_dir, tmp_path):
    threads = torch.get_num_threads()
    again = train_vae(tmp_path / "again", seed=3, **FAST)
    assert torch.get_num_threads() == threads  # the caller's thread count is restored
    other = train_vae(tmp_path / "other", seed=4, **FAST)
    name = "diffusion_pytorch_model.safetensors"
    a, b, c = (load_file(d / name) for d in (vae_dir, again, other))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_train_vae_rejects_bad_input(vae_dir, tmp_path):
    with pytest.raises(UserError):
        train_vae(tmp_path / "v", size=30, **FAST)
    with pytest.raises(UserError):
        train_vae(vae_dir, **FAST)  # never overwrites a trained VAE


def test_kit_is_a_stock_sd1_pipeline(vae_dir, tmp_path):
    kit = build_kit(tmp_path / "kit", vae_dir, seed=0, reader_steps=0)
    pipe = StableDiffusionPipeline.from_pretrained(kit)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    unet = pipe.unet.config
    assert list(unet.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert list(unet.up_block_types) == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert unet.mid_block_type == "UNetMidBlock2DCrossAttn" and unet.layers_per_block == 2
    assert unet.sample_size == 16 and unet.cross_attention_dim == pipe.text_encoder.config.hidden_size == 48
    assert list(unet.block_out_channels) == SHAPES_UNET_CONFIG["block_out_channels"]
    sched = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"
    assert (sched.beta_start, sched.beta_end, sched.beta_schedule, sched.num_train_timesteps,
            sched.prediction_type) == (0.00085, 0.012, "scaled_linear", 1000, "epsilon")
    assert pipe.tokenizer.model_max_length == 77 and len(pipe.tokenizer) == 49408
    assert pipe.vae_scale_factor == 4
    out = pipe("a red circle", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3)

    # The frozen random text encoder (reader_steps=0) keeps each word's identity (unit-scale embeddings, see kit.py): the
    # colour and shape tokens of two captions that differ only there are far apart; with transformers'
    # default 0.02 init they would be ~0.9 alike and the U-Net could hardly tell "red" from "blue".
    with torch.no_grad():
        ids = pipe.tokenizer(["a red circle", "a blue circle", "a red square"], padding="max_length",
                             return_tensors="pt").input_ids
        h = pipe.text_encoder(ids).last_hidden_state
    cos = torch.nn.functional.cosine_similarity
    assert cos(h[0, 2], h[1, 2], dim=0) < 0.6  # "red" vs "blue"
    assert cos(h[0, 3], h[2, 3], dim=0) < 0.6  # "circle" vs "square"
    assert cos(h[0, 1], h[1, 1], dim=0) > 0.99  # the shared prefix "a" is the same token


def test_kit_seeded_text_encoder_and_widths(vae_dir, tmp_path):
    a = build_kit(tmp_path / "a", vae_dir, seed=5, block_out_channels=[16, 32, 64, 64], reader_steps=20)
    b = build_kit(tmp_path / "b", vae_dir, seed=5, block_out_channels=[16, 32, 64, 64], reader_steps=20)
    te_a, te_b = (load_file(d / "text_encoder" / "model.safetensors") for d in (a, b))
    assert all(torch.equal(te_a[k], te_b[k]) for k in te_a)
    assert json.loads((a / "unet" / "config.json").read_text())["block_out_channels"] == [16, 32, 64, 64]
    with pytest.raises(UserError):
        build_kit(tmp_path / "a", vae_dir)  # refuses a non-empty output directory
    with pytest.raises(UserError):
        shapes_unet_config([32, 64, 128])


def test_teacher_recipe_runs_every_cycle_and_reuses_finished_stages(vae_dir, tmp_path):
    """The script that reproduces the shipped teacher, at a few steps: pretrain, two warm restarts, fp16 ship;
    after an interruption in the last cycle, the rerun reuses the finished ones and ends bit-identical."""
    from distill_sd.shapes.teacher import make_teacher

    work = tmp_path / "work"
    kw = {"steps": 3, "restarts": ((2, 5e-4), (1, 2.5e-4)), "images": 12, "batch_size": 4, "reader_steps": 0,
          "vae_dir": vae_dir, "eval_prompts": 2}
    summary = make_teacher(work, tmp_path / "teacher", **kw)
    assert 0 <= summary["heldout_accuracy"] <= 1 and summary["restarts"] == [[2, 5e-4], [1, 2.5e-4]]
    for run, source, steps in (("run2", "run", 2), ("run3", "run2", 1)):  # each restart from the previous cycle
        cfg = json.loads((work / run / "train_config.json").read_text())
        assert (cfg["mode"], cfg["student"], cfg["max_train_steps"]) == ("finetune", str(work / source / "final"), steps)
    weights = tmp_path / "teacher" / "unet" / "diffusion_pytorch_model.safetensors"
    assert {t.dtype for t in load_file(weights).values()} == {torch.float16}
    configs = [json.loads(f.read_text()) for f in (tmp_path / "teacher").glob("*/config.json")]
    assert len(configs) >= 3 and not any("_name_or_path" in c for c in configs)  # no paths of the training machine
    StableDiffusionPipeline.from_pretrained(tmp_path / "teacher")

    import shutil

    shutil.rmtree(work / "run3")  # "interrupted" before the last cycle finished
    make_teacher(work, tmp_path / "again", **kw)
    again = load_file(tmp_path / "again" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(again[k], v) for k, v in load_file(weights).items())

    # one more cycle from a finished teacher, on its own training split (another seed, all two-object scenes)
    more = tmp_path / "more-work"
    summary = make_teacher(more, tmp_path / "more", steps=3, restarts=((1, 1e-4),), images=6, batch_size=4,
                           eval_prompts=2, start_from=tmp_path / "teacher", data_seed=5, two_object_share=1.0)
    assert sorted(p.name for p in more.iterdir() if p.name.startswith("run")) == ["run2"]  # no pretraining cycle
    cfg = json.loads((more / "run2" / "train_config.json").read_text())
    assert (cfg["student"], cfg["max_train_steps"]) == (str(tmp_path / "teacher"), 1)
    rows = [json.loads(line) for line in (more / "data" / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == [s.caption for s in sample_scenes(6, 5, "train", two_object_share=1.0)]
    assert all(len(r["attributes"]["objects"]) == 2 for r in rows)
    assert summary["two_object_share"] == 1.0 and summary["data_seed"] == 5


def test_teacher_restarts_parse_steps_and_learning_rate():
    import argparse

    from distill_sd.shapes.teacher import parse_restart

    assert parse_restart("7000:5e-4") == (7000, 5e-4)
    for bad in ("7000", "x:1e-4", "0:1e-4", "100:0", "100:-1e-3"):
        with pytest.raises(argparse.ArgumentTypeError, match="STEPS:LEARNING_RATE"):
            parse_restart(bad)


def test_share_options_take_numbers_from_0_to_1():
    import argparse

    from distill_sd.cli import fraction

    assert [fraction(t) for t in ("0", "0.75", "1")] == [0.0, 0.75, 1.0]
    for bad, says in (("1.5", "from 0 to 1"), ("-0.1", "from 0 to 1"), ("half", "not a number")):
        with pytest.raises(argparse.ArgumentTypeError, match=says):
            fraction(bad)
