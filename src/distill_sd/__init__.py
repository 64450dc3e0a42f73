"""distill-sd: smaller, faster Stable Diffusion by block removal and knowledge distillation."""

import os

# How torch's CPU threads (libgomp) wait between parallel regions; must be set before torch loads OpenMP,
# hence here, where every entry point (CLI, teacher script, benchmarks, tests) passes first. libgomp's default
# spins up to 300,000 times: fastest when the process has the cores to itself, but on shared cores (2-core CI,
# a second process, a data worker) a spinning thread stalls the others. PASSIVE alone sleeps at once and pays a
# wake-up per region; a short spin first (GOMP_SPINCOUNT, which takes precedence over the policy) gets most of
# the spinning speed back. benchmarks/omp_wait.py measures the three, alone and shared (figures in its README).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "2000")

__version__ = "0.1.0"
