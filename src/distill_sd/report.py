"""Plain-text and markdown tables, human-readable numbers and the machine a result was measured on, shared by
every command that prints results."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23 M'; keeps three significant digits."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {suffix}{unit}"
    return f"{n:.3g} {unit}".strip()


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table, columns padded so it also reads well in a terminal."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *map(line, cells[1:])])


def machine() -> dict[str, Any]:
    """What a timing depends on: CPU model and its fast paths for torch (AVX-512, bf16, AMX), cores, RAM and the
    library versions."""
    import accelerate
    import diffusers
    import torch
    import transformers

    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
               platform.processor() or platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    meminfo = Path("/proc/meminfo").read_text().splitlines() if Path("/proc/meminfo").is_file() else []
    mem = next((int(line.split()[1]) // 1024 for line in meminfo if line.startswith("MemTotal")), 0)
    return {"cpu": cpu, "isa": [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags],
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "ram_mb": mem,
            "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "accelerate": accelerate.__version__}


def machine_line(m: dict[str, Any] | None = None) -> str:
    """One line naming what a timing was measured on: 'Intel(R) Xeon(R) Processor (avx512f, amx_bf16), 2 cores,
    torch 2.13.0'."""
    m = machine() if m is None else m
    # "no AVX-512" said outright: one model name ("AMD EPYC") covers CPUs with and without it, which differ in speed
    # and in how their float kernels round
    isa = ", ".join(m["isa"]) if m["isa"] else "no AVX-512"
    return f"{m['cpu']} ({isa}), {m['cores']} cores, torch {m['torch']}"


def run_lines(rep: dict[str, Any]) -> list[str]:
    """A benchmark report's closing markdown lines: when it ran, how long it took, the command that reproduces it."""
    return [f"- Date: {rep['date']}; whole benchmark {rep['total_wall_s'] / 60:.1f} min.",
            f"- Command: `{rep['command']}`", ""]


def write_results(folder: str | Path, name: str, report: dict[str, Any], md: str) -> Path:
    """A benchmark's result, printed and written as NAME.md (the table people read) and NAME.json (everything, for
    re-analysis); returns the .md path."""
    import json

    print("\n" + md)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(md)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    return out / f"{name}.md"
