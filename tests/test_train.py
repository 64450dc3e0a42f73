"""The training loop on narrow teachers: KD lowers the loss, kill+resume is bit-identical, SD-2/SDXL work,
caches give the same training as images, bad input stops cleanly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from diffusers import UNet2DConditionModel

from distill_sd.cli import main
from distill_sd.errors import UserError
from distill_sd.train import TrainConfig, fingerprint

CLI = [sys.executable, "-m", "distill_sd"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from distill_sd.shapes import export_image_folder

    return export_image_folder(tmp_path_factory.mktemp("data") / "shapes", 48, seed=0)


def _args(teacher, data, out, steps, *extra):
    return ["distill", "--teacher", str(teacher), "--student", "bk-tiny", "--data", str(data), "--out", str(out),
            "--resolution", "64", "--train_batch_size", "4", "--max_train_steps", str(steps), "--report_to", "none",
            "--no-progress", *extra]


def _unet(run: Path) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(run / "final" / "unet")


def test_distill_steps_lower_the_kd_loss(narrow_dirs, shapes, tmp_path):
    """Pure KD (no task term): the output and feature terms fall over a few dozen steps."""
    run = tmp_path / "run"
    assert main(_args(narrow_dirs["sd15"], shapes, run, 30, "--learning_rate", "1e-3", "--loss_task", "0",
                      "--checkpointing_steps", "100")) == 0
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(1, 31))
    first, last = history[:5], history[-5:]
    for term in ("out", "feat"):
        assert sum(h[term] for h in last) < 0.7 * sum(h[term] for h in first), term
    meta = json.loads((run / "final" / "distill_sd.json").read_text())
    assert meta["student"] == "bk-tiny" and meta["training"]["steps"] == 30


def test_killed_run_resumes_bit_identical(narrow_dirs, shapes, tmp_path):
    args = _args(narrow_dirs["sd15"], shapes, "{out}", 16, "--checkpointing_steps", "4", "--use_ema",
                 "--random_flip", "--learning_rate", "1e-4")
    straight = tmp_path / "straight"
    assert main([a.replace("{out}", str(straight)) for a in args]) == 0
    killed = tmp_path / "killed"
    argv = [a.replace("{out}", str(killed)) for a in args]
    proc = subprocess.Popen(CLI + argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = killed / "checkpoints" / "checkpoint-8" / "train_state.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists(), "the run must have been killed before it finished"
    assert main(argv + ["--resume_from_checkpoint", "latest"]) == 0
    assert fingerprint(_unet(killed)) == fingerprint(_unet(straight))


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_bf16_teacher_with_fp32_student(narrow_dirs, shapes, tmp_path, arch):
    """--teacher_dtype bf16 --mixed_precision no: the teacher's losses move by bf16 rounding, not more."""
    out = {}
    for dtype in ("fp32", "bf16"):
        argv = _args(narrow_dirs[arch], shapes, tmp_path / dtype, 1, "--mixed_precision", "no", "--teacher_dtype", dtype)
        if arch == "sdxl":
            argv[argv.index("bk-tiny")] = "vega"
        assert main(argv) == 0
        out[dtype] = json.loads((tmp_path / dtype / "history.jsonl").read_text().splitlines()[0])
    for term in ("out", "feat"):
        a, b = out["fp32"][term], out["bf16"][term]
        assert a != b and abs(a - b) / abs(a) < 0.05, (term, a, b)
    assert out["fp32"]["task"] == out["bf16"]["task"]  # the student itself is untouched


@pytest.mark.parametrize("arch", ["sd21", "sdxl"])
def test_v_prediction_and_sdxl_teachers_distil(narrow_dirs, shapes, tmp_path, arch):
    student = "bk-small" if arch == "sd21" else "vega"
    argv = _args(narrow_dirs[arch], shapes, tmp_path / "run", 3, "--recipe", "segmind")
    argv[argv.index("bk-tiny")] = student
    assert main(argv) == 0
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tmp_path / "run" / "final")
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if arch == "sd21" else "epsilon")
    assert pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images.shape == (1, 64, 64, 3)


