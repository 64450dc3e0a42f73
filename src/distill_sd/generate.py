"""Run a pipeline: device/dtype choice, schedulers by short name, the fast CPU path, PNGs with their parameters.

The fast CPU path (what measured faster here, see benchmarks/README.md): weights *stored* in bfloat16 (not
autocast over fp32 weights) on CPUs with AMX or AVX-512-BF16, channels-last memory format for the convolutions,
PyTorch's fused scaled-dot-product attention (diffusers' default processor), and libgomp's passive wait policy
(set by the CLI). `torch.compile` is optional (`--compile`): it costs minutes of compilation up front.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from distill_sd.errors import UserError

SCHEDULERS = {
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_bf16() -> bool:
    """AMX or AVX-512-BF16: bf16 matmuls run natively instead of being emulated (then bf16 would be slower)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else torch.float32
    if name not in DTYPES:
        raise UserError(f"--dtype must be auto, {', '.join(DTYPES)}; got {name}")
    return DTYPES[name]


def set_scheduler(pipe: Any, name: str) -> None:
    import diffusers

    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler '{name}'; choose one of {', '.join(SCHEDULERS)}")
    cls_name, extra = SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)


def load_pipeline(model: str, *, device: str = "auto", dtype: str = "auto", scheduler: str | None = "dpm++",
                  lora: str | None = None, compile: bool = False, allow_pickle: bool = False,
                  fast: bool = True) -> Any:
    """A ready-to-run pipeline: loaded, LoRA fused, cast, laid out and placed for fast inference. An exported
    folder (`distill-sd export`) runs on ONNX Runtime / OpenVINO on the CPU, in the precision it was exported in.
    `fast=False` keeps the weights as loaded (fp32, default layout and attention, on the CPU): evaluation draws with
    it, so its figures repeat whatever the fast path's kernels do."""
    from distill_sd.export import ExportedPipeline, is_export_dir
    from distill_sd.models import load_teacher

    if is_export_dir(model):
        refused = [flag for flag, ok in (("--device", device in ("auto", "cpu")), ("--dtype", dtype in ("auto", "fp32")),
                                         ("--lora", lora is None), ("--compile", not compile)) if not ok]
        if refused:
            raise UserError(f"'{model}' is an exported model, which runs on the CPU as it was exported: "
                            f"{', '.join(refused)} cannot change that (export the pipeline again instead)")
        pipe = ExportedPipeline.load(model, scheduler=scheduler or "dpm++")
        pipe.set_progress_bar_config(leave=False)
        return pipe
    if fast:  # a device or dtype this machine lacks is refused before the load
        dev = pick_device(device)
        dt = pick_dtype(dtype, dev)
    pipe = load_teacher(model, allow_pickle=allow_pickle).pipeline
    if scheduler is not None:
        set_scheduler(pipe, scheduler)
    if lora is not None:
        fuse_lora(pipe, lora)
    if fast:
        optimize(pipe, dev, dt, compile=compile)
    return pipe


def fuse_lora(pipe: Any, lora: str | Path) -> None:
    """Merge a diffusers-format LoRA (file or folder, such as `distill-sd lora`'s OUT/final) into the weights, then
    drop the adapter modules: a plain pipeline again (as fast as the base, same parameter count)."""
    if not Path(lora).exists():
        raise UserError(f"--lora '{lora}' not found")
    try:
        pipe.load_lora_weights(str(lora))
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # after fuse_lora: keeps the merged weights
    except Exception as e:  # wrong base model, not a LoRA file, ...
        raise UserError(f"could not apply LoRA '{lora}': {str(e).splitlines()[0]}") from None


def optimize(pipe: Any, device: torch.device, dtype: torch.dtype, compile: bool = False) -> Any:
    """Weights in `dtype` (stored, not autocast), channels-last U-Net and VAE, SDPA attention, optional compile."""
    pipe.to(device=device, dtype=dtype)
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    if getattr(pipe.vae.config, "force_upcast", False) and dtype == torch.float16:
        pipe.vae.to(torch.float32)  # SDXL's VAE overflows in fp16 (bf16 has fp32's range)
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe.unet.set_attn_processor(AttnProcessor2_0())
    if compile:
        pipe.unet = torch.compile(pipe.unet)
    pipe.set_progress_bar_config(disable=False, leave=False)
    return pipe


@dataclass
class GenerationParams:
    prompt: str
    negative_prompt: str | None
    steps: int
    guidance: float
    seed: int
    height: int
    width: int
    scheduler: str
    model: str

    def check(self) -> None:
        if not self.prompt.strip():
            raise UserError("the prompt is empty")
        if not 1 <= self.steps <= 500:
            raise UserError(f"steps must be between 1 and 500, got {self.steps}")
        if not 0 <= self.guidance <= 50:
            raise UserError(f"guidance must be between 0 and 50, got {self.guidance}")
        for side, v in (("height", self.height), ("width", self.width)):
            if v <= 0 or v % 8:
                raise UserError(f"{side} must be a positive multiple of 8, got {v}")


def default_size(pipe: Any) -> int:
    from distill_sd.export import ExportedPipeline

    if isinstance(pipe, ExportedPipeline):
        return pipe.default_size
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


def generate(pipe: Any, params: GenerationParams, num_images: int = 1) -> tuple[list[Any], float]:
    """Images for one prompt (seeds seed, seed+1, ...) and the seconds they took."""
    params.check()
    generators = [torch.Generator("cpu").manual_seed(params.seed + i) for i in range(num_images)]
    start = time.perf_counter()
    images = pipe(params.prompt, negative_prompt=params.negative_prompt, num_inference_steps=params.steps,
                  guidance_scale=params.guidance, height=params.height, width=params.width,
                  num_images_per_prompt=num_images, generator=generators).images
    return images, time.perf_counter() - start


def save_png(image: Any, path: Path, params: GenerationParams, seed: int) -> Path:
    """PNG with the generation parameters in a text chunk ("parameters", JSON), like other SD tools."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", json.dumps({**asdict(params), "seed": seed}))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)
    return path
