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
    assert again[0].caption == "a violet circle, edited" and again[1:] == first[1:]
