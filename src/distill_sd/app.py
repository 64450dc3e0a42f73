"""`distill-sd serve`: a Gradio page to try a model, or a student side by side with its teacher.

Pipelines are loaded once, when the app is built. One generation runs at a time (a CPU model gains nothing from two
at once); other users wait in the queue, which shows their position. Bad input (empty prompt, steps, guidance or size
out of range) is refused with a one-line message in the page, never a traceback.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill_sd.errors import UserError
from distill_sd.generate import SCHEDULERS, GenerationParams, default_size, generate, load_pipeline, set_scheduler

# Gradio phones home (usage analytics, version check) unless told not to; a closed network makes that hang.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

log = logging.getLogger(__name__)

MIN_SIDE = 64
MAX_GUIDANCE = 20.0
MAX_SEED = 2**32 - 1
DEFAULT_SCHEDULER = "dpm++"
QUEUE_SIZE = 16


def _gradio() -> Any:
    try:
        import gradio
    except ImportError:
        raise UserError("the web app needs gradio: pip install gradio (see constraints.txt for the tested version)") from None
    return gradio


def _name(model: str) -> str:
    """A short display name: the directory or file name of a local model, the repo id of a Hub model."""
    p = Path(model)
    return p.name if p.exists() else model


@dataclass
class Entry:
    role: str  # "model", "teacher" or "student"
    name: str
    pipe: Any
    scheduler: str = DEFAULT_SCHEDULER

    @property
    def label(self) -> str:
        return self.name if self.role == "model" else f"{self.role}: {self.name}"


class Studio:
    """The app's state and its event handlers, separate from the layout so they can be tested without a browser."""

    def __init__(self, entries: list[Entry], *, max_side: int = 1024, max_steps: int = 100):
        if not entries:
            raise ValueError("no pipelines")
        self.entries = entries
        self.max_side = max_side
        self.max_steps = max_steps

    @property
    def default_side(self) -> int:
        """The last pipeline's native size (the student's when comparing), clamped to [MIN_SIDE, max_side]."""
        side = default_size(self.entries[-1].pipe)
        return max(MIN_SIDE, min(self.max_side, side // 8 * 8))

    def params(self, prompt: str | None, negative: str | None, steps: Any, guidance: Any, seed: Any, width: Any,
               height: Any, scheduler: str | None) -> GenerationParams:
        """The checked parameters, or gr.Error with one line saying what to fix (shown in the page)."""
        gr = _gradio()

        def fail(msg: str) -> Exception:
            return gr.Error(msg, print_exception=False)

        if not (prompt or "").strip():
            raise fail("Enter a prompt: it is empty.")
        nums = {}
        for name, v in (("steps", steps), ("guidance", guidance), ("seed", seed), ("width", width), ("height", height)):
            try:
                nums[name] = float(v)
            except (TypeError, ValueError):
                raise fail(f"{name} must be a number, got {v!r}") from None
        for name in ("steps", "seed", "width", "height"):
            if nums[name] != int(nums[name]):
                raise fail(f"{name} must be a whole number, got {nums[name]:g}")
        steps_i, seed_i, w, h = (int(nums[k]) for k in ("steps", "seed", "width", "height"))
        if not 1 <= steps_i <= self.max_steps:
            raise fail(f"steps must be between 1 and {self.max_steps}, got {steps_i}")
        if not 0 <= nums["guidance"] <= MAX_GUIDANCE:
            raise fail(f"guidance must be between 0 and {MAX_GUIDANCE:g}, got {nums['guidance']:g}")
        if not -1 <= seed_i <= MAX_SEED:
            raise fail(f"seed must be between 0 and {MAX_SEED} (or -1 for a random seed), got {seed_i}")
        for side, v in (("width", w), ("height", h)):
            if not MIN_SIDE <= v <= self.max_side:
                raise fail(f"{side} must be between {MIN_SIDE} and {self.max_side}, got {v}")
            if v % 8:
                raise fail(f"{side} must be a multiple of 8, got {v} (try {v // 8 * 8})")
        if scheduler not in SCHEDULERS:
            raise fail(f"unknown scheduler {scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if seed_i == -1:
            seed_i = random.randint(0, MAX_SEED)
        params = GenerationParams(prompt=prompt.strip(), negative_prompt=(negative or "").strip() or None,
                                  steps=steps_i, guidance=nums["guidance"], seed=seed_i, height=h, width=w,
                                  scheduler=scheduler, model=self.entries[-1].name)
        try:
            params.check()
        except UserError as e:
            raise fail(str(e)) from None
        return params

    def run(self, prompt: str | None, negative: str | None, steps: Any, guidance: Any, seed: Any, width: Any,
            height: Any, scheduler: str | None) -> list[Any]:
        """Each pipeline from the same seed: [image, timing line] per pipeline, in `entries` order."""
        gr = _gradio()
        params = self.params(prompt, negative, steps, guidance, seed, width, height, scheduler)
        out: list[Any] = []
        for e in self.entries:
            try:
                if e.scheduler != params.scheduler:
                    set_scheduler(e.pipe, params.scheduler)
                    e.scheduler = params.scheduler
                (image,), seconds = generate(e.pipe, params, 1)
            except UserError as err:
                raise gr.Error(str(err), print_exception=False) from None
            except Exception as err:  # a bug or out of memory: full trace in the server log, one line in the page
                log.exception("generation failed")
                first = (str(err).splitlines() or [""])[0]
                raise gr.Error(f"generation failed ({type(err).__name__}: {first}); see the server log",
                               print_exception=False) from None
            out += [image, self.timing(e, seconds, params)]
        return out

    @staticmethod
    def timing(entry: Entry, seconds: float, params: GenerationParams) -> str:
        return (f"**{entry.label}** — {seconds:.2f} s per image "
                f"({params.steps} steps, {params.width}×{params.height}, {params.scheduler}, seed {params.seed})")


def load_studio(model: str, compare: str | None = None, *, lora: str | None = None, device: str = "auto",
                dtype: str = "auto", max_side: int = 1024, max_steps: int = 100) -> Studio:
    """Load the pipeline(s) once: [teacher, student] with `compare`, else [model]; `lora` is fused into `model`
    only (so `--compare` of the same model shows what the LoRA changes)."""
    if max_side < MIN_SIDE or max_side % 8:
        raise UserError(f"max_side must be a multiple of 8 and at least {MIN_SIDE}, got {max_side}")
    if max_steps < 1:
        raise UserError(f"max_steps must be at least 1, got {max_steps}")
    student = load_pipeline(model, device=device, dtype=dtype, scheduler=DEFAULT_SCHEDULER, lora=lora)
    name = _name(model) + (f" + LoRA {_name(lora)}" if lora else "")
    if compare is None:
        entries = [Entry("model", name, student)]
    else:
        # The same model twice (a smoke test of the page) shares one pipeline: both want the same scheduler per run.
        same = compare == model and lora is None
        teacher = student if same else load_pipeline(compare, device=device, dtype=dtype, scheduler=DEFAULT_SCHEDULER)
        entries = [Entry("teacher", _name(compare), teacher), Entry("student", name, student)]
    return Studio(entries, max_side=max_side, max_steps=max_steps)


def build_app(model: str, compare: str | None = None, *, lora: str | None = None, device: str = "auto",
              dtype: str = "auto", max_side: int = 1024, max_steps: int = 100, queue_size: int = QUEUE_SIZE) -> Any:
    """The Gradio Blocks app (queued, one generation at a time). `build_app(...).launch()` serves it."""
    return build_blocks(load_studio(model, compare, lora=lora, device=device, dtype=dtype, max_side=max_side,
                                    max_steps=max_steps), queue_size=queue_size)


def build_blocks(studio: Studio, *, queue_size: int = QUEUE_SIZE) -> Any:
    gr = _gradio()
    side = studio.default_side
    names = " vs ".join(e.label for e in studio.entries)
    with gr.Blocks(title=f"distill-sd: {names}", analytics_enabled=False) as demo:
        gr.Markdown(f"## distill-sd — {names}")
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a photo of an astronaut riding a horse",
                                    elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative")
                steps = gr.Slider(1, studio.max_steps, value=min(25, studio.max_steps), step=1, precision=0,
                                  label="Steps", elem_id="steps")
                guidance = gr.Slider(0, MAX_GUIDANCE, value=7.5, step=0.5, label="Guidance", elem_id="guidance")
                with gr.Row():
                    width = gr.Slider(MIN_SIDE, studio.max_side, value=side, step=8, precision=0, label="Width",
                                      elem_id="width")
                    height = gr.Slider(MIN_SIDE, studio.max_side, value=side, step=8, precision=0, label="Height",
                                       elem_id="height")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, minimum=-1, maximum=MAX_SEED, label="Seed (-1: random)",
                                     elem_id="seed")
                    scheduler = gr.Dropdown(list(SCHEDULERS), value=DEFAULT_SCHEDULER, label="Scheduler",
                                            elem_id="scheduler")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            outputs = []
            with gr.Column(scale=2 if len(studio.entries) > 1 else 1):
                with gr.Row(equal_height=True):
                    for i, e in enumerate(studio.entries):
                        with gr.Column():
                            outputs.append(gr.Image(label=e.label, type="pil", format="png", interactive=False,
                                                    elem_id=f"image-{i}"))
                            outputs.append(gr.Markdown(f"**{e.label}**", elem_id=f"time-{i}"))
        inputs = [prompt, negative, steps, guidance, seed, width, height, scheduler]

        def run(prompt, negative, steps, guidance, seed, width, height, scheduler,
                progress=gr.Progress(track_tqdm=True)):  # gradio shows the denoising steps
            return studio.run(prompt, negative, steps, guidance, seed, width, height, scheduler)

        button.click(run, inputs, outputs, api_name="generate")
        prompt.submit(run, inputs, outputs, api_name=False)
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    return demo


def serve(model: str, compare: str | None = None, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
          *, lora: str | None = None, device: str = "auto", dtype: str = "auto", max_side: int = 1024,
          max_steps: int = 100) -> None:
    """Load the model(s) and serve the app until interrupted (blocks)."""
    if not 0 < port < 65536:
        raise UserError(f"--port must be between 1 and 65535, got {port}")
    demo = build_app(model, compare, lora=lora, device=device, dtype=dtype, max_side=max_side, max_steps=max_steps)
    try:
        demo.launch(server_name=host, server_port=port, share=share, show_error=True, footer_links=["api"])
    except OSError as e:  # port taken, address not on this machine, ...
        raise UserError(f"cannot serve on {host}:{port}: {str(e).splitlines()[0]} (try another --port)") from None
