"""What users have, served as OpenAI serves it (issue 21): the developer role and text parts, every SDK parameter
supported or refused by name, token-id prompts, echo with prompt logprobs, run directories, checkpoint models,
and training files kept from read keys. Through the official `openai` SDK against a live app on a tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import build_model_dir
from service_fixtures import live_app, make_key

openai = pytest.importorskip("openai")

SYSTEM_PROMPT = "You answer as a terse bank clerk."
GREEDY = {"temperature": 0, "max_tokens": 6}


def lora_dir(model_dir: Path, directory: Path, seed: int) -> Path:
    """A LoRA adapter of the tiny model with random (not zero) B matrices: it changes what the model writes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"
    )
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """Finished run directories as `tunesmith train` leaves them: a LoRA run (adapter/) and a full one (model/)."""
    adapter_run = tmp_path_factory.mktemp("run-lora")
    lora_dir(tiny_model, adapter_run / "adapter", seed=3)
    (adapter_run / "config.yaml").write_text(
        json.dumps({"model": str(tiny_model), "data": {"train": "t.jsonl", "system_prompt": SYSTEM_PROMPT}})
    )
    full_run = tmp_path_factory.mktemp("run-full")
    build_model_dir(full_run / "model", seed=5)
    (full_run / "config.yaml").write_text(json.dumps({"model": str(tiny_model), "data": {"train": "t.jsonl"}}))
    return {"lora": adapter_run, "full": full_run}


@pytest.fixture(scope="module")
def site(tiny_model, runs, tmp_path_factory):
    """A live service with the tiny base, both runs, a fine-tuned job with a checkpoint, and keys of each scope."""
    from tunesmith.serve.service import Service, Settings

    home = tmp_path_factory.mktemp("parity") / "home"
    service = Service(
        Settings(
            home=home,
            base_models={"tiny": str(tiny_model), "lora-run": str(runs["lora"]), "full-run": str(runs["full"])},
        )
    )
    keys = {scope: make_key(service, "acme", scope) for scope in ("read", "write")}
    keys["other"] = make_key(service, "globex", "write")
    with live_app(service, worker=False) as base_url:
        yield service, base_url, keys
    service.store.close()


def api(site, scope: str = "read"):
    service, base_url, keys = site
    return openai.OpenAI(api_key=keys[scope], base_url=base_url, max_retries=0, timeout=60)


def direct_reply(engine, messages: list[dict], max_tokens: int = 6) -> tuple[str, int]:
    """(greedy reply, prompt token count) of a conversation, loading the model directly."""
    from tunesmith.engine.generation import Sampling

    prompt = engine.chat.prompt_ids(messages)
    ids = engine.generate_ids(prompt, Sampling(max_new_tokens=max_tokens, temperature=0))
    return engine.tokenizer.decode(ids, skip_special_tokens=True), len(prompt)


def test_developer_role_and_text_parts_are_read_as_system_and_joined_text(site, tiny_model):
    from tunesmith.engine.generation import Engine

    reply = api(site).chat.completions.create(
        model="tiny",
        **GREEDY,
        messages=[
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "my card"}, {"type": "text", "text": "has not arrived"}],
                "name": "ann",
            },
        ],
    )
    text, prompt_tokens = direct_reply(
        Engine.load(str(tiny_model)),
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "my card\nhas not arrived"}],
    )
    assert reply.usage.prompt_tokens == prompt_tokens and reply.choices[0].message.content == text


def test_a_non_text_content_part_is_a_400_naming_the_part(site):
    with pytest.raises(openai.BadRequestError) as error:
        api(site).chat.completions.create(
            model="tiny",
            **GREEDY,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    ],
                }
            ],
        )
    assert error.value.body["param"] == "messages[0].content[1]" and "image_url" in error.value.body["message"]


CHAT_REFUSED = {
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "tool_choice": "auto",
    "functions": [{"name": "f"}],
    "function_call": "auto",
    "parallel_tool_calls": True,
    "response_format": {"type": "json_object"},
    "presence_penalty": 0.5,
    "frequency_penalty": 0.5,
    "logit_bias": {"5": 10},
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"},
    "web_search_options": {},
    "reasoning_effort": "low",
    "verbosity": "low",
    "store": True,
    "service_tier": "flex",
    "top_logprobs": 3,  # top_logprobs without logprobs
}
COMPLETION_REFUSED = {"suffix": "tail", "best_of": 3, "presence_penalty": 1.0, "logit_bias": {"5": 10}}


@pytest.mark.parametrize("param", list(CHAT_REFUSED))
def test_each_unsupported_chat_parameter_is_a_400_naming_it(site, param):
    with pytest.raises(openai.BadRequestError) as error:
        api(site).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], **GREEDY, **{param: CHAT_REFUSED[param]}
        )
    assert error.value.body["param"] == param and param in error.value.body["message"]
    assert "fix:" in error.value.body["message"]


