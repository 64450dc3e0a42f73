"""Build a student U-Net from a teacher U-Net and a spec: config, weight map, KD pairs, copied tensors.

The student is always a plain `UNet2DConditionModel` built from its own config (never a teacher with
modules deleted under the teacher's config.json), so it saves and reloads with stock diffusers.

Vocabulary: a *layer* is the i-th resnet of a block together with the i-th attention when the block has
attentions; a *transformer block* is one `BasicTransformerBlock` inside such an attention.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from distill_sd.errors import UserError
from distill_sd.students import StagePlan, StudentSpec, select_blocks

# Config keys that hold one value per down block (diffusers reverses them for the up blocks).
_PER_BLOCK_KEYS = ("attention_head_dim", "num_attention_heads", "cross_attention_dim", "only_cross_attention",
                   "layers_per_block", "transformer_layers_per_block")
_PRIVATE_PREFIX = "_"


def clean_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A U-Net config as a plain dict without diffusers' private bookkeeping keys."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items()
            if not k.startswith(_PRIVATE_PREFIX)}


def unet_topology(config: Mapping[str, Any]) -> str | None:
    """'sd' for the SD-1/SD-2 block layout, 'sdxl' for SDXL's, None for anything else."""
    down = list(config.get("down_block_types", ()))
    if down == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]:
        return "sd"
    if down == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]:
        return "sdxl"
    return None


def _per_block(value: Any, n: int) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


@dataclass(frozen=True)
class BlockLayout:
    """Layer counts and per-layer transformer depths of a U-Net config, with every shorthand expanded."""

    down_types: list[str]
    up_types: list[str]
    down_layers: list[int]
    down_depth: list[list[int]]  # per down block, per layer
    up_depth: list[list[int]]  # per up block, per layer

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> BlockLayout:
        down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
        n = len(down_types)
        layers = _per_block(config.get("layers_per_block", 2), n)
        tlpb = _per_block(config.get("transformer_layers_per_block", 1), n)
        down_depth = [_per_block(d, layers[i]) for i, d in enumerate(tlpb)]
        reverse = config.get("reverse_transformer_layers_per_block")
        up_layers = [x + 1 for x in reversed(layers)]
        up_src = reverse if reverse is not None else list(reversed(tlpb))
        up_depth = [_per_block(d, up_layers[i]) for i, d in enumerate(up_src)]
        return cls(down_types, up_types, layers, down_depth, up_depth)

    @property
    def up_layers(self) -> list[int]:
        return [len(d) for d in self.up_depth]


@dataclass
class StudentPlan:
    """A spec resolved against one teacher config."""

    spec: StudentSpec
    config: dict[str, Any]  # the student's UNet2DConditionModel config
    module_map: dict[str, str]  # student module prefix -> teacher module prefix (longest prefix wins)
    kd_pairs: list[tuple[str, str]]  # (student module, teacher module) whose outputs are matched

    def teacher_key(self, student_key: str) -> str:
        """The teacher state-dict key a student key is initialised from."""
        parts = student_key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in self.module_map:
                return ".".join([self.module_map[prefix], *parts[cut:]])
        return student_key


@dataclass
class Coverage:
    """How much of the student came from the teacher."""

    tensors_copied: int = 0
    tensors_total: int = 0
    params_copied: int = 0
    params_total: int = 0
    not_copied: list[str] = field(default_factory=list)  # student keys left at random init, with the reason

    @property
    def fraction(self) -> float:
        return self.params_copied / max(self.params_total, 1)

    def summary(self) -> str:
        return (f"coverage: {self.tensors_copied}/{self.tensors_total} tensors, "
                f"{self.params_copied:,}/{self.params_total:,} parameters ({100 * self.fraction:.2f}%) "
                "copied from the teacher")

    def as_dict(self) -> dict[str, Any]:
        return {"tensors_copied": self.tensors_copied, "tensors_total": self.tensors_total,
                "params_copied": self.params_copied, "params_total": self.params_total,
                "fraction": self.fraction, "not_copied": self.not_copied}


