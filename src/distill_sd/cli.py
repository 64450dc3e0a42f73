"""`distill-sd` command line: thin argument parsing over the library; every bad input is one clear line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

# (torch's OpenMP wait policy is set by the package's __init__, before anything imports torch)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from distill_sd.errors import UserError  # noqa: E402

# generate.SCHEDULERS' names, spelled out so that building the parser does not import torch (a test keeps them equal)
SCHEDULER_NAMES = ("dpm++", "ddim", "pndm", "euler", "euler-a", "unipc")


def _quiet_libraries() -> None:
    """Our own progress bars stay; the libraries' per-file loading/saving bars and notices go."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    except ImportError:
        pass


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit 2) instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ------------------------------------------------------------------------------------------ commands

def cmd_students(args: argparse.Namespace) -> None:
    from distill_sd.measure import count_macs, count_params, meta_unet
    from distill_sd.reference import ARCH_SPECS, ARCHS, unet_config
    from distill_sd.report import markdown_table
    from distill_sd.students import CATALOGUE
    from distill_sd.surgery import plan_student, unet_topology

    records = []
    for arch in [args.arch] if args.arch else ARCHS:
        teacher_cfg = unet_config(arch)
        res = args.resolution or ARCH_SPECS[arch]["resolution"]
        t_params, t_macs = count_params(meta_unet(teacher_cfg)), count_macs(meta_unet(teacher_cfg), res)
        records.append({"arch": arch, "model": f"{arch} (teacher)", "unet_params": t_params, "unet_macs": t_macs,
                        "resolution": res, "summary": ARCH_SPECS[arch]["title"], "source": ""})
        for spec in CATALOGUE.values():
            if spec.topology != unet_topology(teacher_cfg):
                continue
            cfg = plan_student(teacher_cfg, spec).config
            records.append({"arch": arch, "model": spec.name, "unet_params": count_params(meta_unet(cfg)),
                            "unet_macs": count_macs(meta_unet(cfg), res), "resolution": res,
                            "summary": spec.summary, "source": spec.source,
                            "params_ratio": None, "macs_ratio": None})
            records[-1]["params_ratio"] = records[-1]["unet_params"] / t_params
            records[-1]["macs_ratio"] = records[-1]["unet_macs"] / t_macs
    if args.json:
        print(json.dumps(records, indent=2))
        return
    rows = [[r["arch"], r["model"], f"{r['unet_params']:,}",
             f"{r['params_ratio']:.2f}" if r.get("params_ratio") else "1.00",
             f"{r['unet_macs'] / 1e9:.1f} G @{r['resolution']}",
             f"{r['macs_ratio']:.2f}" if r.get("macs_ratio") else "1.00", r["summary"]] for r in records]
    print(markdown_table(["arch", "model", "U-Net params", "x teacher", "U-Net MACs", "x teacher", "what"], rows))
    print("\nMACs: one U-Net forward, batch 1, 77 tokens; Conv2d and Linear multiply-accumulates (thop convention).")


def cmd_reference(args: argparse.Namespace) -> None:
    from distill_sd.models import check_new_output_dir, save_pipeline
    from distill_sd.reference import NOISE_WARNING, check_arch, reference_pipeline

    check_arch(args.arch)
    out = Path(args.out)
    check_new_output_dir(out)
    pipe = reference_pipeline(args.arch, narrow=args.narrow, seed=args.seed)
    card = (f"# Reference {args.arch}{' (narrow)' if args.narrow else ''} pipeline\n\n**WARNING: {NOISE_WARNING}.**\n\n"
            f"Made by `distill-sd reference --arch {args.arch}{' --narrow' if args.narrow else ''} --seed {args.seed}`.\n")
    save_pipeline(pipe, out, card=card)
    print(f"wrote {out}  (WARNING: {NOISE_WARNING})")


