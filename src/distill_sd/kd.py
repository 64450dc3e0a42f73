"""Feature taps (forward hooks) and the distillation loss.

L = w_task * MSE(student, target) + w_out * MSE(student, teacher) + w_feat * sum_k MSE(F_s_k, F_t_k)

Taps are registered on module *objects* of the unwrapped model, found by name once, so they keep working
when accelerate wraps the student in DDP/FSDP (the public scripts looked hooks up by name on the wrapper,
where names gain a `module.` prefix, and crashed under multi-GPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from distill_sd.errors import UserError
from distill_sd.measure import first_tensor

FEATURE_NORMS = ("none", "mean", "teacher_var")


class FeatureTaps:
    """Captures the outputs of named modules during each forward; `take()` returns and clears them.

    The student's captured tensors stay in the autograd graph (no copy, no detach), the teacher's are
    produced under no_grad: nothing is cloned per step.
    """

    def __init__(self, model: torch.nn.Module, names: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise UserError(f"feature-KD modules not found in {type(model).__name__}: {missing}")
        self.names = list(names)
        self._store: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.names]

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
