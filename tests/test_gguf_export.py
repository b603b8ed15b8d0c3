"""GGUF and Ollama exports hold what llama.cpp reads: its key names, a pre-tokenizer it knows, q8_0 tensors close to
the source, and a Modelfile whose Go TEMPLATE renders what the model's chat template renders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import CHATML, CORPUS, SPECIAL, build_tokenizer
from go_template import render

from tunesmith.cli import main
from tunesmith.errors import UserError
from tunesmith.models.gguf_export import write_gguf

# Every `tokenizer.ggml.pre` that llama.cpp's vocabulary loader accepts for a BPE ("gpt2") vocabulary: the names
# compared with `tokenizer_pre` in `llama_vocab::impl::load` (src/llama-vocab.cpp, llama.cpp as vendored by
# llama-cpp-python 0.3.36). Any other name stops loading with "unknown pre-tokenizer type" (e.g. "gpt2").
LLAMA_CPP_PRE_TOKENIZERS = {
    "default",
    "minicpm5",
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
    "jina-v5-nano",
    "deepseek-llm",
    "deepseek-coder",
    "deepseek-v3",
    "spark2_5",
    "youtu",
    "falcon",
    "mpt",
    "starcoder",
    "gpt-2",
    "phi-2",
    "jina-es",
    "jina-de",
    "gigachat",
    "jina-v2-es",
    "jina-v2-de",
    "a.x-4.0",
    "mellum",
    "modern-bert",
    "jais-2",
    "gemma4",
    "granite-embed-multi-311m",
    "sarvam-moe",
    "jina-v1-en",
    "jina-v2-code",
    "roberta-bpe",
    "whitespace",
    "refact",
    "command-r",
    "qwen2",
    "deepseek-r1-qwen",
    "kormo",
    "f2llmv2",
    "qwen35",
    "stablelm2",
    "olmo",
    "dbrx",
    "smaug-bpe",
    "poro-chat",
    "chatglm-bpe",
    "glm4",
    "glm5",
    "viking",
    "jais",
    "tekken",
    "smollm",
    "codeshell",
    "bloom",
    "gpt3-finnish",
    "exaone",
    "exaone4",
    "exaone-moe",
    "chameleon",
    "minerva-7b",
    "megrez",
    "gpt-4o",
    "llama4",
    "kanana2",
    "talkie",
    "granite-embed-multi-97m",
    "tiny_aya",
    "cohere2moe",
    "superbpe",
    "trillion",
    "granite-docling",
    "bailingmoe",
    "bailingmoe2",
    "llada-moe",
    "seed-coder",
    "hunyuan",
    "hunyuan-dense",
    "hy_v4",
    "joyai-llm",
    "kimi-k2",
    "ufakzeka",
    "grok-2",
    "afmoe",
    "laguna",
    "minimax-m2",
    "solar-open",
    "mellum2",
}


def read_fields(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}


def known_key_patterns() -> list[str]:
    """Every metadata key the gguf package (llama.cpp's own Python half) names, with the architecture filled in."""
    import gguf

    keys: list[str] = []

    def collect(namespace: type) -> None:
        for name, value in vars(namespace).items():
            if isinstance(value, str) and not name.startswith("_"):
                keys.append(value.replace("{arch}", "llama"))
            elif isinstance(value, type):
                collect(value)

    collect(gguf.Keys)
    return keys


def is_known_key(key: str, patterns: list[str]) -> bool:
    return key.startswith("GGUF.") or any(key == pattern.replace("{id}", "0") for pattern in patterns)


def run_around(model_dir: Path, directory: Path, system_prompt: str | None = None) -> Path:
    """A finished full fine-tuning run whose model/ is `model_dir` (no training needed to test exporting it)."""
    run = directory / "run"
    shutil.copytree(model_dir, run / "model")
    config = {"model": str(model_dir), "adapter": {"type": "full"}, "data": {"train": "t.jsonl"}}
    if system_prompt:
        config["data"]["system_prompt"] = system_prompt
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def export(*argv) -> int:
    return main(["export", *[str(arg) for arg in argv]])


def test_metadata_uses_the_names_llama_cpp_reads(tmp_path, tiny_model):
    import gguf
    from transformers import AutoTokenizer

    fields = read_fields(
        write_gguf(tiny_model, tmp_path / "tiny.gguf", name="tiny-run", base_model="smollm2-135m-instruct")
    )
    patterns = known_key_patterns()
    assert [key for key in fields if not is_known_key(key, patterns)] == []
    assert fields["tokenizer.ggml.pre"] in LLAMA_CPP_PRE_TOKENIZERS and fields["tokenizer.ggml.pre"] == "gpt-2"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert "tokenizer.ggml.bos_token_id" not in fields  # the tiny tokenizer has none
    assert fields["tokenizer.ggml.add_bos_token"] is False and fields["tokenizer.ggml.add_eos_token"] is False
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    types = fields["tokenizer.ggml.token_type"]
    for token in SPECIAL:  # control tokens: never produced from plain text, hidden when detokenizing
        assert types[tokenizer.convert_tokens_to_ids(token)] == gguf.TokenType.CONTROL
    assert types[tokenizer.convert_tokens_to_ids("the")] == gguf.TokenType.NORMAL
    assert fields["general.name"] == "tiny-run" and fields["general.finetune"] == "tiny-run"
    assert fields["general.basename"] == "SmolLM2-135M-Instruct" and fields["general.license"] == "Apache-2.0"
    assert fields["general.base_model.count"] == 1 and fields["general.base_model.0.organization"] == "HuggingFaceTB"
    assert fields["general.base_model.0.repo_url"] == "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"
    assert fields["general.size_label"].endswith("K") and fields["general.type"] == "model"
    assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32


def test_every_pre_tokenizer_name_written_is_one_llama_cpp_knows():
    from tunesmith.models.gguf_vocab import written_pre_tokenizer_names

    assert written_pre_tokenizer_names() <= LLAMA_CPP_PRE_TOKENIZERS


def bpe_tokenizer(pre_tokenizer, clean_up_spaces: bool = False):
    """A small byte-level BPE tokenizer with the given pre-tokenizer, trained on the test corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", clean_up_tokenization_spaces=clean_up_spaces
    )


def test_the_pre_tokenizer_is_named_from_how_the_tokenizer_splits():
    from tokenizers import Regex, pre_tokenizers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    from tunesmith.models.gguf_vocab import llama_cpp_pre_tokenizer

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    digits_then_bytes = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    llama3 = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    assert llama_cpp_pre_tokenizer(bpe_tokenizer(byte_level, clean_up_spaces=True)) == "gpt-2"
    assert llama_cpp_pre_tokenizer(bpe_tokenizer(digits_then_bytes)) == "smollm"  # SmolLM's split
    assert llama_cpp_pre_tokenizer(bpe_tokenizer(digits_then_bytes, clean_up_spaces=True)) == "starcoder"
    assert llama_cpp_pre_tokenizer(bpe_tokenizer(llama3, clean_up_spaces=True)) == "llama-bpe"

    unknown = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\w+|[^\w\s]+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    with pytest.raises(UserError, match="llama.cpp has no pre-tokenizer.*convert_hf_to_gguf.py"):
        llama_cpp_pre_tokenizer(bpe_tokenizer(unknown))


def test_q8_0_tensors_dequantize_close_to_the_source(tmp_path, tiny_model):
    import gguf
    from safetensors.torch import load_file

    from tunesmith.models import load_model

    full = write_gguf(tiny_model, tmp_path / "f32.gguf")
    quantized = write_gguf(tiny_model, tmp_path / "q8.gguf", "q8_0")
    assert quantized.stat().st_size < 0.4 * full.stat().st_size
    exact = {tensor.name: tensor for tensor in gguf.GGUFReader(full).tensors}
    checked = 0
    for tensor in gguf.GGUFReader(quantized).tensors:
        source = np.asarray(exact[tensor.name].data, dtype=np.float32)  # f32 file: the source, in llama.cpp's layout
        if source.ndim == 1:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32  # norms stay f32
            continue
        assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0
        restored = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(source.shape)
        # Q8_0: each block of 32 values is rounded to 127 steps of its largest magnitude (half a step), the step
        # itself stored in f16 (up to 127 * 2^-11 of a step more).
        block_max = np.abs(source.reshape(-1, 32)).max(axis=1, keepdims=True)
        assert (np.abs(restored - source).reshape(-1, 32) <= block_max / 127 * (0.5 + 127 / 2048) + 1e-7).all()
        checked += 1
    assert checked == 1 + 2 * 7  # token_embd, and q, k, v, o, gate, up, down per layer
    assert read_fields(quantized)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0

    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64]])
    source_model = load_model(tiny_model)[0].eval()
    with torch.no_grad():
        expected, actual = source_model(ids).logits, load_model(str(quantized))[0].eval()(ids).logits
    # The file loads back (transformers dequantizes it) near the source's logits: within 5% of their largest (8-bit
    # noise through a 32-wide model); a tensor in the wrong layout would move them by their whole range.
    assert (actual - expected).abs().max() <= 0.05 * expected.abs().max()
    assert set(load_file(tiny_model / "model.safetensors"))  # the source is untouched


def test_rows_that_do_not_fill_quantization_blocks_fall_back_to_f16(tmp_path):
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(CHATML, "<|im_end|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "odd")
    tokenizer.save_pretrained(tmp_path / "odd")
    reader = gguf.GGUFReader(write_gguf(tmp_path / "odd", tmp_path / "odd.gguf", "q8_0"))
    types = {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}
    # Rows of 48 values are not whole blocks of 32: f16, as llama.cpp's converter falls back; rows of 64 quantize.
    assert types["token_embd.weight"] == types["blk.0.attn_q.weight"] == types["blk.0.ffn_up.weight"] == "F16"
    assert types["blk.0.ffn_down.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"


def test_export_q8_0_from_the_command_line(tmp_path, tiny_model):
    import gguf

    run = run_around(tiny_model, tmp_path)
    assert export(run, "--to", "gguf", "--output", tmp_path / "out.gguf", "--dtype", "q8_0") == 0
    assert read_fields(tmp_path / "out.gguf")["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    # The model card goes beside the file, and a second export would replace it only with --force.
    assert sorted(path.name for path in tmp_path.glob("out.*")) == ["out.README.md", "out.gguf"]
    assert "exported as gguf" in (tmp_path / "out.README.md").read_text(encoding="utf-8")
    (tmp_path / "out.gguf").unlink()
    assert export(run, "--to", "gguf", "--output", tmp_path / "out.gguf") == 2
    assert not (tmp_path / "out.gguf").exists()
    assert export(run, "--to", "gguf", "--output", tmp_path / "out.gguf", "--force") == 0


def test_k_quants_are_refused_with_how_to_get_them(tmp_path, tiny_model, capsys):
    import gguf

    # The fact behind the refusal: the gguf package has no Python quantizer for the K-quants Q4_K_M mixes.
    for quant_type in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K):
        with pytest.raises(NotImplementedError):
            gguf.quants.quantize(np.zeros((1, 256), dtype=np.float32), quant_type)
    run = run_around(tiny_model, tmp_path)
    assert export(run, "--to", "gguf", "--output", tmp_path / "out.gguf", "--dtype", "q4_k_m") == 2
    err = capsys.readouterr().err
    assert "--dtype" in err and "llama-quantize" in err and "Q4_K_M" in err and "Traceback" not in err
    assert not (tmp_path / "out.gguf").exists()


# ---- Ollama ----------------------------------------------------------------------------------------------------


def read_modelfile(path: Path) -> dict:
    """FROM, TEMPLATE, SYSTEM and the PARAMETER stop values of a Modelfile as tunesmith writes it."""
    text = path.read_text(encoding="utf-8")
    parts = {
        "stop": [line.split(" ", 2)[2].strip('"') for line in text.splitlines() if line.startswith("PARAMETER stop ")]
    }
    parts["FROM"] = text.splitlines()[0].removeprefix("FROM ")
    for key in ("TEMPLATE", "SYSTEM"):
        if f'{key} """' in text:
            parts[key] = text.split(f'{key} """', 1)[1].split('"""', 1)[0]
    return parts


def ollama_prompt(modelfile: dict, messages: list[dict]) -> str:
    """What Ollama's chat endpoint renders: SYSTEM first unless the request has its own system message, then
    the TEMPLATE executed over .Messages (template.Execute in ollama/template/template.go)."""
    if "SYSTEM" in modelfile and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": modelfile["SYSTEM"]}, *messages]
    listed = [{"Role": message["role"], "Content": message["content"]} for message in messages]
    system = "\n\n".join(message["content"] for message in messages if message["role"] == "system")
    return render(modelfile["TEMPLATE"], {"Messages": listed, "System": system})


CONVERSATIONS = [
    [{"role": "user", "content": "my card has not arrived"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "hello"}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}, {"role": "user", "content": "three"}],
]


