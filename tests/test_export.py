"""`tunesmith export`: a run as a PEFT adapter, a merged model and a GGUF file, each proved by the logits it gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_config_file
from safetensors.torch import load_file

from tunesmith.cli import main
from tunesmith.engine.generation import Sampling
from tunesmith.models import load_model

INPUT_IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64]])


def train_run(directory: Path, model_dir: Path, rows: list, *overrides: str) -> Path:
    """A 2-step run of the tiny model; lr 1e-2 moves LoRA's B (zero at the start) well away from zero."""
    config = write_config_file(directory, model_dir, rows, "batch_size: 2, lr: 1.0e-2, warmup: 0, progress: false")
    assert main(["train", str(config), "train.max_steps=2", *overrides]) == 0
    return directory / "run"


@pytest.fixture(scope="module")
def chat_data() -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "answer"}]}
        for i in range(8)
    ]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model, chat_data) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TUNESMITH_HOME", str(tmp_path_factory.mktemp("home")))
        return train_run(tmp_path_factory.mktemp("lora"), tiny_model, chat_data)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model, chat_data) -> Path:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TUNESMITH_HOME", str(tmp_path_factory.mktemp("home")))
        return train_run(tmp_path_factory.mktemp("full"), tiny_model, chat_data, "adapter.type=full")


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(INPUT_IDS).logits


