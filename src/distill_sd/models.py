"""Models in and out: load teachers (directory, hub id, single file), describe pipelines, save students.

Students are saved as complete diffusers pipelines (the teacher's tokenizer(s), text encoder(s), VAE and
scheduler with the student U-Net), atomically, with a model card (README.md) and `distill_sd.json`
(spec, teacher, coverage, KD pairs) so training can pick a pre-built student up as is.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel

from distill_sd import __version__
from distill_sd.errors import UserError
from distill_sd.measure import block_layout, count_macs, count_params, meta_unet
from distill_sd.reference import ARCH_SPECS, ARCHS, text_encoder_configs, unet_config, vae_config

METADATA_FILE = "distill_sd.json"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def arch_of(config: dict[str, Any]) -> str:
    """'sdxl', 'sd2', 'sd1', or for other widths 'sd-like' / 'custom', read from a U-Net config."""
    from distill_sd.surgery import unet_topology

    if config.get("addition_embed_type") == "text_time":
        return "sdxl"
    known = {1024: "sd2", 768: "sd1"}.get(config.get("cross_attention_dim"))
    return known or ("sd-like" if unet_topology(config) == "sd" else "custom")


def check_new_output_dir(out: Path) -> None:
    """Outputs never overwrite: an existing non-empty directory is an error before any work starts."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output '{out}' already exists and is not empty; choose a new path or remove it first")


@contextmanager
def new_output_dir(out: Path) -> Iterator[Path]:
    """A hidden temp folder beside `out`, renamed to `out` only when the block completes.

    A crash or kill mid-write leaves at most a hidden `.out-*` folder, never a half-written `out`.
    """
    check_new_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # check_new_output_dir guaranteed it is empty
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass
class Teacher:
    pipeline: DiffusionPipeline
    source: str
    arch: str  # sd1 | sd2 | sdxl | custom

    @property
    def unet(self) -> UNet2DConditionModel:
        return self.pipeline.unet


