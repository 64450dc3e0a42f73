"""The student catalogue: declarative specs saying which parts of a teacher U-Net a student keeps.

A spec never names channel widths or config keys: it says, per teacher block, which resnet(+attention)
layers survive, how many transformer blocks each surviving attention keeps, and what happens to the mid
block and the innermost stage. `surgery.plan_student` turns a spec plus a concrete teacher config into a
plain diffusers `UNet2DConditionModel` config, a weight map and the feature-KD pairs, so one spec serves
SD-1.x, SD-2.x and any fine-tune of them.

Recipes and their sources (exact parameter counts in docs/students.md and tests/test_students.py):

- bk-base / bk-small / bk-tiny: BK-SDM (Kim et al. 2023, arXiv 2305.15798); bk-base is segmind's
  sd_small and OFA's small-stable-diffusion, bk-tiny is segmind's sd_tiny.
- sdxl-small / sdxl-tiny: diffengine's small_sd_xl / tiny_sd_xl (the BK-SDM recipe on SDXL).
- ssd-1b / vega: Segmind's published SDXL students. Their transformer depths come from the model
  cards; Segmind published no pruning code, so which transformer blocks survive is our rule
  (`uniform`, see `select_blocks`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from distill_sd.errors import UserError

MID_CHOICES = ("keep", "drop", "resnet")
TRANSFORMER_RULES = ("uniform", "first")
TOPOLOGIES = ("sd", "sdxl")


@dataclass(frozen=True)
class StagePlan:
    """What one teacher block keeps.

    layers: teacher layer indices kept (a layer is a resnet and, in attention blocks, the attention after it).
    depth: per kept layer, how many transformer blocks its attention keeps (an int, chosen by the spec's
        rule) or exactly which ones (a tuple of indices); None keeps the teacher's depth.
    """

    layers: tuple[int, ...]
    depth: tuple[int | tuple[int, ...], ...] | None = None


@dataclass(frozen=True)
class StudentSpec:
    name: str
    summary: str
    down: tuple[StagePlan, ...]  # one per teacher down block; a single entry applies to every block
    up: tuple[StagePlan, ...]  # one per teacher up block; a single entry applies to every block
    mid: str = "keep"  # keep | drop | resnet (a single resnet, no attention: SSD-1B and Vega)
    drop_innermost_stage: bool = False  # bk-tiny: remove the lowest-resolution down/up stage pair
    transformer_rule: str = "uniform"
    topology: str | None = None  # "sd" (SD-1/2 block layout) or "sdxl"; None: any teacher
    kd_pairs: tuple[tuple[str, str], ...] | None = None  # (student module, teacher module); None: derived
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def with_first_layers(self) -> StudentSpec:
        """OFA's initialisation ("select the first layer of each block"): up stages keep 0 and 1, not 0 and 2.

        Where the second teacher layer's skip input is narrower than the student's (every stage whose
        previous stage has fewer channels), some tensors cannot be copied; the coverage report says which.
        """
        first = tuple(replace(p, layers=tuple(range(len(p.layers)))) for p in self.up)
        return replace(self, name=f"{self.name}@first-layers", up=first)


def select_blocks(kept: int, total: int, rule: str) -> tuple[int, ...]:
    """Which of `total` transformer blocks survive when `kept` are kept.

    `uniform` (default) keeps the first and the last and spreads the rest evenly, e.g. 4 of 10 ->
    (0, 3, 6, 9). Why: the blocks are residual updates of one stream; the first reads proj_in's output and
    the last writes what proj_out reads, and evenly spaced survivors sample the whole depth of the stream
    rather than only its beginning (the same argument as DistilBERT's every-other-layer initialisation).
    `first` keeps blocks 0..kept-1 (OFA's "first layers" rule).
    """
    if not 1 <= kept <= total:
        raise UserError(f"cannot keep {kept} of {total} transformer blocks; choose between 1 and {total}")
    if rule == "first" or kept == total:
        return tuple(range(kept))
    if kept == 1:
        return (0,)
    return tuple(round(i * (total - 1) / (kept - 1)) for i in range(kept))


def _bk(name: str, summary: str, topology: str, **kw: Any) -> StudentSpec:
    """The BK-SDM block-removal recipe: one layer per down stage (teacher 0), two per up stage (0 and 2)."""
    return StudentSpec(name, summary, down=(StagePlan((0,)),), up=(StagePlan((0, 2)),), topology=topology, **kw)


_SSD_SOURCE = "Segmind SSD-1B / Vega model cards (depths); block choice: uniform rule"

CATALOGUE: dict[str, StudentSpec] = {
    s.name: s
    for s in (
        _bk("bk-base", "BK-SDM-Base: one layer per down stage, two per up stage", "sd",
            source="BK-SDM arXiv 2305.15798; = segmind sd_small, OFA small-stable-diffusion"),
        _bk("bk-small", "BK-SDM-Small: bk-base without the mid block", "sd", mid="drop",
            source="BK-SDM arXiv 2305.15798"),
        _bk("bk-tiny", "BK-SDM-Tiny: bk-small without the innermost stage", "sd", mid="drop",
            drop_innermost_stage=True, source="BK-SDM arXiv 2305.15798; = segmind sd_tiny"),
        _bk("sdxl-small", "BK-SDM recipe on SDXL: one layer per down stage, two per up stage", "sdxl",
            source="diffengine small_sd_xl"),
        _bk("sdxl-tiny", "sdxl-small without the mid block", "sdxl", mid="drop", source="diffengine tiny_sd_xl"),
        StudentSpec(
            "ssd-1b", "Segmind SSD-1B: shallower transformers, mid block = one resnet",
            down=(StagePlan((0, 1)), StagePlan((0, 1), (2, 2)), StagePlan((0, 1), (4, 4))),
            up=(StagePlan((0, 1, 2), (4, 4, 10)), StagePlan((0, 1, 2), (2, 1, 1)), StagePlan((0, 1, 2))),
            mid="resnet", topology="sdxl", source=_SSD_SOURCE,
        ),
        StudentSpec(
            "vega", "Segmind Vega: much shallower transformers, mid block = one resnet",
            down=(StagePlan((0, 1)), StagePlan((0, 1), (1, 1)), StagePlan((0, 1), (2, 2))),
            up=(StagePlan((0, 1, 2), (2, 2, 2)), StagePlan((0, 1, 2), (1, 1, 1)), StagePlan((0, 1, 2))),
            mid="resnet", topology="sdxl", source=_SSD_SOURCE,
        ),
    )
}


def get_spec(name_or_path: str | Path, init: str = "bk") -> StudentSpec:
    """A catalogue name or a YAML/JSON spec file; `init="first"` selects OFA's first-layers weight map."""
    text = str(name_or_path)
    if text in CATALOGUE:
        spec = CATALOGUE[text]
    elif text.endswith((".yaml", ".yml", ".json")) or Path(text).is_file():
        spec = load_spec_file(Path(text))
    else:
        raise UserError(
            f"unknown student '{text}'; choose one of {', '.join(CATALOGUE)} or give a .yaml/.json spec file"
        )
    if init not in ("bk", "first"):
        raise UserError(f"unknown --init '{init}'; choose 'bk' (BK-SDM map) or 'first' (OFA first layers)")
    return spec.with_first_layers() if init == "first" else spec


# --------------------------------------------------------------------------------------- spec files

_SPEC_KEYS = {"name", "summary", "down", "up", "mid", "drop_innermost_stage", "transformer_rule", "topology",
              "kd_pairs", "source"}
_STAGE_KEYS = {"layers", "depth"}


def load_spec_file(path: Path) -> StudentSpec:
    """Read and validate a user-defined spec (see docs/students.md for the format)."""
    if not path.is_file():
        raise UserError(f"student spec file not found: {path}")
    try:
        raw = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({first})") from None
    return spec_from_dict(raw, where=str(path))


def spec_from_dict(raw: Any, where: str = "spec") -> StudentSpec:
    if not isinstance(raw, dict):
        raise UserError(f"{where}: a student spec is a mapping with keys down, up, mid, ...; got {type(raw).__name__}")
    unknown = set(raw) - _SPEC_KEYS
    if unknown:
        raise UserError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_SPEC_KEYS)}")
    for key in ("down", "up"):
        if key not in raw:
            raise UserError(f"{where}: missing '{key}' (a list of {{layers: [...], depth: [...]}} per block)")
    mid = raw.get("mid", "keep")
    if mid not in MID_CHOICES:
        raise UserError(f"{where}: mid must be one of {MID_CHOICES}, got {mid!r}")
    rule = raw.get("transformer_rule", "uniform")
    if rule not in TRANSFORMER_RULES:
        raise UserError(f"{where}: transformer_rule must be one of {TRANSFORMER_RULES}, got {rule!r}")
    topology = raw.get("topology")
    if topology is not None and topology not in TOPOLOGIES:
        raise UserError(f"{where}: topology must be one of {TOPOLOGIES} or absent, got {topology!r}")
    drop = raw.get("drop_innermost_stage", False)
    if not isinstance(drop, bool):
        raise UserError(f"{where}: drop_innermost_stage must be true or false, got {drop!r}")
    pairs = raw.get("kd_pairs")
    if pairs is not None:
        if not (isinstance(pairs, list) and all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs)):
            raise UserError(f"{where}: kd_pairs must be a list of [student_module, teacher_module] name pairs")
        pairs = tuple((s, t) for s, t in pairs)
    name = raw.get("name", Path(where).stem)
    return StudentSpec(
        name=str(name), summary=str(raw.get("summary", f"user spec {name}")),
        down=_stages(raw["down"], f"{where}: down"), up=_stages(raw["up"], f"{where}: up"),
        mid=mid, drop_innermost_stage=drop, transformer_rule=rule, topology=topology, kd_pairs=pairs,
        source=str(raw.get("source", where)),
    )


