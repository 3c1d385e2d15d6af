"""Bad input through the CLI: one clear line naming the file or field, no traceback, a non-zero
exit, and the store byte-identical afterwards. And images that should work do, upright."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from loraflow.builtin import builtin_path
from loraflow.cli import main
from loraflow.dataset import COLOURS, SHAPES, generate_shapes, to_pixels
from loraflow.store import PARTIAL
from tests.helpers import mounted, remount, run, small_config, snapshot, stored_latents

pytestmark = pytest.mark.fault

BAD_CONFIG, RUN_FAILED = 2, 1


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A store holding one complete run, the dataset it was made from, and a copy of the tiny model."""
    root = tmp_path_factory.mktemp("fault-inputs")
    generate_shapes(root / "data", variants=1)
    run(small_config(root / "store", root / "data"))
    shutil.copytree(builtin_path("tiny-sd"), root / "model")
    return root


@pytest.fixture
def ws(stored, tmp_path) -> Path:
    """A private copy of the stored run's dataset and store."""
    for name in ("data", "store"):
        shutil.copytree(stored / name, tmp_path / name)
    return tmp_path


def config(ws: Path, family: str = "sd", **sections) -> dict:
    """The stored run's config as YAML would give it, with `sections` merged in."""
    cfg = small_config(ws / "store", ws / "data", family).model_dump(mode="json")
    for section, values in sections.items():
        cfg[section] = {**cfg[section], **values} if isinstance(values, dict) else values
    return cfg


def clear_failure(out: str, err: str, rc: int, code: int, *names: str) -> None:
    """The CLI contract: exit `code`, exactly one `loraflow: ` line naming `names` (a failed run may
    add a `loraflow: full log: ...` line), and no traceback anywhere."""
    both = f"--- stdout\n{out}\n--- stderr\n{err}"
    assert rc == code, both
    assert "Traceback" not in out and "Traceback" not in err, both
    lines = [line for line in err.splitlines()
             if line.startswith("loraflow: ") and not line.startswith("loraflow: full log:")]
    assert len(lines) == 1, both
    for name in names:
        assert name in lines[0], both


def fails(capfd, ws: Path, cfg: dict | str | bytes, code: int, *names: str) -> None:
    """Run the CLI in-process on `cfg` (a config, or a config file's raw text); it must fail clearly
    and leave every stored file as it was."""
    path = ws / "run.yaml"
    if isinstance(cfg, dict):
        cfg = yaml.safe_dump(cfg)
    path.write_bytes(cfg.encode() if isinstance(cfg, str) else cfg)
    before = snapshot(ws / "store")
    capfd.readouterr()
    rc = main(["run", "--config", str(path)])
    out, err = capfd.readouterr()
    clear_failure(out, err, rc, code, *names)
    assert snapshot(ws / "store") == before  # nothing lost, nothing half-written, no temporary files


# --- the config file ----------------------------------------------------------------------------
CONFIG_TEXTS = {
    "yaml-syntax": "train: {steps: [unclosed\n",
    "not-a-mapping": "- model\n- dataset\n",
    "tab-indented": "train:\n\tsteps: 5\n",
}


@pytest.mark.parametrize("text", CONFIG_TEXTS.values(), ids=CONFIG_TEXTS.keys())
def test_unparsable_config_names_the_file(capfd, ws, text):
    fails(capfd, ws, text, BAD_CONFIG, str(ws / "run.yaml"))


def test_config_not_utf8(capfd, ws):
    fails(capfd, ws, b"train: {steps: 5}  # caf\xe9\n", BAD_CONFIG, str(ws / "run.yaml"))


def test_missing_config_file(capfd, ws):
    before = snapshot(ws / "store")
    rc = main(["run", "--config", str(ws / "nowhere.yaml")])
    clear_failure(*capfd.readouterr(), rc, BAD_CONFIG, str(ws / "nowhere.yaml"))
    assert snapshot(ws / "store") == before


BAD_FIELDS = {
    "unknown-field": ({"train": {"stepz": 5}}, "train.stepz"),
    "wrong-type": ({"train": {"steps": "many"}}, "train.steps"),
    "negative-steps": ({"train": {"steps": -3}}, "train.steps"),
    "unknown-family": ({"model": {"family": "sd9"}}, "model.family"),
    "not-a-checkpoint": ({"sample": {"checkpoints": [4]}}, "sample.checkpoints"),
    "resolution-too-small": ({"dataset": {"resolution": 4}}, "dataset.resolution"),
    "unknown-section": ({"trainer": {"steps": 5}}, "trainer"),
}


