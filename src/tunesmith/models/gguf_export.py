"""Write a Llama-architecture transformers directory as a GGUF file (llama.cpp, Ollama, LM Studio).

The reverse of `models/gguf.py`. A GGUF holds the config as llama.cpp's metadata keys, the tokenizer as
a token list plus merges, and every tensor under llama.cpp's names (`blk.N.attn_q`, ...), with each
attention head's query and key rows reordered the way llama.cpp's rotary embedding expects them.
transformers' GGUF reader undoes exactly that, which is what `tunesmith.models.load_model(path)` uses,
so a written file loads back to the same logits. Names and key spellings come from the `gguf` package.

Tensors are streamed: the header is written from the shapes alone, then one tensor at a time is read
from the safetensors files, converted and appended, so memory holds one tensor, not the model.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunesmith.errors import UserError

GGUF_DTYPES = ("f32", "f16")
# What transformers calls the architecture, and what llama.cpp calls it.
_LLAMA_MODEL_TYPE = "llama"
_GGUF_ARCHITECTURE = "llama"


def write_gguf(model_dir: str | Path, output_file: str | Path, dtype: str = "f32", name: str | None = None) -> Path:
    """Write the Llama model in `model_dir` (config.json, *.safetensors, tokenizer) to `output_file`.

    `dtype` is f32 (exact) or f16 (half the size); 1-D tensors (norms) stay f32 either way, as llama.cpp keeps them.
    `name` goes into the file's general.name (default: the directory's name).
    """
    import gguf

    model_dir, output_file = Path(model_dir), Path(output_file)
    if dtype not in GGUF_DTYPES:
        raise UserError(f"GGUF dtype '{dtype}' is not supported; fix: use one of {', '.join(GGUF_DTYPES)}")
    config = _load_llama_config(model_dir)
    tokenizer = _load_tokenizer(model_dir)
    shapes = _tensor_shapes(model_dir)
    names = _gguf_tensor_names(model_dir, config, shapes)

    writer = gguf.GGUFWriter(None, arch=_GGUF_ARCHITECTURE)
    _add_architecture(writer, config, name=name or model_dir.name, dtype=dtype)
    _add_tokenizer(writer, tokenizer, vocab_size=config.vocab_size)
    for hf_name, gguf_name in names.items():
        # The header states every tensor's shape and byte size before any data is written.
        out_dtype = _numpy_dtype(dtype, ndim=len(shapes[hf_name]))
        num_bytes = out_dtype.itemsize * math.prod(shapes[hf_name])
        writer.add_tensor_info(gguf_name, shapes[hf_name], out_dtype, num_bytes)
    writer.write_header_to_file(output_file)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for hf_name, tensor in _read_tensors(model_dir, list(names)):
        tensor = _to_llama_cpp_layout(hf_name, tensor, config)
        writer.write_tensor_data(tensor.float().numpy().astype(_numpy_dtype(dtype, ndim=tensor.ndim)))
    writer.close()
    return output_file


def _load_llama_config(model_dir: Path) -> Any:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    if config.model_type != _LLAMA_MODEL_TYPE:
        raise UserError(
            f"model '{model_dir}' is a '{config.model_type}' model; tunesmith's GGUF export writes Llama-architecture "
            f"models only; fix: export --to merged and convert that directory with llama.cpp's convert_hf_to_gguf.py"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    unsupported = [
        *([f"rope scaling '{rope_type}'"] if rope_type not in (None, "default") else []),
        *(["attention biases"] if getattr(config, "attention_bias", False) else []),
        *(["MLP biases"] if getattr(config, "mlp_bias", False) else []),
    ]
    if unsupported:
        raise UserError(
            f"model '{model_dir}' is Llama-shaped but has {', '.join(unsupported)}, which tunesmith's GGUF export "
            f"does not write; fix: export --to merged and convert that directory with llama.cpp's convert_hf_to_gguf.py"
        )
    return config


def _load_tokenizer(model_dir: Path) -> Any:
    # Not `load_tokenizer`: that adds a pad token for batching, and the file should state the model's own tokens.
    from transformers import AutoTokenizer

    from tunesmith.models.loading import quiet_transformers

    with quiet_transformers():
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)


def _add_architecture(writer: Any, config: Any, name: str, dtype: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_dimension_count(head_dim)  # transformers reads this key back as head_dim
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if head_dim * config.num_attention_heads != config.hidden_size:  # llama.cpp assumes hidden/heads otherwise
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """A byte-level BPE tokenizer as llama.cpp's "gpt2" model: tokens by id, their types, merges, special ids."""
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["model"]["type"] != "BPE" or "ByteLevel" not in json.dumps(backend.get("pre_tokenizer")):
        raise UserError(
            f"the tokenizer is {backend['model']['type']} without byte-level pre-tokenization; tunesmith's GGUF export "
            f"writes byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM style); fix: export --to merged and convert "
            f"it with llama.cpp's convert_hf_to_gguf.py"
        )
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise UserError(f"the tokenizer has {max(by_id) + 1} tokens but the model only {vocab_size} embedding rows; "
                        f"fix: resize the model's token embeddings to the tokenizer before exporting")
    added = tokenizer.added_tokens_decoder  # {id: AddedToken}
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:  # embedding rows past the tokenizer (vocabularies padded to a multiple of 64)
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL if index not in added else
                         gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in backend["model"]["merges"]]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(backend.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id)):
        if token_id is not None:
            add(token_id)
    # Whether encoding adds BOS/EOS is behaviour, not a setting every tokenizer exposes: observe it.
    encoded = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and encoded[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and encoded[-1:] == [tokenizer.eos_token_id])
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _pre_tokenizer_name(pre_tokenizer: dict | None) -> str:
    """llama.cpp's name for how text is split before BPE (`tokenizer.ggml.pre`).

    GPT-2's own split (ByteLevel with its built-in regex) is "gpt2"; a Split by a known regex takes the
    name transformers' GGUF reader maps back to that same regex, so the file round-trips.
    """
    if pre_tokenizer and pre_tokenizer.get("type") == "ByteLevel" and pre_tokenizer.get("use_regex", True):
        return "gpt2"
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_PRE_TOKENIZER_SPLITS,
    )

    steps = (pre_tokenizer or {}).get("pretokenizers", [])
    patterns = [step.get("pattern", {}).get("Regex") for step in steps if step.get("type") == "Split"]
    for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
        if patterns == [regex]:
            return name
    raise UserError(
        f"the tokenizer splits text in a way tunesmith's GGUF export cannot name for llama.cpp "
        f"({json.dumps(pre_tokenizer)[:200]}); fix: export --to merged and convert it with llama.cpp's "
        f"convert_hf_to_gguf.py"
    )