def _expand(plans: tuple[StagePlan, ...], n: int, where: str, name: str) -> list[StagePlan]:
    if len(plans) == 1:
        return [plans[0]] * n
    if len(plans) != n:
        raise UserError(f"student '{name}': {where} lists {len(plans)} blocks but the teacher has {n}; "
                        "give one entry per block, or a single entry for all")
    return list(plans)


def _kept_blocks(plan: StagePlan, teacher_depth: list[int], has_attention: bool, rule: str,
                 where: str) -> list[tuple[int, ...]]:
    """For each kept layer, the teacher transformer-block indices it keeps."""
    for t in plan.layers:
        if t >= len(teacher_depth):
            raise UserError(f"{where}: layer {t} does not exist (the teacher block has {len(teacher_depth)} layers)")
    if plan.depth is None:
        return [tuple(range(teacher_depth[t])) for t in plan.layers]
    if not has_attention:
        raise UserError(f"{where}: 'depth' given for a block without attention")
    kept = []
    for t, d in zip(plan.layers, plan.depth):
        total = teacher_depth[t]
        if isinstance(d, tuple):
            if any(i >= total for i in d) or sorted(set(d)) != list(d):
                raise UserError(f"{where}: transformer blocks {list(d)} invalid for a teacher layer of depth {total}")
            kept.append(d)
        else:
            if d > total:
                raise UserError(f"{where}: cannot keep {d} transformer blocks of a teacher layer with {total}")
            kept.append(select_blocks(d, total, rule))
    return kept


def _collapse(depths: list[list[int]]) -> list[Any]:
    return [d[0] if len(set(d)) == 1 else d for d in depths]


def plan_student(teacher_config: Mapping[str, Any], spec: StudentSpec) -> StudentPlan:
    """Resolve `spec` against a teacher U-Net config. Raises UserError when the spec does not fit."""
    config = clean_config(teacher_config)
    topo = unet_topology(config)
    if spec.topology is not None and topo is not None and topo != spec.topology:
        hint = "bk-base, bk-small, bk-tiny" if topo == "sd" else "sdxl-small, sdxl-tiny, ssd-1b, vega"
        raise UserError(f"student '{spec.name}' is a recipe for {spec.topology.upper()} teachers but this "
                        f"teacher has the {topo.upper()} block layout; use one of: {hint}")
    t = BlockLayout.of(config)
    n = len(t.down_types)
    down = _expand(spec.down, n, "down", spec.name)
    up = _expand(spec.up, n, "up", spec.name)
    drop = spec.drop_innermost_stage
    if drop and n < 2:
        raise UserError(f"student '{spec.name}': cannot drop the innermost stage of a {n}-stage U-Net")
    stages = list(range(n - 1 if drop else n))  # teacher down blocks kept, in order
    up_offset = 1 if drop else 0  # student up block k <- teacher up block k + offset

    module_map: dict[str, str] = {}
    down_depth, up_depth, down_layers = [], [], []
    for s, ti in enumerate(stages):
        where = f"student '{spec.name}' down block {ti}"
        has_attn = "CrossAttn" in t.down_types[ti]
        kept = _kept_blocks(down[ti], t.down_depth[ti], has_attn, spec.transformer_rule, where)
        down_layers.append(len(down[ti].layers))
        down_depth.append([len(k) for k in kept])
        _map_layers(module_map, f"down_blocks.{s}", f"down_blocks.{ti}", down[ti].layers, kept, has_attn)
    for s in range(len(stages)):
        ti = s + up_offset
        where = f"student '{spec.name}' up block {ti}"
        has_attn = "CrossAttn" in t.up_types[ti]
        kept = _kept_blocks(up[ti], t.up_depth[ti], has_attn, spec.transformer_rule, where)
        need = down_layers[len(stages) - 1 - s] + 1
        if len(kept) != need:
            raise UserError(f"{where} keeps {len(kept)} layers but must keep {need}: every up block has one "
                            "layer more than its mirrored down block (one per skip connection)")
        up_depth.append([len(k) for k in kept])
        _map_layers(module_map, f"up_blocks.{s}", f"up_blocks.{ti}", up[ti].layers, kept, has_attn)

    if drop:
        for key in _PER_BLOCK_KEYS:
            if isinstance(config.get(key), list):
                config[key] = config[key][:-1]
        config["down_block_types"] = t.down_types[:-1]
        config["up_block_types"] = t.up_types[1:]
        config["block_out_channels"] = list(config["block_out_channels"])[:-1]
    config["layers_per_block"] = down_layers[0] if len(set(down_layers)) == 1 else down_layers
    down_c, up_c = _collapse(down_depth), _collapse(up_depth)
    symmetric = all(isinstance(d, int) for d in down_c) and up_c == list(reversed(down_c))
    if symmetric:
        config["transformer_layers_per_block"] = down_c[0] if len(set(down_c)) == 1 else down_c
        config.pop("reverse_transformer_layers_per_block", None)
    else:
        config["transformer_layers_per_block"] = down_c
        config["reverse_transformer_layers_per_block"] = up_depth
    if spec.mid == "drop":
        config["mid_block_type"] = None
    elif spec.mid == "resnet":
        config["mid_block_type"] = "UNetMidBlock2D"  # diffusers builds it as a single resnet, no attention
    elif config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is None:
        raise UserError(f"student '{spec.name}' keeps the mid block but the teacher has none")

    pairs = list(spec.kd_pairs) if spec.kd_pairs is not None else _default_pairs(config, teacher_config, spec, t)
    return StudentPlan(spec, config, module_map, pairs)