@pytest.mark.parametrize("param", list(COMPLETION_REFUSED))
def test_each_unsupported_completion_parameter_is_a_400_naming_it(site, param):
    with pytest.raises(openai.BadRequestError) as error:
        api(site).completions.create(model="tiny", prompt="hello", **GREEDY, **{param: COMPLETION_REFUSED[param]})
    assert error.value.body["param"] == param and "fix:" in error.value.body["message"]


def test_unknown_arguments_and_prompt_batches_are_refused_by_name(site):
    client = api(site)
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], **GREEDY, extra_body={"guided_json": {}}
        )
    assert error.value.body["param"] == "guided_json" and "Unrecognized request argument" in error.value.body["message"]
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model="tiny", prompt=["one", "two"], **GREEDY)
    assert error.value.body["param"] == "prompt" and "one request per prompt" in error.value.body["message"]


def test_faithful_no_op_parameters_are_accepted(site):
    reply = api(site).chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        **GREEDY,
        user="u-1",
        metadata={"team": "a"},
        store=False,
        service_tier="auto",
        safety_identifier="s",
        prompt_cache_key="k",
        frequency_penalty=0,
        response_format={"type": "text"},
        tool_choice="none",
        modalities=["text"],
    )
    assert reply.choices[0].message.role == "assistant"


def test_prompt_of_token_ids_is_parsed_and_checked_against_the_vocabulary(tiny_model):
    from tunesmith.engine.generation import Engine
    from tunesmith.serve.request import RequestError, parse_prompt, prompt_ids

    engine = Engine.load(str(tiny_model))
    ids = engine.tokenizer("the quick brown fox")["input_ids"]
    for prompt in (ids, [ids]):
        assert prompt_ids(engine, parse_prompt({"model": "tiny", "prompt": prompt})) == ids
    with pytest.raises(RequestError) as error:
        prompt_ids(engine, [1, 10**7])
    assert error.value.param == "prompt" and error.value.code == "invalid_token_id"