def run_adapter_logits(tiny_model: Path, run: Path) -> torch.Tensor:
    """What the run itself computes: the base with its adapter applied, not merged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), run / "adapter"))


def export(*argv) -> int:
    return main(["export", *[str(arg) for arg in argv]])


def test_peft_export_loads_in_plain_transformers_and_peft(tmp_path, tiny_model, lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = tmp_path / "adapter"
    assert export(lora_run, "--to", "peft", "--output", output) == 0
    saved = load_file(output / "adapter_model.safetensors")
    assert all(saved[name].abs().sum() > 0 for name in saved if "lora_B" in name)

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), output)
    torch.testing.assert_close(logits(plain), run_adapter_logits(tiny_model, lora_run))
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert tokenizer.chat_template and tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tiny_model).get_vocab()


def test_merged_export_equals_the_unmerged_model(tmp_path, tiny_model, lora_run):
    from transformers import AutoModelForCausalLM

    output = tmp_path / "merged"
    assert export(lora_run, "--to", "merged", "--output", output) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {path.name for path in output.iterdir()}
    merged = AutoModelForCausalLM.from_pretrained(output)
    assert merged.dtype == torch.float32 and not hasattr(merged, "peft_config")
    expected = run_adapter_logits(tiny_model, lora_run)
    torch.testing.assert_close(logits(merged), expected, rtol=1e-5, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not torch.allclose(logits(base), expected, atol=1e-3), "the adapter must change the model"

    half = tmp_path / "merged-bf16"
    assert export(lora_run, "--to", "merged", "--output", half, "--dtype", "bfloat16") == 0
    assert {tensor.dtype for tensor in load_file(half / "model.safetensors").values()} == {torch.bfloat16}


def test_qlora_run_merges_into_its_dequantised_base_and_computes_what_it_trained(tmp_path, tiny_model, chat_rows):
    """QLoRA: the NF4 base is dequantised, then merged; the merged model's logits are the unmerged QLoRA model's."""
    from transformers import AutoModelForCausalLM

    from tunesmith.engine.generation import Engine

    config = write_config_file(
        tmp_path, tiny_model, chat_rows, "max_steps: 2, lr: 0.02, batch_size: 2, progress: false, warmup: 0"
    )
    config.write_text(config.read_text() + "adapter: {type: qlora, r: 4, alpha: 8}\n")
    assert main(["train", str(config)]) == 0
    output = tmp_path / "merged"
    assert export(tmp_path / "run", "--to", "merged", "--output", output) == 0
    assert "quantization_config" not in json.loads((output / "config.json").read_text())
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        trained = Engine.load(str(tmp_path / "run")).model(input_ids=ids).logits  # 4-bit base + adapter
        merged = AutoModelForCausalLM.from_pretrained(output).eval()(input_ids=ids).logits
        original_base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()(input_ids=ids).logits
    assert torch.allclose(merged, trained, atol=1e-4)
    assert not torch.allclose(merged, original_base, atol=1e-3)


def read_fields(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()} | {
        "tensor names": [tensor.name for tensor in reader.tensors]
    }


def test_gguf_round_trip_gives_the_merged_logits(tmp_path, tiny_model, lora_run):
    merged_dir, gguf_file = tmp_path / "merged", tmp_path / "out" / "tuned.gguf"
    assert export(lora_run, "--to", "merged", "--output", merged_dir) == 0
    assert export(lora_run, "--to", "gguf", "--output", gguf_file) == 0
    # no staging left behind: the file and its model card
    assert sorted(path.name for path in gguf_file.parent.iterdir()) == ["tuned.README.md", "tuned.gguf"]

    fields = read_fields(gguf_file)
    vocab_size = json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert fields["llama.attention.head_count_kv"] == 2 and fields["llama.embedding_length"] == 32
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(fields["tokenizer.ggml.tokens"]) == vocab_size
    assert "<|im_start|>" in fields["tokenizer.chat_template"] and fields["tokenizer.ggml.merges"]
    assert "blk.1.attn_q.weight" in fields["tensor names"] and "output.weight" not in fields["tensor names"]  # tied

    merged, merged_tokenizer = load_model(merged_dir)
    roundtrip, roundtrip_tokenizer = load_model(str(gguf_file))
    torch.testing.assert_close(logits(roundtrip), logits(merged), rtol=0, atol=1e-4)
    messages = [{"role": "user", "content": "my card has not arrived"}]
    text = merged_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert roundtrip_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == text
    assert roundtrip_tokenizer(text)["input_ids"] == merged_tokenizer(text)["input_ids"]

    half = tmp_path / "tuned-f16.gguf"
    assert export(lora_run, "--to", "gguf", "--output", half, "--dtype", "float16") == 0
    assert half.stat().st_size < 0.6 * gguf_file.stat().st_size
    torch.testing.assert_close(logits(load_model(str(half))[0]), logits(merged), rtol=0, atol=2e-2)


def test_full_fine_tuning_run_exports_merged_and_gguf(tmp_path, full_run, capsys):
    merged_dir, gguf_file = tmp_path / "merged", tmp_path / "full.gguf"
    assert export(full_run, "--to", "merged", "--output", merged_dir) == 0
    assert export(full_run, "--to", "gguf", "--output", gguf_file) == 0
    tuned = logits(load_model(full_run / "model")[0])
    torch.testing.assert_close(logits(load_model(merged_dir)[0]), tuned)
    torch.testing.assert_close(logits(load_model(str(gguf_file))[0]), tuned, rtol=0, atol=1e-4)

    capsys.readouterr()
    assert export(full_run, "--to", "peft", "--output", tmp_path / "adapter") == 2
    err = capsys.readouterr().err
    assert str(full_run) in err and "full fine-tuning" in err and "--to merged" in err
    assert not (tmp_path / "adapter").exists()


def test_write_gguf_refuses_a_model_that_is_not_llama(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tunesmith.errors import UserError
    from tunesmith.models.gguf_export import write_gguf

    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(
        UserError, match="'gpt2' model.*writes llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3 models"
    ):
        write_gguf(tmp_path / "gpt2", tmp_path / "gpt2.gguf")
    assert not (tmp_path / "gpt2.gguf").exists()


def unfinished_run(tmp_path: Path) -> Path:
    run = tmp_path / "unfinished"
    run.mkdir()
    (run / "config.yaml").write_text("model: somewhere\n")
    return run


@pytest.mark.parametrize("case", ["no such run", "unfinished run", "unknown format", "gguf name", "bad dtype"])
def test_bad_requests_are_user_errors(tmp_path, lora_run, capsys, case):
    output = tmp_path / "out"
    argv, expected = {
        "no such run": ([tmp_path / "nope", "--to", "merged", "--output", output], [str(tmp_path / "nope"), "fix:"]),
        "unfinished run": (
            [unfinished_run(tmp_path), "--to", "merged", "--output", output],
            ["has no adapter/ or model/", "tunesmith train"],
        ),
        "unknown format": ([lora_run, "--to", "ggfu", "--output", output], ["did you mean 'gguf'", "--to"]),
        "gguf name": ([lora_run, "--to", "gguf", "--output", output], [str(output), ".gguf"]),
        "bad dtype": ([lora_run, "--to", "merged", "--output", output, "--dtype", "int4"], ["--dtype", "bfloat16"]),
    }[case]
    assert export(*argv) == 2
    captured = capsys.readouterr()
    assert all(text in captured.err for text in expected), captured.err
    assert "Traceback" not in captured.err and not output.exists()


def test_existing_output_needs_force(tmp_path, lora_run, capsys):
    output = tmp_path / "merged"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    assert export(lora_run, "--to", "peft", "--output", output) == 2
    err = capsys.readouterr().err
    assert str(output) in err and "--force" in err and (output / "keep.txt").is_file()

    assert export(lora_run, "--to", "peft", "--output", output, "--force") == 0
    assert (output / "adapter_config.json").is_file() and not (output / "keep.txt").exists()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # staging cleaned up


# ---- portable exports: the upstream base id, the system prompt, the model card ----------------------------

REGISTRY_NAME, REGISTRY_HUB_ID = "tiny-chat", "tunesmith-tests/Tiny-Chat-Instruct"
SYSTEM_PROMPT = "Name the intent of this banking customer's message."


def install_registry_model(home: Path, model_dir: Path, patch: pytest.MonkeyPatch) -> Path:
    """A built-in-style model: a catalog entry with an upstream hub id, its copy already pulled into `home`'s cache."""
    import shutil

    from tunesmith.models import catalog
    from tunesmith.models.gguf import SOURCE_RECORD_NAME

    cached = home / "models" / REGISTRY_NAME
    if not cached.is_dir():
        shutil.copytree(model_dir, cached)
        (cached / SOURCE_RECORD_NAME).write_text(json.dumps({"model": REGISTRY_NAME}))
    patch.setenv("TUNESMITH_HOME", str(home))
    patch.setitem(
        catalog.CATALOG,
        REGISTRY_NAME,
        catalog.CatalogEntry(
            name=REGISTRY_NAME,
            description="a tiny test model",
            license="MIT",
            hub_id=REGISTRY_HUB_ID,
            wheels=(catalog.Wheel(requirement="none", file="none", sha256="0" * 64, member="none"),),
        ),
    )
    return cached


