#!/usr/bin/env python
"""kd_step: one distillation step, OURS (the distill-sd product path) vs a REFERENCE-STYLE step.

Same teacher, same bk-tiny student, same batch, resolution, seed, data order and random draws; each
measured run in its own fresh subprocess, the variants interleaved (ours, ref, ours, ref, ...), and
every figure a median over runs, so other load on shared cores hits both variants alike.

OURS       `distill-sd cache` once (timed separately), then per run
           `distill-sd distill --cache C --mixed_precision bf16 --recipe bk-sdm ...`;
           s/step = median of history.jsonl "sec" after the warm-up steps.
REFERENCE  what segmind's distill_training.py / BK-SDM do, written out below (`reference_run`): fp32
           teacher pipeline loaded from its components, every step VAE-encodes the pixels and
           text-encodes the captions, fp32 teacher forward under no_grad, features captured by forward
           hooks into dicts keyed by name (teacher copies detached and cloned), the same loss function
           (distill_sd.kd.distillation_loss, weights 1/1/1, plain feature sum), AdamW lr 5e-5, clip 1.0.

Both variants draw latents-noise, noise and timesteps from a generator seeded exactly as
distill_sd.train seeds its step generator, and read the examples in the same per-epoch order, so the
loss of step k is computed on the same inputs in both: any loss difference is precision (bf16 vs fp32).

Peak memory per run: ru_maxrss of that child (os.wait4, the whole process) and psutil polling (every
50 ms) split by phase via history.jsonl: "train peak" = up to the end of the last step (loading
included); ours then also writes its final checkpoint and pipeline, which only ru_maxrss sees.
CPU s/step (user + sys of the process between two history lines) is reported next to wall s/step: on
shared cores it moves far less than wall time. The reference loop also records per-phase wall times.

    python benchmarks/kd_step.py                      # defaults: full-width SD-1.5, 128 px, batch 2 (~15-25 min)
    python benchmarks/kd_step.py --extra              # + "ours-fp32" (--mixed_precision no) and "ours-tbf16"
                                                      #   (--mixed_precision no --teacher_dtype bf16)
    python benchmarks/kd_step.py --narrow --resolution 64 --steps 4 --warmup 2 --runs 2   # smoke test, ~1 min
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import distill_sd  # noqa: F401  (sets torch's OpenMP wait policy before torch loads; see its __init__)
from distill_sd.report import machine, run_lines, write_results  # noqa: E402  (machine: CPU model, ISA, cores, versions)

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("ours", "ref")  # always measured; --extra adds EXTRA (the same command with other precision flags)
EXTRA = {"ours-fp32": ["--mixed_precision", "no"],
         "ours-tbf16": ["--mixed_precision", "no", "--teacher_dtype", "bf16"]}
REF_PHASES = ("data", "vae_and_text_encode", "student_fwd", "teacher_fwd", "loss_and_backward", "clip_and_adamw")
LABELS = {"ours": "ours (cache + bf16, distill-sd distill)", "ref": "reference-style (fp32, encoders every step)",
          "ours-fp32": "ours with --mixed_precision no (cache, fp32)",
          "ours-tbf16": "ours, fp32 student + bf16 teacher (--mixed_precision no --teacher_dtype bf16)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sd15", choices=["sd15", "sd21"], help="reference teacher architecture")
    p.add_argument("--narrow", action="store_true", help="narrow reference widths (fast; memory ratios meaningless)")
    p.add_argument("--resolution", type=int, default=128, help="pixels (latents are 1/8)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="optimisation steps per run")
    p.add_argument("--warmup", type=int, default=2, help="first steps of each run not measured")
    p.add_argument("--runs", type=int, default=5, help="measured runs per variant (interleaved)")
    p.add_argument("--images", type=int, default=64, help="dataset size (shapes world, 64x64 images)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "distill-sd-bench"),
                   help="teacher, dataset and runs live here; teacher and dataset are reused if present")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"), help="where kd_step.md/.json go")
    p.add_argument("--extra", action="store_true",
                   help="also measure ours-fp32 and ours-tbf16 (fp32 student, bf16 teacher), interleaved")
    p.add_argument("--keep-runs", action="store_true", help="keep each ours run's checkpoint and final pipeline")
    p.add_argument("--reference-run", metavar="OUT", help=argparse.SUPPRESS)  # internal: one reference-style run
    p.add_argument("--teacher", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.resolution % 8 or args.resolution <= 0:
        p.error("--resolution must be a positive multiple of 8")
    if not 0 <= args.warmup < args.steps:
        p.error("--warmup must be >= 0 and < --steps")
    return args


# ============================================================================ the reference-style step

def reference_run(args: argparse.Namespace) -> None:
    """One run of a segmind/BK-SDM-style distillation loop, written plainly; history.jsonl like ours."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    from distill_sd.kd import LossWeights, distillation_loss
    from distill_sd.students import CATALOGUE
    from distill_sd.surgery import build_student, plan_student

    out, teacher_dir, seed = Path(args.reference_run), args.teacher, args.seed
    out.mkdir(parents=True, exist_ok=False)

    # -- models: every component in fp32, as the reference scripts load them ----------------------------
    tokenizer = CLIPTokenizer.from_pretrained(teacher_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(teacher_dir, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(teacher_dir, subfolder="vae")
    teacher = UNet2DConditionModel.from_pretrained(teacher_dir, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_config(
        json.loads((Path(teacher_dir) / "scheduler" / "scheduler_config.json").read_text()))
    plan = plan_student(teacher.config, CATALOGUE["bk-tiny"])
    student, _ = build_student(teacher, plan)
    for m in (text_encoder, vae, teacher):
        m.requires_grad_(False)
    student.train()

    # -- feature hooks, segmind-style: dicts keyed by module name -----------------------------------------
    acts_tea: dict[str, torch.Tensor] = {}
    acts_stu: dict[str, torch.Tensor] = {}

    def get_activation(store: dict, name: str, copy: bool):
        def hook(module, inputs, output):
            feat = output[0] if isinstance(output, tuple) else output
            store[name] = feat.detach().clone() if copy else feat
        return hook

    s_modules, t_modules = dict(student.named_modules()), dict(teacher.named_modules())
    for s_name, t_name in plan.kd_pairs:
        s_modules[s_name].register_forward_hook(get_activation(acts_stu, s_name, copy=False))
        t_modules[t_name].register_forward_hook(get_activation(acts_tea, t_name, copy=True))

    optimizer = torch.optim.AdamW(student.parameters(), lr=5e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    weights = LossWeights(1.0, 1.0, 1.0, "none")  # BK-SDM: task + out + sum of feature MSEs

    # -- data: the image folder, resized like the training transform, in the product's epoch order -------
    data = Path(args.data)
    records = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines() if line.strip()]
    res = args.resolution

    def load(i: int) -> torch.Tensor:
        image = Image.open(data / records[i]["file_name"]).convert("RGB")
        w, h = image.size
        scale = res / min(w, h)
        image = image.resize((max(res, int(w * scale)), max(res, int(h * scale))), Image.Resampling.BILINEAR)
        image = image.crop((0, 0, res, res))  # the shapes images are square: the crop is the whole image
        return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0

    def batches():
        epoch = 0
        while True:  # same permutation per epoch as distill_sd.train.EpochSampler (one process)
            order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
            for k in range(0, len(order) - args.batch + 1, args.batch):
                idx = order[k:k + args.batch].tolist()
                yield torch.stack([load(i) for i in idx]), [records[i]["text"] for i in idx]
            epoch += 1

    # -- the loop ----------------------------------------------------------------------------------------
    history = open(out / "history.jsonl", "a")
    data_iter = batches()
    step_started = time.perf_counter()
    for step in range(args.steps):
        clock = [time.perf_counter()]  # phase boundaries (reported, not used)
        pixels, captions = next(data_iter)
        clock.append(time.perf_counter())
        # the same per-step generator as distill_sd.train (seed, step, micro-batch 0, process 0)
        g = torch.Generator().manual_seed(_mix(seed, step, 0, 0))
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample(generator=g) * vae.config.scaling_factor
            input_ids = tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length",
                                  truncation=True, return_tensors="pt").input_ids
            encoder_hidden_states = text_encoder(input_ids)[0]
        clock.append(time.perf_counter())
        noise = torch.randn(latents.shape, generator=g)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g).long()
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
            noise_scheduler.get_velocity(latents, noise, timesteps)  # SD-2.1: v-prediction
        pred = student(noisy, timesteps, encoder_hidden_states).sample
        clock.append(time.perf_counter())
        with torch.no_grad():
            teacher_pred = teacher(noisy, timesteps, encoder_hidden_states).sample
        clock.append(time.perf_counter())
        terms = distillation_loss(pred, target, weights, teacher_pred,
                                  [acts_stu[s] for s, _ in plan.kd_pairs], [acts_tea[t] for _, t in plan.kd_pairs])
        terms["loss"].backward()
        clock.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        acts_tea.clear()
        acts_stu.clear()
        losses = {k: float(v.detach()) for k, v in terms.items()}
        clock.append(time.perf_counter())
        line = {"step": step + 1, **losses, "lr": 5e-5, "sec": time.perf_counter() - step_started,
                "phases": dict(zip(REF_PHASES, (b - a for a, b in zip(clock, clock[1:]))))}
        history.write(json.dumps(line) + "\n")
        history.flush()
        step_started = time.perf_counter()
    history.close()


def _mix(*values: int) -> int:
    """distill_sd.train._mix, repeated here so the reference loop stands on its own."""
    h = 1469598103934665603
    for v in values:
        h = ((h ^ (v & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 61)
    return h


# ============================================================================ measuring subprocesses

def child_env() -> dict[str, str]:
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def measure(cmd: list[str], log: Path, history: Path | None = None, n_steps: int = 0) -> dict:
    """Run `cmd` in a fresh process: wall time, ru_maxrss, and RSS peaks by phase (psutil, 50 ms)."""
    import psutil

    t0 = time.perf_counter()
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO)
    peaks = {"setup_and_step1": 0, "steps": 0, "after_last_step": 0}
    cpu_at_line: dict[int, float] = {}  # process CPU seconds (user + sys) when history.jsonl reached n lines
    stop = threading.Event()

    def poll() -> None:
        try:
            ps = psutil.Process(proc.pid)
        except psutil.Error:
            return
        size, lines = -1, 0
        while not stop.is_set():
            try:
                rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
                cpu = ps.cpu_times()
            except psutil.Error:
                return
            if history is not None:
                try:
                    s = history.stat().st_size
                    if s != size:
                        size, lines = s, history.read_text().count("\n")
                        cpu_at_line.setdefault(lines, cpu.user + cpu.system)
                except FileNotFoundError:  # not written yet
                    pass
            phase = "setup_and_step1" if lines == 0 else "steps" if lines < n_steps else "after_last_step"
            peaks[phase] = max(peaks[phase], rss)
            stop.wait(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not all children's
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    stop.set()
    poller.join()
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"failed ({proc.returncode}): {shlex.join(cmd)}\n  " + "\n  ".join(tail))
    mb = 1 / 2**20
    return {"wall_s": wall, "ru_maxrss_mb": usage.ru_maxrss / 1024,  # Linux: KiB
            "user_s": usage.ru_utime, "sys_s": usage.ru_stime, "minor_faults": usage.ru_minflt,
            "train_peak_mb": max(peaks["setup_and_step1"], peaks["steps"]) * mb,
            # CPU seconds of step k = CPU when line k appeared - CPU when line k-1 appeared (50 ms polling);
            # less sensitive than wall time to other processes on the cores (not immune: caches, bandwidth)
            "cpu_sec": {k: cpu_at_line[k] - cpu_at_line[k - 1] for k in range(2, n_steps + 1)
                        if k in cpu_at_line and k - 1 in cpu_at_line},
            "poll_peaks_mb": {k: v * mb for k, v in peaks.items()}}


def read_history(path: Path, warmup: int) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    measured = rows[warmup:]
    phases = {p: statistics.median(r["phases"][p] for r in measured) for p in REF_PHASES} if "phases" in rows[0] else None
    return {"steps": rows, "sec": [r["sec"] for r in measured], "loss": [r["loss"] for r in measured],
            "median_phases": phases,
            "median_sec": statistics.median(r["sec"] for r in measured),
            "median_loss": statistics.median(r["loss"] for r in measured)}


# ============================================================================ set-up

def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "distill_sd", *args]


def prepare(args: argparse.Namespace, wd: Path) -> tuple[Path, Path]:
    """The reference teacher pipeline and the dataset, created once and reused."""
    wd.mkdir(parents=True, exist_ok=True)
    teacher = wd / f"teacher-{args.arch}{'-narrow' if args.narrow else ''}"
    if not (teacher / "model_index.json").is_file():
        shutil.rmtree(teacher, ignore_errors=True)
        print(f"creating the reference {args.arch} teacher in {teacher} (once) ...", flush=True)
        cmd = cli("reference", "--arch", args.arch, "--out", str(teacher), *(["--narrow"] if args.narrow else []))
        subprocess.run(cmd, check=True, env=child_env(), cwd=REPO, stdout=subprocess.DEVNULL)
    data = wd / f"shapes-{args.images}-seed{args.seed}"
    if not (data / "metadata.jsonl").is_file():
        shutil.rmtree(data, ignore_errors=True)
        code = ("import sys; from distill_sd.shapes import export_image_folder; "
                "export_image_folder(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))")
        subprocess.run([sys.executable, "-c", code, str(data), str(args.images), str(args.seed)], check=True,
                       env=child_env(), cwd=REPO)
    return teacher, data


# ============================================================================ the benchmark

def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.reference_run:
        reference_run(args)
        return
    started = time.perf_counter()
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    command = "python benchmarks/kd_step.py" + ("" if not sys.argv[1:] else " " + shlex.join(sys.argv[1:]))
    wd = Path(args.workdir)
    teacher, data = prepare(args, wd)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    runs_dir = wd / f"kd_step-{stamp}"
    runs_dir.mkdir(parents=True)
    print(f"kd_step: {args.arch}{' narrow' if args.narrow else ''} teacher, bk-tiny student, {args.resolution} px, "
          f"batch {args.batch}, {args.steps} steps ({args.warmup} warm-up) x {args.runs} runs per variant; "
          f"runs in {runs_dir}", flush=True)

    # one-off: the cache (not part of any step)
    cache = runs_dir / "cache"
    cache_cmd = cli("cache", "--base", str(teacher), "--data", str(data), "--out", str(cache),
                    "--resolution", str(args.resolution))
    cache_m = measure(cache_cmd, runs_dir / "cache.log")
    print(f"  cache: {cache_m['wall_s']:.1f} s, peak RSS {cache_m['ru_maxrss_mb']:.0f} MiB (one-off)", flush=True)

    common = ["--max_train_steps", str(args.steps), "--train_batch_size", str(args.batch),
              "--resolution", str(args.resolution), "--seed", str(args.seed)]
    variants = (*VARIANTS, *EXTRA) if args.extra else VARIANTS
    results: dict[str, list[dict]] = {v: [] for v in variants}
    commands = {}
    for r in range(args.runs):
        for variant in variants:  # interleaved: ours, ref, ours, ref, ...
            out = runs_dir / f"{variant}-{r}"
            if variant.startswith("ours"):
                precision = EXTRA.get(variant, ["--mixed_precision", "bf16"])
                cmd = cli("distill", "--teacher", str(teacher), "--student", "bk-tiny", "--cache", str(cache),
                          "--recipe", "bk-sdm", *precision, "--report_to", "none", "--no-progress",
                          "--checkpointing_steps", "1000000", "--out", str(out), *common)
            else:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--reference-run", str(out),
                       "--teacher", str(teacher), "--data", str(data), "--resolution", str(args.resolution),
                       "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--seed", str(args.seed)]
            commands[variant] = cmd
            m = measure(cmd, runs_dir / f"{variant}-{r}.log", out / "history.jsonl", args.steps)
            m.update(read_history(out / "history.jsonl", args.warmup))
            results[variant].append(m)
            if variant.startswith("ours") and not args.keep_runs:  # multi-GB checkpoint + final pipeline
                shutil.rmtree(out / "checkpoints", ignore_errors=True)
                shutil.rmtree(out / "final", ignore_errors=True)
            print(f"  run {r + 1}/{args.runs} {variant:9s}: {m['median_sec']:.2f} s/step "
                  f"(steps {', '.join(f'{s:.2f}' for s in m['sec'])}), train peak {m['train_peak_mb']:.0f} MiB, "
                  f"process peak {m['ru_maxrss_mb']:.0f} MiB, loss {m['median_loss']:.4f}, wall {m['wall_s']:.0f} s "
                  f"(user {m['user_s']:.0f} s, sys {m['sys_s']:.0f} s, {m['minor_faults'] / 1e6:.1f} M page faults)",
                  flush=True)

    summary = summarise(results, args)
    report = {"benchmark": "kd_step", "date": date, "command": command, "machine": machine(),
              "config": {k: getattr(args, k) for k in ("arch", "narrow", "resolution", "batch", "steps", "warmup",
                                                       "runs", "images", "seed")},
              "cache_one_off": {"wall_s": cache_m["wall_s"], "peak_rss_mb": cache_m["ru_maxrss_mb"],
                                "command": shlex.join(cache_cmd)},
              "variant_commands": {v: shlex.join(c) for v, c in commands.items()},
              "summary": summary, "runs": results,
              "total_wall_s": time.perf_counter() - started}
    written = write_results(args.results, "kd_step", report, markdown(report))
    print(f"wrote {written} and .json  (total {report['total_wall_s'] / 60:.1f} min)")


