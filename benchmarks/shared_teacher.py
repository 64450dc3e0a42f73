#!/usr/bin/env python
"""shared_teacher: the demo's three students distilled side by side, each with its own teacher forward or
all three served by one teacher process (`demo.distill_in_parallel(..., share_teacher=...)`).

Students distilled from one teacher with one seed see the same batches, noise and timesteps, so without
sharing the identical teacher forward runs once per student. Everything is the demo's (the FULL budget's
training split, exported with seed 0 and cached once with the teacher's encoders; `demo.distill_config`:
batch 16, lr 1e-3, EMA), only shorter (--steps). The two variants alternate round by round, so drifting
machine load hits both alike. Per variant: median over rounds of the wall time of `distill_in_parallel`
(process start-up included) and of each student's median step time (from its history.jsonl); plus whether the
final weights of both variants are bit-identical (they must be: sharing only removes repeated work).

    python benchmarks/shared_teacher.py                        # 3 rounds x 2 variants x 150 steps, ~20 min on 2 cores
    python benchmarks/shared_teacher.py --rounds 1 --steps 3 --images 256 --out /tmp/st-smoke   # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from distill_sd.demo import FULL, STUDENTS, cache_data, distill_config, distill_in_parallel
from distill_sd.report import machine, write_results  # machine: CPU model, ISA, cores, versions
from distill_sd.shapes import export_image_folder
from distill_sd.shapes.teacher import teacher_dir
from distill_sd.train import fingerprint

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {"own teacher per student": False, "one shared teacher": True}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--images", type=int, default=FULL.train_images)
    p.add_argument("--batch", type=int, default=FULL.batch_size)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args()

    teacher = teacher_dir()
    budget = replace(FULL, train_images=args.images, steps=args.steps, batch_size=args.batch)
    work = Path(tempfile.mkdtemp(prefix="shared-teacher-"))
    cache = cache_data(teacher, export_image_folder(work / "data", budget.train_images, 0, "train"), work / "cache")
    walls: dict[str, list[float]] = {v: [] for v in VARIANTS}
    steps: dict[str, dict[str, list[float]]] = {v: {s: [] for s in STUDENTS} for v in VARIANTS}
    prints: dict[str, set[str]] = {s: set() for s in STUDENTS}
    for r in range(args.rounds):
        for variant, share in VARIANTS.items():
            runs = work / f"round{r}-{'shared' if share else 'own'}"
            configs = {s: distill_config(teacher, s, cache, runs / s, budget, seed=0) for s in STUDENTS}
            start = time.perf_counter()
            finals = distill_in_parallel(configs, share_teacher=share)
            walls[variant].append(time.perf_counter() - start)
            for s, final in finals.items():
                history = [json.loads(line) for line in (runs / s / "history.jsonl").read_text().splitlines()]
                steps[variant][s].append(statistics.median(h["sec"] for h in history[1:] or history))
                prints[s].add(fingerprint(_unet(final)))
            shutil.rmtree(runs)
            print(f"round {r + 1}/{args.rounds}  {variant}: {walls[variant][-1]:.1f} s", flush=True)

    base = statistics.median(walls["own teacher per student"])
    report = {
        "command": "python benchmarks/shared_teacher.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        "date": datetime.date.today().isoformat(), "machine": machine(),
        "rounds": args.rounds, "steps": args.steps, "batch_size": budget.batch_size,
        "variants": {v: {"wall_s_median": statistics.median(walls[v]), "wall_s": walls[v],
                         "speedup": base / statistics.median(walls[v]),
                         "s_per_step_median": {s: statistics.median(steps[v][s]) for s in STUDENTS}}
                     for v in VARIANTS},
        "weights_identical": all(len(f) == 1 for f in prints.values()),
    }
    write_results(args.out, "shared_teacher", report, markdown(report))
    shutil.rmtree(work, ignore_errors=True)


def _unet(final: Path) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(final / "unet")


def markdown(rep: dict) -> str:
    rows = [f"| {v} | {r['wall_s_median']:.1f} s ({r['speedup']:.2f}x) | "
            + " | ".join(f"{r['s_per_step_median'][s]:.3f} s" for s in STUDENTS) + " |"
            for v, r in rep["variants"].items()]
    return "\n".join([
        f"`{rep['command']}` ({rep['date']}, {rep['machine']['cpu']}, {rep['machine']['cores']} cores, torch "
        f"{rep['machine']['torch']}): the demo's three students, {rep['steps']} steps x "
        f"batch {rep['batch_size']} each, side by side; medians over {rep['rounds']} rounds, variants alternating.",
        "",
        "| variant | wall time of the three runs | " + " | ".join(f"{s} s / step" for s in STUDENTS) + " |",
        "|---|---:|" + "---:|" * len(STUDENTS),
        *rows,
        "",
        f"Final weights bit-identical between the variants: {'yes' if rep['weights_identical'] else 'NO'}.",
        ""])


if __name__ == "__main__":
    main()
