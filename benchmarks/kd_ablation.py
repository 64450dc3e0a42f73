#!/usr/bin/env python
"""kd_ablation: what do the distillation terms buy? bk-tiny distilled from the shapes teacher four ways.

    task              task loss only                     (loss_out 0, loss_feat 0)
    task+out          task + output KD                   (loss_feat 0)
    task+out+feat     task + output + feature KD         (recipe `balanced`: weights 1/1/1)
    task+out+2feat    ... with the feature term doubled  (weights 1/1/2: the demo's recipe)

Everything else is `distill-sd demo`'s bk-tiny run, through demo.py's own functions: the same training split
(FULL budget: 4096 images, exported with the demo's seed 0) cached once with the teacher's encoders
(`demo.cache_data`), the same TrainConfig (`demo.distill_config`: batch 16, lr 1e-3 constant, 10 % empty
captions, EMA 0.99, the demo's 600 steps unless --steps says otherwise; only the loss weights overridden),
and the same evaluation (`demo.eval_scenes` + `demo.evaluate_model`: the 96 held-out compositions, DPM++ 20
steps, guidance 4.0, seed 1234 + prompt index, agreement measured against the teacher's image of the same
prompt and noise). Each variant runs with training seeds 0..N-1; one seed is one (data order, noise,
timesteps) draw and is shared by the four variants, so differences within a seed are paired. Seed 0 of
task+out+2feat at the default --steps is the demo's bk-tiny configuration.

Per variant: median and min-max over seeds of held-out accuracy and agreement with the teacher, and the
paired difference to `task`; plus one row per (variant, seed). Results go to --out (default
benchmarks/results) as kd_ablation.md and kd_ablation.json; the markdown table is printed.

    python benchmarks/kd_ablation.py                                    # FULL budget, 3 seeds x 4 variants
    python benchmarks/kd_ablation.py --teacher DIR --steps 2 --seeds 1 --prompts 4 --images 256 \\
        --out /tmp/kd-ablation-smoke                                    # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from distill_sd.demo import (
    FULL,
    Budget,
    cache_data,
    distill_config,
    distill_in_parallel,
    eval_scenes,
    evaluate_model,
)
from distill_sd.report import machine, run_lines, write_results

REPO = Path(__file__).resolve().parent.parent
STUDENT = "bk-tiny"
DATA_SEED = 0  # run_demo's default seed: the demo's training split
VARIANTS: dict[str, tuple[str, dict[str, float]]] = {  # name -> (label, TrainConfig overrides)
    "task": ("task loss only", {"loss_out": 0.0, "loss_feat": 0.0}),
    "task+out": ("task + output KD", {"loss_feat": 0.0}),
    "task+out+feat": ("task + output + feature KD (weights 1/1/1)", {"loss_feat": 1.0}),
    "task+out+2feat": ("task + output + 2 x feature KD (demo recipe)", {}),
}
BASELINE = "task"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", help="shapes teacher pipeline folder (default: the shipped one)")
    p.add_argument("--steps", type=int, default=FULL.steps, help="distillation steps per run (demo FULL: %(default)s)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1 per variant (default %(default)s)")
    p.add_argument("--prompts", type=int, default=FULL.eval_prompts,
                   help="held-out prompts to evaluate (demo FULL: %(default)s)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="where kd_ablation.md/.json go")
    p.add_argument("--images", type=int, default=FULL.train_images, help="training images (demo FULL: %(default)s)")
    p.add_argument("--batch", type=int, default=FULL.batch_size, help="batch size (demo FULL: %(default)s)")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "distill-sd-bench"),
                   help="data, cache and runs go to a new kd_ablation-<time> folder in here")
    p.add_argument("--keep-runs", action="store_true", help="keep each run's final pipeline (checkpoints are always removed)")
    args = p.parse_args(argv)
    for name in ("steps", "seeds", "prompts", "images", "batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.images < args.batch:
        p.error("--images must be >= --batch")
    return args


def last_history(run: Path) -> tuple[dict[str, float], list[float]]:
    """The final step's loss terms and every step's wall time, from train.py's history.jsonl."""
    lines = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines() if line.strip()]
    return {k: v for k, v in lines[-1].items() if k in ("task", "out", "feat", "loss")}, [h["sec"] for h in lines]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from distill_sd.shapes import export_image_folder
    from distill_sd.shapes.teacher import EVAL_GUIDANCE, EVAL_SEED, EVAL_STEPS, teacher_dir
    started = time.perf_counter()
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    command = "python benchmarks/kd_ablation.py" + ("" if not sys.argv[1:] else " " + shlex.join(sys.argv[1:]))
    budget = Budget(args.images, args.steps, args.batch, FULL.learning_rate, args.prompts)
    teacher = Path(args.teacher) if args.teacher else teacher_dir()
    seeds = list(range(args.seeds))
    work = Path(args.workdir) / f"kd_ablation-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    work.mkdir(parents=True)
    print(f"kd_ablation: {teacher} -> {STUDENT}, {len(VARIANTS)} variants x {len(seeds)} seeds, {budget.steps} steps x "
          f"batch {budget.batch_size}, {budget.train_images} training images, {budget.eval_prompts} held-out prompts; "
          f"work in {work}", flush=True)

    t = time.perf_counter()
    data = export_image_folder(work / "data", budget.train_images, DATA_SEED, "train")
    cache = cache_data(teacher, data, work / "cache")
    prepare_s = time.perf_counter() - t
    print(f"  data + cache: {prepare_s:.0f} s (one-off)", flush=True)

    scenes = eval_scenes(budget.eval_prompts)
    t = time.perf_counter()
    reference = evaluate_model("teacher", teacher, scenes)
    teacher_row = {"accuracy": reference.accuracy, "seconds_per_image": reference.seconds_per_image,
                   "eval_s": time.perf_counter() - t, "unet_params": reference.unet_params}
    print(f"  teacher: accuracy {100 * reference.accuracy:.1f} % ({teacher_row['eval_s']:.0f} s)", flush=True)

    runs: list[dict[str, Any]] = []
    configs: dict[str, dict[str, Any]] = {}
    student: dict[str, int] = {}
    for seed in seeds:  # seeds outer: an interrupted run still has every variant for the seeds it finished
        cfgs = {variant: distill_config(teacher, STUDENT, cache, work / f"{variant}-seed{seed}", budget, seed,
                                        **overrides) for variant, (_label, overrides) in VARIANTS.items()}
        for variant, cfg in cfgs.items():
            resolved = cfg.resolved()
            configs[variant] = {k: getattr(resolved, k) for k in ("recipe", "loss_task", "loss_out", "loss_feat",
                                                                   "feature_norm", "learning_rate", "lr_scheduler")}
        t = time.perf_counter()
        finals = distill_in_parallel(cfgs)  # the variants of one seed train side by side, as the demo's students
        train_s = time.perf_counter() - t
        for variant, final in finals.items():
            out = Path(cfgs[variant].out)
            shutil.rmtree(out / "checkpoints", ignore_errors=True)  # optimizer state: not needed to evaluate
            t = time.perf_counter()
            r = evaluate_model(variant, final, scenes, reference=reference)
            eval_s = time.perf_counter() - t
            student = {"unet_params": r.unet_params, "unet_macs": r.unet_macs}
            if not args.keep_runs:
                shutil.rmtree(final, ignore_errors=True)
            losses, secs = last_history(out)
            row = {"variant": variant, "seed": seed, "accuracy": r.accuracy, "agreement": r.agreement,
                   "final_losses": losses, "median_s_per_step": statistics.median(secs), "train_s": train_s,
                   "eval_s": eval_s, "seconds_per_image": r.seconds_per_image,
                   "checks": {k: v for k, v in r.scores.items() if k not in ("accuracy", "n")}}
            runs.append(row)
            print(f"  seed {seed} {variant:14s}: accuracy {100 * r.accuracy:.1f} %, agreement {100 * r.agreement:.1f} %, "
                  f"final loss {_losses(losses)}; train {train_s:.0f} s for the {len(cfgs)} variants side by side "
                  f"({row['median_s_per_step']:.2f} s/step), eval {eval_s:.0f} s", flush=True)

    report = {"benchmark": "kd_ablation", "date": date, "command": command, "machine": machine(),
              "config": {"teacher": str(teacher), "student": STUDENT, "steps": budget.steps,
                         "batch_size": budget.batch_size, "learning_rate": budget.learning_rate,
                         "train_images": budget.train_images, "data_seed": DATA_SEED, "seeds": seeds,
                         "eval_prompts": budget.eval_prompts, "eval_seed": EVAL_SEED, "eval_steps": EVAL_STEPS,
                         "eval_guidance": EVAL_GUIDANCE, "eval_scheduler": "dpm++",
                         "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
              "variants": {v: {"label": VARIANTS[v][0], **configs[v]} for v in VARIANTS},
              "teacher": teacher_row, "student": student, "prepare_s": prepare_s,
              "summary": summarise(runs), "runs": runs, "workdir": str(work),
              "total_wall_s": time.perf_counter() - started}
    written = write_results(args.out, "kd_ablation", report, markdown(report))
    print(f"wrote {written} and .json  (total {report['total_wall_s'] / 60:.1f} min; runs in {work})")


def _losses(losses: dict[str, float]) -> str:
    return " / ".join(f"{k} {v:.4f}" for k, v in losses.items())


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant: median, min, max over seeds; paired (same seed) differences to the task-only baseline."""
    base = {r["seed"]: r for r in runs if r["variant"] == BASELINE}
    s: dict[str, Any] = {}
    for v in VARIANTS:
        mine = [r for r in runs if r["variant"] == v]
        s[v] = {"n_seeds": len(mine), "accuracy": _spread([r["accuracy"] for r in mine]),
                "agreement": _spread([r["agreement"] for r in mine]),
                "median_train_s": statistics.median(r["train_s"] for r in mine),
                "median_s_per_step": statistics.median(r["median_s_per_step"] for r in mine)}
        if v != BASELINE:
            paired = [(r, base[r["seed"]]) for r in mine if r["seed"] in base]
            s[v]["vs_task_accuracy"] = _spread([a["accuracy"] - b["accuracy"] for a, b in paired])
            s[v]["vs_task_agreement"] = _spread([a["agreement"] - b["agreement"] for a, b in paired])
    return s


def _pct(x: dict[str, float], signed: bool = False) -> str:
    """Percent, or (signed) a difference in percentage points."""
    f, unit = ("{:+.1f}", "pp") if signed else ("{:.1f}", "%")
    return f"{f.format(100 * x['median'])} {unit} ({f.format(100 * x['min'])} to {f.format(100 * x['max'])})"


def markdown(rep: dict[str, Any]) -> str:
    c, s, m = rep["config"], rep["summary"], rep["machine"]
    n = c["eval_prompts"]
    lines = [
        f"kd_ablation: the shapes teacher distilled into {c['student']} {len(rep['variants'])} ways, {c['steps']} steps "
        f"x batch {c['batch_size']} (lr {c['learning_rate']}, constant) on {c['train_images']} training images, training "
        f"seeds {', '.join(map(str, c['seeds']))}; each run scored on {n} held-out compositions (DPM++ "
        f"{c['eval_steps']} steps, guidance {c['eval_guidance']}, seed {c['eval_seed']} + prompt index), as in "
        "`distill-sd demo`.",
        "",
        f"Teacher: accuracy {100 * rep['teacher']['accuracy']:.1f} %. Values are median (min to max) over seeds; "
        "Δ is the paired difference to task-only at the same seed, in percentage points.",
        "",
        "| variant | loss weights task / out / feat | accuracy | agrees with teacher | Δ accuracy vs task | "
        "Δ agreement vs task | train s / seed |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for v, (label, _) in VARIANTS.items():
        x, w = s[v], rep["variants"][v]
        weights = f"{w['loss_task']:g} / {w['loss_out']:g} / {w['loss_feat']:g}" + (
            f" ({w['feature_norm']})" if w["loss_feat"] else "")
        lines.append(f"| {label} | {weights} | {_pct(x['accuracy'])} | {_pct(x['agreement'])} | "
                     f"{_pct(x['vs_task_accuracy'], True) if 'vs_task_accuracy' in x else '-'} | "
                     f"{_pct(x['vs_task_agreement'], True) if 'vs_task_agreement' in x else '-'} | "
                     f"{x['median_train_s']:.0f} |")
    lines += ["", "Per seed:", "",
              "| variant | seed | accuracy | agrees with teacher | final-step losses | s / step | train s | eval s |",
              "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in sorted(rep["runs"], key=lambda r: (list(VARIANTS).index(r["variant"]), r["seed"])):
        lines.append(f"| {r['variant']} | {r['seed']} | {100 * r['accuracy']:.1f} % | {100 * r['agreement']:.1f} % | "
                     f"{_losses(r['final_losses'])} | {r['median_s_per_step']:.2f} | {r['train_s']:.0f} | "
                     f"{r['eval_s']:.0f} |")
    lines += [
        "",
        "- accuracy: fraction of images whose objects, colours, shapes, sizes, positions and count all match the "
        f"caption (shapes scorer); one image is {100 / n:.2f} points. agrees with teacher: fraction of images whose "
        "detected objects (colour, shape, coarse position) equal those of the teacher's image for the same prompt "
        "and seed.",
        "- The variants share the training data, the student's initialisation (bk-tiny, built from the "
        "teacher's weights) and, per seed, the data order and every noise and timestep draw; only the loss weights "
        "differ. The teacher still runs every step in the task-only variant (same step cost, its output unused).",
        "- The variants of a seed train side by side, one process each (`demo.distill_in_parallel`); train s is "
        "the wall time of that seed's runs together, s / step the per-run step time while sharing the cores.",
        f"- One-off data export + cache: {rep['prepare_s']:.0f} s. Teacher evaluation: {rep['teacher']['eval_s']:.0f} s. "
        f"Student U-Net: {rep['student'].get('unet_params', 0) / 1e6:.2f} M parameters.",
        f"- Machine: {m['cpu']} ({', '.join(m['isa'])}), {m['cores']} cores, torch threads {m['torch_threads']} "
        f"(OMP_NUM_THREADS={c['omp_num_threads']}); torch {m['torch']}, diffusers {m['diffusers']}, Python {m['python']}.",
        *run_lines(rep),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