def _stages(raw: Any, where: str) -> tuple[StagePlan, ...]:
    if not isinstance(raw, list) or not raw:
        raise UserError(f"{where} must be a non-empty list with one {{layers: [...]}} entry per block")
    plans = []
    for i, entry in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(entry, dict) or "layers" not in entry:
            raise UserError(f"{at} must be a mapping with 'layers' (teacher layer indices to keep)")
        if set(entry) - _STAGE_KEYS:
            raise UserError(f"{at}: unknown key(s) {sorted(set(entry) - _STAGE_KEYS)}; allowed: layers, depth")
        layers = entry["layers"]
        if not (isinstance(layers, list) and layers and all(isinstance(x, int) and x >= 0 for x in layers)):
            raise UserError(f"{at}.layers must be a non-empty list of layer indices >= 0, got {layers!r}")
        if sorted(set(layers)) != layers:
            raise UserError(f"{at}.layers must be increasing without repeats, got {layers}")
        depth = entry.get("depth")
        if depth is not None:
            ok = isinstance(depth, list) and len(depth) == len(layers) and all(
                (isinstance(d, int) and d >= 1)
                or (isinstance(d, list) and d and all(isinstance(x, int) and x >= 0 for x in d)) for d in depth)
            if not ok:
                raise UserError(f"{at}.depth must list, per kept layer, a block count >= 1 or a list of block "
                                f"indices ({len(layers)} entries), got {depth!r}")
            depth = tuple(tuple(d) if isinstance(d, list) else d for d in depth)
        plans.append(StagePlan(tuple(layers), depth))
    return tuple(plans)


def spec_to_dict(spec: StudentSpec) -> dict[str, Any]:
    """The spec as plain data (stored in the student's model card and training state)."""

    def stage(p: StagePlan) -> dict[str, Any]:
        d: dict[str, Any] = {"layers": list(p.layers)}
        if p.depth is not None:
            d["depth"] = [list(x) if isinstance(x, tuple) else x for x in p.depth]
        return d

    out: dict[str, Any] = {
        "name": spec.name, "summary": spec.summary, "down": [stage(p) for p in spec.down],
        "up": [stage(p) for p in spec.up], "mid": spec.mid, "drop_innermost_stage": spec.drop_innermost_stage,
        "transformer_rule": spec.transformer_rule, "topology": spec.topology, "source": spec.source,
    }
    if spec.kd_pairs is not None:
        out["kd_pairs"] = [list(p) for p in spec.kd_pairs]
    return out