def expected_prompt(tokenizer, messages: list[dict], system_prompt: str | None) -> str:
    if system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]  # as training rendered them
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("system_prompt", [None, "You triage bank support tickets."])
def test_ollama_export_writes_a_modelfile_that_prompts_as_training_did(tmp_path, tiny_model, system_prompt):
    from transformers import AutoTokenizer

    run = run_around(tiny_model, tmp_path, system_prompt)
    assert export(run, "--to", "ollama", "--output", tmp_path / "ollama") == 0
    assert sorted(path.name for path in (tmp_path / "ollama").iterdir()) == ["Modelfile", "README.md", "model.gguf"]
    card = (tmp_path / "ollama" / "README.md").read_text(encoding="utf-8")
    assert "ollama create my-model -f Modelfile" in card and "\nlibrary_name: gguf\n" in card
    modelfile = read_modelfile(tmp_path / "ollama" / "Modelfile")
    assert modelfile["FROM"] == "./model.gguf"
    assert modelfile["stop"] == ["<|im_end|>", "<|im_start|>"]
    # No run prompt: the template's own default system message (the tiny ChatML template's "You are helpful.").
    assert modelfile["SYSTEM"] == (system_prompt or "You are helpful.")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for messages in CONVERSATIONS:
        assert ollama_prompt(modelfile, messages) == expected_prompt(tokenizer, messages, system_prompt)
    assert read_fields(tmp_path / "ollama" / "model.gguf")["tokenizer.ggml.pre"] == "gpt-2"


