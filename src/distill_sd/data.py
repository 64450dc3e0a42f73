"""Training data: captioned images from folders, webdataset shards or Hugging Face datasets.

Every source becomes a `CaptionedImages` yielding `(key, RGB image, caption)`, so caching and training
share one reader and one `image_transform`. Two rules shape the design:

* A bad image must never kill a long run: unreadable, corrupt or truncated images are skipped and
  counted in `DataStats`. They are found lazily, while reading, because opening millions of files up
  front would delay the start of training by hours.
* Bad *input* must fail before training starts: a missing path, an empty folder, a missing column or a
  missing caption is a `UserError` naming the culprit. Captions are checked up front wherever that is
  cheap (folders, metadata files, dataset columns); webdataset shards can only be checked as they stream.

`datasets` and `webdataset` are optional dependencies (the `train` extra), so they are imported only by
the code paths that need them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, IterableDataset

from distill_sd.errors import UserError

if TYPE_CHECKING:
    import datasets

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
# Files that make a folder worth handing to `datasets.load_dataset` (parquet exports, hub clones...).
HF_DATA_SUFFIXES = (".parquet", ".arrow", ".csv", ".json", ".jsonl")
LAYOUTS = (
    "an image folder with same-name .txt captions, an image folder with metadata.jsonl or metadata.csv, "
    "webdataset .tar shards (KEY.jpg + KEY.txt), or a Hugging Face dataset (save_to_disk folder or hub name)"
)
# "name" or "namespace/name": anything else that does not exist locally cannot be a hub dataset either.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")

Record = tuple[str, Image.Image, str]
# What readers produce before filtering: image None means unreadable. Keeping the key of a skipped item
# lets the DataLoader path report it from worker processes (see `collate_skip_none`).
RawRecord = tuple[str, Image.Image | None, str]


@dataclass
class DataStats:
    """Counters for the end-of-run report.

    `seen` counts every record read, including the skipped ones, so the report reads "skipped M of N".
    A truncated webdataset shard counts as one skipped record (its name is kept) even though the images
    after the break are lost too: the count is a lower bound there.
    """

    seen: int = 0
    skipped_corrupt: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    MAX_EXAMPLES: ClassVar[int] = 5

    def count(self, key: str, ok: bool) -> None:
        """Record one read; only the first few bad keys are kept, the report needs examples, not a log."""
        self.seen += 1
        if not ok:
            self.skipped_corrupt += 1
            if len(self.skipped_examples) < self.MAX_EXAMPLES:
                self.skipped_examples.append(key)

    def count_batch(self, batch: dict[str, Any]) -> None:
        """Count a `collate_skip_none` batch: the only way to see skips that happened in DataLoader workers,
        whose own copies of the dataset (and its stats) never come back to the main process."""
        for key in batch["key"]:
            self.count(key, ok=True)
        for key in batch["skipped"]:
            self.count(key, ok=False)

    def summary(self) -> str:
        """One line for logs and the CLI."""
        line = f"read {self.seen} images, skipped {self.skipped_corrupt} unreadable"
        if self.skipped_examples:
            line += f" (e.g. {', '.join(self.skipped_examples)})"
        return line


class CaptionedImages(ABC):
    """A source of `(key, RGB image, caption)` records; iterate it, check `.streaming` before `len()`.

    Iteration skips unreadable images and counts every record in `.stats`.
    """

    streaming: ClassVar[bool]

    def __init__(self, description: str) -> None:
        self.description = description  # where the data came from, for messages
        self.stats = DataStats()

    @abstractmethod
    def records(self) -> Iterator[RawRecord]:
        """All records in order, unreadable ones included with image None, nothing counted."""

    def __iter__(self) -> Iterator[Record]:
        for key, image, caption in self.records():
            self.stats.count(key, ok=image is not None)
            if image is not None:
                yield key, image, caption

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description!r})"


class MapImages(CaptionedImages):
    """Random-access source: its length is known and any record can be read by index."""

    streaming = False

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def read(self, index: int) -> RawRecord:
        """Record `index`, with image None if it cannot be decoded."""

    def records(self) -> Iterator[RawRecord]:
        return (self.read(index) for index in range(len(self)))


class ImageFolder(MapImages):
    """Images on disk with captions already read (from .txt files or a metadata file)."""

    def __init__(self, root: Path, entries: list[tuple[str, str]]) -> None:
        """`entries` are (path relative to root, caption); the relative path doubles as the key."""
        super().__init__(str(root))
        self.root = root
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries)

    def read(self, index: int) -> RawRecord:
        name, caption = self.entries[index]
        return name, _decode_image(self.root / name), caption


class HFImages(MapImages):
    """A Hugging Face `datasets.Dataset`; images are decoded here rather than by `datasets`, so that a
    corrupt one is skipped instead of raising from inside `dataset[i]`."""

    def __init__(
        self, dataset: datasets.Dataset, description: str, image_column: str, caption_column: str
    ) -> None:
        super().__init__(description)
        self.dataset = dataset
        self.image_column = image_column
        self.caption_column = caption_column

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, index: int) -> RawRecord:
        row = self.dataset[index]
        value = row[self.image_column]
        if isinstance(value, dict):  # Image(decode=False): embedded bytes, or a path when not embedded
            value = value["bytes"] or (value["path"] and Path(value["path"]))
        image = _decode_image(value) if value else None
        # Captions were validated at open time unless empty ones are allowed; normalize only.
        return str(index), image, _caption(row[self.caption_column], "", allow_empty=True)


class WebDatasetShards(CaptionedImages):
    """img2dataset-style .tar shards (KEY.jpg|png|webp + KEY.txt [+ KEY.json]), streamed in order.

    Shards are read one `wds.WebDataset` at a time so that a truncated or unreadable shard costs only its
    remaining samples (counted as one skipped record) instead of ending the stream.
    """

    streaming = True
    IMAGE_EXTENSIONS: ClassVar[tuple[str, ...]] = tuple(suffix[1:] for suffix in IMAGE_SUFFIXES)

    def __init__(self, shards: list[str], description: str, allow_empty_captions: bool) -> None:
        super().__init__(description)
        self.shards = shards
        self.allow_empty_captions = allow_empty_captions

    def records(self, *, split: bool = False) -> Iterator[RawRecord]:
        """Stream all shards; with `split`, only this process's and DataLoader worker's share of them.

        An empty result is an error only when unsplit: a worker may legitimately get no shards.
        """
        import webdataset as wds

        shards: Iterable[str] = self.shards
        if split:
            shards = wds.split_by_worker(wds.split_by_node(self.shards))
        found = False
        for shard in shards:
            try:
                # A list (not a str) so shard names are not brace-expanded again; splitting is done above;
                # a fixed seed stops WebDataset from drawing one from (and so advancing) python's global RNG.
                for sample in wds.WebDataset(
                    [shard],
                    shardshuffle=False,
                    nodesplitter=None,
                    workersplitter=None,
                    empty_check=False,
                    seed=0,
                ):
                    found = True
                    yield self._record(sample, Path(shard).name)
            except (tarfile.TarError, OSError, EOFError, ValueError):
                found = True
                yield f"{Path(shard).name} (unreadable from here on)", None, ""
        if not split and not found:
            raise UserError(
                f"no samples in {self.description}: expected img2dataset shards holding KEY.jpg/.png/.webp "
                "with KEY.txt captions"
            )

    def _record(self, sample: dict[str, Any], shard_name: str) -> RawRecord:
        key = sample["__key__"]
        extension = next((ext for ext in self.IMAGE_EXTENSIONS if ext in sample), None)
        if extension is None:
            return key, None, ""
        text = sample["txt"].decode("utf-8", errors="replace") if "txt" in sample else None
        caption = _caption(text, f"{key} in {shard_name} (no {key}.txt)", self.allow_empty_captions)
        return key, _decode_image(sample[extension]), caption


def open_dataset(
    source: str,
    *,
    image_column: str = "image",
    caption_column: str = "text",
    split: str = "train",
    allow_empty_captions: bool = False,
) -> CaptionedImages:
    """Open `source` as captioned images, detecting its layout (see `LAYOUTS`).

    Local paths win over hub names; the hub is asked only when nothing local matches, so a typo in a
    local path is not reported as a network problem unless it also looks like a hub name.
    """
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".tar":
            return WebDatasetShards([str(path)], source, allow_empty_captions)
        raise UserError(f"{source} is a file but not a .tar shard; expected {LAYOUTS}")
    if path.is_dir():
        return _open_folder(path, image_column, caption_column, split, allow_empty_captions)
    if "{" in source and source.endswith(".tar"):
        return WebDatasetShards(_expand_shards(source), source, allow_empty_captions)
    if _HUB_ID.fullmatch(source) and not source.endswith(".tar"):
        return _open_hub(source, image_column, caption_column, split, allow_empty_captions)
    raise UserError(f"{source} does not exist; expected {LAYOUTS}")


def _open_folder(
    root: Path, image_column: str, caption_column: str, split: str, allow_empty: bool
) -> CaptionedImages:
    """Pick the folder layout; checked in order of specificity so e.g. a save_to_disk folder full of
    .arrow files is not mistaken for a generic data folder."""
    if (root / "state.json").is_file() or (root / "dataset_dict.json").is_file():  # save_to_disk output
        import datasets

        loaded = datasets.load_from_disk(str(root))
        return _hf_images(loaded, str(root), image_column, caption_column, split, allow_empty)
    files = _list_files(root)
    metadata = next((name for name in METADATA_FILES if name in files), None)
    if metadata:
        return ImageFolder(root, _read_metadata(root, metadata, files, caption_column, allow_empty))
    shards = [name for name in files if "/" not in name and name.endswith(".tar")]
    if shards:
        return WebDatasetShards([str(root / name) for name in shards], str(root), allow_empty)
    images = [name for name in files if name.lower().endswith(IMAGE_SUFFIXES)]
    if images:
        return ImageFolder(root, _read_caption_files(root, images, set(files), allow_empty))
    if any(name.lower().endswith(HF_DATA_SUFFIXES) for name in files):
        return _open_hf_folder(root, image_column, caption_column, split, allow_empty)
    raise UserError(f"no images found in {root}; expected {LAYOUTS}")


def _list_files(root: Path) -> list[str]:
    """Relative posix paths of all files under `root`, sorted so record order is reproducible.

    Hidden files and folders are skipped: macOS `._x.png` resource forks and `.ipynb_checkpoints` look
    like data but are not.
    """
    found = []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        relative = Path(folder).relative_to(root)
        found.extend((relative / name).as_posix() for name in names if not name.startswith("."))
    return sorted(found)


def _read_caption_files(
    root: Path, images: list[str], files: set[str], allow_empty: bool
) -> list[tuple[str, str]]:
    """Pair each image with its same-stem .txt. Captions are read now, not per step: this validates them
    all before training and keeps DataLoader workers from raising a UserError mid-run."""
    entries = []
    for name in images:
        caption_name = name[: -len(Path(name).suffix)] + ".txt"
        text = (root / caption_name).read_text("utf-8", errors="replace") if caption_name in files else None
        entries.append((name, _caption(text, f"{name} (expected {caption_name})", allow_empty)))
    return entries


def _read_metadata(
    root: Path, metadata: str, files: list[str], caption_column: str, allow_empty: bool
) -> list[tuple[str, str]]:
    """Rows of the HF imagefolder metadata file: `file_name` plus the caption column, images relative to
    `root`; images it does not list are ignored, as by HF imagefolder. A listed image that does not exist
    is a UserError (most likely paths relative to another folder), not a skip: skipping would silently
    train on nothing."""
    if metadata == "metadata.csv":
        with open(root / metadata, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    else:
        rows = []
        for number, line in enumerate((root / metadata).read_text("utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise UserError(f"{root / metadata} line {number} is not valid JSON: {error}") from None
                if not isinstance(rows[-1], dict):
                    raise UserError(f"{root / metadata} line {number} is not a JSON object")
    if not rows:
        raise UserError(f"{root / metadata} lists no images; expected rows with file_name and a caption")
    columns = {column for row in rows for column in row}
    for required in ("file_name", caption_column):
        if required not in columns:
            raise UserError(
                f"{root / metadata} has no {required!r} column; available columns: {', '.join(sorted(columns))}"
            )
    available = set(files)
    entries = []
    for row in rows:
        name = row.get("file_name")
        if not name or (name := Path(name).as_posix()) not in available:
            raise UserError(f"{root / metadata} lists file_name {name!r}, which is not a file under {root}")
        entries.append((name, _caption(row.get(caption_column), f"{name} in {metadata}", allow_empty)))
    return entries


def _expand_shards(pattern: str) -> list[str]:
    """Brace-expand `shards/{00000..00009}.tar` (webdataset's own syntax) and insist every shard exists,
    so a wrong range fails now rather than partway through an epoch."""
    import webdataset as wds

    shards = list(wds.shardlists.expand_urls(pattern))
    missing = [shard for shard in shards if not Path(shard).is_file()]
    if missing:
        raise UserError(
            f"{len(missing)} of {len(shards)} shards in {pattern} do not exist, e.g. {missing[0]}"
        )
    return shards


def _open_hf_folder(
    root: Path, image_column: str, caption_column: str, split: str, allow_empty: bool
) -> CaptionedImages:
    import datasets

    try:
        loaded = datasets.load_dataset(str(root), split=split)
    except Exception as error:  # noqa: BLE001 - datasets raises many types for folders it cannot read
        raise UserError(
            f"no images found in {root} and datasets.load_dataset could not read it either "
            f"({_first_line(error)}); expected {LAYOUTS}"
        ) from None
    return _hf_images(loaded, str(root), image_column, caption_column, split, allow_empty)


def _open_hub(
    source: str, image_column: str, caption_column: str, split: str, allow_empty: bool
) -> CaptionedImages:
    import datasets

    try:
        loaded = datasets.load_dataset(source, split=split)
    except Exception as error:  # noqa: BLE001 - offline, unknown repo, gated, bad split: all "unusable"
        raise UserError(
            f"dataset {source!r} could not be found locally (no such path) or on the Hugging Face Hub "
            f"({_first_line(error)}); check the name or path, your network and HF_TOKEN"
        ) from None
    return _hf_images(loaded, source, image_column, caption_column, split, allow_empty)


def _hf_images(
    loaded: datasets.Dataset | datasets.DatasetDict,
    description: str,
    image_column: str,
    caption_column: str,
    split: str,
    allow_empty: bool,
) -> HFImages:
    """Validate columns and captions, and switch off `datasets`' own image decoding (see `HFImages`)."""
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserError(f"{description} has no split {split!r}; available splits: {', '.join(loaded)}")
        loaded = loaded[split]
    if len(loaded) == 0:
        raise UserError(f"{description} (split {split!r}) has no rows")
    features = loaded.features
    for role, column in (("image", image_column), ("caption", caption_column)):
        if column not in features:
            raise UserError(
                f"{description} has no {role} column {column!r}; available columns: "
                f"{', '.join(features)}. Set the {role} column option to one of them"
            )
    image_feature, caption_feature = features[image_column], features[caption_column]
    if isinstance(image_feature, datasets.Image):
        loaded = loaded.cast_column(image_column, datasets.Image(decode=False))
    elif getattr(image_feature, "dtype", None) not in ("binary", "large_binary"):
        raise UserError(f"column {image_column!r} of {description} holds {image_feature}, not images")
    if getattr(caption_feature, "dtype", None) not in ("string", "large_string"):
        raise UserError(f"column {caption_column!r} of {description} holds {caption_feature}, not text")
    loaded = loaded.select_columns([image_column, caption_column])
    if not allow_empty:
        batches = loaded.select_columns([caption_column]).iter(batch_size=10_000)  # no image bytes read
        for index, text in enumerate(chain.from_iterable(batch[caption_column] for batch in batches)):
            _caption(text, f"row {index} of {description} (column {caption_column!r})", allow_empty=False)
    return HFImages(loaded, description, image_column, caption_column)


def _first_line(error: Exception) -> str:
    """The gist of a library error, short enough for a one-line UserError."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _caption(text: str | None, where: str, allow_empty: bool) -> str:
    """Normalize a caption. A missing one is an error unless allowed, because silently training on ""
    teaches the student unconditional generation for that image."""
    text = (text or "").strip()
    if not text and not allow_empty:
        raise UserError(
            f"missing caption for {where}; add one, or pass --allow-empty-captions to train on it uncaptioned"
        )
    return text


def _decode_image(source: bytes | Path) -> Image.Image | None:
    """Fully decode to RGB, or None if `source` is not a readable image.

    `load()` forces the whole decode, so truncated files fail here rather than later in the transform.
    Any exception means "corrupt": PIL's format plugins raise a zoo of types on bad input (OSError,
    SyntaxError, ValueError, struct.error, DecompressionBombError...).
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
    except Exception:  # noqa: BLE001 - see docstring
        return None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Flatten transparency onto white: a bare convert("RGB") shows whatever colour transparent pixels
    happen to store, usually black, which the model would learn as background."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB")
    return image.convert("RGB")


