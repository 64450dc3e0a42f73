"""`distill-sd lora`: adapters train on a frozen U-Net, save as a diffusers LoRA file that stock `load_lora_weights`,
`distill-sd generate --lora` and `serve --lora` read, resume exactly, and refuse options that make no sense for them."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distill_sd.cli import main

LORA_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from distill_sd.shapes import export_image_folder

    return export_image_folder(tmp_path_factory.mktemp("data") / "shapes", 32, seed=0)


def _lora(base, data, out, steps, *extra):
    return ["lora", "--student", str(base), "--data", str(data), "--out", str(out), "--resolution", "64",
            "--train_batch_size", "4", "--max_train_steps", str(steps), "--learning_rate", "1e-3", "--rank", "4",
            "--report_to", "none", "--no-progress", *extra]


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


def _unet_output(pipe) -> torch.Tensor:
    """The U-Net's prediction for one fixed input (latents, timestep, text states)."""
    unet = pipe.unet
    g = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    sample = torch.randn(1, unet.config.in_channels, size, size, generator=g)
    states = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text and size conditioning
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), states, **kwargs).sample


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_lora_trains_only_adapters_that_stock_diffusers_loads(narrow_dirs, shapes, tmp_path, arch):
    from diffusers import DiffusionPipeline
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    from distill_sd.train import LORA_TARGETS

    base = narrow_dirs[arch]
    before = _digest(base)
    run = tmp_path / "run"
    assert main(_lora(base, shapes, run, 6, "--lora_alpha", "2", "--validation_prompts", "a red circle",
                      "--validation_steps", "6", "--validation_inference_steps", "2")) == 0
    final = run / "final"
    assert (run / "validation" / "step-6" / "00.png").is_file()  # validation runs the U-Net with its adapters
    weights = load_file(final / LORA_FILE)
    assert weights and all("lora" in k for k in weights)  # adapters only: no base weight is saved
    assert not (final / "unet").exists() and _digest(base) == before  # the base model is untouched
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(1, 7))
    meta = json.loads((final / "distill_sd.json").read_text())
    assert meta["base"] == str(base) and "rank 4, alpha 2" in meta["training"]["adapters"]
    assert "load_lora_weights" in (final / "README.md").read_text()

    # What the run trained: the base U-Net with the adapters of its last checkpoint, rebuilt with peft
    trained = DiffusionPipeline.from_pretrained(base)
    trained.unet.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=list(LORA_TARGETS)))
    checkpoint = load_file(run / "checkpoints" / "checkpoint-6" / "lora_adapters.safetensors")
    assert not set_peft_model_state_dict(trained.unet, checkpoint).unexpected_keys

    pipe = DiffusionPipeline.from_pretrained(base)
    plain = _unet_output(pipe)
    pipe.load_lora_weights(final)  # stock diffusers: the saved file alone, alpha 2 of rank 4 included
    adapted = _unet_output(pipe)
    assert (adapted - plain).abs().max() > 1e-4  # the trained adapters change the prediction...
    torch.testing.assert_close(adapted, _unet_output(trained))  # ...exactly as in training
    pipe.unload_lora_weights()
    torch.testing.assert_close(_unet_output(pipe), plain)


