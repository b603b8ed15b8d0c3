"""GRPO's loss variants (grpo.loss: grpo | dapo | dr_grpo | gspo) and train/sample consistency: each piece against
values worked out by hand; the sampler's log-probabilities against the trainer's; the variants end to end."""

from __future__ import annotations

import pytest
import torch
from test_rl import records, rl_config
from test_training import run

from tunesmith.config.loading import load_config
from tunesmith.errors import UserError
from tunesmith.recipes.grpo import clip_ranges
from tunesmith.registry import grpo_losses
from tunesmith.train import grpo_losses as losses
from tunesmith.train import rl_math
from tunesmith.train.grpo_losses import Aggregation

# ---------------------------------------------------------------------------------------------
# The pieces, against values worked out by hand.


def test_clip_higher_lets_a_ratio_rise_further_than_it_may_fall():
    ratios = torch.tensor([1.5, 1.25, 0.5])
    logprobs = ratios.log().requires_grad_()
    loss, clipped = rl_math.clipped_policy_loss(logprobs, torch.zeros(3), torch.tensor([1.0, 1.0, -1.0]), 0.2, 0.28)
    # A = 1: r 1.5 is clipped to 1.28 (symmetric: 1.2), r 1.25 is inside [0.8, 1.28]; A = -1: r 0.5 clipped to 0.8
    torch.testing.assert_close(loss, torch.tensor([-1.28, -1.25, 0.8]))
    assert clipped.tolist() == [True, False, True]
    loss.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([0.0, -1.25, 0.0]))


def test_gspo_gives_every_token_its_replys_ratio_and_clips_per_reply():
    # reply 0: two tokens, log-ratios 0.1 and 0.3, mean 0.2, s = e^0.2 = 1.2214; reply 1: one token, s = e^-0.5
    old = torch.tensor([-1.0, -2.0, -1.0])
    logprobs = (old + torch.tensor([0.1, 0.3, -0.5])).requires_grad_()
    advantages, samples = torch.tensor([1.0, 1.0, -1.0]), torch.tensor([0, 0, 1])
    loss, clipped = losses.sequence_surrogate(logprobs, old, advantages, samples, 0.2, 0.28)
    # s 1.2214 is inside [0.8, 1.28]: -A s on both tokens; s 0.6065 with A = -1 is clipped to 0.8
    torch.testing.assert_close(loss, torch.tensor([-1.2214028, -1.2214028, 0.8]))
    assert clipped.tolist() == [False, False, True]
    loss.sum().backward()
    # each token's gradient is -A s, the reply's s (not its own ratio); none for the clipped reply
    torch.testing.assert_close(logprobs.grad, torch.tensor([-1.2214028, -1.2214028, 0.0]))
    # per token (grpo's surrogate) the second token's ratio e^0.3 = 1.3499 is clipped: no gradient there
    per_token = logprobs.detach().requires_grad_()
    token_loss, _ = losses.token_surrogate(per_token, old, advantages, samples, 0.2, 0.28)
    token_loss.sum().backward()
    torch.testing.assert_close(per_token.grad, torch.tensor([-1.1051709, 0.0, 0.0]))


def minibatch_loss(aggregation: Aggregation, lengths: list[int], per_token: torch.Tensor) -> float:
    """What update_policy computes of one minibatch holding every sample."""
    weights = aggregation.weights.repeat_interleave(torch.tensor(lengths))
    return float((weights * per_token.double()).sum() / aggregation.divisors.sum())


