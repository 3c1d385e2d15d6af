"""Datasets: find images and captions, check them, and turn image bytes into pixels.

Layouts (a local path or any fsspec URL):
- kohya: `name.png` + `name.txt` side by side;
- imagefolder: images plus `metadata.jsonl` lines `{"file_name": ..., "text": ...}`.
`builtin:shapes` generates the demo dataset (coloured shapes with captions) locally.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
from fsspec.core import url_to_fs
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, TypeAdapter, ValidationError

from loraflow.builtin import BUILTIN_PREFIX, build_once, cache_root
from loraflow.config import DatasetConfig, SampleConfig
from loraflow.digests import digests, stamp_of, version
from loraflow.hashing import sha256_bytes
from loraflow.listing import ls
from loraflow.progress import Progress

log = logging.getLogger("loraflow.dataset")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
# How `to_pixels` reads image bytes; part of every image's identity in keys, so raising it (whenever
# that reading changes) re-encodes every latent. 2: EXIF orientation, 16-bit greys, transparency.
PIXELS_VERSION = 2
READ_CHUNK = 256  # images read (concurrently, on an object store) and checked at a time


class DatasetError(ValueError):
    pass


class ImageItem(BaseModel):
    name: str  # file name, for messages and reports
    url: str  # where the bytes are read from
    sha256: str  # of the bytes: the image's identity in every key
    caption: str
    height: int  # upright, as a viewer shows it (what aspect-ratio buckets go by)
    width: int

    def cache_token(self) -> str:
        return f"{self.sha256}:pixels-v{PIXELS_VERSION}"


@dataclass
class Images:
    """A dataset's images as columns, in name order: 100,000 images are a few lists of strings and
    numbers, not a model per image. Indexing or iterating gives `ImageItem`s, made when asked for."""

    base: str  # the folder: image i is at `{base}/{names[i]}`
    names: list[str]
    sha256: str  # each image's sha256, packed: 64 hex characters an image, one string (`sha(i)`)
    captions: list[str]  # the distinct captions, sorted
    caption: list[int]  # each image's index in `captions`
    heights: list[int]  # upright, as a viewer shows it
    widths: list[int]

    @classmethod
    def of(cls, base: str, rows: list[tuple[str, str, str, int, int]]) -> Images:
        """From (name, sha256, caption, height, width) rows."""
        rows = sorted(rows)
        captions = sorted({row[2] for row in rows})
        index = {caption: i for i, caption in enumerate(captions)}
        return cls(base=base, names=[row[0] for row in rows], sha256="".join(row[1] for row in rows), captions=captions,
                   caption=[index[row[2]] for row in rows], heights=[row[3] for row in rows],
                   widths=[row[4] for row in rows])

    def __len__(self) -> int:
        return len(self.names)

    def sha(self, i: int) -> str:
        """Image `i`'s sha256."""
        i = range(len(self))[i]  # from the end when negative; IndexError past it
        return self.sha256[64 * i : 64 * (i + 1)]

    def __getitem__(self, i: int) -> ImageItem:
        return ImageItem(name=self.names[i], url=f"{self.base}/{self.names[i]}", sha256=self.sha(i),
                         caption=self.captions[self.caption[i]], height=self.heights[i], width=self.widths[i])

    def __iter__(self) -> Iterator[ImageItem]:
        return (self[i] for i in range(len(self)))

    def items(self, indices: Iterable[int]) -> list[ImageItem]:
        return [self[i] for i in indices]


_IMAGES = TypeAdapter(Images)


