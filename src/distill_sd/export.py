"""Export a pipeline (teacher or student) to ONNX or OpenVINO, and run the exported model without PyTorch modules.

`export_pipeline` writes, atomically (a temp dir renamed into place at the end):

    out/text_encoder/model.onnx   input_ids [batch, 77] int64 -> last_hidden_state [batch, 77, dim]
    out/unet/model.onnx           sample [batch, 4, h, w], timestep [batch] float32,
                                  encoder_hidden_states [batch, 77, dim] -> noise_pred [batch, 4, h, w]
    out/vae_decoder/model.onnx    latent_sample [batch, 4, h, w] (latents / scaling factor)
                                  -> sample [batch, 3, 8h, 8w] in [-1, 1]
    out/tokenizer/, out/scheduler/  copied from the pipeline
    out/distill_sd_export.json    format, source, shapes, VAE scaling factor, ...

(`--format openvino`: `model.xml` + `model.bin` per component instead, converted from the ONNX files.)
A model over 2 GB (the protobuf limit, e.g. a full SD-1.5 U-Net in fp32) keeps its weights next to it in
one `model.onnx.data` file.

The exporter is PyTorch's TorchScript-based one (`dynamo=False`): on diffusers' U-Net it exports in seconds with
dynamic batch and spatial axes and matches PyTorch to ~1e-6, while the torch.export-based one took 70 s on
the narrow test U-Net, specialised the spatial axes on small inputs and, at opset 17, wrote an invalid graph.

`ExportedPipeline` is the standard Stable Diffusion sampling loop (classifier-free guidance, any scheduler
of `distill_sd.generate.SCHEDULERS`) over ONNX Runtime or OpenVINO sessions. For the same seed it starts
from the same latents as the PyTorch pipeline, so images agree up to float rounding (`compare_outputs`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from distill_sd import __version__
from distill_sd.errors import UserError

FORMATS = ("onnx", "openvino")
DTYPES = ("fp32", "int8")  # int8: the U-Net quantized (weights and activations), the rest kept in fp32
# int8 U-Net: static post-training quantization in ONNX's QDQ form (per-channel int8 weights, uint8 activations
# with ranges calibrated on the U-Net's own inputs while it draws the calibration prompts). Only the
# convolutions: the attention projections and feed-forwards stay fp32 (the quality cost is measured on the shapes
# teacher in the README; quantizing more ops is not measured yet).
INT8_OPS = ("Conv",)
CALIBRATION_PROMPTS = (
    "a photo of an astronaut riding a horse on mars", "a red sports car parked on a wet street at night",
    "a bowl of fruit on a wooden table, oil painting", "portrait of an old man with a beard, studio lighting",
    "a small cabin in a snowy forest", "a cat sleeping on a windowsill", "a city skyline at sunset",
    "an illustration of a dragon flying over mountains",
)
COMPONENTS = ("text_encoder", "unet", "vae_decoder")
METADATA_FILE = "distill_sd_export.json"
MIN_OPSET, MAX_OPSET = 14, 20  # 14: scaled_dot_product_attention; 20: the TorchScript exporter's newest
ONNX_LIMIT = 2**31 - 2**26  # protobuf's 2 GiB, with room for the graph itself
# compare_outputs' pass marks per runtime precision: (components: max abs diff <= tol * max(1, max |reference|);
# images: mean abs diff in uint8 levels). fp32 measured ~1e-6 and 0-0.001 levels on the narrow test models;
# bf16 (OpenVINO on AMX) measured ~5e-2 relative and 0.6 levels there: its marks are a loose sanity bound.
# int8 (a U-Net quantized with `dtype="int8"`): a loose bound, the check is that nothing broke (a wrong scale is off
# by ~100 %). Measured: the shapes teacher's U-Net 0.11 relative max error (0.01 mean), its 20-step image 0.6 levels;
# the narrow random-weight test U-Net 0.22 (0.05 mean), 4.9 levels. What int8 costs in quality is measured by
# accuracy instead: `distill-sd evaluate TEACHER EXPORT` (README).
TOLERANCES = {"fp32": (1e-3, 2.0), "bf16": (1e-1, 8.0), "int8": (2.5e-1, 8.0)}
INSTALL_HINT = {"onnx": "pip install 'distill-sd[export]'  (onnx, onnxruntime)",
                "openvino": "pip install openvino  (and 'distill-sd[export]' for onnx)"}


# ------------------------------------------------------------------------------------------ helpers

def physical_cores() -> int:
    """Physical cores this process may run on (hyperthreads only slow ONNX Runtime's intra-op threads)."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = os.cpu_count() or 1
    cores, current = set(), {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("physical id", "core id"):
                current[key] = value.strip()
            elif not line.strip() and current:
                cores.add((current.get("physical id"), current.get("core id")))
                current = {}
        if current:
            cores.add((current.get("physical id"), current.get("core id")))
    except OSError:
        pass
    return max(1, min(allowed, len(cores) or allowed))


def _require(module: str, fmt: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"--format {fmt} needs the '{module}' package, which is not installed: "
                        f"{INSTALL_HINT[fmt]}") from None


def _check_args(fmt: str, opset: int, dtype: str) -> None:
    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise UserError(f"export dtype '{dtype}' is not supported; choose {' or '.join(DTYPES)} (ONNX Runtime's CPU "
                        "kernels have no fp16/bf16 convolutions; for bf16 run an OpenVINO export with precision bf16)")
    if not MIN_OPSET <= int(opset) <= MAX_OPSET:
        raise UserError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET}, got {opset}")


class _TextEncoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, return_dict=False)[0]


