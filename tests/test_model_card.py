"""What makes an export portable: the upstream base id, the system prompt in the chat template, the model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import CHATML, LLAMA3, build_tokenizer, write_jsonl

from tunesmith.data.tokenize import ChatTokenizer
from tunesmith.models.model_card import (
    apply_system_prompt,
    name_upstream_base,
    upstream_model_id,
    write_model_card,
)
from tunesmith.rundir import Run, read_run_config

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
CONVERSATIONS = [
    [{"role": "user", "content": "my card has not arrived"}],
    [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "card_arrival"},
        {"role": "user", "content": "and now?"},
    ],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "hello"}],
]
AWKWARD_PROMPTS = [
    "Name the intent of this banking customer's message.",
    'Say "hi" \\ then {{ stop }} %} {% endif %}\n\ttab, newline, café, 😀 and \\n literally',
]


@pytest.fixture(scope="module")
def tokenizers() -> dict:
    return {"chatml": build_tokenizer(CHATML, "<|im_end|>"), "llama3": build_tokenizer(LLAMA3, "<|eot_id|>")}


@pytest.mark.parametrize("template", ["chatml", "llama3"])
@pytest.mark.parametrize("system_prompt", AWKWARD_PROMPTS)
def test_shipped_template_renders_what_tunesmith_trained_on(tokenizers, template, system_prompt, tmp_path):
    """Saved and reloaded by plain transformers, the template adds the system prompt as ChatTokenizer did."""
    from transformers import AutoTokenizer

    original = tokenizers[template]
    trained = ChatTokenizer(original, system_prompt=system_prompt)
    apply_system_prompt(build_tokenizer(original.chat_template, original.eos_token), system_prompt).save_pretrained(
        tmp_path
    )
    shipped = AutoTokenizer.from_pretrained(tmp_path)
    for messages in CONVERSATIONS:
        for generation_prompt in (True, False):
            expected = trained.render(trained.with_system(messages), generation_prompt=generation_prompt)
            assert (
                shipped.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
                == expected
            )
        prompt = shipped.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert shipped(prompt, add_special_tokens=False)["input_ids"] == trained.prompt_ids(messages)
    assert system_prompt in shipped.apply_chat_template(CONVERSATIONS[0], tokenize=False)


def test_without_a_system_prompt_the_template_is_unchanged(tokenizers):
    tokenizer = build_tokenizer(CHATML, "<|im_end|>")
    assert apply_system_prompt(tokenizer, None).chat_template == CHATML


@pytest.mark.parametrize(
    "leading",
    [
        "\n",
        "  ",
        "\n\n  ",
        "  intro ",
        "\n  {{ 'x' }}",
        "  {%- if true %}{% endif %}",
        "\n {%+ if true %}{% endif %}",
        " \n{# note #}",
    ],
)
def test_a_templates_leading_whitespace_renders_as_before(leading):
    """trim_blocks eats a newline after the added prefix and lstrip_blocks spaces before it: placed where neither
    changes what the template's own start renders."""
    template = leading + CHATML
    trained = ChatTokenizer(build_tokenizer(template, "<|im_end|>"), system_prompt="Be brief.")
    shipped = apply_system_prompt(build_tokenizer(template, "<|im_end|>"), "Be brief.")
    for messages in CONVERSATIONS:
        assert shipped.apply_chat_template(messages, tokenize=False) == trained.render(trained.with_system(messages))


def test_a_rewrite_that_would_change_the_rendering_is_refused(monkeypatch):
    import tunesmith.models.model_card as model_card

    monkeypatch.setattr(model_card, "with_default_system_prompt", lambda template, prompt: "\n" + template)
    with pytest.raises(RuntimeError, match="prompt the model differently from training"):
        apply_system_prompt(build_tokenizer(CHATML, "<|im_end|>"), "Be brief.")


def write_model_dir(directory: Path, config: dict, source: dict | None = None) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    if source is not None:
        (directory / "tunesmith-source.json").write_text(json.dumps(source))
    return directory


def test_upstream_model_id_names_the_model_the_ecosystem_knows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert upstream_model_id("smollm2-135m-instruct") == HUB_ID  # built in: its hub id, not the cache path
    write_model_dir(tmp_path / "models" / "mine", {"_name_or_path": "acme/support-7b"})
    assert upstream_model_id("models/mine") == "acme/support-7b"  # a local copy of a hub model
    write_model_dir(tmp_path / "plain", {"model_type": "llama"})
    assert upstream_model_id("plain") == "plain"  # the path as the user wrote it, relative as given
    write_model_dir(
        tmp_path / "home" / "models" / "smollm2-135m-instruct",
        {"_name_or_path": "/root/.cache/x"},
        source={"model": "smollm2-135m-instruct"},
    )
    assert upstream_model_id(str(tmp_path / "home" / "models" / "smollm2-135m-instruct")) == HUB_ID
    write_model_dir(tmp_path / "home" / "models" / "gguf-0123", {}, source={"gguf": "/data/mine.gguf"})
    assert upstream_model_id(str(tmp_path / "home" / "models" / "gguf-0123")) == "/data/mine.gguf"
    assert upstream_model_id("weights/mine.gguf") == "weights/mine.gguf"


def test_name_upstream_base_rewrites_what_peft_recorded(tmp_path):
    cache_path = str(tmp_path / "home" / "models" / "smollm2-135m-instruct")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": cache_path, "r": 8})
    )
    (tmp_path / "adapter" / "README.md").write_text(
        f"---\nbase_model: {cache_path}\ntags:\n- base_model:adapter:{cache_path}\n---\n"
    )
    (tmp_path / "adapter" / "second").mkdir()  # an adapter saved under another name than `default`
    (tmp_path / "adapter" / "second" / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": cache_path})
    )
    assert name_upstream_base(tmp_path / "adapter", "smollm2-135m-instruct") == HUB_ID
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config == {"base_model_name_or_path": HUB_ID, "r": 8}
    assert json.loads((tmp_path / "adapter" / "second" / "adapter_config.json").read_text()) == {
        "base_model_name_or_path": HUB_ID
    }
    readme = (tmp_path / "adapter" / "README.md").read_text()
    assert cache_path not in readme and f"base_model: {HUB_ID}" in readme and f"base_model:adapter:{HUB_ID}" in readme


