"""The catalogue at full size, on the meta device: exact parameter counts, MACs, KD pair shapes, spec files."""

from __future__ import annotations

import pytest

from distill_sd.errors import UserError
from distill_sd.measure import count_macs, count_params, meta_unet
from distill_sd.reference import unet_config
from distill_sd.students import CATALOGUE, StagePlan, get_spec, select_blocks, spec_from_dict, spec_to_dict
from distill_sd.surgery import plan_student, verify_pairs

# Published U-Net parameter counts (reference.md section 2).
PARAMS = {
    ("sd15", None): 859_520_964,
    ("sd15", "bk-base"): 579_384_964,
    ("sd15", "bk-small"): 482_346_884,
    ("sd15", "bk-tiny"): 323_384_964,
    ("sdxl", None): 2_567_463_684,
    ("sdxl", "sdxl-small"): 1_717_277_764,
    ("sdxl", "sdxl-tiny"): 1_304_160_324,
    ("sdxl", "ssd-1b"): 1_331_334_404,
    ("sdxl", "vega"): 745_225_604,
}
# BK-SDM's thop MACs at 512 px, batch 1.
MACS_512 = {None: 338.7e9, "bk-base": 223.8e9, "bk-small": 217.7e9, "bk-tiny": 205.0e9}


def _config(arch, student):
    teacher = unet_config(arch)
    return teacher if student is None else plan_student(teacher, CATALOGUE[student]).config


@pytest.mark.parametrize(("arch", "student"), list(PARAMS))
def test_parameter_counts_are_exact(arch, student):
    assert count_params(meta_unet(_config(arch, student))) == PARAMS[(arch, student)]


@pytest.mark.parametrize("student", list(MACS_512))
def test_macs_within_one_percent_of_bk_sdm(student):
    macs = count_macs(meta_unet(_config("sd15", student)), 512)
    assert abs(macs - MACS_512[student]) / MACS_512[student] < 0.01


@pytest.mark.parametrize(("arch", "student"), [(a, s.name) for a in ("sd15", "sd21", "sdxl")
                                               for s in CATALOGUE.values()
                                               if s.topology == ("sdxl" if a == "sdxl" else "sd")])
def test_every_kd_pair_has_equal_shapes_at_full_size(arch, student):
    plan = plan_student(unet_config(arch), CATALOGUE[student])
    assert plan.kd_pairs, "every recipe distils features"
    verify_pairs(plan, unet_config(arch), resolution=512)  # raises on any mismatch


def test_bk_tiny_pairs_follow_bk_sdm():
    pairs = plan_student(unet_config("sd15"), CATALOGUE["bk-tiny"]).kd_pairs
    assert pairs == [("down_blocks.0", "down_blocks.0"), ("down_blocks.1", "down_blocks.1"),
                     ("down_blocks.2", "up_blocks.0"), ("up_blocks.0", "up_blocks.1"),
                     ("up_blocks.1", "up_blocks.2"), ("up_blocks.2", "up_blocks.3")]


def test_bk_weight_map_keeps_teacher_layers_0_and_2_in_up_stages():
    plan = plan_student(unet_config("sd15"), CATALOGUE["bk-tiny"])
    assert plan.teacher_key("up_blocks.0.resnets.1.conv1.weight") == "up_blocks.1.resnets.2.conv1.weight"
    assert plan.teacher_key("up_blocks.0.upsamplers.0.conv.weight") == "up_blocks.1.upsamplers.0.conv.weight"
    assert plan.teacher_key("down_blocks.2.attentions.0.proj_in.weight") == "down_blocks.2.attentions.0.proj_in.weight"
    first = plan_student(unet_config("sd15"), CATALOGUE["bk-tiny"].with_first_layers())
    assert first.teacher_key("up_blocks.0.resnets.1.conv1.weight") == "up_blocks.1.resnets.1.conv1.weight"


def test_ssd1b_keeps_uniformly_spread_transformer_blocks():
    plan = plan_student(unet_config("sdxl"), CATALOGUE["ssd-1b"])
    key = "up_blocks.0.attentions.0.transformer_blocks.{}.attn1.to_q.weight"
    assert [plan.teacher_key(key.format(k)).split(".")[5] for k in range(4)] == ["0", "3", "6", "9"]
    assert plan.config["reverse_transformer_layers_per_block"] == [[4, 4, 10], [2, 1, 1], [1, 1, 1]]


@pytest.mark.parametrize(("kept", "total", "rule", "expected"), [
    (4, 10, "uniform", (0, 3, 6, 9)), (2, 10, "uniform", (0, 9)), (1, 2, "uniform", (0,)),
    (10, 10, "uniform", tuple(range(10))), (3, 10, "first", (0, 1, 2)),
])
def test_select_blocks(kept, total, rule, expected):
    assert select_blocks(kept, total, rule) == expected


