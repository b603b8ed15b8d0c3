"""DPO: each loss against hand-computed values, the fused per-token log-probabilities, the recipe end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_training import make_config, metric_lines, run, straight_and_resumed

from tunesmith.data.formats import RowError, convert_openai_preference, convert_preference
from tunesmith.errors import UserError
from tunesmith.registry import preference_losses
from tunesmith.train.preference import HeadTokenLogProbs

PAIRS = [
    {"prompt": "Is my card lost?", "chosen": "Your card is on its way.", "rejected": "the quick brown fox"},
    {"prompt": "Cancel a transfer", "chosen": "I can cancel the transfer.", "rejected": "lazy dog lazy dog"},
    {"prompt": "What is the exchange rate fee?", "chosen": "The fee is 1 percent.", "rejected": "hello world"},
    {
        "prompt": [
            {"role": "user", "content": "top up"},
            {"role": "assistant", "content": "How much?"},
            {"role": "user", "content": "10"},
        ],
        "chosen": "Your balance was topped up.",
        "rejected": "jumps over",
    },
    {"prompt": "When will my card arrive?", "chosen": "It will come in 3 days.", "rejected": "0 1 2 3 ? !"},
    {"prompt": "refund please", "chosen": "Your refund is on its way.", "rejected": "the lazy fox"},
]


def dpo_config(tmp_path, model_dir, rows, *overrides, name="run"):
    return make_config(tmp_path, model_dir, rows, "method=dpo", "data.max_length=128", *overrides, name=name)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# chosen log-ratio 0.5, rejected -1.5, beta 0.5: h = 1.0
@pytest.mark.parametrize(
    "name, smoothing, expected",
    [
        ("sigmoid", 0.0, -math.log(sig(1.0))),
        ("sigmoid", 0.2, -0.8 * math.log(sig(1.0)) - 0.2 * math.log(sig(-1.0))),
        ("robust", 0.2, (-0.8 * math.log(sig(1.0)) + 0.2 * math.log(sig(-1.0))) / 0.6),
        ("ipo", 0.0, (2.0 - 1.0) ** 2),  # (log-ratio difference - 1/(2 beta))^2
        ("hinge", 0.0, 0.0),  # max(0, 1 - 1.0)
    ],
)
def test_each_loss_matches_a_hand_computed_value(name, smoothing, expected):
    loss = preference_losses.get(name)(torch.tensor([0.5]), torch.tensor([-1.5]), 0.5, smoothing)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_hinge_is_linear_below_the_margin_and_losses_fall_as_the_chosen_side_wins():
    assert preference_losses.get("hinge")(torch.tensor([0.0]), torch.tensor([0.4]), 0.5, 0.0).item() == pytest.approx(
        1.2
    )
    for name in preference_losses.names():
        losses = preference_losses.get(name)(torch.tensor([-1.0, 0.0, 1.0]), torch.zeros(3), 0.5, 0.1)
        assert losses[0] > losses[1] > losses[2] or name == "ipo" and losses[0] > losses[1]


def test_ipo_averages_each_log_ratio_over_its_reply_tokens(monkeypatch):
    """IPO's squared loss on per-token log-ratios: a pair with replies of 3 and 5 tokens, by hand."""
    from tunesmith.data.packing import IGNORE, Batch
    from tunesmith.train.preference import PreferenceObjective

    targets = torch.tensor([[IGNORE, 1, 1, 1, IGNORE, IGNORE, 1, 1, 1, 1, 1, IGNORE]])
    batch = Batch(torch.zeros_like(targets), targets, torch.zeros_like(targets), (5, 7), 8, 1)
    objective = PreferenceObjective(
        preference_losses.get("ipo"), 0.25, 0.0, lambda model, batch: torch.zeros(2), per_token=True
    )
    import tunesmith.train.preference as preference

    monkeypatch.setattr(preference, "sequence_logprobs", lambda model, batch, routed: torch.tensor([-3.0, -10.0]))
    assert objective(None, batch).item() == pytest.approx((-3.0 / 3 - -10.0 / 5 - 1 / (2 * 0.25)) ** 2)  # 1, not 25


def test_fused_token_log_probs_match_autograd():
    torch.manual_seed(0)
    hidden = torch.randn(70, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64)
    targets = torch.randint(0, 50, (70,))
    upstream = torch.randn(70, dtype=torch.float64)
    fused = HeadTokenLogProbs.apply(hidden, weight, targets)
    (grad_fused,) = torch.autograd.grad((fused * upstream).sum(), hidden)
    plain = torch.log_softmax(hidden @ weight.T, dim=-1).gather(1, targets[:, None]).squeeze(1)
    (grad_plain,) = torch.autograd.grad((plain * upstream).sum(), hidden)
    assert torch.allclose(fused, plain) and torch.allclose(grad_fused, grad_plain)


