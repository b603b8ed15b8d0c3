"""The real default model, fine-tuned, exported as GGUF (f32, q8_0) and for Ollama, run by llama.cpp itself.

Outside the default suite (marker llama_cpp): needs llama-cpp-python (`bash bench/llama_cpp.sh` builds and installs
it) and the cached default model (`tunesmith models pull smollm2-135m-instruct`); skips cleanly without either.
Each export is compared with the merged model in transformers: tokenisation of strings that exercise the
pre-tokenizer and special tokens, greedy replies to five prompts, and the largest logit difference over every
prompt position. q4_k_m is not written by tunesmith (the gguf package has no K-quant quantizer; see
test_gguf_export.py), so it has no row here.

    OMP_NUM_THREADS=2 python3 -m pytest -m llama_cpp tests/test_gguf_llama_cpp.py -s   # -s prints the table
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_gguf_export import expected_prompt, ollama_prompt, read_fields, read_modelfile

pytestmark = pytest.mark.llama_cpp
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: bash bench/llama_cpp.sh")

MODEL = "smollm2-135m-instruct"
REAL_HOME = Path(os.environ.get("TUNESMITH_HOME", "~/.tunesmith")).expanduser()  # before conftest isolates each test
SYSTEM_PROMPT = "You are a concise assistant for a bank's support desk."
NEW_TOKENS = 16
PROMPTS = [
    "What is the capital of France?",
    "My card has not arrived yet. What should I do?",
    "Write a haiku about autumn.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
]
# Against transformers' float32 merged model: the largest |logit difference| over every prompt position, how many
# of the five greedy replies (16 tokens) must match token for token, and the share of prompt positions whose top
# token must match. f32: the same weights, other kernels (llama.cpp sums in another order). q8_0: 8-bit weights
# (alone, through transformers: 0.9 on logits spanning +-39), and llama.cpp also rounds activations to 8 bits in
# its matrix products, so logits move by up to ~2 and a 135M model's near-ties send replies elsewhere after a
# few tokens (measured: 2/5 whole replies, 92% of top tokens; llama.cpp's own quantizer writes the same bytes, see
# test_q8_0_is_what_llama_cpps_own_quantizer_writes). A file in a wrong layout scores ~0% and logits ~30.
TOLERANCES = {"f32": (0.1, 5, 0.99), "q8_0": (3.0, 1, 0.85), "ollama": (0.1, 5, 0.99)}
RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """A LoRA run around the real base (seeded, small random B, so the merge changes every linear layer), its
    merged model, and its GGUF (f32, q8_0) and Ollama exports."""
    from tunesmith.models.catalog import CATALOG

    if not (REAL_HOME / "models" / MODEL / "config.json").is_file():
        pytest.skip(f"{MODEL} is not cached under {REAL_HOME}: tunesmith models pull {MODEL}")
    directory = tmp_path_factory.mktemp("interop")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TUNESMITH_HOME", str(REAL_HOME))
        run = lora_run_around_base(directory / "run")
        from tunesmith.models.export import export_run

        files = {
            "merged": export_run(run, "merged", directory / "merged"),
            "f32": export_run(run, "gguf", directory / "model-f32.gguf"),
            "q8_0": export_run(run, "gguf", directory / "model-q8_0.gguf", dtype="q8_0"),
            "ollama": export_run(run, "ollama", directory / "ollama"),
        }
    assert CATALOG[MODEL].hub_id  # the base the files name
    return files


def lora_run_around_base(run: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    from tunesmith.models import load_model

    base, _ = load_model(MODEL)
    torch.manual_seed(0)  # LoRA's A matrices draw from the global generator: the same run every time
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data = torch.randn(parameter.shape) * 0.01
    model.save_pretrained(run / "adapter")
    config = {
        "model": MODEL,
        "adapter": {"type": "lora", "r": 8, "alpha": 16},
        "data": {"train": str(run / "train.jsonl"), "system_prompt": SYSTEM_PROMPT},  # a run names its data
        "output_dir": str(run),
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


@pytest.fixture(scope="module")
def reference(exports):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(exports["merged"])
    return AutoModelForCausalLM.from_pretrained(exports["merged"]).eval(), tokenizer


def gguf_file(exports: dict[str, Path], kind: str) -> Path:
    return exports["ollama"] / "model.gguf" if kind == "ollama" else exports[kind]


def tokenisation_cases(tokenizer) -> list[str]:
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True
    )
    return [
        "Hello world",
        "1234567 + 89 = 3.14159, 2024-05-01",
        "naïve café — 日本語 🦙 Ünïcödé",
        "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
        "  leading spaces\n\n\ttabs  \n",
        chat,
        "I've been 'told he's there, 'RE you sure?",
        "def square(x):\n    return x ** 2  # why not",
    ]


def prompt_ids(kind: str, exports: dict[str, Path], tokenizer, llm, question: str) -> list[int]:
    """The token ids a runtime feeds the model: the chat template with the run's system prompt, as training
    rendered it; for Ollama, the Modelfile's TEMPLATE and SYSTEM as Ollama renders them, tokenized by llama.cpp."""
    messages = [{"role": "user", "content": question}]
    text = expected_prompt(tokenizer, messages, SYSTEM_PROMPT)
    if kind != "ollama":
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    rendered = ollama_prompt(read_modelfile(exports["ollama"] / "Modelfile"), messages)
    assert rendered == text
    ids = llm.tokenize(rendered.encode(), add_bos=True, special=True)  # as Ollama does: special tokens parsed
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


