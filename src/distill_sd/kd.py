"""Feature taps (forward hooks) and the distillation loss.

L = w_task * MSE(student, target) + w_out * MSE(student, teacher) + w_feat * sum_k MSE(F_s_k, F_t_k)
  [+ w_ground * grounding_loss: each object's words attend inside its mask (CrossAttentionMaps, TokenCompose)]

Taps are registered on module *objects* of the unwrapped model, found by name once, so they keep working
when accelerate wraps the student in DDP/FSDP (the public scripts looked hooks up by name on the wrapper,
where names gain a `module.` prefix, and crashed under multi-GPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from distill_sd.errors import UserError
from distill_sd.measure import first_tensor

FEATURE_NORMS = ("none", "mean", "teacher_var")


class FeatureTaps:
    """Captures the outputs of named modules during each forward; `take()` returns and clears them.

    A name ending in `:probs` taps an attention layer's attention probabilities (averaged over heads, [B, queries,
    keys]) instead of its output: that layer runs diffusers' plain `AttnProcessor` (same maths; fused kernels never
    form the probabilities) until `remove()`. Attention-map KD pairs are then ordinary feature pairs.
    The student's captured tensors stay in the autograd graph (no copy, no detach), the teacher's are
    produced under no_grad: nothing is cloned per step.
    """

    def __init__(self, model: torch.nn.Module, names: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n.removesuffix(PROBS) not in modules]
        if missing:
            raise UserError(f"feature-KD modules not found in {type(model).__name__}: {missing}")
        not_attention = [n for n in names if n.endswith(PROBS) and not hasattr(modules[n.removesuffix(PROBS)],
                                                                              "get_attention_scores")]
        if not_attention:
            raise UserError(f"'{PROBS}' taps need attention layers; these are not: {not_attention}")
        self.names = list(names)
        self._store: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.names if not n.endswith(PROBS)]
        self._processors = {}
        for n in self.names:
            if n.endswith(PROBS):
                attn = modules[n.removesuffix(PROBS)]
                self._processors[n] = (attn, attn.processor)
                attn.set_processor(probs_recorder(partial(self._store.__setitem__, n)))

    def _hook(self, name: str):
        def hook(_module: torch.nn.Module, _inputs: object, output: object) -> None:
            self._store[name] = first_tensor(output)
        return hook

    def take(self) -> list[torch.Tensor]:
        missing = [n for n in self.names if n not in self._store]
        if missing:
            raise RuntimeError(f"no output captured for {missing}: was the model run since the last take()?")
        out = [self._store[n] for n in self.names]
        self._store.clear()
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for attn, processor in self._processors.values():
            attn.set_processor(processor)
        self._processors.clear()


PROBS = ":probs"  # suffix of a feature name that taps an attention layer's probabilities


def probs_recorder(sink: Callable[[torch.Tensor], None]) -> Any:
    """diffusers' plain AttnProcessor that also hands its attention probabilities, averaged over heads
    ([batch, queries, keys]), to `sink` (fused kernels never form them)."""
    from diffusers.models.attention_processor import AttnProcessor

    class Recorder(AttnProcessor):
        def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            scores = attn.get_attention_scores

            def record(*a: Any, **k: Any) -> torch.Tensor:
                probs = scores(*a, **k)  # [batch * heads, queries, keys]
                sink(probs.unflatten(0, (hidden_states.shape[0], attn.heads)).mean(1))
                return probs
            attn.get_attention_scores = record
            try:
                return super().__call__(attn, hidden_states, *args, **kwargs)
            finally:
                del attn.get_attention_scores
    return Recorder()


TeacherOutputs = tuple[torch.Tensor, list[torch.Tensor]]  # the teacher's prediction, its tapped block outputs


class TeacherForward:
    """The frozen teacher's noise prediction and block outputs (`feature_names`, in that order) for a batch.

    `submit(...)` returns a callable giving the result; here it runs the teacher when called, while
    shared_teacher.TeacherClient, with the same interface, hands the batch to a teacher in another process
    at once, so that work overlaps the student's forward.
    """

    def __init__(self, unet: torch.nn.Module, feature_names: Sequence[str], dtype: torch.dtype | None = None) -> None:
        self.unet, self.names = unet, list(feature_names)
        self.dtype = dtype or next(unet.parameters()).dtype
        self.taps = FeatureTaps(unet, self.names) if self.names else None

    @torch.no_grad()
    def __call__(self, noisy: torch.Tensor, timesteps: torch.Tensor, unet_kwargs: dict[str, Any]) -> TeacherOutputs:
        pred = self.unet(noisy.to(self.dtype), timesteps, **cast_floats(unet_kwargs, self.dtype)).sample
        return pred, self.taps.take() if self.taps else []

    def submit(self, noisy: torch.Tensor, timesteps: torch.Tensor,
               unet_kwargs: dict[str, Any]) -> Callable[[], TeacherOutputs]:
        return lambda: self(noisy, timesteps, unet_kwargs)

    def remove(self) -> None:
        if self.taps:
            self.taps.remove()


def cast_floats(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors of a (nested) U-Net kwargs dict in `dtype`; everything else as is."""
    if isinstance(value, dict):
        return {k: cast_floats(v, dtype) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value


@dataclass(frozen=True)
class LossWeights:
    task: float = 1.0
    out: float = 1.0
    feat: float = 1.0
    feature_norm: str = "teacher_var"  # none: BK-SDM's plain sum; mean: average over pairs; teacher_var: see below

    def __post_init__(self) -> None:
        if self.feature_norm not in FEATURE_NORMS:
            raise UserError(f"feature_norm must be one of {FEATURE_NORMS}, got {self.feature_norm!r}")
        if min(self.task, self.out, self.feat) < 0:
            raise UserError("loss weights must be >= 0")


def feature_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], norm: str) -> torch.Tensor:
    """Sum (or normalised sum) over pairs of the feature MSE.

    Block outputs of a U-Net have magnitudes far from 1 (deep blocks reach std ~ 10-100), so BK-SDM's plain
    sum of MSEs can be orders of magnitude larger than the noise-prediction terms, whose targets have unit
    variance. `teacher_var` divides each pair's MSE by the variance of the teacher feature (a scale-free
    relative error; 1.0 means "as far off as predicting the mean"), then averages over pairs, which puts
    the feature term on the same scale as the other two. `mean` only averages.
    """
    terms = []
    for s, t in zip(student, teacher, strict=True):
        mse = F.mse_loss(s.float(), t.float())
        if norm == "teacher_var":
            mse = mse / t.float().var().clamp_min(1e-6)
        terms.append(mse)
    total = torch.stack(terms).sum()
    return total / len(terms) if norm in ("mean", "teacher_var") else total


