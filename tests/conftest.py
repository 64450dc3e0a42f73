"""Shared fixtures: narrow random-weight teachers of the real SD-1, SD-2 and SDXL topologies."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest

import distill_sd  # noqa: F401  (sets torch's OpenMP wait policy before torch loads; see its __init__)

# No set_num_threads here: in-process runs must use the same thread count as the CLI subprocesses they
# are compared with (float reductions depend on it), i.e. torch's default.


@pytest.fixture(scope="session")
def narrow_dirs(tmp_path_factory):
    """Saved narrow reference pipelines: {"sd15": path, "sd21": path, "sdxl": path}, built once per session."""
    from distill_sd.models import save_pipeline
    from distill_sd.reference import ARCHS, reference_pipeline

    root = tmp_path_factory.mktemp("narrow")
    return {arch: save_pipeline(reference_pipeline(arch, narrow=True, seed=1), root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def launch_two_processes():
    """`launch(argv)`: `distill-sd ARGV` as two CPU processes under `accelerate launch` (DDP); fails on error."""
    import subprocess
    import sys

    def launch(argv: list[str]) -> None:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "distill_sd", *argv]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]

    return launch


@pytest.fixture(autouse=True)
def _default_sigchld():
    """Undo torch's process-wide SIGCHLD handler after a test that used DataLoader workers.

    torch installs a Python SIGCHLD handler for worker processes and never removes it. Later, when a test kills a
    child process, the handler is invoked on the main thread; on this AMX machine (after OpenVINO/oneDNN ran bf16
    kernels in-process) the kernel could not build the signal frame and the whole test process died with
    SIGSEGV (si_code SI_KERNEL, in waitpid). Tests that spawn no workers need no SIGCHLD handler.
    """
    import signal

    yield
    if signal.getsignal(signal.SIGCHLD) not in (signal.SIG_DFL, None):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
