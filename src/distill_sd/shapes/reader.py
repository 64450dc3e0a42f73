"""Teach the kit's text encoder to read shapes captions: the offline stand-in for CLIP's pretraining.

SD's U-Net is trained on top of a text encoder that already understands language (CLIP). A *random* frozen
encoder does not: it keeps each word's identity, but its causal attention mixes context at random, so the
U-Net must work out on its own which colour goes with which shape and where each object goes. It learns
one-object captions but not two-object ones ("a red circle to the left of a blue square": binding and
relation).

`pretrain_reader` gives the encoder that understanding before the U-Net ever trains, with a cheap supervised
task on captions alone (no images; 1,500 steps take about 4 minutes on one core): from the hidden states of
the end-of-text and padding tokens (under causal attention they are the only ones that have read the whole
caption), a linear probe must recover the scene *by region* -- what is on the left, on the right, at the top, at the
bottom, in the centre, or anywhere -- each as (colour, shape, size). A linear probe is what the U-Net's
cross-attention (linear keys and values) can use directly. The probe is thrown away; the encoder is then
frozen, as SD's CLIP is, and shared by teacher and students.

The captions come from the whole world (split "all"), held-out (shape, colour) pairs included, as CLIP has
read about green circles long before any diffusion model is trained on top of it: it is text only, and the
U-Net still never sees an *image* of a held-out pair, so the held-out evaluation still measures compositional
generalisation of the image model. (`split="train"` keeps those captions from the encoder as well; it then
reads held-out captions less reliably.) `reader_accuracy` measures how well a probe reads captions.

`nouns=True` adds a second target: each shape word must carry its own object's colour and stated size
(`noun_targets`). Under causal attention the second shape word of "a red circle left of a blue square" has
read both colours, and the region task alone does not make it keep which one is its own (a linear probe on
it mixes the two), while a U-Net attending to shape words needs exactly that binding. Experimental: the
shipped teacher was trained without it; a teacher trained from scratch with it tied with the shipped one on
held-out captions (its card has the figures).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from distill_sd.errors import UserError
from distill_sd.shapes.world import COLOURS, POSITIONS, RELATIONS, SHAPES, SIZE_RANGES, Scene, sample_scenes

# Regions a caption can put an object in; "anywhere" is a single object whose position is not stated.
REGIONS: tuple[str, ...] = (*POSITIONS, "anywhere")
# Where "A <relation> B" puts A and B.
RELATION_REGIONS: dict[str, tuple[str, str]] = {
    "to the left of": ("left", "right"),
    "to the right of": ("right", "left"),
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
}
assert set(RELATION_REGIONS) == set(RELATIONS)
# Per region: colour (none + palette), shape (none + shapes), size (none/unstated + sizes).
ATTRIBUTES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("colour", ("none", *COLOURS)), ("shape", ("none", *SHAPES)), ("size", ("none", *SIZE_RANGES)))
MIN_STEPS = 20  # the one-cycle schedule's 10 % warm-up needs at least two steps
_N_CLASSES = sum(len(values) for _, values in ATTRIBUTES)
# What each shape word is taught to carry about its own object (pretrain_reader(nouns=True)).
NOUN_ATTRIBUTES: tuple[tuple[str, tuple[str, ...]], ...] = (("colour", COLOURS), ("size", tuple(SIZE_RANGES)))


def scene_targets(scene: Scene) -> list[int]:
    """Class index per (region, attribute) for a scene, in REGIONS x ATTRIBUTES order."""
    placed = {region: None for region in REGIONS}
    if scene.relation is None:
        [obj] = scene.objects
        placed[obj.position if scene.mentions_position else "anywhere"] = obj
    else:
        for obj, region in zip(scene.objects, RELATION_REGIONS[scene.relation]):
            placed[region] = obj
    targets = []
    for region in REGIONS:
        obj = placed[region]
        for name, values in ATTRIBUTES:
            value = "none" if obj is None or (name == "size" and not scene.mentions_size) else getattr(obj, name)
            targets.append(values.index(value))
    return targets


def _batch(tokenizer, scenes: list[Scene], device: torch.device, nouns: bool = False):
    ids = tokenizer([s.caption for s in scenes], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(device)
    # Read-out positions: the first end-of-text token and every pad after it (pads are <|endoftext|> too).
    eos = ids == tokenizer.eos_token_id
    readout = eos.cumsum(1) > 0
    targets = torch.tensor([scene_targets(s) for s in scenes], device=device)
    return ids, readout, targets, noun_targets(tokenizer, scenes, ids) if nouns else None


def noun_targets(tokenizer, scenes: list[Scene], ids: torch.Tensor) -> torch.Tensor:
    """(B, T, len(NOUN_ATTRIBUTES)): at each shape word, the class index of the colour and of the stated size of
    the object it names (objects are described in caption order; -100, ignored, for an unstated size and at
    every other token)."""
    shape_ids = {tokenizer.convert_tokens_to_ids(f"{shape}</w>") for shape in SHAPES}
    targets = torch.full((*ids.shape, len(NOUN_ATTRIBUTES)), -100, dtype=torch.long)
    for row, scene in enumerate(scenes):
        nouns = [t for t, i in enumerate(ids[row].tolist()) if i in shape_ids]
        assert len(nouns) == len(scene.objects), scene.caption
        for t, obj in zip(nouns, scene.objects):
            for k, (name, values) in enumerate(NOUN_ATTRIBUTES):
                if name != "size" or scene.mentions_size:
                    targets[row, t, k] = values.index(getattr(obj, name))
    return targets.to(ids.device)


def _logits(hidden: torch.Tensor, probe: nn.Linear) -> torch.Tensor:
    """hidden: the encoder's last hidden state, what the U-Net cross-attends to."""
    return probe(hidden).unflatten(-1, (len(REGIONS), _N_CLASSES))  # (B, T, regions, classes)


