#!/usr/bin/env python
"""word_states: what the shapes teacher's U-Net reads from the caption's word tokens, and what from the rest.

The teacher's text encoder was taught to put what a caption says into its end-of-text and padding states (the
reader, shapes.reader), from captions of the whole world; the states at the word tokens carry each word in its
left context only (CLIP's causal attention). This evaluates the shipped teacher with the text encoder's states at
the word tokens replaced, everything else as in the demo (DPM++ 20 steps, guidance 4, seed 1234 + index):

- as shipped: nothing replaced;
- words -> end-of-text: each word state replaced by the caption's end-of-text state (the reader's summary);
- words -> start: each word state replaced by the start-of-text state (the same for every caption: no words).

on captions of held-out compositions (the demo's 96) and of the training split's. The empty caption of
classifier-free guidance has no word tokens and is unchanged. Results go to --out as word_states.md/.json.

    python benchmarks/word_states.py                       # 96 captions per split: six evaluations of 96 images
    python benchmarks/word_states.py --prompts 4 --out /tmp/word-states-smoke
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from distill_sd.conditioning import first_token_positions, replace_word_states
from distill_sd.demo import eval_scenes, load_eval_pipeline
from distill_sd.evaluate import evaluate
from distill_sd.report import machine, machine_line, markdown_table, write_results
from distill_sd.shapes.teacher import EVAL_GUIDANCE, EVAL_SEED, EVAL_STEPS, teacher_dir

REPO = Path(__file__).resolve().parent.parent
MODES = {"shipped": "as shipped", "eot": "words -> end-of-text state", "start": "words -> start state"}
SPLITS = {"heldout": "held-out compositions", "train": "training split"}


def hook_word_states(pipe: Any, mode: str) -> Any:
    """Hook the pipeline's text encoder so its output at word tokens (not start, end-of-text or padding) is replaced
    as `mode` ("eot" or "start") says (conditioning.replace_word_states); returns the hook's handle."""
    eos = pipe.tokenizer.eos_token_id

    def hook(_module: Any, args: tuple, kwargs: dict, out: Any) -> Any:
        ids = args[0] if args else kwargs["input_ids"]
        out.last_hidden_state = replace_word_states(out.last_hidden_state, first_token_positions(ids, eos), mode)
        return out

    return pipe.text_encoder.register_forward_hook(hook, with_kwargs=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default=None, help="teacher pipeline (default: the shipped shapes teacher)")
    p.add_argument("--prompts", type=int, default=96, help="captions per split (the demo's: %(default)s)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="where word_states.md/.json go")
    args = p.parse_args(argv)
    if args.prompts < 1:
        p.error("--prompts must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    pipe = load_eval_pipeline(Path(args.teacher) if args.teacher else teacher_dir())
    rows = []
    for split in SPLITS:
        scenes = eval_scenes(args.prompts, split)
        for mode in MODES:
            handle = hook_word_states(pipe, mode) if mode != "shipped" else None
            try:
                r = evaluate(mode, pipe, scenes, seed=EVAL_SEED, steps=EVAL_STEPS, guidance=EVAL_GUIDANCE)
            finally:
                if handle is not None:
                    handle.remove()
            rows.append({"split": split, "mode": mode, **r.scores})
            print(f"{SPLITS[split]}, {MODES[mode]}: {r.accuracy:.1%}", flush=True)
    command = "python benchmarks/word_states.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    report = {"benchmark": "word_states", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "command": command.strip(), "machine": machine(), "teacher": str(args.teacher or "shipped"),
              "prompts": args.prompts, "rows": rows, "total_wall_s": time.perf_counter() - started}
    write_results(args.out, "word_states", report, markdown(report))


def markdown(rep: dict[str, Any]) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.1f} %"  # noqa: E731 (a split may lack 1- or 2-object captions)
    table = markdown_table(
        ["captions", "text encoder states at the word tokens", "accuracy", "1-object", "2-object", "colour", "shape"],
        [[SPLITS[r["split"]], MODES[r["mode"]], pct(r["accuracy"]), pct(r.get("accuracy_1obj")), pct(r.get("accuracy_2obj")),
          pct(r["colour"]), pct(r["shape"])] for r in rep["rows"]])
    return (f"word_states: `{rep['command']}` ({rep['date'][:10]}, {machine_line(rep['machine'])}; "
            f"{rep['total_wall_s'] / 60:.0f} min): teacher {rep['teacher']}, {rep['prompts']} captions per split, "
            f"DPM++ {EVAL_STEPS} steps, guidance {EVAL_GUIDANCE}, seed {EVAL_SEED} + index.\n\n{table}\n")


if __name__ == "__main__":
    main()
