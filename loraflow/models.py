"""Resolve a model source to a local diffusers folder and fingerprint its components.

Built-in tiny models, local folders, remote folders (any fsspec URL, mirrored locally) and hub ids
all end up as a local folder loaded with `from_pretrained`, so the tiny models exercise the same
code path as a real checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from loraflow.builtin import BUILTIN_PREFIX, builtin_path
from loraflow.config import ModelConfig
from loraflow.families import get_family
from loraflow.fingerprint import fingerprint_folders
from loraflow.remote import is_remote, mirror_folder


class Component(BaseModel):
    """One part of a model (text encoder, VAE, denoiser) as a task input."""

    path: str  # local diffusers folder it loads from
    fingerprint: str  # hash of its config and weights

    def cache_token(self) -> str:
        return self.fingerprint  # keys depend on what the weights are, not where they lie


class ModelRef(BaseModel):
    family: str
    text_encoder: Component
    vae: Component
    denoiser: Component


def local_folder(cfg: ModelConfig, storage_options: dict[str, Any] | None = None) -> Path:
    source = cfg.source
    if source.startswith(BUILTIN_PREFIX):
        return builtin_path(source[len(BUILTIN_PREFIX):])
    if is_remote(source):
        try:
            path = mirror_folder(source, storage_options or {})
        except Exception as exc:
            raise ValueError(f"model.source: cannot read {source!r}: {type(exc).__name__}: {exc}") from exc
        if not (path / "model_index.json").is_file():
            raise ValueError(f"model.source: {source!r} is not a diffusers model folder (no model_index.json)")
        return path
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"model.source: {source!r} is not a diffusers model folder (no model_index.json)")
        return path.resolve()
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ValueError(f"model.source: {source!r} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, revision=cfg.revision))
    except Exception as exc:
        raise ValueError(f"model.source: cannot get {source!r} from the hub: {exc}") from exc


def resolve_model(cfg: ModelConfig, storage_options: dict[str, Any] | None = None) -> ModelRef:
    family = get_family(cfg.family)
    root = local_folder(cfg, storage_options)
    for folder in (*family.text_folders, *family.vae_folders, *family.denoiser_folders):
        if not (root / folder).is_dir():
            raise ValueError(f"model.source: {root} has no {folder}/ folder, needed by family {family.name!r}")
    check_configs(root, (*family.text_folders, *family.vae_folders, *family.denoiser_folders))

    def component(folders: tuple[str, ...]) -> Component:
        return Component(path=str(root), fingerprint=fingerprint_folders(root, list(folders)))

    return ModelRef(
        family=family.name,
        text_encoder=component(family.text_folders),
        vae=component(family.vae_folders),
        denoiser=component(family.denoiser_folders),
    )


def check_configs(root: Path, folders: tuple[str, ...]) -> None:
    """Every config the model loads from parses, so a corrupt one fails here, named, not in a task."""
    for path in [root / "model_index.json", *(p for f in folders for p in sorted((root / f).glob("*config.json")))]:
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"model.source: {path} is not a readable JSON config ({exc})") from exc


def check_resolution(model: ModelRef, resolution: int) -> None:
    """`dataset.resolution` fits the family's pipeline, checked before any latent is made."""
    multiple = get_family(model.family).resolution_multiple(model.vae.path)
    if resolution % multiple:
        raise ValueError(f"dataset.resolution: {resolution} is not a multiple of {multiple}, "
                         f"which family {model.family!r} needs")