def cmd_build(args: argparse.Namespace) -> None:
    from distill_sd.models import check_new_output_dir, load_teacher, save_student
    from distill_sd.report import human
    from distill_sd.students import get_spec
    from distill_sd.surgery import build_student, plan_student, verify_pairs

    out = Path(args.out)
    check_new_output_dir(out)
    spec = get_spec(args.student, init=args.init)  # fail on a bad spec before loading gigabytes
    teacher = load_teacher(args.teacher, allow_pickle=args.allow_pickle)
    plan = plan_student(teacher.unet.config, spec)
    verify_pairs(plan, teacher.unet.config)
    unet, coverage = build_student(teacher.unet, plan)
    meta = save_student(teacher, plan, unet, coverage, out)
    print(f"student '{spec.name}' of {teacher.source} ({teacher.arch}) -> {out}")
    print(f"U-Net params: teacher {meta['teacher_unet_params']:,}, student {meta['student_unet_params']:,} "
          f"({meta['student_unet_params'] / meta['teacher_unet_params']:.3f}x)")
    print(f"U-Net MACs at {meta['resolution']} px: teacher {human(meta['teacher_unet_macs'])}, "
          f"student {human(meta['student_unet_macs'])}")
    print(coverage.summary())
    for line in coverage.not_copied[:10]:
        print(f"  not copied: {line}")
    if len(coverage.not_copied) > 10:
        print(f"  ... and {len(coverage.not_copied) - 10} more (see {out}/distill_sd.json)")


def cmd_inspect(args: argparse.Namespace) -> None:
    from distill_sd.models import describe
    from distill_sd.report import human, markdown_table

    rows = [describe(m, args.resolution).as_dict() for m in args.model]
    if args.json:
        print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
        return
    for d in rows:
        print(f"{d['model']}  ({d['arch']})")
        print(f"  U-Net params      {d['unet_params']:,}")
        print(f"  U-Net MACs        {human(d['unet_macs'])} per forward at {d['resolution']} px (batch 1)")
        print(f"  pipeline params   {d['pipeline_params']:,}  (" +
              ", ".join(f"{k} {v:,}" for k, v in d["components"].items()) + ")")
        print(markdown_table(["block", "type", "layers", "out ch", "transformer depth", "params"],
                             [[b["block"], b["type"], b["layers"] or "", b["out_channels"] or "",
                               b["transformer_depth"] or "", f"{b['params']:,}"] for b in d["blocks"]]))
        print()


def cmd_train(args: argparse.Namespace) -> None:
    from distill_sd.train import TrainConfig, train

    values = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    final = train(TrainConfig(mode=args.command, **values))
    print(f"done: {final}")


def cmd_cache(args: argparse.Namespace) -> None:
    from distill_sd.cache import build_cache
    from distill_sd.models import check_new_output_dir, load_teacher

    check_new_output_dir(Path(args.out))
    base = load_teacher(args.base, allow_pickle=args.allow_pickle)
    resolution = args.resolution or base.unet.config.sample_size * 2 ** (len(base.pipeline.vae.config.block_out_channels) - 1)
    device = "cuda" if _cuda() else "cpu"
    base.pipeline.to(device)
    build_cache(base.pipeline, args.base, args.data, Path(args.out), resolution=resolution,
                center_crop=args.center_crop, batch_size=args.batch_size, image_column=args.image_column,
                caption_column=args.caption_column, allow_empty_captions=args.allow_empty_captions,
                instance_prompt=args.instance_prompt, device=device)


def cmd_generate(args: argparse.Namespace) -> None:
    from distill_sd.generate import GenerationParams, default_size, generate, load_pipeline, save_png

    prompts = list(args.prompt or [])
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise UserError(f"--prompt-file '{path}' not found")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserError("give at least one --prompt or a --prompt-file")
    if args.num_images < 1:
        raise UserError("--num-images must be >= 1")
    GenerationParams(prompts[0], None, args.steps, args.guidance, 0, args.height or 8, args.width or 8, "", "").check()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # a bad --out fails now, not after the model has loaded and drawn
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype, scheduler=args.scheduler,
                         lora=args.lora, compile=args.compile)
    size = default_size(pipe)
    for i, prompt in enumerate(prompts):
        params = GenerationParams(prompt, args.negative_prompt, args.steps, args.guidance, args.seed,
                                  args.height or size, args.width or size, args.scheduler, args.model)
        images, seconds = generate(pipe, params, args.num_images)
        for j, image in enumerate(images):
            path = save_png(image, out / f"{i:03d}-{j:02d}.png", params, args.seed + j)
            print(f"{path}  ({seconds / len(images):.2f} s/image)  {prompt}")


