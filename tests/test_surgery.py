"""Surgery on narrow teachers of the real SD-1, SD-2 and SDXL topologies (random weights, real tensors)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel

from distill_sd.measure import dummy_unet_inputs
from distill_sd.models import load_teacher, read_metadata, save_student
from distill_sd.students import CATALOGUE
from distill_sd.surgery import build_student, plan_student

CASES = [(arch, name) for arch in ("sd15", "sd21", "sdxl") for name, spec in CATALOGUE.items()
         if spec.topology == ("sdxl" if arch == "sdxl" else "sd")]


@pytest.fixture(scope="module")
def teachers(narrow_dirs):
    return {arch: load_teacher(path) for arch, path in narrow_dirs.items()}


def _run(unet, config, seed=0):
    inputs = dummy_unet_inputs(config, batch=2, latent_hw=(8, 8), tokens=7, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return unet(**inputs).sample


@pytest.mark.parametrize(("arch", "name"), CASES)
def test_every_student_tensor_equals_its_teacher_tensor(teachers, arch, name):
    teacher = teachers[arch]
    plan = plan_student(teacher.unet.config, CATALOGUE[name])
    student, coverage = build_student(teacher.unet, plan)
    assert coverage.fraction == 1.0 and not coverage.not_copied
    teacher_sd = teacher.unet.state_dict()
    for key, tensor in student.state_dict().items():
        assert torch.equal(tensor, teacher_sd[plan.teacher_key(key)]), key
        assert tensor.data_ptr() != teacher_sd[plan.teacher_key(key)].data_ptr(), "student must own its tensors"
    out = _run(student, plan.config)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize(("arch", "name"), [("sd15", "bk-tiny"), ("sd21", "bk-small"), ("sdxl", "ssd-1b")])
def test_saved_student_reloads_in_stock_diffusers_with_same_output(teachers, tmp_path, arch, name):
    teacher = teachers[arch]
    plan = plan_student(teacher.unet.config, CATALOGUE[name])
    student, coverage = build_student(teacher.unet, plan)
    out = tmp_path / "student"
    save_student(teacher, plan, student, coverage, out)
    expected = _run(student, plan.config)

    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    assert torch.equal(_run(unet, unet.config), expected)
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe) is type(teacher.pipeline)
    assert torch.equal(_run(pipe.unet, pipe.unet.config), expected)
    assert read_metadata(out)["kd_pairs"] == [list(p) for p in plan.kd_pairs]
    assert "U-Net" in (out / "README.md").read_text()

    # The whole pipeline generates (tokenizer, text encoder(s), VAE and scheduler all came along).
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_first_layers_init_reports_partial_coverage(teachers):
    teacher = teachers["sd15"]
    plan = plan_student(teacher.unet.config, CATALOGUE["bk-base"].with_first_layers())
    student, coverage = build_student(teacher.unet, plan)
    assert 0.9 < coverage.fraction < 1.0
    assert all("shape" in line for line in coverage.not_copied)
    # the tensors that could not be copied got a real initialisation, not meta/garbage
    assert all(not p.is_meta and torch.isfinite(p).all() for p in student.parameters())
    assert torch.isfinite(_run(student, plan.config)).all()