def _tensor_shapes(model_dir: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    shapes = {}
    for file in _safetensors_files(model_dir):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = list(handle.get_slice(name).get_shape())
    return shapes


def _read_tensors(model_dir: Path, wanted: list[str]) -> Iterator[tuple[str, Any]]:
    """`(name, tensor)` in the order of `wanted`, one tensor in memory at a time."""
    from safetensors import safe_open

    file_of = {}
    for file in _safetensors_files(model_dir):
        with safe_open(file, framework="pt") as handle:
            file_of.update({name: file for name in handle.keys()})
    for name in wanted:
        with safe_open(file_of[name], framework="pt") as handle:
            yield name, handle.get_tensor(name)


def _safetensors_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"model directory '{model_dir}' has no *.safetensors weights; fix: point at a directory "
                        f"written by save_pretrained (tunesmith export --to merged writes one)")
    return files


def _gguf_tensor_names(model_dir: Path, config: Any, shapes: dict[str, list[int]]) -> dict[str, str]:
    """HF tensor name -> llama.cpp tensor name, for every tensor the file will hold."""
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    names, unplaced = {}, []
    for hf_name in shapes:
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: llama.cpp reuses token_embd when there is no output tensor
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            unplaced.append(hf_name)
        else:
            names[hf_name] = gguf_name
    if unplaced:
        raise UserError(f"model '{model_dir}' has tensors a Llama GGUF has no place for: {', '.join(unplaced[:5])}; "
                        f"fix: export --to merged and convert it with llama.cpp's convert_hf_to_gguf.py")
    return names


def _to_llama_cpp_layout(hf_name: str, tensor: Any, config: Any) -> Any:
    """Q and K rows per head: transformers' rotary pairs dimension i with i + d/2, llama.cpp pairs 2i with 2i+1.

    Each head's rows (2, d/2, in) become (d/2, 2, in): the two halves interleaved. transformers' reader
    applies the inverse when it loads the file.
    """
    if hf_name.endswith("self_attn.q_proj.weight"):
        num_heads = config.num_attention_heads
    elif hf_name.endswith("self_attn.k_proj.weight"):
        num_heads = config.num_key_value_heads or config.num_attention_heads
    else:
        return tensor
    rows, columns = tensor.shape
    return tensor.reshape(num_heads, 2, rows // num_heads // 2, columns).transpose(1, 2).reshape(rows, columns)


def _numpy_dtype(dtype: str, ndim: int) -> Any:
    import numpy as np

    return np.dtype(np.float16 if dtype == "f16" and ndim > 1 else np.float32)
