"""generate and bench on a narrow random-weight pipeline: outputs, metadata, every scheduler, bad input."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from distill_sd.cli import main
from distill_sd.generate import SCHEDULERS, pick_dtype


def test_generate_writes_pngs_with_parameters(narrow_dirs, tmp_path, capsys):
    out = tmp_path / "img"
    assert main(["generate", str(narrow_dirs["sd15"]), "--prompt", "a red circle", "--prompt", "a blue square",
                 "--steps", "3", "--num-images", "2", "--seed", "7", "--out", str(out), "--dtype", "fp32"]) == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["000-00.png", "000-01.png", "001-00.png", "001-01.png"]
    meta = json.loads(Image.open(files[1]).text["parameters"])
    assert meta["prompt"] == "a red circle" and meta["seed"] == 8 and meta["steps"] == 3
    assert Image.open(files[0]).size == (64, 64)


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_every_scheduler_runs(narrow_dirs, tmp_path, scheduler, capsys):
    assert main(["generate", str(narrow_dirs["sd15"]), "--prompt", "x", "--steps", "2", "--scheduler", scheduler,
                 "--out", str(tmp_path), "--dtype", "bf16"]) == 0


@pytest.mark.parametrize(("argv", "fragment"), [
    (["--steps", "0"], "steps must be between"),
    (["--guidance", "-1"], "guidance must be between"),
    (["--height", "60"], "multiple of 8"),
    (["--device", "cuda"], "CUDA is not available"),
])
def test_bad_generate_input_is_one_line(narrow_dirs, tmp_path, capsys, argv, fragment):
    code = main(["generate", str(narrow_dirs["sd15"]), "--prompt", "x", "--out", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert code != 0 and fragment in err and len(err.strip().splitlines()) == 1, err


def test_auto_dtype_is_fp16_on_gpu_and_never_fp16_on_cpu():
    import torch

    assert pick_dtype("auto", torch.device("cuda")) == torch.float16
    assert pick_dtype("auto", torch.device("cpu")) in (torch.bfloat16, torch.float32)


def test_bench_reports_side_by_side(capsys, tmp_path):
    plot = tmp_path / "bench.png"
    assert main(["bench", "ref:sd15", "ref:sd15:bk-tiny", "--narrow", "--resolution", "64", "--steps", "2",
                 "--runs", "2", "--unet-runs", "1", "--dtype", "fp32,bf16", "--json", "--plot", str(plot)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["dtype"]) for r in rows] == [("ref:sd15", "fp32"), ("ref:sd15", "bf16"),
                                                      ("ref:sd15:bk-tiny", "fp32"), ("ref:sd15:bk-tiny", "bf16")]
    assert rows[2]["unet_params"] < rows[0]["unet_params"] and rows[2]["unet_macs"] < rows[0]["unet_macs"]
    assert all(r["unet_step_s"] > 0 and r["image_s"] > 0 and r["runs"] == 2 for r in rows)
    assert plot.stat().st_size > 1000