def _loss_and_hits(logits: torch.Tensor, readout: torch.Tensor, targets: torch.Tensor):
    """Mean cross-entropy over read-out positions, and per-caption 'every attribute right' at the last one."""
    loss, right = 0.0, torch.ones(len(targets), dtype=torch.bool, device=targets.device)
    start = 0
    for k, (_, values) in enumerate(ATTRIBUTES):
        for r in range(len(REGIONS)):
            part = logits[:, :, r, start:start + len(values)]  # (B, T, classes)
            t = targets[:, r * len(ATTRIBUTES) + k]
            ce = nn.functional.cross_entropy(part.transpose(1, 2), t[:, None].expand(-1, part.shape[1]),
                                             reduction="none")
            loss = loss + (ce * readout).sum() / readout.sum()
            right &= part[:, -1].argmax(-1) == t
        start += len(values)
    return loss / (len(REGIONS) * len(ATTRIBUTES)), right


def _noun_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each shape word's own object's attributes (NOUN_ATTRIBUTES), averaged over attributes."""
    loss, start = 0.0, 0
    for k, (_, values) in enumerate(NOUN_ATTRIBUTES):
        loss = loss + nn.functional.cross_entropy(logits[..., start:start + len(values)].transpose(1, 2),
                                                  targets[..., k])
        start += len(values)
    return loss / len(NOUN_ATTRIBUTES)


def pretrain_reader(text_encoder: nn.Module, tokenizer, *, steps: int = 1500, batch_size: int = 128,
                    learning_rate: float = 3e-3, captions: int = 20000, split: str = "all", seed: int = 0,
                    nouns: bool = False, progress: bool = True) -> nn.Linear:
    """Train `text_encoder` in place (see the module docstring) and return the probe (for `reader_accuracy`;
    it is not part of the pipeline). The encoder is left frozen (requires_grad False) and in eval mode."""
    if steps < MIN_STEPS:
        raise UserError(f"the text encoder needs at least {MIN_STEPS} reading steps, got {steps} (0 skips reading)")
    device = next(text_encoder.parameters()).device
    # Never more captions than the run can draw (a short run need not tokenise 20,000); prefixes are stable.
    scenes = sample_scenes(min(captions, steps * batch_size), seed=seed + 7919, split=split)  # not the U-Net's seed
    torch.manual_seed(seed)
    probe = nn.Linear(text_encoder.config.hidden_size, len(REGIONS) * _N_CLASSES).to(device)
    params = [*text_encoder.parameters(), *probe.parameters()]
    if nouns:
        noun_probe = nn.Linear(text_encoder.config.hidden_size, sum(len(v) for _, v in NOUN_ATTRIBUTES)).to(device)
        params += noun_probe.parameters()
    text_encoder.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps,
                                                   pct_start=0.1)
    all_ids, all_readout, all_targets, all_nouns = _batch(tokenizer, scenes, device, nouns)  # tokenise once
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="text encoder: learn to read captions", disable=not progress, dynamic_ncols=True)
    for step in bar:
        pick = torch.randint(len(scenes), (batch_size,), generator=g).to(device)
        hidden = text_encoder(all_ids[pick]).last_hidden_state
        loss, _ = _loss_and_hits(_logits(hidden, probe), all_readout[pick], all_targets[pick])
        if nouns:
            loss = loss + _noun_loss(noun_probe(hidden), all_nouns[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    text_encoder.requires_grad_(False).eval()
    return probe.requires_grad_(False)


@torch.no_grad()
def reader_accuracy(text_encoder: nn.Module, probe: nn.Linear, tokenizer, scenes: list[Scene]) -> float:
    """Fraction of captions whose whole region table `probe` (from pretrain_reader) reads correctly."""
    ids, readout, targets, _ = _batch(tokenizer, scenes, next(text_encoder.parameters()).device)
    _, right = _loss_and_hits(_logits(text_encoder(ids).last_hidden_state, probe), readout, targets)
    return right.float().mean().item()