def test_cache_trains_like_images(narrow_dirs, shapes, tmp_path, capsys):
    """The cache and the encoders give the U-Net the same inputs, word dropout included (it changes them)."""
    assert main(["cache", "--base", str(narrow_dirs["sd15"]), "--data", str(shapes), "--out", str(tmp_path / "c"),
                 "--resolution", "64"]) == 0
    common = ["--checkpointing_steps", "100", "--proportion_empty_prompts", "0.2"]
    words = ["--word_dropout", "0.5"]
    assert main(_args(narrow_dirs["sd15"], shapes, tmp_path / "img", 4, *common)) == 0
    assert main(_args(narrow_dirs["sd15"], shapes, tmp_path / "img-words", 4, *common, *words)) == 0
    argv = _args(narrow_dirs["sd15"], shapes, tmp_path / "cached", 4, *common, *words)
    argv[argv.index("--data"):argv.index("--data") + 2] = ["--cache", str(tmp_path / "c")]
    assert main(argv) == 0
    a, b = _unet(tmp_path / "img-words").state_dict(), _unet(tmp_path / "cached").state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    plain = _unet(tmp_path / "img").state_dict()
    assert max((a[k] - plain[k]).abs().max().item() for k in a) > 1e-4


def test_replace_word_states_keeps_special_tokens_and_rows():
    import torch

    from distill_sd.conditioning import end_of_text_positions, replace_word_states
    from distill_sd.reference import clip_tokenizer

    tok = clip_tokenizer()
    eot = end_of_text_positions(tok, ["a red circle", "", "a blue square left of a red circle"])
    assert eot.tolist() == [4, 1, 9]
    embeds = torch.randn(3, 77, 5)
    out = replace_word_states(embeds, eot, rows=torch.tensor([True, True, False]))
    assert torch.equal(out[0, 1:4], embeds[0, 4].expand(3, 5))  # words -> the end-of-text state
    assert torch.equal(out[0, [0, *range(4, 77)]], embeds[0, [0, *range(4, 77)]])  # start, end, padding kept
    assert torch.equal(out[1:], embeds[1:])  # no words in "", row 2 not chosen
    start = replace_word_states(embeds, eot, "start")
    assert torch.equal(start[2, 1:9], embeds[2, 0].expand(8, 5)) and torch.equal(start[2, 9:], embeds[2, 9:])
    with pytest.raises(ValueError, match="eot' or 'start"):
        replace_word_states(embeds, eot, "middle")
    with pytest.raises(UserError, match="word_dropout must be in"):
        TrainConfig(mode="finetune", out="o", student="s", cache="c", word_dropout=-0.1).resolved()


