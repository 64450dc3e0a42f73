"""The shipped shapes teacher: where it lives, and how to reproduce it from scratch.

    python -m distill_sd.shapes.teacher --work /tmp/teacher-work --out /tmp/teacher \
        --vae src/distill_sd/shapes/assets/vae   # the shipped teacher: 6,000 + 7,000 + 5,000 steps x 32, ~4.5 h

runs every stage with the project's own commands' code: train the VAE (shapes.vae), assemble the kit
(shapes.kit: CLIP tokenizer, text encoder taught to read captions (shapes.reader) and frozen, VAE, scheduler,
SD-1-topology U-Net config), export the training split as an image folder, cache latents and text embeddings
(`distill-sd cache`), pretrain the U-Net (`distill-sd pretrain`: one cosine cycle at lr 1e-3), train it on
for two more cosine cycles, each from the previous one's EMA weights (`distill-sd finetune`, lr 5e-4 then 2.5e-4:
warm restarts; each cycle was still improving when its learning rate reached zero), evaluate on held-out
compositions and save the pipeline with fp16 weights (the repository budget is 25 MB; the weights load into fp32 models with stock
diffusers). Every stage resumes: rerun the same command after an interruption.
"""

from __future__ import annotations

import argparse
import json
import shutil
from importlib import resources
from pathlib import Path

from distill_sd.errors import UserError

EVAL_SEED = 1234  # BK-SDM's evaluation seed
EVAL_STEPS = 20
EVAL_GUIDANCE = 4.0
EVAL_SCHEDULER = "dpm++"
# Captions replaced by "" in training, so the U-Net learns the unconditional branch classifier-free guidance uses.
EMPTY_PROMPTS = 0.1
# Warm restarts after the first cycle, (steps, peak learning rate): each cycle ended still improving.
RESTARTS = ((7000, 5e-4), (5000, 2.5e-4))


def parse_restart(text: str) -> tuple[int, float]:
    """`7000:5e-4` -> (7000, 0.0005), for --restarts."""
    steps, _, lr = text.partition(":")
    try:
        parsed = int(steps), float(lr)
    except ValueError:
        parsed = (0, 0.0)
    if parsed[0] < 1 or not parsed[1] > 0:
        raise argparse.ArgumentTypeError(f"expected STEPS:LEARNING_RATE with both > 0, such as 7000:5e-4, got {text!r}")
    return parsed


def parse_grounding(text: str) -> tuple[int, float, float]:
    """`3000:1e-4:0.5` -> (3000, 0.0001, 0.5), for --grounding."""
    parts = text.split(":")
    try:
        steps, lr, weight = int(parts[0]), float(parts[1]), float(parts[2])
    except (ValueError, IndexError):
        steps, lr, weight = 0, 0.0, 0.0
    if len(parts) != 3 or steps < 1 or not lr > 0 or not weight > 0:
        raise argparse.ArgumentTypeError(f"expected STEPS:LEARNING_RATE:WEIGHT, all > 0, such as 3000:1e-4:0.5, "
                                         f"got {text!r}")
    return steps, lr, weight


def teacher_dir() -> Path:
    """The shipped teacher pipeline (diffusers format) inside the installed package."""
    path = Path(str(resources.files("distill_sd"))) / "shapes" / "assets" / "teacher"
    if not (path / "model_index.json").is_file():
        raise UserError(f"the shapes teacher is missing from {path}; reproduce it with "
                        "`python -m distill_sd.shapes.teacher --out {path}`")
    return path