def _q(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def summarise(results: dict[str, list[dict]], args: argparse.Namespace) -> dict:
    s: dict = {}
    for v, runs in results.items():
        per_run = [m["median_sec"] for m in runs]
        all_steps = [x for m in runs for x in m["sec"]]
        cpu = [statistics.median(x for k, x in m["cpu_sec"].items() if int(k) > max(args.warmup, 1))
               for m in runs if any(int(k) > max(args.warmup, 1) for k in m["cpu_sec"])]
        s[v] = {"median_s_per_step": statistics.median(per_run), "min_run": min(per_run), "max_run": max(per_run),
                "median_cpu_s_per_step": statistics.median(cpu) if cpu else None,
                "iqr_steps": _q(all_steps),
                "train_peak_mb": statistics.median(m["train_peak_mb"] for m in runs),
                "process_peak_mb": statistics.median(m["ru_maxrss_mb"] for m in runs),
                "median_loss": statistics.median(x for m in runs for x in m["loss"]),
                "median_wall_s": statistics.median(m["wall_s"] for m in runs)}
    if results["ref"][0]["median_phases"]:
        s["ref"]["median_phases"] = {p: statistics.median(m["median_phases"][p] for m in results["ref"])
                                     for p in REF_PHASES}
    o, r = s["ours"], s["ref"]
    paired_time = [a["median_sec"] / b["median_sec"] for a, b in zip(results["ours"], results["ref"])]
    # the same step of both variants sees the same inputs: compare losses step by step
    paired_loss = [abs(a - b) / abs(b) for ra, rb in zip(results["ours"], results["ref"])
                   for a, b in zip(ra["loss"], rb["loss"])]
    s["ratios"] = {
        "time_ours_over_ref": o["median_s_per_step"] / r["median_s_per_step"],
        "time_paired_median": statistics.median(paired_time),
        "speedup_ref_over_ours": r["median_s_per_step"] / o["median_s_per_step"],
        "cpu_time_ours_over_ref": (o["median_cpu_s_per_step"] / r["median_cpu_s_per_step"]
                                   if o["median_cpu_s_per_step"] and r["median_cpu_s_per_step"] else None),
        "train_peak_ours_over_ref": o["train_peak_mb"] / r["train_peak_mb"],
        "process_peak_ours_over_ref": o["process_peak_mb"] / r["process_peak_mb"],
        "loss_rel_diff_of_medians": (o["median_loss"] - r["median_loss"]) / r["median_loss"],
        "loss_rel_diff_per_step_median": statistics.median(paired_loss),
        "loss_rel_diff_per_step_max": max(paired_loss),
    }
    for v in EXTRA:
        if v in results:
            f, key = s[v], v.replace("-", "_")
            s["ratios"][f"time_{key}_over_ref"] = f["median_s_per_step"] / r["median_s_per_step"]
            s["ratios"][f"time_{key}_paired"] = statistics.median(
                a["median_sec"] / b["median_sec"] for a, b in zip(results[v], results["ref"]))
            s["ratios"][f"train_peak_{key}_over_ref"] = f["train_peak_mb"] / r["train_peak_mb"]
            s["ratios"][f"loss_{key}_rel_diff"] = (f["median_loss"] - r["median_loss"]) / r["median_loss"]
    s["goals"] = {"speed (ours >= 1.5x faster)": s["ratios"]["speedup_ref_over_ours"] >= 1.5,
                  "memory (ours <= 0.7x train peak)": s["ratios"]["train_peak_ours_over_ref"] <= 0.7}
    return s


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _phases_line(phases: dict, total: float) -> str:
    parts = ", ".join(f"{p.replace('_', ' ')} {v:.2f} s" for p, v in phases.items())
    return (f"- Reference step, median per phase: {parts} (sum {sum(phases.values()):.2f} s; median step {total:.2f} s). "
            "Ours does the same student forward/backward/AdamW work (fp32 weights and optimizer, under bf16 autocast), "
            "and replaces the encoders by the cache and the fp32 teacher forward by a bf16 one.")


def markdown(rep: dict) -> str:
    s, m, c = rep["summary"], rep["machine"], rep["config"]
    ratios = s["ratios"]
    lines = [
        f"kd_step: {c['arch']}{' (narrow)' if c['narrow'] else ' full width'} random-weight teacher -> bk-tiny student, "
        f"{c['resolution']} px, batch {c['batch']}, {c['steps']} steps per run ({c['warmup']} warm-up dropped), "
        f"{c['runs']} interleaved runs per variant, each in a fresh process.",
        "",
        "| variant | s/step (median of runs) | run medians min-max | IQR of all steps | CPU s/step | "
        "train peak RSS MiB | process peak RSS MiB | median loss | wall per run s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for v in [v for v in LABELS if v in s]:
        x = s[v]
        lines.append(f"| {LABELS[v]} | {x['median_s_per_step']:.2f} | {x['min_run']:.2f}-{x['max_run']:.2f} | "
                     f"{x['iqr_steps'][0]:.2f}-{x['iqr_steps'][1]:.2f} | {_f(x['median_cpu_s_per_step'])} | "
                     f"{x['train_peak_mb']:,.0f} | "
                     f"{x['process_peak_mb']:,.0f} | {x['median_loss']:.4f} | {x['median_wall_s']:.0f} |")
    lines.append(f"| **ours / ref** | **{ratios['time_ours_over_ref']:.2f}x** (paired {ratios['time_paired_median']:.2f}x; "
                 f"speed-up {ratios['speedup_ref_over_ours']:.2f}x) | | | {_f(ratios['cpu_time_ours_over_ref'])}x | "
                 f"**{ratios['train_peak_ours_over_ref']:.2f}x** | "
                 f"{ratios['process_peak_ours_over_ref']:.2f}x | {ratios['loss_rel_diff_of_medians']:+.1%} | |")
    for v in [v for v in EXTRA if v in s]:
        f, r, key = s[v], s["ref"], v.replace("-", "_")
        cpu = (f["median_cpu_s_per_step"] / r["median_cpu_s_per_step"]
               if f["median_cpu_s_per_step"] and r["median_cpu_s_per_step"] else None)
        lines.append(f"| {v} / ref | {ratios[f'time_{key}_over_ref']:.2f}x "
                     f"(paired {ratios[f'time_{key}_paired']:.2f}x) "
                     f"| | | {_f(cpu)}x | {ratios[f'train_peak_{key}_over_ref']:.2f}x | "
                     f"{f['process_peak_mb'] / r['process_peak_mb']:.2f}x | {ratios[f'loss_{key}_rel_diff']:+.1%} | |")
    lines += [
        "",
        f"- Goals: ours >= 1.5x faster: **{'met' if s['goals']['speed (ours >= 1.5x faster)'] else 'NOT met'}** "
        f"({ratios['speedup_ref_over_ours']:.2f}x); ours <= 0.7x peak memory: "
        f"**{'met' if s['goals']['memory (ours <= 0.7x train peak)'] else 'NOT met'}** "
        f"({ratios['train_peak_ours_over_ref']:.2f}x train peak, {ratios['process_peak_ours_over_ref']:.2f}x whole process).",
        f"- Loss (same inputs at every step, bf16 vs fp32): medians differ by {ratios['loss_rel_diff_of_medians']:+.2%}; "
        f"step-by-step |relative difference| median {ratios['loss_rel_diff_per_step_median']:.2%}, "
        f"max {ratios['loss_rel_diff_per_step_max']:.2%}.",
        *([_phases_line(s["ref"]["median_phases"], s["ref"]["median_s_per_step"])] if "median_phases" in s["ref"] else []),
        f"- One-off `distill-sd cache` ({rep['config']['images']} images): {rep['cache_one_off']['wall_s']:.1f} s, "
        f"peak RSS {rep['cache_one_off']['peak_rss_mb']:,.0f} MiB (not in any step).",
        "- s/step: wall time of one optimisation step incl. data (history.jsonl `sec`). CPU s/step: the process's "
        "user + sys CPU seconds per measured step (50 ms polling), less sensitive to other load. Train peak RSS: psutil "
        "polling (50 ms) from process start to the end of the last step, loading included. Process peak: "
        "ru_maxrss of the whole child process; for ours it includes the final checkpoint and pipeline save.",
        f"- Machine: {m['cpu']} ({', '.join(m['isa'])}), {m['cores']} cores, {m['ram_mb'] / 1024:.0f} GB RAM; "
        f"torch {m['torch']}, diffusers {m['diffusers']}, transformers {m['transformers']}, accelerate {m['accelerate']}, "
        f"Python {m['python']}.",
        *run_lines(rep),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