def cmd_bench(args: argparse.Namespace) -> None:
    from distill_sd.bench import plot, rows_of, run_bench, table

    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    for d in dtypes:
        if d not in ("fp32", "bf16", "fp16"):
            raise UserError(f"--dtype entries must be fp32, bf16 or fp16; got '{d}'")
    if args.runs < 1 or args.steps < 1 or args.batch < 1:
        raise UserError("--runs, --steps and --batch must be >= 1")
    for m in args.model:
        if not m.startswith("ref:") and not Path(m).exists():
            raise UserError(f"model '{m}' not found (a pipeline folder, or ref:sd15, ref:sd15:bk-tiny, ...)")
    rows = rows_of(run_bench(args.model, dtypes, resolution=args.resolution, steps=args.steps, batch=args.batch,
                             runs=args.runs, unet_runs=args.unet_runs, narrow=args.narrow,
                             whole_image=not args.unet_only, compile=args.compile))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(table(rows, args.steps))
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)


def cmd_demo(args: argparse.Namespace) -> None:
    from distill_sd.demo import run_demo

    if args.steps is not None and args.steps < 1:
        raise UserError("--steps must be >= 1")
    run_demo(Path(args.out), quick=args.quick, steps=args.steps, teacher=args.teacher)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from distill_sd.demo import eval_scenes, evaluate_model
    from distill_sd.export import is_export_dir
    from distill_sd.report import markdown_table
    from distill_sd.shapes import CHECKS
    from distill_sd.shapes.scorer import count_key
    from distill_sd.shapes.world import OBJECT_COUNTS

    if args.prompts < 1:
        raise UserError("--prompts must be >= 1")
    if args.steps < 1:
        raise UserError("--steps must be >= 1")
    if args.guidance < 1:
        raise UserError("--guidance must be >= 1 (1 turns classifier-free guidance off)")
    for m in args.model:
        if not (Path(m) / "model_index.json").is_file() and not is_export_dir(m):
            raise UserError(f"'{m}' is neither a pipeline folder (no model_index.json) nor an exported model "
                            "(`distill-sd export`)")
    scenes = eval_scenes(args.prompts, args.split, args.seed)
    results = []
    with tqdm(total=len(scenes) * len(args.model), desc="evaluating on held-out compositions", unit="image") as bar:
        for i, m in enumerate(args.model):
            lora = args.lora if args.lora and i == len(args.model) - 1 else None  # into the last model only
            results.append(evaluate_model(f"{m} + LoRA {args.lora}" if lora else m, Path(m), scenes,
                                          reference=results[0] if results else None, progress=bar, seed=args.seed,
                                          steps=args.steps, guidance=args.guidance, scheduler=args.scheduler,
                                          lora=lora))
    rows = [{"model": r.name, **r.scores, "agreement_with_first": r.agreement, "seconds_per_image": r.seconds_per_image}
            for r in results]
    if args.failures:
        from distill_sd.evaluate import write_failures

        for i, r in enumerate(results):
            folder = Path(args.failures) / f"{i}-{Path(r.name).resolve().name}"
            counts = write_failures(r, scenes, folder, seed=args.seed)
            print(f"{r.name}: {counts['failed']} of {counts['images']} images fail ({counts['swaps']} binding swaps, "
                  f"{counts['leaks']} leaks) -> {folder}/failures.md" + (", failures.png" if counts["failed"] else ""),
                  file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    counts = [k for k in OBJECT_COUNTS if count_key(k) in rows[0]]  # accuracy by objects per caption
    checks = ["accuracy", *(count_key(k) for k in counts), *CHECKS]
    names = ["accuracy", *(f"{k}-object" for k in counts), *CHECKS]
    print(markdown_table(["model", *names, "agrees with first", "s / image"],
                         [[r["model"], *(f"{100 * r[c]:.1f} %" for c in checks),
                           "-" if r["agreement_with_first"] is None else f"{100 * r['agreement_with_first']:.0f} %",
                           f"{r['seconds_per_image']:.3f}"] for r in rows]))
    what = "held-out" if args.split == "heldout" else "training-split (new captions, seen compositions)"
    print(f"{len(scenes)} {what} captions, {args.scheduler} {args.steps} steps, guidance {args.guidance}, "
          f"seed {args.seed} + index", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> None:
    from distill_sd.app import serve

    serve(args.model, args.compare, host=args.host, port=args.port, share=args.share, lora=args.lora,
          device=args.device, dtype=args.dtype)


def cmd_export(args: argparse.Namespace) -> None:
    from distill_sd.export import compare_outputs, comparison_lines, export_pipeline

    prompts = None
    if args.calibration_prompts:
        path = Path(args.calibration_prompts)
        if not path.is_file():
            raise UserError(f"--calibration-prompts '{path}' not found (a text file, one prompt per line)")
        prompts = path.read_text().splitlines()
    out = export_pipeline(args.model, Path(args.out), fmt=args.format, opset=args.opset, dtype=args.dtype,
                          calibration_prompts=prompts, calibration_steps=args.calibration_steps,
                          calibration_size=args.calibration_size)
    print(f"exported {args.model} -> {out} ({args.format}, {args.dtype})")
    if not args.no_check:
        for line in comparison_lines(compare_outputs(args.model, out, prompt="a red circle", steps=2,
                                                      height=args.check_size, width=args.check_size)):
            print(line)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------------ parser

_TRAIN_HELP = {
    "out": "output folder: checkpoints/, logs/, validation/, and final/ (the trained pipeline)",
    "data": "image folder (.txt captions or metadata.jsonl/.csv), HF dataset name/path, or webdataset .tar shards",
    "cache": "a `distill-sd cache` folder (latents + text embeddings) used instead of --data",
    "instance_prompt": "every image's caption instead of its own, which may then be missing (DreamBooth's instance "
                       "prompt, such as 'a photo of sks dog')",
    "teacher": "teacher pipeline: folder, .safetensors or hub id",
    "student": "distill: catalogue name, spec file or a built student folder; finetune, lora: the pipeline to train",
    "base": "pretrain: the pipeline whose tokenizer, text encoder, VAE and scheduler are used",
    "unet_config": "pretrain: U-Net config.json to initialise randomly (default: the base pipeline's)",
    "init": "distill from a catalogue name: bk (BK-SDM map) or first (OFA first layers)",
    "recipe": "loss/lr preset: bk-sdm (1/1/1, lr 5e-5), segmind (1/0.5/0.5, lr 1e-5), balanced "
              "(bk-sdm weights, variance-normalised feature loss)",
    "feature_norm": "none (plain sum, BK-SDM) | mean | teacher_var (MSE / teacher feature variance, averaged)",
    "loss_ground": "weight of the grounding loss (TokenCompose): each object's words attend inside its mask; "
                   "needs a --cache with grounding.safetensors (shapes: python -m distill_sd.shapes.grounding)",
    "resume_from_checkpoint": "latest, or a checkpoint folder",
    "report_to": "tensorboard (default), wandb, all, or none",
    "mixed_precision": "no | fp16 | bf16 (default: accelerate's config)",
    "teacher_dtype": "fp32 | fp16 | bf16: the frozen teacher's weights (default: the --mixed_precision dtype); "
                     "bf16 with --mixed_precision no is fastest on CPUs with AMX",
    "proportion_empty_prompts": "fraction of captions replaced by the empty prompt (for classifier-free guidance)",
    "kd_caption_mix": "distill: fraction of samples conditioned on another sample's caption (the teacher answers "
                      "for that pair; the task term skips it)",
    "word_dropout": "fraction of samples that see only the text encoder's summary of the caption (word-token states "
                    "replaced by the end-of-text state); SD-1/SD-2",
    "class_prompt": "DreamBooth prior preservation (with --instance_prompt): the class, such as 'a photo of a dog'; "
                    "the model draws --num_class_images of it before training and learns them beside the instances",
    "class_data_dir": "where the class images are kept and reused (default: OUT/class_images)",
    "num_class_images": "class images for prior preservation (drawn once; ones already there are kept)",
    "prior_loss_weight": "weight of the class examples' loss against the instance examples'",
    "rank": "lora: rank of the adapters on the U-Net's attention projections",
    "lora_alpha": "lora: adapters are scaled by lora_alpha / rank (default: the rank)",
}


def _add_train_args(parser: argparse.ArgumentParser, mode: str) -> None:
    """One flag per TrainConfig field, named as in diffusers' scripts; --config FILE gives defaults."""
    import dataclasses

    from distill_sd.train import TrainConfig

    parser.add_argument("--config", help="YAML file whose keys are these flag names; flags on the command line win")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("mode",):
            continue
        flag = "--" + f.name
        kw: dict = {"help": _TRAIN_HELP.get(f.name), "dest": f.name}
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            parser.add_argument(flag, required=True, **kw)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, **kw)
            continue
        if f.name == "validation_prompts":
            parser.add_argument(flag, nargs="+", default=default, **kw)
            continue
        kind = float if "float" in f.type else int if "int" in f.type else str
        parser.add_argument(flag, type=kind, default=default, **kw)


def _apply_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Read --config first; its keys become defaults so explicit flags override them."""
    import yaml

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return
    path = Path(known.config)
    if not path.is_file():
        raise UserError(f"--config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a mapping of flag names to values")
    dests = {a.dest for a in parser._actions}
    unknown = sorted(k for k in values if k.replace("-", "_") not in dests)
    if unknown:
        raise UserError(f"{path}: unknown key(s) {unknown}; keys are the flag names without dashes")
    parser.set_defaults(**{k.replace("-", "_"): v for k, v in values.items()})


def build_parser() -> argparse.ArgumentParser:
    from distill_sd import __version__
    from distill_sd.demo import EVAL_SEED, FULL, QUICK
    from distill_sd.shapes.teacher import EVAL_GUIDANCE, EVAL_SCHEDULER, EVAL_STEPS

    p = _Parser(prog="distill-sd", description="Smaller, faster Stable Diffusion: block removal + distillation.")
    p.add_argument("--version", action="version", version=f"distill-sd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("students", help="the student catalogue with U-Net params and MACs")
    s.add_argument("--arch", choices=["sd15", "sd21", "sdxl"], help="only students of this teacher")
    s.add_argument("--resolution", type=_positive_multiple_of_8, help="px (default: the teacher's own)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_students)

    s = sub.add_parser("reference", help="a random-weight pipeline of exact SD-1.5/2.1/SDXL shapes (images are noise)")
    s.add_argument("--arch", required=True, choices=["sd15", "sd21", "sdxl"])
    s.add_argument("--out", required=True)
    s.add_argument("--narrow", action="store_true", help="same topology, small widths (tests: seconds, megabytes)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_reference)

    s = sub.add_parser("build", help="build a student pipeline from a teacher and a recipe")
    s.add_argument("--teacher", required=True, help="pipeline directory, .safetensors file or hub id")
    s.add_argument("--student", required=True, help="catalogue name (see `students`) or a .yaml/.json spec")
    s.add_argument("--out", required=True)
    s.add_argument("--init", choices=["bk", "first"], default="bk",
                   help="up-stage weight map: bk = teacher layers 0 and 2 (BK-SDM), first = 0 and 1 (OFA)")
    s.add_argument("--allow-pickle", action="store_true", help="allow loading a .ckpt/.bin pickle checkpoint")
    s.set_defaults(fn=cmd_build)

    for mode, text in (("distill", "distil a student from a teacher (task + output + feature loss)"),
                       ("finetune", "continue training a pipeline's U-Net on the task loss"),
                       ("lora", "train LoRA adapters on a pipeline's frozen U-Net (a diffusers LoRA file)"),
                       ("pretrain", "train a randomly initialised U-Net from a config on the task loss")):
        s = sub.add_parser(mode, help=text)
        _add_train_args(s, mode)
        s.set_defaults(fn=cmd_train)

    s = sub.add_parser("cache", help="precompute VAE latents and text embeddings for training")
    s.add_argument("--base", required=True, help="the pipeline whose VAE and text encoder(s) training will use")
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--resolution", type=_positive_multiple_of_8)
    s.add_argument("--center_crop", action="store_true")
    s.add_argument("--batch_size", type=int, default=8)
    s.add_argument("--image_column", default="image")
    s.add_argument("--caption_column", default="text")
    s.add_argument("--allow_empty_captions", "--allow-empty-captions", action="store_true")
    s.add_argument("--instance_prompt", help=_TRAIN_HELP["instance_prompt"])
    s.add_argument("--allow-pickle", action="store_true")
    s.set_defaults(fn=cmd_cache)

    s = sub.add_parser("generate", help="images from a pipeline (PNG with parameters in the metadata)")
    s.add_argument("model", help="pipeline folder, .safetensors file or hub id")
    s.add_argument("--prompt", action="append", help="repeatable")
    s.add_argument("--prompt-file", help="one prompt per line")
    s.add_argument("--negative-prompt")
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--guidance", type=float, default=7.5)
    s.add_argument("--scheduler", default="dpm++", choices=SCHEDULER_NAMES)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--height", type=_positive_multiple_of_8)
    s.add_argument("--width", type=_positive_multiple_of_8)
    s.add_argument("--num-images", type=int, default=1)
    s.add_argument("--lora", help="a LoRA file or folder to fuse into the U-Net")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    s.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, bf16 on CPUs with AMX/AVX512-BF16) | fp32 | bf16 | fp16")
    s.add_argument("--compile", action="store_true", help="torch.compile the U-Net (slow start, faster steps)")
    s.add_argument("--out", default="images")
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("bench", help="side-by-side latency and memory of pipelines (interleaved, medians)")
    s.add_argument("model", nargs="+", help="pipeline folders, or ref:ARCH[:STUDENT] (random weights, in memory)")
    s.add_argument("--resolution", type=_positive_multiple_of_8, default=512)
    s.add_argument("--steps", type=int, default=25, help="denoising steps of the whole-image run")
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--dtype", default="fp32", help="comma list: fp32,bf16")
    s.add_argument("--runs", type=int, default=3, help="interleaved rounds (medians over them)")
    s.add_argument("--unet-runs", type=int, default=3, help="U-Net calls per round")
    s.add_argument("--unet-only", action="store_true", help="skip whole-image runs")
    s.add_argument("--compile", action="store_true", help="torch.compile every U-Net (minutes of compilation first)")
    s.add_argument("--narrow", action="store_true", help="ref: models at narrow widths (for tests)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--plot", help="write a PNG bar chart here")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("serve", help="a Gradio web app; --compare shows teacher and student side by side")
    s.add_argument("model", help="pipeline folder, .safetensors file or hub id")
    s.add_argument("--compare", help="a second pipeline (the teacher), run from the same seed")
    s.add_argument("--lora", help="a LoRA file or folder fused into MODEL (not into --compare)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--share", action="store_true", help="a public gradio.live link (needs internet)")
    s.add_argument("--device", default="auto")
    s.add_argument("--dtype", default="auto")
    s.set_defaults(fn=cmd_serve)

    s = sub.add_parser("export", help="export a pipeline to ONNX or OpenVINO, then check it against PyTorch")
    s.add_argument("model")
    s.add_argument("--format", choices=["onnx", "openvino"], default="onnx")
    s.add_argument("--out", required=True)
    s.add_argument("--opset", type=int, default=17)
    s.add_argument("--dtype", choices=["fp32", "int8"], default="fp32",
                   help="int8: quantize the U-Net's convolutions (static, calibrated on the model's own sampling)")
    s.add_argument("--calibration-prompts", help="int8: a text file of prompts, one per line, like the ones the "
                   "model will serve (default: 8 built-in generic prompts)")
    s.add_argument("--calibration-steps", type=int, default=10, help="int8: sampling steps per calibration prompt")
    s.add_argument("--calibration-size", type=_positive_multiple_of_8, default=None,
                   help="int8: image side while calibrating (default: the model's own)")
    s.add_argument("--check-size", type=_positive_multiple_of_8, default=64,
                   help="image side for the PyTorch-vs-export check (small keeps it fast)")
    s.add_argument("--no-check", action="store_true")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("demo", help="distil the shipped shapes teacher into bk-base/small/tiny and evaluate them")
    s.add_argument("--out", default="demo-output", help="replaced if it holds a previous demo's output")
    s.add_argument("--quick", action="store_true", help="a ~1-minute version (few steps, few prompts)")
    s.add_argument("--steps", type=int, help=f"distillation steps per student (default: {FULL.steps}, "
                   f"--quick: {QUICK.steps})")
    s.add_argument("--teacher", help="another shapes teacher folder (default: the shipped one)")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("evaluate", help="shapes world: exact held-out accuracy of pipelines (same prompts and seeds)")
    s.add_argument("model", nargs="+", help="pipeline folders; agreement is measured against the first")
    s.add_argument("--prompts", type=int, default=300, help="number of held-out captions")
    s.add_argument("--split", choices=("heldout", "train"), default="heldout",
                   help="heldout: compositions never seen in training (default); train: new captions of the "
                        "training split's compositions, to measure the generalisation gap")
    s.add_argument("--seed", type=int, default=EVAL_SEED, help="draws the captions and each image's noise "
                   "(image i: seed + i; default: %(default)s, the demo's and the teacher card's)")
    s.add_argument("--failures", metavar="DIR", help="also write each model's failed images with their captions, "
                   "failed checks and what was drawn (DIR/<n>-<model>/failures.md, failures.png)")
    s.add_argument("--steps", type=int, default=EVAL_STEPS, help="denoising steps (default: %(default)s, the demo's)")
    s.add_argument("--guidance", type=float, default=EVAL_GUIDANCE,
                   help="classifier-free guidance scale (default: %(default)s, the demo's)")
    s.add_argument("--scheduler", default=EVAL_SCHEDULER, choices=SCHEDULER_NAMES,
                   help="sampler (default: %(default)s, the demo's)")
    s.add_argument("--lora", help="a LoRA fused into the last MODEL (list its base first too, to compare: "
                   "evaluate BASE BASE --lora LORA)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser("inspect", help="params, MACs and block layout of pipelines or U-Nets")
    s.add_argument("model", nargs="+", help="pipeline dir, U-Net dir, or sd15/sd21/sdxl")
    s.add_argument("--resolution", type=_positive_multiple_of_8)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_inspect)
    return p


def _positive_multiple_of_8(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of pixels") from None
    if value <= 0 or value % 8:
        raise argparse.ArgumentTypeError(f"{value} px must be a positive multiple of 8 (the VAE's scale)")
    return value


def fraction(text: str) -> float:
    """argparse type for a share: a number from 0 to 1 (the shapes scripts' --two-object-share, --word-dropout)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not a share: give a number from 0 to 1")
    return value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv and argv[0] in ("distill", "finetune", "lora", "pretrain"):
        sub = parser._subparsers._group_actions[0].choices[argv[0]]  # the mode's own parser
        try:
            _apply_config_file(sub, argv[1:])
        except UserError as e:
            print(f"distill-sd {argv[0]}: error: {e}", file=sys.stderr)
            return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed as one line
        return int(e.code or 0)
    _quiet_libraries()
    try:
        args.fn(args)
    except UserError as e:
        print(f"distill-sd {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.filename is None:  # not about a path the user gave: a bug, keep its traceback
            raise
        print(f"distill-sd {args.command}: error: cannot use '{e.filename}' ({e.strerror}); check the path and "
              "its permissions", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"distill-sd {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