def save_shipped(pipe_dir: Path, out: Path) -> None:
    """Copy a pipeline folder in its shipped form: every model's weights in fp16 (halves the size; they load into
    fp32 models with stock diffusers) and the tokenizer as OpenAI's two files, vocab.json + merges.txt (1.4 MB),
    instead of transformers' tokenizer.json (3.6 MB). The repository budget for the teacher is about 25 MB."""
    from safetensors.torch import load_file, save_file

    from distill_sd.reference import clip_vocab_files

    shutil.copytree(pipe_dir, out)
    for f in out.rglob("*.safetensors"):
        tensors = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(f).items()}
        save_file(tensors, f, metadata={"format": "pt"})
    for f in out.glob("*/config.json"):  # drop the training machine's paths that diffusers records
        config = json.loads(f.read_text())
        if config.pop("_name_or_path", None) is not None:
            f.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok = out / "tokenizer"
    if (tok / "tokenizer.json").is_file():
        vocab_json, merges = clip_vocab_files()
        vocab = json.dumps(json.loads(vocab_json), ensure_ascii=False, separators=(",", ":"))
        (tok / "vocab.json").write_text(vocab, encoding="utf-8")
        (tok / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        (tok / "tokenizer.json").unlink()


def make_teacher(work: Path, out: Path, *, steps: int, images: int, batch_size: int, seed: int = 0,
                 learning_rate: float = 1e-3, restarts: tuple[tuple[int, float], ...] = RESTARTS,
                 snr_gamma: float | None = 5.0, vae_dir: Path | None = None, eval_prompts: int = 300,
                 reader_steps: int | None = None, reader_nouns: bool = False,
                 grounding: tuple[int, float, float] | None = None, start_from: Path | None = None,
                 data_seed: int | None = None, two_object_share: float | None = None,
                 word_dropout: float = 0.0) -> dict:
    """Every stage. `grounding` (steps, peak lr, weight): one more cycle with the grounding loss added (each
    object's words must attend inside that object, kd.grounding_loss); with `start_from`, a teacher pipeline
    whose earlier cycles are done, only the data, the cache, the `restarts` cycles and that one run, from it.
    The training split is drawn with `data_seed` (default: `seed`) and, if given, exactly `two_object_share` of
    two-object scenes (world.sample_scenes). `word_dropout`: in the `restarts` cycles, this share of the samples
    sees only the text encoder's summary of its caption (TrainConfig.word_dropout)."""
    from distill_sd.cache import GROUNDING_FILE, build_cache
    from distill_sd.models import check_new_output_dir, load_teacher
    from distill_sd.shapes import export_image_folder, heldout_prompts
    from distill_sd.shapes.grounding import add_grounding
    from distill_sd.shapes.kit import READER_STEPS, build_kit
    from distill_sd.shapes.vae import train_vae
    from distill_sd.train import TrainConfig, train

    check_new_output_dir(out)
    work.mkdir(parents=True, exist_ok=True)
    if start_from is not None:  # its text encoder and VAE are the kit's: frozen in every cycle
        kit = start_from
    else:
        vae = vae_dir if vae_dir is not None else (work / "vae" if (work / "vae").is_dir() else train_vae(work / "vae"))
        kit = work / "kit" if (work / "kit").is_dir() else build_kit(
            work / "kit", vae, seed=seed, reader_steps=READER_STEPS if reader_steps is None else reader_steps,
            reader_nouns=reader_nouns)
    data = work / "data" if (work / "data").is_dir() else export_image_folder(
        work / "data", images, seed if data_seed is None else data_seed, "train", two_object_share=two_object_share)
    if not (work / "cache").is_dir():
        build_cache(load_teacher(kit).pipeline, str(kit), str(data), work / "cache", resolution=64, batch_size=64)

    def cycle(run: str, steps: int, learning_rate: float, warmup: int, seed: int, **options) -> Path:
        """One cosine cycle of the U-Net's task loss (and `loss_ground`, if given), checkpointed every 500 steps
        and resumable."""
        if (work / run / "final").is_dir():  # finished before an interruption of a later stage
            return work / run / "final"
        return train(TrainConfig(
            **options, cache=str(work / "cache"), out=str(work / run), seed=seed, train_batch_size=batch_size,
            max_train_steps=steps, learning_rate=learning_rate, lr_scheduler="cosine", lr_warmup_steps=warmup,
            proportion_empty_prompts=EMPTY_PROMPTS,
            snr_gamma=snr_gamma,  # Min-SNR-5 weighting: Hang et al. report ~3x faster convergence
            mixed_precision="no",  # bf16 autocast measured 3x slower than fp32 at these widths on this CPU
            use_ema=True, ema_decay=0.999, checkpointing_steps=500,
            checkpoints_total_limit=2, resume_from_checkpoint="latest", report_to="tensorboard"))

    if start_from is not None:
        final = start_from
    else:
        final = cycle("run", steps, learning_rate, min(500, steps // 10), seed, mode="pretrain", base=str(kit))
    for i, (restart_steps, restart_lr) in enumerate(restarts, start=2):  # warm restarts
        final = cycle(f"run{i}", restart_steps, restart_lr, min(200, restart_steps // 10), seed + i - 1,
                      mode="finetune", student=str(final), word_dropout=word_dropout)
    if grounding is not None:
        ground_steps, ground_lr, ground_weight = grounding
        if not (work / "cache" / GROUNDING_FILE).is_file():
            add_grounding(work / "cache", data, load_teacher(kit).pipeline.tokenizer)
        final = cycle("run-ground", ground_steps, ground_lr, min(200, ground_steps // 10), seed + len(restarts) + 1,
                      mode="finetune", student=str(final), loss_ground=ground_weight)
    save_shipped(final, out)
    from distill_sd.demo import evaluate_model

    result = evaluate_model("teacher", out, heldout_prompts(eval_prompts, seed=EVAL_SEED))
    summary = {"heldout_accuracy": result.accuracy, "scores": result.scores, "steps": steps, "images": images,
               "batch_size": batch_size, "learning_rate": learning_rate, "restarts": [list(r) for r in restarts],
               "snr_gamma": snr_gamma, "seed": seed, "reader_nouns": reader_nouns,
               "start_from": str(start_from) if start_from else None, "data_seed": data_seed,
               "two_object_share": two_object_share, "word_dropout": word_dropout,
               "grounding": list(grounding) if grounding else None}
    (work / "teacher_eval.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    from distill_sd.cli import fraction

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="working folder (resumable: finished stages are reused)")
    p.add_argument("--out", required=True, help="where the teacher pipeline is written")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--restarts", nargs="*", type=parse_restart, metavar="STEPS:LR",
                   help="further cosine cycles, each a warm restart from the previous one's EMA weights "
                        f"(default: {' '.join(f'{n}:{lr:g}' for n, lr in RESTARTS)}, none with --start-from; "
                        "none: `--restarts` alone)")
    p.add_argument("--grounding", type=parse_grounding, metavar="STEPS:LR:WEIGHT",
                   help="experimental: one more cycle with the grounding loss at this weight, such as 1500:1e-4:0.1 "
                        "(measured to cost accuracy on held-out compositions: see the teacher's README)")
    p.add_argument("--start-from", help="a teacher pipeline whose cycles are done (such as the shipped one): only "
                   "the cycles given with --restarts and --grounding run, from it")
    p.add_argument("--snr-gamma", type=float, default=5.0, help="Min-SNR weighting gamma (0: off)")
    p.add_argument("--seed", type=int, default=0, help="kit, data and first cycle; cycle i runs with seed + i - 1")
    p.add_argument("--data-seed", type=int, help="draws the training split (default: --seed)")
    p.add_argument("--two-object-share", type=fraction, metavar="S",
                   help="experimental: a training split with exactly this share of two-object scenes (default: about "
                        "half; 0.75 measured to cost accuracy on held-out compositions: see the teacher's README)")
    p.add_argument("--word-dropout", type=fraction, default=0.0, metavar="P",
                   help="experimental: in the --restarts cycles, this share of the samples sees only the text "
                        "encoder's summary of its caption (its word-token states replaced by the end-of-text state)")
    p.add_argument("--vae", help="an already trained shapes VAE folder")
    p.add_argument("--reader-steps", type=int, default=None,
                   help="steps teaching the text encoder to read captions (default: the kit's; 0: keep it random)")
    p.add_argument("--reader-nouns", action="store_true",
                   help="experimental: each shape word also learns its own object's colour and stated size")
    a = p.parse_args()
    restarts = tuple(a.restarts) if a.restarts is not None else () if a.start_from else RESTARTS
    if a.start_from and not (restarts or a.grounding):
        p.error("--start-from runs only the cycles you give: add --restarts STEPS:LR or --grounding STEPS:LR:WEIGHT")
    make_teacher(Path(a.work), Path(a.out), steps=a.steps, images=a.images, batch_size=a.batch_size,
                 seed=a.seed, learning_rate=a.learning_rate, restarts=restarts, data_seed=a.data_seed,
                 two_object_share=a.two_object_share, word_dropout=a.word_dropout,
                 snr_gamma=a.snr_gamma or None, vae_dir=Path(a.vae) if a.vae else None, reader_steps=a.reader_steps,
                 reader_nouns=a.reader_nouns, grounding=a.grounding,
                 start_from=Path(a.start_from) if a.start_from else None)


if __name__ == "__main__":
    main()