def test_ollama_template_for_a_llama3_style_chat_template(tmp_path, tiny_llama3_model):
    from transformers import AutoTokenizer

    run = run_around(tiny_llama3_model, tmp_path)
    assert export(run, "--to", "ollama", "--output", tmp_path / "ollama", "--dtype", "q8_0") == 0
    modelfile = read_modelfile(tmp_path / "ollama" / "Modelfile")
    assert "SYSTEM" not in modelfile and modelfile["stop"] == ["<|eot_id|>", "<|start_header_id|>"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama3_model)
    for messages in CONVERSATIONS:
        assert ollama_prompt(modelfile, messages) == expected_prompt(tokenizer, messages, None)


def test_a_chat_template_ollama_cannot_reproduce_is_refused(tmp_path, tiny_model, capsys):
    from transformers import AutoTokenizer

    model_dir = tmp_path / "odd-template"
    shutil.copytree(tiny_model, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # Roles written as other words ("Human:", "Bot:"): no single OPEN + role + CLOSE shape renders it.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}Human: {% else %}Bot: {% endif %}"
        "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}Bot:{% endif %}"
    )
    tokenizer.save_pretrained(model_dir)
    run = run_around(model_dir, tmp_path / "runs")
    assert export(run, "--to", "ollama", "--output", tmp_path / "ollama") == 2
    err = capsys.readouterr().err
    assert "cannot write an Ollama TEMPLATE" in err and "--to gguf" in err and "Traceback" not in err
    assert not (tmp_path / "ollama").exists()


