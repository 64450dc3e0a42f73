"""The distillation loss against hand-computed values, and feature taps (also through a DDP-style wrapper)."""

from __future__ import annotations

import pytest
import torch

from distill_sd.errors import UserError
from distill_sd.kd import FeatureTaps, LossWeights, distillation_loss, feature_loss


def test_loss_terms_equal_hand_computed_values():
    pred = torch.tensor([[[[1.0, 2.0]]]])
    target = torch.tensor([[[[0.0, 0.0]]]])
    teacher = torch.tensor([[[[1.0, 0.0]]]])
    fs = [torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0, 0.0, 4.0])]
    ft = [torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0, 2.0, 2.0])]
    # task: (1 + 4) / 2 = 2.5; out: (0 + 4) / 2 = 2; features: (0 + 4) / 2 = 2 and (4 + 4 + 4 + 4) / 4 = 4
    plain = distillation_loss(pred, target, LossWeights(1.0, 0.5, 0.25, "none"), teacher, fs, ft)
    assert plain["task"].item() == pytest.approx(2.5)
    assert plain["out"].item() == pytest.approx(2.0)
    assert plain["feat"].item() == pytest.approx(6.0)
    assert plain["loss"].item() == pytest.approx(2.5 + 0.5 * 2.0 + 0.25 * 6.0)
    assert feature_loss(fs, ft, "mean").item() == pytest.approx(3.0)
    # teacher_var: each MSE over the teacher feature's variance: ft[0] var 0 -> clamped, so use varied features
    ft2 = [torch.tensor([0.0, 2.0]), torch.tensor([0.0, 4.0, 0.0, 4.0])]  # unbiased variances 2 and 16/3
    fs2 = [torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0, 0.0, 4.0])]  # MSEs 1 and 4
    assert feature_loss(fs2, ft2, "teacher_var").item() == pytest.approx((1 / 2 + 4 / (16 / 3)) / 2)


def test_snr_weights_reweight_only_the_task_term():
    pred, target = torch.ones(2, 1, 1, 1), torch.zeros(2, 1, 1, 1)
    terms = distillation_loss(pred, target, LossWeights(1, 0, 0), snr_weights=torch.tensor([1.0, 0.0]))
    assert terms["task"].item() == pytest.approx(0.5)


def test_bad_weights_are_rejected():
    with pytest.raises(UserError):
        LossWeights(1, -1, 1)
    with pytest.raises(UserError):
        LossWeights(feature_norm="log")


def test_taps_capture_through_a_wrapper_and_keep_the_graph():
    inner = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))

    class Wrapper(torch.nn.Module):  # names gain a "module." prefix, like DDP
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x):
            return self.module(x)

    taps = FeatureTaps(inner, ["0", "2"])
    Wrapper(inner)(torch.randn(5, 3))
    first, last = taps.take()
    assert first.shape == (5, 4) and last.shape == (5, 2) and first.requires_grad
    with pytest.raises(RuntimeError, match="no output captured"):
        taps.take()
    with pytest.raises(UserError, match="not found"):
        FeatureTaps(inner, ["module.0"])


def test_attention_map_taps_record_probabilities_without_changing_the_output(narrow_dirs):
    """`name:probs` taps an attention layer's probabilities (rows sum to 1, in the graph); the U-Net computes the
    same output as with its fused kernel, and remove() gives the layer its processor back."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(narrow_dirs["sd15"] / "unet")
    layer = next(n for n, _ in unet.named_modules() if n.endswith("attn2"))
    original = type(dict(unet.named_modules())[layer].processor)
    sample, text = torch.randn(2, 4, 16, 16), torch.randn(2, 7, unet.config.cross_attention_dim)
    with torch.no_grad():
        expected = unet(sample, 500, text).sample
    taps = FeatureTaps(unet, [layer + ":probs", layer])
    out = unet(sample, 500, text).sample
    probs, hidden = taps.take()
    assert torch.allclose(out, expected, atol=1e-5)
    assert probs.shape == (2, hidden.shape[1], 7) and probs.requires_grad
    assert torch.allclose(probs.sum(-1), torch.ones(2, hidden.shape[1]), atol=1e-5)
    taps.remove()
    assert type(dict(unet.named_modules())[layer].processor) is original
    with pytest.raises(UserError, match="attention layers"):
        FeatureTaps(unet, ["conv_in:probs"])
