"""ONE training loop for pretrain | finetune | lora | distill, on accelerate.

The modes differ only in what they switch on:
    pretrain   a random-init U-Net (from a config) learns the task loss; frozen parts come from --base
    finetune   an existing U-Net continues on the task loss; no teacher
    lora       as finetune, but the U-Net is frozen and only low-rank adapters on its attention projections
               train (peft); the result is a diffusers LoRA file that stock `load_lora_weights` reads
    distill    a student (built from the catalogue, or a pre-built student folder) learns the task loss
               plus the teacher's output and block features (BK-SDM loss, see kd.py)

Read `train()` top to bottom: set-up, data, the step, the loop, checkpoints, the final pipeline.

Reproducibility: every random draw of a step (timesteps, noise, VAE sampling, dropped captions, crops and
flips) comes from generators seeded by (seed, step, process), and the data order of each epoch from
(seed, epoch). So a run resumed from a checkpoint continues exactly where the interrupted run was, and on
CPU ends bit-identical to a run that never stopped.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from distill_sd.errors import UserError
from distill_sd.generate import DTYPES
from distill_sd.kd import CrossAttentionMaps, FeatureTaps, LossWeights, TeacherForward, distillation_loss, grounding_loss

if TYPE_CHECKING:
    from distill_sd.shared_teacher import TeacherClient

MODES = ("pretrain", "finetune", "lora", "distill")
# Where LoRA adapters go: the attention projections, as in diffusers' train_text_to_image_lora.py.
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
RECIPES: dict[str, dict[str, Any]] = {
    # BK-SDM: plain sum of feature MSEs, weights 1/1/1, constant lr 5e-5.
    "bk-sdm": {"loss_task": 1.0, "loss_out": 1.0, "loss_feat": 1.0, "feature_norm": "none",
               "learning_rate": 5e-5, "lr_scheduler": "constant"},
    # segmind distill-sd README: output and feature terms at 0.5, lr 1e-5.
    "segmind": {"loss_task": 1.0, "loss_out": 0.5, "loss_feat": 0.5, "feature_norm": "none",
                "learning_rate": 1e-5, "lr_scheduler": "constant"},
    # Ours: BK-SDM's weights with each feature pair's MSE relative to the teacher feature's variance,
    # averaged over pairs, so no term dwarfs the others (kd.feature_loss).
    "balanced": {"loss_task": 1.0, "loss_out": 1.0, "loss_feat": 1.0, "feature_norm": "teacher_var",
                 "learning_rate": 5e-5, "lr_scheduler": "constant"},
}
TIMESTEP_BIAS = ("none", "earlier", "later", "range")
CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "train_state.json"  # written last: a checkpoint without it is incomplete and never resumed
LORA_CHECKPOINT_FILE = "lora_adapters.safetensors"  # a LoRA run's checkpoints hold only its adapters


@dataclass
class TrainConfig:
    """Every option of the loop. Names follow diffusers' train_text_to_image.py where one exists."""

    mode: str
    out: str
    data: str | None = None
    cache: str | None = None  # a `distill-sd cache` folder, instead of --data
    teacher: str | None = None  # distill
    student: str | None = None  # distill: catalogue name, spec file or student folder; finetune, lora: the model
    base: str | None = None  # pretrain: pipeline giving tokenizer, text encoder, VAE, scheduler (and U-Net config)
    unet_config: str | None = None  # pretrain: a U-Net config.json (default: the base pipeline's)
    init: str = "bk"
    allow_pickle: bool = False
    image_column: str = "image"
    caption_column: str = "text"
    allow_empty_captions: bool = False
    instance_prompt: str | None = None  # every image's caption instead of its own (DreamBooth's instance prompt)
    class_prompt: str | None = None  # DreamBooth prior preservation: images of the class, drawn by the model itself
    class_data_dir: str | None = None  # where they are kept (default OUT/class_images); made once, reused
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    resolution: int | None = None  # default: the model's own (sample_size x VAE scale)
    center_crop: bool = False
    random_flip: bool = False
    train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    learning_rate: float | None = None
    scale_lr: bool = False
    lr_scheduler: str | None = None
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_train_steps: int = 1000
    mixed_precision: str | None = None  # no | fp16 | bf16 (default: accelerate's config)
    use_ema: bool = False
    ema_decay: float = 0.9999
    use_8bit_adam: bool = False
    max_grad_norm: float = 1.0
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    validation_prompts: list[str] = field(default_factory=list)
    validation_steps: int = 500
    validation_inference_steps: int = 25
    report_to: str = "tensorboard"
    seed: int = 0
    dataloader_num_workers: int = 0
    recipe: str = "balanced"
    loss_task: float | None = None
    loss_out: float | None = None
    loss_feat: float | None = None
    feature_norm: str | None = None
    loss_ground: float = 0.0  # grounding (TokenCompose's token loss): needs a cache with grounding.safetensors
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    # Timestep bias, as diffusers' SDXL training scripts: timesteps are drawn with the chosen part weighted
    # `timestep_bias_multiplier` times the rest ("later" = the noisiest end, where sampling lays out the image).
    timestep_bias_strategy: str = "none"  # none | earlier | later | range
    timestep_bias_multiplier: float = 1.0
    timestep_bias_portion: float = 0.25  # earlier / later: the fraction of the timesteps biased
    timestep_bias_begin: int = 0  # range: the biased timesteps [begin, end)
    timestep_bias_end: int = 1000
    proportion_empty_prompts: float = 0.0
    # distill: this fraction of samples is conditioned on another sample's caption (rolled within the batch); the
    # teacher still answers, so the student learns the teacher's text -> image function beyond the pairs in the
    # data. Those samples have no ground truth: the task term skips them.
    kd_caption_mix: float = 0.0
    # This fraction of samples sees only the text encoder's summary of its caption: the states at the word tokens
    # replaced by the end-of-text state (conditioning.replace_word_states), so the U-Net also learns to draw from
    # what the encoder read of the whole caption, not only from each word's state. SD-1/SD-2 (one text encoder).
    word_dropout: float = 0.0
    teacher_dtype: str | None = None
    rank: int = 4  # lora: adapter rank
    lora_alpha: float | None = None  # lora: adapters are scaled by lora_alpha / rank (default: the rank, scale 1)
    progress: bool = True

    def resolved(self) -> TrainConfig:
        """Fill recipe defaults where the user gave nothing, then validate every value."""
        if self.mode not in MODES:
            raise UserError(f"mode must be one of {MODES}")
        if self.recipe not in RECIPES:
            raise UserError(f"unknown --recipe '{self.recipe}'; choose one of {', '.join(RECIPES)}")
        filled = dict(RECIPES[self.recipe])
        if self.mode != "distill":
            filled.update(loss_out=0.0, loss_feat=0.0, learning_rate=1e-4)
        if self.mode == "lora":
            filled["lora_alpha"] = float(self.rank)
        values = asdict(self)
        for key, default in filled.items():
            if values[key] is None:
                values[key] = default
        cfg = TrainConfig(**values)
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        self._check_types()
        positive = {"train_batch_size": self.train_batch_size, "max_train_steps": self.max_train_steps,
                    "gradient_accumulation_steps": self.gradient_accumulation_steps,
                    "checkpointing_steps": self.checkpointing_steps, "validation_steps": self.validation_steps,
                    "learning_rate": self.learning_rate, "rank": self.rank}
        for name, value in positive.items():
            if not value > 0:
                raise UserError(f"--{name} must be > 0, got {value}")
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            raise UserError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise UserError("--checkpoints_total_limit must be >= 1")
        for name in ("lr_warmup_steps", "noise_offset", "dataloader_num_workers", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be >= 0")
        if not 0 <= self.proportion_empty_prompts < 1:
            raise UserError("--proportion_empty_prompts must be in [0, 1)")
        if not 0 < self.ema_decay < 1:
            raise UserError("--ema_decay must be in (0, 1)")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise UserError("--snr_gamma must be > 0")
        if self.timestep_bias_strategy not in TIMESTEP_BIAS:
            raise UserError(f"--timestep_bias_strategy must be one of {', '.join(TIMESTEP_BIAS)}, "
                            f"got {self.timestep_bias_strategy!r}")
        if self.timestep_bias_multiplier < 0:
            raise UserError("--timestep_bias_multiplier must be >= 0 (0 leaves the biased timesteps out)")
        if not 0 < self.timestep_bias_portion <= 1:
            raise UserError("--timestep_bias_portion must be in (0, 1]")
        if not 0 <= self.timestep_bias_begin < self.timestep_bias_end:
            raise UserError("--timestep_bias_begin must be >= 0 and below --timestep_bias_end")
        if self.teacher_dtype is not None and self.teacher_dtype not in DTYPES:
            raise UserError(f"--teacher_dtype must be fp32, fp16 or bf16, got {self.teacher_dtype}")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise UserError(f"--mixed_precision must be no, fp16 or bf16, got {self.mixed_precision}")
        if (self.data is None) == (self.cache is None):
            raise UserError("give exactly one of --data (images) or --cache (a `distill-sd cache` folder)")
        if self.loss_ground < 0:
            raise UserError("--loss_ground must be >= 0")
        if not 0 <= self.kd_caption_mix <= 1:
            raise UserError(f"--kd_caption_mix must be in [0, 1], got {self.kd_caption_mix}")
        if not 0 <= self.word_dropout <= 1:
            raise UserError(f"--word_dropout must be in [0, 1], got {self.word_dropout}")
        if self.kd_caption_mix and self.mode != "distill":
            raise UserError("--kd_caption_mix needs a teacher to answer the mixed captions: it is for distill")
        if self.kd_caption_mix and self.loss_ground:
            raise UserError("--kd_caption_mix and --loss_ground do not combine: a mixed caption's words have no "
                            "object masks in that image; drop one of them")
        if self.loss_ground and self.cache is None:
            raise UserError("--loss_ground needs --cache: a cache with object masks (grounding.safetensors)")
        if self.cache and self.instance_prompt is not None:
            raise UserError("--instance_prompt applies to images (--data); a cache holds its captions already: give "
                            "it to `distill-sd cache --instance_prompt` instead")
        if self.instance_prompt is not None and not self.instance_prompt.strip():
            raise UserError("--instance_prompt is empty; give the caption every image gets, such as 'a photo of sks dog'")
        if self.class_prompt is not None:
            if self.instance_prompt is None or self.cache is not None:
                raise UserError("--class_prompt (prior preservation) needs --instance_prompt and images (--data)")
            if self.num_class_images < 1 or self.prior_loss_weight < 0:
                raise UserError("--num_class_images must be >= 1 and --prior_loss_weight >= 0")
        if self.cache and self.random_flip:
            raise UserError("--random_flip needs images, not a cache: cached latents are fixed; drop one of them")
        if self.mode == "lora":
            if self.use_ema:
                raise UserError("--use_ema is for full training; a LoRA run trains only its adapters: drop --use_ema")
            if not self.lora_alpha > 0:
                raise UserError(f"--lora_alpha must be > 0, got {self.lora_alpha}")
        needs = {"distill": ("teacher", "student"), "finetune": ("student",), "lora": ("student",),
                 "pretrain": ("base",)}[self.mode]
        for name in needs:
            if getattr(self, name) is None:
                raise UserError(f"{self.mode} needs --{name}")
        LossWeights(self.loss_task, self.loss_out, self.loss_feat, self.feature_norm)  # validates

    def _check_types(self) -> None:
        """Each value against its field's annotation: configs also come from YAML files and Python, where
        `train_batch_size: 8.0` would otherwise crash deep in the DataLoader. An int is a valid float."""
        kinds = {"int": int, "float": (int, float), "str": str, "bool": bool, "list[str]": list}
        for f in fields(self):
            value, allowed = getattr(self, f.name), [k.strip() for k in f.type.split("|")]
            if value is None and "None" in allowed:
                continue
            if not any(isinstance(value, kinds[k]) and (k == "bool" or not isinstance(value, bool))
                       for k in allowed if k != "None"):
                wanted = " or ".join(k for k in allowed if k != "None")
                raise UserError(f"--{f.name} must be {'an' if wanted[0] in 'aeiou' else 'a'} {wanted}, "
                                f"got {value!r}")


# ------------------------------------------------------------------------------------------ data order

class EpochSampler(Sampler[tuple[int, int]]):
    """This process's share of a seeded permutation per epoch, from an offset (for resuming mid-epoch).

    Yields (epoch, index) so each example's augmentation can be seeded too. Sharding is done here rather
    than by accelerate's loader wrapper so the order depends only on (seed, epoch, rank), never on how
    many times a loader was iterated before.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.n // self.world - self.start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        mine = torch.randperm(self.n, generator=g)[self.rank::self.world][: self.n // self.world]
        return iter([(self.epoch, int(i)) for i in mine[self.start:]])


class SeededItems(Dataset):
    """Runs `dataset[index]` with torch's RNG seeded by (seed, epoch, index): crops/flips reproduce on resume."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        epoch, index = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix(self.seed, epoch, index))
            return self.dataset[index]


def _mix(*values: int) -> int:
    h = 1469598103934665603
    for v in values:
        h = ((h ^ (v & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 61)
    return h


def _collate_cached(items: list[dict[str, Any]]) -> dict[str, Any]:
    batch = {"latent_mean": torch.stack([i["latent_mean"] for i in items]),
             "latent_std": torch.stack([i["latent_std"] for i in items]),
             "caption_id": torch.tensor([i["caption_id"] for i in items])}
    for key in ("ground_masks", "ground_tokens"):
        if key in items[0]:
            batch[key] = torch.stack([i[key] for i in items])
    return batch


# ------------------------------------------------------------------------------------------ checkpoints

def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Incomplete ones (no marker, or hidden temp dirs) never count."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_resume(out: Path, value: str | None) -> Path | None:
    if value is None:
        return None
    if value == "latest":
        found = list_checkpoints(out)
        return found[-1] if found else None  # nothing yet: start fresh (diffusers' behaviour)
    path = Path(value)
    if not (path / COMPLETE_MARKER).is_file():
        raise UserError(f"--resume_from_checkpoint '{value}' is not a complete checkpoint folder (no {COMPLETE_MARKER})")
    return path


def save_checkpoint(accelerator: Any, out: Path, step: int, state: dict[str, Any], limit: int | None) -> Path:
    """accelerate state into a hidden temp dir, marker written last, then an atomic rename; prune old ones."""
    root = out / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / COMPLETE_MARKER).write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if limit is not None:
            for old in list_checkpoints(out)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def checkpoint_only_adapters(accelerator: Any) -> None:
    """LoRA runs: checkpoints hold the adapters (megabytes) instead of the whole U-Net (3.4 GB at SD-1 size, and
    frozen): on resume the U-Net comes from --student again and the adapters from the checkpoint."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    def save(models: list[torch.nn.Module], weights: list[dict], output_dir: str) -> None:
        if accelerator.is_main_process:
            [model] = models
            adapters = get_peft_model_state_dict(accelerator.unwrap_model(model))
            save_file({k: v.contiguous() for k, v in adapters.items()}, Path(output_dir) / LORA_CHECKPOINT_FILE)
        weights.clear()  # accelerate writes no model file of its own

    def load(models: list[torch.nn.Module], input_dir: str) -> None:
        model = models.pop()  # accelerate loads no model itself
        f = Path(input_dir) / LORA_CHECKPOINT_FILE
        if not f.is_file():
            raise UserError(f"checkpoint '{input_dir}' holds no LoRA adapters ({LORA_CHECKPOINT_FILE}): it is not "
                            "from a lora run; resume it with the mode that wrote it")
        again = "resume with the --student and --rank the run was started with"
        try:
            result = set_peft_model_state_dict(accelerator.unwrap_model(model), load_file(f))
        except RuntimeError as e:  # adapter shapes differ: another rank or another model
            raise UserError(f"checkpoint '{input_dir}' does not fit this run's adapters "
                            f"({str(e).splitlines()[-1].strip()}): {again}") from None
        if result.unexpected_keys:
            raise UserError(f"checkpoint '{input_dir}' has adapters this run does not (such as "
                            f"{result.unexpected_keys[0]}): {again}")

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


# ------------------------------------------------------------------------------------------ DreamBooth

class PriorPairs(Dataset):
    """DreamBooth's pairing: item i is (instance i mod I, class i mod C), over max(I, C) items."""

    def __init__(self, instances: Dataset, classes: Dataset) -> None:
        self.instances, self.classes = instances, classes

    def __len__(self) -> int:
        return max(len(self.instances), len(self.classes))

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        return [self.instances[index % len(self.instances)],
                {**self.classes[index % len(self.classes)], "prior": True}]


def collate_prior_pairs(pairs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Instance and class examples in one batch, with `prior` marking the class ones."""
    from distill_sd.data import collate_skip_none

    items = [item for pair in pairs for item in pair]
    batch = collate_skip_none(items)
    batch["prior"] = torch.tensor([bool(item.get("prior")) for item in items if item["pixel_values"] is not None])
    return batch


@torch.no_grad()
def make_class_images(cfg: TrainConfig, models: Models, accelerator: Any, out: Path) -> Path:
    """The class images of prior preservation, drawn once by the model being trained (before any step; the main
    process draws, the others wait) with `--class_prompt`, image i from seed + i, each with its caption file.
    Images already there are kept, so a resumed run or a second run sharing --class_data_dir draws only what is
    missing."""
    from tqdm.auto import tqdm

    from distill_sd.generate import GenerationParams, generate

    folder = Path(cfg.class_data_dir) if cfg.class_data_dir else out / "class_images"
    missing = [i for i in range(cfg.num_class_images) if not (folder / f"class-{i:05d}.txt").is_file()]
    if missing and accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        pipe = validation_pipeline(models, models.student, accelerator.device)
        size = models.student.config.sample_size * _vae_scale(pipe)
        for i in tqdm(missing, desc="class images (prior preservation)", disable=not cfg.progress):
            params = GenerationParams(cfg.class_prompt, None, cfg.validation_inference_steps, 7.5, cfg.seed + i,
                                      size, size, "default", str(models.base_source))
            with accelerator.autocast():  # the frozen encoders may be in the mixed dtype, the U-Net in fp32
                (image,), _ = generate(pipe, params)
            image.save(folder / f"class-{i:05d}.png")
            (folder / f"class-{i:05d}.txt").write_text(cfg.class_prompt)  # last: marks the image complete
    accelerator.wait_for_everyone()
    return folder


# ------------------------------------------------------------------------------------------ models

@dataclass
class Models:
    base: Any  # the pipeline providing tokenizer(s), text encoder(s), VAE, scheduler
    base_source: str
    student: torch.nn.Module
    teacher: torch.nn.Module | None = None
    kd_pairs: list[tuple[str, str]] = field(default_factory=list)
    student_name: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    pipeline_class: type = field(init=False)  # the base's, kept when the base itself is released

    def __post_init__(self) -> None:
        self.pipeline_class = type(self.base)

    def release_base(self) -> None:
        """Free the VAE and text encoders (training from a cache never runs them); `pipeline()` reloads."""
        self.base = None

    def pipeline(self, unet: torch.nn.Module) -> Any:
        """The base pipeline with `unet` swapped in (reloaded from its source if it was released)."""
        if self.base is None:
            from distill_sd.models import load_teacher

            self.base = load_teacher(self.base_source).pipeline
        return self.pipeline_class(**{**self.base.components, "unet": unet})


def load_models(cfg: TrainConfig) -> Models:
    from diffusers import UNet2DConditionModel

    from distill_sd.models import load_teacher, read_metadata

    if cfg.mode == "pretrain":
        base = load_teacher(cfg.base, allow_pickle=cfg.allow_pickle)
        config_path = Path(cfg.unet_config) if cfg.unet_config else None
        if config_path is not None and not config_path.is_file():
            raise UserError(f"--unet_config '{cfg.unet_config}' not found")
        config = json.loads(config_path.read_text()) if config_path else dict(base.unet.config)
        torch.manual_seed(cfg.seed)
        student = UNet2DConditionModel.from_config(config)
        return Models(base.pipeline, cfg.base, student, student_name="pretrained")
    if cfg.mode in ("finetune", "lora"):
        base = load_teacher(cfg.student, allow_pickle=cfg.allow_pickle)
        if cfg.mode == "lora":
            try:
                from peft import LoraConfig
            except ImportError:
                raise UserError("lora needs peft: pip install 'distill-sd[train]' (or pip install peft)") from None

            torch.manual_seed(cfg.seed)  # the adapters' random init (B starts at zero: step 0 is the model itself)
            # peft freezes every weight but the adapters'
            base.unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                             target_modules=list(LORA_TARGETS)))
            return Models(base.pipeline, cfg.student, base.unet, student_name=f"lora r{cfg.rank}")
        return Models(base.pipeline, cfg.student, base.unet, student_name="finetuned",
                      metadata=read_metadata(Path(cfg.student)) or {} if Path(cfg.student).is_dir() else {})
    # distill
    teacher = load_teacher(cfg.teacher, allow_pickle=cfg.allow_pickle)
    student_path = Path(cfg.student)
    if student_path.is_dir():  # a pre-built student folder: taken as is
        meta = read_metadata(student_path)
        unet_dir = student_path / "unet" if (student_path / "unet").is_dir() else student_path
        if not (unet_dir / "config.json").is_file():
            raise UserError(f"student folder '{cfg.student}' has no U-Net (unet/config.json)")
        student = UNet2DConditionModel.from_pretrained(unet_dir)
        pairs = [tuple(p) for p in meta["kd_pairs"]] if meta and "kd_pairs" in meta else []
        if not pairs and cfg.loss_feat:
            raise UserError(f"student folder '{cfg.student}' records no KD pairs ({'distill_sd.json'}); "
                            "build it with `distill-sd build`, or pass --loss_feat 0")
        name = meta.get("student", student_path.name) if meta else student_path.name
        return Models(teacher.pipeline, cfg.teacher, student, teacher.unet, pairs, name, meta or {})
    from distill_sd.students import get_spec
    from distill_sd.surgery import build_student, plan_student, verify_pairs

    plan = plan_student(teacher.unet.config, get_spec(cfg.student, init=cfg.init))
    verify_pairs(plan, teacher.unet.config)
    student, coverage = build_student(teacher.unet, plan)
    from distill_sd.models import student_metadata

    meta = student_metadata(teacher, plan, student, coverage)
    return Models(teacher.pipeline, cfg.teacher, student, teacher.unet, list(plan.kd_pairs), plan.spec.name, meta)


def _vae_scale(pipe: Any) -> int:
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


# ------------------------------------------------------------------------------------------ the loop

def train(cfg: TrainConfig, on_step: Callable[[int, dict[str, float]], None] | None = None,
          shared_teacher: TeacherClient | None = None) -> Path:
    """Run one training job; returns the output pipeline folder (`out/final`). `on_step(step, losses)` is
    called after every optimisation step on the main process (e.g. to report progress to a parent process).
    `shared_teacher` (distill): a teacher running in another process, serving several students at once
    (shared_teacher.py); the teacher loaded here then only builds the student and is freed."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel, compute_snr
    from tqdm.auto import tqdm

    cfg = cfg.resolved()
    out = Path(cfg.out)
    final_dir = out / "final"
    resume = resolve_resume(out, cfg.resume_from_checkpoint)
    if final_dir.exists():
        raise UserError(f"'{out}' already holds a finished run ({final_dir}); choose a new --out")
    if out.exists() and any(out.iterdir()) and cfg.resume_from_checkpoint is None:
        raise UserError(f"'{out}' already exists and is not empty; pass --resume_from_checkpoint latest to "
                        "continue that run, or choose a new --out")

    # -- set-up: accelerate decides device, precision, processes ------------------------------------------
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    # The frozen teacher may run in a lower precision than the student: on CPUs whose bf16 is fast for inference
    # but whose autocast backward is slow, a bf16 teacher with an fp32 student is the fastest, leanest choice.
    teacher_dtype = DTYPES.get(cfg.teacher_dtype, weight_dtype)

    models = load_models(cfg)
    distilling = cfg.mode == "distill"
    if shared_teacher is not None:
        if not distilling:
            raise ValueError("shared_teacher is for mode distill")
        models.teacher = None
    base, student, teacher = models.base, models.student, models.teacher
    noise_scheduler = DDPMScheduler.from_config(base.scheduler.config)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(f"the scheduler predicts '{prediction_type}'; training supports epsilon and v_prediction")
    resolution = cfg.resolution or student.config.sample_size * _vae_scale(base)
    scaling_factor = base.vae.config.scaling_factor
    tokenizer = base.tokenizer  # kept when the base is released: --word_dropout finds the words with it
    if cfg.word_dropout and getattr(base, "text_encoder_2", None) is not None:
        raise UserError("--word_dropout is for pipelines with one text encoder (SD-1/SD-2); drop it for SDXL")

    # Frozen parts: eval, no grad, in the mixed dtype. With a cache, the VAE and text encoders are not needed
    # during training at all: they are released, and reloaded from their source for validation and saving.
    encoders = [m for m in (base.vae, getattr(base, "text_encoder", None), getattr(base, "text_encoder_2", None))
                if m is not None]
    for m in [*encoders, teacher]:
        if m is not None:
            m.requires_grad_(False).eval()
    if teacher is not None:
        teacher.to(device, dtype=teacher_dtype)
    if cfg.cache is None:
        for m in encoders:  # the VAE upcasts itself where its config asks (conditioning.encode_latent_dist)
            m.to(device, dtype=weight_dtype)
    else:
        del encoders
        models.release_base()
        base = None

    student.train()
    if cfg.mode != "lora":  # a LoRA run trains only the adapters peft left trainable
        student.requires_grad_(True)
    trainable = [p for p in student.parameters() if p.requires_grad]
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    ema = None
    if cfg.use_ema:  # built from the student itself (segmind built it from the unpruned teacher and crashed)
        ema = EMAModel(student.parameters(), decay=cfg.ema_decay, model_cls=UNet2DConditionModel,
                       model_config=student.config)
        ema.to(device)
        accelerator.register_for_checkpointing(ema)

    # -- data ---------------------------------------------------------------------------------------------
    data_stats = None
    if cfg.cache is not None:
        from distill_sd.cache import CachedExamples

        dataset = CachedExamples(cfg.cache)
        if cfg.loss_ground and dataset.grounding is None:
            raise UserError(f"--loss_ground needs object masks in the cache: '{cfg.cache}' has no grounding."
                            "safetensors (shapes: `python -m distill_sd.shapes.grounding CACHE DATA`)")
        if dataset.index["resolution"] != resolution:
            raise UserError(f"cache '{cfg.cache}' was made at {dataset.index['resolution']} px but training "
                            f"runs at {resolution} px; pass --resolution {dataset.index['resolution']} or re-cache")
        collate, streaming = _collate_cached, False
        if cfg.word_dropout:  # where each cached caption's words end
            from distill_sd.conditioning import end_of_text_positions

            caption_eot = end_of_text_positions(tokenizer, dataset.index["captions"])
    else:
        from distill_sd.data import TrainingExamples, collate_skip_none, image_transform, open_dataset

        source = open_dataset(cfg.data, image_column=cfg.image_column, caption_column=cfg.caption_column,
                              allow_empty_captions=cfg.allow_empty_captions or cfg.instance_prompt is not None)
        transform = image_transform(resolution, cfg.center_crop, cfg.random_flip)
        dataset = TrainingExamples(source, transform, cfg.instance_prompt)
        collate, streaming = collate_skip_none, source.streaming
        data_stats = source.stats
        if cfg.class_prompt is not None:  # DreamBooth: every instance example comes with a class example
            if streaming:
                raise UserError("--class_prompt needs a folder or dataset of instance images, not streamed shards")
            class_dir = make_class_images(cfg, models, accelerator, out)
            classes = TrainingExamples(open_dataset(str(class_dir)), transform)
            dataset, collate = PriorPairs(dataset, classes), collate_prior_pairs
    if streaming:  # shards are already split per process and worker (data.StreamingTrainingExamples)
        loader = DataLoader(dataset, batch_size=cfg.train_batch_size, collate_fn=collate,
                            num_workers=cfg.dataloader_num_workers)
        sampler = None
    else:
        if len(dataset) < cfg.train_batch_size * accelerator.num_processes:
            raise UserError(f"the dataset has {len(dataset)} examples, fewer than one batch "
                            f"({cfg.train_batch_size} x {accelerator.num_processes} processes)")
        sampler = EpochSampler(len(dataset), cfg.seed, accelerator.process_index, accelerator.num_processes)
        loader = DataLoader(SeededItems(dataset, cfg.seed), batch_size=cfg.train_batch_size, sampler=sampler,
                            collate_fn=collate, num_workers=cfg.dataloader_num_workers, drop_last=True)

    # -- optimiser and schedule -----------------------------------------------------------------------------
    lr = cfg.learning_rate * (cfg.gradient_accumulation_steps * cfg.train_batch_size *
                              accelerator.num_processes if cfg.scale_lr else 1)
    optimizer = _optimizer(cfg, student, device)(trainable, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                                 weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=cfg.max_train_steps * accelerator.num_processes)
    student, optimizer, lr_scheduler = accelerator.prepare(student, optimizer, lr_scheduler)
    if cfg.mode == "lora":
        checkpoint_only_adapters(accelerator)
    raw_student = accelerator.unwrap_model(student)

    # Feature taps on module objects of the unwrapped models: immune to DDP's `module.` renaming.
    weights = LossWeights(cfg.loss_task, cfg.loss_out, cfg.loss_feat, cfg.feature_norm)
    use_feats = distilling and cfg.loss_feat > 0 and models.kd_pairs
    s_taps = FeatureTaps(raw_student, [s for s, _ in models.kd_pairs]) if use_feats else None
    t_names = [t for _, t in models.kd_pairs] if use_feats else []
    if not distilling:
        teacher_forward = None
    elif shared_teacher is not None:
        teacher_forward = shared_teacher.tap(t_names)
    else:
        teacher_forward = TeacherForward(teacher, t_names, teacher_dtype)
    # Grounding: the student's text cross-attention maps, read after its forward.
    attention_maps = CrossAttentionMaps(raw_student) if cfg.loss_ground else None

    # -- resume ------------------------------------------------------------------------------------------------
    global_step = 0
    if resume is not None:
        accelerator.load_state(str(resume))
        global_step = json.loads((resume / COMPLETE_MARKER).read_text())["step"]
        accelerator.print(f"resumed from {resume} at step {global_step}")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
        if cfg.report_to != "none":
            accelerator.init_trackers("distill-sd", config=_flat(asdict(cfg)))


    def conditioning(batch: dict[str, Any], g: torch.Generator):
        """(latents, text conditioning, which captions were dropped) for a batch, from the cache or from the
        frozen encoders."""
        from distill_sd.conditioning import (
            encode_latent_dist,
            encode_text,
            end_of_text_positions,
            replace_word_states,
            sample_latents,
        )

        n = len(batch["caption_id"] if cfg.cache is not None else batch["caption"])

        def coin(p: float) -> torch.Tensor | None:  # which rows of the batch a rule with probability p hits
            return torch.rand(n, generator=g, device=device).cpu() < p if p else None

        # Drawn before either path encodes anything, in one order, so the cache and the encoders see the same
        # masks: caption mixing first (a row takes its neighbour's caption), then empty-caption dropout.
        mixed, drop = coin(cfg.kd_caption_mix), coin(cfg.proportion_empty_prompts)
        words_dropped = coin(cfg.word_dropout)  # drawn last: runs without it keep their masks
        if cfg.cache is not None:
            mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
            ids = batch["caption_id"]
            if mixed is not None:
                ids = torch.where(mixed, ids.roll(1), ids)
            if drop is not None:
                ids = torch.where(drop, torch.zeros_like(ids), ids)  # row 0 is the empty prompt
            cond = dataset.text_conditioning(ids, device, weight_dtype)
            if words_dropped is not None:
                cond.embeds = replace_word_states(cond.embeds, caption_eot[ids], rows=words_dropped)
        else:
            mean, std = encode_latent_dist(base, batch["pixel_values"].to(device))
            captions = list(batch["caption"])
            if mixed is not None:
                captions = [captions[i - 1] if m else c for i, (c, m) in enumerate(zip(captions, mixed.tolist()))]
            if drop is not None:
                captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
            cond = encode_text(base, captions, device)
            cond.embeds = cond.embeds.to(weight_dtype)
            if words_dropped is not None:
                cond.embeds = replace_word_states(cond.embeds, end_of_text_positions(tokenizer, captions),
                                                  rows=words_dropped)
            if cond.pooled is not None:
                cond.pooled = cond.pooled.to(weight_dtype)
        latents = sample_latents(mean, std, scaling_factor, g)
        return latents, cond, drop, mixed

    num_timesteps = noise_scheduler.config.num_train_timesteps
    timestep_probs = timestep_weights(cfg, num_timesteps)
    if timestep_probs is not None:  # on the step generator's device
        timestep_probs = timestep_probs.to(device)

    def step_loss(batch: dict[str, Any], micro: int) -> dict[str, torch.Tensor]:
        g = torch.Generator(device=device).manual_seed(_mix(cfg.seed, global_step, micro, accelerator.process_index))
        latents, cond, dropped, mixed = conditioning(batch, g)
        noise = torch.randn(latents.shape, generator=g, device=device)
        if cfg.noise_offset:  # https://www.crosslabs.org//blog/diffusion-with-offset-noise
            noise = noise + cfg.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=g, device=device)
        bsz = latents.shape[0]
        if timestep_probs is None:
            timesteps = torch.randint(0, num_timesteps, (bsz,), generator=g, device=device).long()
        else:
            timesteps = torch.multinomial(timestep_probs, bsz, replacement=True, generator=g)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
        kwargs = cond.unet_kwargs(resolution)
        # A shared teacher starts on this batch now and works while the student runs; a local one runs below.
        pending = teacher_forward.submit(noisy, timesteps, kwargs) if distilling else None
        if attention_maps is not None:
            attention_maps.clear()
        with accelerator.autocast():
            pred = student(noisy, timesteps, **kwargs).sample
        teacher_pred, s_feats, t_feats = None, [], []
        if distilling:
            with accelerator.autocast():
                teacher_pred, t_feats = pending()
            if use_feats:
                s_feats = s_taps.take()
        snr_w = None
        if cfg.snr_gamma is not None:  # Min-SNR weighting (Hang et al. 2023), as in diffusers' scripts
            snr = compute_snr(noise_scheduler, timesteps)
            snr_w = torch.stack([snr, cfg.snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
            snr_w = snr_w / snr if prediction_type == "epsilon" else snr_w / (snr + 1)
        prior = batch.get("prior")
        if prior is not None:  # DreamBooth: the class half of the batch, weighted by --prior_loss_weight
            prior = prior.to(device)
            prior_w = 1.0 + (cfg.prior_loss_weight - 1.0) * prior.float()
            snr_w = prior_w if snr_w is None else snr_w * prior_w
        if mixed is not None and mixed.any():  # a mixed caption's image is not its ground truth
            keep = (~mixed).float().to(device)
            snr_w = keep if snr_w is None else snr_w * keep
        terms = distillation_loss(pred, target, weights, teacher_pred, s_feats, t_feats, snr_w)
        if prior is not None and prior.any():  # shown apart: the prior term is what keeps the class from drifting
            terms["prior"] = torch.nn.functional.mse_loss(pred[prior].float().detach(), target[prior].float())
        if attention_maps is not None:  # a dropped (empty) caption names no object: nothing to ground
            tokens = batch["ground_tokens"].to(device)
            if dropped is not None:
                tokens = tokens.masked_fill(dropped.to(device)[:, None, None], -1)
            terms["ground"] = grounding_loss(attention_maps.take(), batch["ground_masks"].to(device), tokens)
            terms["loss"] = terms["loss"] + cfg.loss_ground * terms["ground"]
        return terms

    # -- the loop -----------------------------------------------------------------------------------------
    batches_per_epoch = None if streaming else (len(dataset) // accelerator.num_processes) // cfg.train_batch_size
    consumed = global_step * cfg.gradient_accumulation_steps  # micro-batches already used
    epoch = consumed // batches_per_epoch if batches_per_epoch else 0
    bar = tqdm(total=cfg.max_train_steps, initial=global_step, desc=f"{cfg.mode} {models.student_name}",
               unit="step", disable=not (cfg.progress and accelerator.is_local_main_process), dynamic_ncols=True)
    last: dict[str, float] = {}
    running: dict[str, float] = {}
    micro = 0
    step_started = time.perf_counter()
    while global_step < cfg.max_train_steps:
        if sampler is not None:  # resuming mid-epoch starts this epoch's order where it stopped
            sampler.set_epoch(epoch, start=(consumed % batches_per_epoch) * cfg.train_batch_size)
        for batch in loader:
            consumed += 1
            if data_stats is not None and "skipped" in batch:
                data_stats.count_batch(batch)
                if batch["pixel_values"] is None:
                    continue
            with accelerator.accumulate(student):
                terms = step_loss(batch, micro)
                micro += 1
                finite = torch.isfinite(terms["loss"].detach()).float()
                if accelerator.num_processes > 1:
                    finite = accelerator.reduce(finite.to(device), reduction="mean")
                if float(finite) < 1:
                    raise UserError(_nan_message(terms, global_step, out))
                accelerator.backward(terms["loss"])
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in terms.items():
                running[k] = running.get(k, 0.0) + float(v.detach()) / cfg.gradient_accumulation_steps
            if not accelerator.sync_gradients:
                continue
            # ---- one optimisation step done ----
            global_step += 1
            micro = 0
            if ema is not None:
                ema.step(raw_student.parameters())
            last, running = running, {}
            last["lr"] = lr_scheduler.get_last_lr()[0]
            last["sec"] = time.perf_counter() - step_started  # wall time of this step (incl. data)
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in last.items() if k != "sec"}, refresh=False)
            if on_step is not None and accelerator.is_main_process:
                on_step(global_step, last)
            if cfg.report_to != "none":
                accelerator.log({f"train/{k}": v for k, v in last.items()}, step=global_step)
            if accelerator.is_main_process:  # plain-text history next to tensorboard: easy to plot and test
                with open(out / "history.jsonl", "a") as f:
                    f.write(json.dumps({"step": global_step, **last}) + "\n")
            if global_step % cfg.checkpointing_steps == 0 or global_step == cfg.max_train_steps:
                save_checkpoint(accelerator, out, global_step, {"step": global_step, "losses": last},
                                cfg.checkpoints_total_limit)
            if cfg.validation_prompts and (global_step % cfg.validation_steps == 0
                                           or global_step == cfg.max_train_steps):
                validate(accelerator, cfg, models, raw_student, ema, out, global_step)
            if global_step >= cfg.max_train_steps:
                break
            step_started = time.perf_counter()
        epoch += 1
    bar.close()
    if attention_maps is not None:  # the saved model runs the original (fused) attention processors
        attention_maps.remove()

    # -- the final pipeline -------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final_unet = _final_unet(raw_student, ema)
        _save_final(cfg, models, final_unet, final_dir, last, data_stats)
    if s_taps is not None:
        s_taps.remove()
    if isinstance(teacher_forward, TeacherForward):
        teacher_forward.remove()
    accelerator.end_training()
    return final_dir


def timestep_weights(cfg: TrainConfig, num_timesteps: int) -> torch.Tensor | None:
    """Relative weights of the training timesteps under --timestep_bias_strategy (None: uniform, drawn as before).

    Same rule as diffusers' `generate_timestep_weights`: the chosen timesteps weigh `timestep_bias_multiplier`,
    the others 1. A bias that leaves no timestep to draw is refused here rather than failing at the first step.
    """
    if cfg.timestep_bias_strategy == "none" or cfg.timestep_bias_multiplier == 1.0:
        return None
    weights = torch.ones(num_timesteps, dtype=torch.float64)
    biased = max(1, int(cfg.timestep_bias_portion * num_timesteps))
    chosen = {"earlier": slice(0, biased), "later": slice(num_timesteps - biased, num_timesteps),
              "range": slice(cfg.timestep_bias_begin, min(cfg.timestep_bias_end, num_timesteps))}
    part = chosen[cfg.timestep_bias_strategy]
    if part.start >= num_timesteps:
        raise UserError(f"--timestep_bias_begin {cfg.timestep_bias_begin} is past the scheduler's "
                        f"{num_timesteps} timesteps")
    weights[part] *= cfg.timestep_bias_multiplier
    if weights.sum() == 0:
        raise UserError("--timestep_bias_multiplier 0 with this bias leaves no timestep to train on")
    return weights / weights.sum()


def _optimizer(cfg: TrainConfig, model: torch.nn.Module, device: torch.device):
    """AdamW, fused where torch has a fused kernel (CPU, CUDA): one pass over the weights and no
    parameter-sized temporaries (the default foreach path allocates several), so faster and leaner."""
    if not cfg.use_8bit_adam:
        if device.type in ("cpu", "cuda") and all(p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                                                  for p in model.parameters()):
            return functools.partial(torch.optim.AdamW, fused=True)
        return torch.optim.AdamW
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (CUDA only)") from None
    return bnb.optim.AdamW8bit


def _nan_message(terms: dict[str, torch.Tensor], step: int, out: Path) -> str:
    parts = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
    found = list_checkpoints(out)
    keep = f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"
    return (f"loss is not finite at step {step + 1} ({parts}); stopped, {keep}. Lower --learning_rate, "
            "use --mixed_precision bf16 instead of fp16, or check the data")


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in d.items()}


def _final_unet(student: torch.nn.Module, ema: Any) -> torch.nn.Module:
    if ema is None:
        return student
    import copy

    unet = copy.deepcopy(student)
    ema.copy_to(unet.parameters())
    return unet


def validation_pipeline(models: Models, unet: torch.nn.Module, device: torch.device) -> Any:
    pipe = models.pipeline(unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def validate(accelerator: Any, cfg: TrainConfig, models: Models, student: torch.nn.Module, ema: Any, out: Path,
             step: int) -> None:
    """Images for --validation_prompts (fixed seed) into out/validation/step-N/ and the tracker."""
    if not accelerator.is_main_process:
        return
    unet = _final_unet(student, ema).eval()
    pipe = validation_pipeline(models, unet, accelerator.device)
    folder = out / "validation" / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i, prompt in enumerate(cfg.validation_prompts):
        g = torch.Generator(device="cpu").manual_seed(cfg.seed)
        with accelerator.autocast():
            image = pipe(prompt, num_inference_steps=cfg.validation_inference_steps, generator=g).images[0]
        image.save(folder / f"{i:02d}.png")
        images.append(image)
    (folder / "prompts.json").write_text(json.dumps(cfg.validation_prompts, indent=1))
    if cfg.report_to == "tensorboard":
        import numpy as np

        tracker = accelerator.get_tracker("tensorboard")
        tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")
    student.train()


def _save_final(cfg: TrainConfig, models: Models, unet: torch.nn.Module, final_dir: Path,
                last: dict[str, float], data_stats: Any) -> None:
    from distill_sd.models import model_card, save_pipeline

    training = {"mode": cfg.mode, "recipe": cfg.recipe if cfg.mode == "distill" else "task loss only",
                "steps": cfg.max_train_steps, "data": cfg.data or f"cache {cfg.cache}",
                "batch size": f"{cfg.train_batch_size} x {cfg.gradient_accumulation_steps} accumulation",
                "learning rate": cfg.learning_rate, "ema": cfg.use_ema,
                "final losses": ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k not in ("lr", "sec"))}
    if data_stats is not None:
        training["data read"] = data_stats.summary()
    if cfg.instance_prompt is not None:
        training["instance prompt"] = cfg.instance_prompt
    if cfg.class_prompt is not None:
        training["prior preservation"] = (f"{cfg.num_class_images} images of '{cfg.class_prompt}' drawn by the base "
                                          f"model, loss weight {cfg.prior_loss_weight:g}")
    unet = unet.to("cpu", dtype=torch.float32)
    if cfg.mode == "lora":
        training["adapters"] = f"LoRA rank {cfg.rank}, alpha {cfg.lora_alpha:g}, on {', '.join(LORA_TARGETS)}"
        _save_lora(models, unet, final_dir, training)
        return
    meta = dict(models.metadata)
    if meta.get("teacher_unet_params"):
        meta["training"] = training
        meta["student_unet_params"] = sum(p.numel() for p in unet.parameters())
        card = model_card(meta)
    else:
        meta = {"distill_sd_version": _version(), "base": models.base_source, "training": training,
                "kd_pairs": [list(p) for p in models.kd_pairs]}
        card = (f"# {cfg.mode} of `{models.base_source}`\n\nTrained by distill-sd {_version()}.\n\n"
                + "\n".join(f"- {k}: {v}" for k, v in training.items()) + "\n")
    # frozen parts may have run in the mixed dtype: save everything in fp32, as the teacher was loaded
    save_pipeline(models.pipeline(unet).to("cpu", dtype=torch.float32), final_dir, card=card, metadata=meta)
    print(f"saved {final_dir}  ({training['final losses']})")


def _save_lora(models: Models, unet: torch.nn.Module, final_dir: Path, training: dict[str, Any]) -> None:
    """Only the adapters, in diffusers' LoRA format (pytorch_lora_weights.safetensors, as diffusers' LoRA scripts
    write it), with a card saying which model they adapt: the base weights were never changed."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from distill_sd.models import new_output_dir, write_metadata

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    pipeline_class = models.pipeline_class  # StableDiffusionPipeline, StableDiffusionXLPipeline, ...
    base = models.base_source
    card = (f"# LoRA for `{base}`\n\nTrained by distill-sd {_version()}. Use it with the model it was trained on:\n\n"
            f"```python\nfrom diffusers import {pipeline_class.__name__}\n\n"
            f"pipe = {pipeline_class.__name__}.from_pretrained({json.dumps(base)})\n"
            f"pipe.load_lora_weights({json.dumps(str(final_dir))})\n```\n\n"
            f"or `distill-sd generate {base} --lora {final_dir}`.\n\n"
            + "\n".join(f"- {k}: {v}" for k, v in training.items()) + "\n")
    with new_output_dir(final_dir) as tmp:
        # The adapter config goes into the file's metadata: without it, loaders assume lora_alpha = rank and scale
        # the adapters wrongly whenever --lora_alpha differs (measured: tests/test_lora.py)
        pipeline_class.save_lora_weights(tmp, unet_lora_layers=layers, safe_serialization=True,
                                         unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
        (tmp / "README.md").write_text(card)
        write_metadata(tmp, {"distill_sd_version": _version(), "base": base, "lora": True, "training": training})
    print(f"saved {final_dir}  ({training['final losses']})")


def _version() -> str:
    from distill_sd import __version__

    return __version__


def fingerprint(model: torch.nn.Module) -> str:
    """A hash of every parameter's bytes: equal fingerprints mean bit-identical weights."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

