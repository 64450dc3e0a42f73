#!/usr/bin/env python
"""lora_shapes: teach the shapes teacher what it has never seen, with LoRA adapters or by fine-tuning it all.

The shipped teacher never saw an image of its held-out (shape, colour) pairs, and scores below its training-split
accuracy on them. Here it is shown them: --images images of held-out compositions (their own captions and seeds,
not the evaluation's), cached with the teacher's VAE and text encoder, then for the same steps, batch, schedule and
seed, `distill-sd lora` at each --ranks and `distill-sd finetune` of the whole U-Net (`train.TrainConfig`, the
project's one loop). Each result is scored on the demo's held-out captions (what it was taught) and on new
captions of the training split (what it keeps), DPM++ 20 steps, guidance 4, seed 1234 + index
(`demo.evaluate_model`; a LoRA is fused into the teacher first, as `distill-sd evaluate --lora` does).

Reports per run: trainable parameters, size of what it saves, median seconds per training step, held-out and
training-split accuracy. Results go to --out (default benchmarks/results) as lora_shapes.md/.json.

    python benchmarks/lora_shapes.py                     # ranks 4, 8, 32 and a full fine-tune: ~20 min
    python benchmarks/lora_shapes.py --steps 2 --images 64 --prompts 4 --ranks 4 --out /tmp/lora-smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from distill_sd.demo import cache_data, eval_scenes, evaluate_model
from distill_sd.report import machine, machine_line, markdown_table, write_results
from distill_sd.shapes import export_image_folder
from distill_sd.shapes.teacher import EMPTY_PROMPTS, teacher_dir
from distill_sd.train import TrainConfig, train

REPO = Path(__file__).resolve().parent.parent
DATA_SEED = 11  # the taught images: other captions and noise than the evaluation's (seed 1234)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="*", default=[4, 8, 32], help="LoRA ranks (default %(default)s)")
    p.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA peak learning rate (default %(default)s)")
    p.add_argument("--full-lr", type=float, default=2e-4, help="full fine-tune peak learning rate (%(default)s)")
    p.add_argument("--steps", type=int, default=400, help="steps of every run (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--images", type=int, default=1024, help="images of held-out compositions (%(default)s)")
    p.add_argument("--prompts", type=int, default=96, help="captions per evaluation (the demo's: %(default)s)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="where lora_shapes.md/.json go")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "distill-sd-bench"),
                   help="scratch folder for data, cache and runs (removed at the end)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.images < args.batch_size or args.prompts < 1 or any(r < 1 for r in args.ranks):
        p.error("--steps, --prompts and every rank must be >= 1, and --images at least one batch")
    return args


def run_config(mode: str, teacher: Path, cache: Path, out: Path, args: argparse.Namespace, **extra: Any) -> TrainConfig:
    """The one schedule every run shares: cosine with 10 % warm-up, Min-SNR-5 and the teacher's empty captions."""
    return TrainConfig(mode=mode, student=str(teacher), cache=str(cache), out=str(out), seed=0,
                       train_batch_size=args.batch_size, max_train_steps=args.steps, lr_scheduler="cosine",
                       lr_warmup_steps=max(1, args.steps // 10), snr_gamma=5.0, proportion_empty_prompts=EMPTY_PROMPTS,
                       mixed_precision="no", checkpointing_steps=args.steps, report_to="none", **extra)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    command = "python benchmarks/lora_shapes.py" + ("" if not sys.argv[1:] else " " + shlex.join(sys.argv[1:]))
    teacher = teacher_dir()
    work = Path(args.workdir) / f"lora_shapes-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    data = export_image_folder(work / "data", args.images, DATA_SEED, "heldout")
    cache = cache_data(teacher, data, work / "cache")

    configs = {f"LoRA rank {r}": run_config("lora", teacher, cache, work / f"lora-r{r}", args, rank=r,
                                            learning_rate=args.lora_lr) for r in args.ranks}
    configs["full fine-tune"] = run_config("finetune", teacher, cache, work / "full", args, learning_rate=args.full_lr)
    heldout, kept = eval_scenes(args.prompts), eval_scenes(args.prompts, "train")
    rows = [{"run": "teacher (as shipped)", "lr": None, "trainable": 0, "saved_mb": 0.0, "s_per_step": None,
             **scores(teacher, None, heldout, kept)}]
    for name, cfg in configs.items():
        final = train(cfg)
        history = [json.loads(line) for line in (Path(cfg.out) / "history.jsonl").read_text().splitlines()]
        lora = final if cfg.mode == "lora" else None
        weights = final / ("pytorch_lora_weights.safetensors" if lora else "unet/diffusion_pytorch_model.safetensors")
        rows.append({"run": name, "lr": cfg.learning_rate, "trainable": numel(weights),
                     "saved_mb": weights.stat().st_size / 1e6,
                     "s_per_step": statistics.median(h["sec"] for h in history[1:] or history),
                     **scores(teacher if lora else final, lora, heldout, kept)})
        print(f"  {name}: held-out {100 * rows[-1]['heldout']:.1f} %, training split {100 * rows[-1]['kept']:.1f} %",
              flush=True)

    report = {"benchmark": "lora_shapes", "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": command, "machine": machine(), "steps": args.steps, "batch_size": args.batch_size,
              "images": args.images, "prompts": args.prompts, "rows": rows, "total_wall_s": time.perf_counter() - started}
    written = write_results(args.out, "lora_shapes", report, markdown(report))
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {written} and .json ({report['total_wall_s'] / 60:.1f} min)")


def scores(model: Path, lora: Path | None, heldout: list[Any], kept: list[Any]) -> dict[str, float]:
    return {"heldout": evaluate_model("m", model, heldout, lora=lora).accuracy,
            "kept": evaluate_model("m", model, kept, lora=lora).accuracy}


def numel(weights: Path) -> int:
    """Parameters in a safetensors file: what the run trained (the adapters, or the whole U-Net) and saved."""
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(weights).values())


def markdown(rep: dict[str, Any]) -> str:
    def pct(x: float) -> str:
        return f"{100 * x:.1f} %"

    teacher = rep["rows"][0]
    lines = [f"lora_shapes: `{rep['command']}` ({rep['date'][:10]}, {machine_line(rep['machine'])}; "
             f"{rep['total_wall_s'] / 60:.0f} min): the shapes teacher shown {rep['images']} images of its held-out "
             f"compositions for {rep['steps']} steps x batch {rep['batch_size']}, scored on {rep['prompts']} held-out "
             f"captions and {rep['prompts']} new captions of the training split.", ""]
    table = [[r["run"], f"{r['lr']:g}" if r["lr"] else "-", f"{r['trainable']:,}" if r["trainable"] else "-",
              f"{r['saved_mb']:.2f} MB" if r["saved_mb"] else "-",
              f"{r['s_per_step']:.3f}" if r["s_per_step"] else "-",
              pct(r["heldout"]) + ("" if r is teacher else f" ({100 * (r['heldout'] - teacher['heldout']):+.1f})"),
              pct(r["kept"]) + ("" if r is teacher else f" ({100 * (r['kept'] - teacher['kept']):+.1f})")]
             for r in rep["rows"]]
    lines.append(markdown_table(["run", "peak lr", "trained params", "saves", "s / step (median)",
                                 "held-out (taught)", "training split (kept)"], table))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