@dataclass
class Agreement:
    """How llama.cpp runs a file against transformers' model."""

    file_mb: float
    same_tokens: int
    cases: int
    same_replies: int
    prompts: int
    same_top_tokens: int
    positions: int
    largest_difference: float

    def row(self) -> dict:
        return {
            "file MB": round(self.file_mb, 1),
            "tokenisation": f"{self.same_tokens}/{self.cases}",
            "greedy": f"{self.same_replies}/{self.prompts}",
            "top-1": f"{self.same_top_tokens}/{self.positions}",
            "max |Δlogit|": round(self.largest_difference, 4),
        }

    def check(self, logit_tolerance: float, replies_needed: int, top_share_needed: float) -> None:
        assert self.same_tokens == self.cases, self.row()
        assert self.same_replies >= replies_needed, self.row()
        assert self.same_top_tokens >= top_share_needed * self.positions, self.row()
        assert self.largest_difference <= logit_tolerance, self.row()


def agreement(
    path: Path, llm, model, tokenizer, cases: list[str], prompts: list[list[int]], stop_ids: set[int]
) -> Agreement:
    """Tokenisation of `cases`, greedy replies to each prompt (NEW_TOKENS tokens), top-1 agreement and the largest
    |logit difference| over every prompt position, llama.cpp against transformers."""
    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    same_tokens = sum(
        vocab.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text)["input_ids"] for text in cases
    )
    same_replies, same_top_tokens, positions, largest_difference = 0, 0, 0, 0.0
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0].numpy()
            reply = model.generate(
                torch.tensor([ids]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=sorted(stop_ids),
                pad_token_id=tokenizer.pad_token_id,
            )
        actual = np.asarray(llm.scores[: len(ids)])
        largest_difference = max(largest_difference, float(np.abs(actual - expected).max()))
        same_top_tokens += int((actual.argmax(axis=1) == expected.argmax(axis=1)).sum())
        positions += len(ids)
        expected_reply = reply[0, len(ids) :].tolist()
        stop_at = next((at for at, token in enumerate(expected_reply) if token in stop_ids), None)
        expected_reply = expected_reply[:stop_at]
        same_replies += greedy_llama_cpp(llm, ids, stop_ids) == expected_reply
    return Agreement(
        path.stat().st_size / 1e6, same_tokens, len(cases), same_replies, len(prompts), same_top_tokens, positions,
        largest_difference,
    )  # fmt: skip


def greedy_llama_cpp(llm, ids: list[int], stop_ids: set[int]) -> list[int]:
    reply = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if token in stop_ids or len(reply) == NEW_TOKENS:
            break
        reply.append(token)
    return reply


@pytest.mark.parametrize("kind", ["f32", "q8_0", "ollama"])
def test_llama_cpp_runs_the_export_as_transformers_runs_the_merged_model(exports, reference, kind):
    model, tokenizer = reference
    path = gguf_file(exports, kind)
    fields = read_fields(path)
    assert fields["tokenizer.ggml.pre"] == "smollm"  # llama.cpp's converter names SmolLM2's tokenizer so
    assert SYSTEM_PROMPT in fields["tokenizer.chat_template"]  # the template carries the run's system prompt

    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=512, n_threads=2, seed=0, verbose=False)
    stop_ids = {tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])}
    prompts = [prompt_ids(kind, exports, tokenizer, llm, question) for question in PROMPTS]
    result = agreement(path, llm, model, tokenizer, tokenisation_cases(tokenizer), prompts, stop_ids)
    RESULTS[kind] = result.row()
    result.check(*TOLERANCES[kind])


def test_llama_cpp_runs_the_gemma_export_as_transformers_runs_the_model(tmp_path):
    """The second built-in model, Gemma 3 (SentencePiece vocabulary, norms stored plus one, sliding windows), as
    tunesmith writes it, in llama.cpp against transformers: its tokens, greedy replies and logits."""
    from tunesmith.models import load_model
    from tunesmith.models.gguf_export import write_gguf

    directory = REAL_HOME / "models" / "gemma3-270m"
    if not (directory / "config.json").is_file():
        pytest.skip(f"gemma3-270m is not cached under {REAL_HOME}: tunesmith models pull gemma3-270m")
    path = write_gguf(directory, tmp_path / "gemma3-270m.gguf")
    model, tokenizer = load_model(str(directory))
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=512, n_threads=2, seed=0, verbose=False)
    stop_ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")}
    prompts = [
        tokenizer(
            tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                          add_generation_prompt=True),
            add_special_tokens=False,
        )["input_ids"]
        for question in PROMPTS
    ]  # fmt: skip
    result = agreement(path, llm, model.eval(), tokenizer, tokenisation_cases(tokenizer), prompts, stop_ids)
    RESULTS["gemma3-270m f32"] = result.row()
    result.check(*TOLERANCES["f32"])