def test_aggregations_by_hand():
    lengths, per_token = [2, 1, 3, 2], torch.arange(1.0, 9.0)  # replies' token losses: (1 2) (3) (4 5 6) (7 8)
    token = losses.token_mean(lengths, 4)
    assert token.weights.tolist() == [1, 1, 1, 1] and token.divisors.tolist() == [2, 1, 3, 2]
    assert minibatch_loss(token, lengths, per_token) == pytest.approx(36 / 8)  # every token counts once
    sequence = losses.sequence_mean(lengths, 4)
    torch.testing.assert_close(sequence.weights, torch.tensor([1 / 2, 1, 1 / 3, 1 / 2], dtype=torch.float64))
    # the replies' means 1.5, 3, 5, 7.5, averaged
    assert minibatch_loss(sequence, lengths, per_token) == pytest.approx((1.5 + 3 + 5 + 7.5) / 4)
    constant = losses.constant_length(lengths, 4)
    assert constant.divisors.tolist() == [4, 4, 4, 4]
    assert minibatch_loss(constant, lengths, per_token) == pytest.approx(36 / 16)  # 4 replies x max_new_tokens 4
    kept = token.without(torch.tensor([False, False, True, True]))
    assert kept.weights.tolist() == [1, 1, 0, 0] and kept.divisors.tolist() == [2, 1, 0, 0]
    assert minibatch_loss(kept, lengths, per_token) == pytest.approx((1 + 2 + 3) / 3)


def test_uniform_groups_and_unscaled_advantages():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0])
    assert losses.uniform_groups(rewards, 2).tolist() == [True, True, False, False, True, True]
    # dr_grpo's advantage: centred, not divided by the deviation (grpo's: -0.5 / (0.7071 + 1e-4) = -0.7070)
    assert rl_math.group_advantages(rewards, 2, scale=False).tolist() == [0, 0, -0.5, 0.5, 0, 0]
    assert not grpo_losses.get("dr_grpo").scale_rewards and grpo_losses.get("gspo").scale_rewards


def test_truncated_importance_weights():
    trainer, sampler = torch.tensor([-1.0, -2.0, -0.5, -3.0]), torch.tensor([-1.0, -2.5, -2.0, -2.0])
    weights = rl_math.truncated_importance_weights(trainer.requires_grad_(), sampler, cap=2.0)
    # exp(0) = 1; exp(0.5) = 1.6487; exp(1.5) = 4.48 capped at 2; exp(-1) = 0.3679 (only the top is capped)
    torch.testing.assert_close(weights, torch.tensor([1.0, 1.6487213, 2.0, 0.3678794]))
    assert not weights.requires_grad


def test_loss_settings_resolve_from_the_config_then_the_variant():
    def config(*overrides):
        return load_config(None, ["data.train=x.jsonl", "method=grpo", "rl.reward_functions=[exact_match]", *overrides])

    def ranges(*overrides):
        settings = config(*overrides)
        return clip_ranges(settings, grpo_losses.get(settings.grpo.loss))

    assert ranges() == (0.2, 0.2) and ranges("grpo.loss=dr_grpo") == (0.2, 0.2)
    assert ranges("grpo.loss=dapo") == (0.2, 0.28) and ranges("grpo.loss=gspo") == (3e-4, 4e-4)
    assert ranges("grpo.loss=dapo", "rl.clip_range=0.1", "grpo.clip_range_high=0.3") == (0.1, 0.3)
    assert ranges("grpo.loss=gspo", "grpo.clip_range_low=1e-3") == (1e-3, 4e-4)
    with pytest.raises(UserError, match="grpo.loss.*did you mean 'dapo'"):
        config("grpo.loss=dapoo")


# ---------------------------------------------------------------------------------------------
# Train/sample consistency.


def test_the_samplers_log_probs_are_the_trainers_in_float32(tiny_model):
    """What generate's sampler computed for each sampled token (left-padded, KV-cached) is what the trainer's flat
    batch computes, at the temperature and before top-p: a processor placed after the temperature or the top-p
    warper would differ by far more than the bound."""
    from tunesmith.config.schema import AdapterConfig
    from tunesmith.engine.generation import Sampling, stop_token_ids
    from tunesmith.models import load_model
    from tunesmith.models.adapters import apply_adapter
    from tunesmith.train import policy
    from tunesmith.train import rollout as rollouts

    model, tokenizer = load_model(str(tiny_model))
    model = apply_adapter(model, AdapterConfig(type="lora"))
    prompts, stops = [[5, 17, 42, 8], [99, 3], [7, 8, 9]] * 2, stop_token_ids(model, tokenizer)
    replies, sampled = rollouts.sample_replies(model, prompts, Sampling(10, 0.7, 0.9), tokenizer.pad_token_id, stops, 3)
    assert [len(row) for row in sampled] == [len(reply) for reply in replies]
    trainer, _, _ = policy.token_statistics(model, rollouts.rollout_batch(prompts, replies), 0.7)
    assert (trainer - torch.cat(sampled)).abs().max() < 1e-5
    greedy, none = rollouts.sample_replies(model, prompts[:2], Sampling(4, 0.0), tokenizer.pad_token_id, stops, 0)
    assert none is None and len(greedy) == 2


