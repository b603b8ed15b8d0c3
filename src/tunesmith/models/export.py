"""`tunesmith export RUN --to peft|merged|gguf --output PATH`: ship a finished run in the ecosystem's formats.

    peft    the adapter as PEFT saved it, plus the tokenizer: loads with
            `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), PATH)`
    merged  base + adapter merged into one plain transformers directory (safetensors, config, tokenizer)
    gguf    that merged model as one GGUF file for llama.cpp and its kin (models/gguf_export.py), its model
            card beside it as NAME.README.md
    ollama  a directory: that GGUF file and a Modelfile for `ollama create` (models/ollama.py)

Each format is a small registered function that writes into a staging directory beside PATH; the result
is renamed into place only when complete, so PATH never holds half an export. Every export is portable
(models/model_card.py): it names the upstream base model, its chat template adds the run's
data.system_prompt as training did, and its README.md is a Hub model card.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunesmith.errors import Problem, UserError, did_you_mean
from tunesmith.models.cache_files import commit_directory, staging_directory
from tunesmith.models.gguf_export import LLAMA_QUANTIZE_ONLY_DTYPES, gguf_dtype_problem
from tunesmith.registry import Registry
from tunesmith.rundir import ADAPTER_DIR, CONFIG_FILE, MODEL_DIR, Run, read_run_config

# The weights' dtype in a merged directory (float32 keeps the merge exact) and in a GGUF file.
MERGED_DTYPES = ("float32", "bfloat16", "float16")
GGUF_DTYPES = {"float32": "f32", "float16": "f16", "f32": "f32", "f16": "f16", "q8_0": "q8_0"}

# PEFT types that add virtual tokens or attention prompts instead of changing weights: nothing to merge.
_PROMPT_LEARNING_TYPES = {"PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT"}

exporters: Registry[Callable[..., Path]] = Registry("export format")


def export_run(
    run_dir: str | Path, to: str, output: str | Path, *, dtype: str | None = None, force: bool = False
) -> Path:
    """Export the run in `run_dir` as `to` (peft | merged | gguf | ollama) at `output`; returns `output`.

    `dtype`: merged float32 (default) | bfloat16 | float16; gguf and ollama float32 (default) | float16 | q8_0.
    An existing non-empty `output` is replaced only with `force`.
    """
    run, output = check_request(Path(run_dir), to, Path(output), dtype, force)
    with staging_directory(output) as staging:
        produced = exporters.get(to)(run, staging, dtype)
        if produced == staging:
            commit_directory(staging, output)
        else:  # a single file and its card: renamed over any old ones, atomically (same filesystem)
            os.replace(produced, output)
            os.replace(staging / "README.md", card_beside(output))
    return output


def card_beside(output_file: Path) -> Path:
    """Where a single-file export's model card goes: model.gguf -> model.README.md."""
    return output_file.with_name(f"{output_file.stem}.README.md")


def check_request(run_dir: Path, to: str, output: Path, dtype: str | None, force: bool) -> tuple[Run, Path]:
    """The run and the output path, or one UserError listing every problem with the request."""
    problems: list[Problem] = []
    if to not in exporters:
        problems.append(
            Problem(
                "--to",
                f"'{to}' is not an export format{did_you_mean(to, exporters.names())}; "
                f"fix: choose one of: {', '.join(exporters.names())}",
            )
        )
    run = read_run(run_dir, problems)
    if run is not None and run.model_dir is not None and to == "peft":
        problems.append(
            Problem(
                str(run_dir),
                "is a full fine-tuning run (it has model/, not adapter/), so there is "
                "no adapter to export; fix: use --to merged or --to gguf",
            )
        )
    if run is not None and run.config.method == "reward" and to in ("gguf", "ollama"):
        problems.append(
            Problem(
                str(run_dir),
                "is a reward model (a sequence classifier with one output), which GGUF "
                "runtimes do not load; fix: use --to merged or --to peft",
            )
        )
    if (
        run is not None
        and run.adapter_dir is not None
        and to in ("merged", "gguf", "ollama")
        and not is_mergeable(run.adapter_dir)
    ):
        problems.append(
            Problem(
                str(run.adapter_dir),
                "holds a prompt-learning adapter (virtual tokens or prompts, not "
                "weight updates), which cannot be merged into the weights; "
                "fix: use --to peft",
            )
        )
    allowed = {"peft": (), "merged": MERGED_DTYPES, "gguf": tuple(GGUF_DTYPES), "ollama": tuple(GGUF_DTYPES)}.get(to)
    if to in ("gguf", "ollama") and dtype in LLAMA_QUANTIZE_ONLY_DTYPES:  # a known type, with the way to get it
        problems.append(Problem("--dtype", gguf_dtype_problem(dtype)))
    elif dtype is not None and allowed is not None and dtype not in allowed:
        fix = f"use one of: {', '.join(allowed)}" if allowed else "leave --dtype out (the adapter is copied as trained)"
        problems.append(Problem("--dtype", f"'{dtype}' does not apply to --to {to}; fix: {fix}"))
    problems += output_problems(output, to, force)
    if run is not None and run.directory.is_relative_to(output.resolve()):
        problems.append(
            Problem(
                str(output),
                "holds the run being exported, which the export would replace; "
                "fix: choose an --output outside the run directory",
            )
        )
    if problems:
        raise UserError(f"cannot export {run_dir}:", problems)
    assert run is not None
    return run, output


