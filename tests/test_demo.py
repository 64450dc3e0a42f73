"""The shipped shapes teacher and `distill-sd demo --quick` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill_sd.cli import main
from distill_sd.report import machine, machine_line
from distill_sd.shapes.teacher import teacher_dir


def test_shipped_teacher_is_small_and_loads_in_stock_diffusers():
    from diffusers import StableDiffusionPipeline

    path = teacher_dir()
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    # The budget: 25 MB in all (the real CLIP vocabulary alone costs 6.1 MB of it: the text encoder's
    # 49,408 x 48 token table in fp16 and the tokenizer's vocab.json + merges.txt).
    assert size <= 25e6, f"{size / 1e6:.1f} MB"
    pipe = StableDiffusionPipeline.from_pretrained(path)
    assert pipe.unet.dtype.is_floating_point and len(pipe.unet.down_blocks) == 4
    assert pipe.unet.config.down_block_types == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert len(pipe.tokenizer) == 49408


def test_shipped_teacher_draws_held_out_compositions():
    """A broken or half-trained teacher in the repo fails here, not in a user's demo: on the first 16 of the
    demo's held-out captions the shipped teacher gets 13 right (all 5 one-object ones)."""
    from distill_sd.demo import eval_scenes, evaluate_model

    result = evaluate_model("teacher", teacher_dir(), eval_scenes(16))
    assert result.scores["accuracy_1obj"] == 1.0 and result.accuracy >= 0.75, result.scores


def test_quick_demo_writes_report_grid_and_tradeoff(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["model"] for r in rows] == ["teacher", "bk-base", "bk-small", "bk-tiny"]
    assert rows[0]["unet_params"] > rows[1]["unet_params"] > rows[2]["unet_params"] > rows[3]["unet_params"]
    assert all(0 <= r["accuracy"] <= 1 for r in rows) and rows[0]["check_presence"] > 0.5  # the teacher draws objects
    assert rows[0]["accuracy_vs_teacher_90ci"] is None
    for r in rows[1:]:  # each student's ratio comes with its bootstrap interval, which holds the ratio itself
        lo, hi = r["accuracy_vs_teacher_90ci"]
        assert lo <= r["accuracy_vs_teacher"] + 1e-9 and r["accuracy_vs_teacher"] <= hi + 1e-9
    for name in ("bk-base", "bk-small", "bk-tiny"):  # each student trained its full budget in its own process
        history = (out / "work" / f"run-{name}" / "history.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in history] == list(range(1, 21))
    report = (out / "report.md").read_text()
    assert "| bk-tiny" in report and "held-out" in report
    assert f"min on {machine()['cpu']}" in report  # a timing names the machine it was measured on
    for name in ("grid.png", "tradeoff.png"):
        assert (out / name).stat().st_size > 2000
    # re-running replaces a previous demo output, never a foreign folder
    assert main(["demo", "--quick", "--out", str(out), "--steps", "1"]) == 0
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "x.txt").write_text("keep")
    assert main(["demo", "--quick", "--out", str(foreign)]) != 0
    assert (foreign / "x.txt").read_text() == "keep"
    assert main(["demo", "--quick", "--out", str(foreign / "x.txt")]) != 0  # a file: one line, not a traceback
    assert (foreign / "x.txt").read_text() == "keep"


def test_parallel_distillation_reports_a_worker_error_as_one_line(tmp_path):
    import pytest

    from distill_sd.demo import distill_in_parallel
    from distill_sd.errors import UserError
    from distill_sd.train import TrainConfig

    missing = TrainConfig(mode="distill", teacher=str(tmp_path / "no-teacher"), student="bk-tiny",
                          cache=str(tmp_path / "no-cache"), out=str(tmp_path / "run"), max_train_steps=1)
    with pytest.raises(UserError, match="no-teacher"):
        distill_in_parallel({"bk-tiny": missing})


