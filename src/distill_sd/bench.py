"""Side-by-side inference benchmark: U-Net step and whole-image latency, memory, params and MACs.

Models are measured interleaved (round-robin: run 1 of every model, then run 2 of every model, ...) so a
noisy neighbour slows all of them alike, and every figure is a median. A model is a pipeline folder, or
`ref:ARCH` / `ref:ARCH:STUDENT` for a random-weight reference pipeline (and a student built from it) made in
memory — full-size timing with no weights on disk. Random weights give noise images but exact timings.
An exported folder (`distill-sd export`, ONNX Runtime or OpenVINO, fp32 or int8) is measured the same way, in the
precision it was exported in, so PyTorch and its exports compare side by side.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from distill_sd.errors import UserError


@dataclass
class Variant:
    model: str
    dtype: str
    pipe: Any = field(repr=False, default=None)
    unet_params: int = 0
    unet_macs: int = 0
    step_s: list[float] = field(default_factory=list)
    image_s: list[float] = field(default_factory=list)
    peak_mb: list[float] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
        return {"model": self.model, "dtype": self.dtype, "unet_params": self.unet_params,
                "unet_macs": self.unet_macs, "unet_step_s": med(self.step_s), "image_s": med(self.image_s),
                "peak_rss_increase_mb": med(self.peak_mb), "runs": len(self.step_s)}


def load_for_bench(model: str, dtype: str, narrow: bool = False, shared: dict | None = None,
                   compile: bool = False) -> Any:
    """A pipeline on the CPU in `dtype` with the fast-path layout (channels-last, SDPA).

    `ref:` variants of one architecture and dtype share one random-weight reference pipeline through `shared`:
    students are built from its U-Net and reuse its text encoder and VAE (full-size SD-1.5 students in fp32 and
    bf16 then fit in memory side by side).
    """
    from distill_sd.export import ExportedPipeline, is_export_dir
    from distill_sd.generate import DTYPES, load_pipeline, optimize, set_scheduler

    if is_export_dir(model):
        return ExportedPipeline.load(model, scheduler="dpm++")
    if dtype not in DTYPES:
        raise UserError(f"--dtype entries must be among {', '.join(DTYPES)}, got {dtype}")
    if not model.startswith("ref:"):
        return load_pipeline(model, device="cpu", dtype=dtype, scheduler="dpm++", compile=compile)
    from distill_sd.reference import reference_pipeline
    from distill_sd.students import get_spec
    from distill_sd.surgery import build_student, plan_student

    parts = model.split(":")
    shared = {} if shared is None else shared
    key = (parts[1], narrow, dtype)
    if key not in shared:
        shared[key] = optimize(reference_pipeline(parts[1], narrow=narrow), torch.device("cpu"), DTYPES[dtype])
    pipe = shared[key]
    if len(parts) == 3:
        plan = plan_student(pipe.unet.config, get_spec(parts[2]))
        unet, _ = build_student(pipe.unet, plan)
        pipe = type(pipe)(**{**pipe.components, "unet": unet})
    else:
        pipe = type(pipe)(**pipe.components)  # own scheduler state; shared weights
    set_scheduler(pipe, "dpm++")
    return optimize(pipe, torch.device("cpu"), DTYPES[dtype], compile=compile)


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every few milliseconds in a thread."""

    def __enter__(self) -> PeakRSS:
        import psutil

        self._proc = psutil.Process()
        self.base = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def increase_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def unet_step_seconds(pipe: Any, resolution: int, batch: int, cfg: bool = True) -> float:
    """One U-Net call as the sampler makes it: batch x 2 with classifier-free guidance."""
    from distill_sd.export import ExportedPipeline
    from distill_sd.measure import dummy_unet_inputs

    exported = isinstance(pipe, ExportedPipeline)
    config = pipe.unet_config if exported else pipe.unet.config
    side = resolution // pipe.vae_scale_factor
    inputs = dummy_unet_inputs(config, batch=batch * (2 if cfg else 1), latent_hw=(side, side),
                               dtype=torch.float32 if exported else pipe.unet.dtype,
                               generator=torch.Generator().manual_seed(0))
    if exported:
        sample, embeds = inputs["sample"].numpy(), inputs["encoder_hidden_states"].numpy()
        start = time.perf_counter()
        pipe.predict_noise(sample, 500, embeds)
        return time.perf_counter() - start
    inputs["sample"] = inputs["sample"].contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        start = time.perf_counter()
        pipe.unet(**inputs)
        return time.perf_counter() - start


