"""Knowledge distillation: the losses against hand-computed values, and the recipe end to end on tiny models
(a teacher and a student built from different seeds with the same tokenizer)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import build_model_dir, write_jsonl

from tunesmith.cli import main
from tunesmith.data.formats import convert_messages
from tunesmith.data.packing import IGNORE, collate, shifted_targets
from tunesmith.data.tokenize import ChatTokenizer
from tunesmith.models import load_model
from tunesmith.train import distill
from tunesmith.train.distill import CachedTeacher, Distiller, LiveTeacher, forward_kl, reverse_kl, tempered


@pytest.fixture(scope="session")
def teacher_model(tmp_path_factory) -> Path:
    """The tiny Llama of conftest with other weights (seed 1): the same tokenizer as `tiny_model`."""
    return build_model_dir(tmp_path_factory.mktemp("tiny-teacher"), seed=1)


def softmax(logits: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(z / temperature) for z in logits]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


# ---- the losses on small tensors --------------------------------------------------------------------


def test_divergences_match_hand_computed_values():
    p, q = [0.7, 0.2, 0.1], [0.5, 0.3, 0.2]
    teacher = torch.tensor([p, [0.25, 0.25, 0.5]]).log()
    student = torch.tensor([q, [0.6, 0.3, 0.1]]).log()
    forward = kl(p, q) + kl([0.25, 0.25, 0.5], [0.6, 0.3, 0.1])
    reverse = kl(q, p) + kl([0.6, 0.3, 0.1], [0.25, 0.25, 0.5])
    assert forward_kl(student, teacher).item() == pytest.approx(forward, rel=1e-6)  # summed over rows
    assert reverse_kl(student, teacher).item() == pytest.approx(reverse, rel=1e-6)
    assert forward != pytest.approx(reverse)
    assert forward_kl(teacher, teacher).item() == 0.0 and reverse_kl(student, student).item() == 0.0


def test_temperature_softens_both_distributions():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    for temperature in (1.0, 2.0, 4.0):
        expected = softmax([2.0, 0.0, -1.0], temperature)
        torch.testing.assert_close(tempered(logits, temperature).exp()[0], torch.tensor(expected))
    assert tempered(logits, 4.0).exp()[0, 0] < tempered(logits, 1.0).exp()[0, 0]  # flatter at a higher T


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("temperature, alpha", [(1.0, 1.0), (2.0, 0.3), (3.0, 0.0)])
def test_loss_mixes_cross_entropy_and_t_squared_kd(divergence, temperature, alpha):
    """(1 - alpha) * CE + alpha * T^2 * KL(at T), from logits (an identity head) and a full-vocabulary teacher."""
    student_logits, teacher_logits, target = [1.0, 0.0, -1.0], [0.0, 2.0, 0.5], 0
    teacher = CachedTeacher(
        torch.tensor([teacher_logits]).log_softmax(-1), torch.tensor([[0, 1, 2]], dtype=torch.int32), ["example"], [1]
    )
    loss = Distiller(teacher, getattr(distill, divergence), temperature, alpha).chunk_loss(
        torch.nn.Identity(),
        torch.tensor([student_logits]),
        torch.tensor([target]),
        teacher.logprobs,
        teacher.indices.long(),
    )
    p_teacher, p_student = softmax(teacher_logits, temperature), softmax(student_logits, temperature)
    kd = kl(p_teacher, p_student) if divergence == "forward_kl" else kl(p_student, p_teacher)
    cross_entropy = -math.log(softmax(student_logits)[target])
    assert loss.item() == pytest.approx((1 - alpha) * cross_entropy + alpha * temperature**2 * kd, rel=1e-5)


def test_cached_top_k_renormalises_over_the_kept_tokens():
    """The teacher keeps its top 2 of 4 tokens: both distributions are renormalised over those two."""
    student_logits, teacher_logits, temperature = [0.5, -0.5, 1.0, 0.0], [3.0, 1.0, 2.5, -2.0], 2.0
    logprobs = torch.tensor([teacher_logits]).log_softmax(-1)
    top = logprobs.topk(2)
    teacher = CachedTeacher(top.values, top.indices.to(torch.int32), ["example"], [1])
    loss = Distiller(teacher, forward_kl, temperature, 1.0).chunk_loss(
        torch.nn.Identity(), torch.tensor([student_logits]), torch.tensor([0]), top.values, top.indices
    )
    kept = [0, 2]  # the teacher's two most likely tokens
    p_teacher = softmax([teacher_logits[i] for i in kept], temperature)
    p_student = softmax([student_logits[i] for i in kept], temperature)
    assert loss.item() == pytest.approx(temperature**2 * kl(p_teacher, p_student), rel=1e-5)


# ---- the loss on tiny models --------------------------------------------------------------------------


def tokenized(model_dir: Path, rows: list[dict]):
    _, tokenizer = load_model(str(model_dir))
    chat = ChatTokenizer(tokenizer)
    return [chat(convert_messages(row)) for row in rows]


def expected_loss(
    student,
    teacher,
    examples,
    temperature: float,
    alpha: float,
    top_k: int | None = None,
    divergence: str = "forward_kl",
) -> torch.Tensor:
    """The distillation loss per target token, the plain way: one unpacked forward per example, full logits."""
    total, count = 0.0, 0
    for example in examples:
        ids, targets = torch.tensor([example.input_ids]), torch.tensor(shifted_targets(example))
        keep = targets != IGNORE
        student_logits, teacher_logits = student(ids).logits[0][keep].double(), teacher(ids).logits[0][keep].double()
        cross_entropy = F.cross_entropy(student_logits, targets[keep], reduction="sum")
        if top_k is not None:
            kept = teacher_logits.topk(top_k, dim=-1).indices
            student_logits, teacher_logits = student_logits.gather(1, kept), teacher_logits.gather(1, kept)
        p_student = (student_logits / temperature).log_softmax(-1)
        p_teacher = (teacher_logits / temperature).log_softmax(-1)
        pair = (p_teacher, p_student) if divergence == "forward_kl" else (p_student, p_teacher)
        kd = (pair[0].exp() * (pair[0] - pair[1])).sum()
        total = total + (1 - alpha) * cross_entropy + alpha * temperature**2 * kd
        count += int(keep.sum())
    return total / count


def test_packed_chunked_loss_and_gradients_match_the_plain_computation(
    tiny_model, teacher_model, chat_rows, monkeypatch
):
    """Packing, chunking over target positions and recomputing chunks in backward change no number."""
    monkeypatch.setattr(distill, "HEAD_CHUNK", 7)  # several chunks, the last one short
    examples = tokenized(tiny_model, chat_rows[:5])
    batch = collate(examples)
    student, _ = load_model(str(tiny_model))
    teacher, _ = load_model(str(teacher_model))
    loss = Distiller(LiveTeacher(teacher), reverse_kl, 2.0, 0.4)(student, batch) / batch.num_loss_tokens
    loss.backward()
    ours = {name: p.grad.clone() for name, p in student.named_parameters()}
    student.zero_grad()
    reference = expected_loss(student, teacher, examples, 2.0, 0.4, divergence="reverse_kl")
    reference.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    for name, parameter in student.named_parameters():
        torch.testing.assert_close(ours[name], parameter.grad, rtol=1e-3, atol=1e-5)
    assert all(not p.requires_grad for p in teacher.parameters()), "the teacher is frozen"
    assert not teacher.training


def test_gradient_accumulation_equals_large_batch(tiny_model, teacher_model, chat_rows):
    """The KD loss is a sum over targets like the token loss: 1 x 8 rows and 8 x 1 give the same update."""
    from tunesmith.data.packing import BatchPlan
    from tunesmith.train.distributed import Runner
    from tunesmith.train.step import train_step

    examples = tokenized(tiny_model, chat_rows)
    teacher = LiveTeacher(load_model(str(teacher_model))[0])
    results = []
    for batch_size, grad_accum in ((8, 1), (1, 8)):
        student, _ = load_model(str(tiny_model))
        plan = BatchPlan(examples, capacity=40, packing=True, batch_size=batch_size, grad_accum=grad_accum, seed=0)
        optimizer = torch.optim.SGD(student.parameters(), lr=1.0)  # the update is the gradient itself
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        step = train_step(
            Runner(student),
            plan.step(0, 0),
            optimizer,
            scheduler,
            None,
            torch.device("cpu"),
            None,
            objective=Distiller(teacher, forward_kl, 2.0, 0.5),
        )
        results.append((step.loss, [p.detach().clone() for p in student.parameters()]))
    (loss_a, params_a), (loss_b, params_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_kd_loss_when_the_student_is_the_teacher(tiny_model, chat_rows):
    batch = collate(tokenized(tiny_model, chat_rows[:4]))
    student, _ = load_model(str(tiny_model))
    teacher, _ = load_model(str(tiny_model))
    for divergence in (forward_kl, reverse_kl):
        with torch.no_grad():
            loss = Distiller(LiveTeacher(teacher), divergence, 2.0, 1.0)(student, batch)
        assert abs(loss.item()) < 1e-4 * batch.num_loss_tokens


# ---- the recipe end to end ----------------------------------------------------------------------------


def write_config(
    tmp_path: Path,
    student: Path,
    teacher: Path | str | None,
    rows: list,
    name: str = "run",
    distill: dict | None = None,
    train: dict | None = None,
) -> Path:
    config = {
        "model": str(student),
        "method": "distill",
        "distill": {**({"teacher": str(teacher)} if teacher is not None else {}), **(distill or {})},
        "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", rows)), "max_length": 64},
        "train": {
            "batch_size": 2,
            "lr": 5.0e-3,
            "warmup": 0,
            "progress": False,
            "eval_every": 1000,
            "save_every": 1000,
            **(train or {}),
        },
        "output_dir": str(tmp_path / name),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def logged(run_dir: Path, key: str = "loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row[key] for row in rows if key in row}


def held_out_kl(student, teacher, model_dir: Path) -> float:
    """KL(teacher || student) per target token at T = 1 on conversations the run never saw."""
    rows = [
        {"messages": [{"role": "user", "content": f"{question} {i}"}, {"role": "assistant", "content": label}]}
        for i, (question, label) in enumerate(
            [
                ("where is my card", "card_arrival"),
                ("fee for a transfer", "fee"),
                ("my phone was stolen", "lost_or_stolen_phone"),
                ("refund my money", "refund"),
            ],
            start=40,
        )
    ]
    batch = collate(tokenized(model_dir, rows))
    with torch.no_grad():
        return (
            Distiller(LiveTeacher(teacher), forward_kl, 1.0, 1.0)(student.eval(), batch).item() / batch.num_loss_tokens
        )


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_student_moves_toward_the_teacher(tmp_path, tiny_model, teacher_model, chat_rows, adapter):
    from tunesmith.engine.generation import Engine

    config = write_config(tmp_path, tiny_model, teacher_model, chat_rows, distill={"alpha": 1.0}, train={"epochs": 4})
    assert main(["train", str(config), f"adapter.type={adapter}"]) == 0
    run_dir = tmp_path / "run"
    losses = list(logged(run_dir).values())
    assert len(losses) >= 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses  # the KD loss falls
    teacher, _ = load_model(str(teacher_model))
    before, _ = load_model(str(tiny_model))
    after = Engine.load(str(run_dir)).model
    assert held_out_kl(after, teacher, tiny_model) < 0.8 * held_out_kl(before, teacher, tiny_model)
    assert (run_dir / ("adapter" if adapter == "lora" else "model")).is_dir()
    assert not (run_dir / "teacher-cache").exists()  # on the fly by default


def test_cache_is_written_once_and_gives_the_top_k_loss(tmp_path, tiny_model, teacher_model, chat_rows):
    """Step 1 (every example, a full fine-tuning student still at its base weights) equals the top-k math
    done by hand; a resumed run reads the cache instead of recomputing it and repeats the same losses."""
    from transformers import AutoModelForCausalLM

    config = write_config(
        tmp_path,
        tiny_model,
        teacher_model,
        chat_rows,
        distill={"cache": "disk", "top_k": 8},
        train={"batch_size": 64, "epochs": 2, "save_every": 1},
    )
    assert main(["train", str(config), "adapter.type=full"]) == 0
    run_dir, cache = tmp_path / "run", tmp_path / "run" / "teacher-cache"
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["top_k"] == 8 and manifest["examples"] == len(chat_rows)
    from safetensors.torch import load_file

    tensors = load_file(cache / "top_k.safetensors")
    assert tensors["logprobs"].shape[1] == 8 and tensors["indices"].dtype == torch.int32
    losses = logged(run_dir)

    student = AutoModelForCausalLM.from_pretrained(tiny_model)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_model)
    with torch.no_grad():
        expected = expected_loss(student, teacher, tokenized(tiny_model, chat_rows), 2.0, 0.5, top_k=8)
    assert losses[1] == pytest.approx(expected.item(), rel=1e-4)

    written = (cache / "top_k.safetensors").stat().st_mtime_ns
    shutil.rmtree(run_dir / "checkpoints" / "step-2")  # as if the run had stopped after step 1
    assert main(["train", str(config), "adapter.type=full"]) == 0
    assert (cache / "top_k.safetensors").stat().st_mtime_ns == written, "the cache was recomputed"
    assert logged(run_dir) == losses

    manifest["top_k"] = 4  # a cache made from other inputs is rebuilt, not trusted
    (cache / "manifest.json").write_text(json.dumps(manifest))
    assert main(["train", str(config), "adapter.type=full"]) == 0
    assert (cache / "top_k.safetensors").stat().st_mtime_ns != written
    assert json.loads((cache / "manifest.json").read_text())["top_k"] == 8


def test_a_cache_covering_the_vocabulary_equals_the_live_teacher(tmp_path, tiny_model, teacher_model, chat_rows):
    for name, section in (("live", {"cache": "none"}), ("cached", {"cache": "disk", "top_k": 100000})):
        config = write_config(
            tmp_path, tiny_model, teacher_model, chat_rows, name=name, distill=section, train={"max_steps": 2}
        )
        assert main(["train", str(config)]) == 0
    live, cached = logged(tmp_path / "live"), logged(tmp_path / "cached")
    assert list(cached.values()) == pytest.approx(list(live.values()), rel=1e-5)


def test_a_run_directory_is_a_teacher_with_its_adapter(tmp_path, tiny_model, teacher_model, chat_rows):
    from tunesmith.engine.generation import Engine

    sft_config = tmp_path / "teacher.yaml"
    sft_config.write_text(
        f"model: {teacher_model}\ndata: {{train: {write_jsonl(tmp_path / 't.jsonl', chat_rows)}, "
        f"max_length: 64}}\ntrain: {{max_steps: 3, lr: 1.0e-2, progress: false}}\n"
        f"output_dir: {tmp_path / 'teacher-run'}\n"
    )
    assert main(["train", str(sft_config)]) == 0
    config = write_config(
        tmp_path,
        tiny_model,
        tmp_path / "teacher-run",
        chat_rows,
        distill={"alpha": 1.0},
        train={"batch_size": 64, "max_steps": 1},
    )
    assert main(["train", str(config), "adapter.type=full"]) == 0
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(tiny_model)
    examples = tokenized(tiny_model, chat_rows)
    with torch.no_grad():
        with_adapter = expected_loss(student, Engine.load(str(tmp_path / "teacher-run")).model, examples, 2.0, 1.0)
        base_only = expected_loss(student, AutoModelForCausalLM.from_pretrained(teacher_model), examples, 2.0, 1.0)
    assert logged(tmp_path / "run")[1] == pytest.approx(with_adapter.item(), rel=1e-4)
    assert with_adapter.item() != pytest.approx(base_only.item(), rel=1e-3)


# ---- user mistakes ----------------------------------------------------------------------------------------


def test_a_missing_teacher_is_a_config_error(tmp_path, tiny_model, chat_rows, capsys):
    config = write_config(tmp_path, tiny_model, None, chat_rows)
    assert main(["train", str(config)]) == 2
    error = capsys.readouterr().err
    assert "distill.teacher" in error and "fix:" in error and "Traceback" not in error
    assert not (tmp_path / "run").exists(), "refused before any compute"


def test_a_teacher_that_does_not_exist_is_a_user_error(tmp_path, tiny_model, chat_rows, capsys):
    config = write_config(tmp_path, tiny_model, tmp_path / "no-such-model", chat_rows)
    assert main(["train", str(config)]) == 2
    assert "distill.teacher=" in capsys.readouterr().err


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path, tiny_model, chat_rows, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = tmp_path / "other-vocabulary"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.add_tokens(["<|extra|>"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    for cache in ("none", "disk"):
        config = write_config(tmp_path, tiny_model, other, chat_rows, name=f"run-{cache}", distill={"cache": cache})
        assert main(["train", str(config)]) == 2
        error = capsys.readouterr().err
        assert "do not share a vocabulary" in error and str(other) in error and str(tiny_model) in error
