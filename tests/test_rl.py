"""RL (method grpo | ppo): advantages, GAE, the clipped losses and the KL estimate against hand-computed values;
prompt data and reward functions; both recipes end to end on a tiny model; exact resume; clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import CHATML, build_tokenizer
from safetensors.torch import load_file
from test_training import make_config, metric_lines, run, straight_and_resumed

from tunesmith import rundir
from tunesmith.data import prompts
from tunesmith.data.formats import RowError, convert_prompt, convert_prompt_messages, detect_format
from tunesmith.errors import UserError
from tunesmith.recipes.ppo import token_rewards
from tunesmith.registry import reward_functions
from tunesmith.train import policy, rl_math
from tunesmith.train import rollout as rollouts

PROMPTS = [
    {"prompt": f"{question} {i}", "answer": str(i)}
    for i, question in enumerate(
        [
            "my card has not arrived",
            "I lost my phone",
            "cancel a transfer",
            "what is the fee",
            "top up balance",
            "exchange rate",
            "refund please",
            "how are you",
        ]
    )
]
SPACES_REWARD = "def spaces(prompt, response, fields):\n    return response.count(' ') / 12\n"


def rl_config(tmp_path, model_dir, *overrides, rows=PROMPTS, name="run"):
    return make_config(tmp_path, model_dir, rows, "rl.max_new_tokens=12", *overrides, name=name)


def spaces_reward(tmp_path: Path) -> str:
    """A user's own reward function in a file of theirs: the share of spaces in the reply (learnable)."""
    path = tmp_path / "my_rewards.py"
    path.write_text(SPACES_REWARD)
    return f"rl.reward_functions=[{path}:spaces]"


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def build_reward_model(directory: Path) -> Path:
    """A tiny sequence classifier with one output, the shape of what `method: reward` trains."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = build_tokenizer(CHATML, "<|im_end|>")
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    LlamaForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_reward_model(tmp_path_factory) -> Path:
    return build_reward_model(tmp_path_factory.mktemp("tiny-reward-model"))


# ---------------------------------------------------------------------------------------------
# The math, against values worked out by hand.


def test_k3_kl_estimate():
    # d = log ref - log pi = -1: exp(-1) + 1 - 1; d = 0: 0; d = 2: e^2 - 3
    kl = rl_math.kl_k3(torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-2.0, -2.0, -1.0]))
    torch.testing.assert_close(kl, torch.tensor([math.exp(-1), 0.0, math.exp(2) - 3]))


def test_group_advantages():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    std = math.sqrt((1.5**2 + 0.5**2) * 2 / 3)  # unbiased, of 1 2 3 4
    expected = [-1.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4), 1.5 / (std + 1e-4), 0, 0, 0, 0]
    torch.testing.assert_close(rl_math.group_advantages(rewards, 4), torch.tensor(expected))
    centred = rl_math.group_advantages(rewards, 2, scale=False)  # groups (1, 2), (3, 4), (5, 5), (5, 5)
    torch.testing.assert_close(centred, torch.tensor([-0.5, 0.5, -0.5, 0.5, 0, 0, 0, 0]))


def test_gae():
    rewards, values = torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.5, 0.6, 0.7])
    advantages, returns = rl_math.gae(rewards, values, gamma=0.9, lam=0.8)
    # t=2: delta 1 - 0.7 = 0.3;  t=1: delta 0.9 * 0.7 - 0.6 = 0.03, A = 0.03 + 0.72 * 0.3 = 0.246;
    # t=0: delta 0.9 * 0.6 - 0.5 = 0.04, A = 0.04 + 0.72 * 0.246 = 0.21712
    torch.testing.assert_close(advantages, torch.tensor([0.21712, 0.246, 0.3]))
    torch.testing.assert_close(returns, torch.tensor([0.71712, 0.846, 1.0]))
    advantages, returns = rl_math.gae(rewards, values, gamma=1.0, lam=1.0)  # no discount: the return minus the value
    torch.testing.assert_close(advantages, torch.tensor([0.5, 0.4, 0.3]))
    torch.testing.assert_close(returns, torch.ones(3))


def test_clipped_policy_loss_and_its_gradient():
    ratios = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1])
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0])
    logprobs = ratios.log().requires_grad_()
    loss, clipped = rl_math.clipped_policy_loss(logprobs, torch.zeros(5), advantages, clip=0.2)
    # max(-A r, -A clip(r, 0.8, 1.2)): the clip binds where it makes the loss larger
    torch.testing.assert_close(loss, torch.tensor([-1.2, 1.5, -0.5, 0.8, -2.2]))
    assert clipped.tolist() == [True, False, False, True, False]
    loss.sum().backward()
    # d(-A r)/d log pi = -A r where the ratio is used; no gradient where the clipped constant is taken
    torch.testing.assert_close(logprobs.grad, torch.tensor([0.0, 1.5, -0.5, 0.0, -2.2]))


def test_clipped_value_loss():
    old, values = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.5, 1.5, 1.1])
    loss, clipped = rl_math.clipped_value_loss(values, old, torch.tensor([2.0, 1.0, 2.0]), clip=0.2)
    # V 1.5 is clipped to 1.2: R 2 -> max(0.25, 0.64) / 2; R 1 -> max(0.25, 0.04) / 2; V 1.1 within the clip
    torch.testing.assert_close(loss, torch.tensor([0.32, 0.125, 0.405]))
    assert clipped.tolist() == [True, False, False]


def test_whiten_and_explained_variance():
    white = rl_math.whiten(torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(white, torch.tensor([-1.0, 0.0, 1.0]))
    returns = torch.tensor([1.0, 2.0, 4.0])
    assert rl_math.explained_variance(returns, returns) == pytest.approx(1.0)
    assert rl_math.explained_variance(torch.zeros(3), returns) == pytest.approx(0.0)
    assert rl_math.explained_variance(returns.flip(0), returns) < 0


def test_ppo_token_rewards_put_the_score_on_the_last_token():
    rollout = rollouts.Rollout(
        prompts=[[1], [2]],
        replies=[[5, 6], [7]],
        texts=["a", "b"],
        rewards=torch.tensor([1.0, 3.0]),
        reward_parts={},
        logprobs=torch.tensor([-1.0, -2.0, -1.0]),
        entropy=torch.zeros(3),
        ref_logprobs=torch.tensor([-1.5, -2.0, -0.5]),
    )
    # -0.1 * (log pi - log ref) = [-0.05, 0, 0.05]; scores 1 and 3 on each reply's last token
    torch.testing.assert_close(token_rewards(rollout, 0.1), torch.tensor([-0.05, 1.0, 3.05]))


def test_split_and_token_positions():
    assert rollouts.split(list(range(5)), 2) == [[0, 1], [2, 3, 4]] and rollouts.split([0], 3) == [[0]]
    rollout = rollouts.Rollout(
        prompts=[[1, 2], [3], [4, 5, 6]],
        replies=[[7, 8], [9, 10, 11], [12]],
        texts=["", "", ""],
        rewards=torch.zeros(3),
        reward_parts={},
        logprobs=torch.arange(6.0),
        entropy=torch.zeros(6),
        ref_logprobs=None,
    )
    assert rollout.token_index([2, 0]).tolist() == [5, 0, 1]
    assert rollout.per_token(torch.tensor([1.0, 2.0, 3.0])).tolist() == [1, 1, 2, 2, 2, 3]
    batch = rollout.batch([2, 0])  # the targets of a flat batch are the replies' tokens, in the same order
    assert batch.targets[batch.targets != -100].tolist() == [12, 7, 8]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_flat_batch_log_probs_match_a_plain_forward(tiny_model, temperature):
    """The per-token log-probabilities and entropies of replies in one flat padding-free batch equal those of
    a plain forward pass over each prompt + reply alone, at the sampling temperature."""
    from tunesmith.config.schema import AdapterConfig
    from tunesmith.models import load_model
    from tunesmith.models.adapters import apply_adapter

    model, _ = load_model(str(tiny_model))
    model = apply_adapter(model, AdapterConfig(type="lora"))
    prompts, replies = [[5, 17, 42], [99, 3], [7, 8, 9, 10]], [[11, 12], [13, 14, 15], [16]]
    batch = rollouts.rollout_batch(prompts, replies)
    logprobs, _, _ = policy.policy_outputs(model, batch, temperature)
    scored, entropy, _ = policy.token_statistics(model, batch, temperature)
    expected, expected_entropy = [], []
    with torch.no_grad():
        for prompt, reply in zip(prompts, replies):
            logits = model(torch.tensor([prompt + reply])).logits[0, len(prompt) - 1 : -1].float() / temperature
            all_logprobs = torch.log_softmax(logits, dim=-1)
            expected.append(all_logprobs.gather(1, torch.tensor(reply)[:, None]).squeeze(1))
            expected_entropy.append(-(all_logprobs.exp() * all_logprobs).sum(-1))
    torch.testing.assert_close(logprobs.detach(), torch.cat(expected), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scored, torch.cat(expected), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, torch.cat(expected_entropy), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Prompt data and rewards.


def test_prompt_rows_and_their_detection():
    assert convert_prompt({"prompt": "2 + 2 ="}).messages == [{"role": "user", "content": "2 + 2 ="}]
    listed = convert_prompt({"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]})
    assert [m["role"] for m in listed.messages] == ["system", "user"] and listed.kind == "prompt"
    with pytest.raises(RowError, match="last turn of field 'prompt' is the assistant's"):
        convert_prompt({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    chat = convert_prompt_messages(
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    )
    assert chat.messages == [{"role": "user", "content": "q"}] and chat.meta["reference"] == "a"
    with pytest.raises(RowError, match="empty list"):
        convert_prompt_messages({"messages": []})
    # {"prompt"} alone is a prompt; with a completion, chosen/rejected or a response, the more specific format
    assert detect_format({"prompt": "p", "answer": "4"}) == "prompt"
    assert detect_format({"prompt": "p", "completion": "c"}) == "prompt_completion"
    # messages rows are chats to learn from, unless the method takes prompts; for any method (an upload), a chat
    # without a reply can only be a prompt to continue (OpenAI's RFT rows)
    chat_row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert detect_format(chat_row) == "messages" and detect_format(chat_row, ("prompt", "chat")) == "prompt_messages"
    row = {"messages": [{"role": "developer", "content": "s"}, {"role": "user", "content": "q"}]}
    assert detect_format(row) == "prompt_messages" and detect_format(row, ("chat",)) == "messages"
    assert convert_prompt_messages(row).messages == [{"role": "system", "content": "s"}, row["messages"][1]]


def test_chat_rows_become_prompts_with_their_reply_as_a_field(tmp_path, tiny_model):
    from tunesmith.data.tokenize import ChatTokenizer
    from tunesmith.models import load_tokenizer

    rows = [
        {"instruction": "What is 2 + 3?", "input": "", "output": "2 + 3 = 5\n#### 5"},
        {"instruction": "What is 1 + 1?", "input": "", "output": "#### 2"},
    ]
    config = rl_config(
        tmp_path,
        tiny_model,
        "method=grpo",
        "rl.reward_functions=[{name: number_match, args: {field: output}}]",
        "data.system_prompt=Be brief.",
        rows=rows,
    )
    chat = ChatTokenizer(load_tokenizer(str(tiny_model)), system_prompt="Be brief.")
    data = prompts.load_prompts(config, chat, [("number_match", "output")])
    first = data.train[0]
    assert data.format == "alpaca" and [m["role"] for m in first.messages] == ["system", "user"]
    assert first.fields["output"] == first.fields["reference"] == "2 + 3 = 5\n#### 5"
    assert chat.tokenizer.decode(first.input_ids).endswith("<|im_start|>assistant\n")
    with pytest.raises(UserError, match=r"train.jsonl:1: reward 'number_match' reads the field 'answer'"):
        prompts.load_prompts(config, chat, [("number_match", "answer")])
    pairs = rl_config(
        tmp_path,
        tiny_model,
        "method=grpo",
        "rl.reward_functions=[length_penalty]",
        rows=[{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."}] * 3,
        name="pairs",
    )
    prompt = prompts.load_prompts(pairs, chat, []).train[0]  # a reward model's pairs serve as RL prompts
    assert prompt.messages[-1] == {"role": "user", "content": "Hi?"} and prompt.fields["reference"] == "Hello."


def test_built_in_reward_functions():
    def call(name, response, fields=None, **args):
        return reward_functions.get(name)([{"role": "user", "content": "q"}], response, fields or {}, **args)

    assert call("exact_match", " Paris. ", {"answer": "paris"}) == 1.0
    assert call("exact_match", "It is Paris", {"answer": "Paris"}) == 0.0
    gsm8k = {"answer": "Natalia sold 48/2 = 24 clips in May.\n#### 72"}
    assert call("number_match", "48 + 24 = 72", gsm8k) == 1.0 and call("number_match", "it is 24", gsm8k) == 0.0
    assert call("number_match", "so 1,000 in total", {"total": "1000"}, field="total") == 1.0
    assert call("contains", "I think PARIS", text="paris") == 1.0
    assert call("contains", "I think PARIS", text="paris", case_sensitive=True) == 0.0
    assert (
        call("length_penalty", "one two three four", max_words=8) == -0.5
        and call("length_penalty", "a " * 50, max_words=8) == -1.0
    )
    assert (
        call("matches_format", "<think>a b</think>\n<answer>5</answer>") == 1.0 and call("matches_format", "5") == 0.0
    )


def test_reward_sum_of_functions_and_a_reward_model(tmp_path, tiny_reward_model):
    from tunesmith.config.schema import RLConfig
    from tunesmith.engine.reward_model import RewardScorer
    from tunesmith.train.reward_functions import build_reward

    (tmp_path / "mine.py").write_text(
        "def double(prompt, response, fields, *, factor=2.0):\n    return factor * len(response)\n"
    )
    settings = RLConfig(
        reward_model=str(tiny_reward_model),
        reward_model_weight=0.5,
        reward_functions=["contains", {"name": f"{tmp_path / 'mine.py'}:double", "weight": 0.1}],
    )
    with pytest.raises(UserError, match=r"rl.reward_functions\[0\]: contains.*text"):
        build_reward(settings)  # contains needs its text
    settings.reward_functions[0].args = {"text": "b"}
    reward = build_reward(settings)
    prompts = [[{"role": "user", "content": "q"}]] * 2
    total, parts = reward(prompts, ["ab", "c"], [{}, {}])
    scores = RewardScorer.load(str(tiny_reward_model)).score(
        [p + [{"role": "assistant", "content": r}] for p, r in zip(prompts, ["ab", "c"])]
    )
    torch.testing.assert_close(parts["model"], torch.tensor(scores))
    assert parts["contains"].tolist() == [1.0, 0.0] and parts["double"].tolist() == [4.0, 2.0]
    torch.testing.assert_close(total, 0.5 * torch.tensor(scores) + torch.tensor([1.0, 0.0]) + torch.tensor([0.4, 0.2]))


def test_reward_function_mistakes_are_clear(tmp_path):
    from tunesmith.config.loading import load_config
    from tunesmith.config.schema import RLConfig
    from tunesmith.train.reward_functions import build_reward

    with pytest.raises(UserError, match="did you mean 'exact_match'"):
        load_config(None, ["data.train=x.jsonl", "method=grpo", "rl.reward_functions=[exact_mach]"])
    for name, message in [
        ("no_such_module_here:f", "cannot import no_such_module_here"),
        (f"{tmp_path / 'missing.py'}:f", "does not exist"),
        ("math:no_function", "has no function"),
    ]:
        with pytest.raises(UserError, match=message):
            build_reward(RLConfig(reward_functions=[name]))
    (tmp_path / "bad.py").write_text("def nan(prompt, response, fields):\n    return float('nan')\n")
    reward = build_reward(RLConfig(reward_functions=[f"{tmp_path / 'bad.py'}:nan"]))
    with pytest.raises(UserError, match="returned nan"):
        reward([[{"role": "user", "content": "q"}]], ["a"], [{}])


# ---------------------------------------------------------------------------------------------
# The recipes end to end.


# Settings under which a tiny model's GRPO visibly learns a reward in 8 steps (8 replies a prompt, a high rate)
LEARNS_IN_8_STEPS = (
    "train.lr=2e-2",
    "train.max_steps=8",
    "train.schedule=constant",
    "grpo.num_generations=8",
    "rl.temperature=0.7",
    "train.epochs=2",
    "train.eval_every=100",
)


def test_grpo_learns_a_reward_that_a_python_function_gives(tmp_path, tiny_model):
    """Rewarding spaces in the reply (a user's function in a file of theirs), the mean reward rises within a few
    steps; the first step's policy is the reference (KL 0) and its ratios are 1 (nothing clipped)."""
    config = rl_config(
        tmp_path,
        tiny_model,
        "method=grpo",
        spaces_reward(tmp_path),
        *LEARNS_IN_8_STEPS,
    )
    result = run(config)
    lines = records(config.output_dir)
    steps = [line for line in lines if "reward" in line]
    assert lines[0]["format"] == "prompt" and lines[0]["train_examples"] == len(PROMPTS)
    assert len(steps) == 8 and steps[0]["kl"] == pytest.approx(0.0, abs=1e-6) and steps[0]["clip_fraction"] == 0.0
    for key in (
        "reward_spaces",
        "kl",
        "entropy",
        "response_length",
        "clip_fraction",
        "truncated_fraction",
        "loss",
        "lr",
    ):
        assert all(math.isfinite(step[key]) for step in steps), key
    first, last = [step["reward"] for step in steps[:2]], [step["reward"] for step in steps[-2:]]
    assert sum(last) / 2 > sum(first) / 2 + 0.3, [step["reward"] for step in steps]
    assert steps[-1]["kl"] > 0
    saved = load_file(result.output / "adapter_model.safetensors")
    assert any(tensor.abs().sum() > 0 for name, tensor in saved.items() if "lora_B" in name)


def test_grpo_with_several_updates_per_step_clips_and_logs_validation_reward(tmp_path, tiny_model):
    config = rl_config(
        tmp_path,
        tiny_model,
        "method=grpo",
        spaces_reward(tmp_path),
        "train.max_steps=2",
        "train.lr=2e-2",
        "rl.update_epochs=2",
        "rl.minibatches=2",
        "train.grad_accum=2",
        "data.val_fraction=0.25",
        "train.eval_every=1",
    )
    run(config)
    lines = records(config.output_dir)
    steps = [line for line in lines if "clip_fraction" in line]
    assert all(step["clip_fraction"] > 0 for step in steps)  # the later updates move the ratios past the clip
    validation = [line for line in lines if "val_reward" in line]
    assert [line["step"] for line in validation] == [1, 2] and "val_reward_spaces" in validation[0]


def test_grpo_full_fine_tuning_keeps_a_frozen_reference(tmp_path, tiny_model):
    config = rl_config(
        tmp_path,
        tiny_model,
        "method=grpo",
        spaces_reward(tmp_path),
        "adapter.type=full",
        "train.max_steps=2",
        "train.lr=1e-3",
    )
    result = run(config)
    steps = [line for line in records(config.output_dir) if "reward" in line]
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6) and steps[1]["kl"] > 0
    assert result.output.name == "model" and (result.output / "model.safetensors").is_file()
    no_kl = rl_config(
        tmp_path,
        tiny_model,
        "method=grpo",
        spaces_reward(tmp_path),
        "adapter.type=full",
        "train.max_steps=1",
        "rl.kl_coef=0",
        name="no-kl",
    )
    run(no_kl)
    assert "kl" not in [line for line in records(no_kl.output_dir) if "reward" in line][0]  # no reference loaded


