"""Model fingerprints: content, not location; and unchanged files are not re-hashed."""

from __future__ import annotations

import os
import shutil

from safetensors.torch import load_file, save_file

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


def test_unchanged_files_are_not_rehashed(tmp_path):
    """The fast path trusts (path, size, mtime): a same-size rewrite with the old mtime goes unseen."""
    shutil.copytree(builtin_path("tiny-sd"), tmp_path / "copy")
    first = resolve_model(ModelConfig(source=str(tmp_path / "copy")))
    config = tmp_path / "copy" / "vae" / "config.json"
    stat = config.stat()
    original = config.read_bytes()
    config.write_bytes(original[:-1] + (b" " if original[-1:] != b" " else b"\n"))  # same size
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert resolve_model(ModelConfig(source=str(tmp_path / "copy"))).vae.fingerprint == first.vae.fingerprint
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # touched: hashed again
    assert resolve_model(ModelConfig(source=str(tmp_path / "copy"))).vae.fingerprint != first.vae.fingerprint
