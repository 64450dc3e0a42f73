#!/usr/bin/env python
"""omp_wait: how libgomp's idle-thread policy changes a CPU training step, alone and on shared cores.

torch's CPU build runs its kernels on a libgomp (GNU OpenMP) thread team. Between parallel regions the
idle threads either spin (libgomp's default: up to 300,000 iterations) or sleep (OMP_WAIT_POLICY=PASSIVE).
Spinning is fastest when the process has the cores to itself and ruinous when another busy process shares
them; GOMP_SPINCOUNT bounds the spin. Each variant times one training step of the shipped shapes teacher's
U-Net (fp32, AdamW, the teacher script's batch of 32 latents, all cores' threads) in a fresh process:
"alone", and "shared" with a second identical process running at the same time. Variants are interleaved
round by round and every figure is a median, so drifting machine load hits them alike.

    python benchmarks/omp_wait.py                    # ~5 min on 2 cores
    python benchmarks/omp_wait.py --rounds 1 --steps 3   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

VARIANTS = {  # environment of each variant (everything else inherited, minus the two variables)
    "spin (libgomp default)": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "passive + spin 2000": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "2000"},
}


def worker(steps: int, batch: int) -> None:
    """Print the median wall time of `steps` training steps after one warm-up step."""
    # torch (third-party) is imported before distill_sd: libgomp reads the variant's environment as torch loads
    # it, so the package's defaults, set when distill_sd is imported, do not touch the variant under test.
    import time

    import torch
    from diffusers import UNet2DConditionModel

    from distill_sd.shapes.teacher import teacher_dir

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(teacher_dir(), subfolder="unet", torch_dtype=torch.float32)
    c = unet.config
    x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size)
    t = torch.randint(0, 1000, (batch,))
    text = torch.randn(batch, 77, c.cross_attention_dim)
    opt = torch.optim.AdamW(unet.parameters(), 1e-4)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        unet(x, t, text).sample.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    print(json.dumps({"s_per_step": statistics.median(times[1:])}))


def run(env_changes: dict[str, str], copies: int, steps: int, batch: int) -> list[float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(env_changes)
    cmd = [sys.executable, __file__, "--worker", "--steps", str(steps), "--batch", str(batch)]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(copies)]
    return [json.loads(p.communicate()[0].strip().splitlines()[-1])["s_per_step"] for p in procs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.steps, args.batch)
    results: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for name, env in VARIANTS.items():
            for setting, copies in (("alone", 1), ("shared", 2)):
                results.setdefault((name, setting), []).extend(run(env, copies, args.steps, args.batch))
                print(f"round {r + 1}/{args.rounds} {name:<24} {setting}: "
                      f"{results[(name, setting)][-1]:.3f} s/step", file=sys.stderr, flush=True)
    base = {s: statistics.median(results[("passive", s)]) for s in ("alone", "shared")}
    print(f"\nU-Net training step, shipped shapes teacher, batch {args.batch}, {os.cpu_count()} cores, "
          f"median of {args.rounds} rounds (s/step, and x passive):\n")
    print("| variant | alone | shared with a second process |\n|---|---:|---:|")
    for name in VARIANTS:
        cells = [f"{(m := statistics.median(results[(name, s)])):.3f} ({m / base[s]:.2f}x)" for s in ("alone", "shared")]
        print(f"| {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