class _UNet(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.model(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class _VaeDecoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latent_sample, return_dict=False)[0]


def _check_pipeline(pipe: Any, model: str) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if isinstance(pipe, StableDiffusionXLPipeline):
        raise UserError(f"'{model}' is an SDXL pipeline: export of SDXL is not yet supported (SD-1.x and SD-2.x "
                        "pipelines and their students are)")
    if not isinstance(pipe, StableDiffusionPipeline):
        raise UserError(f"'{model}' is a {type(pipe).__name__}; export supports StableDiffusionPipeline "
                        "(SD-1.x, SD-2.x and their students)")
    cfg = pipe.unet.config
    unsupported = [k for k in ("addition_embed_type", "class_embed_type", "time_cond_proj_dim", "encoder_hid_dim")
                   if cfg.get(k) is not None]
    if unsupported:
        raise UserError(f"'{model}': U-Nets with {', '.join(unsupported)} set are not supported by export")


def latent_multiple(meta: dict[str, Any]) -> int:
    """Height and width must be multiples of this many pixels (traced U-Nets cannot resize odd skip inputs)."""
    return int(meta["vae_scale_factor"]) * 2 ** int(meta["unet_num_upsamplers"])


# ------------------------------------------------------------------------------------------ export

def export_pipeline(model: str, out: Path, fmt: str = "onnx", opset: int = 17, dtype: str = "fp32",
                    calibration_prompts: Sequence[str] | None = None, calibration_steps: int = 10,
                    calibration_size: int | None = None) -> Path:
    """Export text encoder, U-Net and VAE decoder of an SD-1/SD-2 pipeline (teacher or student) to `out`.
    `dtype="int8"` quantizes the U-Net, calibrated on `calibration_prompts` (default CALIBRATION_PROMPTS) drawn
    with `calibration_steps` DPM++ steps at `calibration_size` pixels (default: the model's size)."""
    from distill_sd.generate import default_size
    from distill_sd.models import check_new_output_dir, load_teacher, new_output_dir, read_metadata

    out = Path(out)
    _check_args(fmt, opset, dtype)
    check_new_output_dir(out)
    _require("onnx", fmt)
    if fmt == "openvino":
        _require("openvino", fmt)
    teacher = load_teacher(model)
    pipe = teacher.pipeline
    _check_pipeline(pipe, model)
    for m in (pipe.text_encoder, pipe.unet, pipe.vae):
        m.eval()  # load_teacher gives fp32 weights

    if dtype == "int8":
        _require("onnxruntime", fmt)
        if calibration_steps < 1:
            raise UserError(f"calibration steps must be at least 1, got {calibration_steps}")
        prompts = [p for p in (calibration_prompts or CALIBRATION_PROMPTS) if p.strip()]
        if not prompts:
            raise UserError("the calibration prompts are empty; give at least one prompt (one per line)")
        calibration = _calibration_inputs(pipe, prompts, calibration_steps, calibration_size)

    with new_output_dir(out) as tmp:
        shapes = _export_components(pipe, tmp, int(opset))
        quantization = None
        if dtype == "int8":
            quantization = _quantize_unet(tmp / "unet", calibration)
            quantization.update(prompts=len(prompts), steps=int(calibration_steps),
                                size=calibration_size or default_size(pipe))
        pipe.unet.save_config(tmp / "unet")  # the U-Net's identity: parameter and MAC counts read it
        pipe.tokenizer.save_pretrained(tmp / "tokenizer")
        pipe.scheduler.save_pretrained(tmp / "scheduler")
        if fmt == "openvino":
            _convert_openvino(tmp)
        path = Path(str(model)).expanduser()
        student = read_metadata(path) if path.is_dir() else None
        unet_cfg = pipe.unet.config
        meta = {
            "distill_sd_version": __version__, "format": fmt, "dtype": dtype, "opset": int(opset),
            "exporter": "torch.onnx (TorchScript)", "torch_version": torch.__version__,
            "source": str(model), "arch": teacher.arch, "pipeline_class": type(pipe).__name__,
            "files": {c: f"{c}/model.{'xml' if fmt == 'openvino' else 'onnx'}" for c in COMPONENTS},
            "shapes": shapes,
            "vae_scaling_factor": float(pipe.vae.config.scaling_factor),
            "vae_shift_factor": pipe.vae.config.get("shift_factor"),
            "vae_scale_factor": int(pipe.vae_scale_factor),
            "unet_sample_size": int(unet_cfg.sample_size),
            "unet_in_channels": int(unet_cfg.in_channels),
            "unet_num_upsamplers": int(pipe.unet.num_upsamplers),
            "tokenizer_max_length": int(pipe.tokenizer.model_max_length),
            "prediction_type": pipe.scheduler.config.get("prediction_type", "epsilon"),
            "default_size": default_size(pipe),
            "student": student.get("student") if student else None,
            "quantization": quantization,
        }
        meta["size_multiple"] = latent_multiple(meta)
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _calibration_inputs(pipe: Any, prompts: list[str], steps: int, size: int | None) -> list[dict[str, np.ndarray]]:
    """The U-Net's inputs at every step while the PyTorch pipeline draws `prompts` (guidance 7.5, so each input is
    the conditional and unconditional pair, as at inference), seed i for prompt i: what int8 ranges are set on."""
    from distill_sd.generate import default_size, set_scheduler

    seen: list[dict[str, np.ndarray]] = []

    def record(module: Any, args: tuple, kwargs: dict) -> None:
        sample = args[0]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        seen.append({"sample": sample.float().numpy(),
                     "timestep": np.full((sample.shape[0],), float(timestep), dtype=np.float32),
                     "encoder_hidden_states": kwargs["encoder_hidden_states"].float().numpy()})

    set_scheduler(pipe, "dpm++")
    pipe.set_progress_bar_config(disable=True)
    size = int(size or default_size(pipe))
    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            for i, prompt in enumerate(tqdm(prompts, desc="calibrating int8 (PyTorch fp32)", unit="prompt")):
                pipe(prompt, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                     generator=torch.Generator("cpu").manual_seed(i))
    finally:
        handle.remove()
    return seen


def _quantize_unet(folder: Path, calibration: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Replace folder/model.onnx by its int8 (QDQ) form, calibrated on `calibration` (min/max of every tensor)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(tqdm(calibration, desc="int8 ranges (ONNX Runtime)", unit="input", leave=False))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    src = folder / "model.onnx"
    scratch = folder / "scratch"
    scratch.mkdir()
    level = logging.getLogger().level
    try:
        for f in ("model.onnx", "model.onnx.data"):
            if (folder / f).exists():
                (folder / f).rename(scratch / f)
        big = (scratch / "model.onnx.data").exists()
        logging.getLogger().setLevel(logging.ERROR)  # ORT's advice on the root logger to pre-process first
        quantize_static(str(scratch / "model.onnx"), str(src), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(INT8_OPS), use_external_data_format=big)
        # No CalibMaxIntermediateOutputs: in onnxruntime 1.31 reaching that count discards the collected inputs
        # instead of merging their ranges. Not needed either: per input, MinMax keeps one min and max per tensor.
    finally:
        logging.getLogger().setLevel(level)
        shutil.rmtree(scratch, ignore_errors=True)
    return {"components": ["unet"], "method": "static, QDQ, per-channel int8 weights, uint8 activations (min/max)",
            "ops": list(INT8_OPS), "calibration_inputs": len(calibration)}


def _export_components(pipe: Any, root: Path, opset: int) -> dict[str, Any]:
    """Trace the three models on small example inputs; batch and spatial axes stay dynamic."""
    max_len = int(pipe.tokenizer.model_max_length)
    text_dim = int(pipe.text_encoder.config.hidden_size)
    unet = pipe.unet
    ch = int(unet.config.in_channels)
    side = 2 ** int(unet.num_upsamplers) * 2  # smallest latent side that exercises every down/upsample with >1 px
    ids = pipe.tokenizer(["a photo", ""], padding="max_length", max_length=max_len, truncation=True,
                         return_tensors="pt").input_ids
    specs = {
        "text_encoder": (_TextEncoder(pipe.text_encoder), (ids,), ["input_ids"], ["last_hidden_state"],
                         {"input_ids": {0: "batch"}, "last_hidden_state": {0: "batch"}}),
        "unet": (_UNet(unet), (torch.randn(2, ch, side, side), torch.tensor([999.0, 500.0]),
                               torch.randn(2, max_len, int(unet.config.cross_attention_dim))),
                 ["sample", "timestep", "encoder_hidden_states"], ["noise_pred"],
                 {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
                  "encoder_hidden_states": {0: "batch"}, "noise_pred": {0: "batch", 2: "height", 3: "width"}}),
        "vae_decoder": (_VaeDecoder(pipe.vae), (torch.randn(1, int(pipe.vae.config.latent_channels), side, side),),
                        ["latent_sample"], ["sample"],
                        {"latent_sample": {0: "batch", 2: "height", 3: "width"},
                         "sample": {0: "batch", 2: "image_height", 3: "image_width"}}),
    }
    if text_dim != unet.config.cross_attention_dim:
        raise UserError(f"text encoder width {text_dim} != U-Net cross_attention_dim {unet.config.cross_attention_dim}")
    shapes = {}
    for name, (module, args, inputs, outputs, axes) in specs.items():
        with torch.no_grad():
            result = module(*args)
        _export_onnx(module, args, inputs, outputs, axes, root / name, opset)

        def symbolic(t: torch.Tensor, names: dict[int, str]) -> list[Any]:
            return [names.get(i, int(n)) for i, n in enumerate(t.shape)]

        shapes[name] = {
            "inputs": {n: {"shape": symbolic(a, axes.get(n, {})), "dtype": str(a.dtype).removeprefix("torch.")}
                       for n, a in zip(inputs, args)},
            "outputs": {outputs[0]: {"shape": symbolic(result, axes.get(outputs[0], {})), "dtype": "float32"}},
        }
    # The U-Net's timestep: float32 so that fractional (Euler-style) timesteps pass through unchanged.
    return shapes


def _export_onnx(module: torch.nn.Module, args: tuple[torch.Tensor, ...], inputs: list[str], outputs: list[str],
                 axes: dict[str, dict[int, str]], folder: Path, opset: int) -> None:
    import warnings

    import onnx

    folder.mkdir(parents=True)
    scratch = folder / "scratch"
    scratch.mkdir()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about shape checks that are constant for SD U-Nets
            torch.onnx.export(module, args, str(scratch / "model.onnx"), dynamo=False, opset_version=opset,
                              input_names=inputs, output_names=outputs, dynamic_axes=axes, do_constant_folding=True)
        proto = onnx.load(str(scratch / "model.onnx"))  # loads external tensors too, if the exporter split them
        big = sum(len(t.raw_data) for t in proto.graph.initializer) > ONNX_LIMIT
        onnx.save_model(proto, str(folder / "model.onnx"), save_as_external_data=big, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _convert_openvino(root: Path) -> None:
    """ONNX -> OpenVINO IR (model.xml + model.bin) per component, weights kept in fp32."""
    import openvino as ov

    for name in COMPONENTS:
        folder = root / name
        model = ov.convert_model(str(folder / "model.onnx"))
        ov.save_model(model, str(folder / "model.xml"), compress_to_fp16=False)
        del model
        for f in ("model.onnx", "model.onnx.data"):
            (folder / f).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ running

class _OrtModel:
    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Like OMP_WAIT_POLICY=PASSIVE: idle worker threads sleep instead of spinning on shared cores.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])

    def __call__(self, **inputs: np.ndarray) -> np.ndarray:
        return self.session.run(None, inputs)[0]


class _OpenVinoModel:
    def __init__(self, path: Path, threads: int, precision: str = "fp32") -> None:
        import openvino as ov

        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision]}
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)

    def __call__(self, **inputs: np.ndarray) -> np.ndarray:
        return np.asarray(self.compiled(inputs)[0])


