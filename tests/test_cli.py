"""The command line: JSON outputs, and bad input as one clear line with exit != 0 and nothing overwritten."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from distill_sd.cli import main


def _cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_students_json_has_params_and_macs(capsys):
    code, out, _ = _cli(capsys, "students", "--arch", "sd15", "--json")
    rows = {r["model"]: r for r in json.loads(out)}
    assert code == 0
    assert rows["bk-tiny"]["unet_params"] == 323_384_964
    assert abs(rows["bk-tiny"]["unet_macs"] - 205.0e9) / 205.0e9 < 0.01


def test_build_then_inspect(capsys, narrow_dirs, tmp_path):
    out = tmp_path / "tiny"
    code, text, _ = _cli(capsys, "build", "--teacher", str(narrow_dirs["sd15"]), "--student", "bk-tiny",
                         "--out", str(out))
    assert code == 0 and "100.00%" in text
    code, text, _ = _cli(capsys, "inspect", str(out), "--json", "--resolution", "64")
    info = json.loads(text)
    assert code == 0 and info["unet_params"] == 3_194_436 and info["unet_macs"] > 0
    assert set(info["components"]) == {"unet", "vae", "text_encoder"}
    assert [b["block"] for b in info["blocks"] if b["block"].startswith("down")] == [f"down_blocks.{i}" for i in range(3)]
    code, text, _ = _cli(capsys, "inspect", str(out / "unet"), "--json")  # a bare U-Net folder works too
    assert code == 0 and json.loads(text)["unet_params"] == 3_194_436


@pytest.fixture
def bad_inputs(tmp_path, narrow_dirs):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    not_unet = tmp_path / "ddpm"
    DDPMPipeline(unet=UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                                  down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2),
                 scheduler=DDPMScheduler()).save_pretrained(not_unet)
    (tmp_path / "model.ckpt").write_bytes(b"not really a pickle")
    (tmp_path / "broken.yaml").write_text("down: [layers: 0\n")
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("precious")
    teacher = str(narrow_dirs["sd15"])
    return {
        "unknown student": (["--teacher", teacher, "--student", "bk-huge"], "unknown student 'bk-huge'"),
        "malformed spec": (["--teacher", teacher, "--student", str(tmp_path / "broken.yaml")], "not valid YAML"),
        "not a U-Net pipeline": (["--teacher", str(not_unet), "--student", "bk-tiny"], "without a UNet2DConditionModel"),
        "missing path": (["--teacher", str(tmp_path / "nowhere"), "--student", "bk-tiny"], "not found"),
        "pickle without flag": (["--teacher", str(tmp_path / "model.ckpt"), "--student", "bk-tiny"], "--allow-pickle"),
        "wrong family": (["--teacher", str(narrow_dirs["sdxl"]), "--student", "bk-base"], "recipe for SD teachers"),
    }, tmp_path


@pytest.mark.parametrize("case", ["unknown student", "malformed spec", "not a U-Net pipeline", "missing path",
                                  "pickle without flag", "wrong family"])
def test_bad_build_input_is_one_clear_line(capsys, bad_inputs, case):
    cases, tmp_path = bad_inputs
    argv, fragment = cases[case]
    out = tmp_path / "out"
    code, _, err = _cli(capsys, "build", *argv, "--out", str(out))
    assert code != 0
    assert fragment in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists(), "nothing may be written on bad input"


def test_existing_output_is_never_overwritten(capsys, bad_inputs, narrow_dirs):
    _, tmp_path = bad_inputs
    code, _, err = _cli(capsys, "build", "--teacher", str(narrow_dirs["sd15"]), "--student", "bk-tiny",
                        "--out", str(tmp_path / "exists"))
    assert code != 0 and "already exists" in err
    assert [p.name for p in (tmp_path / "exists").iterdir()] == ["keep.txt"]
    assert (tmp_path / "exists" / "keep.txt").read_text() == "precious"


def test_console_script_prints_no_traceback(tmp_path):
    """The installed entry point, in a fresh process: argument errors and user errors are single lines."""
    exe = [sys.executable, "-m", "distill_sd"]
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for argv, fragment in ((["inspect", str(tmp_path / "none")], "not found"),
                           (["students", "--resolution", "100"], "multiple of 8"),
                           (["generate", str(tmp_path), "--prompt", "x", "--out", str(a_file / "images")],
                            "Not a directory")):  # an OS error on a path the user gave
        proc = subprocess.run(exe + argv, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0
        assert fragment in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_evaluate_scores_pipelines_against_the_first(capsys, narrow_dirs, tmp_path):
    teacher = str(narrow_dirs["sd15"])
    code, out, _ = _cli(capsys, "evaluate", teacher, teacher, "--prompts", "2", "--json")
    rows = json.loads(out)
    assert code == 0 and [r["n"] for r in rows] == [2, 2]
    assert rows[0]["agreement_with_first"] is None and rows[1]["agreement_with_first"] == 1.0  # same model, same seeds
    counts = sorted(k[len("accuracy_"):-3] for k in rows[0] if k.startswith("accuracy_"))  # accuracy by object count
    code, out, _ = _cli(capsys, "evaluate", teacher, "--prompts", "2")
    assert code == 0 and counts and all(f"| {n}-object |" in out.splitlines()[0] for n in counts)
    code, out, err = _cli(capsys, "evaluate", teacher, "--prompts", "2", "--split", "train")
    assert code == 0 and "2 training-split (new captions, seen compositions) captions" in err and "seed 1234" in err
    code, out, err = _cli(capsys, "evaluate", teacher, "--prompts", "2", "--seed", "99", "--failures",
                          str(tmp_path / "failures"))
    assert code == 0 and "seed 99 + index" in err  # another sample of captions and of noise
    report = tmp_path / "failures" / f"0-{narrow_dirs['sd15'].name}" / "failures.md"
    assert f"-> {report.parent}/failures.md" in err and "of 2 images fail" in report.read_text()
    # the sampler settings are options, reported with the result
    code, out, err = _cli(capsys, "evaluate", teacher, "--prompts", "2", "--steps", "3", "--guidance", "1",
                          "--scheduler", "euler")
    assert code == 0 and "2 held-out captions, euler 3 steps, guidance 1.0, seed 1234" in err and "| accuracy" in out
    for flags, fragment in ((["--steps", "0"], "--steps must be >= 1"), (["--guidance", "0.5"], "--guidance must be")):
        code, _, err = _cli(capsys, "evaluate", teacher, "--prompts", "2", *flags)
        assert code != 0 and fragment in err and "Traceback" not in err
    code, _, err = _cli(capsys, "evaluate", str(tmp_path))
    assert code != 0 and "neither a pipeline folder" in err and "Traceback" not in err


def test_evaluate_model_draws_with_the_sampler_settings_it_is_given(narrow_dirs):
    import numpy as np

    from distill_sd.demo import eval_scenes, evaluate_model

    scenes = eval_scenes(2)

    def pixels(**settings):
        result = evaluate_model("m", narrow_dirs["sd15"], scenes, **settings)
        return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])

    default = pixels(steps=2)
    assert np.array_equal(default, pixels(steps=2))  # same settings, same noise: the same images
    for other in ({"steps": 3}, {"steps": 2, "guidance": 1.0}, {"steps": 2, "scheduler": "euler"}):
        assert not np.array_equal(default, pixels(**other)), other


def test_cli_scheduler_names_are_the_samplers_generate_knows():
    from distill_sd.cli import SCHEDULER_NAMES
    from distill_sd.generate import SCHEDULERS

    assert SCHEDULER_NAMES == tuple(SCHEDULERS)


def test_evaluation_splits_hold_and_exclude_the_held_out_compositions():
    from distill_sd.demo import eval_scenes
    from distill_sd.shapes.world import HELDOUT_COMBOS

    def held_out(scene):
        return any((o.shape, o.colour) in HELDOUT_COMBOS for o in scene.objects)

    assert all(held_out(s) for s in eval_scenes(60)) and not any(held_out(s) for s in eval_scenes(60, "train"))
    other = eval_scenes(60, seed=99)  # another sample of the same split
    assert all(held_out(s) for s in other) and [s.caption for s in other] != [s.caption for s in eval_scenes(60)]
    assert [s.caption for s in eval_scenes(60, seed=1234)] == [s.caption for s in eval_scenes(60)]
