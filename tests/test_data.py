"""Readers for every supported layout, built as tiny datasets in tmp_path (no network)."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from distill_sd.data import (
    DataStats,
    MapTrainingExamples,
    StreamingTrainingExamples,
    TrainingExamples,
    collate_skip_none,
    image_transform,
    open_dataset,
)
from distill_sd.errors import UserError

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def png_bytes(color: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def truncated_png() -> bytes:
    noisy = Image.frombytes("RGB", (16, 16), bytes(range(256)) * 3)  # incompressible enough to cut
    buffer = io.BytesIO()
    noisy.save(buffer, "PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def records(captioned) -> list[tuple[str, tuple[int, int, int], str]]:
    """(key, colour of pixel 0,0, caption): comparable, and proves the image decoded to RGB."""
    return [(key, image.getpixel((0, 0)), caption) for key, image, caption in captioned]


def write_shard(path: Path, samples: dict[str, dict[str, bytes]]) -> Path:
    """An img2dataset-style shard: KEY.ext members, grouped by key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def shard_samples(first: int, count: int) -> dict[str, dict[str, bytes]]:
    return {
        f"{index:09d}": {"png": png_bytes(), "txt": f"caption {index}".encode(), "json": b"{}"}
        for index in range(first, first + count)
    }


# --- image folders -----------------------------------------------------------------------------------


def test_caption_files_recursive(tmp_path):
    write(tmp_path / "a.png", png_bytes(COLORS["red"]))
    write(tmp_path / "a.txt", "  a red square\n")
    write(tmp_path / "sub" / "b.JPG", png_bytes(COLORS["green"]))  # content type does not follow suffix
    write(tmp_path / "sub" / "b.txt", "green")
    write(tmp_path / "._a.png", b"macOS resource fork")  # hidden: ignored, not counted as corrupt
    captioned = open_dataset(str(tmp_path))
    assert not captioned.streaming and len(captioned) == 2
    assert records(captioned) == [
        ("a.png", COLORS["red"], "a red square"),
        ("sub/b.JPG", COLORS["green"], "green"),
    ]
    assert captioned.stats == DataStats(seen=2)


@pytest.mark.parametrize("layout", ["jsonl", "csv"])
def test_metadata_file(tmp_path, layout):
    write(tmp_path / "imgs" / "x.png", png_bytes(COLORS["blue"]))
    write(tmp_path / "y.png", png_bytes(COLORS["red"]))
    write(tmp_path / "y.txt", "ignored: metadata wins")
    rows = [
        {"file_name": "imgs/x.png", "caption": "blue", "extra": 1},
        {"file_name": "y.png", "caption": "red"},
    ]
    if layout == "jsonl":
        write(tmp_path / "metadata.jsonl", "\n".join(json.dumps(row) for row in rows) + "\n")
    else:
        write(tmp_path / "metadata.csv", "file_name,caption\nimgs/x.png,blue\ny.png,red\n")
    captioned = open_dataset(str(tmp_path), caption_column="caption")
    assert records(captioned) == [("imgs/x.png", COLORS["blue"], "blue"), ("y.png", COLORS["red"], "red")]
    with pytest.raises(UserError, match="no 'text' column; available columns: .*caption"):
        open_dataset(str(tmp_path))


def test_metadata_listing_missing_file(tmp_path):
    write(tmp_path / "metadata.jsonl", json.dumps({"file_name": "gone.png", "text": "t"}))
    with pytest.raises(UserError, match="gone.png"):
        open_dataset(str(tmp_path))


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    write(tmp_path / "good.png", png_bytes())
    write(tmp_path / "garbage.png", b"this is not an image")
    write(tmp_path / "truncated.png", truncated_png())
    for stem in ("good", "garbage", "truncated"):
        write(tmp_path / f"{stem}.txt", stem)
    captioned = open_dataset(str(tmp_path))
    assert len(captioned) == 3  # nothing decoded up front
    assert [key for key, *_ in captioned] == ["good.png"]
    assert captioned.stats == DataStats(
        seen=3, skipped_corrupt=2, skipped_examples=["garbage.png", "truncated.png"]
    )
    assert "skipped 2" in captioned.stats.summary()


def test_missing_caption(tmp_path):
    write(tmp_path / "a.png", png_bytes())
    write(tmp_path / "b.png", png_bytes())
    write(tmp_path / "b.txt", "b")
    with pytest.raises(UserError, match=r"missing caption for a\.png .*a\.txt.*--allow-empty-captions"):
        open_dataset(str(tmp_path))
    assert [caption for *_, caption in open_dataset(str(tmp_path), allow_empty_captions=True)] == ["", "b"]
    write(tmp_path / "a.txt", " \n")  # blank counts as missing
    with pytest.raises(UserError, match="a.png"):
        open_dataset(str(tmp_path))