def image_seconds(pipe: Any, resolution: int, steps: int, batch: int) -> float:
    """Text encoder + `steps` denoising steps with CFG + VAE decode: what a user waits for."""
    with torch.inference_mode():
        start = time.perf_counter()
        pipe("a photograph of an astronaut riding a horse", num_inference_steps=steps, guidance_scale=7.5,
             height=resolution, width=resolution, num_images_per_prompt=batch,
             generator=torch.Generator().manual_seed(0))
        return time.perf_counter() - start


def run_bench(models: list[str], dtypes: list[str], *, resolution: int, steps: int, batch: int, runs: int,
              unet_runs: int, narrow: bool = False, whole_image: bool = True, progress: bool = True,
              compile: bool = False) -> list[Variant]:
    from tqdm.auto import tqdm

    from distill_sd.export import is_export_dir, read_export_metadata
    from distill_sd.measure import pipeline_unet_counts

    variants = []
    for m in models:  # an export runs in the precision it was exported in: one variant, whatever --dtype says
        if is_export_dir(m):
            meta = read_export_metadata(m)
            variants.append(Variant(m, f"{meta['format']} {meta.get('dtype', 'fp32')}"))
        else:
            variants += [Variant(m, d) for d in dtypes]
    shared: dict = {}
    for v in tqdm(variants, desc="loading", disable=not progress):
        v.pipe = load_for_bench(v.model, v.dtype, narrow, shared, compile)
        v.pipe.set_progress_bar_config(disable=True)
        v.unet_params, v.unet_macs = pipeline_unet_counts(v.pipe, resolution)
        unet_step_seconds(v.pipe, resolution, batch)  # warm-up: first calls allocate and pick kernels
        if whole_image:
            image_seconds(v.pipe, resolution, 1, batch)
    total = runs * len(variants)
    bar = tqdm(total=total, desc="measuring (interleaved)", disable=not progress)
    for _ in range(runs):
        for v in variants:
            v.step_s.append(statistics.median(unet_step_seconds(v.pipe, resolution, batch) for _ in range(unet_runs)))
            if whole_image:
                with PeakRSS() as mem:
                    v.image_s.append(image_seconds(v.pipe, resolution, steps, batch))
                v.peak_mb.append(mem.increase_mb)
            bar.update(1)
    bar.close()
    return variants


def table(rows: list[dict[str, Any]], steps: int) -> str:
    from distill_sd.report import human, markdown_table

    def fmt(x: float | None, unit: str = "s") -> str:
        return "-" if x is None else f"{x:.3g} {unit}"

    base_step = {r["model"]: r["unet_step_s"] for r in rows if r["dtype"] == "fp32"}
    first = rows[0]
    body = []
    for r in rows:
        vs_teacher = first["image_s"] / r["image_s"] if r["image_s"] and first["image_s"] else None
        vs_fp32 = base_step.get(r["model"], None)
        body.append([r["model"], r["dtype"], human(r["unet_params"]), human(r["unet_macs"]),
                     fmt(r["unet_step_s"]), fmt(r["image_s"]), fmt(r["peak_rss_increase_mb"], "MB"),
                     f"{vs_teacher:.2f}x" if vs_teacher else "-",
                     f"{vs_fp32 / r['unet_step_s']:.2f}x" if vs_fp32 else "-"])
    return markdown_table(["model", "dtype", "U-Net params", "U-Net MACs", "U-Net step (CFG)",
                           f"image ({steps} steps)", "peak RSS +", "image speed-up vs first row",
                           "step speed-up vs fp32"], body)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    key = "image_s" if rows[0]["image_s"] else "unet_step_s"
    labels = [f"{r['model'].removeprefix('ref:')}\n{r['dtype']}" for r in rows]
    ax.bar(labels, [r[key] for r in rows], color=["#888" if r["dtype"] == "fp32" else "#2a7" for r in rows])
    ax.set_ylabel("seconds per image" if key == "image_s" else "seconds per U-Net step")
    ax.set_title("distill-sd bench (median, interleaved runs)")
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rows_of(variants: list[Variant]) -> list[dict[str, Any]]:
    return [v.row() for v in variants]