# Each family GGUF export writes, with its sliding window off: llama.cpp's Llama (what Mistral is written as) never
# applies one, and transformers' GGUF reader reads none back.
WITHOUT_WINDOW = {"llama": {}, "mistral": {"sliding_window": None}, "qwen2": {"use_sliding_window": False}}
# transformers' reader takes no head_dim from a qwen3 GGUF (llama.cpp's key_length, which tunesmith writes): it uses
# Qwen3's default, 128, which every released Qwen3 has.
WITHOUT_WINDOW["qwen3"] = {"use_sliding_window": False, "head_dim": 128}
# Phi-3's window is written for llama.cpp, which applies it; transformers' reader reads none back.
WITHOUT_WINDOW["phi3"] = {"sliding_window": None}


@pytest.mark.parametrize("family", list(WITHOUT_WINDOW))
def test_each_family_round_trips_through_transformers_gguf_reader(tmp_path, family):
    """The family's tensors under llama.cpp's names and layout (Llama's rotary reorder, Qwen's biases and q/k norms)
    load back in transformers' GGUF reader to the same logits (f32), or close (q8_0), with the same tokens."""
    from test_architectures import save_family

    from tunesmith.models import load_model

    tokenizer = build_tokenizer(CHATML, "<|im_end|>")
    # (not named "mistral": transformers' reader takes a llama file whose general.name is exactly that for a
    # Mistral, which the gguf package's name map then does not know)
    directory = save_family(family, tmp_path / f"tiny-{family}", tokenizer, **WITHOUT_WINDOW[family])
    original, _ = load_model(str(directory))
    text = "What is the capital of France? Paris is the capital."
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    expected = original(input_ids=ids).logits
    scale = expected.abs().max().item()
    # q8_0: 8-bit blocks of 32, one scale each; within 8% of the largest logit (Phi-3's fused products round most)
    for dtype, tolerance in [("f32", 1e-4), ("q8_0", 0.08 * scale)]:
        written = write_gguf(directory, tmp_path / f"{family}-{dtype}.gguf", dtype=dtype)
        roundtrip, roundtrip_tokenizer = load_model(str(written))
        assert roundtrip.config.model_type == ("llama" if family == "mistral" else family)
        assert roundtrip_tokenizer(text)["input_ids"] == ids[0].tolist()
        torch.testing.assert_close(roundtrip(input_ids=ids).logits, expected, rtol=0, atol=tolerance)