def image_transform(
    resolution: int, center_crop: bool = False, random_flip: bool = False
) -> Callable[[Image.Image], torch.Tensor]:
    """The training image pipeline: shorter side to `resolution` (bilinear), square crop (centre or
    random), optional horizontal flip, then a CxHxW float tensor in [-1, 1] (the VAE's input range).

    Randomness comes from torch's global RNG, which the training seed and DataLoader worker seeding
    control, so seeded runs reproduce their crops and flips. A `partial` of a module-level function, not
    a closure, so it pickles into DataLoader workers started with spawn/forkserver (macOS, Python 3.14).
    """
    return partial(_transform, resolution=resolution, center_crop=center_crop, random_flip=random_flip)


def _transform(image: Image.Image, *, resolution: int, center_crop: bool, random_flip: bool) -> torch.Tensor:
    width, height = image.size
    scale = resolution / min(width, height)
    # Truncation, like torchvision's Resize, so sizes match the usual diffusers training scripts.
    size = (max(resolution, int(width * scale)), max(resolution, int(height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    if center_crop:
        left, top = round((size[0] - resolution) / 2), round((size[1] - resolution) / 2)
    else:
        left = int(torch.randint(size[0] - resolution + 1, ()))
        top = int(torch.randint(size[1] - resolution + 1, ()))
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and torch.rand(()) < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32))
    return (pixels.permute(2, 0, 1) / 127.5 - 1.0).contiguous()


def TrainingExamples(
    captioned: CaptionedImages, transform: Callable[[Image.Image], torch.Tensor], caption: str | None = None
) -> MapTrainingExamples | StreamingTrainingExamples:
    """DataLoader adapter yielding `{"key", "pixel_values", "caption"}` dicts: map-style for a map-style
    source, an IterableDataset for a streaming one. `caption`: every example's caption instead of its own
    (DreamBooth's instance prompt, such as "a photo of sks dog").

    A factory rather than one class because the two DataLoader protocols need different base classes.
    An unreadable image gives `pixel_values` None rather than an exception; use
    `collate_fn=collate_skip_none` to drop those and report them.
    """
    if captioned.streaming:
        return StreamingTrainingExamples(captioned, transform, caption)
    return MapTrainingExamples(captioned, transform, caption)


class _Examples:
    """What both adapters share: a source, a transform, and the record -> example conversion."""

    def __init__(self, captioned: CaptionedImages, transform: Callable[[Image.Image], torch.Tensor],
                 caption: str | None = None) -> None:
        self.captioned = captioned
        self.transform = transform
        self.caption = caption

    def example(self, key: str, image: Image.Image | None, caption: str) -> dict[str, Any]:
        pixel_values = None if image is None else self.transform(image)
        return {"key": key, "pixel_values": pixel_values, "caption": caption if self.caption is None else self.caption}


class MapTrainingExamples(_Examples, Dataset):
    """Index-addressable examples: the DataLoader's sampler (or accelerate's) shuffles and shards them."""

    captioned: MapImages

    def __len__(self) -> int:
        return len(self.captioned)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.example(*self.captioned.read(index))


class StreamingTrainingExamples(_Examples, IterableDataset):
    """Streams webdataset shards, split across processes (`split_by_node`) and DataLoader workers
    (`split_by_worker`), so every example is read once per pass by exactly one of them.

    Because of the node split, do not pass its DataLoader through `accelerator.prepare`: accelerate would
    split the already-split stream again (or, dispatching from rank 0, see only rank 0's share).
    """

    captioned: WebDatasetShards

    def __init__(self, captioned: WebDatasetShards, transform: Callable[[Image.Image], torch.Tensor],
                 caption: str | None = None) -> None:
        import webdataset as wds

        super().__init__(captioned, transform, caption)
        _, world_size, _, _ = wds.utils.pytorch_worker_info()
        if world_size > len(captioned.shards):
            raise UserError(
                f"{len(captioned.shards)} webdataset shard(s) in {captioned.description} cannot be split "
                f"across {world_size} processes; write at least {world_size} shards or use fewer processes"
            )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for record in self.captioned.records(split=True):
            yield self.example(*record)


def collate_skip_none(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch examples, dropping those whose image was unreadable.

    Returns `key`, `pixel_values` (BxCxHxW), `caption` for the kept items and `skipped` (keys of the dropped
    ones) for `DataStats.count_batch`. If every item was dropped, `key` is empty and `pixel_values` is
    None: skip that step.
    """
    kept = [item for item in items if item["pixel_values"] is not None]
    return {
        "key": [item["key"] for item in kept],
        "pixel_values": torch.stack([item["pixel_values"] for item in kept]) if kept else None,
        "caption": [item["caption"] for item in kept],
        "skipped": [item["key"] for item in items if item["pixel_values"] is None],
    }