def test_students_are_plain_configs_not_teacher_configs():
    cfg = plan_student(unet_config("sd15"), CATALOGUE["bk-tiny"]).config
    assert cfg["block_out_channels"] == [320, 640, 1280]
    assert cfg["layers_per_block"] == 1 and cfg["mid_block_type"] is None
    assert cfg["down_block_types"] == ["CrossAttnDownBlock2D"] * 3


def test_spec_round_trips_through_a_file(tmp_path):
    import yaml

    for spec in CATALOGUE.values():
        path = tmp_path / f"{spec.name}.yaml"
        path.write_text(yaml.safe_dump(spec_to_dict(spec)))
        loaded = get_spec(path)
        teacher = unet_config("sdxl" if spec.topology == "sdxl" else "sd15")
        assert plan_student(teacher, loaded).config == plan_student(teacher, spec).config


def test_user_spec_with_explicit_blocks():
    spec = spec_from_dict({"down": [{"layers": [0, 1]}], "up": [{"layers": [0, 1, 2]}], "mid": "keep",
                           "name": "half-depth"})
    sdxl = spec_from_dict({"down": [{"layers": [0, 1]}, {"layers": [0, 1], "depth": [1, [1]]},
                                    {"layers": [0, 1], "depth": [[0, 5], 3]}],
                           "up": [{"layers": [0, 1, 2]}]})
    assert count_params(meta_unet(plan_student(unet_config("sd15"), spec).config)) == PARAMS[("sd15", None)]
    plan = plan_student(unet_config("sdxl"), sdxl)
    assert plan.config["transformer_layers_per_block"] == [1, 1, [2, 3]]
    assert plan.teacher_key("down_blocks.2.attentions.0.transformer_blocks.1.ff.net.2.weight").startswith(
        "down_blocks.2.attentions.0.transformer_blocks.5.")


@pytest.mark.parametrize(("raw", "fragment"), [
    ([1, 2], "mapping"),
    ({"up": [{"layers": [0]}]}, "missing 'down'"),
    ({"down": [{"layers": [0]}], "up": [{"layers": [0, 2]}], "colour": 1}, "unknown key"),
    ({"down": [{"layers": []}], "up": [{"layers": [0, 2]}]}, "non-empty list"),
    ({"down": [{"layers": [1, 0]}], "up": [{"layers": [0, 2]}]}, "increasing"),
    ({"down": [{"layers": [0]}], "up": [{"layers": [0, 2]}], "mid": "maybe"}, "mid must be"),
    ({"down": [{"layers": [0], "depth": [0]}], "up": [{"layers": [0, 2]}]}, "depth must"),
])
def test_malformed_specs_are_rejected_clearly(raw, fragment):
    with pytest.raises(UserError, match=fragment):
        spec_from_dict(raw)


@pytest.mark.parametrize(("spec", "fragment"), [
    (dict(down=(StagePlan((0,)),), up=(StagePlan((0, 1, 2)),)), "must keep 2"),
    (dict(down=(StagePlan((5,)),), up=(StagePlan((0, 2)),)), "layer 5 does not exist"),
    (dict(down=(StagePlan((0,)),) * 3, up=(StagePlan((0, 2)),)), "lists 3 blocks"),
])
def test_specs_that_do_not_fit_the_teacher_are_rejected(spec, fragment):
    from distill_sd.students import StudentSpec

    with pytest.raises(UserError, match=fragment):
        plan_student(unet_config("sd15"), StudentSpec(name="x", summary="", **spec))


def test_recipe_for_the_wrong_family_is_rejected():
    with pytest.raises(UserError, match="recipe for SD teachers"):
        plan_student(unet_config("sdxl"), CATALOGUE["bk-tiny"])


def test_unknown_student_name():
    with pytest.raises(UserError, match="unknown student 'bk-huge'"):
        get_spec("bk-huge")


def test_attention_map_pairs_are_checked_like_feature_pairs():
    """`:probs` pairs (attention-map KD) pass when both sides are attention layers over the same queries."""
    from dataclasses import replace

    base = CATALOGUE["bk-tiny"]
    ok = ("up_blocks.0.attentions.0.transformer_blocks.0.attn2:probs",
          "up_blocks.1.attentions.0.transformer_blocks.0.attn2:probs")
    verify_pairs(plan_student(unet_config("sd15"), replace(base, kd_pairs=(ok,))), unet_config("sd15"), 512)
    for pair, fragment in [((ok[0], "up_blocks.2.attentions.0.transformer_blocks.0.attn2:probs"), "shapes differ"),
                           (("up_blocks.0:probs", "up_blocks.1:probs"), "needs an attention layer"),
                           ((ok[0], ok[1].removesuffix(":probs")), "with attention maps")]:
        with pytest.raises(UserError, match=fragment):
            verify_pairs(plan_student(unet_config("sd15"), replace(base, kd_pairs=(pair,))), unet_config("sd15"), 512)
