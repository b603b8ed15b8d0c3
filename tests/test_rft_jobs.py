"""Reinforcement fine-tuning jobs (method `reinforcement`) and pause/resume, through the official `openai` SDK against
a live service on loopback with a tiny base model."""

from __future__ import annotations

import io
import json

import pytest
from service_fixtures import live_app, make_key, wait_for, write_rows
from test_rft import MULTI
from test_rl import PROMPTS as RL_PROMPTS
from test_service import finished

openai = pytest.importorskip("openai")

PROMPTS = [  # OpenAI's RFT rows: a conversation to answer, and fields the grader reads
    {"messages": [{"role": "user", "content": row["prompt"]}], "answer": row["answer"]} for row in RL_PROMPTS
]
HELD_OUT = [  # the validation file: with a developer message (read as the system turn)
    {"messages": [{"role": "developer", "content": "Answer."}, *row["messages"]], "answer": row["answer"]}
    for row in PROMPTS[:4]
]
SLOW_GRADER = {
    "type": "python",
    "name": "length",
    "source": "def grade(sample, item):\n    return min(len(sample['output_text']), 20) / 20\n",
}
GRADER = MULTI  # its `answer` grader reads a field of each row: a job whose rows lack it is refused
# A tiny model learns the spaces grader within these steps (test_rl.LEARNS_IN_8_STEPS, in the API's terms)
LEARNABLE = {"n_epochs": 10, "batch_size": 4, "learning_rate_multiplier": 100, "compute_multiplier": 2}


@pytest.fixture
def service(tmp_path, tiny_model):
    from tunesmith.serve.service import Service, Settings

    home, models = tmp_path / "home", {"tiny": str(tiny_model)}
    return Service(Settings(home=home, base_models=models, max_upload_bytes=64 << 10, reply_tokens=12))


def upload(api, rows: list[dict], name: str, tmp_path):
    return api.files.create(file=write_rows(tmp_path / name, rows).open("rb"), purpose="fine-tune")


def reinforcement(hyperparameters: dict, grader: dict = GRADER) -> dict:
    return {"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": hyperparameters}}


def adapter_tensors(service, job_id: str) -> dict:
    from safetensors.torch import load

    return load(service.adapter_files(job_id)["adapter_model.safetensors"])


def test_a_reinforcement_job_learns_its_grader_and_its_result_file_compares_it_with_its_base(service, tmp_path):
    with live_app(service) as base_url:
        api = openai.OpenAI(api_key=make_key(service, "acme", "write"), base_url=base_url, max_retries=0, timeout=60)
        train = upload(api, PROMPTS, "train.jsonl", tmp_path)
        valid = upload(api, HELD_OUT, "valid.jsonl", tmp_path)
        method = reinforcement({**LEARNABLE, "eval_interval": 4, "eval_samples": 3})
        job = api.fine_tuning.jobs.create(
            model="tiny", training_file=train.id, validation_file=valid.id, seed=3, method=method
        )
        assert job.method.type == "reinforcement" and job.method.reinforcement.grader.type == "multi"
        job = finished(api, job.id)
        assert job.status == "succeeded", job.error
        shown = job.method.reinforcement.hyperparameters
        assert (shown.n_epochs, shown.batch_size, shown.eval_interval, shown.eval_samples) == (10, 4, 4, 3)
        assert shown.compute_multiplier == 2 and shown.reasoning_effort == "default"

        events = list(reversed(list(api.fine_tuning.jobs.list_events(job.id, limit=100))))
        steps = [e.data for e in events if e.type == "metrics" and "reward" in (e.data or {})]
        assert [s["step"] for s in steps] == list(range(1, 21))
        for step in steps:  # per grader (multi: each of its graders), KL and reply length, every step
            assert step["reward"] == pytest.approx(step["reward_grader_spaces"] + 0.1 * step["reward_grader_answer"])
            assert step["kl"] >= 0 and step["response_length"] > 0
        first, last = [s["reward"] for s in steps[:4]], [s["reward"] for s in steps[-4:]]
        assert sum(last) / 4 > sum(first) / 4 + 0.05, [s["reward"] for s in steps]
        evaluations = [e.data for e in events if e.type == "metrics" and "val_reward" in (e.data or {})]
        assert [e["step"] for e in evaluations] == [4, 8, 12, 16, 20] and "val_reward_grader_spaces" in evaluations[0]

        # the result file: the held-out grader score of the tuned model against its base, with intervals
        result = json.loads(api.files.content(job.result_files[0]).read())
        assert result["task"] == "reward" and result["n"] == 4 and result["settings"]["grader"]
        tuned, base = result["metrics"]["mean_reward"], result["baselines"]["base"]["metrics"]["mean_reward"]
        assert tuned["ci95"][0] <= tuned["value"] <= tuned["ci95"][1] and base["value"] < tuned["value"]
        difference = result["comparisons"]["base"]["mean_reward"]
        assert difference["diff"] == pytest.approx(tuned["value"] - base["value"])
        assert difference["ci95"][0] <= difference["diff"] <= difference["ci95"][1]


