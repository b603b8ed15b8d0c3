"""A fine-tuning job through the service on the real default model, with the official `openai` client.

Starts `tunesmith serve` (its own home under a temporary directory, one worker), uploads banking77 rows as chat
data (the bundled slice: training rows and held-out test rows as the validation file), runs a supervised job,
and prints the job's timing, its closing evaluation (fine-tuned vs base perplexity on the validation file, with
95% intervals) and a few answers of the fine-tuned model next to the base model's.

    python bench/service_job.py --train-rows 300 --validation-rows 100 --epochs 1

Writes bench/service_job.json. Needs `pip install -e '.[test]'` (for the openai client).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "Name the intent of this banking customer's message."


def spread(path: Path, count: int) -> list[dict]:
    """`count` rows taken evenly through the file (it is sorted by label), so every intent appears."""
    lines = path.read_text(encoding="utf-8").splitlines()
    step = max(1, len(lines) // count)
    picked = [json.loads(line) for line in lines[::step][:count]]
    return [
        {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": row["text"]},
                {"role": "assistant", "content": row["label"]},
            ]
        }
        for row in picked
    ]


def write(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--train-rows", type=int, default=300)
    parser.add_argument("--validation-rows", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "service_job.json")
    args = parser.parse_args()
    import openai

    work = Path(tempfile.mkdtemp(prefix="tunesmith-service-job-"))
    port = free_port()
    service_home = ["--home", str(work / "home")]  # the service's state; models come from the usual cache
    key = subprocess.run(
        [sys.executable, "-m", "tunesmith", "keys", "create", *service_home, "--project", "bench", "--scope", "write"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[-1]
    log = open(work / "serve.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "tunesmith", "serve", *service_home, "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        api = openai.OpenAI(api_key=key, base_url=f"http://127.0.0.1:{port}/v1", max_retries=5, timeout=600)
        for _ in range(120):
            try:
                api.models.list()
                break
            except openai.APIConnectionError:
                time.sleep(0.5)
        data = ROOT / "data" / "banking77"
        train_path = write(spread(data / "train.jsonl", args.train_rows), work / "train.jsonl")
        train = api.files.create(file=train_path.open("rb"), purpose="fine-tune")
        validation_rows = spread(data / "test.jsonl", args.validation_rows)
        valid = api.files.create(file=write(validation_rows, work / "valid.jsonl").open("rb"), purpose="fine-tune")
        started = time.time()
        job = api.fine_tuning.jobs.create(
            model=args.model,
            training_file=train.id,
            validation_file=valid.id,
            suffix="banking77",
            hyperparameters={"n_epochs": args.epochs},
        )
        while job.status not in ("succeeded", "failed", "cancelled"):
            time.sleep(2)
            job = api.fine_tuning.jobs.retrieve(job.id)
        elapsed = time.time() - started
        events = [event.message for event in api.fine_tuning.jobs.list_events(job.id, limit=100)][::-1]
        if job.status != "succeeded":
            print("\n".join(events[-10:]), file=sys.stderr)
            print(job.error, file=sys.stderr)
            return 1
        report = json.loads(api.files.content(job.result_files[0]).read())
        answers = []
        for row in validation_rows[:: max(1, len(validation_rows) // 8)][:8]:
            prompt, expected = row["messages"][:2], row["messages"][2]["content"]
            replies = {
                name: api.chat.completions.create(model=name, messages=prompt, temperature=0, max_tokens=16)
                .choices[0]
                .message.content
                for name in (job.fine_tuned_model, args.model)
            }
            answers.append(
                {
                    "input": prompt[1]["content"],
                    "expected": expected,
                    "fine_tuned": replies[job.fine_tuned_model],
                    "base": replies[args.model],
                }
            )
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    summary = {
        "model": args.model,
        "train_rows": args.train_rows,
        "validation_rows": args.validation_rows,
        "epochs": args.epochs,
        "job_seconds": round(elapsed, 1),
        "trained_tokens": job.trained_tokens,
        "hyperparameters": job.hyperparameters.model_dump(),
        "evaluation": {
            "task": report["task"],
            "n": report["n"],
            "fine_tuned": report["metrics"],
            "base": report["baselines"]["base"]["metrics"],
            "difference": report["comparisons"]["base"],
        },
        "evaluation_event": next(e for e in events if e.startswith("Evaluation on")),
        "answers": answers,
        "machine": f"{os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
    }
    args.output.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(f"job {job.id}: {job.status} in {elapsed:.0f} s, {job.trained_tokens} trained tokens")
    print(summary["evaluation_event"])
    exact = sum(a["fine_tuned"].strip() == a["expected"] for a in answers)
    base_exact = sum(a["base"].strip() == a["expected"] for a in answers)
    print(f"answers: fine-tuned exact {exact}/{len(answers)}, base {base_exact}/{len(answers)}")
    for answer in answers:
        print(
            f"  {answer['input'][:50]!r}: expected {answer['expected']}; fine-tuned {answer['fine_tuned']!r}; "
            f"base {answer['base'][:40]!r}"
        )
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