def read_run(run_dir: Path, problems: list[Problem]) -> Run | None:
    where = str(run_dir)
    if not run_dir.is_dir():
        problems.append(Problem(where, "no such run directory; fix: pass the output_dir of a `tunesmith train` run"))
        return None
    config_file = run_dir / CONFIG_FILE
    if not config_file.is_file():
        problems.append(
            Problem(
                where,
                "has no config.yaml, so it is not a run directory; fix: pass the output_dir of a `tunesmith train` run",
            )
        )
        return None
    adapter_dir, model_dir = run_dir / ADAPTER_DIR, run_dir / MODEL_DIR
    if not adapter_dir.is_dir() and not model_dir.is_dir():
        problems.append(
            Problem(
                where,
                f"has no adapter/ or model/: the run has not finished; "
                f"fix: resume it with `tunesmith train {config_file}`",
            )
        )
        return None
    try:
        config = read_run_config(run_dir)
    except UserError as error:  # not YAML, or not a config this version reads
        problems.extend(
            error.problems
            or [
                Problem(str(config_file), f"{error.message}; fix: restore the config.yaml that `tunesmith train` wrote")
            ]
        )
        return None
    return Run(
        run_dir.resolve(),
        config,
        adapter_dir if adapter_dir.is_dir() else None,
        model_dir if model_dir.is_dir() else None,
    )


def is_mergeable(adapter_dir: Path) -> bool:
    """Whether the adapter changes weights (LoRA, DoRA, IA3: merge_and_unload folds it in), not adds prompts."""
    config_file = adapter_dir / "adapter_config.json"
    peft_type = json.loads(config_file.read_text()).get("peft_type") if config_file.is_file() else None
    return peft_type not in _PROMPT_LEARNING_TYPES


def output_problems(output: Path, to: str, force: bool) -> list[Problem]:
    where = str(output)
    if to == "gguf" and output.is_dir():
        return [Problem(where, "is a directory, and --to gguf writes one file; fix: --output DIR/model.gguf")]
    if to == "gguf" and output.suffix.lower() != ".gguf":
        return [
            Problem(
                where,
                "a GGUF file's name must end in .gguf (tools, tunesmith included, recognise it by "
                "that); fix: --output PATH.gguf",
            )
        ]
    occupied = output.is_file() or (output.is_dir() and any(output.iterdir()))
    if occupied and not force:
        return [
            Problem(
                where, "already exists and is not empty; fix: choose another --output, or add --force to replace it"
            )
        ]
    if to == "gguf" and card_beside(output).exists() and not force:
        return [
            Problem(
                str(card_beside(output)),
                "already exists, and the GGUF file's model card would replace it; "
                "fix: choose another --output, or add --force to replace it",
            )
        ]
    return []


@exporters.register("peft")
def export_peft(run: Run, staging: Path, dtype: str | None) -> Path:
    """The adapter's own files, copied as trained (PEFT format) but naming the upstream base model, the base
    model's tokenizer beside them (its template adding the run's system prompt) and the model card."""
    from tunesmith.models.model_card import name_upstream_base, shipped_tokenizer, write_model_card

    shutil.copytree(run.adapter_dir, staging, dirs_exist_ok=True)
    name_upstream_base(staging, run.base_model)  # a run trained before adapters named it still points at the cache
    tokenizer = shipped_tokenizer(run)
    tokenizer.save_pretrained(staging)
    write_model_card(run, staging, "peft", tokenizer)  # replaces PEFT's empty template
    return staging