def test_grid_shows_whole_captions_and_frames_each_image_by_its_score(tmp_path):
    import numpy as np
    from PIL import Image

    from distill_sd.demo import grid
    from distill_sd.evaluate import EvalResult
    from distill_sd.shapes import heldout_prompts, render_scene

    scenes = [s for s in heldout_prompts(40, seed=0) if len(s.caption) > 48][:3]  # 4+ lines of 16 characters
    truth = EvalResult("truth", images=[render_scene(s) for s in scenes], scores={"accuracy": 1.0})
    blank = EvalResult("blank", images=[Image.new("RGB", (64, 64), "gray")] * 3, scores={"accuracy": 0.0})
    grid([truth, blank], scenes, tmp_path / "grid.png")
    canvas = np.asarray(Image.open(tmp_path / "grid.png"))
    cell = 96
    cap_h = canvas.shape[0] - 2 * cell
    assert len(scenes) == 3 and cap_h >= 4 + 11 * 4  # room for every line: no caption cut off
    top_left = canvas[cap_h + 1, 90 + 1], canvas[cap_h + cell + 1, 90 + 1]
    assert top_left[0][1] > 150 > top_left[0][0]  # truth passes: green frame
    assert top_left[1][0] > 150 > top_left[1][1]  # blank fails: red frame


def test_paired_ratio_interval_is_paired_and_narrows_with_more_prompts():
    from distill_sd.evaluate import paired_ratio_interval

    teacher = [True] * 70 + [False] * 26
    # a student right on exactly the teacher's prompts: the ratio is 1 in every resample (unpaired it would not be)
    assert paired_ratio_interval(list(teacher), teacher) == (1.0, 1.0)
    # wrong on 7 of the teacher's 70: ratio 0.9, an interval around it that shrinks with 10x the prompts
    student = [True] * 63 + [False] * 33
    lo, hi = paired_ratio_interval(student, teacher)
    lo10, hi10 = paired_ratio_interval(student * 10, teacher * 10)
    assert lo < 0.9 < hi and lo < lo10 < 0.9 < hi10 < hi and hi <= 1.0
    assert paired_ratio_interval(student, teacher) == (lo, hi)  # seeded
    with pytest.raises(ValueError):
        paired_ratio_interval(student[:-1], teacher)


def test_failure_report_lists_failed_images_and_names_binding_failures(tmp_path):
    from dataclasses import replace

    from PIL import Image

    from distill_sd.evaluate import EvalResult, binding_failure, write_failures
    from distill_sd.shapes import detect_objects, heldout_prompts, render_scene

    scene = next(s for s in heldout_prompts(40, seed=0) if len(s.objects) == 2 and
                 s.objects[0].shape != s.objects[1].shape)
    a, b = scene.objects
    swapped = replace(scene, objects=(replace(a, shape=b.shape), replace(b, shape=a.shape)))
    leaked = replace(scene, objects=(a, replace(b, colour=a.colour)))  # both objects in the first one's colour
    wrong_shape = replace(scene, objects=(replace(a, shape=b.shape), b))  # a shape error, no binding failure

    def kind(drawn):
        return binding_failure(scene, detect_objects(render_scene(drawn)))

    assert [kind(scene), kind(swapped), kind(leaked), kind(wrong_shape)] == [None, "swap", "leak", None]
    blank = Image.new("RGB", (64, 64), "gray")
    images = [render_scene(scene), render_scene(swapped), blank, render_scene(leaked)]
    result = EvalResult("m", images=images, scores={"accuracy": 0.25})
    counts = write_failures(result, [scene] * 4, tmp_path / "f", seed=7)
    assert counts == {"images": 4, "failed": 3, "two_object_failed": 3, "swaps": 1, "leaks": 1}
    text = (tmp_path / "f" / "failures.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and scene.caption in line]
    assert [r.split("|")[1].strip() for r in rows] == ["1", "2", "3"]  # the failed images, not the correct one
    assert "| 8 " in rows[0] and rows[0].rstrip(" |").endswith("swap")  # seed + index
    assert "nothing" in rows[1] and rows[2].rstrip(" |").endswith("leak")
    sheet = Image.open(tmp_path / "f" / "failures.png")
    assert sheet.width == 3 * 112 and sheet.height > 112  # one image per failure, captions above


def test_machine_line_names_cpu_fast_paths_cores_and_torch():
    m = {"cpu": "Some CPU", "isa": ["avx512f", "amx_bf16"], "cores": 2, "torch": "2.13.0"}
    assert machine_line(m) == "Some CPU (avx512f, amx_bf16), 2 cores, torch 2.13.0"
    assert machine_line({**m, "isa": []}) == "Some CPU (no AVX-512), 2 cores, torch 2.13.0"  # said, not left out


def test_readme_shows_the_table_of_the_shipped_demo_report():
    """README's demo table is docs/demo/report.md's, which `distill-sd demo --out docs/demo` wrote."""
    root = Path(__file__).resolve().parents[1]
    table = [line for line in (root / "docs" / "demo" / "report.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == 6 and "\n".join(table) in (root / "README.md").read_text()