def sentencepiece_tokenizer():
    """A Gemma-style SentencePiece vocabulary built in code: BPE over text whose spaces are \u2581, unknown bytes as
    <0xXX> tokens, control tokens first, each merged token's id after its parts (SentencePiece's best-first order)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizers.Replace(" ", "\u2581")
    trained.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    learned = json.loads(trained.to_str())["model"]
    byte_tokens = [f"<0x{byte:02X}>" for byte in range(256)]
    order = specials + byte_tokens + sorted(learned["vocab"], key=learned["vocab"].get)
    vocab = {token: index for index, token in enumerate(order)}
    merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ")) for merge in learned["merges"]]
    backend = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"], chat_template=CHATML,
    )  # fmt: skip


# Released Gemma sizes: head size 256 = query_pre_attn_scalar; Gemma 3 soft-caps nothing and every sixth layer is
# global, Gemma 2 caps attention logits at 50 and final logits at 30, and every other layer is global.
GEMMA_AS_RELEASED = {
    "gemma3": dict(head_dim=256, final_logit_softcapping=None, layer_types=None),
    "gemma2": dict(head_dim=256, query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
}


@pytest.mark.parametrize("family", list(GEMMA_AS_RELEASED))
def test_gemma_round_trips_with_its_sentencepiece_vocabulary(tmp_path, family):
    """Gemma 2 and 3: norms stored plus one, the sliding window (and Gemma 2's soft caps) in the keys, and a
    SentencePiece vocabulary (scores, byte tokens, whitespace tokens spelled with spaces) that transformers' GGUF
    reader turns back into the same tokenizer."""
    from test_architectures import save_family

    from tunesmith.models import load_model

    tokenizer = sentencepiece_tokenizer()
    gemma = dict(GEMMA_AS_RELEASED[family], tie_word_embeddings=True, pad_token_id=0)
    directory = save_family(family, tmp_path / f"tiny-{family}", tokenizer, **gemma)
    original, _ = load_model(str(directory))
    written = write_gguf(directory, tmp_path / f"{family}.gguf")
    fields = read_fields(written)
    assert fields["tokenizer.ggml.model"] == "llama" and fields["general.architecture"] == family
    assert fields[f"{family}.attention.sliding_window"] == original.config.sliding_window
    if family == "gemma2":
        assert fields["gemma2.attn_logit_softcapping"] == 50.0 and fields["gemma2.final_logit_softcapping"] == 30.0
    roundtrip, roundtrip_tokenizer = load_model(str(written))
    for text in ["What is the capital of France? Paris is the capital.", "my  card\n\nhas not arrived ~"]:
        assert roundtrip_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    ids = torch.tensor([tokenizer(CORPUS[2])["input_ids"]])
    torch.testing.assert_close(roundtrip(input_ids=ids).logits, original(input_ids=ids).logits, rtol=0, atol=1e-4)


def test_a_gemma2_whose_settings_a_gguf_would_lose_is_refused(tmp_path):
    """A Gemma 2 with other soft caps or query scaling than the released ones: transformers' reader would give the file
    its defaults, so it is refused with the way to convert it, before a byte is written."""
    from test_architectures import save_family

    settings = dict(GEMMA_AS_RELEASED["gemma2"], attn_logit_softcapping=20.0, query_pre_attn_scalar=144)
    directory = save_family("gemma2", tmp_path / "tiny-gemma2", sentencepiece_tokenizer(), **settings)
    with pytest.raises(UserError) as refused:
        write_gguf(directory, tmp_path / "gemma2.gguf")
    message = str(refused.value)
    assert "attn_logit_softcapping 20.0 (a GGUF reads back 50.0)" in message
    assert "query_pre_attn_scalar 144 (not its head size 256)" in message and "convert_hf_to_gguf.py" in message
    assert not (tmp_path / "gemma2.gguf").exists()


@pytest.mark.slow
def test_the_real_gemma_round_trips_exactly(tmp_path):
    """gemma3-270m (pulled from the package registry, about a minute) written as GGUF and read back by transformers:
    the same tokens for text with runs of spaces and the chat template, the same logits (measured: max |difference|
    0.0 in f32)."""
    from conftest import load_builtin_or_skip

    from tunesmith.models import load_model

    original, tokenizer = load_builtin_or_skip("gemma3-270m")
    written = write_gguf(original.config._name_or_path, tmp_path / "gemma.gguf")
    roundtrip, roundtrip_tokenizer = load_model(str(written))
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    for text in ["The capital of France is Paris.", "  two  spaces\n\nand newlines", chat]:
        assert roundtrip_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    ids = torch.tensor([tokenizer("The capital of France is Paris.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(roundtrip(input_ids=ids).logits, original(input_ids=ids).logits, rtol=0, atol=1e-4)
