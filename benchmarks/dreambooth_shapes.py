#!/usr/bin/env python
"""dreambooth_shapes: DreamBooth on the shapes teacher, with and without prior preservation, measured exactly.

The subject is a yellow triangle, a held-out pair the teacher has never seen drawn: --instances images of it (one
object each, rendered by the shapes world) captioned "a sks triangle". `distill-sd lora` trains rank-8 adapters on
them twice, the same steps, lr and seed: once plain, once with prior preservation (--class_prompt "a triangle": the
teacher first draws --class-images triangles of its own, and every batch pairs them with the instances). Every model
then draws --samples images of each prompt (DPM++ 20 steps, guidance 4, seeds 1000 + i), and the shapes scorer reads
the largest object of each: how often "a sks triangle" is the subject (learned), and how often plain "a triangle"
has turned into it too (language drift, which prior preservation exists to prevent).

    python benchmarks/dreambooth_shapes.py                   # ~3 min
    python benchmarks/dreambooth_shapes.py --steps 2 --samples 2 --class-images 2 --out /tmp/db-smoke
"""

from __future__ import annotations

import argparse
import collections
import datetime
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from distill_sd.cli import main as cli
from distill_sd.generate import load_pipeline
from distill_sd.report import machine, machine_line, markdown_table, write_results
from distill_sd.shapes.scorer import detect_objects
from distill_sd.shapes.teacher import EVAL_GUIDANCE, EVAL_SCHEDULER, EVAL_STEPS, teacher_dir
from distill_sd.shapes.world import HELDOUT_COMBOS, render_scene, sample_scenes

REPO = Path(__file__).resolve().parent.parent
SUBJECT = ("triangle", "yellow")  # a held-out pair: never drawn in the teacher's training
assert SUBJECT in HELDOUT_COMBOS
INSTANCE_PROMPT, CLASS_PROMPT = "a sks triangle", "a triangle"
SAMPLE_SEED = 1000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, default=4, help="images of the subject (default %(default)s)")
    p.add_argument("--class-images", type=int, default=64, help="class images for prior preservation (%(default)s)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--samples", type=int, default=32, help="images drawn per model and prompt (%(default)s)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="where dreambooth_shapes.md/.json go")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "distill-sd-bench"),
                   help="scratch folder for data and runs (removed at the end)")
    args = p.parse_args(argv)
    if min(args.instances, args.class_images, args.steps, args.rank, args.samples) < 1:
        p.error("every count must be >= 1")
    return args


def subject_images(folder: Path, n: int) -> Path:
    """n one-object scenes of the subject, drawn by the shapes world (sizes and positions vary)."""
    folder.mkdir(parents=True)
    scenes = (s for s in sample_scenes(50 * n, 5, "heldout")
              if len(s.objects) == 1 and (s.objects[0].shape, s.objects[0].colour) == SUBJECT)
    for i, scene in zip(range(n), scenes):
        render_scene(scene).save(folder / f"{i}.png")
    return folder


def drawn(pipe: Any, prompt: str, n: int) -> collections.Counter:
    """(colour, shape) of the largest object in each of n images of `prompt` ("nothing": none detected)."""
    found: collections.Counter = collections.Counter()
    for start in range(0, n, 16):
        seeds = range(SAMPLE_SEED + start, SAMPLE_SEED + min(n, start + 16))
        images = pipe([prompt] * len(seeds), num_inference_steps=EVAL_STEPS, guidance_scale=EVAL_GUIDANCE,
                      generator=[torch.Generator().manual_seed(s) for s in seeds]).images
        for image in images:
            objects = detect_objects(image)
            top = max(objects, key=lambda o: o.area) if objects else None
            found[f"{top.colour} {top.shape}" if top else "nothing"] += 1
    return found


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    command = "python benchmarks/dreambooth_shapes.py" + ("" if not sys.argv[1:] else " " + shlex.join(sys.argv[1:]))
    teacher = teacher_dir()
    work = Path(args.workdir) / f"dreambooth_shapes-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    instances = subject_images(work / "instances", args.instances)
    runs: dict[str, Path | None] = {"teacher (as shipped)": None}
    train_s: dict[str, float] = {}
    for name, extra in (("DreamBooth LoRA", []),
                        ("DreamBooth LoRA + prior preservation",
                         ["--class_prompt", CLASS_PROMPT, "--num_class_images", str(args.class_images),
                          "--validation_inference_steps", str(EVAL_STEPS)])):
        out = work / f"run{len(runs)}"
        t = time.perf_counter()
        code = cli(["lora", "--student", str(teacher), "--data", str(instances), "--instance_prompt", INSTANCE_PROMPT,
                    "--out", str(out), "--rank", str(args.rank), "--learning_rate", str(args.learning_rate),
                    "--max_train_steps", str(args.steps), "--train_batch_size", str(min(4, args.instances)),
                    "--checkpointing_steps", str(args.steps), "--report_to", "none", "--no-progress", *extra])
        if code != 0:
            raise SystemExit(f"{name}: training failed")
        train_s[name] = time.perf_counter() - t
        runs[name] = out / "final"
    subject = f"{SUBJECT[1]} {SUBJECT[0]}"
    rows = []
    for name, lora in runs.items():
        pipe = load_pipeline(str(teacher), device="cpu", dtype="fp32", scheduler=EVAL_SCHEDULER, lora=lora)
        pipe.set_progress_bar_config(disable=True)
        learned, kept = (drawn(pipe, p, args.samples) for p in (INSTANCE_PROMPT, CLASS_PROMPT))
        rows.append({"run": name, "train_s": train_s.get(name), "instance_prompt": dict(learned),
                     "class_prompt": dict(kept), "subject_share": learned[subject] / args.samples,
                     "drift_share": kept[subject] / args.samples})
        print(f"  {name}: '{INSTANCE_PROMPT}' -> {dict(learned)}; '{CLASS_PROMPT}' -> {dict(kept)}", flush=True)
    report = {"benchmark": "dreambooth_shapes", "command": command,
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine(),
              "subject": subject, "instances": args.instances, "class_images": args.class_images, "steps": args.steps,
              "rank": args.rank, "learning_rate": args.learning_rate, "samples": args.samples, "rows": rows,
              "total_wall_s": time.perf_counter() - started}
    written = write_results(args.out, "dreambooth_shapes", report, markdown(report))
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {written} and .json ({report['total_wall_s'] / 60:.1f} min)")


def markdown(rep: dict[str, Any]) -> str:
    def common(found: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(found.items(), key=lambda kv: -kv[1]))

    n = rep["samples"]
    lines = [f"dreambooth_shapes: `{rep['command']}` ({rep['date'][:10]}, {machine_line(rep['machine'])}; "
             f"{rep['total_wall_s'] / 60:.1f} min): {rep['instances']} images of a {rep['subject']} (a held-out pair) "
             f"as '{INSTANCE_PROMPT}', LoRA rank {rep['rank']}, {rep['steps']} steps at lr {rep['learning_rate']:g}; "
             f"prior preservation with {rep['class_images']} class images of '{CLASS_PROMPT}'. Largest object of "
             f"{n} images per prompt.", ""]
    table = [[r["run"], f"{r['train_s']:.0f} s" if r["train_s"] else "-",
              f"{round(r['subject_share'] * n)} / {n}", common(r["instance_prompt"]),
              f"{round(r['drift_share'] * n)} / {n}", common(r["class_prompt"])] for r in rep["rows"]]
    lines.append(markdown_table(["run", "training", f"'{INSTANCE_PROMPT}' is the subject", "what it draws",
                                 f"'{CLASS_PROMPT}' drifted to it", "what it draws"], table))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
