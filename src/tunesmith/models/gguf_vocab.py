"""A byte-level BPE tokenizer as the `tokenizer.ggml.*` keys llama.cpp reads (and Ollama, LM Studio with it).

llama.cpp does not run the Hugging Face tokenizer: it re-implements each known way of splitting text before
BPE (a "pre-tokenizer") and picks one by the name in `tokenizer.ggml.pre`; a name it does not know stops
the model loading ("unknown pre-tokenizer type"). The name is chosen here the two ways llama.cpp's own
converter (`convert_hf_to_gguf.py`, `get_vocab_base_pre`) and loader (`src/llama-vocab.cpp`) allow:

1. by fingerprint: the sha256 of the token ids the tokenizer gives for llama.cpp's check text. A tokenizer
   the converter knows (SmolLM's, Llama 3's, GPT-2's, ...) gets the very name the converter writes.
2. by structure: the pre-tokenizer steps in tokenizer.json (a byte-level regex, digits split one by one,
   a Split by a known regex) matched against the splits llama.cpp implements under a name.

Anything else is refused: a file llama.cpp cannot load, or one that tokenizes differently, helps no one.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from tunesmith.errors import UserError

# llama.cpp's check text and the fingerprints of tokenizers it knows, from `get_vocab_base_pre` in
# convert_hf_to_gguf.py (conversion/base.py in llama.cpp as vendored by llama-cpp-python 0.3.36): the
# Llama-architecture byte-level families, each with the model the converter took the fingerprint from.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
    "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 "
    "3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= \u043d\u0435\u0449\u043e \u043d\u0430 "
    "\u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 ''''''```````\"\"\"\"......!!!!!!?????? I've been "
    "'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_TOKENIZER_FINGERPRINTS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",  # bigcode/starcoder2-3b
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
}

# Pre-tokenizer steps, as `_pre_tokenizer_steps` describes them: GPT-2's regex (what ByteLevel applies with
# use_regex), each digit on its own (Digits with individual_digits), or a Split by a regex.
_GPT2_REGEX_STEP = "byte-level GPT-2 regex"
_DIGITS_STEP = "single digits"


def _split_step(llama_cpp_name: str) -> tuple[str, str]:
    # transformers' GGUF reader keeps, per llama.cpp name, the Hugging Face regex that name stands for.
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    return ("split", GGUF_PRE_TOKENIZER_SPLITS[llama_cpp_name])


def _families() -> list[tuple[str, tuple, bool]]:
    """(llama.cpp name, the steps it implements, whether it cleans up spaces when detokenizing).

    Several llama.cpp names share one split and differ only in `clean_spaces` (src/llama-vocab.cpp); the
    names here are the long-standing ones, so older llama.cpp builds (Ollama's, LM Studio's) know them too.
    """
    return [
        ("gpt-2", (_GPT2_REGEX_STEP,), True),
        ("smollm", (_DIGITS_STEP, _GPT2_REGEX_STEP), False),
        ("starcoder", (_DIGITS_STEP, _GPT2_REGEX_STEP), True),
        ("llama-bpe", (_split_step("llama-bpe"),), True),
        ("qwen2", (_split_step("qwen2"),), False),
        ("gpt-4o", (_split_step("gpt-4o"),), False),
    ]


def written_pre_tokenizer_names() -> set[str]:
    """Every name this module may write as `tokenizer.ggml.pre`."""
    return set(KNOWN_TOKENIZER_FINGERPRINTS.values()) | {name for name, _, _ in _families()}


def llama_cpp_pre_tokenizer(tokenizer: Any) -> str:
    """llama.cpp's name for how `tokenizer` splits text before BPE, or a UserError saying what to do instead."""
    fingerprint = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if fingerprint in KNOWN_TOKENIZER_FINGERPRINTS:
        return KNOWN_TOKENIZER_FINGERPRINTS[fingerprint]
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    steps = _pre_tokenizer_steps(backend.get("pre_tokenizer"))
    normalizer = (backend.get("normalizer") or {}).get("type")
    matches = [(name, clean) for name, family_steps, clean in _families() if family_steps == steps]
    if steps is None or not matches or normalizer not in (None, "NFC"):
        raise UserError(
            f"llama.cpp has no pre-tokenizer that splits text the way this tokenizer does (pre_tokenizer "
            f"{json.dumps(backend.get('pre_tokenizer'))[:200]}, normalizer {normalizer}), so a GGUF of it would "
            f"not load or would tokenize differently; fix: export --to merged and convert that directory with "
            f"llama.cpp's convert_hf_to_gguf.py (it knows more tokenizers, by their fingerprint)"
        )
    # Detokenizing: llama.cpp removes the space before punctuation only under names with clean_spaces.
    cleans = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
    return next((name for name, clean in matches if clean == cleans), matches[0][0])


def _pre_tokenizer_steps(pre_tokenizer: dict | None) -> tuple | None:
    """The splitting steps of a tokenizer.json pre_tokenizer, or None when one is not a plain split."""
    if pre_tokenizer is None:
        return ()
    kind = pre_tokenizer.get("type")
    if kind == "Sequence":
        parts = [_pre_tokenizer_steps(part) for part in pre_tokenizer.get("pretokenizers", [])]
        return None if any(part is None for part in parts) else tuple(step for part in parts for step in part)
    if kind == "ByteLevel":
        return (_GPT2_REGEX_STEP,) if pre_tokenizer.get("use_regex", True) else ()
    if kind == "Digits" and pre_tokenizer.get("individual_digits"):
        return (_DIGITS_STEP,)
    pattern = (pre_tokenizer.get("pattern") or {}).get("Regex")
    if kind == "Split" and pattern and pre_tokenizer.get("behavior") == "Isolated" and not pre_tokenizer.get("invert"):
        return (("split", pattern),)
    return None