def _map_layers(module_map: dict[str, str], s_block: str, t_block: str, layers: tuple[int, ...],
                kept: list[tuple[int, ...]], has_attn: bool) -> None:
    module_map[s_block] = t_block  # samplers and anything else of the block, by name
    for j, tl in enumerate(layers):
        module_map[f"{s_block}.resnets.{j}"] = f"{t_block}.resnets.{tl}"
        if has_attn:
            module_map[f"{s_block}.attentions.{j}"] = f"{t_block}.attentions.{tl}"
            for k, tk in enumerate(kept[j]):
                module_map[f"{s_block}.attentions.{j}.transformer_blocks.{k}"] = \
                    f"{t_block}.attentions.{tl}.transformer_blocks.{tk}"


def _default_pairs(student: dict[str, Any], teacher: Mapping[str, Any], spec: StudentSpec,
                   t: BlockLayout) -> list[tuple[str, str]]:
    """Feature-KD pairs: block outputs by index (BK-SDM), the mid block when both have one (segmind).

    With the innermost stage dropped (bk-tiny) the student's last down block has no downsampler, so its
    output has the resolution of the teacher's innermost up block output (after its upsampler): BK-SDM
    pairs those. When their widths differ (possible on other topologies) we fall back to the teacher's last
    layer of the same down block, which always matches.
    """
    n_s = len(student["down_block_types"])
    pairs = []
    for s in range(n_s):
        if spec.drop_innermost_stage and s == n_s - 1:
            t_out = list(teacher["block_out_channels"])
            if t_out[-1] == t_out[-2]:
                pairs.append((f"down_blocks.{s}", "up_blocks.0"))
            else:
                kind = "attentions" if "CrossAttn" in t.down_types[s] else "resnets"
                pairs.append((f"down_blocks.{s}", f"down_blocks.{s}.{kind}.{t.down_layers[s] - 1}"))
        else:
            pairs.append((f"down_blocks.{s}", f"down_blocks.{s}"))
    if student.get("mid_block_type") is not None and teacher.get("mid_block_type", "x") is not None:
        pairs.append(("mid_block", "mid_block"))
    offset = 1 if spec.drop_innermost_stage else 0
    pairs += [(f"up_blocks.{s}", f"up_blocks.{s + offset}") for s in range(n_s)]
    return pairs


