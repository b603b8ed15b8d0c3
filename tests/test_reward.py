"""Reward models: the losses against hand-computed values, the recipe end to end on pairs and on scores, the saved
files in plain transformers, exact resume, `tunesmith eval` of a reward run, and `tunesmith score`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import write_jsonl
from safetensors.torch import load_file
from test_training import make_config, metric_lines, run, straight_and_resumed

from tunesmith import rundir
from tunesmith.cli import main
from tunesmith.config.schema import AdapterConfig
from tunesmith.data.formats import convert_preference, convert_score
from tunesmith.data.packing import collate
from tunesmith.data.tokenize import ChatTokenizer, TokenizedExample
from tunesmith.engine.generation import Engine
from tunesmith.engine.reward_model import RewardScorer, ScoreScale, reward_positions, sequence_rewards
from tunesmith.errors import UserError
from tunesmith.eval.evaluate import EvalOptions, evaluate
from tunesmith.models import load_model
from tunesmith.models.adapters import apply_adapter, load_trainable_state
from tunesmith.train.reward_loss import pairwise_loss, pointwise_loss

GOOD = ["Your card is on its way.", "I can cancel the transfer.", "The fee is 1 percent.", "Your refund is on its way."]
BAD = ["the quick brown fox", "lazy dog lazy dog", "hello world", "0 1 2 3 ? !"]
PAIRS = [
    {"prompt": f"question {i} about my card", "chosen": GOOD[i % 4], "rejected": BAD[(i + 1) % 4]} for i in range(8)
]
SCORES = [
    {"prompt": f"question {i} about my card", "response": reply, "score": score}
    for i in range(4)
    for reply, score in ((GOOD[i], 9.0 - i), (BAD[i], 1.0 + i / 2))
]


def reward_config(tmp_path, model_dir, rows, *overrides, name="run"):
    return make_config(tmp_path, model_dir, rows, "method=reward", "data.max_length=128", *overrides, name=name)


def logged(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def trained_rewards(config, rows: list[dict]) -> tuple[torch.Tensor, list[list[int]]]:
    """The trained model's rewards for `rows` (the packed training path) and each sequence's token ids."""
    model, tokenizer = load_model(str(config.model), num_labels=1)
    model = apply_adapter(model, config.adapter)
    load_trainable_state(model, rundir.read_weights(rundir.latest_checkpoint(config.output_dir / "checkpoints")))
    chat = ChatTokenizer(tokenizer)
    units = [chat(convert_preference(row) if "chosen" in row else convert_score(row)) for row in rows]
    with torch.no_grad():
        rewards = sequence_rewards(model.eval(), collate(units))
    return rewards, [segment.input_ids for unit in units for segment in unit.segments()]


def conversations(rows: list[dict]) -> list[list[dict]]:
    sides = [("chosen", "rejected") if "chosen" in row else ("response",) for row in rows]
    return [
        [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row[side]}]
        for row, keys in zip(rows, sides)
        for side in keys
    ]


# ------------------------------------------------------------------------------------------- losses


def test_pairwise_loss_matches_hand_computed_values():
    chosen, rejected = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5])
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    plain = pairwise_loss(chosen, rejected)
    assert plain.tolist() == pytest.approx([-math.log(sigmoid(1.0)), -math.log(sigmoid(-1.0))], rel=1e-6)
    with_margin = pairwise_loss(chosen, rejected, margin=0.5)
    assert with_margin.tolist() == pytest.approx([-math.log(sigmoid(0.5)), -math.log(sigmoid(-1.5))], rel=1e-6)
    assert pairwise_loss(torch.zeros(1), torch.zeros(1)).item() == pytest.approx(math.log(2))


def test_pointwise_loss_on_scores_standardised_with_the_training_scale(tmp_path):
    scale = ScoreScale.of([1.0, 2.0, 3.0, 6.0], tmp_path / "train.jsonl")
    assert (scale.mean, scale.std) == pytest.approx((3.0, math.sqrt(3.5)))  # population std: (4 + 1 + 0 + 9) / 4
    targets = scale.standardise(torch.tensor([1.0, 6.0]))
    assert targets.tolist() == pytest.approx([-2 / math.sqrt(3.5), 3 / math.sqrt(3.5)], rel=1e-6)
    losses = pointwise_loss(torch.tensor([0.0, 1.0]), targets)
    assert losses.tolist() == pytest.approx([4 / 3.5, (1 - 3 / math.sqrt(3.5)) ** 2], rel=1e-6)
    assert scale.to_data_units(targets).tolist() == pytest.approx([1.0, 6.0], rel=1e-6)
    with pytest.raises(UserError, match="every training score is 5"):
        ScoreScale.of([5.0, 5.0], tmp_path / "train.jsonl")


def test_the_reward_is_read_at_the_last_token_that_is_not_padding():
    """The position transformers' classifier reads: padding the template put at the end is skipped."""
    examples = [TokenizedExample(ids, [True] * len(ids)) for ids in ([5, 6, 7], [8, 0], [0, 0], [9])]
    batch = collate(examples)
    assert reward_positions(batch, pad_id=0).tolist() == [2, 3, 5, 7]  # [0, 0] is all padding: its first token
    assert reward_positions(batch, pad_id=None).tolist() == [2, 4, 6, 7]