def load_teacher(source: str | os.PathLike, *, allow_pickle: bool = False, dtype: torch.dtype = torch.float32,
                 ) -> Teacher:
    """A teacher pipeline from a diffusers directory, a hub id, or a single .safetensors (.ckpt with allow_pickle)."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        pipe = _load_pipeline_dir(path, dtype)
    elif path.is_file():
        pipe = _load_single_file(path, allow_pickle, dtype)
    elif _looks_like_hub_id(text):
        pipe = _load_hub(text, dtype)
    else:
        raise UserError(f"'{text}' not found: give a diffusers pipeline directory, a .safetensors file "
                        "or a hub id (org/name)")
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, UNet2DConditionModel):
        raise UserError(f"'{text}' is a {type(pipe).__name__} without a UNet2DConditionModel; distill-sd needs a "
                        "U-Net text-to-image pipeline (SD-1.x, SD-2.x, SDXL or a fine-tune of them)")
    return Teacher(pipe, text, arch_of(dict(unet.config)))


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def _load_pipeline_dir(path: Path, dtype: torch.dtype) -> DiffusionPipeline:
    index = path / "model_index.json"
    if not index.is_file():
        hint = " (this looks like a single model folder; give the pipeline folder above it)" if (
            path / "config.json").is_file() else ""
        raise UserError(f"'{path}' is not a diffusers pipeline directory: no model_index.json{hint}")
    extra = {}
    if "safety_checker" in json.loads(index.read_text()):
        extra = {"safety_checker": None, "requires_safety_checker": False}
    try:
        return DiffusionPipeline.from_pretrained(path, dtype=dtype, **extra)
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise UserError(f"could not load the pipeline in '{path}': {_one_line(e)}") from None


def _load_hub(repo_id: str, dtype: torch.dtype) -> DiffusionPipeline:
    try:
        return DiffusionPipeline.from_pretrained(repo_id, dtype=dtype)
    except Exception as e:  # offline, unknown repo, gated: all reach the user as one line
        raise UserError(f"could not load '{repo_id}' from the Hugging Face hub (offline or no such repo?): "
                        f"{_one_line(e)}") from None


def _load_single_file(path: Path, allow_pickle: bool, dtype: torch.dtype) -> DiffusionPipeline:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise UserError(f"'{path.name}' is a pickle checkpoint, which can run arbitrary code when loaded; "
                        "convert it to .safetensors, or pass --allow-pickle if you trust its source")
    if suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES:
        raise UserError(f"'{path.name}': unsupported checkpoint type '{suffix}'; give a .safetensors file "
                        "or a diffusers directory")
    arch = single_file_arch(path)
    config_dir = reference_config_dir(arch)
    cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    try:
        return cls.from_single_file(str(path), config=str(config_dir), local_files_only=True, dtype=dtype)
    except Exception as e:
        raise UserError(f"could not convert '{path.name}' ({arch} layout): {_one_line(e)}") from None


def single_file_arch(path: Path) -> str:
    """sd15 / sd21 / sdxl from the key names of an original (LDM-format) checkpoint."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
        except Exception as e:
            raise UserError(f"'{path.name}' is not a readable safetensors file: {_one_line(e)}") from None
    else:
        sd = torch.load(path, map_location="meta", weights_only=False)
        keys = list(sd.get("state_dict", sd))
    if any(k.startswith("conditioner.embedders.1") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd21"
    if any(k.startswith("cond_stage_model.transformer") for k in keys):
        return "sd15"
    raise UserError(f"'{path.name}' is not an SD-1.x, SD-2.x or SDXL checkpoint (no text-encoder keys found)")


def reference_config_dir(arch: str) -> Path:
    """A weightless diffusers directory (configs + tokenizers) of `arch`, for offline single-file loading."""
    root = Path(os.environ.get("DISTILL_SD_CACHE", Path.home() / ".cache" / "distill-sd")) / "configs" / arch
    if (root / "model_index.json").is_file():
        return root
    from distill_sd.reference import reference_pipeline

    tmp = Path(tempfile.mkdtemp(prefix=f".{arch}-", dir=_ensure(root.parent)))
    pipe = reference_pipeline(arch, narrow=True)
    for name, component in pipe.components.items():  # tokenizers and the scheduler, as they are
        if component is not None and not isinstance(component, torch.nn.Module):
            component.save_pretrained(tmp / name)
    # Full-size model configs (the narrow pipeline only provided tokenizers and the scheduler).
    _write_json(tmp / "unet" / "config.json", dict(unet_config(arch), _class_name="UNet2DConditionModel"))
    _write_json(tmp / "vae" / "config.json", dict(vae_config(arch), _class_name="AutoencoderKL"))
    names = ["text_encoder", "text_encoder_2"]
    for name, (cls_name, cfg) in zip(names, text_encoder_configs(arch)):
        _write_json(tmp / name / "config.json", dict(cfg, architectures=[cls_name], model_type="clip_text_model"))
    pipe.save_config(tmp)
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ------------------------------------------------------------------------------------------ saving

def save_pipeline(pipe: DiffusionPipeline, out: Path, *, unet: UNet2DConditionModel | None = None,
                  card: str | None = None, metadata: dict[str, Any] | None = None) -> Path:
    """Write `pipe` (with `unet` swapped in) to `out` atomically (see `new_output_dir`)."""
    components = dict(pipe.components)
    if unet is not None:
        components["unet"] = unet
    # Rebuilding the pipeline from components re-registers their configs (the student's own config).
    to_save = type(pipe)(**components)
    with new_output_dir(out) as tmp:
        to_save.save_pretrained(tmp, safe_serialization=True)
        if card is not None:
            (tmp / "README.md").write_text(card)
        if metadata is not None:
            write_metadata(tmp, metadata)
    return out


def write_metadata(path: Path, metadata: dict[str, Any]) -> None:
    """What distill-sd records about a model it wrote (distill_sd.json in its folder); `read_metadata` reads it."""
    _write_json(path / METADATA_FILE, metadata)


def read_metadata(path: Path) -> dict[str, Any] | None:
    f = path / METADATA_FILE
    return json.loads(f.read_text()) if f.is_file() else None


# ------------------------------------------------------------------------------------------ describing

@dataclass
class Description:
    name: str
    arch: str
    unet_config: dict[str, Any]
    components: dict[str, int]  # component -> params (models only)
    resolution: int

    @property
    def unet_params(self) -> int:
        return self.components["unet"]

    def unet_macs(self) -> int:
        return count_macs(meta_unet(self.unet_config), self.resolution)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.name, "arch": self.arch, "resolution": self.resolution,
                "unet_params": self.unet_params, "unet_macs": self.unet_macs(),
                "pipeline_params": sum(self.components.values()), "components": self.components,
                "blocks": block_layout(meta_unet(self.unet_config))}


