"""`distill-sd demo`: distil the shipped shapes teacher into bk-base, bk-small and bk-tiny, and show what was
gained (params, MACs, seconds per image) and lost (exact compositional accuracy, agreement with the teacher).

Everything runs offline on the CPU with the product's own code paths: `export_image_folder` writes a training
split, `build_cache` encodes it once, `train` distils each student from the cache, `evaluate` scores every
model's images of held-out compositions (same seeds for all models).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill_sd.errors import UserError
from distill_sd.report import machine_line
from distill_sd.shapes.teacher import (  # light: the teacher script's constants, no torch
    EVAL_GUIDANCE,
    EVAL_SCHEDULER,
    EVAL_SEED,
    EVAL_STEPS,
)

if TYPE_CHECKING:
    from distill_sd.evaluate import EvalResult
    from distill_sd.train import TrainConfig

STUDENTS = ("bk-base", "bk-small", "bk-tiny")
RESOLUTION = 64  # pixels: training cache and MACs (the shapes world's image size)
MARKER = "report.md"  # a folder holding this is a previous demo's output and may be replaced


@dataclass(frozen=True)
class Budget:
    train_images: int
    steps: int
    batch_size: int
    learning_rate: float
    eval_prompts: int


# 600 steps at lr 1e-3, as many as fit the demo's 10 minutes on 2 cores: with the EMA, bk-tiny kept more of the
# teacher's accuracy at each step count tried (400, 600, 800); lr 5e-4 was no better and 2e-3 worse.
FULL = Budget(train_images=4096, steps=600, batch_size=16, learning_rate=1e-3, eval_prompts=96)
QUICK = Budget(train_images=256, steps=20, batch_size=16, learning_rate=1e-3, eval_prompts=16)


def run_demo(out: Path, *, quick: bool = False, students: tuple[str, ...] = STUDENTS, seed: int = 0,
             steps: int | None = None, teacher: str | None = None) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    from distill_sd.shapes import export_image_folder
    from distill_sd.shapes.teacher import teacher_dir

    budget = QUICK if quick else FULL
    if steps is not None:
        budget = replace(budget, steps=steps)
    teacher_path = Path(teacher) if teacher else teacher_dir()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not (out / MARKER).is_file():  # a file, or a folder that is not ours: never replaced
            raise UserError(f"'{out}' exists and is not a previous demo output; choose another --out")
        shutil.rmtree(out)
    work = out / "work"
    started = time.perf_counter()

    print(f"1/4 shapes world: {budget.train_images} training images (held-out compositions excluded)")
    data = export_image_folder(work / "data", budget.train_images, seed, "train")
    print("2/4 caching latents and text embeddings with the teacher's VAE and text encoder")
    cache = cache_data(teacher_path, data, work / "cache")

    print(f"3/4 distilling {', '.join(students)} side by side: {budget.steps} steps x {budget.batch_size} each")
    configs = {name: distill_config(teacher_path, name, cache, work / f"run-{name}", budget, seed)
               for name in students}
    finals = distill_in_parallel(configs)

    scenes = eval_scenes(budget.eval_prompts)
    models = [("teacher", teacher_path)] + [(n, finals[n]) for n in students]
    results = []
    bar = tqdm(total=len(scenes) * len(models), desc="4/4 evaluating on held-out compositions", unit="image")
    for name, path in models:
        results.append(evaluate_model(name, path, scenes, reference=results[0] if results else None, progress=bar))
    bar.close()

    rows = _rows(results)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    grid(results, scenes, out / "grid.png")
    tradeoff(rows, out / "tradeoff.png")
    table = _table(rows)
    minutes = (time.perf_counter() - started) / 60
    (out / MARKER).write_text(_report(table, budget, len(scenes), minutes, quick, machine_line()))
    print()
    print(table)
    print(f"\nwrote {out / MARKER}, {out / 'grid.png'}, {out / 'tradeoff.png'}  ({minutes:.1f} min)")
    return rows


def distill_in_parallel(configs: dict[str, TrainConfig], share_teacher: bool = True) -> dict[str, Path]:
    """Run several training jobs at once, one process each, and show their progress in one bar.

    Small U-Nets scale poorly across threads (a shapes-sized step gains far less than 2x from a second thread: much
    of the time goes to per-operator overhead), so the demo's students train side by side, one process per student
    with the machine's cores shared out, which gets close to cores-times the throughput of one after another.
    Jobs distilling from one teacher share its forward unless `share_teacher` is False (shared_teacher.py): a
    teacher process computes each batch's teacher outputs once for all of them instead of once per job, with
    bit-identical results (benchmarks/shared_teacher.py measures both ways side by side). A job's error stops
    the others and is raised here; a process that dies is reported by name.
    """
    import contextlib
    import multiprocessing as mp
    import queue as queue_lib

    from tqdm.auto import tqdm

    from distill_sd.shared_teacher import SharedTeacher

    ctx = mp.get_context("spawn")  # fork after torch has started threads is unsafe
    threads = threads_per_job(len(configs))
    teacher = _shared_teacher(list(configs.values())) if share_teacher else None
    shared = SharedTeacher(teacher.teacher, len(configs), dtype=teacher.teacher_dtype, threads=threads,
                           context=ctx) if teacher else contextlib.nullcontext()
    updates = ctx.Queue()
    finished: dict[str, Path] = {}
    failed: dict[str, BaseException] = {}
    with shared:
        workers = {name: ctx.Process(target=_train_worker, name=f"distill-sd-{name}", daemon=True,
                                     args=(name, cfg, threads, updates, shared.client(i) if teacher else None))
                   for i, (name, cfg) in enumerate(configs.items())}
        try:
            for w in workers.values():
                w.start()
            losses: dict[str, float] = {}
            total = sum(c.max_train_steps for c in configs.values())
            with tqdm(total=total, desc="distilling", unit="step", dynamic_ncols=True) as bar:
                while len(finished) < len(workers) and not failed:
                    try:
                        kind, name, value = updates.get(timeout=0.5)
                    except queue_lib.Empty:
                        if teacher:
                            shared.check()
                        for name, w in workers.items():
                            if w.exitcode not in (None, 0) and name not in finished and name not in failed:
                                failed[name] = UserError(f"training '{name}' died (exit code {w.exitcode}); "
                                                         "rerun, or check free memory")
                        continue
                    if kind == "step":
                        losses[name] = value
                        bar.update(1)
                        bar.set_postfix({n: f"{v:.3g}" for n, v in losses.items()}, refresh=False)
                    elif kind == "done":
                        finished[name] = value
                    else:
                        failed[name] = value
        finally:  # on an error (or Ctrl-C) the other jobs stop too; their last checkpoints stay intact
            for name, w in workers.items():
                if name not in finished:
                    w.terminate()
                w.join()
    if failed:
        raise next(iter(failed.values()))
    return finished


def threads_per_job(jobs: int) -> int:
    """Torch threads for each of `jobs` processes sharing this machine's cores."""
    import os

    return max(1, (os.cpu_count() or 1) // jobs)


def _shared_teacher(configs: list[TrainConfig]) -> TrainConfig | None:
    """A config standing for the teacher all `configs` distil from, if one teacher process can serve them."""
    first = configs[0]
    same = all(c.mode == "distill" and c.teacher == first.teacher and c.teacher_dtype == first.teacher_dtype
               and c.mixed_precision in (None, "no") for c in configs)
    return first if len(configs) > 1 and same else None


def _train_worker(name: str, cfg: TrainConfig, threads: int, updates: Any, teacher: Any) -> None:
    import multiprocessing as mp
    import pickle
    import signal
    import sys

    import torch

    from distill_sd.train import train

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops this process
    # Stopped by the parent: exit through Python's shutdown, which releases this process's semaphores (tqdm's
    # lock) instead of leaving them to be reported as leaked.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    torch.set_num_threads(threads)
    parent = mp.parent_process()

    def report(_step: int, terms: dict[str, float]) -> None:
        if not parent.is_alive():  # the parent was killed: nobody waits for this run any more
            sys.exit(143)
        updates.put(("step", name, terms["loss"]))

    try:
        final = train(replace(cfg, progress=False), shared_teacher=teacher, on_step=report)
        updates.put(("done", name, final))
    except Exception as e:  # sent as is when it pickles (a UserError stays one line), else as its text
        try:
            pickle.dumps(e)
        except Exception:
            e = RuntimeError(f"{type(e).__name__}: {e}")
        updates.put(("error", name, e))


def cache_data(teacher_path: Path, data: Path, out: Path) -> Path:
    """Latents and text embeddings of an exported split, made once with the teacher's VAE and text encoder."""
    from distill_sd.cache import build_cache
    from distill_sd.models import load_teacher

    build_cache(load_teacher(teacher_path).pipeline, str(teacher_path), str(data), out, resolution=RESOLUTION,
                batch_size=64)
    return out


def distill_config(teacher_path: Path, student: str, cache: Path, out: Path, budget: Budget, seed: int,
                   **overrides: Any) -> TrainConfig:
    """The demo's distillation run (recipe `balanced` with the feature term doubled, constant lr, EMA, one final
    checkpoint); `overrides` replace TrainConfig fields, e.g. loss_out=0.0 for an ablation."""
    from distill_sd.shapes.teacher import EMPTY_PROMPTS
    from distill_sd.train import TrainConfig

    options: dict[str, Any] = dict(
        mode="distill", teacher=str(teacher_path), student=student, cache=str(cache), out=str(out), seed=seed,
        train_batch_size=budget.batch_size, max_train_steps=budget.steps, learning_rate=budget.learning_rate,
        lr_scheduler="constant", recipe="balanced", checkpointing_steps=max(budget.steps, 1), report_to="none",
        # Feature KD is what carries the teacher's composition into the student in a short run (benchmarks/
        # kd_ablation.py); weighting it 2 instead of `balanced`'s 1 helped bk-tiny at most seeds there.
        loss_feat=2.0,
        # The teacher's share of empty captions too: guidance amplifies the unconditional branch (x3 at guidance 4),
        # and a student that never distils that branch drifts from the teacher there.
        proportion_empty_prompts=EMPTY_PROMPTS,
        # A short EMA: at a constant lr of 1e-3 the last iterate is noisy, and which seed got lucky decided more than
        # the recipe did. diffusers' warm-up caps the decay at (1 + s) / (10 + s), 0.985 at step 600, so the 0.99
        # here is reached only past ~890 steps: up to then a higher ema_decay gives the same weights.
        use_ema=True, ema_decay=0.99)
    return TrainConfig(**{**options, **overrides})


def eval_scenes(n: int, split: str = "heldout", seed: int = EVAL_SEED) -> list[Any]:
    """The held-out compositions every model is scored on (the same ones for a given n and seed); split="train"
    gives captions of the training split's compositions instead (a generalisation-gap check)."""
    from distill_sd.shapes.world import sample_scenes

    return sample_scenes(n, seed, split)


def evaluate_model(name: str, path: Path, scenes: list[Any], *, reference: EvalResult | None = None,
                   progress: Any = None, seed: int = EVAL_SEED, steps: int = EVAL_STEPS,
                   guidance: float = EVAL_GUIDANCE, scheduler: str = EVAL_SCHEDULER,
                   lora: Path | None = None) -> EvalResult:
    """One pipeline's images of `scenes` (by default DPM++ with the teacher's eval steps and guidance; image i
    from seed + i), scored exactly; agreement is measured against `reference` (the teacher's result) when given.
    `lora`: a LoRA fused into the pipeline first."""
    from distill_sd.evaluate import evaluate
    from distill_sd.measure import pipeline_unet_counts

    pipe = load_eval_pipeline(path, scheduler=scheduler, lora=lora)
    r = evaluate(name, pipe, scenes, seed=seed, steps=steps, guidance=guidance, reference=reference,
                 progress=progress)
    r.unet_params, r.unet_macs = pipeline_unet_counts(pipe, RESOLUTION)
    return r


def load_eval_pipeline(path: Path, *, scheduler: str = EVAL_SCHEDULER, lora: Path | None = None) -> Any:
    """The pipeline at `path` ready to draw evaluation images: a diffusers pipeline as loaded (with `lora` fused,
    on `scheduler`) or an ONNX / OpenVINO export (its runtime draws the images); progress bars off."""
    from distill_sd.generate import load_pipeline

    pipe = load_pipeline(str(path), scheduler=scheduler, lora=lora, fast=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _rows(results: list[Any]) -> list[dict[str, Any]]:
    from distill_sd.evaluate import paired_ratio_interval

    teacher = results[0]
    return [{"model": r.name, "accuracy": r.accuracy, "accuracy_vs_teacher": r.accuracy / max(teacher.accuracy, 1e-9),
             "accuracy_vs_teacher_90ci": None if r is teacher else paired_ratio_interval(r.correct, teacher.correct),
             "agreement_with_teacher": r.agreement, "unet_params": r.unet_params, "unet_macs": r.unet_macs,
             "seconds_per_image": r.seconds_per_image, **{f"check_{k}": v for k, v in r.scores.items()
                                                          if k not in ("accuracy", "n")}}
            for r in results]


def _table(rows: list[dict[str, Any]]) -> str:
    from distill_sd.report import human, markdown_table
    from distill_sd.shapes.scorer import count_key
    from distill_sd.shapes.world import OBJECT_COUNTS

    return markdown_table(
        ["model", "accuracy", "vs teacher", "1- / 2-object captions", "agrees with teacher",
         "colour / shape / position ok", "U-Net params", "U-Net MACs", "s / image"],
        [[r["model"], f"{100 * r['accuracy']:.1f} %", _vs_teacher(r),
          " / ".join(f"{100 * r[f'check_{count_key(k)}']:.0f} %" if f"check_{count_key(k)}" in r else "-"
                     for k in OBJECT_COUNTS),
          "-" if r["agreement_with_teacher"] is None else f"{100 * r['agreement_with_teacher']:.0f} %",
          " / ".join(f"{100 * r[f'check_{k}']:.0f} %" for k in ("colour", "shape", "position")),
          human(r["unet_params"]), human(r["unet_macs"]), f"{r['seconds_per_image']:.3f}"] for r in rows])


def _vs_teacher(row: dict[str, Any]) -> str:
    """"93 % (86-100)": the accuracy ratio and its paired-bootstrap 90 % interval over the prompts."""
    text = f"{100 * row['accuracy_vs_teacher']:.0f} %"
    if row.get("accuracy_vs_teacher_90ci"):
        lo, hi = row["accuracy_vs_teacher_90ci"]
        text += f" ({100 * lo:.0f}-{100 * hi:.0f})"
    return text


def _report(table: str, budget: Budget, n_prompts: int, minutes: float, quick: bool, machine: str) -> str:
    from distill_sd.shapes.teacher import EMPTY_PROMPTS

    return f"""# distill-sd demo{' (quick)' if quick else ''}

The shipped shapes teacher (SD-1 U-Net topology at narrow widths) distilled into the BK-SDM students,
each for {budget.steps} steps x batch {budget.batch_size} on {budget.train_images} training images (recipe
`balanced` with the feature term weighted 2, lr {budget.learning_rate}, {EMPTY_PROMPTS:.0%} empty captions as in
the teacher's training, EMA of the weights), then evaluated on {n_prompts} captions of **held-out compositions**
(shape/colour pairs never seen in training), DPM++ {EVAL_STEPS} steps, guidance {EVAL_GUIDANCE}, seed
{EVAL_SEED} + prompt index, the same noise for every model.

{table}

- accuracy: fraction of images whose objects, colours, shapes, sizes, positions and count all match the
  caption, read exactly by the shapes scorer.
- vs teacher: the student's accuracy over the teacher's, and in brackets its 90 % interval from a paired
  bootstrap over the {n_prompts} captions (both models resampled on the same captions): how far this many
  captions pin the ratio down.
- 1- / 2-object captions: accuracy over the captions naming one object ("a small red circle on the left") and
  two ("a red circle above a blue square"): binding two colours, shapes and a relation is the hard part.
- colour / shape / position ok: the scorer's separate checks (each over all images), which show what a
  partly right image gets right.
- agrees with teacher: fraction of images whose detected objects (colour, shape, coarse position) equal those
  of the teacher's image for the same prompt and seed.
- U-Net MACs per forward at 64 px (a 16x16 latent), thop convention; s / image: median over batches of 16,
  text encoder + {EVAL_STEPS} steps with CFG + VAE decode, on this machine's CPU.

Whole run: {minutes:.1f} min on {machine}. Reproduce: `distill-sd demo{' --quick' if quick else ''}`. The
figures repeat bit for bit on the same kind of CPU; another kind rounds differently in its float kernels, and the
students' training takes another path.

![grid](grid.png)

![trade-off](tradeoff.png)
"""


def grid(results: list[Any], scenes: list[Any], path: Path, columns: int = 6) -> None:
    """Models as rows, the same held-out prompts and seeds as columns, whole captions on top; each image framed
    green when the scorer passes it, red when it does not."""
    import textwrap

    from PIL import Image, ImageDraw

    from distill_sd.shapes import score_image

    cell, label_w, line_h = 96, 90, 11
    n = min(columns, len(scenes))
    captions = [textwrap.wrap(scenes[j].caption, width=16) for j in range(n)]
    cap_h = 4 + line_h * max(len(lines) for lines in captions)
    canvas = Image.new("RGB", (label_w + n * cell, cap_h + len(results) * cell), "white")
    draw = ImageDraw.Draw(canvas)
    for j, lines in enumerate(captions):
        draw.multiline_text((label_w + j * cell + 2, 1), "\n".join(lines), fill="black", spacing=1)
    for i, r in enumerate(results):
        y = cap_h + i * cell
        draw.text((4, y + cell // 2 - 12), f"{r.name}\n{100 * r.accuracy:.0f}% acc", fill="black")
        for j in range(n):
            x = label_w + j * cell
            passed = score_image(r.images[j], scenes[j]).correct
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=(40, 170, 60) if passed else (210, 40, 40))
            canvas.paste(r.images[j].resize((cell - 6, cell - 6), Image.Resampling.NEAREST), (x + 3, y + 3))
    canvas.save(path)


def tradeoff(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["seconds_per_image"], 100 * r["accuracy"], s=20 + r["unet_params"] / 1e5,
                   color="#555" if r["model"] == "teacher" else "#2a7")
        ax.annotate(r["model"], (r["seconds_per_image"], 100 * r["accuracy"]), textcoords="offset points",
                    xytext=(6, 4), fontsize=9)
    ax.set_xlabel("seconds per image (CPU)")
    ax.set_ylabel("held-out compositional accuracy (%)")
    ax.set_title("accuracy vs latency (marker size ~ U-Net params)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
