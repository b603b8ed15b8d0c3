"""Turn a GGUF file into an ordinary transformers directory (safetensors + JSON).

transformers reads GGUF directly, dequantising every tensor on load. That takes tens of seconds and
leaves the model flagged as quantized, so we convert once and cache a plain float32 directory that
loads in about a second and that every other part of tunesmith (training, PEFT, export) understands.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from tunesmith.models.cache_files import commit_directory, staging_directory

# Written into every converted directory: where the weights came from, so a cache entry explains itself.
SOURCE_RECORD_NAME = "tunesmith-source.json"


def convert_gguf(
    gguf_path: Path,
    out_dir: Path,
    source: dict[str, Any] | None = None,
    chat: tuple[str, str] | None = None,
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Convert `gguf_path` into a float32 safetensors directory at `out_dir` and return `out_dir`.

    The directory appears only when complete (built beside it, then renamed); an existing `out_dir`
    is replaced. `source` is extra provenance written into `tunesmith-source.json`. `chat` (a chat template and
    its end-of-turn token) gives a base model with none the template it is fine-tuned in; generation then stops
    at that token too. `extra_files` are copied in under their names (a license's terms).
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).resolve()
    out_dir = Path(out_dir)
    load_options = {"gguf_file": gguf_path.name, "local_files_only": True, "trust_remote_code": False}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **load_options)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **load_options)
    _mark_dequantized(model, name_or_path=str(out_dir))
    if chat is not None:
        template, end_of_turn = chat
        tokenizer.chat_template = template
        stops = [model.generation_config.eos_token_id, tokenizer.convert_tokens_to_ids(end_of_turn)]
        model.generation_config.eos_token_id = [token for token in stops if token is not None]

    record = {
        **(source or {}),
        "gguf_file_name": gguf_path.name,
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "transformers_version": transformers.__version__,
    }
    with staging_directory(out_dir) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        for name, path in (extra_files or {}).items():
            shutil.copyfile(path, staging / name)
        (staging / SOURCE_RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
        return commit_directory(staging, out_dir)


def _mark_dequantized(model: Any, name_or_path: str) -> None:
    """Drop the 'quantized' flag that GGUF loading leaves behind.

    The weights are already dequantised to float32 in memory, but while the model carries a
    quantization config and quantizer, `save_pretrained` refuses (or writes a config that later
    loads would try to re-quantise). Removing both makes it a plain model.
    """
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    # Otherwise config.json would record the temporary directory the GGUF was read from.
    model.config._name_or_path = name_or_path


def read_source_record(model_dir: Path) -> dict[str, Any] | None:
    """The provenance written by `convert_gguf`, or None for a directory tunesmith did not convert."""
    record_path = Path(model_dir) / SOURCE_RECORD_NAME
    if not record_path.is_file():
        return None
    return json.loads(record_path.read_text())