@exporters.register("merged")
def export_merged(run: Run, staging: Path, dtype: str | None) -> Path:
    """One plain transformers directory: the adapter's update added into the base weights."""
    from tunesmith.models.model_card import write_model_card

    model, tokenizer = load_merged_model(run)
    save_model_directory(model, tokenizer, staging, dtype or "float32")
    write_model_card(run, staging, "merged", tokenizer)
    scale = (run.adapter_dir or run.model_dir) / "reward_scale.json"  # a reward model trained on scores: their units
    if scale.is_file():
        shutil.copy2(scale, staging / scale.name)
    return staging


@exporters.register("gguf")
def export_gguf(run: Run, staging: Path, dtype: str | None) -> Path:
    """The merged model as one GGUF file, its chat template the one the merged export ships, and its card."""
    from tunesmith.models.model_card import write_model_card

    tokenizer = write_run_gguf(run, staging / "model.gguf", dtype)
    write_model_card(run, staging, "gguf", tokenizer)
    return staging / "model.gguf"


@exporters.register("ollama")
def export_ollama(run: Run, staging: Path, dtype: str | None) -> Path:
    """An Ollama model directory: model.gguf and a Modelfile (TEMPLATE, stop tokens, SYSTEM) for `ollama create`."""
    from tunesmith.models.model_card import system_prompt_of, write_model_card
    from tunesmith.models.ollama import write_modelfile

    tokenizer = write_run_gguf(run, staging / "model.gguf", dtype)
    write_modelfile(staging, "model.gguf", tokenizer, system_prompt_of(run))
    write_model_card(run, staging, "ollama", tokenizer)
    return staging


def write_run_gguf(run: Run, gguf_file: Path, dtype: str | None) -> Any:
    """Write the run's model as `gguf_file`; returns the tokenizer written into it. A full fine-tuning run's
    model/ is read directly; an adapter run is merged in float32 and saved beside the output first, so the
    GGUF is cast (or quantized) once, from the exact merge."""
    from tunesmith.models.gguf_export import write_gguf
    from tunesmith.models.model_card import shipped_tokenizer, upstream_model_id

    options = {
        "dtype": GGUF_DTYPES[dtype or "float32"],
        "name": run.directory.name,
        "base_model": upstream_model_id(run.base_model),
    }
    if run.model_dir is not None:
        tokenizer = shipped_tokenizer(run)
        write_gguf(run.model_dir, gguf_file, tokenizer=tokenizer, **options)
        return tokenizer
    with tempfile.TemporaryDirectory(prefix=".merged-", dir=gguf_file.parent) as merged_dir:
        model, tokenizer = load_merged_model(run)
        save_model_directory(model, tokenizer, Path(merged_dir), "float32")
        del model
        write_gguf(merged_dir, gguf_file, **options)
        return tokenizer


def load_merged_model(run: Run) -> tuple[Any, Any]:
    """`(model, tokenizer)`: the run's full model, or its base with the adapter merged in, in float32, as an
    export ships them (model_card.as_shipped: named after the upstream base, the run's system prompt in the template).

    A QLoRA run (adapter.type qlora) trained over a 4-bit NF4 base: that base is loaded as it trained,
    dequantised to float32 and only then merged with the adapter, so the merged model computes what the
    trained (unmerged) one did. Merging into the 4-bit weights would round the small update away again.
    """
    from tunesmith.models import load_model
    from tunesmith.models.adapters import load_adapter, load_options
    from tunesmith.models.model_card import as_shipped

    labels = 1 if run.config.method == "reward" else None  # a reward model: a one-output sequence classifier
    if run.model_dir is not None:
        return as_shipped(run, *load_model(str(run.model_dir), dtype="float32", num_labels=labels))
    quantized = load_options(run.config.adapter.type)
    base, tokenizer = load_model(run.base_model, dtype="float32", num_labels=labels, **quantized)
    if quantized:
        base = base.dequantize()  # nn.Linear layers holding the NF4 weights' float32 values
    merged = load_adapter(base, run.adapter_dir).merge_and_unload()
    return as_shipped(run, merged, tokenizer)


def save_model_directory(model: Any, tokenizer: Any, directory: Path, dtype: str) -> None:
    import torch

    from tunesmith.models.loading import quiet_transformers
    from tunesmith.models.model_card import record_name_or_path

    model = model.to(getattr(torch, dtype))
    with quiet_transformers():
        model.save_pretrained(directory, safe_serialization=True)
    record_name_or_path(directory, model.config.name_or_path)
    tokenizer.save_pretrained(directory)