def test_missing_caption_in_metadata(tmp_path):
    write(tmp_path / "a.png", png_bytes())
    write(tmp_path / "metadata.jsonl", json.dumps({"file_name": "a.png", "text": None}))
    with pytest.raises(UserError, match="a.png in metadata.jsonl"):
        open_dataset(str(tmp_path))
    assert records(open_dataset(str(tmp_path), allow_empty_captions=True)) == [("a.png", COLORS["red"], "")]


def test_empty_folder_and_missing_path(tmp_path):
    write(tmp_path / "notes.md", "no images here")
    with pytest.raises(UserError, match=rf"no images found in {tmp_path}; expected .*metadata.jsonl"):
        open_dataset(str(tmp_path))
    with pytest.raises(UserError, match="does not exist"):
        open_dataset(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="not a .tar shard"):
        open_dataset(str(tmp_path / "notes.md"))


# --- webdataset shards ---------------------------------------------------------------------------------


@pytest.fixture
def shards(tmp_path) -> Path:
    write_shard(tmp_path / "shards" / "00000.tar", shard_samples(0, 2))
    write_shard(tmp_path / "shards" / "00001.tar", shard_samples(2, 2))
    return tmp_path / "shards"


def test_webdataset_sources(shards):
    expected = [(f"{index:09d}", COLORS["red"], f"caption {index}") for index in range(4)]
    for source in (shards, f"{shards}/{{00000..00001}}.tar"):
        captioned = open_dataset(str(source))
        assert captioned.streaming and not hasattr(captioned, "__len__")
        assert records(captioned) == expected
        assert captioned.stats.seen == 4
    assert records(open_dataset(str(shards / "00001.tar"))) == expected[2:]
    with pytest.raises(UserError, match="1 of 3 shards .* do not exist"):
        open_dataset(f"{shards}/{{00000..00002}}.tar")


def test_webdataset_corrupt_and_truncated(tmp_path):
    samples = shard_samples(0, 3)
    samples["000000001"]["png"] = b"garbage"
    samples["000000002"] = {"txt": b"caption without image"}
    write_shard(tmp_path / "00000.tar", samples)
    cut = write_shard(tmp_path / "00001.tar", {"big": {"png": truncated_png() * 50, "txt": b"t"}})
    cut.write_bytes(cut.read_bytes()[:2048])  # shard truncated mid-member, as by a killed download
    captioned = open_dataset(str(tmp_path))
    assert [key for key, *_ in captioned] == ["000000000"]
    assert captioned.stats == DataStats(
        seen=4,
        skipped_corrupt=3,
        skipped_examples=["000000001", "000000002", "00001.tar (unreadable from here on)"],
    )


def test_webdataset_missing_caption_and_empty(tmp_path):
    write_shard(tmp_path / "a" / "00000.tar", {"k": {"png": png_bytes()}})
    with pytest.raises(UserError, match="missing caption for k in 00000.tar"):
        list(open_dataset(str(tmp_path / "a")))
    assert records(open_dataset(str(tmp_path / "a"), allow_empty_captions=True)) == [("k", COLORS["red"], "")]
    write_shard(tmp_path / "b" / "00000.tar", {})
    with pytest.raises(UserError, match="no samples"):
        list(open_dataset(str(tmp_path / "b")))


# --- Hugging Face datasets -----------------------------------------------------------------------------


def hf_dataset(captions: list[str | None]) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    images = [{"bytes": png_bytes(color), "path": None} for color in list(COLORS.values())[: len(captions)]]
    images[-1] = {"bytes": b"corrupt", "path": None}
    return datasets.Dataset.from_dict({"image": images, "caption": captions}, features=features)


def test_hf_save_to_disk(tmp_path):
    hf_dataset(["red", "green", "corrupt"]).save_to_disk(str(tmp_path / "ds"))
    captioned = open_dataset(str(tmp_path / "ds"), caption_column="caption")
    assert len(captioned) == 3
    assert records(captioned) == [("0", COLORS["red"], "red"), ("1", COLORS["green"], "green")]
    assert captioned.stats.skipped_examples == ["2"]
    with pytest.raises(UserError, match="no caption column 'text'; available columns: image, caption"):
        open_dataset(str(tmp_path / "ds"))
    with pytest.raises(UserError, match="no image column 'jpg'"):
        open_dataset(str(tmp_path / "ds"), image_column="jpg", caption_column="caption")