def load_dataset(cfg: DatasetConfig, storage_options: dict[str, Any] | None = None) -> Images:
    """Every image with its caption and sha256, checked before any task runs.

    An image or caption file whose listing stamp (size + ETag or mtime) was read and checked before
    is not read again, and a folder listed exactly as at its last scan (every name and version)
    gives that scan's images, so re-scanning an unchanged dataset costs one listing.
    """
    source = cfg.source
    if source.startswith(BUILTIN_PREFIX):
        source = builtin_dataset(source[len(BUILTIN_PREFIX):])
    base = source.rstrip("/")
    try:
        fs, root = url_to_fs(source, **(storage_options or {}))
        fs.invalidate_cache(root)  # a long-lived process must see images added since its last listing
        # {name: (kind, version)}: kept small, 100,000 images' listing is held while they are checked
        listing = {info["name"].rstrip("/").rsplit("/", 1)[-1]: (info.get("type"), version(info))
                   for info in ls(fs, root)}
    except FileNotFoundError as exc:
        raise DatasetError(f"dataset.source: {source!r} does not exist") from exc
    except Exception as exc:
        raise DatasetError(f"dataset.source: cannot list {source!r}: {type(exc).__name__}: {exc}") from exc
    root = root.rstrip("/")
    fingerprint = listing_fingerprint(listing)
    if fingerprint is None:  # some file without a version: nothing to compare a last scan with
        return _scan(fs, root, source, listing)
    last_scan = cache_root() / "scans" / f"{sha256_bytes(base.encode())[:32]}-{fingerprint}.json"
    if last_scan.exists():
        del listing  # the last scan's images take its place in memory, not a place beside it
        try:
            return _IMAGES.validate_json(last_scan.read_bytes())  # listed exactly as at the last scan: its images
        except (OSError, ValidationError):  # gone meanwhile, or kept by another loraflow version: scan again
            last_scan.unlink(missing_ok=True)
            return load_dataset(cfg, storage_options)
    images = _scan(fs, root, source, listing)
    keep_scan(last_scan, _IMAGES.dump_json(images))
    return images