def build_student(teacher: UNet2DConditionModel, plan: StudentPlan) -> tuple[UNet2DConditionModel, Coverage]:
    """Instantiate the student on the meta device and fill it from the teacher, tensor by tensor.

    Building on meta and assigning copies means no time or RAM goes into a random initialisation that would
    be overwritten. Tensors that cannot come from the teacher (missing or of another shape) get the module's
    ordinary initialisation and are listed in the coverage report.
    """
    with torch.device("meta"):
        student = UNet2DConditionModel.from_config(plan.config)
    teacher_sd = teacher.state_dict()
    ref = next(iter(teacher_sd.values()))
    new_sd, coverage = {}, Coverage()
    for key, meta in student.state_dict().items():
        coverage.tensors_total += 1
        coverage.params_total += meta.numel()
        src = plan.teacher_key(key)
        tensor = teacher_sd.get(src)
        if tensor is None:
            coverage.not_copied.append(f"{key} (teacher has no {src})")
        elif tensor.shape != meta.shape:
            coverage.not_copied.append(f"{key} (shape {tuple(meta.shape)} != teacher {src} {tuple(tensor.shape)})")
        else:
            new_sd[key] = tensor.detach().clone()
            coverage.tensors_copied += 1
            coverage.params_copied += meta.numel()
    student.load_state_dict(new_sd, strict=False, assign=True)
    _initialise_leftovers(student, ref.device, ref.dtype)
    return student.train(teacher.training), coverage


def _initialise_leftovers(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Give still-meta tensors the module's own initialisation, keeping the module's copied tensors."""
    for module in model.modules():
        own = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        if not any(t.is_meta for t in own.values()):
            continue
        copied = {name: t for name, t in own.items() if not t.is_meta}
        module.to_empty(device=device, recurse=False)
        with torch.no_grad():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            else:  # no initialiser of its own: start from zero rather than uninitialised memory
                for t in own:
                    getattr(module, t).zero_()
            module.to(dtype)
            for name, t in copied.items():
                getattr(module, name).copy_(t)


def verify_pairs(plan: StudentPlan, teacher_config: Mapping[str, Any], resolution: int = 256) -> None:
    """Every KD pair names existing modules whose outputs have the same shape (checked on the meta device); an
    attention-map pair (`name:probs`, kd.PROBS) names attention layers over the same number of queries."""
    from distill_sd.kd import PROBS
    from distill_sd.measure import meta_unet, output_shapes

    teacher, student = meta_unet(clean_config(teacher_config)), meta_unet(plan.config)
    for side, model, names in (("student", student, [s for s, _ in plan.kd_pairs]),
                               ("teacher", teacher, [t for _, t in plan.kd_pairs])):
        known = dict(model.named_modules())
        for n in names:
            module = known.get(n.removesuffix(PROBS))
            if module is None:
                raise UserError(f"KD pair names {side} module '{n}', which does not exist; top-level blocks are "
                                "down_blocks.N, mid_block, up_blocks.N")
            if n.endswith(PROBS) and not hasattr(module, "get_attention_scores"):
                raise UserError(f"KD pair names {side} '{n}': '{PROBS}' needs an attention layer (…attn1, …attn2)")
    s_shapes = output_shapes(student, [s.removesuffix(PROBS) for s, _ in plan.kd_pairs], resolution)
    t_shapes = output_shapes(teacher, [t.removesuffix(PROBS) for _, t in plan.kd_pairs], resolution)
    for s, t in plan.kd_pairs:
        if s.endswith(PROBS) != t.endswith(PROBS):
            raise UserError(f"KD pair {s} <- {t}: pair attention maps ('{PROBS}') with attention maps")
        s_shape, t_shape = s_shapes[s.removesuffix(PROBS)], t_shapes[t.removesuffix(PROBS)]
        if s.endswith(PROBS):  # [batch, queries, keys]: the queries must match; the keys are the same text
            s_shape, t_shape = s_shape[:2], t_shape[:2]
        if s_shape != t_shape:
            raise UserError(f"KD pair {s} <- {t}: output shapes differ ({s_shape} vs {t_shape}); "
                            "pair modules of equal width and resolution")