def test_the_new_head_trains_with_every_supported_adapter(tiny_model):
    for adapter in (AdapterConfig(type="lora"), AdapterConfig(type="full"), AdapterConfig(type="freeze", layers=1)):
        model, _ = load_model(str(tiny_model), num_labels=1)
        model = apply_adapter(model, adapter)
        head = [p for name, p in model.named_parameters() if "score" in name and p.requires_grad]
        assert head and all(p.abs().sum() == 0 for p in head), f"{adapter.type}: a trainable head starting at zero"


# ------------------------------------------------------------------------------------------- the recipe


def test_pairs_with_lora_learn_and_the_adapter_reloads_in_plain_transformers(tmp_path, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    config = reward_config(tmp_path, tiny_model, PAIRS, "train.epochs=6", "train.lr=1e-2", "train.eval_every=100")
    result = run(config)
    steps = [line for line in logged(config.output_dir) if "loss" in line]
    # The head starts at zero: every reward is 0, the loss log 2, and a tie is no win.
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and steps[0]["reward_accuracy"] == 0.0
    assert steps[-1]["loss"] < 0.2 and steps[-1]["reward_accuracy"] == 1.0 and steps[-1]["reward_margin"] > 1.0
    assert {"reward_chosen", "reward_rejected"} <= set(steps[-1])

    adapter = result.output
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    saved = load_file(adapter / "adapter_model.safetensors")
    assert any("score" in name for name in saved), "the trained head ships inside the adapter"
    assert all(saved[name].abs().sum() > 0 for name in saved if "lora_B" in name or "score" in name)

    rewards, ids = trained_rewards(config, PAIRS)
    assert (rewards[0::2] > rewards[1::2]).all(), "every training pair is ranked right"
    plain = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1), adapter
    ).eval()
    with torch.no_grad():
        reloaded = torch.stack([plain(input_ids=torch.tensor([row])).logits[0, 0] for row in ids])
    torch.testing.assert_close(reloaded, rewards)
    torch.testing.assert_close(
        torch.tensor(RewardScorer.load(str(config.output_dir)).score(conversations(PAIRS))), rewards
    )
    assert not (adapter / "reward_scale.json").exists(), "pairs train the reward itself: no scale"