def describe(model: str, resolution: int | None = None) -> Description:
    """Counts of a pipeline dir, a U-Net dir or a reference arch name, from configs on the meta device."""
    if model in ARCHS:
        return _describe_reference(model, resolution)
    path = Path(model).expanduser()
    if not path.exists():
        raise UserError(f"model '{model}' not found: give a pipeline or U-Net directory, or one of {', '.join(ARCHS)}")
    if (path / "model_index.json").is_file():
        index = json.loads((path / "model_index.json").read_text())
        components = {}
        for name, entry in index.items():
            if name.startswith("_") or not isinstance(entry, list) or entry[0] is None:
                continue
            n = _meta_params(path / name, *entry)
            if n is not None:
                components[name] = n
        if "unet" not in components:
            raise UserError(f"'{model}' has no U-Net (model_index.json lists {sorted(components)})")
        config = json.loads((path / "unet" / "config.json").read_text())
    elif (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        if config.get("_class_name") != "UNet2DConditionModel":
            raise UserError(f"'{model}' holds a {config.get('_class_name', 'unknown model')}, not a U-Net")
        components = {"unet": count_params(meta_unet(config))}
    else:
        raise UserError(f"'{model}' is neither a diffusers pipeline (model_index.json) nor a U-Net (config.json)")
    arch = arch_of(config)
    default_res = {"sdxl": 1024}.get(arch, config.get("sample_size", 64) * 8)
    return Description(str(model), arch, config, components, resolution or default_res)


def _describe_reference(arch: str, resolution: int | None) -> Description:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        components = {"unet": count_params(meta_unet(unet_config(arch))),
                      "vae": count_params(AutoencoderKL.from_config(vae_config(arch)))}
        for name, (cls_name, cfg) in zip(["text_encoder", "text_encoder_2"], text_encoder_configs(arch)):
            cls = CLIPTextModelWithProjection if cls_name == "CLIPTextModelWithProjection" else CLIPTextModel
            components[name] = count_params(cls(CLIPTextConfig(**cfg)))
    return Description(arch, arch, unet_config(arch), components, resolution or ARCH_SPECS[arch]["resolution"])


def _meta_params(folder: Path, library: str, class_name: str) -> int | None:
    """Parameters of one pipeline component, instantiated from its config on the meta device."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None  # schedulers, tokenizers, feature extractors: no parameters
    try:
        cls = getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError):
        return None
    with torch.device("meta"):
        if hasattr(cls, "from_config") and hasattr(cls, "load_config"):  # diffusers ModelMixin
            model = cls.from_config(cls.load_config(folder))
        elif hasattr(cls, "config_class"):  # transformers PreTrainedModel
            model = cls(cls.config_class.from_pretrained(folder))
        else:
            return None
    return count_params(model)


# ------------------------------------------------------------------------------------------ students

def default_resolution(config: dict[str, Any]) -> int:
    """The resolution a U-Net was trained at: SDXL 1024, otherwise sample_size x 8 (SD-1.5 512, SD-2.1 768)."""
    return 1024 if arch_of(config) == "sdxl" else int(config.get("sample_size", 64)) * 8


def student_metadata(teacher: Teacher, plan: Any, unet: UNet2DConditionModel, coverage: Any,
                     **extra: Any) -> dict[str, Any]:
    """What a student directory records about itself (distill_sd.json and the model card)."""
    from distill_sd.students import spec_to_dict

    t_cfg = dict(teacher.unet.config)
    res = default_resolution(t_cfg)
    return {
        "distill_sd_version": __version__, "teacher": teacher.source, "teacher_arch": teacher.arch,
        "student": plan.spec.name, "spec": spec_to_dict(plan.spec), "kd_pairs": [list(p) for p in plan.kd_pairs],
        "resolution": res,
        "teacher_unet_params": count_params(teacher.unet), "student_unet_params": count_params(unet),
        "teacher_unet_macs": count_macs(meta_unet(t_cfg), res),
        "student_unet_macs": count_macs(meta_unet(plan.config), res),
        "coverage": coverage.as_dict() if coverage is not None else None, **extra,
    }


def model_card(meta: dict[str, Any]) -> str:
    """A Hugging Face model card (README.md) for a student pipeline."""
    tp, sp = meta["teacher_unet_params"], meta["student_unet_params"]
    tm, sm = meta["teacher_unet_macs"], meta["student_unet_macs"]
    base = f"base_model: {meta['teacher']}\n" if _looks_like_hub_id(meta["teacher"]) else ""
    cov = meta.get("coverage")
    cov_line = (f"Initialised from the teacher: {cov['tensors_copied']}/{cov['tensors_total']} tensors, "
                f"{100 * cov['fraction']:.2f}% of parameters." if cov else "")
    training = meta.get("training")
    train_lines = ""
    if training:
        train_lines = "\n## Training\n\n" + "\n".join(f"- {k}: {v}" for k, v in training.items()) + "\n"
    return f"""---
library_name: diffusers
pipeline_tag: text-to-image
{base}tags:
- stable-diffusion
- text-to-image
- knowledge-distillation
- distill-sd
---

# {meta['student']} student of `{meta['teacher']}`

Block-removed U-Net ({meta['spec']['summary']}) built by distill-sd {meta['distill_sd_version']}.
Recipe source: {meta['spec']['source']}.

| U-Net | teacher | student | student / teacher |
|---|---|---|---|
| parameters | {tp:,} | {sp:,} | {sp / tp:.3f} |
| MACs per forward at {meta['resolution']} px | {tm / 1e9:.1f} G | {sm / 1e9:.1f} G | {sm / tm:.3f} |

{cov_line}
Feature-distillation pairs (student module <- teacher module): {', '.join(f'{s} <- {t}' for s, t in meta['kd_pairs'])}.
{train_lines}
## Use

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("path/to/this/folder")
image = pipe("a photo of an astronaut riding a horse").images[0]
```

The U-Net is a plain `UNet2DConditionModel` whose config.json describes it exactly: it loads in stock diffusers
and tools that read diffusers folders, with no code from distill-sd.
"""


def save_student(teacher: Teacher, plan: Any, unet: UNet2DConditionModel, coverage: Any, out: Path,
                 **extra: Any) -> dict[str, Any]:
    """Write the student as a complete pipeline with the teacher's other components, card and metadata."""
    meta = student_metadata(teacher, plan, unet, coverage, **extra)
    save_pipeline(teacher.pipeline, out, unet=unet, card=model_card(meta), metadata=meta)
    return meta
