"""Write a transformers directory (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3: GGUF_FAMILIES) as a GGUF file
(llama.cpp, Ollama, LM Studio).

The reverse of `models/gguf.py`. A GGUF holds the config as llama.cpp's metadata keys, the tokenizer as
a token list plus merges (models/gguf_vocab.py), and every tensor under llama.cpp's names (`blk.N.attn_q`,
...), each attention head's query and key rows reordered where the architecture's rotary embedding in
llama.cpp expects it (Llama's). transformers' GGUF reader undoes exactly that, which is what
`tunesmith.models.load_model(path)` uses, so a written file loads back to the same logits. Names and key
spellings come from the `gguf` package.

Tensors are streamed: the header is written from the shapes alone, then one tensor at a time is read
from the safetensors files, converted (cast or quantized) and appended, so memory holds one tensor, not the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.errors import UserError

# f32 exact; f16 half the size; q8_0 (8-bit blocks of 32 with one scale each) about a quarter of f32.
GGUF_DTYPES = ("f32", "f16", "q8_0")
# Mixed K-quant types that only llama.cpp's C code writes: the gguf package (0.19) has no Python quantizer for
# Q4_K or Q6_K (gguf.quants raises NotImplementedError), so these are refused with the way to get them.
LLAMA_QUANTIZE_ONLY_DTYPES = {"q4_k_m": "Q4_K_M", "q4_k_s": "Q4_K_S", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}


@dataclass(frozen=True)
class GGUFFamily:
    """How one transformers architecture is written as llama.cpp's: its architecture name there, and whether each
    attention head's query and key rows are reordered for llama.cpp's rotary embedding (Llama's "normal" RoPE
    pairs dimensions 2i, 2i+1; the "NeoX" RoPE of Qwen pairs i with i + d/2 as transformers does, so no reorder)."""

    architecture: str
    permute_qk: bool
    # Gemma's RMSNorms multiply by (1 + weight); llama.cpp's by the weight, so each norm is stored plus one
    norm_offset: float = 0.0


# What tunesmith writes, by transformers' model_type: what llama.cpp's converter writes for each, and transformers'
# GGUF reader loads back (a test round-trips each). Mistral is written as llama.cpp writes it, as a Llama (without
# the sliding window, which llama.cpp's Llama never applies: identical for sequences up to the window).
GGUF_FAMILIES = {
    "llama": GGUFFamily("llama", permute_qk=True),
    "mistral": GGUFFamily("llama", permute_qk=True),
    "qwen2": GGUFFamily("qwen2", permute_qk=False),  # its q/k/v biases map by name like the weights
    "qwen3": GGUFFamily("qwen3", permute_qk=False),
    "gemma2": GGUFFamily("gemma2", permute_qk=False, norm_offset=1.0),
    "gemma3_text": GGUFFamily("gemma3", permute_qk=False, norm_offset=1.0),
    "phi3": GGUFFamily("phi3", permute_qk=False),  # fused qkv_proj and gate_up_proj: llama.cpp's attn_qkv, ffn_up
}
GEMMA = ("gemma2", "gemma3_text")


def gguf_dtype_problem(dtype: str) -> str | None:
    """Why `dtype` cannot be written, with the fix; None when it can."""
    if dtype in GGUF_DTYPES:
        return None
    if dtype in LLAMA_QUANTIZE_ONLY_DTYPES:
        return (
            f"'{dtype}' is a llama.cpp K-quant, which the gguf Python package cannot write (it has no "
            f"{LLAMA_QUANTIZE_ONLY_DTYPES[dtype]} quantizer); fix: export --dtype float32 (or q8_0), then run "
            f"llama.cpp's `llama-quantize model.gguf model-{dtype}.gguf {LLAMA_QUANTIZE_ONLY_DTYPES[dtype]}`"
        )
    return f"'{dtype}' is not a GGUF type tunesmith writes; fix: use one of {', '.join(GGUF_DTYPES)}"


def write_gguf(
    model_dir: str | Path,
    output_file: str | Path,
    dtype: str = "f32",
    name: str | None = None,
    base_model: str | None = None,
    tokenizer: Any = None,
) -> Path:
    """Write the model in `model_dir` (config.json, *.safetensors, tokenizer; a GGUF_FAMILIES architecture) to
    `output_file`.

    `dtype` is f32 (exact), f16 or q8_0; 1-D tensors (norms) stay f32 either way, as llama.cpp keeps them.
    `name` goes into the file's general.name (default: the directory's name); `base_model` (a registry name,
    a Hugging Face id or a directory) into general.base_model.* and, for a built-in model, general.license.
    `tokenizer` replaces the directory's own (e.g. one whose chat template adds the run's system prompt).
    """
    import gguf
    import numpy as np

    model_dir, output_file = Path(model_dir), Path(output_file)
    if (problem := gguf_dtype_problem(dtype)) is not None:
        raise UserError(f"cannot write GGUF: {problem}")
    from tunesmith.models.gguf_vocab import add_tokenizer

    config = _load_config(model_dir)
    family = GGUF_FAMILIES[config.model_type]
    tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(model_dir)
    shapes = _tensor_shapes(model_dir)
    names = _gguf_tensor_names(model_dir, config, shapes, family)
    types = {hf_name: tensor_type(gguf_name, shapes[hf_name], dtype) for hf_name, gguf_name in names.items()}

    writer = gguf.GGUFWriter(None, arch=family.architecture)
    name = name or model_dir.name
    parameters = sum(math.prod(shapes[hf_name]) for hf_name in names)
    describe_model(name, base_model, parameters).set_gguf_meta_model(writer)
    _add_architecture(writer, config, dtype=dtype)
    add_tokenizer(writer, tokenizer, model_dir, vocab_size=config.vocab_size, architecture=family.architecture)
    for hf_name, gguf_name in names.items():
        # The header states every tensor's type and byte size before any data is written; given as bytes,
        # (rows, bytes per row), which gguf turns back into the tensor's own shape for every type alike.
        byte_shape = gguf.quant_shape_to_byte_shape(shapes[hf_name], types[hf_name])
        writer.add_tensor_info(
            gguf_name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=types[hf_name]
        )
    writer.write_header_to_file(output_file)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for hf_name, tensor in _read_tensors(model_dir, list(names)):
        tensor = _to_llama_cpp_layout(hf_name, tensor, config) if family.permute_qk else tensor
        if family.norm_offset and names[hf_name].endswith("norm.weight"):
            tensor = tensor.float() + family.norm_offset
        writer.write_tensor_data(gguf.quants.quantize(tensor.float().numpy(), types[hf_name]))
    writer.close()
    return output_file


def _load_config(model_dir: Path) -> Any:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    if config.model_type not in GGUF_FAMILIES:
        raise UserError(
            f"model '{model_dir}' is a '{config.model_type}' model; tunesmith's GGUF export writes "
            f"{', '.join(GGUF_FAMILIES)} models; fix: export --to merged and convert that directory with llama.cpp's "
            f"convert_hf_to_gguf.py"
        )
    rope = _rope(config)
    rope_type = rope.get("rope_type", "default")
    unsupported = [
        *([f"rope scaling '{rope_type}'"] if rope_type not in (None, "default") else []),
        *(["attention biases"] if getattr(config, "attention_bias", False) else []),
        *(["MLP biases"] if getattr(config, "mlp_bias", False) else []),
        *settings_a_file_loses(config),
    ]
    if unsupported:
        raise UserError(
            f"model '{model_dir}' has {', '.join(unsupported)}, which tunesmith's GGUF export "
            f"does not write; fix: export --to merged and convert that directory with llama.cpp's convert_hf_to_gguf.py"
        )
    return config


def settings_a_file_loses(config: Any) -> list[str]:
    """Settings that a GGUF's keys do not carry back to transformers' reader, which gives them its config's defaults:
    written anyway, the file would load as another model. Released Gemma 3 models up to 12B, Gemma 2 2B and 9B, and
    Phi-3 mini and medium (4k) have none of them."""
    if config.model_type == "gemma3_text":
        head_dim = config.head_dim
        return [
            *([f"query_pre_attn_scalar {config.query_pre_attn_scalar} (not its head size {head_dim})"]
              if config.query_pre_attn_scalar != head_dim else []),
            *([f"final logit soft-capping {config.final_logit_softcapping}"] if config.final_logit_softcapping else []),
            *([f"attention logit soft-capping {config.attn_logit_softcapping}"]
              if config.attn_logit_softcapping else []),
        ]  # fmt: skip
    if config.model_type == "gemma2":
        from transformers import Gemma2Config

        read_back = Gemma2Config()  # what the reader gives the settings no key carries
        lost = [
            f"{name} {getattr(config, name)} (a GGUF reads back {getattr(read_back, name)})"
            for name in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping")
            if getattr(config, name) != getattr(read_back, name)
        ]
        if config.query_pre_attn_scalar != config.head_dim:  # llama.cpp scales queries by the head size
            lost.append(f"query_pre_attn_scalar {config.query_pre_attn_scalar} (not its head size {config.head_dim})")
        return lost
    if config.model_type == "phi3" and getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        return [f"partial_rotary_factor {config.partial_rotary_factor}"]
    return []


def _rope(config: Any) -> dict:
    """The rotary settings of the model's (global) attention layers: Gemma 3 keeps one set per layer type."""
    rope = getattr(config, "rope_parameters", None) or {}
    return rope.get("full_attention", rope)