def test_scores_with_full_fine_tuning_regress_and_the_model_reloads_in_plain_transformers(tmp_path, tiny_model):
    from transformers import AutoModelForSequenceClassification

    validation = write_jsonl(tmp_path / "val.jsonl", SCORES[:2])
    config = reward_config(
        tmp_path,
        tiny_model,
        SCORES,
        "adapter.type=full",
        "train.epochs=20",
        "train.lr=5e-3",
        "train.batch_size=8",
        f"data.validation={validation}",
        "train.eval_every=10",
    )
    result = run(config)
    steps = [line for line in logged(config.output_dir) if "loss" in line]
    # One step covers every training row and the head starts at zero: each prediction is the mean score, so the
    # standardised squared error averages to exactly 1 and the logged MSE is the scores' variance.
    scores = [row["score"] for row in SCORES]
    mean = sum(scores) / len(scores)
    variance = sum((s - mean) ** 2 for s in scores) / len(scores)
    assert steps[0]["loss"] == pytest.approx(1.0, rel=1e-5) and steps[0]["mse"] == pytest.approx(variance, rel=1e-5)
    assert steps[-1]["mse"] < 0.3 * steps[0]["mse"] and steps[-1]["mae"] < steps[0]["mae"]
    assert "val_mse" in [line for line in logged(config.output_dir) if "val_loss" in line][-1]

    assert result.output.name == "model"
    scale = json.loads((result.output / "reward_scale.json").read_text())
    assert (scale["mean"], scale["std"]) == pytest.approx((mean, math.sqrt(variance)))
    rewards, ids = trained_rewards(config, SCORES)
    plain = AutoModelForSequenceClassification.from_pretrained(result.output).eval()
    assert plain.config.num_labels == 1
    with torch.no_grad():
        reloaded = torch.stack([plain(input_ids=torch.tensor([row])).logits[0, 0] for row in ids])
    torch.testing.assert_close(reloaded, rewards)
    rated = RewardScorer.load(str(config.output_dir)).score(conversations(SCORES))
    torch.testing.assert_close(torch.tensor(rated), rewards * scale["std"] + scale["mean"])  # in the data's units

    with pytest.raises(UserError, match="is a reward model"):
        Engine.load(str(config.output_dir))  # chat and generate: it rates replies and does not write them


def test_reward_resume_is_exact(tmp_path, tiny_model, monkeypatch):
    overrides = ["method=reward", "data.max_length=128", "train.epochs=2", "data.val_fraction=0.25"]
    straight, resumed = straight_and_resumed(tmp_path, tiny_model, PAIRS, overrides, 2, monkeypatch)
    assert metric_lines(resumed.output_dir) == metric_lines(straight.output_dir)
    assert metric_lines(resumed.output_dir, "val_reward_accuracy") == metric_lines(
        straight.output_dir, "val_reward_accuracy"
    )
    a = load_file(straight.output_dir / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed.output_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_equals_the_large_batch(tmp_path, tiny_model):
    """The loss is averaged over pairs, so 4 pairs in one micro-batch and 4 micro-batches of one pair agree."""
    losses = {}
    for batch_size, grad_accum in ((4, 1), (1, 4)):
        config = reward_config(
            tmp_path,
            tiny_model,
            PAIRS[:4],
            "train.max_steps=2",
            f"train.batch_size={batch_size}",
            f"train.grad_accum={grad_accum}",
            "data.packing=false",
            name=f"b{batch_size}",
        )
        run(config)
        losses[batch_size] = [line[1] for line in metric_lines(config.output_dir)]
    assert losses[4] == pytest.approx(losses[1], rel=1e-5)


def test_settings_a_reward_model_cannot_use_are_refused_before_training(tmp_path, tiny_model):
    config = reward_config(tmp_path, tiny_model, PAIRS, "adapter.type=prompt_tuning", "eval.every=5")
    with pytest.raises(UserError) as error:
        run(config)
    assert "adapter.type: 'prompt_tuning'" in str(error.value) and "eval.every" in str(error.value)
    assert not (config.output_dir / "metrics.jsonl").exists()
    margin = reward_config(tmp_path, tiny_model, SCORES, "reward.margin=1.0", name="margin")
    with pytest.raises(UserError, match="reward.margin=1.0 applies to pairs"):
        run(margin)
    chat = reward_config(tmp_path, tiny_model, [{"prompt": "a", "completion": "b"}], name="chat")
    with pytest.raises(UserError, match="cannot train on|cannot tell"):
        run(chat)


# ------------------------------------------------------------------------------------------- eval and score


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory, tiny_model):
    tmp_path = tmp_path_factory.mktemp("reward-run")
    config = reward_config(tmp_path, tiny_model, PAIRS, "train.epochs=4", "train.lr=1e-2", "train.eval_every=100")
    run(config)
    return config.output_dir