def test_llama_cpp_runs_a_gemma2_export_as_transformers_does(tmp_path):
    """Gemma 2 (no built-in model: a tiny one built in code, with the released soft caps and query scaling, a window
    of 4 on every other layer and a SentencePiece vocabulary) as tunesmith writes it, in llama.cpp: the same tokens,
    and logits within 1e-3 of the largest over every position of a 40-token text."""
    from conftest import CORPUS
    from test_architectures import save_family
    from test_gguf_export import GEMMA_AS_RELEASED, sentencepiece_tokenizer

    from tunesmith.models import load_model
    from tunesmith.models.gguf_export import write_gguf

    tokenizer = sentencepiece_tokenizer()
    settings = dict(GEMMA_AS_RELEASED["gemma2"], tie_word_embeddings=True, pad_token_id=0)
    directory = save_family("gemma2", tmp_path / "tiny-gemma2", tokenizer, **settings)
    model, _ = load_model(str(directory))
    path = write_gguf(directory, tmp_path / "gemma2.gguf")
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=128, n_threads=2, seed=0, verbose=False)
    text = " ".join(CORPUS[:8])
    ids = tokenizer(text)["input_ids"][:40]
    assert llm.tokenize(text.encode(), add_bos=True, special=True)[:40] == ids
    assert len(ids) > 4 * model.config.sliding_window  # the window matters on these positions
    llm.eval(ids)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    got = np.array(llm.scores[: len(ids)])
    assert np.abs(got - expected).max() <= 1e-3 * np.abs(expected).max()
    assert (got.argmax(-1) == expected.argmax(-1)).all()


GO_RENDERER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

// Executes a TEMPLATE the way Ollama's template.Execute does for a .Messages template.
func main() {
	var input struct {
		Template string
		Data     map[string]any
	}
	if err := json.NewDecoder(os.Stdin).Decode(&input); err != nil {
		panic(err)
	}
	parsed := template.Must(template.New("").Option("missingkey=zero").Parse(input.Template))
	if err := parsed.Execute(os.Stdout, input.Data); err != nil {
		panic(err)
	}
}
"""


def test_go_itself_renders_the_ollama_template_as_the_test_reader_does(exports, tmp_path):
    """Cross-check of tests/go_template.py against Go's own text/template, where a Go toolchain is installed."""
    from go_template import render

    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain (apt-get install golang-go) to cross-check the TEMPLATE reader")
    (tmp_path / "render.go").write_text(GO_RENDERER)
    modelfile = read_modelfile(exports["ollama"] / "Modelfile")
    conversations = [
        [{"Role": "system", "Content": SYSTEM_PROMPT}, {"Role": "user", "Content": "hi"}],
        [
            {"Role": "system", "Content": "S"},
            {"Role": "user", "Content": "a"},
            {"Role": "assistant", "Content": "b"},
            {"Role": "user", "Content": "c"},
        ],
        [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": "b"}],
    ]
    for messages in conversations:
        data = {"Messages": messages, "System": ""}
        result = subprocess.run(
            [go, "run", str(tmp_path / "render.go")],
            input=json.dumps({"Template": modelfile["TEMPLATE"], "Data": data}),
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "GOCACHE": str(tmp_path / "gocache")},
            cwd=tmp_path,
        )
        assert result.stdout == render(modelfile["TEMPLATE"], data)


def test_q8_0_is_what_llama_cpps_own_quantizer_writes(exports, tmp_path):
    """The q8_0 drift above is Q8_0's own: llama.cpp's quantizer (llama_model_quantize, what llama-quantize runs),
    given the f32 export, writes every tensor with the same type and the same bytes as tunesmith's q8_0 export."""
    import ctypes

    import gguf

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    theirs = tmp_path / "llama-quantize-q8_0.gguf"
    assert llama_cpp.llama_model_quantize(str(exports["f32"]).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    ours = {tensor.name: tensor for tensor in gguf.GGUFReader(exports["q8_0"]).tensors}
    reference = {tensor.name: tensor for tensor in gguf.GGUFReader(theirs).tensors}
    assert sorted(ours) == sorted(reference)
    differing = [
        name
        for name, tensor in ours.items()
        if tensor.tensor_type != reference[name].tensor_type
        or not np.array_equal(np.asarray(tensor.data), np.asarray(reference[name].data))
    ]
    assert not differing, f"{len(differing)} of {len(ours)} tensors differ from llama.cpp's, e.g. {differing[:3]}"


def test_print_the_interop_table():
    if not RESULTS:
        pytest.skip("no export was run")
    columns = ["file MB", "tokenisation", "greedy", "top-1", "max |Δlogit|"]
    print("\n| export | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for kind, row in RESULTS.items():
        print(f"| {kind} | " + " | ".join(str(row[column]) for column in columns) + " |")
