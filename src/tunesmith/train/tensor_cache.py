"""Tensors computed once and kept in the run directory (a teacher's outputs, reference log-probabilities).

A cache is a directory holding one safetensors file and manifest.json, the description of its inputs. It
is reused only when the manifest equals the one the run would write, and it is written beside its place
and swapped in, so a crash mid-write never leaves a half cache that looks whole.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

WEIGHT_SUFFIXES = {".safetensors", ".bin", ".gguf"}
TEACHER_CACHE, REFERENCE_CACHE = "teacher-cache", "reference"  # the caches' directories in a run directory
SKIPPED_PARTS = {"checkpoints", TEACHER_CACHE, REFERENCE_CACHE}  # a run directory's own caches and checkpoints


def model_identity(spec: str) -> dict[str, Any]:
    """A model's spec and, for a local path, its weight files' sizes and times: a model retrained at the same
    path (a run directory trained again) must not reuse outputs of the old one."""
    path = Path(spec).expanduser()
    if not path.exists():
        return {"spec": spec}  # a built-in name: its files are checked against a pinned hash when pulled
    files = (
        [path]
        if path.is_file()
        else sorted(
            file
            for file in path.rglob("*")
            if file.suffix in WEIGHT_SUFFIXES and not SKIPPED_PARTS & set(file.relative_to(path).parts)
        )
    )
    return {
        "spec": str(path.resolve()),
        "files": [
            [file.name if file == path else str(file.relative_to(path)), file.stat().st_size, file.stat().st_mtime_ns]
            for file in files
        ],
    }


def read_cache(directory: Path, manifest: dict[str, Any], name: str) -> dict[str, torch.Tensor] | None:
    """The cached tensors when `directory` holds a complete cache made from `manifest`'s inputs, else None."""
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file() or json.loads(manifest_path.read_text(encoding="utf-8")) != manifest:
        return None
    return load_file(directory / name)


def write_cache(directory: Path, tensors: dict[str, torch.Tensor], manifest: dict[str, Any], name: str) -> None:
    temporary = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    save_file(tensors, temporary / name)
    (temporary / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    shutil.rmtree(directory, ignore_errors=True)
    os.rename(temporary, directory)
