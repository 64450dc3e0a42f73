"""ONNX / OpenVINO export of a narrow SD-1.5-shaped pipeline and its bk-tiny student, checked against PyTorch.

Measured here (narrow models, 64x64, fp32): components differ from PyTorch by ~1e-6 max abs (text encoder
1.3e-6, U-Net 7e-7, VAE decoder 6e-6) and the final uint8 images by 0 levels (max 1 level with some schedulers).
The asserted tolerances are looser: 1e-3 max abs (relative to the output's scale when that exceeds 1) and a
mean image difference of at most 2 levels.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from distill_sd.errors import UserError  # noqa: E402
from distill_sd.export import (  # noqa: E402
    COMPONENTS,
    METADATA_FILE,
    ExportedPipeline,
    compare_outputs,
    comparison_lines,
    export_pipeline,
)

TOL = 1e-3  # fp32 component outputs, max abs diff
IMAGE_LEVELS = 2.0  # final uint8 images, mean abs diff


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from distill_sd.models import save_pipeline
    from distill_sd.reference import reference_pipeline

    return save_pipeline(reference_pipeline("sd15", narrow=True, seed=0), tmp_path_factory.mktemp("export") / "p")


@pytest.fixture(scope="module")
def onnx_dir(teacher_dir):
    return export_pipeline(str(teacher_dir), teacher_dir.parent / "onnx")


def _assert_close(result, tol=TOL, levels=IMAGE_LEVELS):
    for name in COMPONENTS:
        r = result[name]
        assert r["max_abs"] <= tol * max(1.0, r["ref_max_abs"]), (name, r)
    assert result["image"]["mean_abs"] <= levels, result["image"]
    assert result["passed"], result


def test_export_writes_components_configs_and_metadata(teacher_dir, onnx_dir):
    for name in COMPONENTS:
        assert (onnx_dir / name / "model.onnx").is_file()
    assert (onnx_dir / "tokenizer").is_dir() and (onnx_dir / "scheduler" / "scheduler_config.json").is_file()
    assert not [p for p in onnx_dir.parent.iterdir() if p.name.startswith(".onnx-")]  # temp dir renamed away
    meta = json.loads((onnx_dir / METADATA_FILE).read_text())
    assert meta["format"] == "onnx" and meta["source"] == str(teacher_dir)
    assert meta["vae_scaling_factor"] == pytest.approx(0.18215)
    assert (meta["vae_scale_factor"], meta["unet_sample_size"], meta["default_size"]) == (8, 8, 64)
    assert meta["prediction_type"] == "epsilon"
    assert meta["shapes"]["unet"]["inputs"]["sample"]["shape"] == ["batch", 4, "height", "width"]
    assert meta["shapes"]["text_encoder"]["outputs"]["last_hidden_state"]["shape"] == ["batch", 77, 32]


def test_onnx_matches_pytorch(teacher_dir, onnx_dir):
    result = compare_outputs(str(teacher_dir), onnx_dir, steps=4, height=64, width=64)
    _assert_close(result)
    assert len(comparison_lines(result)) == 4


def test_runner_generates_deterministic_images_with_dynamic_shapes(onnx_dir):
    import torch

    def seeded(*seeds):
        return [torch.Generator("cpu").manual_seed(s) for s in seeds]

    pipe = ExportedPipeline.load(onnx_dir, scheduler="euler")
    image = pipe("a red bicycle", num_inference_steps=3, generator=seeded(1)).images[0]
    assert image.size == (64, 64) and image.mode == "RGB"
    again = pipe("a red bicycle", num_inference_steps=3, generator=seeded(1)).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(again))
    other = pipe("a red bicycle", num_inference_steps=3, generator=seeded(2), guidance_scale=1.0, height=128,
                 width=64).images[0]
    assert other.size == (64, 128)
    # a batch, as diffusers takes it: image i from generator i, whatever else is in the batch
    batch = pipe(["a blue car", "a red bicycle"], num_inference_steps=3, generator=seeded(5, 1)).images
    assert len(batch) == 2 and np.array_equal(np.asarray(batch[1]), np.asarray(image))
    one = torch.Generator("cpu").manual_seed(0)  # one generator for a batch, as diffusers also takes it
    assert len(pipe("a cat", num_inference_steps=1, num_images_per_prompt=3, generator=one).images) == 3
    with pytest.raises(UserError, match="multiples of 64"):
        pipe("x", height=72, width=64)
    with pytest.raises(UserError, match="one per image"):
        pipe(["a", "b"], num_inference_steps=1, generator=seeded(0))


def _one_line(excinfo):
    text = str(excinfo.value)
    assert text and "\n" not in text
    return text


def test_bad_input_is_one_line_user_error(teacher_dir, onnx_dir, tmp_path, monkeypatch):
    with pytest.raises(UserError) as e:  # existing non-empty output directory
        export_pipeline(str(teacher_dir), onnx_dir)
    assert "already exists" in _one_line(e)
    with pytest.raises(UserError) as e:
        export_pipeline(str(teacher_dir), tmp_path / "x", fmt="tflite")
    assert "unknown export format" in _one_line(e)
    with pytest.raises(UserError) as e:
        export_pipeline(str(teacher_dir), tmp_path / "x", opset=9)
    assert "opset" in _one_line(e)
    with pytest.raises(UserError) as e:
        export_pipeline(str(teacher_dir), tmp_path / "x", dtype="fp16")
    _one_line(e)
    with pytest.raises(UserError) as e:
        ExportedPipeline.load(teacher_dir)  # a diffusers folder, not an export
    assert METADATA_FILE in _one_line(e)
    with pytest.raises(UserError) as e:
        ExportedPipeline.load(onnx_dir, scheduler="nope")
    _one_line(e)
    monkeypatch.setitem(__import__("sys").modules, "openvino", None)  # as if not installed
    with pytest.raises(UserError) as e:
        export_pipeline(str(teacher_dir), tmp_path / "ov", fmt="openvino")
    assert "pip install" in _one_line(e)
    assert not (tmp_path / "x").exists() and not (tmp_path / "ov").exists()


def test_failed_export_leaves_nothing_behind(teacher_dir, tmp_path, monkeypatch):
    import distill_sd.export as export

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(export, "_export_components", boom)
    with pytest.raises(RuntimeError):
        export_pipeline(str(teacher_dir), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_sd21_v_prediction_exports_and_matches(tmp_path):
    from distill_sd.models import save_pipeline
    from distill_sd.reference import reference_pipeline

    p = save_pipeline(reference_pipeline("sd21", narrow=True), tmp_path / "sd21")
    out = export_pipeline(str(p), tmp_path / "onnx")
    assert json.loads((out / METADATA_FILE).read_text())["prediction_type"] == "v_prediction"
    _assert_close(compare_outputs(str(p), out, steps=3, height=64, width=64))


def test_sdxl_is_refused(tmp_path):
    from distill_sd.models import save_pipeline
    from distill_sd.reference import reference_pipeline

    p = save_pipeline(reference_pipeline("sdxl", narrow=True), tmp_path / "xl")
    with pytest.raises(UserError) as e:
        export_pipeline(str(p), tmp_path / "out")
    assert "not yet supported" in _one_line(e)
    assert not (tmp_path / "out").exists()


def test_bk_tiny_student_exports_and_matches(teacher_dir, tmp_path, monkeypatch):
    import distill_sd.export as export
    from distill_sd.models import load_teacher, save_student
    from distill_sd.students import get_spec
    from distill_sd.surgery import build_student, plan_student

    teacher = load_teacher(str(teacher_dir))
    plan = plan_student(teacher.unet.config, get_spec("bk-tiny"))
    unet, coverage = build_student(teacher.unet, plan)
    save_student(teacher, plan, unet, coverage, tmp_path / "s")
    monkeypatch.setattr(export, "ONNX_LIMIT", 0)  # weights in model.onnx.data, as for models over 2 GB
    out = export_pipeline(str(tmp_path / "s"), tmp_path / "s-onnx")
    assert (out / "unet" / "model.onnx.data").is_file()
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["student"] == "bk-tiny" and meta["unet_num_upsamplers"] == 2 and meta["size_multiple"] == 32
    result = compare_outputs(str(tmp_path / "s"), out, steps=3, height=64, width=96)
    _assert_close(result)
    assert ExportedPipeline.load(out)("a cat", num_inference_steps=2, height=32, width=32).images[0].size == (32, 32)


def test_openvino_matches_pytorch(teacher_dir, tmp_path):
    pytest.importorskip("openvino")
    out = export_pipeline(str(teacher_dir), tmp_path / "ov", fmt="openvino")
    for name in COMPONENTS:
        assert (out / name / "model.xml").is_file() and not (out / name / "model.onnx").exists()
    _assert_close(compare_outputs(str(teacher_dir), out, steps=3, height=64, width=64))


def test_int8_export_quantizes_the_unet_convolutions_and_stays_close(teacher_dir, tmp_path):
    import onnx

    out = export_pipeline(str(teacher_dir), tmp_path / "int8", dtype="int8", calibration_prompts=["a red circle", "x"],
                          calibration_steps=2, calibration_size=64)
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["dtype"] == "int8"
    q = meta["quantization"]
    assert q["components"] == ["unet"] and q["ops"] == ["Conv"]
    assert (q["prompts"], q["steps"], q["size"], q["calibration_inputs"]) == (2, 2, 64, 4)  # 2 prompts x 2 steps
    graph = onnx.load(str(out / "unet" / "model.onnx")).graph
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs and len(int8_weights) >= len(convs)  # every conv's weight is stored in int8
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    assert not any(n.op_type == "QuantizeLinear" for n in onnx.load(str(out / "text_encoder" / "model.onnx")).graph.node)
    result = compare_outputs(str(teacher_dir), out, steps=3, height=64, width=64)
    assert result["passed"], comparison_lines(result)
    assert result["unet"]["max_abs"] > 1e-4  # really quantized: further from PyTorch than the fp32 export
    with pytest.raises(UserError) as e:
        export_pipeline(str(teacher_dir), tmp_path / "bad", dtype="int8", calibration_steps=0)
    assert "calibration steps" in _one_line(e)
    with pytest.raises(UserError) as e:
        export_pipeline(str(teacher_dir), tmp_path / "bad", dtype="int8", calibration_prompts=["", " "])
    assert "calibration prompts are empty" in _one_line(e)
    assert not (tmp_path / "bad").exists()


def test_generate_and_evaluate_run_an_export_like_the_pipeline(teacher_dir, onnx_dir, tmp_path, capsys):
    from PIL import Image

    from distill_sd.cli import main

    args = ["--prompt", "a red circle", "--steps", "3", "--num-images", "2", "--seed", "4"]
    assert main(["generate", str(onnx_dir), *args, "--out", str(tmp_path / "onnx")]) == 0
    assert main(["generate", str(teacher_dir), *args, "--dtype", "fp32", "--out", str(tmp_path / "torch")]) == 0
    for name in ("000-00.png", "000-01.png"):
        a, b = (np.asarray(Image.open(tmp_path / d / name), dtype=int) for d in ("onnx", "torch"))
        assert np.abs(a - b).mean() <= IMAGE_LEVELS  # same seeds, same images up to float rounding
    capsys.readouterr()
    assert main(["evaluate", str(teacher_dir), str(onnx_dir), "--prompts", "4", "--steps", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == [str(teacher_dir), str(onnx_dir)]
    assert rows[1]["agreement_with_first"] == 1.0 and rows[1]["accuracy"] == rows[0]["accuracy"]
    assert main(["generate", str(onnx_dir), *args, "--lora", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "exported model" in capsys.readouterr().err


def test_bench_measures_an_export_beside_its_pipeline(teacher_dir, onnx_dir, capsys):
    """`distill-sd bench PIPELINE EXPORT`: the export is one row, labelled with its runtime and precision, with the
    U-Net counts of its saved config (equal to the pipeline's) and its own timings."""
    from distill_sd.cli import main

    assert main(["bench", str(teacher_dir), str(onnx_dir), "--dtype", "fp32,bf16", "--resolution", "64", "--steps",
                 "2", "--runs", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["dtype"]) for r in rows] == [(str(teacher_dir), "fp32"), (str(teacher_dir), "bf16"),
                                                        (str(onnx_dir), "onnx fp32")]
    assert rows[2]["unet_params"] == rows[0]["unet_params"] and rows[2]["unet_macs"] == rows[0]["unet_macs"]
    assert rows[2]["runs"] == 2 and rows[2]["unet_step_s"] > 0 and rows[2]["image_s"] > 0