def test_word_dropout_on_sdxl_is_one_clear_line(narrow_dirs, shapes, tmp_path, capsys):
    code = main(["finetune", "--student", str(narrow_dirs["sdxl"]), "--data", str(shapes), "--out", str(tmp_path / "r"),
                 "--resolution", "64", "--max_train_steps", "1", "--report_to", "none", "--no-progress",
                 "--word_dropout", "0.5"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "one text encoder" in err and len(err.splitlines()) == 1, err


def test_yaml_config_with_cli_override(narrow_dirs, shapes, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"teacher: {narrow_dirs['sd15']}\nstudent: bk-tiny\ndata: {shapes}\nresolution: 64\n"
                   "train_batch_size: 4\nmax_train_steps: 50\nreport_to: none\nlearning_rate: 3.0e-4\n")
    assert main(["distill", "--config", str(cfg), "--out", str(tmp_path / "run"), "--max_train_steps", "2",
                 "--no-progress"]) == 0
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["max_train_steps"] == 2 and saved["learning_rate"] == 3e-4


@pytest.fixture
def broken_data(tmp_path):
    from distill_sd.shapes import export_image_folder

    corrupt = export_image_folder(tmp_path / "corrupt", 8, seed=1)
    (corrupt / "000003.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    missing = tmp_path / "missing"
    missing.mkdir()
    for i in range(4):
        (missing / f"{i}.png").write_bytes((corrupt / "000000.png").read_bytes())
        if i:
            (missing / f"{i}.txt").write_text("a red circle")
    (tmp_path / "empty").mkdir()
    return {"corrupt": corrupt, "missing": missing, "empty": tmp_path / "empty"}


def test_corrupt_image_is_skipped_counted_and_reported(narrow_dirs, broken_data, tmp_path, capsys):
    assert main(_args(narrow_dirs["sd15"], broken_data["corrupt"], tmp_path / "run", 4)) == 0
    card = (tmp_path / "run" / "final" / "README.md").read_text()
    assert "skipped 1 unreadable" in card or "skipped 2 unreadable" in card  # seen once per epoch


@pytest.mark.parametrize(("case", "extra", "fragment"), [
    ("missing", [], "--allow-empty-captions"),
    ("empty", [], "no images"),
    ("corrupt", ["--train_batch_size", "0"], "--train_batch_size must be > 0"),
    ("corrupt", ["--learning_rate", "-1"], "--learning_rate must be > 0"),
    ("corrupt", ["--recipe", "magic"], "unknown --recipe"),
    ("corrupt", ["--mixed_precision", "fp8"], "fp16 or bf16"),
    ("corrupt", ["--timestep_bias_strategy", "middle"], "--timestep_bias_strategy must be one of"),
    ("corrupt", ["--timestep_bias_strategy", "range", "--timestep_bias_begin", "1000", "--timestep_bias_end", "1200",
                 "--timestep_bias_multiplier", "2"], "past the scheduler's 1000 timesteps"),
])
def test_bad_training_input_is_one_clear_line(narrow_dirs, broken_data, tmp_path, capsys, case, extra, fragment):
    code = main(_args(narrow_dirs["sd15"], broken_data[case], tmp_path / "run", 2) + extra)
    err = capsys.readouterr().err
    assert code != 0 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize(("yaml_line", "fragment"), [
    ("train_batch_size: 8.0", "--train_batch_size must be an int, got 8.0"),
    ("use_ema: 'yes'", "--use_ema must be a bool, got 'yes'"),
    ("validation_prompts: a red circle", "--validation_prompts must be a list[str]"),
])
def test_yaml_value_of_the_wrong_type_is_one_clear_line(narrow_dirs, shapes, tmp_path, capsys, yaml_line, fragment):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"teacher: {narrow_dirs['sd15']}\nstudent: bk-tiny\ndata: {shapes}\n{yaml_line}\n")
    assert main(["distill", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_config_types_accept_ints_for_floats():
    from distill_sd.train import TrainConfig

    cfg = TrainConfig(mode="pretrain", out="o", base="b", cache="c", learning_rate=1, ema_decay=0.5).resolved()
    assert cfg.learning_rate == 1
    with pytest.raises(UserError, match="--seed must be an int"):
        TrainConfig(mode="pretrain", out="o", base="b", cache="c", seed=1.5).resolved()


def test_existing_output_needs_resume_flag(narrow_dirs, shapes, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert main(_args(narrow_dirs["sd15"], shapes, tmp_path / "run", 2)) != 0
    assert "--resume_from_checkpoint latest" in capsys.readouterr().err
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_nan_loss_stops_with_a_message_and_keeps_the_checkpoint(narrow_dirs, shapes, tmp_path, capsys):
    code = main(_args(narrow_dirs["sd15"], shapes, tmp_path / "run", 20, "--learning_rate", "1e30",
                      "--checkpointing_steps", "1", "--max_grad_norm", "0"))
    err = capsys.readouterr().err
    assert code != 0 and "not finite" in err and "last good checkpoint" in err
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("checkpoint-*"))
    assert ckpts and all((c / "train_state.json").is_file() for c in ckpts)
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def test_two_process_ddp_distill_loads(narrow_dirs, shapes, tmp_path, launch_two_processes):
    out = tmp_path / "ddp"
    launch_two_processes(_args(narrow_dirs["sd15"], shapes, out, 3, "--use_ema"))
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(out / "final")
    assert pipe.unet.config.block_out_channels == [32, 64, 128]


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_students_sharing_one_teacher_train_exactly_as_alone(narrow_dirs, shapes, tmp_path, arch):
    """Runs side by side through one teacher process (demo.distill_in_parallel) end bit-identical to the same runs
    each with its own teacher, including one with another seed, whose inputs differ: it gets its own forwards."""
    import torch

    from distill_sd.demo import distill_in_parallel, threads_per_job
    from distill_sd.train import TrainConfig, train

    def config(name: str, seed: int) -> TrainConfig:
        return TrainConfig(mode="distill", teacher=str(narrow_dirs[arch]), student="bk-tiny" if arch == "sd15" else
                           "vega", data=str(shapes), out=str(tmp_path / name), resolution=64, train_batch_size=4,
                           max_train_steps=3, learning_rate=1e-3, report_to="none", seed=seed, progress=False)

    shared = distill_in_parallel({"a": config("a", 0), "b": config("b", 0), "c": config("c", 1)})
    threads = torch.get_num_threads()
    torch.set_num_threads(threads_per_job(3))  # as each of the 3 processes: the same kernels, the same bits
    try:
        alone = {seed: fingerprint(_unet(train(config(f"alone-{seed}", seed)).parent)) for seed in (0, 1)}
    finally:
        torch.set_num_threads(threads)
    got = {name: fingerprint(_unet(final.parent)) for name, final in shared.items()}
    assert got == {"a": alone[0], "b": alone[0], "c": alone[1]} and alone[0] != alone[1]


def test_timestep_bias_weights_follow_diffusers_rule():
    """later / earlier / range weight their part `multiplier` times the rest; none or x1 keeps the uniform draw."""
    from distill_sd.train import TrainConfig, timestep_weights

    def weights(**kw):
        return timestep_weights(TrainConfig(mode="distill", out="o", teacher="t", student="s", cache="c", **kw), 1000)

    assert weights() is None and weights(timestep_bias_strategy="later", timestep_bias_multiplier=1.0) is None
    later = weights(timestep_bias_strategy="later", timestep_bias_multiplier=3.0, timestep_bias_portion=0.25)
    assert abs(float(later.sum()) - 1) < 1e-9
    assert (later[750:] == 3 * later[0]).all() and (later[:750] == later[0]).all()
    earlier = weights(timestep_bias_strategy="earlier", timestep_bias_multiplier=0.0, timestep_bias_portion=0.5)
    assert (earlier[:500] == 0).all() and (earlier[500:] > 0).all()
    ranged = weights(timestep_bias_strategy="range", timestep_bias_multiplier=2.0, timestep_bias_begin=100,
                     timestep_bias_end=300)
    assert (ranged[100:300] == 2 * ranged[0]).all() and (ranged[300:] == ranged[0]).all()
    with pytest.raises(UserError, match="no timestep"):
        weights(timestep_bias_strategy="range", timestep_bias_multiplier=0.0, timestep_bias_end=1000)


def test_timestep_bias_draws_only_the_chosen_timesteps(narrow_dirs, shapes, tmp_path, monkeypatch):
    """A run with the low half of the timesteps weighted 0 trains on the high half only (every draw is seen)."""
    import torch
    from diffusers import DDPMScheduler

    drawn = []
    add_noise = DDPMScheduler.add_noise

    def record(self, latents, noise, timesteps):
        drawn.append(timesteps.clone())
        return add_noise(self, latents, noise, timesteps)

    monkeypatch.setattr(DDPMScheduler, "add_noise", record)
    assert main(_args(narrow_dirs["sd15"], shapes, tmp_path / "run", 6, "--timestep_bias_strategy", "earlier",
                      "--timestep_bias_portion", "0.5", "--timestep_bias_multiplier", "0")) == 0
    timesteps = torch.cat(drawn)
    assert len(timesteps) == 6 * 4 and int(timesteps.min()) >= 500
    assert len(set(timesteps.tolist())) > 12  # still a random draw over the allowed half


def test_kd_caption_mix_conditions_on_another_samples_caption(narrow_dirs, shapes, tmp_path, monkeypatch):
    """--kd_caption_mix 1: every sample gets its neighbour's caption (same data order as without), and the task
    term, which has no ground truth for such a pair, is zero; the KD terms still train."""
    import distill_sd.conditioning as conditioning

    seen: dict[str, list[list[str]]] = {}
    encode_text = conditioning.encode_text

    def record(run):
        def encode(base, captions, device):
            seen.setdefault(run, []).append(list(captions))
            return encode_text(base, captions, device)
        return encode

    for run, mix in (("plain", "0"), ("mixed", "1")):
        monkeypatch.setattr(conditioning, "encode_text", record(run))
        assert main(_args(narrow_dirs["sd15"], shapes, tmp_path / run, 3, "--kd_caption_mix", mix)) == 0
    assert len(seen["mixed"]) == 3
    for plain, mixed in zip(seen["plain"], seen["mixed"], strict=True):
        assert mixed == plain[-1:] + plain[:-1] and mixed != plain
    history = [json.loads(line) for line in (tmp_path / "mixed" / "history.jsonl").read_text().splitlines()]
    assert all(h["task"] == 0 and h["out"] > 0 and h["feat"] > 0 for h in history)
    for value, mode in (("1.5", "distill"), ("0.5", "finetune")):
        with pytest.raises(UserError, match="kd_caption_mix"):
            TrainConfig(mode=mode, out="o", teacher="t", student="s", cache="c", kd_caption_mix=float(value)).resolved()