def _load_tokenizer(model_dir: Path) -> Any:
    # Not `load_tokenizer`: that adds a pad token for batching, and the file should state the model's own tokens.
    from transformers import AutoTokenizer

    from tunesmith.models.loading import quiet_transformers

    with quiet_transformers():
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)


def _add_architecture(writer: Any, config: Any, dtype: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = _rope(config)
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_file_type(file_types[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
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
    gemma = config.model_type in GEMMA  # readers take Gemma's head size (256 by default) from the file
    if gemma or head_dim * config.num_attention_heads != config.hidden_size:  # else llama.cpp assumes hidden/heads
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    # The local layers' window (llama.cpp: Gemma 2's every other layer, Gemma 3's five of six; Phi-3's every layer)
    if (gemma or config.model_type == "phi3") and getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
    if config.model_type == "gemma2":  # llama.cpp reads them; transformers' reader takes its defaults (checked above)
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


def describe_model(name: str, base_model: str | None, parameters: int) -> Any:
    """The file's general.* keys: its name and size, and the model it was tuned from (name, where it is
    published, its license when it is a built-in model) when `base_model` names one."""
    import gguf

    from tunesmith.models.catalog import CATALOG
    from tunesmith.models.model_card import is_hub_id

    entry = next((entry for entry in CATALOG.values() if base_model in (entry.name, entry.hub_id)), None)
    hub_id = entry.hub_id if entry else base_model if base_model and is_hub_id(base_model) else None
    base = None
    if hub_id:
        organization, base_name = hub_id.split("/")
        base = {"name": base_name, "organization": organization, "repo_url": f"https://huggingface.co/{hub_id}"}
    elif base_model:
        base = {"name": Path(base_model).name}
    return gguf.Metadata(
        name=name,
        basename=base["name"] if base else name,
        finetune=name if base else None,
        size_label=gguf.size_label(parameters, 0, 0, 0),
        license=entry.license if entry else None,
        base_models=[base] if base else None,
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
        raise UserError(
            f"model directory '{model_dir}' has no *.safetensors weights; fix: point at a directory "
            f"written by save_pretrained (tunesmith export --to merged writes one)"
        )
    return files


def _gguf_tensor_names(
    model_dir: Path, config: Any, shapes: dict[str, list[int]], family: GGUFFamily
) -> dict[str, str]:
    """HF tensor name -> llama.cpp tensor name, for every tensor the file will hold (the gguf package's map for
    the family's architecture)."""
    import gguf

    architecture = next(arch for arch, name in gguf.MODEL_ARCH_NAMES.items() if name == family.architecture)
    name_map = gguf.get_tensor_name_map(architecture, config.num_hidden_layers)
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
        raise UserError(
            f"model '{model_dir}' has tensors a {family.architecture} GGUF has no place for: "
            f"{', '.join(unplaced[:5])}; "
            f"fix: export --to merged and convert it with llama.cpp's convert_hf_to_gguf.py"
        )
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


def tensor_type(gguf_name: str, shape: list[int], dtype: str) -> Any:
    """The GGML type a tensor is stored as, following llama.cpp's converter: 1-D tensors and norms stay f32
    (llama.cpp computes with them in f32); a tensor whose rows do not divide into quantization blocks (32 values
    for q8_0) falls back to f16, as convert_hf_to_gguf.py does on gguf's QuantError."""
    import gguf

    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or dtype == "f32":
        return gguf.GGMLQuantizationType.F32
    if dtype == "f16":
        return gguf.GGMLQuantizationType.F16
    quantized = gguf.GGMLQuantizationType.Q8_0
    block_size, _ = gguf.GGML_QUANT_SIZES[quantized]
    return quantized if shape[-1] % block_size == 0 else gguf.GGMLQuantizationType.F16