def test_lora_resumes_exactly_and_generate_and_serve_apply_it(narrow_dirs, shapes, tmp_path, capsys):
    base = narrow_dirs["sd15"]
    straight = tmp_path / "straight"
    assert main(_lora(base, shapes, straight, 6, "--checkpointing_steps", "3")) == 0
    resumed = tmp_path / "resumed"
    assert main(_lora(base, shapes, resumed, 6, "--checkpointing_steps", "3")) == 0
    # back to where a kill after step 3 would have left it, then continue
    shutil.rmtree(resumed / "final")
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-6")
    assert main(_lora(base, shapes, resumed, 6, "--checkpointing_steps", "3", "--resume_from_checkpoint", "latest")) == 0
    a, b = load_file(straight / "final" / LORA_FILE), load_file(resumed / "final" / LORA_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    checkpoint = resumed / "checkpoints" / "checkpoint-6"  # the adapters and optimiser state, not the U-Net
    assert (checkpoint / "lora_adapters.safetensors").is_file()
    assert not [f for f in checkpoint.iterdir() if f.name.startswith("model")]
    # another rank cannot continue these adapters: one line, nothing written
    shutil.rmtree(resumed / "final")
    capsys.readouterr()
    code = main(_lora(base, shapes, resumed, 6, "--rank", "8", "--resume_from_checkpoint", "latest"))
    err = capsys.readouterr().err
    assert code != 0 and "--rank" in err and len(err.strip().splitlines()) == 1, err
    assert not (resumed / "final").exists()

    images = tmp_path / "images"
    common = ["generate", str(base), "--prompt", "a red circle", "--steps", "2", "--seed", "0", "--height", "64",
              "--width", "64"]
    assert main([*common, "--out", str(images / "plain")]) == 0
    assert main([*common, "--lora", str(straight / "final"), "--out", str(images / "lora")]) == 0
    [plain], [lora] = (sorted((images / k).glob("*.png")) for k in ("plain", "lora"))
    assert plain.read_bytes() != lora.read_bytes()
    from distill_sd.generate import fuse_lora, load_pipeline

    fused = load_pipeline(str(base), device="cpu", dtype="fp32")
    fuse_lora(fused, straight / "final")  # merged, then a plain U-Net again: nothing of peft left
    assert not [n for n, _ in fused.unet.named_parameters() if "lora" in n]

    capsys.readouterr()  # evaluate BASE BASE --lora: the LoRA goes into the last model only
    assert main(["evaluate", str(base), str(base), "--lora", str(straight / "final"), "--prompts", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == [str(base), f"{base} + LoRA {straight / 'final'}"]
    assert main(["evaluate", str(base), "--lora", str(tmp_path / "nothing"), "--prompts", "2"]) != 0
    assert "--lora" in capsys.readouterr().err

    from distill_sd.app import load_studio  # serve --compare BASE --lora: the base beside base + LoRA

    studio = load_studio(str(base), str(base), lora=str(straight / "final"), device="cpu", dtype="fp32")
    assert [e.label for e in studio.entries] == [f"teacher: {base.name}", f"student: {base.name} + LoRA final"]
    without, _, with_lora, _ = studio.run("a red circle", "", 2, 7.5, 0, 64, 64, "dpm++")
    assert not np.array_equal(np.asarray(without), np.asarray(with_lora))


def test_two_process_ddp_lora_checkpoints_and_saves(narrow_dirs, shapes, tmp_path, launch_two_processes):
    out = tmp_path / "ddp"
    launch_two_processes(_lora(narrow_dirs["sd15"], shapes, out, 4, "--checkpointing_steps", "2"))
    assert (out / "checkpoints" / "checkpoint-2" / "lora_adapters.safetensors").is_file()
    assert all("lora" in k for k in load_file(out / "final" / LORA_FILE))


def test_instance_prompt_captions_a_folder_of_bare_images(narrow_dirs, shapes, tmp_path, capsys):
    """DreamBooth's data: a few images, no captions, one prompt for all of them (training and caching)."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in sorted(shapes.glob("*.png"))[:8]:
        shutil.copy(f, bare / f.name)
    base = narrow_dirs["sd15"]
    run = tmp_path / "run"
    assert main(_lora(base, bare, run, 2)) != 0  # without it: the missing captions are an error
    assert "--allow-empty-captions" in capsys.readouterr().err
    assert main(_lora(base, bare, run, 2, "--instance_prompt", "a photo of sks circle")) == 0
    assert (run / "final" / LORA_FILE).is_file()
    cache = tmp_path / "cache"
    assert main(["cache", "--base", str(base), "--data", str(shapes), "--out", str(cache), "--resolution", "64",
                 "--instance_prompt", "a photo of sks circle"]) == 0  # captioned data: its captions are replaced
    index = json.loads((cache / "cache.json").read_text())
    assert index["captions"] == ["", "a photo of sks circle"] and set(index["caption_ids"]) == {1}
    assert main(_lora(base, shapes, tmp_path / "run2", 2, "--instance_prompt", " ")) != 0
    assert "--instance_prompt is empty" in capsys.readouterr().err


def test_dreambooth_prior_preservation_draws_class_images_once_and_learns_both(narrow_dirs, shapes, tmp_path):
    base = narrow_dirs["sd15"]
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in sorted(shapes.glob("*.png"))[:4]:
        shutil.copy(f, bare / f.name)
    classes = tmp_path / "classes"
    dreambooth = ["--instance_prompt", "a photo of sks circle", "--class_prompt", "a photo of a circle",
                  "--num_class_images", "6", "--class_data_dir", str(classes), "--validation_inference_steps", "2"]
    run = tmp_path / "run"
    assert main(_lora(base, bare, run, 3, *dreambooth)) == 0
    drawn = sorted(classes.glob("class-*.png"))
    assert len(drawn) == 6 and all((classes / f"{f.stem}.txt").read_text() == "a photo of a circle" for f in drawn)
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert all(h["prior"] > 0 for h in history)  # the class half is in every batch
    assert "prior preservation: 6 images" in (run / "final" / "README.md").read_text()
    # a second run reuses the class images (one is removed: only that one is drawn again, the same)
    before = {f.name: f.read_bytes() for f in drawn}
    (classes / "class-00003.txt").unlink()
    (classes / "class-00003.png").unlink()
    assert main(["finetune", *_lora(base, bare, tmp_path / "run2", 1, *dreambooth)[1:]]) == 0
    assert {f.name: f.read_bytes() for f in sorted(classes.glob("class-*.png"))} == before


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--use_ema"], "drop --use_ema"),
    (["--rank", "0"], "--rank must be > 0"),
    (["--lora_alpha", "-1"], "--lora_alpha must be > 0"),
    (["--class_prompt", "a photo of a circle"], "needs --instance_prompt"),
])
def test_bad_lora_options_are_one_clear_line(narrow_dirs, shapes, tmp_path, capsys, extra, fragment):
    code = main(_lora(narrow_dirs["sd15"], shapes, tmp_path / "run", 2) + extra)
    err = capsys.readouterr().err
    assert code != 0 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