def test_a_paused_job_resumes_where_it_stopped_bit_for_bit(service, tmp_path, monkeypatch):
    """Two reinforcement jobs alike, one paused once its worker has read its first step (of 6) and resumed: the same
    adapter, tensor for tensor. Nothing of the paused job is plaintext meanwhile."""
    from tunesmith.serve.worker import JobRun

    paused: list = []  # the pause request's reply, sent from the worker's thread as it reads step 1 of `again`
    read = JobRun.record_metrics

    def pause_at_step_one(run, row):
        if target and run.job["id"] == target[0] and row.get("step") == 1 and "loss" in row and not paused:
            paused.append(api.fine_tuning.jobs.pause(target[0]))
        read(run, row)

    monkeypatch.setattr(JobRun, "record_metrics", pause_at_step_one)
    target: list = []
    with live_app(service) as base_url:
        api = openai.OpenAI(api_key=make_key(service, "acme", "write"), base_url=base_url, max_retries=0, timeout=60)
        train = upload(api, PROMPTS, "train.jsonl", tmp_path)
        # a python grader: each step waits on its sandbox, so the run is still going when the pause lands
        method = reinforcement({"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 100}, SLOW_GRADER)
        job = api.fine_tuning.jobs.create(model="tiny", training_file=train.id, seed=3, method=method)
        assert finished(api, job.id).status == "succeeded"
        again = api.fine_tuning.jobs.create(model="tiny", training_file=train.id, seed=3, method=method)
        target.append(again.id)
        wait_for(lambda: paused, 120, what="step 1")
        assert paused[0].status == "running"  # until its worker has checkpointed it
        wait_for(lambda: api.fine_tuning.jobs.retrieve(again.id).status == "paused", 120, what="the pause")
        paused_at = max(c.step_number for c in api.fine_tuning.jobs.checkpoints.list(again.id))
        assert 1 <= paused_at < 6
        assert not service.work_dir(again.id).exists()  # no plaintext while paused: the run is sealed
        with pytest.raises(openai.BadRequestError) as refused:
            api.fine_tuning.jobs.pause(again.id)
        assert refused.value.code == "job_not_pausable"
        assert api.fine_tuning.jobs.resume(again.id).status == "queued"
        resumed = finished(api, again.id)
        assert resumed.status == "succeeded", resumed.error
        messages = [e.message for e in api.fine_tuning.jobs.list_events(again.id, limit=100)]
        assert any(m.startswith(f"Fine-tuning job paused at step {paused_at}") for m in messages)
        assert any("Restored the run from its sealed checkpoint" in m for m in messages)
        with pytest.raises(openai.BadRequestError) as refused:
            api.fine_tuning.jobs.resume(again.id)
        assert refused.value.code == "job_not_resumable"

    ours, theirs = adapter_tensors(service, job.id), adapter_tensors(service, again.id)
    assert ours.keys() == theirs.keys() and all((ours[name] == theirs[name]).all() for name in ours)


def test_a_paused_job_can_be_cancelled_and_its_sealed_run_is_erased(service, tmp_path):
    """Pausing a queued job (no worker runs here) pauses it at once; cancelling it erases what it kept."""
    with live_app(service, worker=False) as base_url:
        api = openai.OpenAI(api_key=make_key(service, "acme", "write"), base_url=base_url, max_retries=0, timeout=60)
        train = upload(api, PROMPTS, "train.jsonl", tmp_path)
        job = api.fine_tuning.jobs.create(model="tiny", training_file=train.id, method=reinforcement({}))
        wait_for(lambda: api.fine_tuning.jobs.retrieve(job.id).status == "queued", 30, what="validation")
        assert api.fine_tuning.jobs.pause(job.id).status == "paused"
        service.blobs.put_stream(service.sealed_run(job.id), io.BytesIO(b"a sealed run"))
        assert api.fine_tuning.jobs.cancel(job.id).status == "cancelled"
        assert not service.blobs.exists(service.sealed_run(job.id))


def bad(api, **body) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as refused:
        api.fine_tuning.jobs.create(model="tiny", **body)
    return refused.value


def failed_validation(api, **body):
    job = api.fine_tuning.jobs.create(model="tiny", **body)
    job = finished(api, job.id, timeout=60)
    assert job.status == "failed"
    return job.error


def test_reinforcement_mistakes_are_refused_before_a_job_is_queued_naming_the_field(service, tmp_path):
    with live_app(service, worker=False) as base_url:
        api = openai.OpenAI(api_key=make_key(service, "acme", "write"), base_url=base_url, max_retries=0, timeout=60)
        train = upload(api, PROMPTS, "train.jsonl", tmp_path)
        valid = upload(api, PROMPTS[:2], "valid.jsonl", tmp_path)
        no_answer = upload(
            api, [{k: v for k, v in row.items() if k != "answer"} for row in PROMPTS], "x.jsonl", tmp_path
        )

        error = bad(api, training_file=train.id, method=reinforcement({}, {"type": "string_check", "name": "x"}))
        assert error.code == "invalid_grader" and error.param.startswith("method.reinforcement.grader")
        unknown = {**GRADER, "calculate_output": "spaces + answr"}
        error = bad(api, training_file=train.id, method=reinforcement({}, unknown))
        assert "answr" in error.message and error.param.startswith("method.reinforcement.grader")
        error = bad(api, training_file=train.id, method={"type": "reinforcement", "reinforcement": {}})
        assert error.param == "method.reinforcement.grader"
        error = bad(api, training_file=train.id, method=reinforcement({"beta": 0.1}))
        assert error.param == "method.reinforcement.hyperparameters.beta" and "eval_samples" in error.message
        error = bad(api, training_file=train.id, method=reinforcement({"compute_multiplier": 100}))
        assert error.param == "method.reinforcement.hyperparameters.compute_multiplier"
        error = bad(api, training_file=train.id, method=reinforcement({"eval_samples": 2}))  # no validation file
        assert error.param == "method.reinforcement.hyperparameters.eval_samples"

        error = failed_validation(api, training_file=no_answer.id, method=reinforcement({}))
        assert error.param == "training_file" and "x.jsonl:1:" in error.message and "item.answer" in error.message
        error = failed_validation(
            api, training_file=train.id, validation_file=valid.id, method=reinforcement({"eval_samples": 5})
        )
        assert error.param == "method.reinforcement.hyperparameters.eval_samples" and "has 2 examples" in error.message
        error = failed_validation(api, training_file=train.id, method=reinforcement({"reasoning_effort": "high"}))
        assert error.param == "method.reinforcement.hyperparameters.reasoning_effort"
        assert "no reasoning switch" in error.message