def is_export_dir(path: str | os.PathLike) -> bool:
    """True for a folder written by `export_pipeline` (what `generate` and `evaluate` then run with ONNX Runtime)."""
    return (Path(path).expanduser() / METADATA_FILE).is_file()


def read_export_metadata(path: Path) -> dict[str, Any]:
    path = Path(path)
    f = path / METADATA_FILE
    if not f.is_file():
        raise UserError(f"'{path}' is not an exported model directory (no {METADATA_FILE}); "
                        "make one with `distill-sd export MODEL --out DIR`")
    return json.loads(f.read_text())


class ExportedPipeline:
    """Text-to-image over an exported model directory: ONNX Runtime (or OpenVINO) sessions + a diffusers scheduler."""

    def __init__(self, path: Path, meta: dict[str, Any], tokenizer: Any, scheduler_config: dict[str, Any],
                 models: dict[str, Any], scheduler: str = "dpm++") -> None:
        self.path, self.meta, self.tokenizer = Path(path), meta, tokenizer
        self.scheduler_config = scheduler_config
        self.text_encoder, self.unet, self.vae_decoder = (models[c] for c in COMPONENTS)
        self.set_scheduler(scheduler)
        self._progress: dict[str, Any] = {"disable": True}

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """As diffusers' pipelines: tqdm options for the bar over sampling steps (off until asked for)."""
        self._progress = {"disable": False, **kwargs}

    @classmethod
    def load(cls, path: str | os.PathLike, scheduler: str = "dpm++", threads: int | None = None,
             precision: str = "fp32") -> ExportedPipeline:
        """`precision` matters for OpenVINO only: 'bf16' runs its CPU plugin in bfloat16 (AMX), 'fp32' exactly."""
        from transformers import CLIPTokenizer

        path = Path(path).expanduser()
        meta = read_export_metadata(path)
        fmt = meta.get("format")
        if fmt not in FORMATS:
            raise UserError(f"'{path}': unknown export format '{fmt}' in {METADATA_FILE}")
        if precision not in ("fp32", "bf16") or (precision == "bf16" and fmt != "openvino"):
            raise UserError(f"precision '{precision}' is not available for {fmt} exports (onnx: fp32; openvino: fp32, bf16)")
        threads = threads or physical_cores()
        if fmt == "onnx":
            _require("onnxruntime", "onnx")
            models = {c: _OrtModel(path / meta["files"][c], threads) for c in COMPONENTS}
        else:
            _require("openvino", "openvino")
            models = {c: _OpenVinoModel(path / meta["files"][c], threads, precision) for c in COMPONENTS}
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
        sched_cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        return cls(path, meta, tokenizer, sched_cfg, models, scheduler)

    def set_scheduler(self, name: str) -> None:
        import diffusers

        from distill_sd.generate import SCHEDULERS

        if name not in SCHEDULERS:
            raise UserError(f"unknown scheduler '{name}'; choose one of {', '.join(SCHEDULERS)}")
        cls_name, extra = SCHEDULERS[name]
        self.scheduler = getattr(diffusers, cls_name).from_config(self.scheduler_config, **extra)
        self.scheduler_name = name

    @property
    def default_size(self) -> int:
        return int(self.meta["default_size"])

    @property
    def vae_scale_factor(self) -> int:
        return int(self.meta["vae_scale_factor"])

    @property
    def unet_config(self) -> dict[str, Any]:
        """The exported U-Net's diffusers config (its identity: parameter and MAC counts are computed from it)."""
        from diffusers import UNet2DConditionModel

        if not (self.path / "unet" / "config.json").is_file():
            raise UserError(f"'{self.path}' was exported without its U-Net config (an older distill-sd); export it again")
        return UNet2DConditionModel.load_config(self.path / "unet")

    def encode_prompt(self, prompts: list[str]) -> np.ndarray:
        ids = self.tokenizer(prompts, padding="max_length", max_length=int(self.meta["tokenizer_max_length"]),
                             truncation=True, return_tensors="np").input_ids.astype(np.int64)
        return self.text_encoder(input_ids=ids)

    def predict_noise(self, sample: np.ndarray, timestep: Any, embeds: np.ndarray) -> np.ndarray:
        t = np.full((sample.shape[0],), float(timestep), dtype=np.float32)
        return self.unet(sample=np.ascontiguousarray(sample, dtype=np.float32), timestep=t,
                         encoder_hidden_states=embeds)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents (as sampled) -> images in [-1, 1], NCHW."""
        z = latents / self.meta["vae_scaling_factor"]
        if self.meta.get("vae_shift_factor") is not None:
            z = z + self.meta["vae_shift_factor"]
        return self.vae_decoder(latent_sample=np.ascontiguousarray(z, dtype=np.float32))

    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int = 25, guidance_scale: float = 7.5, height: int | None = None,
                 width: int | None = None, num_images_per_prompt: int = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None) -> Any:
        """diffusers' calling convention (a prompt or a list, one generator or one per image; returns `.images`), so
        code written for a StableDiffusionPipeline runs an export unchanged. The initial noise is drawn as diffusers
        draws it (image i from generator i, or all from one), so for the same generators the images equal the
        PyTorch pipeline's up to float rounding."""
        import inspect

        from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
        from PIL import Image

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * len(prompts)
        if not prompts or len(negatives) != len(prompts):
            raise UserError(f"give one negative prompt per prompt ({len(prompts)} prompts, {len(negatives)} negative)")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        height = int(height or self.default_size)
        width = int(width or self.default_size)
        multiple = latent_multiple(self.meta)
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise UserError(f"height and width must be positive multiples of {multiple} for this exported model, "
                            f"got {height}x{width}")
        if num_inference_steps < 1:
            raise UserError(f"steps must be at least 1, got {num_inference_steps}")
        if isinstance(generator, list) and len(generator) != len(prompts):
            raise UserError(f"got {len(generator)} generators for {len(prompts)} images; give one per image")
        cfg = guidance_scale > 1.0
        embeds = self.encode_prompt(negatives + prompts if cfg else prompts)

        sched = self.scheduler
        sched.set_timesteps(num_inference_steps, device="cpu")
        vsf = self.vae_scale_factor
        shape = (len(prompts), int(self.meta["unet_in_channels"]), height // vsf, width // vsf)
        if isinstance(generator, list):  # as diffusers' randn_tensor: image i from generator i
            latents = torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generator])
        else:
            latents = torch.randn(shape, generator=generator)
        latents = latents * sched.init_noise_sigma
        params = set(inspect.signature(sched.step).parameters)
        extra = {k: v for k, v in (("eta", 0.0), ("generator", generator)) if k in params}
        for t in tqdm(sched.timesteps, **self._progress):
            model_input = torch.cat([latents] * 2) if cfg else latents
            model_input = sched.scale_model_input(model_input, t)
            noise = torch.from_numpy(self.predict_noise(model_input.numpy(), t, embeds))
            if cfg:
                uncond, text = noise.chunk(2)
                noise = uncond + guidance_scale * (text - uncond)
            latents = sched.step(noise, t, latents, **extra, return_dict=False)[0]
        images = to_uint8(self.decode(latents.numpy()))
        return ImagePipelineOutput(images=[Image.fromarray(i) for i in images])