def test_eval_of_a_reward_run_gives_pairwise_accuracy_with_an_interval(pair_run, tmp_path, capsys):
    held_out = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "where is my card", "chosen": GOOD[0], "rejected": BAD[1]},
            {"prompt": "a fee?", "chosen": GOOD[2], "rejected": BAD[0]},
            {"prompt": "refund", "chosen": GOOD[3], "rejected": BAD[2]},
        ],
    )
    code = main(
        [
            "eval",
            str(pair_run),
            "--data",
            str(held_out),
            "--resamples",
            "50",
            "--baseline",
            "base",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    metric = result["metrics"]["preference_accuracy"]
    assert (
        result["task"] == "preference"
        and metric["n"] == 3
        and metric["ci95"][0] <= metric["value"] <= metric["ci95"][1]
    )
    expected = RewardScorer.load(str(pair_run)).score(conversations([json.loads(line) for line in held_out.open()]))
    assert [side for example in result["examples"] for side in example["predicted"]] == pytest.approx(
        expected, abs=1e-5
    )
    assert "base" in result["baselines"], "the base model's log-likelihood ranking of the same pairs"
    scored = write_jsonl(tmp_path / "scores.jsonl", SCORES[:3])
    regression = evaluate(str(pair_run), scored, EvalOptions(resamples=20), tmp_path / "reg")
    assert regression["task"] == "regression" and {"mse", "mae"} <= set(regression["metrics"])
    with pytest.raises(UserError, match="compared only with its base"):
        evaluate(str(pair_run), scored, EvalOptions(resamples=20, baselines=("base",)), tmp_path / "reg2")


def test_reward_task_rates_the_models_own_replies_to_held_out_prompts(pair_run, tiny_model, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "where is my card"}, {"prompt": PAIRS[0]["prompt"]}])
    code = main(
        [
            "eval",
            str(tiny_model),
            "--data",
            str(prompts),
            "--task",
            "reward",
            "--reward-model",
            str(pair_run),
            "--max-new-tokens",
            "6",
            "--resamples",
            "50",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "mean_reward" in printed.out and "%" not in printed.out, "a reward is an amount, not a share"
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    predicted = [example["predicted"] for example in result["examples"]]
    asked = [[{"role": "user", "content": text}] for text in ("where is my card", PAIRS[0]["prompt"])]
    rescored = RewardScorer.load(str(pair_run)).score(
        [a + [{"role": "assistant", "content": p["reply"]}] for a, p in zip(asked, predicted)]
    )
    assert [p["reward"] for p in predicted] == pytest.approx(rescored, abs=1e-5), "each reply rated in its conversation"
    assert result["metrics"]["mean_reward"]["value"] == pytest.approx(sum(rescored) / 2, abs=1e-5)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:2])  # a pair's prompt is asked; its replies are not used
    from_pairs = evaluate(
        str(tiny_model),
        pairs,
        EvalOptions(task="reward", reward_model=str(pair_run), resamples=20, max_new_tokens=6),
        tmp_path / "pairs",
    )
    assert [e["predicted"] for e in from_pairs["examples"]][0] == pytest.approx(predicted[1], abs=1e-5)
    assert main(["eval", str(tiny_model), "--data", str(prompts), "--task", "reward"]) == 2
    assert "fix: pass --reward-model" in capsys.readouterr().err


