"""Model fingerprints: content, not location; and unchanged files are not re-hashed."""

from __future__ import annotations

import os
import shutil

from safetensors.torch import load_file, save_file

from loraflow import digests
from loraflow.builtin import builtin_path
from loraflow.config import ModelConfig
from loraflow.models import resolve_model


def test_fingerprints_follow_content_not_location(tmp_path):
    shutil.copytree(builtin_path("tiny-sd"), tmp_path / "copy")
    original = resolve_model(ModelConfig(source="builtin:tiny-sd"))
    copy = resolve_model(ModelConfig(source=str(tmp_path / "copy")))
    assert copy.text_encoder.fingerprint == original.text_encoder.fingerprint
    assert copy.vae.fingerprint == original.vae.fingerprint
    assert copy.denoiser.fingerprint == original.denoiser.fingerprint

    weights = tmp_path / "copy" / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] * 2
    save_file(tensors, weights)
    changed = resolve_model(ModelConfig(source=str(tmp_path / "copy")))
    assert changed.denoiser.fingerprint != original.denoiser.fingerprint
    assert changed.text_encoder.fingerprint == original.text_encoder.fingerprint
    assert changed.vae.fingerprint == original.vae.fingerprint


def test_unchanged_files_are_not_rehashed(tmp_path, monkeypatch):
    shutil.copytree(builtin_path("tiny-sd"), tmp_path / "copy")
    first = resolve_model(ModelConfig(source=str(tmp_path / "copy")))
    hashed = []
    real_hash = digests.hash_file
    monkeypatch.setattr(digests, "hash_file", lambda path: hashed.append(path.name) or real_hash(path))

    assert resolve_model(ModelConfig(source=str(tmp_path / "copy"))) == first
    assert hashed == []  # nothing re-read

    config = tmp_path / "copy" / "vae" / "config.json"
    stat = config.stat()
    original = config.read_bytes()
    config.write_bytes(original[:-1] + (b" " if original[-1:] != b" " else b"\n"))  # same size
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the old mtime, as `cp -p` would
    changed = resolve_model(ModelConfig(source=str(tmp_path / "copy")))
    assert hashed == ["config.json"]  # the ctime gave it away
    assert changed.vae.fingerprint != first.vae.fingerprint