@pytest.fixture(scope="module")
def registry_trained(tmp_path_factory, tiny_model, chat_data) -> tuple[Path, Path]:
    """(run, home): a LoRA run of a registry model, trained with data.system_prompt."""
    home, directory = tmp_path_factory.mktemp("registry-home"), tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as patch:
        install_registry_model(home, tiny_model, patch)
        run = train_run(
            directory, Path(REGISTRY_NAME), chat_data, f"data.system_prompt={SYSTEM_PROMPT}", "data.max_length=128"
        )
    return run, home


@pytest.fixture
def registry_run(registry_trained, tiny_model, monkeypatch) -> Path:
    run, home = registry_trained
    install_registry_model(home, tiny_model, monkeypatch)
    return run


def trained_prompt(tiny_model: Path, messages: list[dict]) -> list[int]:
    """The prompt tokens tunesmith trains and generates with: its own chat rendering, with the run's system prompt."""
    from tunesmith.data.tokenize import ChatTokenizer
    from tunesmith.models import load_tokenizer

    return ChatTokenizer(load_tokenizer(tiny_model), system_prompt=SYSTEM_PROMPT).prompt_ids(messages)


def plain_prompt(directory: Path, messages: list[dict]) -> list[int]:
    """The prompt tokens a user of plain transformers gets from the exported tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_peft_export_names_the_upstream_base_and_prompts_as_trained(
    tmp_path, tiny_model, registry_run, registry_trained
):
    from huggingface_hub import ModelCard
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunesmith.engine.generation import Engine

    output = tmp_path / "adapter"
    assert export(registry_run, "--to", "peft", "--output", output) == 0
    home = registry_trained[1]
    for adapter in (registry_run / "adapter", output):  # named at training, so the run's own copy is portable too
        assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == REGISTRY_HUB_ID
    assert not [path for path in output.iterdir() if str(home) in path.read_text(errors="ignore")]

    # a user's own copy of the base (here: the tiny model's directory), plain transformers + peft
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), output).eval()
    torch.testing.assert_close(logits(plain), run_adapter_logits(tiny_model, registry_run))
    for messages in (
        [{"role": "user", "content": "my card has not arrived"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
    ):
        assert plain_prompt(output, messages) == trained_prompt(tiny_model, messages)

    # the same greedy reply as `tunesmith generate RUN`
    messages = [{"role": "user", "content": "question 3"}]
    prompt = torch.tensor([plain_prompt(output, messages)])
    engine = Engine.load(str(registry_run))
    with torch.no_grad():
        reply = plain.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False
        )
    assert reply[0, prompt.shape[1] :].tolist() == engine.generate_ids(
        trained_prompt(tiny_model, messages), Sampling(max_new_tokens=8)
    )

    card = ModelCard.load(output / "README.md")
    assert card.data.base_model == REGISTRY_HUB_ID and card.data.library_name == "peft" and card.data.license == "mit"
    assert "tunesmith" in card.data.tags and "lora" in card.data.tags and "More Information Needed" not in card.text
    assert f"> {SYSTEM_PROMPT}" in card.text and "| train | `train.jsonl` | `" in card.text


def test_merged_export_names_the_upstream_base_and_prompts_as_trained(tmp_path, tiny_model, registry_run):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, GenerationConfig

    output = tmp_path / "merged"
    assert export(registry_run, "--to", "merged", "--output", output) == 0
    assert json.loads((output / "config.json").read_text())["_name_or_path"] == REGISTRY_HUB_ID
    assert AutoModelForCausalLM.from_pretrained(output).config.name_or_path == str(output)  # loads as ever
    messages = [{"role": "user", "content": "my card has not arrived"}]
    assert plain_prompt(output, messages) == trained_prompt(tiny_model, messages)
    end_of_turn = json.loads((tiny_model / "config.json").read_text())["eos_token_id"]
    assert GenerationConfig.from_pretrained(output).eos_token_id == end_of_turn
    card = ModelCard.load(output / "README.md")
    assert card.data.base_model == REGISTRY_HUB_ID and card.data.library_name == "transformers"
    assert card.data.base_model_relation == "finetune" and "AutoModelForCausalLM.from_pretrained" in card.text