@pytest.mark.parametrize("change,field", BAD_FIELDS.values(), ids=BAD_FIELDS.keys())
def test_bad_field_is_named(capfd, ws, change, field):
    cfg = config(ws)
    for section, values in change.items():
        cfg.setdefault(section, {}).update(values)
    fails(capfd, ws, cfg, BAD_CONFIG, field)


@pytest.mark.parametrize("family,resolution,multiple", [("sd", 33, 8), ("sd", 36, 8), ("flux", 33, 4)])
def test_resolution_the_family_cannot_sample(capfd, ws, family, resolution, multiple):
    """Tiny models have a 2x VAE; SD's pipeline still wants multiples of 8, Flux's 2x2 latent packing 4."""
    cfg = config(ws, family=family, dataset={"resolution": resolution})
    fails(capfd, ws, cfg, RUN_FAILED, f"dataset.resolution: {resolution} is not a multiple of {multiple}", repr(family))


# The parts of real checkpoints' configs that decide the multiple (SD 1.5, SDXL, SD3, FLUX.1, Sana 1600M).
KL_VAE = {"vae": {"block_out_channels": [128, 256, 512, 512]}}
REAL_CONFIGS = {
    "sd": (KL_VAE, 8), "sdxl": (KL_VAE, 8),
    "sd3": ({**KL_VAE, "transformer": {"patch_size": 2}}, 16),
    "flux": ({**KL_VAE, "transformer": {"patch_size": 1}}, 16),
    "sana": ({"vae": {"encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024]}}, 32),
}


@pytest.mark.parametrize("family", REAL_CONFIGS)
def test_real_checkpoints_resolution_multiple(tmp_path, family):
    from loraflow.families import get_family

    configs, multiple = REAL_CONFIGS[family]
    for folder, values in configs.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_text(json.dumps(values))
    assert get_family(family).resolution_multiple(str(tmp_path)) == multiple


def test_unknown_builtins(capfd, ws):
    fails(capfd, ws, config(ws, model={"source": "builtin:tiny-nothing"}), RUN_FAILED, "model.source", "tiny-nothing")
    fails(capfd, ws, config(ws, dataset={"source": "builtin:nothing"}), RUN_FAILED, "dataset.source", "nothing")


# --- the dataset --------------------------------------------------------------------------------
def png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


DELETE, DIRECTORY = object(), object()


class Link(str):
    """A symlink to this target."""


def rows(*extra: str, skip_last: bool = False) -> str:
    """metadata.jsonl for the stored dataset (a row per image; the last one left out with `skip_last`),
    then `extra` rows."""
    good = [json.dumps({"file_name": f"{c}_{s}_0.png", "text": f"a {c} {s}"}) for c in COLOURS for s in SHAPES]
    return "\n".join([*(good[:-1] if skip_last else good), *extra]) + "\n"


# case: ({glob or file name: new content, DELETE, DIRECTORY, a Link or a function of the old bytes}, what the
# message must name)
DATASET_CASES = {
    "empty-folder": ({"*": DELETE}, "dataset.source"),
    "captions-only": ({"*.png": DELETE}, "dataset.source"),
    "image-without-caption": ({"blue_circle_0.txt": DELETE}, "blue_circle_0.png"),
    "caption-not-utf8": ({"blue_circle_0.txt": b"a blue \xff circle"}, "blue_circle_0.txt"),
    "caption-is-a-directory": ({"blue_circle_0.txt": DIRECTORY}, "blue_circle_0.txt"),
    "empty-image": ({"green_square_0.png": b""}, "green_square_0.png"),
    "corrupt-image": ({"green_square_0.png": b"\x89PNG\r\n\x1a\n not a png"}, "green_square_0.png"),
    "truncated-png": ({"red_circle_0.png": lambda old: old[: len(old) // 2]}, "red_circle_0.png"),
    "text-named-jpg": ({"notes.jpg": b"hello", "notes.txt": b"notes"}, "notes.jpg"),
    "image-is-a-directory": ({"x.png": DIRECTORY, "x.txt": b"x"}, "x.png"),
    "symlink-loop": ({"a.png": Link("b.png"), "b.png": Link("a.png"), "a.txt": b"a", "b.txt": b"b"}, "a.png"),
    "dangling-symlink": ({"gone.png": Link("nowhere.png"), "gone.txt": b"gone"}, "gone.png"),
    "metadata-bad-json": ({"metadata.jsonl": rows("{oops")}, "metadata.jsonl line 13"),
    "metadata-row-without-text": ({"metadata.jsonl": rows('{"file_name": "red_circle_0.png"}')},
                                  "metadata.jsonl line 13"),
    "metadata-row-names-missing-image": ({"metadata.jsonl": rows('{"file_name": "purple_star_0.png", "text": "a"}')},
                                         "metadata.jsonl line 13"),
    "metadata-misses-an-image": ({"metadata.jsonl": rows(skip_last=True)}, "yellow_triangle_0.png"),
    "metadata-not-utf8": ({"metadata.jsonl": b'{"file_name": "\xff"}\n'}, "metadata.jsonl"),
}


def spoil(data: Path, changes: dict) -> None:
    for pattern, new in changes.items():
        for path in sorted(data.glob(pattern)) or [data / pattern]:
            if new is DELETE or new is DIRECTORY:
                path.unlink(missing_ok=True)
            if new is DIRECTORY:
                path.mkdir()
            elif isinstance(new, Link):
                path.symlink_to(new)
            elif callable(new):
                path.write_bytes(new(path.read_bytes()))
            elif isinstance(new, (str, bytes)):
                path.write_bytes(new.encode() if isinstance(new, str) else new)


@pytest.mark.parametrize("changes,name", DATASET_CASES.values(), ids=DATASET_CASES.keys())
def test_bad_dataset_names_the_file(capfd, ws, changes, name):
    spoil(ws / "data", changes)
    fails(capfd, ws, config(ws), RUN_FAILED, "dataset", name)


def test_missing_dataset_folder(capfd, ws):
    fails(capfd, ws, config(ws, dataset={"source": str(ws / "nowhere")}), RUN_FAILED, "dataset.source",
          str(ws / "nowhere"))


def test_dataset_errors_start_with_dataset(capfd, ws):
    """Every dataset message starts `dataset`, whichever check caught it (here, a dangling symlink)."""
    (ws / "data" / "gone.png").symlink_to("nowhere.png")
    (ws / "data" / "gone.txt").write_text("x")
    fails(capfd, ws, config(ws), RUN_FAILED, f"dataset: {ws / 'data' / 'gone.png'}")


# --- sample prompt files ------------------------------------------------------------------------
def prompt_file(ws: Path, kind: str) -> Path:
    path = ws / "prompts.txt"
    if kind == "not-utf8":
        path.write_bytes(b"a red \xff circle\n")
    elif kind == "directory":
        path.mkdir()
    return path


@pytest.mark.parametrize("kind", ["missing", "not-utf8", "directory"])
def test_bad_prompt_file_is_named(capfd, ws, kind):
    path = prompt_file(ws, kind)
    fails(capfd, ws, config(ws, sample={"prompts": None, "prompts_file": str(path)}), RUN_FAILED,
          "sample.prompts_file", str(path))


# --- the store ----------------------------------------------------------------------------------
def test_store_under_a_regular_file(capfd, ws):
    (ws / "a-file").write_text("")
    fails(capfd, ws, config(ws, store=str(ws / "a-file" / "store")), RUN_FAILED, "store", str(ws / "a-file"))


def test_store_with_unknown_protocol(capfd, ws):
    fails(capfd, ws, config(ws, store="nosuchprotocol://bucket/store"), RUN_FAILED, "store",
          "nosuchprotocol://bucket/store")


def test_read_only_store(capfd, ws):
    """A store on a filesystem mounted read-only (as root, permissions alone would not stop a write)."""
    with mounted(ws / "ro", "size=16m"):
        shutil.copytree(ws / "store", ws / "ro" / "store")
        remount(ws / "ro", "ro")
        before = snapshot(ws / "ro" / "store")
        fails(capfd, ws, config(ws, store=str(ws / "ro" / "store"), train={"learning_rate": 0.5}), RUN_FAILED,
              "store", str(ws / "ro" / "store"))
        assert snapshot(ws / "ro" / "store") == before


def test_full_disk_names_the_object_and_the_next_run_reuses_what_was_stored(capfd, stored, ws):
    """A store on a disk with room for about half of a run: the run fails with one line naming the
    object it could not write and the reason, leaves no temporary file, and once there is room the
    next run reuses everything the failed one stored and ends with the same weights as a run that
    never failed."""
    room = sum(p.stat().st_size for p in (stored / "store").rglob("*") if p.is_file()) // 2
    with mounted(ws / "disk", f"size={max(room, 64 * 1024)}"):
        store = ws / "disk" / "store"
        (ws / "run.yaml").write_text(yaml.safe_dump(config(ws, store=str(store))))
        capfd.readouterr()
        rc = main(["run", "--config", str(ws / "run.yaml")])
        out, err = capfd.readouterr()
        clear_failure(out, err, rc, RUN_FAILED, "No space left on device", f"store: cannot write {store}/")
        assert not list(store.rglob(f"*{PARTIAL}*")), "temporary files left behind"
        kept = {path: digest for path, digest in snapshot(store).items() if path.startswith("objects/")}
        assert kept, "the failed run stored nothing before the disk filled"

        remount(ws / "disk", "size=64m")
        assert main(["run", "--config", str(ws / "run.yaml"), "--report", str(ws / "report.json")]) == 0
        assert {path: snapshot(store)[path] for path in kept} == kept  # reused as they were
    report = json.loads((ws / "report.json").read_text())
    assert sum(row["reused"] for row in report["tasks"]) > 0, report["tasks"]
    (first,) = (stored / "store" / "reports").glob("*.json")  # the run that made the stored store
    assert Path(report["weights"]).name == Path(json.loads(first.read_text())["weights"]).name


# --- the model ----------------------------------------------------------------------------------
def model_copy(stored: Path, ws: Path, spoil) -> str:
    """A copy of the tiny model, spoiled by `spoil(folder)`."""
    folder = ws / "model"
    shutil.copytree(stored / "model", folder)
    spoil(folder)
    return str(folder)


MODEL_CASES = {
    "missing-path": (lambda m: shutil.rmtree(m), "model.source"),
    "no-model-index": (lambda m: (m / "model_index.json").unlink(), "model_index.json"),
    "no-unet-folder": (lambda m: shutil.rmtree(m / "unet"), "unet/"),
    "corrupt-unet-config": (lambda m: (m / "unet" / "config.json").write_text("{not json"), "unet/config.json"),
    "corrupt-vae-config": (lambda m: (m / "vae" / "config.json").write_bytes(b"\x00\xff"), "vae/config.json"),
    "corrupt-model-index": (lambda m: (m / "model_index.json").write_text("[1, 2"), "model_index.json"),
}


@pytest.mark.parametrize("spoil,name", MODEL_CASES.values(), ids=MODEL_CASES.keys())
def test_bad_model_folder_is_named(capfd, stored, ws, spoil, name):
    source = model_copy(stored, ws, spoil)
    fails(capfd, ws, config(ws, model={"source": source}), RUN_FAILED, "model.source", name)


def test_hub_id_while_offline(capfd, ws):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    fails(capfd, ws, config(ws, model={"source": "someone/no-such-model"}), RUN_FAILED, "model.source",
          "someone/no-such-model")


# --- the same in a real process -----------------------------------------------------------------
def cli_process(path: Path) -> subprocess.CompletedProcess:
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    return subprocess.run([sys.executable, "-m", "loraflow.cli", "run", "--config", str(path)],
                          env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_in_a_real_process(ws):
    """A bad config file, a missing dataset, a corrupt image and an unsupported resolution."""
    before = snapshot(ws / "store")
    bad_yaml = ws / "bad.yaml"
    bad_yaml.write_text("train: {steps: [unclosed\n")
    done = cli_process(bad_yaml)
    clear_failure(done.stdout, done.stderr, done.returncode, BAD_CONFIG, str(bad_yaml))

    (ws / "data" / "green_square_0.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    cases = [(config(ws, dataset={"source": str(ws / "nowhere")}), ["dataset.source", str(ws / "nowhere")]),
             (config(ws), ["dataset", "green_square_0.png"]),
             (config(ws, dataset={"resolution": 33}), ["dataset.resolution: 33 is not a multiple of 8"])]
    for i, (cfg, names) in enumerate(cases):
        path = ws / f"case{i}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        done = cli_process(path)
        clear_failure(done.stdout, done.stderr, done.returncode, RUN_FAILED, *names)
    assert snapshot(ws / "store") == before


# --- images that should work --------------------------------------------------------------------
QUADRANTS = [(220, 30, 30), (30, 180, 40), (30, 60, 220), (235, 210, 20)]  # top-left, top-right, bottom-left, -right


def quadrants(width: int = 64, height: int = 32) -> Image.Image:
    """A wide picture with one colour per quadrant: any turn or mirror moves the colours."""
    img = Image.new("RGB", (width, height))
    for i, colour in enumerate(QUADRANTS):
        left, top = (i % 2) * width // 2, (i // 2) * height // 2
        img.paste(colour, (left, top, left + width // 2, top + height // 2))
    return img


def jpeg(img: Image.Image, orientation: int | None = None) -> bytes:
    """JPEG bytes showing `img` upright: stored turned, with the EXIF orientation that undoes it."""
    exif = Image.Exif()
    if orientation == 6:  # viewers turn it 90 degrees clockwise
        img = img.transpose(Image.Transpose.ROTATE_90)
    elif orientation == 8:  # viewers turn it 90 degrees counter-clockwise
        img = img.transpose(Image.Transpose.ROTATE_270)
    if orientation:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=95, subsampling=0, exif=exif.tobytes())
    return buffer.getvalue()


def working_images() -> dict[str, bytes]:
    """One image of every kind that should work, by file name."""
    picture = quadrants()
    grey16 = (np.asarray(picture.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    see_through = picture.convert("RGBA")
    see_through.putalpha(Image.new("L", picture.size, 128))
    palette_clear = picture.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    palette_clear.info["transparency"] = 0
    frames = [picture, picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    cmyk = io.BytesIO()
    picture.convert("CMYK").save(cmyk, format="JPEG", quality=95)
    return {
        "rgba.png": png(see_through),
        "la.png": png(see_through.convert("LA")),
        "grey.png": png(picture.convert("L")),
        "grey16.png": png(Image.fromarray(grey16)),
        "palette.png": png(picture.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)),
        "palette-transparent.png": png(palette_clear),
        "cmyk.jpg": cmyk.getvalue(),
        "upright.jpg": jpeg(picture),
        "exif6.jpg": jpeg(picture, 6),
        "exif8.jpg": jpeg(picture, 8),
        "animated.gif": gif.getvalue(),
    }


def test_working_images_train_and_sample(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name, content in working_images().items():
        (data / name).write_bytes(content)
        (data / name).with_suffix(".txt").write_text(f"a {name.split('.')[0]} picture")
    cfg = small_config(tmp_path / "store", data)
    report, states = run(cfg)
    assert set(states.values()) == {"Completed"}
    assert len(report.samples) == 2

    # Turned phone pictures are stored upright: the upright picture's size, and (JPEG aside) its latent.
    latents = dict(zip(sorted(working_images()), stored_latents(cfg)))
    upright = latents["upright.jpg"]
    assert upright["original_size"].tolist() == [32, 64]
    for name in ("exif6.jpg", "exif8.jpg"):
        assert latents[name]["original_size"].tolist() == [32, 64]
        assert torch.allclose(latents[name]["latent"], upright["latent"], atol=0.05), name


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_turned_pixels_are_upright(orientation):
    turned, _ = to_pixels(jpeg(quadrants(), orientation), 32, center_crop=True)
    upright, _ = to_pixels(jpeg(quadrants()), 32, center_crop=True)
    assert (turned - upright).abs().mean() < 0.02
    colours = ((turned[:, [8, 8, 24, 24], [8, 24, 8, 24]].T + 1) * 127.5).round()  # the four quadrants' centres
    assert torch.allclose(colours, torch.tensor(QUADRANTS, dtype=torch.float32), atol=12)


def test_pixel_modes_read_as_a_viewer_shows_them():
    images = working_images()
    pixels = {name: (to_pixels(data, 32, center_crop=False)[0] + 1) * 127.5 for name, data in images.items()}
    grey = pixels["grey.png"]
    assert (pixels["grey16.png"] - grey).abs().max() <= 1  # scaled to 8 bits, not clipped to white
    # Some Pillow versions open 16-bit greys in mode I (32-bit ints); every version opens this TIFF so.
    grey32 = io.BytesIO()
    Image.open(io.BytesIO(images["grey16.png"])).convert("I").save(grey32, format="TIFF")
    assert Image.open(grey32).mode == "I"
    assert ((to_pixels(grey32.getvalue(), 32, center_crop=False)[0] + 1) * 127.5 - grey).abs().max() <= 1
    assert (pixels["animated.gif"] - pixels["palette.png"]).abs().mean() < 8  # the first frame, not the mirrored one
    # Transparent pixels are shown on white: half-transparent red lies between red and white.
    red = pixels["rgba.png"][:, 4, 4]
    assert torch.allclose(red, torch.tensor([237.5, 142.5, 142.5]), atol=2)
    assert torch.allclose(pixels["la.png"], (grey + 255) / 2, atol=2)


def test_transparent_palette_entry_is_white():
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0] + [200, 10, 10] * 255)
    img.paste(0, (0, 0, 4, 8))
    img.info["transparency"] = 0
    pixels, _ = to_pixels(png(img), 8, center_crop=False)
    left, right = (pixels[:, :, :4] + 1) * 127.5, (pixels[:, :, 4:] + 1) * 127.5
    assert torch.allclose(left, torch.full_like(left, 255), atol=1)  # black under transparency: white shown
    assert torch.allclose(right[:, 2:6, 1:3].mean((1, 2)), torch.tensor([200.0, 10, 10]), atol=3)