def distillation_loss(pred: torch.Tensor, target: torch.Tensor, weights: LossWeights,
                      teacher_pred: torch.Tensor | None = None,
                      student_feats: Sequence[torch.Tensor] = (), teacher_feats: Sequence[torch.Tensor] = (),
                      snr_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The three loss terms and their weighted total. `snr_weights` (per sample) reweights the task term."""
    if snr_weights is None:
        task = F.mse_loss(pred.float(), target.float())
    else:
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        task = (per_sample * snr_weights).mean()
    terms = {"task": task}
    total = weights.task * task
    if teacher_pred is not None and weights.out > 0:
        terms["out"] = F.mse_loss(pred.float(), teacher_pred.float())
        total = total + weights.out * terms["out"]
    if student_feats and weights.feat > 0:
        terms["feat"] = feature_loss(student_feats, teacher_feats, weights.feature_norm)
        total = total + weights.feat * terms["feat"]
    terms["loss"] = total
    return terms


class CrossAttentionMaps:
    """Records the cross-attention probabilities (averaged over heads) of a U-Net's text cross-attention layers
    (`attn2`) during each forward, for the grounding loss; `take()` returns and clears them.

    Fused attention kernels never form the probabilities, so the tapped layers run diffusers' plain
    `AttnProcessor` (same maths; `probs_recorder`). Only layers whose query grid is at most `max_downsample`
    times coarser than the latent are tapped: a 2x2 map cannot say where a small object is. `remove()` restores
    the original processors.
    """

    def __init__(self, unet: torch.nn.Module, max_downsample: int = 2) -> None:
        self._original = dict(unet.attn_processors)
        self._maps: list[torch.Tensor] = []
        self._unet = unet

        # Down-sampling levels of the U-Net: block i of the down path (and the mirrored up block) runs at
        # latent / 2**i; the mid block at the coarsest.
        levels = len(unet.config.block_out_channels)
        tapped = {}
        for name in self._original:
            if ".attn2." not in name:
                continue
            block, _, rest = name.partition(".")
            if block == "mid_block":
                level = levels - 1
            else:
                index = int(rest.split(".", 1)[0])
                level = index if block == "down_blocks" else levels - 1 - index
            if 2 ** level <= max_downsample:
                tapped[name] = probs_recorder(self._maps.append)
        if not tapped:
            raise UserError(f"no text cross-attention layer runs at most {max_downsample}x below the latent")
        self.layers = sorted(tapped)
        unet.set_attn_processor({**self._original, **tapped})

    def take(self) -> list[torch.Tensor]:
        out = list(self._maps)
        self._maps.clear()
        return out

    def clear(self) -> None:
        self._maps.clear()

    def remove(self) -> None:
        self._unet.set_attn_processor(self._original)
        self._maps.clear()


def grounding_loss(maps: Sequence[torch.Tensor], masks: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """TokenCompose's token loss (Wang et al., CVPR 2024): every word naming an object should spend its
    cross-attention inside that object: (1 - share of the word's attention map inside the object's mask)^2,
    averaged over words and tapped layers.

    maps: per layer [B, queries, tokens] (CrossAttentionMaps); masks: [B, K, h, w] object masks in [0, 1] at
    latent resolution; tokens: [B, K, T] token positions of each object's words, -1 where there are none (a
    caption naming fewer objects, an empty caption). Returns 0 (with a graph) when no word is grounded.
    """
    b, k, t = tokens.shape
    valid = tokens >= 0
    index = tokens.clamp_min(0).reshape(b, 1, k * t)
    terms = []
    for probs in maps:
        queries = probs.shape[1]
        factor = round((masks.shape[-2] * masks.shape[-1] / queries) ** 0.5)
        grid = (masks.shape[-2] // factor, masks.shape[-1] // factor)
        region = F.adaptive_avg_pool2d(masks.float(), grid).flatten(2)  # [B, K, queries]
        words = torch.gather(probs.float(), 2, index.expand(b, queries, k * t))  # [B, queries, K*T]
        words = words.transpose(1, 2).reshape(b, k, t, queries)
        inside = (words * region[:, :, None, :]).sum(-1) / words.sum(-1).clamp_min(1e-8)
        terms.append(((1 - inside) ** 2)[valid])
    share = torch.cat(terms)
    if share.numel() == 0:
        return sum(p.sum() for p in maps) * 0.0
    return share.mean()
