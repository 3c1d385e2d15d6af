"""Datasets: both layouts, any fsspec URL, and how each image was cut."""

from __future__ import annotations

import io
import json

import fsspec
from PIL import Image

from loraflow.config import DatasetConfig
from loraflow.dataset import draw_shape, generate_shapes, load_dataset, to_pixels


def test_kohya_and_imagefolder_layouts_agree(tmp_path):
    generate_shapes(tmp_path / "kohya", variants=1)
    folder = tmp_path / "imagefolder"
    folder.mkdir()
    lines = []
    for png in sorted((tmp_path / "kohya").glob("*.png")):
        (folder / png.name).write_bytes(png.read_bytes())
        lines.append(json.dumps({"file_name": png.name, "text": png.with_suffix(".txt").read_text().strip()}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")

    kohya = load_dataset(DatasetConfig(source=str(tmp_path / "kohya")))
    imagefolder = load_dataset(DatasetConfig(source=str(folder)))
    assert len(kohya) == 12
    assert [(i.sha256, i.caption) for i in kohya] == [(i.sha256, i.caption) for i in imagefolder]


def test_dataset_on_an_fsspec_url():
    fs = fsspec.filesystem("memory")
    buffer = io.BytesIO()
    draw_shape("blue", "circle", 0).save(buffer, format="PNG")
    fs.pipe_file("/remote-data/one.png", buffer.getvalue())
    fs.pipe_file("/remote-data/one.txt", b"a blue circle\n")
    (item,) = load_dataset(DatasetConfig(source="memory://remote-data"))
    assert (item.name, item.caption, item.url) == ("one.png", "a blue circle", "memory://remote-data/one.png")


def test_crop_coordinates_are_recorded(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (100, 50), (10, 20, 30)).save(buffer, format="PNG")
    pixels, cut = to_pixels(buffer.getvalue(), 32, center_crop=True)
    assert pixels.shape == (3, 32, 32)
    assert cut["original_size"].tolist() == [50, 100]
    assert cut["crop_top_left"].tolist() == [0, 16]  # resized to 64x32, centre 32 columns
    _, stretched = to_pixels(buffer.getvalue(), 32, center_crop=False)
    assert stretched["crop_top_left"].tolist() == [0, 0]


def test_a_folder_listed_as_at_its_last_scan_is_not_scanned_again(tmp_path, monkeypatch):
    """Equal listings (every name and version), equal scans: the last scan's images come back
    without a lookup per file. Any change to the listing (a new file, a touched one) scans again,
    and a damaged record of the last scan is scanned over, never trusted."""
    import os
    import shutil

    import loraflow.dataset as dataset
    from loraflow.builtin import cache_root

    generate_shapes(tmp_path / "data", variants=1)
    cfg = DatasetConfig(source=str(tmp_path / "data"))
    first = load_dataset(cfg)
    scans: list[int] = []
    real_scan = dataset._scan
    monkeypatch.setattr(dataset, "_scan", lambda *args: scans.append(1) or real_scan(*args))

    assert load_dataset(cfg) == first and scans == []

    png = tmp_path / "data" / first[0].name
    shutil.copy(png, tmp_path / "data" / "zz-copy.png")
    (tmp_path / "data" / "zz-copy.txt").write_text("a copy\n")
    added = load_dataset(cfg)
    assert scans == [1] and list(added)[:-1] == list(first) and (added[-1].name, added[-1].sha256) == ("zz-copy.png", first[0].sha256)

    stat = png.stat()
    os.utime(png, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same bytes, another version
    assert load_dataset(cfg) == added and scans == [1, 1]

    folder = dataset.sha256_bytes(str(tmp_path / "data").encode())[:32]
    (kept,) = (cache_root() / "scans").glob(f"{folder}-*.json")  # one per folder: the latest
    kept.write_bytes(b"[{not json")
    assert load_dataset(cfg) == added and scans == [1, 1, 1]


def test_an_unchanged_dataset_is_scanned_without_reading_a_file(tmp_path, monkeypatch):
    """A second scan reads no image and no caption file it read before; an edited caption is read again."""
    import loraflow.dataset as dataset

    generate_shapes(tmp_path / "data", variants=1)
    first = load_dataset(DatasetConfig(source=str(tmp_path / "data")))
    read: list[str] = []
    real_cat = dataset._cat
    monkeypatch.setattr(dataset, "_cat", lambda fs, root, base, names: read.extend(names) or real_cat(fs, root, base, names))

    assert load_dataset(DatasetConfig(source=str(tmp_path / "data"))) == first
    assert read == []

    edited = tmp_path / "data" / first[0].name.replace(".png", ".txt")
    edited.write_text("a violet circle, edited\n")
    again = load_dataset(DatasetConfig(source=str(tmp_path / "data")))
    assert read == [edited.name]
    assert again[0].caption == "a violet circle, edited" and list(again)[1:] == list(first)[1:]


def test_a_scan_stopped_by_a_bad_image_keeps_what_it_checked(tmp_path, monkeypatch):
    """New images are read and checked a chunk at a time, and each chunk's digests are kept: a bad
    image further on fails the scan naming it, and the next scan reads none of the chunks before it."""
    import pytest

    import loraflow.dataset as dataset

    monkeypatch.setattr(dataset, "READ_CHUNK", 2)
    generate_shapes(tmp_path / "data", variants=1)
    good = sorted(p.name for p in (tmp_path / "data").glob("*.png"))
    (tmp_path / "data" / "zz-bad.png").write_bytes(b"not an image")
    (tmp_path / "data" / "zz-bad.txt").write_text("broken\n")
    read: list[list[str]] = []
    real_cat = dataset._cat
    monkeypatch.setattr(dataset, "_cat", lambda fs, root, base, names: read.append(names) or real_cat(fs, root, base, names))

    with pytest.raises(dataset.DatasetError, match="zz-bad.png"):
        load_dataset(DatasetConfig(source=str(tmp_path / "data")))
    images_read = [names for names in read if names[0].endswith(".png")]
    assert max(map(len, images_read)) == 2 and sum(images_read, []) == [*good, "zz-bad.png"]

    read.clear()
    (tmp_path / "data" / "zz-bad.png").unlink()
    (tmp_path / "data" / "zz-bad.txt").unlink()
    assert [i.name for i in load_dataset(DatasetConfig(source=str(tmp_path / "data")))] == good
    assert len(sum(read, [])) <= 1  # at most the good image that shared the bad one's chunk