def test_hf_dataset_dict_split_and_captions(tmp_path):
    datasets.DatasetDict({"train": hf_dataset(["red", ""])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(UserError, match="row 1 of .*'caption'"):
        open_dataset(str(tmp_path / "dd"), caption_column="caption")
    captioned = open_dataset(str(tmp_path / "dd"), caption_column="caption", allow_empty_captions=True)
    assert len(captioned) == 2
    with pytest.raises(UserError, match="no split 'test'; available splits: train"):
        open_dataset(str(tmp_path / "dd"), caption_column="caption", split="test")


def test_hf_load_dataset_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))  # keep ~ clean
    hf_dataset(["red", "green"]).to_parquet(str(tmp_path / "pq" / "train.parquet"))
    captioned = open_dataset(str(tmp_path / "pq"), caption_column="caption")
    assert [caption for *_, caption in captioned] == ["red"]


def test_hub_failure_is_a_user_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/nothing' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match="could not be found locally .* or on the Hugging Face Hub .*Offline"):
        open_dataset("someone/nothing")


# --- transform and DataLoader adapters -------------------------------------------------------------------


def gradient(width: int, height: int) -> Image.Image:
    """Red rises left to right, green top to bottom: crops and flips show in the pixels."""
    image = Image.new("RGB", (width, height))
    image.putdata(
        [(255 * x // (width - 1), 255 * y // (height - 1), 0) for y in range(height) for x in range(width)]
    )
    return image


def test_image_transform():
    image = gradient(40, 20)
    center = image_transform(8, center_crop=True)(image)
    assert center.shape == (3, 8, 8) and center.dtype == torch.float32
    assert center.min() >= -1 and center.max() <= 1
    assert torch.allclose(center[0], center[0].flip(-1).neg(), atol=0.1)  # centred: red symmetric about 0
    assert (center[1, 1:] > center[1, :-1]).all()  # green still rises downwards

    torch.manual_seed(0)
    random = image_transform(8, random_flip=True)
    first = [random(image) for _ in range(8)]
    torch.manual_seed(0)
    assert all(torch.equal(a, random(image)) for a in first)  # reproducible under a seed
    assert len({tuple(t[0, 0].tolist()) for t in first}) > 1  # but crops/flips do vary


def test_map_training_examples(tmp_path):
    for name in ("a", "b", "c"):
        write(tmp_path / f"{name}.png", png_bytes(size=(24, 16)))
        write(tmp_path / f"{name}.txt", name)
    write(tmp_path / "b.png", b"garbage")
    examples = TrainingExamples(open_dataset(str(tmp_path)), image_transform(8, center_crop=True))
    assert isinstance(examples, MapTrainingExamples) and len(examples) == 3
    assert pickle.loads(pickle.dumps(examples))[0]["key"] == "a.png"  # spawn/forkserver workers need this
    batches = list(DataLoader(examples, batch_size=2, collate_fn=collate_skip_none))
    assert batches[0]["key"] == ["a.png"] and batches[0]["skipped"] == ["b.png"]
    assert batches[0]["pixel_values"].shape == (1, 3, 8, 8) and batches[1]["caption"] == ["c"]
    stats = DataStats()
    for batch in batches:
        stats.count_batch(batch)
    assert stats == DataStats(seen=3, skipped_corrupt=1, skipped_examples=["b.png"])
    assert collate_skip_none([examples[1]])["pixel_values"] is None


def test_streaming_training_examples_split_across_workers(shards):
    examples = TrainingExamples(open_dataset(str(shards)), image_transform(8))
    assert isinstance(examples, StreamingTrainingExamples) and isinstance(examples, IterableDataset)
    assert len(list(pickle.loads(pickle.dumps(examples)))) == 4
    loader = DataLoader(examples, batch_size=2, num_workers=2, collate_fn=collate_skip_none)
    keys = sorted(key for batch in loader for key in batch["key"])
    assert keys == [f"{index:09d}" for index in range(4)]  # each shard read by exactly one worker


def test_streaming_split_across_processes(shards, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    examples = TrainingExamples(open_dataset(str(shards)), image_transform(8))
    assert [example["key"] for example in examples] == ["000000002", "000000003"]
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(UserError, match="2 webdataset shard.* across 3 processes"):
        TrainingExamples(open_dataset(str(shards)), image_transform(8))