def test_score_rates_replies_and_pairs_and_leaves_the_input_alone(pair_run, tmp_path, capsys):
    rows = [
        {"prompt": "where is my card", "response": GOOD[0], "id": 7},
        {"prompt": [{"role": "user", "content": "and the fee?"}], "response": BAD[1]},
    ]
    data = write_jsonl(tmp_path / "replies.jsonl", rows)
    before = data.read_bytes()
    code = main(["score", str(pair_run), "--data", str(data)])
    assert code == 0 and data.read_bytes() == before
    out = [json.loads(line) for line in (tmp_path / "replies.scored.jsonl").read_text().splitlines()]
    scorer = RewardScorer.load(str(pair_run))
    expected = scorer.score(
        [
            [{"role": "user", "content": "where is my card"}, {"role": "assistant", "content": GOOD[0]}],
            [{"role": "user", "content": "and the fee?"}, {"role": "assistant", "content": BAD[1]}],
        ]
    )
    assert [{k: v for k, v in row.items() if k != "reward"} for row in out] == rows
    assert [row["reward"] for row in out] == pytest.approx(expected, abs=1e-5)

    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:3])
    code = main(["score", str(pair_run), "--data", str(pairs), "--output", str(tmp_path / "rated" / "pairs.jsonl")])
    captured = capsys.readouterr()
    assert code == 0 and "chosen rated above rejected in 100.0% of pairs" in captured.out
    rated = [json.loads(line) for line in (tmp_path / "rated" / "pairs.jsonl").read_text().splitlines()]
    assert all(row["reward_chosen"] > row["reward_rejected"] for row in rated)
    assert [{k: v for k, v in row.items() if not k.startswith("reward")} for row in rated] == PAIRS[:3]


def test_score_reports_bad_rows_by_file_and_line_and_writes_nothing(pair_run, tmp_path, capsys):
    data = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "ok", "response": "fine"},
            "{not json",
            {"prompt": "p", "response": 5},
            {"question": "q"},
            ["a list"],
        ],
    )
    code = main(["score", str(pair_run), "--data", str(data)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{data}:2: invalid JSON" in err
    assert f"{data}:3: field 'response' must be a string, got int 5; fix:" in err
    assert f"{data}:4: no reply to rate among the keys (question); fix:" in err
    assert f"{data}:5: each line must be a JSON object, got list" in err
    assert not (tmp_path / "bad.scored.jsonl").exists()
    code = main(["score", str(pair_run), "--data", str(data), "--output", str(data)])
    assert code == 2 and "is the input file" in capsys.readouterr().err
    sft_like = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "ok", "response": "fine"}])
    code = main(["score", str(tmp_path / "nowhere"), "--data", str(sft_like)])
    assert code == 2 and "Traceback" not in capsys.readouterr().err


def test_a_reward_run_exports_as_one_merged_classifier(pair_run, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunesmith.models.export import export_run

    merged = export_run(pair_run, "merged", tmp_path / "merged")
    model, tokenizer = (
        AutoModelForSequenceClassification.from_pretrained(merged).eval(),
        AutoTokenizer.from_pretrained(merged),
    )
    chat = ChatTokenizer(tokenizer)
    ids = [chat.tokenize_chat(conversation, last_turn_only=True).input_ids for conversation in conversations(PAIRS[:2])]
    with torch.no_grad():
        exported = [model(input_ids=torch.tensor([row])).logits[0, 0].item() for row in ids]
    assert exported == pytest.approx(RewardScorer.load(str(pair_run)).score(conversations(PAIRS[:2])), abs=1e-5)
    with pytest.raises(UserError, match="GGUF runtimes do not load"):
        export_run(pair_run, "gguf", tmp_path / "model.gguf")
