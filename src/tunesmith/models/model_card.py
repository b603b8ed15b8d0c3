"""What makes an export portable: the base model's upstream id, the run's prompt format, and a model card.

Users of plain transformers, vLLM or llama.cpp see only the exported files, so those files must say:
- which base model they belong to, by the id the ecosystem knows it by (a Hugging Face id for a built-in
  model; never a path into the tunesmith cache): `upstream_model_id`, `name_upstream_base`;
- how to prompt the model as it was trained: the tokenizer's chat template adds the run's
  `data.system_prompt` when a conversation has none, exactly as tunesmith's ChatTokenizer did
  (`apply_system_prompt`), so `apply_chat_template` and the runtimes that read the template need no extra setup;
- what it is: README.md, a Hub model card (front matter the Hub reads, then base model, method, data hashes,
  training and eval figures with 95% intervals, the prompt format and load snippets): `write_model_card`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tunesmith.rundir import EVAL_FILE, Run, read_metrics

# A Hugging Face model id as `org/name`; a bare name (`gpt2`) is too easily a local folder's name to be read as one.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
LIBRARY_BY_FORMAT = {"peft": "peft", "merged": "transformers", "gguf": "gguf", "ollama": "gguf"}
# How the Hub relates an export to its base: an adapter over it, or its weights changed by training.
RELATION_BY_FORMAT = {"peft": "adapter", "merged": "finetune", "gguf": "finetune", "ollama": "finetune"}
EXAMPLE_MESSAGE = "Your message here"  # a placeholder: a card may be published, the training data may not


# ---- the upstream base model ------------------------------------------------------------------------------


def is_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not Path(text).exists()


def upstream_model_id(spec: str) -> str:
    """The name exports give the base model `spec` (the config's `model:` value).

    A built-in model: its Hugging Face id. A local model directory: the hub id its config.json records, or
    the provenance tunesmith wrote when it converted the directory, else the path as the user wrote it. A
    hub id or a .gguf path: as written. Never the cache directory a model was loaded from.
    """
    from tunesmith.models import catalog
    from tunesmith.models.gguf import read_source_record

    text = str(spec).strip()
    if text in catalog.CATALOG:
        return catalog.CATALOG[text].hub_id
    directory = Path(text).expanduser()
    if not (directory / "config.json").is_file():
        return text
    recorded = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    if isinstance(recorded, str) and is_hub_id(recorded):
        return recorded
    source = read_source_record(directory) or {}  # a cache entry given by path: where it came from
    if source.get("model") in catalog.CATALOG:
        return catalog.CATALOG[source["model"]].hub_id
    return str(source.get("gguf") or text)


def name_upstream_base(adapter_dir: Path, base_model: str) -> str:
    """Point a saved PEFT adapter at its upstream base instead of the directory the base was loaded from.

    PEFT records `base_model_name_or_path` from where transformers loaded the base (for a built-in model, a
    path into this machine's cache) in adapter_config.json and in the README it writes; an adapter saved
    under another name than `default` sits in a subfolder of its own. Returns the new name.
    """
    upstream = upstream_model_id(base_model)
    for config_file in [adapter_dir / "adapter_config.json", *sorted(adapter_dir.glob("*/adapter_config.json"))]:
        if config_file.is_file():
            loaded_from = rename_base(config_file, upstream)
            replace_in_readme(config_file.parent / "README.md", loaded_from, upstream)
    return upstream


def rename_base(config_file: Path, upstream: str) -> str | None:
    """Set adapter_config.json's base model to `upstream`; returns the name it had."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    loaded_from = config.get("base_model_name_or_path")
    config["base_model_name_or_path"] = upstream
    if loaded_from and config.get("tokenizer_name_or_path") == loaded_from:  # prompt tuning initialised from text
        config["tokenizer_name_or_path"] = upstream
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")  # as PEFT writes it
    return loaded_from


def replace_in_readme(readme: Path, loaded_from: str | None, upstream: str) -> None:
    """PEFT's README names the base in its front matter (`base_model:`, a `base_model:adapter:` tag)."""
    if not loaded_from or not readme.is_file():
        return
    text = readme.read_text(encoding="utf-8")
    for pattern in ("base_model: {}", "base_model:adapter:{}"):
        text = text.replace(pattern.format(loaded_from), pattern.format(upstream))
    readme.write_text(text, encoding="utf-8")


# ---- the prompt format ------------------------------------------------------------------------------------


def jinja_string(text: str) -> str:
    """`text` as a Jinja string literal. Only the characters that would end or break the literal are escaped;
    the rest stays as is, which Jinja, and the C++ template engines of llama.cpp and its kin, read back unchanged."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t") + '"'


def with_default_system_prompt(template: str, system_prompt: str) -> str:
    """The chat template that first puts `system_prompt` before a conversation that has no system turn.

    A top-level `set` rebinds `messages` for the whole template (an `if` opens no scope in Jinja; only loops,
    macros and blocks do, and the original template's loops read the rebound list). The prefix renders nothing,
    and it goes where the template's leading whitespace renders as before under the trim_blocks and
    lstrip_blocks rules that transformers and llama.cpp apply: a newline right after it would be trimmed, and
    spaces before it at the start of a line stripped.
    """
    system_turn = "{'role': 'system', 'content': " + jinja_string(system_prompt) + "}"
    prefix = (
        "{% if not messages or messages[0]['role'] != 'system' %}"
        "{% set messages = [" + system_turn + "] + messages %}{% endif %}"
    )
    rest = template.lstrip(" \t\r\n")
    leading = template[: len(template) - len(rest)]
    if rest.startswith(("{%-", "{{-", "{#-")):  # the template strips its leading whitespace itself
        return prefix + template
    if rest.startswith(("{%", "{#")) and not rest.startswith("{%+"):  # stripped before a tag at a line's start
        return leading + prefix + rest
    last_line_start = leading.rfind("\n") + 1  # text or an expression first: its indentation renders as is
    return leading[:last_line_start] + prefix + leading[last_line_start:] + rest


def apply_system_prompt(tokenizer: Any, system_prompt: str | None) -> Any:
    """`tokenizer` with chat template(s) that add `system_prompt` as training did (unchanged when it is None)."""
    template = tokenizer.chat_template
    if system_prompt is None or not template:
        return tokenizer
    named = template if isinstance(template, dict) else {None: template}
    rewritten = {name: with_default_system_prompt(text, system_prompt) for name, text in named.items()}
    for name, text in rewritten.items():
        check_same_rendering(tokenizer, named[name], text, system_prompt)
    tokenizer.chat_template = rewritten if isinstance(template, dict) else rewritten[None]
    return tokenizer


def check_same_rendering(tokenizer: Any, original: str, rewritten: str, system_prompt: str) -> None:
    """The rewritten template must render what the original renders with the system turn added (ChatTokenizer's
    rule); a template whose whitespace rules defeat the rewrite must not ship a prompt format that differs."""
    probes = [
        [{"role": "user", "content": "a"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}],
    ]
    for messages, generation_prompt in [(probe, flag) for probe in probes for flag in (True, False)]:
        expected_messages = (
            messages if messages[0]["role"] == "system" else [{"role": "system", "content": system_prompt}] + messages
        )
        expected = tokenizer.apply_chat_template(
            expected_messages, chat_template=original, tokenize=False, add_generation_prompt=generation_prompt
        )
        actual = tokenizer.apply_chat_template(
            messages, chat_template=rewritten, tokenize=False, add_generation_prompt=generation_prompt
        )
        if actual != expected:
            raise RuntimeError(
                f"the chat template rewritten to carry data.system_prompt renders {actual!r} instead "
                f"of {expected!r}; the export would prompt the model differently from training"
            )


def system_prompt_of(run: Run) -> str | None:
    return run.config.data.system_prompt


def shipped_tokenizer(run: Run) -> Any:
    """The tokenizer an export of `run` carries: the one it trained with, its template adding the system prompt."""
    from tunesmith.models import load_tokenizer

    source = str(run.model_dir) if run.model_dir is not None else run.base_model
    return apply_system_prompt(load_tokenizer(source), system_prompt_of(run))


def generation_stop_ids(model_config: Any, generation_config: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a reply: the tokenizer's end-of-turn (EOS) token and the model's configured EOS ids,
    as tunesmith's own generation stops (a chat template's end-of-turn token is often not the config's EOS)."""
    ids = {tokenizer.eos_token_id}
    for configured in (getattr(generation_config, "eos_token_id", None), getattr(model_config, "eos_token_id", None)):
        ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(index for index in ids if index is not None)


# ---- the model card ---------------------------------------------------------------------------------------


def write_model_card(run: Run, directory: Path, format: str, tokenizer: Any = None, name: str = "README.md") -> Path:
    """Write `directory`/`name`, the model card of `run` exported as `format` (peft | merged | gguf | ollama);
    it replaces the empty template PEFT writes. `tokenizer`: the one the export ships (default: `shipped_tokenizer`)."""
    from huggingface_hub import ModelCard

    tokenizer = tokenizer if tokenizer is not None else shipped_tokenizer(run)
    metadata = card_metadata(run, format).to_yaml()
    card = ModelCard(f"---\n{metadata}\n---\n\n{card_body(run, format, tokenizer)}")
    path = Path(directory) / name
    card.save(path)
    return path


def card_metadata(run: Run, format: str) -> Any:
    """The front matter the Hub reads: base model (only a hub id: the Hub links nothing else), library, tags, and
    the base model's license when the registry knows it."""
    from huggingface_hub import ModelCardData

    from tunesmith.models import catalog

    upstream = upstream_model_id(run.base_model)
    adapter_type = run.config.adapter.type
    entry = next((entry for entry in catalog.CATALOG.values() if entry.hub_id == upstream), None)
    tags = ["tunesmith", run.config.method, adapter_type]
    tags += ["gguf"] if format in ("gguf", "ollama") else []
    return ModelCardData(
        base_model=upstream if is_hub_id(upstream) else None,
        base_model_relation=RELATION_BY_FORMAT.get(format) if is_hub_id(upstream) else None,
        library_name=LIBRARY_BY_FORMAT.get(format),
        pipeline_tag="text-classification" if run.config.method == "reward" else "text-generation",
        license=entry.license.lower() if entry is not None else None,
        tags=list(dict.fromkeys(tags)),
    )


def card_body(run: Run, format: str, tokenizer: Any) -> str:
    upstream = upstream_model_id(run.base_model)
    sections = [
        [
            f"# {run.directory.name}",
            "",
            f"`{upstream}` fine-tuned with tunesmith (method `{run.config.method}`), exported as {format}.",
        ],
        method_lines(run, upstream),
        data_lines(run),
        training_lines(run),
        evaluation_lines(run),
        prompt_lines(run, tokenizer),
        usage_lines(run, format, upstream),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections if lines) + "\n"


def method_lines(run: Run, upstream: str) -> list[str]:
    adapter = run.config.adapter
    kind = adapter.type
    lines = ["## Method", "", f"- Base model: `{upstream}`", f"- Method: `{run.config.method}`"]
    if kind in ("lora", "qlora", "dora"):
        targets = ", ".join(adapter.target) if isinstance(adapter.target, list) else adapter.target
        scaling = "alpha / sqrt(r)" if adapter.rslora else "alpha / r"
        lines.append(
            f"- Adapter: `{kind}`, r {adapter.r}, alpha {adapter.alpha} (scaled by {scaling}), "
            f"dropout {adapter.dropout}, targets: {targets}"
        )
    elif kind in ("prompt_tuning", "prefix_tuning", "llama_adapter"):
        lines.append(f"- Adapter: `{kind}`, {adapter.num_virtual_tokens} virtual tokens")
    else:
        lines.append(f"- Adapter: `{kind}`")
    return lines


def data_lines(run: Run) -> list[str]:
    """Each data file by name, with its sha256: enough to tell which data trained the model (the example counts,
    from the run's own reading of the files, are in the training section: a line count would miscount CSV)."""
    from tunesmith.models.cache_files import sha256_of_file

    data = run.config.data
    lines = ["## Training data", "", "| split | file | sha256 |", "| --- | --- | --- |"]
    for split, path in (("train", data.train), ("validation", data.validation)):
        if path is None:
            continue
        digest = f"`{sha256_of_file(path)}`" if path.is_file() else "(file not found at export)"
        lines.append(f"| {split} | `{path.name}` | {digest} |")
    if data.val_fraction:
        lines += ["", f"Validation: {data.val_fraction:.0%} of the training file, held out."]
    lines += ["", f"Format: `{data.format}`; loss on: `{data.loss_on}` tokens; max length {data.max_length} tokens."]
    return lines


def training_lines(run: Run) -> list[str]:
    """Steps, epochs, the final training loss and the best validation loss, from metrics.jsonl."""
    records = read_metrics(run.directory)
    if not records:
        return []
    train = run.config.train
    steps = [record for record in records if "event" not in record and "loss" in record]
    data = next((record for record in records if record.get("event") == "data"), {})
    validation = [record for record in records if "val_loss" in record]
    lines = ["## Training", ""]
    if data:
        lines.append(
            f"- Examples: {data.get('train_examples')} training, {data.get('validation_examples')} validation "
            f"({data.get('train_tokens')} training tokens)"
        )
    if steps:
        last = steps[-1]
        length = f"train.max_steps {train.max_steps}" if train.max_steps else f"train.epochs {train.epochs}"
        lines.append(
            f"- Steps: {last['step']} ({length}); batch size {train.batch_size} x {train.grad_accum} "
            f"accumulation; lr {train.lr} ({train.schedule})"
        )
        lines.append(f"- Final training loss: {last['loss']:.4f}")
    if validation:
        best = min(validation, key=lambda record: record["val_loss"])
        lines.append(f"- Best validation loss: {best['val_loss']:.4f} (step {best['step']})")
    return lines


def metric_rows(system: str, metrics: dict[str, Any]) -> list[str]:
    rows = []
    for name, figure in metrics.items():
        if isinstance(figure, dict) and isinstance(figure.get("value"), (int, float)):
            low, high = figure.get("ci95") or (None, None)
            interval = f"[{low:.4g}, {high:.4g}]" if low is not None and high is not None else ""
            rows.append(f"| {system} | {name} | {figure['value']:.4g} | {interval} | {figure.get('n', '')} |")
    return rows


def evaluation_lines(run: Run) -> list[str]:
    """The run's eval.json figures: every metric of the tuned model and of each baseline, with its 95% interval."""
    path = run.directory / EVAL_FILE
    if not path.is_file():
        return [
            "## Evaluation",
            "",
            "Not evaluated before export (`tunesmith eval RUN --baseline base` adds the "
            "figures, with 95% intervals, to the next export's card).",
        ]
    report = json.loads(path.read_text(encoding="utf-8"))
    lines = [
        "## Evaluation",
        "",
        f"Task `{report.get('task')}` on `{Path(str(report.get('data', ''))).name}` ({report.get('n')} examples); "
        f"95% intervals are percentile bootstrap over examples.",
        "",
        "| system | metric | value | 95% interval | n |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += metric_rows("tuned", report.get("metrics") or {})
    for name, baseline in (report.get("baselines") or {}).items():
        lines += metric_rows(name, baseline.get("metrics") or {})
    differences = []
    for name, comparison in (report.get("comparisons") or {}).items():
        for metric, figure in comparison.items():
            if isinstance(figure, dict) and "diff" in figure and figure.get("ci95"):
                low, high = figure["ci95"]
                differences.append(f"- tuned minus {name}, {metric}: {figure['diff']:+.4g} [{low:.4g}, {high:.4g}]")
        if isinstance(comparison.get("mcnemar_p"), (int, float)):
            differences.append(
                f"- tuned vs {name}, McNemar test on the same examples: p = {comparison['mcnemar_p']:.2g}"
            )
    if differences:
        lines += ["", "Paired differences (same examples, same resamples):", "", *differences]
    return lines


def prompt_lines(run: Run, tokenizer: Any) -> list[str]:
    """The intended prompt format: the system prompt rule and one user turn rendered by the shipped template."""
    lines = ["## Prompt format", ""]
    if run.config.method == "pretrain" or run.config.data.format == "text":
        return lines + ["Trained on raw text (continued pre-training): prompt it with plain text."]
    if not tokenizer.chat_template:
        return lines + ["The tokenizer has no chat template; prompt it with plain text."]
    system_prompt = system_prompt_of(run)
    if system_prompt is None:
        lines.append(
            "Training rendered each conversation with the base model's chat template as is (no system "
            "prompt was added); the tokenizer here carries that template."
        )
    else:
        lines += [
            "Training added this system message to every conversation that had none:",
            "",
            *[f"> {line}" for line in system_prompt.splitlines() or [""]],
            "",
            "The chat template saved with this export does the same, so `apply_chat_template` (transformers, "
            "vLLM) and llama.cpp's `--jinja` chat prompt the model exactly as it was trained.",
        ]
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": EXAMPLE_MESSAGE}], tokenize=False, add_generation_prompt=True
    )
    return lines + ["", "One user turn, ready for the reply:", "", "```text", rendered.rstrip("\n"), "```"]


def usage_lines(run: Run, format: str, upstream: str) -> list[str]:
    """Load snippets for the clients of this format."""
    generate = [
        f'messages = [{{"role": "user", "content": "{EXAMPLE_MESSAGE}"}}]',
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, "
        'return_tensors="pt")',
        "output = model.generate(**inputs, max_new_tokens=64, do_sample=False)",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
    ]
    llama_cpp = ["```sh", "llama-cli -m model.gguf --jinja -cnv", "```"]
    if format == "peft":
        return [
            "## Use",
            "",
            "transformers + peft (the base model is not included):",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{upstream}")',
            'model = PeftModel.from_pretrained(base, "path/to/this/directory")',
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")',
            *generate,
            "```",
        ]
    if format == "merged":
        return [
            "## Use",
            "",
            "transformers:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")',
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")',
            *generate,
            "```",
            "",
            "llama.cpp: `tunesmith export RUN --to gguf --output model.gguf` (or llama.cpp's "
            "`convert_hf_to_gguf.py` on this directory), then:",
            "",
            *llama_cpp,
        ]
    ollama = (
        [
            "Ollama (the Modelfile holds the template, stop tokens and system prompt):",
            "",
            "```sh",
            "ollama create my-model -f Modelfile",
            "ollama run my-model",
            "```",
            "",
        ]
        if format == "ollama"
        else []
    )
    return [
        "## Use",
        "",
        *ollama,
        "llama.cpp (the chat template is in the file):",
        "",
        *llama_cpp,
        "",
        "llama-cpp-python:",
        "",
        "```python",
        "from llama_cpp import Llama",
        "",
        'model = Llama(model_path="model.gguf")',
        f'print(model.create_chat_completion(messages=[{{"role": "user", "content": "{EXAMPLE_MESSAGE}"}}], '
        f'temperature=0)["choices"][0]["message"]["content"])',
        "```",
    ]


def as_shipped(run: Run, model: Any, tokenizer: Any) -> tuple[Any, Any]:
    """`(model, tokenizer)` as an export writes them: named after the upstream base model (transformers names a
    model after the directory it was loaded from: the cache), the template adding the run's system prompt, and
    generation stopping on the same tokens as tunesmith's own generation."""
    model.config._name_or_path = upstream_model_id(run.base_model)
    if hasattr(model.config, "_model_name_or_path"):  # general.name of the GGUF a cached base was converted from
        del model.config._model_name_or_path
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        stop_ids = generation_stop_ids(model.config, generation, tokenizer)
        generation.eos_token_id = stop_ids[0] if len(stop_ids) == 1 else stop_ids
        if generation.pad_token_id is None:
            generation.pad_token_id = tokenizer.pad_token_id
    return model, apply_system_prompt(tokenizer, system_prompt_of(run))


def record_name_or_path(directory: Path, name: str) -> None:
    """Write `_name_or_path` into `directory`/config.json, which transformers 5 leaves out when it saves; tools that
    name a model after its config (llama.cpp's converter, older transformers) read it there."""
    config_file = Path(directory) / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    others = {key: value for key, value in config.items() if key != "_name_or_path"}
    config_file.write_text(json.dumps({"_name_or_path": name, **others}, indent=2) + "\n", encoding="utf-8")