def test_echo_options_allow_max_tokens_zero_and_check_logprobs(tiny_model):
    from tunesmith.engine.generation import Engine
    from tunesmith.serve.request import Options, RequestError

    engine = Engine.load(str(tiny_model))
    options = Options.parse({"prompt": [1, 2], "echo": True, "logprobs": 2, "max_tokens": 0}, "tiny", chat=False)
    assert (options.echo, options.logprobs, options.sampling(engine, [1, 2], 16, "prompt").max_new_tokens) == (
        True,
        2,
        0,
    )
    chat = Options.parse({"messages": [], "logprobs": True, "top_logprobs": 4}, "tiny")
    assert (chat.logprobs, chat.top_logprobs, chat.echo) == (True, 4, False)
    for request, param in (
        ({"prompt": "x", "logprobs": 6}, "logprobs"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ):
        with pytest.raises(RequestError) as error:
            Options.parse(request, "tiny", chat=False)
        assert error.value.param == param


def direct_logprobs(model_dir: Path, ids: list[int], adapter: Path | None = None) -> torch.Tensor:
    """(T-1,) log-probabilities of tokens 1.. of `ids`, from plain transformers (+ PEFT)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_echo_scores_equal_direct_scoring_under_the_requests_adapter(tiny_model, runs):
    from tunesmith.serve.inference import AdapterPool, completion

    pool, base = AdapterPool(), str(tiny_model)
    ids = pool.engine(base).tokenizer("my card has not arrived yet")["input_ids"]
    adapter = runs["lora"] / "adapter"
    files = {name: (adapter / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}
    for key, loader, expected in (
        (None, None, direct_logprobs(tiny_model, ids)),
        ("a", lambda: files, direct_logprobs(tiny_model, ids, adapter)),
    ):
        reply = completion(pool, base, key, loader, {"prompt": ids, "echo": True, "logprobs": 3, "max_tokens": 0})
        shaped = reply["choices"][0]["logprobs"]
        assert shaped["token_logprobs"][0] is None and shaped["top_logprobs"][0] is None
        assert torch.allclose(torch.tensor(shaped["token_logprobs"][1:]), expected, atol=1e-4)
        assert "".join(shaped["tokens"]) == "my card has not arrived yet" == reply["choices"][0]["text"]
        assert shaped["text_offset"] == [len("".join(shaped["tokens"][:i])) for i in range(len(ids))]
        assert all(
            1 <= len(top) <= 3 and max(top.values()) >= logprob - 1e-6  # ids that decode alike share a key
            for top, logprob in zip(shaped["top_logprobs"][1:], shaped["token_logprobs"][1:])
        )


def test_token_id_prompt_with_echo_over_the_api_equals_direct_scoring(site, tiny_model):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_model)("the quick brown fox")["input_ids"]
    reply = api(site).completions.create(model="tiny", prompt=[ids], echo=True, logprobs=1, max_tokens=0)
    logprobs = reply.choices[0].logprobs
    assert reply.choices[0].text == "the quick brown fox" and logprobs.token_logprobs[0] is None
    assert torch.allclose(torch.tensor(logprobs.token_logprobs[1:]), direct_logprobs(tiny_model, ids), atol=1e-4)


@pytest.mark.parametrize("run", ["lora", "full"])
def test_a_run_directory_is_served_as_tunesmith_chat_loads_it(site, runs, run):
    from tunesmith.engine.generation import Engine

    messages = [{"role": "user", "content": "my card has not arrived"}]
    reply = api(site).chat.completions.create(model=f"{run}-run", messages=messages, **GREEDY)
    text, prompt_tokens = direct_reply(Engine.load(str(runs[run])), messages)  # the run's system prompt included
    assert reply.usage.prompt_tokens == prompt_tokens and reply.choices[0].message.content == text
    base = api(site).chat.completions.create(model="tiny", messages=messages, **GREEDY)
    assert base.choices[0].message.content != text  # the run's weights answered, not the base model's
    assert f"{run}-run" in [model.id for model in api(site).models.list()]


def test_a_run_directory_that_cannot_be_served_is_refused_at_startup(tiny_model, tmp_path):
    import argparse

    from tunesmith.cli_service import settings
    from tunesmith.errors import UserError

    unfinished, reward = tmp_path / "unfinished", tmp_path / "reward"
    data = {"train": "t.jsonl"}
    for directory, config in (
        (unfinished, {"model": str(tiny_model), "data": data}),
        (reward, {"model": str(tiny_model), "method": "reward", "data": data}),
    ):
        directory.mkdir()
        (directory / "config.yaml").write_text(json.dumps(config))
    shutil.copytree(tiny_model, reward / "model")
    for directory, words in ((unfinished, "has not finished"), (reward, "reward model")):
        args = argparse.Namespace(model=[f"mine={directory}"], database_url=None, home=str(tmp_path / "home"))
        with pytest.raises(UserError, match=words):
            settings(args)


def test_a_checkpoint_model_is_served_through_its_steps_adapter(site, tiny_model, tmp_path):
    from tunesmith.engine.generation import Engine

    service = site[0]
    job = service.store.add_job(
        "acme", model="tiny", training_file="file-x", method="supervised", hyperparameters={}, seed=0, suffix="cp"
    )
    service.store.add_checkpoint(job["id"], 10, {})
    adapter = lora_dir(tiny_model, tmp_path / "ckpt", seed=11)
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # stored as the worker stores a checkpoint's
        service.blobs.put_bytes(service.adapter_blob(job["id"], name, step=10), (adapter / name).read_bytes())
    name = next(iter(api(site).fine_tuning.jobs.checkpoints.list(job["id"]))).fine_tuned_model_checkpoint
    assert name == f"ft:tiny:cp:{job['id']}:ckpt-step-10"
    messages = [{"role": "user", "content": "hello"}]
    reply = api(site).chat.completions.create(model=name, messages=messages, **GREEDY)
    engine = Engine.load(str(tiny_model))
    from tunesmith.models.adapters import load_adapter

    engine = Engine(load_adapter(engine.model, adapter), engine.tokenizer, has_adapter=True)
    assert reply.choices[0].message.content == direct_reply(engine, messages)[0]
    base_reply = api(site).chat.completions.create(model="tiny", messages=messages, **GREEDY)
    assert reply.choices[0].message.content != base_reply.choices[0].message.content  # the step's adapter served
    for wrong, client in ((name.replace("step-10", "step-20"), api(site)), (name, api(site, "other"))):
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=wrong, messages=messages, **GREEDY)


def test_read_keys_cannot_download_training_files_but_can_read_results(site):
    service = site[0]
    data = b'{"messages": []}\n'
    training = service.store.add_file("acme", filename="t.jsonl", purpose="fine-tune", bytes=len(data), sha256="0" * 64)
    service.blobs.put_bytes(f"files/{training['id']}", data)
    results = service.add_result_file("acme", "report.json", b"{}")
    with pytest.raises(openai.PermissionDeniedError) as error:
        api(site, "read").files.content(training["id"])
    assert error.value.body["type"] == "permission_error" and "write" in error.value.body["message"]
    assert api(site, "write").files.content(training["id"]).read() == data
    assert api(site, "read").files.content(results).read() == b"{}"