# ---------------------------------------------------------------------------------------------
# The variants end to end.

# Reward 1 for every reply to an even-numbered prompt (its group's rewards all equal), else one that differs by reply.
HALF_UNIFORM = (
    "def reward(prompt, response, fields):\n"
    "    return 1.0 if int(fields['answer']) % 2 == 0 else sum(map(ord, response)) % 97 / 97\n"
)


def test_each_loss_trains_and_differs_from_grpo(tmp_path, tiny_model):
    """One step over all 8 prompts (two updates over each step's samples, so the second meets the clip): dapo drops
    the (at least 4) groups of equal rewards; dr_grpo and gspo change the update; the sampler matches the trainer in
    float32; rl.mismatch_warn=0 warns once; rl.tis_cap (with dapo: weights ~1 in float32) runs."""
    (tmp_path / "half.py").write_text(HALF_UNIFORM)
    steps = {}
    for loss, extra in [
        ("grpo", ["train.max_steps=2", "rl.mismatch_warn=0", "train.epochs=2"]),
        ("dapo", ["rl.tis_cap=2"]),
        ("dr_grpo", []),
        ("gspo", []),
    ]:
        config = rl_config(
            tmp_path,
            tiny_model,
            "method=grpo",
            f"rl.reward_functions=[{tmp_path / 'half.py'}:reward]",
            f"grpo.loss={loss}",
            "grpo.num_generations=2",
            "train.batch_size=8",
            "train.max_steps=1",
            "train.lr=2e-2",
            "rl.update_epochs=2",
            "rl.max_new_tokens=8",
            *extra,
            name=loss,
        )
        run(config)
        steps[loss] = [line for line in records(config.output_dir) if "reward" in line]
    grpo = steps["grpo"][0]
    assert grpo["sample_logprob_diff"] < 1e-5 and grpo["sample_kl"] < 1e-9
    assert "warning" in grpo and "sample_logprob_diff" in grpo["warning"] and "warning" not in steps["grpo"][1]
    assert steps["dapo"][0]["groups_filtered"] >= 4 and "groups_filtered" not in grpo
    for name in ("dapo", "dr_grpo", "gspo"):
        first = steps[name][0]
        assert first["reward"] == grpo["reward"]  # the same samples: the first step's policy is the same
        assert abs(first["grad_norm"] - grpo["grad_norm"]) > 1e-3 * grpo["grad_norm"], name
    assert steps["gspo"][0]["clip_fraction"] > 0  # its per-reply clip (4e-4) binds on the second pass


def test_dapo_skips_a_step_whose_groups_all_tie(tmp_path, tiny_model):
    """Every group's rewards equal: dapo has nothing to learn from, so no update is made (not a 0/0 one)."""
    from safetensors.torch import load_file

    (tmp_path / "same.py").write_text("def same(prompt, response, fields):\n    return 1.0\n")
    config = rl_config(
        tmp_path,
        tiny_model,
        "method=grpo",
        f"rl.reward_functions=[{tmp_path / 'same.py'}:same]",
        "grpo.loss=dapo",
        "train.max_steps=1",
        "rl.max_new_tokens=4",
    )
    result = run(config)
    step = [line for line in records(config.output_dir) if "reward" in line][0]
    assert step["groups_filtered"] == 2 and step["loss"] == 0.0 and step["grad_norm"] == 0.0
    saved = load_file(result.output / "adapter_model.safetensors")
    assert all(tensor.abs().sum() == 0 for name, tensor in saved.items() if "lora_B" in name)  # as it started