def test_openai_and_message_list_pairs_convert_to_the_same_example():
    openai = convert_openai_preference(
        {
            "input": {"messages": [{"role": "user", "content": "hi"}]},
            "preferred_output": [{"role": "assistant", "content": "hello"}],
            "non_preferred_output": [{"role": "assistant", "content": "go away"}],
        }
    )
    listed = convert_preference(
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": "go away",
        }
    )
    assert (
        openai.messages
        == listed.messages
        == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    )
    assert openai.rejected == listed.rejected
    with pytest.raises(RowError, match="identical"):
        convert_preference({"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "a"})
    with pytest.raises(RowError, match="one assistant message"):
        convert_preference({"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"})


def test_dpo_with_lora_starts_at_log_2_learns_the_pairs_and_logs_rewards(tmp_path, tiny_model):
    config = dpo_config(
        tmp_path, tiny_model, PAIRS, "train.epochs=8", "train.lr=2e-2", "train.eval_every=100", "dpo.beta=0.5"
    )
    result = run(config)
    lines = [json.loads(line) for line in (config.output_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    # At the start the adapter is the identity, so the policy equals the reference: every h is 0, loss log 2.
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert steps[-1]["loss"] < 0.3 and steps[-1]["reward_accuracy"] == 1.0 and steps[-1]["reward_margin"] > 0
    assert {"reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected"} <= set(steps[-1])
    assert lines[0]["train_examples"] == len(PAIRS)
    assert (config.output_dir / "reference" / "logprobs.safetensors").is_file()
    assert (result.output / "adapter_config.json").is_file()


def test_cached_and_live_references_train_identically(tmp_path, tiny_model):
    losses = {}
    for reference in ("cached", "live"):
        config = dpo_config(
            tmp_path,
            tiny_model,
            PAIRS,
            "train.epochs=2",
            f"dpo.reference={reference}",
            "train.eval_every=100",
            name=reference,
        )
        run(config)
        losses[reference] = [line[1] for line in metric_lines(config.output_dir)]
    assert losses["cached"] == pytest.approx(losses["live"], rel=1e-5)


def test_full_fine_tuning_uses_the_starting_weights_as_reference(tmp_path, tiny_model):
    config = dpo_config(
        tmp_path,
        tiny_model,
        PAIRS,
        "adapter.type=full",
        "train.epochs=3",
        "train.lr=1e-3",
        "train.eval_every=100",
        "data.val_fraction=0.34",
    )
    run(config)
    lines = [json.loads(line) for line in (config.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line for line in lines if "loss" in line][0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    validation = [line for line in lines if "val_loss" in line]
    assert validation and "val_reward_accuracy" in validation[-1]
    live = dpo_config(tmp_path, tiny_model, PAIRS, "adapter.type=full", "dpo.reference=live", name="live")
    with pytest.raises(UserError, match="dpo.reference=cached"):
        run(live)


def test_dpo_resume_is_exact(tmp_path, tiny_model, monkeypatch):
    straight, resumed = straight_and_resumed(
        tmp_path, tiny_model, PAIRS, ["method=dpo", "data.max_length=128", "train.epochs=2"], 2, monkeypatch
    )
    assert metric_lines(resumed.output_dir) == metric_lines(straight.output_dir)


def test_sft_on_pairs_learns_only_the_chosen_final_reply(tmp_path, tiny_model):
    from tunesmith.data.dataset import prepare_data
    from tunesmith.data.tokenize import TokenizedExample
    from tunesmith.models import load_tokenizer
    from tunesmith.recipes.sft import SFT_ACCEPTS

    config = make_config(tmp_path, tiny_model, PAIRS, "data.max_length=128")  # method sft on preference pairs
    tokenizer = load_tokenizer(str(tiny_model))
    data = prepare_data(config.data, tokenizer, SFT_ACCEPTS, "sft", 0)
    units = data.train + data.validation
    trained = [tokenizer.decode([t for t, keep in zip(u.input_ids, u.loss_mask) if keep]) for u in units]
    assert len(units) == len(PAIRS) and all(isinstance(u, TokenizedExample) for u in units)
    assert any(text.startswith("Your balance was topped up.") for text in trained)
    assert not any("How much?" in text or "jumps over" in text for text in trained), "earlier turns, rejected replies"
    result = run(config)
    assert result.steps > 0


def test_dpo_refuses_chat_data_and_bad_pairs_before_training(tmp_path, tiny_model):
    chat = make_config(tmp_path, tiny_model, [{"prompt": "a", "completion": "b"}], "method=dpo")
    with pytest.raises(UserError, match="cannot train on"):
        run(chat)
    bad = PAIRS[:2] + [
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "", "chosen": "a", "rejected": "b"},
    ]
    config = dpo_config(tmp_path, tiny_model, bad, name="bad")
    with pytest.raises(UserError) as error:
        run(config)
    assert "train.jsonl:3:" in str(error.value) and "identical" in str(error.value)
    assert "train.jsonl:4:" in str(error.value) and "empty" in str(error.value)
    assert not (config.output_dir / "metrics.jsonl").exists()


def test_long_pairs_follow_the_truncation_policy(tmp_path, tiny_model):
    long = PAIRS + [{"prompt": "card " * 100, "chosen": "yes", "rejected": "no"}]
    config = dpo_config(tmp_path, tiny_model, long, "data.truncation=drop", "train.epochs=1")
    run(config)
    first = json.loads((config.output_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["dropped_long"] == 1 and first["train_examples"] == len(PAIRS)