def evaluated_run(directory: Path, system_prompt: str | None) -> Run:
    """A run directory as train + eval leave it: config.yaml, metrics.jsonl, eval.json, its data file."""
    directory.mkdir()
    train = write_jsonl(directory / "train.jsonl", [{"text": f"row {i}", "label": "a"} for i in range(5)] + [""])
    config = {
        "model": "smollm2-135m-instruct",
        "method": "sft",
        "adapter": {"type": "lora", "r": 8, "alpha": 16.0, "dropout": 0.0, "target": ["q_proj", "v_proj"]},
        "data": {
            "train": str(train),
            "val_fraction": 0.2,
            "format": "classification",
            "max_length": 256,
            "system_prompt": system_prompt,
        },
        "train": {"epochs": 1, "max_steps": 3, "batch_size": 4, "grad_accum": 1, "lr": 1e-3, "schedule": "cosine"},
    }
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    write_jsonl(
        directory / "metrics.jsonl",
        [
            {"step": 0, "event": "data", "train_examples": 4, "validation_examples": 1, "train_tokens": 120},
            {"step": 1, "epoch": 0, "loss": 3.5},
            {"step": 2, "epoch": 0, "loss": 2.25},
            {"step": 2, "val_loss": 2.5, "best_val_loss": 2.5},
            {"step": 3, "epoch": 0, "loss": 1.875},
            '{"step": 4, "epoch": 0, "lo',
        ],
    )  # a run stopped mid-write
    metric = {"value": 0.625, "ci95": [0.5, 0.75], "n": 40}
    (directory / "eval.json").write_text(
        json.dumps(
            {
                "task": "classification",
                "data": "/somewhere/test.jsonl",
                "n": 40,
                "metrics": {"accuracy": metric},
                "baselines": {"base": {"metrics": {"accuracy": {"value": 0.125, "ci95": [0.05, 0.225], "n": 40}}}},
                "comparisons": {"base": {"accuracy": {"diff": 0.5, "ci95": [0.35, 0.65]}, "mcnemar_p": 1e-5}},
            }
        )
    )
    (directory / "adapter").mkdir()
    return Run(directory, read_run_config(directory), directory / "adapter", None)


def test_model_card_is_a_hub_card_with_the_runs_figures(tmp_path, tokenizers):
    from huggingface_hub import ModelCard

    from tunesmith.models.cache_files import sha256_of_file

    run = evaluated_run(tmp_path / "my-run", "Name the intent.")
    tokenizer = apply_system_prompt(build_tokenizer(CHATML, "<|im_end|>"), "Name the intent.")
    card = ModelCard.load(write_model_card(run, tmp_path / "my-run" / "adapter", "peft", tokenizer))
    assert card.data.to_dict() == {
        "base_model": HUB_ID,
        "base_model_relation": "adapter",
        "library_name": "peft",
        "license": "apache-2.0",
        "pipeline_tag": "text-generation",
        "tags": ["tunesmith", "sft", "lora"],
    }
    body = card.text
    assert f"| train | `train.jsonl` | `{sha256_of_file(tmp_path / 'my-run' / 'train.jsonl')}` |" in body
    assert "r 8, alpha 16.0" in body and "q_proj, v_proj" in body and "20% of the training file" in body
    assert (
        "Steps: 3 (train.max_steps 3)" in body
        and "Final training loss: 1.8750" in body
        and "Best validation loss: 2.5000 (step 2)" in body
    )
    assert "| tuned | accuracy | 0.625 | [0.5, 0.75] | 40 |" in body
    assert "| base | accuracy | 0.125 | [0.05, 0.225] | 40 |" in body
    assert "tuned minus base, accuracy: +0.5 [0.35, 0.65]" in body and "`test.jsonl` (40 examples)" in body
    assert "McNemar test on the same examples: p = 1e-05" in body
    assert "> Name the intent." in body
    assert "<|im_start|>system\nName the intent.<|im_end|>\n<|im_start|>user\nYour message here<|im_end|>\n" in body
    assert f'AutoModelForCausalLM.from_pretrained("{HUB_ID}")' in body and "PeftModel.from_pretrained" in body
    assert str(tmp_path) not in str(card)  # no local path of this machine travels in a card


def test_model_card_for_an_unevaluated_run_and_a_local_base(tmp_path, tokenizers, monkeypatch):
    from huggingface_hub import ModelCard

    monkeypatch.chdir(tmp_path)
    write_model_dir(tmp_path / "models" / "my-base", {"model_type": "llama"})  # `org/name`-shaped, but a local folder
    run = evaluated_run(tmp_path / "run", None)
    (tmp_path / "run" / "eval.json").unlink()
    local = Run(run.directory, run.config.model_copy(update={"model": "models/my-base"}), run.adapter_dir, None)
    card = ModelCard.load(write_model_card(local, tmp_path, "merged", build_tokenizer(CHATML, "<|im_end|>")))
    assert "base_model" not in card.data.to_dict()  # the Hub takes hub ids only; the body names the local base
    assert card.data.library_name == "transformers" and "Base model: `models/my-base`" in card.text
    assert "Not evaluated" in card.text and "no system prompt was added" in card.text
    assert "You are helpful." in card.text  # the base template's own default system turn, as trained