def keep_scan(path: Path, images: bytes) -> None:
    """Keep this scan of a folder (written whole), in place of that folder's earlier one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for earlier in path.parent.glob(path.name.split("-")[0] + "-*"):
        earlier.unlink(missing_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    partial.write_bytes(images)
    os.replace(partial, path)


def listing_fingerprint(listing: dict[str, tuple[str | None, str | None]]) -> str | None:
    """A hash of a folder listing: every entry's name and version (size + ETag or mtime); None if
    the filesystem gives some entry no version. Equal fingerprints, equal scans."""
    h = hashlib.sha256(f"scan-v{PIXELS_VERSION}".encode())  # line by line, never the whole text at once
    for name in sorted(listing):
        listed = listing[name][1]
        if listed is None:
            return None
        h.update(f"\n{name}\t{listed}".encode())
    return h.hexdigest()


def _scan(fs, root: str, source: str, listing: dict[str, tuple[str | None, str | None]]) -> Images:
    """Every image of the listing with its caption, sha256 and size: files whose version was read
    before are not read again; the others are read and checked."""
    base = source.rstrip("/")
    names = sorted(n for n in listing if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise DatasetError(f"dataset.source: no images ({', '.join(IMAGE_EXTENSIONS)}) in {source!r}")
    for name in names:
        if listing[name][0] == "directory":
            raise DatasetError(f"dataset: {base}/{name} is a directory, not an image")
    if "metadata.jsonl" in listing:
        captions = _jsonl_captions(_cat(fs, root, base, ["metadata.jsonl"])["metadata.jsonl"], f"{base}/metadata.jsonl",
                                   set(names))
        for name in names:
            if name not in captions:
                raise DatasetError(f"dataset: {base}/{name} has no caption in metadata.jsonl")
    else:
        txts = {name: name.rsplit(".", 1)[0] + ".txt" for name in names}
        for name, txt in txts.items():
            if txt not in listing:
                raise DatasetError(f"dataset: {base}/{name} has no caption file {txt}")
        # A caption file read before, in this version (its stamp), is not read again.
        stamps = {txt: stamp_of(f"{base}/{txt}", listing[txt][1]) for txt in txts.values()}
        texts = digests().texts(list(stamps.values()))
        new_txts = [txt for txt in txts.values() if stamps[txt] not in texts]
        read = {txt: _text(data, f"{base}/{txt}").strip() for txt, data in _cat(fs, root, base, new_txts).items()}
        digests().put_texts([(stamps[txt], text) for txt, text in read.items()])
        captions = {name: read[txt] if txt in read else texts[stamps[txt]] for name, txt in txts.items()}

    stamps = {name: _checked(stamp_of(f"{base}/{name}", listing[name][1])) for name in names}
    known = digests().get_many(list(stamps.values()))
    shas = {name: known.get(stamps[name]) for name in names}
    unread = [name for name in names if shas[name] is None]
    sizes: dict[str, tuple[int, int]] = {}
    if unread:
        progress = Progress(log, f"dataset {base}", len(unread), " images checked")
        for chunk, data in _cat_chunks(fs, root, base, unread):
            for name in chunk:
                progress.advance()
                check_image(data[name], f"{base}/{name}")
                shas[name] = sha256_bytes(data[name])
                sizes[shas[name]] = upright_size(data[name])
            # Kept chunk by chunk: a scan stopped by a bad image further on does not check these again.
            digests().put_many([(stamps[name], shas[name]) for name in chunk])
            digests().put_image_sizes({shas[name]: sizes[shas[name]] for name in chunk})
        log.info("dataset %s: %d new images checked, %d known", base, len(unread), len(names) - len(unread))
    known_sizes = digests().image_sizes(sorted({shas[n] for n in names} - set(sizes)))
    unsized = [n for n in names if shas[n] not in sizes and shas[n] not in known_sizes]
    for chunk, data in _cat_chunks(fs, root, base, unsized):  # hashed by a version before sizes were kept
        found = {shas[name]: upright_size(data[name]) for name in chunk}
        digests().put_image_sizes(found)
        sizes |= found
    sizes |= known_sizes
    return Images.of(base, [(n, shas[n], captions[n], *sizes[shas[n]]) for n in names])


def _cat_chunks(fs, root: str, base: str, names: list[str]) -> Iterator[tuple[list[str], dict[str, bytes]]]:
    """`_cat` of `names` READ_CHUNK at a time: 100,000 new images are never in memory at once."""
    for start in range(0, len(names), READ_CHUNK):
        chunk = names[start : start + READ_CHUNK]
        yield chunk, _cat(fs, root, base, chunk)


def _cat(fs, root: str, base: str, names: list[str]) -> dict[str, bytes]:
    """The bytes of many files in the dataset folder, fetched concurrently where the filesystem
    can, keyed by name; one that cannot be read (dangling or looping symlink, ...) is named."""
    if not names:
        return {}
    paths = [f"{root}/{name}" for name in names]
    fetched = fs.cat(paths, on_error="return")
    data = {name: fetched[fs._strip_protocol(path)] for name, path in zip(names, paths)}
    for name, value in data.items():
        if isinstance(value, Exception):
            reason = getattr(value, "strerror", None) or f"{type(value).__name__}: {value}"
            raise DatasetError(f"dataset: {base}/{name} cannot be read: {reason}") from value
    return data


def _checked(stamp: str | None) -> str | None:
    # Its own namespace: this digest also vouches that the bytes are a readable image.
    return f"image:{stamp}" if stamp else None


def _jsonl_captions(data: bytes, where: str, images: set[str]) -> dict[str, str]:
    captions = {}
    for n, line in enumerate(_text(data, where).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DatasetError(f"dataset: {where} line {n} is not JSON: {exc}") from exc
        caption = row.get("text", row.get("caption")) if isinstance(row, dict) else None
        if not isinstance(caption, str) or not isinstance(row.get("file_name"), str):
            raise DatasetError(f'dataset: {where} line {n} needs "file_name" and a "text" (or "caption") string')
        if row["file_name"] not in images:
            raise DatasetError(f"dataset: {where} line {n} names {row['file_name']!r}, which is not an image "
                               f"in the folder")
        captions[row["file_name"]] = caption
    return captions


def _text(data: bytes, url: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"dataset: {url} is not UTF-8 text ({exc})") from exc


def check_image(data: bytes, url: str) -> None:
    if not data:
        raise DatasetError(f"dataset: {url} is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except UnidentifiedImageError as exc:  # its message names a BytesIO, not the file
        raise DatasetError(f"dataset: {url} is not an image in any format Pillow reads") from exc
    except Exception as exc:
        raise DatasetError(f"dataset: {url} is not a readable image ({exc})") from exc


def read_image(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    if "://" not in url:  # a local path: read without fsspec's layers (a tenth of a ms an image)
        with open(url, "rb") as f:
            return f.read()
    with fsspec.open(url, "rb", **(storage_options or {})) as f:
        return f.read()


def to_pixels(data: bytes, size: int | tuple[int, int], center_crop: bool, flip: bool = False) -> tuple[torch.Tensor, dict]:
    """Image bytes -> (3, H, W) float tensor in [-1, 1] for `size` (H, W), or (R, R) for an int:
    resized to cover it, cropped to it (or stretched to it without `center_crop`), maybe mirrored.
    Also how it was cut: `original_size` (h, w) and `crop_top_left` (top, left) in resized pixels, as
    SDXL-style micro-conditioning reads them (stored with every latent)."""
    height, width = (size, size) if isinstance(size, int) else size
    img = upright_rgb(Image.open(io.BytesIO(data)))
    original_size = (img.height, img.width)
    top = left = 0
    if center_crop:
        scale = max(width / img.width, height / img.height)
        img = img.resize((max(width, round(img.width * scale)), max(height, round(img.height * scale))),
                         Image.BICUBIC)
        left, top = (img.width - width) // 2, (img.height - height) // 2
        resized_width = img.width
        img = img.crop((left, top, left + width, top + height))
        if flip:
            left = resized_width - left - width
    else:
        img = img.resize((width, height), Image.BICUBIC)
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return pixels, {"original_size": torch.tensor(original_size), "crop_top_left": torch.tensor((top, left))}


def upright_size(data: bytes) -> tuple[int, int]:
    """(height, width) of the picture as a viewer shows it (EXIF orientation applied), from its header."""
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def upright_rgb(img: Image.Image) -> Image.Image:
    """The picture as a viewer shows it, in 8-bit RGB: the first frame of an animation, turned
    upright by its EXIF orientation (phones store it sideways), 16-bit greys scaled to 8 bits
    (`convert` would clip them to white) and transparent pixels on white (not whatever colour
    they happen to hold)."""
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I"):  # I;16* and I: 16-bit values
        grey = np.asarray(img, dtype=np.float64) / 257
        img = Image.fromarray(grey.round().clip(0, 255).astype(np.uint8))
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return img.convert("RGB")


def read_sample_prompts(cfg: SampleConfig, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Sample prompts, read once: inline, or one per line from a file (blank lines and # skipped)."""
    if cfg.prompts is not None:
        prompts = cfg.prompts
    elif cfg.prompts_file:
        try:
            with fsspec.open(cfg.prompts_file, "rt", encoding="utf-8", **(storage_options or {})) as f:
                prompts = f.read().splitlines()
        except Exception as exc:
            raise DatasetError(f"sample.prompts_file: cannot read {cfg.prompts_file!r}: {exc}") from exc
    else:
        prompts = []
    return [p.strip() for p in prompts if p.strip() and not p.lstrip().startswith("#")]


# --- the generated demo dataset ------------------------------------------------------------------
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (235, 210, 20)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(colour: str, shape: str, variant: int, size: int = 64) -> Image.Image:
    img = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    margin = size // 16 + (variant % 3) * size // 32
    box = (margin, margin, size - margin, size - margin)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(size // 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return img


def generate_shapes(folder, variants: int = 2) -> None:
    """Write `{colour}_{shape}_{i}.png` + `.txt` captions into a local folder."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for colour in COLOURS:
        for shape in SHAPES:
            for i in range(variants):
                stem = f"{colour}_{shape}_{i}"
                draw_shape(colour, shape, i).save(folder / f"{stem}.png")
                (folder / f"{stem}.txt").write_text(f"a {colour} {shape}\n")


def builtin_dataset(name: str) -> str:
    if name != "shapes":
        raise DatasetError(f"dataset.source: unknown built-in dataset {name!r}; known: shapes")
    return str(build_once(cache_root() / "datasets" / "shapes-v3", generate_shapes))