def to_uint8(images: np.ndarray) -> np.ndarray:
    """NCHW in [-1, 1] -> NHWC uint8, exactly as diffusers' VaeImageProcessor.postprocess (denormalize, round)."""
    x = np.clip(images / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    return (x * 255).round().astype("uint8")


# ------------------------------------------------------------------------------------------ checking

def _diff(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    d = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "ref_max_abs": float(np.abs(ref).max())}


def compare_outputs(model: str, exported_dir: str | os.PathLike, *, prompt: str = "a photo of an astronaut",
                    steps: int = 4, guidance_scale: float = 7.5, seed: int = 0, height: int | None = None,
                    width: int | None = None, scheduler: str = "dpm++", precision: str = "fp32") -> dict[str, Any]:
    """Max/mean abs differences, PyTorch fp32 vs the exported model, on the same inputs.

    Components: text encoder (last hidden state), U-Net (noise prediction, batch of 2 at two timesteps),
    VAE decoder (image in [-1, 1]); then a whole generation (`steps` steps, same seed) as uint8 images.
    `passed` applies TOLERANCES[precision]: relative to the reference's scale for the components, mean uint8
    levels for the image.
    """
    from distill_sd.generate import set_scheduler
    from distill_sd.models import load_teacher

    exported = ExportedPipeline.load(exported_dir, scheduler=scheduler, precision=precision)
    pipe = load_teacher(model).pipeline
    _check_pipeline(pipe, model)
    set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    height = int(height or exported.default_size)
    width = int(width or exported.default_size)
    vsf = exported.meta["vae_scale_factor"]
    g = torch.Generator("cpu").manual_seed(seed)
    result: dict[str, Any] = {}
    with torch.no_grad():
        max_len = exported.meta["tokenizer_max_length"]
        ids = pipe.tokenizer([prompt, ""], padding="max_length", max_length=max_len, truncation=True,
                             return_tensors="pt").input_ids
        ref = pipe.text_encoder(ids, return_dict=False)[0]
        result["text_encoder"] = _diff(ref.numpy(), exported.text_encoder(input_ids=ids.numpy()))

        sample = torch.randn(2, pipe.unet.config.in_channels, height // vsf, width // vsf, generator=g)
        t = torch.tensor([999.0, 500.0])
        ref_u = pipe.unet(sample, t, encoder_hidden_states=ref, return_dict=False)[0]
        got_u = exported.unet(sample=sample.numpy(), timestep=t.numpy(), encoder_hidden_states=ref.numpy())
        result["unet"] = _diff(ref_u.numpy(), got_u)

        z = torch.randn(1, pipe.vae.config.latent_channels, height // vsf, width // vsf, generator=g)
        ref_v = pipe.vae.decode(z, return_dict=False)[0]
        result["vae_decoder"] = _diff(ref_v.numpy(), exported.vae_decoder(latent_sample=z.numpy()))

        start = time.perf_counter()
        ref_img = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, height=height, width=width,
                       generator=torch.Generator("cpu").manual_seed(seed)).images[0]
        torch_s = time.perf_counter() - start
        start = time.perf_counter()
        got_img = exported(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, height=height,
                           width=width, generator=torch.Generator("cpu").manual_seed(seed)).images[0]
        exported_s = time.perf_counter() - start
    result["image"] = dict(_diff(np.asarray(ref_img), np.asarray(got_img)), torch_seconds=torch_s,
                           exported_seconds=exported_s)
    rel, levels = TOLERANCES["int8" if exported.meta.get("dtype") == "int8" else precision]
    for name in COMPONENTS:
        r = result[name]
        r["tolerance"] = rel * max(1.0, r["ref_max_abs"])
        r["passed"] = r["max_abs"] <= r["tolerance"]
    result["image"]["tolerance"] = levels
    result["image"]["passed"] = result["image"]["mean_abs"] <= levels
    result["passed"] = all(result[k]["passed"] for k in (*COMPONENTS, "image"))
    result["settings"] = {"prompt": prompt, "steps": steps, "guidance_scale": guidance_scale, "seed": seed,
                          "height": height, "width": width, "scheduler": scheduler, "precision": precision}
    return result


def comparison_lines(result: dict[str, Any]) -> list[str]:
    """Human-readable lines of a compare_outputs result, for the CLI."""
    lines = []
    for name in COMPONENTS:
        r = result[name]
        lines.append(f"{name:<13} max abs diff {r['max_abs']:.2e}  mean {r['mean_abs']:.2e}  "
                     f"(tolerance {r['tolerance']:.1e})  {'ok' if r['passed'] else 'FAILED'}")
    r, s = result["image"], result["settings"]
    lines.append(f"{'image':<13} max abs diff {r['max_abs']:.0f} levels  mean {r['mean_abs']:.3f} levels  "
                 f"(tolerance mean {r['tolerance']:.0f})  {'ok' if r['passed'] else 'FAILED'}  "
                 f"[{s['width']}x{s['height']}, {s['steps']} steps: PyTorch {r['torch_seconds']:.2f} s, "
                 f"exported {r['exported_seconds']:.2f} s]")
    return lines