def add_tokenizer(writer: Any, tokenizer: Any, model_dir: Path, vocab_size: int, architecture: str = "llama") -> None:
    """Write `tokenizer` (from `model_dir`) as llama.cpp's "gpt2" (byte-level BPE) vocabulary, or, for a
    SentencePiece-style one (Gemma's), as its "llama" vocabulary."""
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    sentencepiece = is_sentencepiece(backend)
    if not sentencepiece and (
        backend["model"]["type"] != "BPE" or "ByteLevel" not in json.dumps(backend.get("pre_tokenizer"))
    ):
        raise UserError(
            f"the tokenizer is {backend['model']['type']} without byte-level pre-tokenization; tunesmith's GGUF export "
            f"writes byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM style) and SentencePiece-style BPE ones "
            f"(Gemma's); fix: export --to merged and convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    tokens, types = _tokens_and_types(tokenizer, vocab_size)
    if sentencepiece:
        _add_sentencepiece(writer, tokens, types, spaces_spelled_out=architecture.startswith("gemma"))
        writer.add_add_space_prefix(False)  # the normalizer only turns spaces into ▁; it prepends none
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(llama_cpp_pre_tokenizer(tokenizer))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        # gguf's own reader of tokenizer.json: merges in the form llama.cpp expects (spaces inside a merge escaped).
        writer.add_token_merges(gguf.SpecialVocab(model_dir, load_merges=True, special_token_types=()).merges)
    _add_special_tokens(writer, tokenizer)
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: GGUF stores them as a list
        template = [{"name": name, "template": text} for name, text in template.items()]
    if template:
        writer.add_chat_template(template)


def is_sentencepiece(backend: dict) -> bool:
    """A SentencePiece vocabulary as tokenizers spells it: BPE over ▁-for-space text, unknown bytes as <0xXX>."""
    model, normalizer = backend["model"], json.dumps(backend.get("normalizer"), ensure_ascii=False)
    return model["type"] == "BPE" and bool(model.get("byte_fallback")) and "\u2581" in normalizer


def _add_sentencepiece(writer: Any, tokens: list[str], types: list[int], spaces_spelled_out: bool) -> None:
    """llama.cpp's "llama" vocabulary: the tokens with their types and scores. llama.cpp merges the adjacent pair
    whose token scores highest, and a SentencePiece BPE vocabulary lists its tokens best-first, so each normal
    token scores minus its rank; control and user-defined tokens score -1000 and byte tokens 0, as SentencePiece's
    own files have them. Gemma's files spell its whitespace-only tokens with real spaces, as user-defined tokens."""
    import gguf

    scores, rank = [], 0
    for index, token in enumerate(tokens):
        if types[index] == gguf.TokenType.NORMAL and BYTE_TOKEN.fullmatch(token):
            types[index] = gguf.TokenType.BYTE
        elif spaces_spelled_out and len(token) > 1 and set(token) == {"\u2581"}:
            types[index] = gguf.TokenType.USER_DEFINED  # llama.cpp matches these runs of spaces in the text itself
        if types[index] == gguf.TokenType.NORMAL:
            scores.append(-float(rank))
            rank += 1
        else:
            scores.append(0.0 if types[index] == gguf.TokenType.BYTE else -1000.0)
    if spaces_spelled_out:
        tokens = [" " * len(token) if len(token) > 1 and set(token) == {"\u2581"} else token for token in tokens]
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)


BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")


def _tokens_and_types(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every embedding row's token and its llama.cpp type: special added tokens are CONTROL (never produced
    by tokenizing plain text, hidden when detokenizing), other added tokens USER_DEFINED, the rest NORMAL."""
    import gguf

    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise UserError(
            f"the tokenizer has {max(by_id) + 1} tokens but the model only {vocab_size} embedding rows; "
            f"fix: resize the model's token embeddings to the tokenizer before exporting"
        )
    added = tokenizer.added_tokens_decoder  # {id: AddedToken}
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:  # embedding rows past the tokenizer (vocabularies padded to a multiple of 64)
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[index])
            types.append(
                gguf.TokenType.NORMAL
                if index not in added
                else gguf.TokenType.CONTROL
                if added[index].special
                else gguf.TokenType.USER_DEFINED
            )
    return tokens, types


def _add_special_tokens(writer: Any, tokenizer: Any) -> None:
    for token_id, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.unk_token_id, writer.add_unk_token_id),
        (tokenizer.sep_token_id, writer.add_sep_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
    ):
        if token_id is not None:
            add(token_id)
    # Whether encoding adds BOS/EOS is behaviour, not a setting every tokenizer exposes: observe it, and state
    # it either way, since llama.cpp's default differs by pre-tokenizer (Llama 3's adds BOS unless told not to).
    encoded = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and encoded[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and encoded[-1:] == [tokenizer.eos_token_id])
