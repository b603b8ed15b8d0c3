"""The local adapter library: trained adapters by name under `$TUNESMITH_HOME/adapters/NAME/`.

Each entry is a copy of a run's PEFT adapter (`adapter/`) and a `card.json`: the base model, method,
adapter settings, a hash of the training data, the evaluation figures of the run (if it was evaluated)
and, for a merge, what it was merged from. Entries are what `tunesmith adapters list|show|merge|swap`,
`chat NAME` and `generate NAME` use: several can sit on one loaded base and be switched per call.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tunesmith.config.schema import DataConfig
from tunesmith.errors import UserError, did_you_mean
from tunesmith.models.cache_files import sha256_of_file
from tunesmith.paths import home
from tunesmith.rundir import ADAPTER_DIR, CONFIG_FILE, EVAL_FILE, read_run_config

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MERGEABLE = ("lora", "qlora")  # low-rank deltas that add up; DoRA's norms and soft prompts do not
COMBINATIONS = ("cat", "linear", "svd")


def library() -> Path:
    return home() / "adapters"


def names() -> list[str]:
    root = library()
    return sorted(p.name for p in root.iterdir() if (p / "card.json").is_file()) if root.is_dir() else []


def card(name: str) -> dict[str, Any]:
    path = library() / name / "card.json"
    if not path.is_file():
        raise UserError(
            f"no adapter named '{name}' in {library()}{did_you_mean(name, names())}; fix: "
            f"`tunesmith adapters list` shows what there is, `tunesmith adapters add RUN` adds a run's adapter"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def adapter_dir(name: str) -> Path:
    card(name)
    return library() / name / "adapter"


def add(run_dir: Path, name: str | None = None, force: bool = False) -> dict[str, Any]:
    """Copy a finished run's adapter into the library under `name` (default: the run directory's name)."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file() or not (run_dir / ADAPTER_DIR).is_dir():
        found = "a full model (model/), which is not an adapter" if (run_dir / "model").is_dir() else "no adapter/"
        raise UserError(
            f"{run_dir}: not a finished adapter run ({found}); fix: give the directory of a run "
            f"trained with a parameter-efficient adapter.type (lora, qlora, dora, ia3, ...)"
        )
    config = read_run_config(run_dir)
    name = name or run_dir.resolve().name
    entry = {
        "name": name,
        "base_model": config.model,
        "method": config.method,
        "adapter": config.adapter.model_dump(mode="json"),
        "data": data_fingerprint(config.data),
        "eval": eval_figures(run_dir),
        "source_run": str(run_dir.resolve()),
        "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    store(run_dir / ADAPTER_DIR, entry, force)
    return entry


def store(adapter: Path, entry: dict[str, Any], force: bool) -> None:
    """Write adapter files + card.json as library/NAME, atomically (a half-written entry never shows)."""
    name = entry["name"]
    if not NAME.match(name):
        raise UserError(
            f"adapter name '{name}' is not allowed; fix: use letters, digits, '.', '_' or '-' "
            f"(at most 64 characters, starting with a letter or digit)"
        )
    from tunesmith.models import catalog

    if name in {entry["name"] for entry in catalog.list_models()}:
        raise UserError(f"adapter name '{name}' is a built-in model's name; fix: choose another with --name")
    target = library() / name
    if target.exists() and not force:
        raise UserError(
            f"the library already has an adapter named '{name}' ({target}); fix: choose another "
            f"--name, or pass --force to replace it"
        )
    library().mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=library()))
    shutil.copytree(adapter, staging / "adapter")
    (staging / "card.json").write_text(json.dumps(entry, indent=1), encoding="utf-8")
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def data_fingerprint(data: DataConfig) -> dict[str, Any]:
    """The training (and validation) files with their sha256, so two adapters can be told apart by data."""
    found: dict[str, Any] = {}
    for key, path in (("train", data.train), ("validation", data.validation)):
        if path is not None:
            found[key] = {"path": str(path), "sha256": sha256_of_file(path) if path.is_file() else None}
    return found


def eval_figures(run_dir: Path) -> dict[str, Any]:
    """The headline metrics of the run's eval.json (value, 95% interval, n), if it has been evaluated."""
    path = run_dir / EVAL_FILE
    if not path.is_file():
        return {}
    report = json.loads(path.read_text(encoding="utf-8"))
    metrics = {
        key: value for key, value in report.get("metrics", {}).items() if isinstance(value, dict) and "value" in value
    }
    return {"task": report.get("task"), "data": report.get("data"), "metrics": metrics}


def merge(
    sources: list[str], weights: list[float], name: str, combination: str = "cat", force: bool = False
) -> dict[str, Any]:
    """One LoRA adapter whose update is sum_i weight_i * (B_i A_i), saved in the library as `name`.

    `cat` stacks the ranks, so the merged update is that sum exactly; `linear` averages A and B (same
    ranks only; approximate); `svd` truncates the exact sum back to the largest rank (approximate).
    """
    from tunesmith.models import load_model
    from tunesmith.models.adapters import load_adapter
    from tunesmith.models.model_card import name_upstream_base

    if len(sources) < 2:
        raise UserError(
            "merge needs at least two adapters; fix: tunesmith adapters merge A B --weights 0.5,0.5 --name C"
        )
    if len(weights) != len(sources):
        raise UserError(f"--weights has {len(weights)} values for {len(sources)} adapters; fix: give one weight each")
    if combination not in COMBINATIONS:
        raise UserError(
            f"--combination '{combination}' is unknown{did_you_mean(combination, list(COMBINATIONS))}; "
            f"choose one of: {', '.join(COMBINATIONS)}"
        )
    cards = [card(source) for source in sources]
    bases = {c["base_model"] for c in cards}
    if len(bases) > 1:
        raise UserError(
            f"adapters {', '.join(sources)} were trained on different bases ({', '.join(sorted(bases))}); "
            f"fix: merge only adapters of one base model"
        )
    for c in cards:
        if c["adapter"].get("type", "lora") not in MERGEABLE:
            raise UserError(
                f"adapter '{c['name']}' is {c['adapter'].get('type')}; only {', '.join(MERGEABLE)} adapters "
                f"merge (their updates add up); fix: leave it out"
            )
    base, _ = load_model(cards[0]["base_model"])
    model = load_adapter(base, adapter_dir(sources[0]), name=sources[0])
    for source in sources[1:]:
        model.load_adapter(str(adapter_dir(source)), adapter_name=source)
    model.add_weighted_adapter(adapters=sources, weights=weights, adapter_name=name, combination_type=combination)
    library().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library()) as scratch:
        model.save_pretrained(scratch, selected_adapters=[name], safe_serialization=True)
        saved = Path(scratch) / name if (Path(scratch) / name).is_dir() else Path(scratch)
        name_upstream_base(saved, cards[0]["base_model"])  # PEFT recorded the cache path the base was loaded from
        entry = {
            "name": name,
            "base_model": cards[0]["base_model"],
            "method": "merge",
            "adapter": {**cards[0]["adapter"], "r": model.peft_config[name].r},
            "merged_from": [{"name": s, "weight": w} for s, w in zip(sources, weights)],
            "combination": combination,
            "data": {},
            "eval": {},
            "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        }
        store(saved, entry, force)
    return entry