def test_ppo_with_a_reward_model_trains_policy_and_value_head(tmp_path, tiny_model, tiny_reward_model):
    config = rl_config(
        tmp_path,
        tiny_model,
        "method=ppo",
        f"rl.reward_model={tiny_reward_model}",
        "train.max_steps=4",
        "train.lr=1e-2",
        "rl.update_epochs=2",
        "ppo.value_coef=1.0",
    )
    result = run(config)
    steps = [line for line in records(config.output_dir) if "reward" in line]
    for key in (
        "reward_model",
        "kl",
        "entropy",
        "value_loss",
        "policy_loss",
        "explained_variance",
        "clip_fraction",
        "value_clip_fraction",
        "response_length",
    ):
        assert all(key in step and step[key] is not None for step in steps), key
    checkpoint = rundir.read_weights(rundir.latest_checkpoint(config.output_dir / "checkpoints"))
    value_head = {name: tensor for name, tensor in checkpoint.items() if name.startswith("value_head.")}
    assert value_head and value_head["value_head.layers.2.weight"].abs().sum() > 0  # it started at zero
    shipped = load_file(result.output / "adapter_model.safetensors")
    assert not any("value_head" in name for name in shipped)  # only the policy ships
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), result.output)  # loads elsewhere


def test_gradient_accumulation_equals_the_whole_minibatch(tmp_path, tiny_model):
    """Micro-batches (train.grad_accum) change memory, not the update: the loss is the minibatch's token mean."""
    figures = {}
    for grad_accum in (1, 4):
        config = rl_config(
            tmp_path,
            tiny_model,
            "method=grpo",
            spaces_reward(tmp_path),
            "train.max_steps=1",
            f"train.grad_accum={grad_accum}",
            name=f"accum-{grad_accum}",
        )
        run(config)
        figures[grad_accum] = [line for line in records(config.output_dir) if "reward" in line][0]
    for key in ("reward", "loss", "grad_norm", "kl", "entropy"):
        assert figures[1][key] == pytest.approx(figures[4][key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize(
    "method, overrides",
    [
        ("grpo", ["rl.update_epochs=2", "rl.minibatches=2", "adapter.dropout=0.1", "grpo.num_generations=2"]),
        ("ppo", ["train.grad_accum=2"]),
    ],
)
def test_stop_and_resume_is_exact(tmp_path, tiny_model, tiny_reward_model, monkeypatch, method, overrides):
    reward = spaces_reward(tmp_path) if method == "grpo" else f"rl.reward_model={tiny_reward_model}"
    straight, resumed = straight_and_resumed(
        tmp_path,
        tiny_model,
        PROMPTS,
        [f"method={method}", reward, "rl.max_new_tokens=8", "train.max_steps=4", *overrides],
        2,
        monkeypatch,
    )
    assert metric_lines(resumed.output_dir) == metric_lines(straight.output_dir)
    assert metric_lines(resumed.output_dir, "reward") == metric_lines(straight.output_dir, "reward")
    a = load_file(straight.output_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed.output_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# Mistakes, refused before any compute.


def test_config_mistakes_are_reported_together():
    from tunesmith.config.loading import load_config

    with pytest.raises(UserError) as error:
        load_config(
            None,
            [
                "data.train=x.jsonl",
                "method=ppo",
                "data.max_length=64",
                "rl.max_new_tokens=64",
                "train.unfreeze.every=2",
                "data.truncation=truncate",
            ],
        )
    text = str(error.value)
    for expected in (
        "rl.reward_functions: method ppo learns from rewards",
        "rl.max_new_tokens: 64 leaves no room",
        "train.unfreeze: not supported by method ppo",
        "data.truncation: truncate",
    ):
        assert expected in text


def test_data_mistakes_name_their_lines(tmp_path, tiny_model):
    documents = [{"text": "raw text has no prompt to reply to"}]
    with pytest.raises(UserError, match="cannot train on"):
        run(rl_config(tmp_path, tiny_model, "method=grpo", "rl.reward_functions=[exact_match]", rows=documents))
    rows = PROMPTS[:2] + [
        {"prompt": "card " * 150, "answer": "1"},
        {"prompt": "no answer here"},
        {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "answer": "1"},
    ]
    config = rl_config(
        tmp_path,
        tiny_model,
        "method=grpo",
        "rl.reward_functions=[exact_match]",
        "data.max_length=128",
        rows=rows,
        name="bad",
    )
    with pytest.raises(UserError) as error:
        run(config)
    text = str(error.value)
    assert (
        "train.jsonl:3: the prompt is" in text
        and "train.jsonl:4: reward 'exact_match' reads the field 'answer'" in text
    )
    assert "train.jsonl:5: the last turn of field 'prompt' is the assistant's" in text
    assert not (config.output_dir / "metrics.jsonl").exists()
    dropped = rl_config(
        tmp_path,
        tiny_model,
        "method=grpo",
        "rl.reward_functions=[exact_match]",
        "data.max_length=128",
        "data.truncation=drop",
        "data.skip_bad_rows=true",
        "train.max_steps=1",
        rows=rows,
        name="dropped",
    )
    run(dropped)
    first = records(dropped.output_dir)[0]
    assert first["dropped_long"] == 1 and first["skipped_rows"] == 2 and first["train_examples"] == 2
