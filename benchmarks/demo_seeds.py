#!/usr/bin/env python
"""demo_seeds: how much of the demo's bk-tiny figure is the recipe, and how much its one training seed?

`distill-sd demo` distils each student once, with training seed 0, and scores it on 96 held-out compositions: one
caption is 1.04 points, so "bk-tiny keeps 94 % of the teacher" is one draw of (data order, noise, timesteps). This
runs the demo's bk-tiny distillation (`demo.distill_config`, FULL budget, the demo's training split and cache) with
training seeds 0..N-1 side by side (`demo.distill_in_parallel`, one process each), then continues every run from
its final checkpoint to each of --more steps (`resume_from_checkpoint`, so the longer run is the same run, trained
further: constant lr, EMA state resumed), and scores every model on the demo's held-out prompts
(`demo.evaluate_model`: DPM++ 20 steps, guidance 4, seed 1234 + prompt index). Seed 0 at the demo's steps is the
demo's own bk-tiny.

Reports per seed and step count: accuracy, accuracy / teacher's, agreement with the teacher; per step count the
mean, median and min-max over seeds. Results go to --out (default benchmarks/results) as demo_seeds.md/.json.

    python benchmarks/demo_seeds.py                          # 4 seeds at the demo's 600 steps: ~20 min
    python benchmarks/demo_seeds.py --more 700               # ... and each continued to 700 steps
    python benchmarks/demo_seeds.py --seeds 1 --steps 2 --more 3 --prompts 4 --images 256 --out /tmp/seeds-smoke
    python benchmarks/demo_seeds.py --steps 1100 --set train_batch_size=8 --name demo_seeds-1100x8   # another recipe
    python benchmarks/demo_seeds.py --two-object-share 0.75 --name demo_seeds-two75   # another training split

--set FIELD=VALUE (repeatable) changes a TrainConfig field of the demo's recipe (as `distill-sd distill --FIELD`);
--name names the result files, so a variant does not overwrite the demo recipe's.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from distill_sd.cli import fraction
from distill_sd.demo import FULL, cache_data, distill_config, distill_in_parallel, eval_scenes, evaluate_model
from distill_sd.report import machine, write_results  # machine: CPU model, ISA, cores, versions
from distill_sd.shapes import export_image_folder
from distill_sd.shapes.teacher import teacher_dir

REPO = Path(__file__).resolve().parent.parent
STUDENT = "bk-tiny"
DATA_SEED = 0  # run_demo's default seed: the demo's training split


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=4, help="training seeds 0..N-1 (default %(default)s)")
    p.add_argument("--steps", type=int, default=FULL.steps, help="first step count (demo FULL: %(default)s)")
    p.add_argument("--more", type=int, nargs="*", default=[], help="step counts each run continues to")
    p.add_argument("--prompts", type=int, default=FULL.eval_prompts, help="held-out prompts (demo: %(default)s)")
    p.add_argument("--images", type=int, default=FULL.train_images, help="training images (demo: %(default)s)")
    p.add_argument("--two-object-share", type=fraction, metavar="S",
                   help="training split with exactly this share of two-object scenes (demo: about half)")
    p.add_argument("--student", default=STUDENT, help="catalogue student (default %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="a training setting changed from the demo's recipe, e.g. kd_caption_mix=0 (repeatable)")
    p.add_argument("--name", default="demo_seeds", help="result file name (default %(default)s)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="where NAME.md/.json go")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "distill-sd-bench"),
                   help="scratch folder for data, cache and runs (removed at the end)")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.steps < 1 or any(m <= args.steps for m in args.more):
        p.error("--seeds and --steps must be >= 1, and every --more step count above --steps")
    try:
        args.overrides = parse_overrides(args.overrides)
    except ValueError as e:
        p.error(str(e))
    return args


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """FIELD=VALUE strings as TrainConfig values of the field's type."""
    import dataclasses

    from distill_sd.train import TrainConfig

    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in types:
            raise ValueError(f"--set {item}: expected FIELD=VALUE with a TrainConfig field, such as kd_caption_mix=0")
        kind = types[name]
        out[name] = (value.lower() in ("1", "true", "yes") if kind == "bool" else float(value) if "float" in kind
                     else int(value) if "int" in kind else value)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    command = "python benchmarks/demo_seeds.py" + ("" if not sys.argv[1:] else " " + shlex.join(sys.argv[1:]))
    budget = replace(FULL, train_images=args.images, steps=args.steps, eval_prompts=args.prompts)
    teacher = teacher_dir()
    work = Path(args.workdir) / f"demo_seeds-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    seeds = list(range(args.seeds))
    data = export_image_folder(work / "data", budget.train_images, DATA_SEED, "train",
                               two_object_share=args.two_object_share)
    cache = cache_data(teacher, data, work / "cache")

    finals: dict[tuple[int, int], Path] = {}
    train_s: dict[int, float] = {}
    previous = None
    for steps in [args.steps, *sorted(set(args.more))]:
        configs = {}
        for seed in seeds:
            run = work / f"seed{seed}-{steps}"
            if previous is not None:  # the same run, trained further: its last checkpoint, resumed
                shutil.copytree(work / f"seed{seed}-{previous}" / "checkpoints", run / "checkpoints")
            configs[f"seed{seed}-{steps}"] = distill_config(
                teacher, args.student, cache, run, replace(budget, steps=steps), seed,
                resume_from_checkpoint="latest" if previous is not None else None, **args.overrides)
        t = time.perf_counter()
        done = distill_in_parallel(configs)
        train_s[steps] = time.perf_counter() - t
        finals.update({(seed, steps): done[f"seed{seed}-{steps}"] for seed in seeds})
        print(f"  {len(seeds)} seeds to {steps} steps side by side: {train_s[steps]:.0f} s", flush=True)
        previous = steps

    scenes = eval_scenes(budget.eval_prompts)
    reference = evaluate_model("teacher", teacher, scenes)
    runs = []
    for (seed, steps), final in sorted(finals.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        r = evaluate_model(f"seed{seed}-{steps}", final, scenes, reference=reference)
        runs.append({"seed": seed, "steps": steps, "accuracy": r.accuracy,
                     "vs_teacher": r.accuracy / max(reference.accuracy, 1e-9), "agreement": r.agreement})
        print(f"  seed {seed}, {steps} steps: accuracy {100 * r.accuracy:.1f} % "
              f"({100 * runs[-1]['vs_teacher']:.1f} % of the teacher), agreement {100 * r.agreement:.1f} %", flush=True)

    report = {"benchmark": "demo_seeds", "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": command, "machine": machine(), "student": args.student, "overrides": args.overrides,
              "two_object_share": args.two_object_share,
              "seeds": seeds,
              "budget": asdict(budget), "teacher_accuracy": reference.accuracy, "train_s": train_s,
              "summary": summarise(runs), "runs": runs, "total_wall_s": time.perf_counter() - started}
    written = write_results(args.out, args.name, report, markdown(report))
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {written} and .json ({report['total_wall_s'] / 60:.1f} min)")


def summarise(runs: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per step count: mean, median, min, max over seeds of accuracy / teacher's, accuracy and agreement."""
    out: dict[int, dict[str, Any]] = {}
    for steps in sorted({r["steps"] for r in runs}):
        mine = [r for r in runs if r["steps"] == steps]
        out[steps] = {k: {"mean": statistics.fmean(r[k] for r in mine), "median": statistics.median(r[k] for r in mine),
                          "min": min(r[k] for r in mine), "max": max(r[k] for r in mine)}
                      for k in ("vs_teacher", "accuracy", "agreement")}
    return out


def markdown(rep: dict[str, Any]) -> str:
    def pct(x: float) -> str:
        return f"{100 * x:.1f} %"

    m = rep["machine"]
    share = rep.get("two_object_share")
    split = "" if share is None else f" on a training split {pct(share)} two-object"
    lines = [f"demo_seeds: `{rep['command']}` ({rep['date'][:10]}, {m['cpu']}, {m['cores']} cores, torch {m['torch']}; "
             f"{rep['total_wall_s'] / 60:.0f} min): the demo's {rep['student']} distillation"
             f"{' with ' + ', '.join(f'{k}={v}' for k, v in rep['overrides'].items()) if rep.get('overrides') else ''}"
             f"{split} with training seeds "
             f"{rep['seeds'][0]}..{rep['seeds'][-1]}, scored on {rep['budget']['eval_prompts']} held-out prompts; "
             f"teacher {pct(rep['teacher_accuracy'])}.", "",
             "| steps | of the teacher: mean | median | min-max | accuracy: mean | agreement: mean |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for steps, s in rep["summary"].items():
        v = s["vs_teacher"]
        lines.append(f"| {steps} | {pct(v['mean'])} | {pct(v['median'])} | {pct(v['min'])}-{pct(v['max'])} | "
                     f"{pct(s['accuracy']['mean'])} | {pct(s['agreement']['mean'])} |")
    lines += ["", "| seed | steps | accuracy | of the teacher | agreement |", "| ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['seed']} | {r['steps']} | {pct(r['accuracy'])} | {pct(r['vs_teacher'])} | {pct(r['agreement'])} |"
              for r in rep["runs"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
