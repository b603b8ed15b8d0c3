"""A bounded load test of `tunesmith serve` on loopback with the official `openai` client (issue 21's evidence).

The real default model is served with two fine-tuned LoRA runs beside it (`--model NAME=RUN_DIR`). Clients
(16 threads) send 300 streamed chat requests, cycling through the base model and the two adapters; 20% of the
streams are dropped mid-way (the client closes the connection after a few chunks). Every finished reply is
greedy, so it is compared with the reply the same model gives alone, computed first through the same server with
one request at a time: a reply equal to another model's and not its own is a wrong adapter; any other
difference is counted apart (batched and alone padding can flip a near-tie). A request that takes longer than
`--hang-seconds` is a hang.

The same load runs against two servers in one sitting: batches of up to 8 rows (the default) and `--max-batch 1`
(one reply at a time per base, as before batched generation). Prints and writes bench/serve_load.json: per server,
p50/p95 latency of the finished replies, time to first token, generated tokens/s over the run, errors, hangs,
wrong adapters, and the batched/one-at-a-time throughput ratio.
sigterm_returncode -15 is the graceful end: uvicorn re-raises the signal once it has shut down.

    python bench/serve_load.py --intent RUN_DIR --dialogue RUN_DIR

RUN_DIRs are finished LoRA runs of smollm2-135m-instruct, e.g. (a few minutes each on 2 cores):
    tunesmith train examples/banking77-lora.yaml train.max_steps=40 output_dir=runs/intent-lora
    tunesmith train examples/dialogue-lora.yaml train.max_steps=15 output_dir=runs/dialogue-lora
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "banking77" / "test.jsonl"
BASE = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace, home: Path, max_batch: int, log: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "tunesmith",
        "serve",
        "--home",
        str(home),
        "--port",
        str(port),
        "--workers",
        "0",
        "--model",
        f"intent={args.intent}",
        "--model",
        f"dialogue={args.dialogue}",
        "--max-batch",
        str(max_batch),
        "--threads",
        str(args.threads),
    ]
    server = subprocess.Popen(
        command,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "TUNESMITH_HOME": str(home)},
    )
    deadline = time.time() + 180
    while time.time() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return server, port
        if server.poll() is not None:
            raise SystemExit(f"serve exited with {server.returncode}; see {log}")
        time.sleep(0.3)
    raise SystemExit(f"serve did not listen within 180 s; see {log}")


def make_key(home: Path) -> str:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunesmith",
            "keys",
            "create",
            "--home",
            str(home),
            "--project",
            "bench",
            "--scope",
            "read",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "TUNESMITH_HOME": str(home)},
    )
    return out.stdout.split()[-1]


def prompts(count: int) -> list[str]:
    lines = DATA.read_text(encoding="utf-8").splitlines()
    step = max(1, len(lines) // count)
    return [json.loads(line)["text"] for line in lines[::step][:count]]


def ask(client, model: str, text: str, max_tokens: int, drop_after: int | None, hang: float) -> dict:
    """One streamed request; `drop_after`: close the stream after that many chunks."""
    started, first, pieces, finish, chunks = time.monotonic(), None, [], None, 0
    try:
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": text}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            timeout=hang,
        )
        tokens = 0
        for chunk in stream:
            chunks += 1
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.delta.content:
                    first = first or time.monotonic()
                    pieces.append(choice.delta.content)
                finish = choice.finish_reason or finish
            if drop_after is not None and chunks >= drop_after:
                stream.close()
                return {"model": model, "text": text, "dropped": True, "seconds": time.monotonic() - started}
        return {
            "model": model,
            "text": text,
            "reply": "".join(pieces),
            "finish": finish,
            "tokens": tokens,
            "seconds": time.monotonic() - started,
            "first_token": (first or time.monotonic()) - started,
        }
    except Exception as error:  # noqa: BLE001 - counted: a timeout is a hang, anything else an error
        kind = "hang" if "timed out" in str(error).lower() or "timeout" in type(error).__name__.lower() else "error"
        return {
            "model": model,
            "text": text,
            kind: f"{type(error).__name__}: {error}",
            "seconds": time.monotonic() - started,
        }


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def load(args: argparse.Namespace, max_batch: int, texts: list[str], work: Path) -> dict:
    import openai

    home = work / f"home-{max_batch}"
    key = make_key(home)
    server, port = start_server(args, home, max_batch, work / f"serve-{max_batch}.log")
    try:
        client = openai.OpenAI(api_key=key, base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
        models = [BASE, "intent", "dialogue"]
        # the reference: each (model, prompt) alone, one request at a time
        reference = {
            (model, text): ask(client, model, text, args.max_tokens, None, args.hang_seconds).get("reply")
            for model in models
            for text in texts
        }
        plan = [(models[i % 3], texts[(i // 3) % len(texts)], 3 if i % 5 == 4 else None) for i in range(args.requests)]
        started = time.monotonic()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(lambda p: ask(client, p[0], p[1], args.max_tokens, p[2], args.hang_seconds), plan))
        elapsed = time.monotonic() - started
        alive = ask(client, "intent", texts[0], 4, None, 60)  # the server still answers afterwards
        stop_started = time.monotonic()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        stop_seconds = time.monotonic() - stop_started
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    done = [r for r in results if "reply" in r]
    wrong = [
        r
        for r in done
        if r["reply"] != reference[(r["model"], r["text"])]
        and any(r["reply"] == reference[(other, r["text"])] for other in models if other != r["model"])
    ]
    differing = [r for r in done if r["reply"] != reference[(r["model"], r["text"])] and r not in wrong]
    latencies = [r["seconds"] for r in done]
    tokens = sum(r["tokens"] for r in done)
    return {
        "max_batch": max_batch,
        "requests": len(plan),
        "finished": len(done),
        "dropped": sum("dropped" in r for r in results),
        "errors": [r["error"] for r in results if "error" in r],
        "hangs": sum("hang" in r for r in results),
        "wrong_adapter": len(wrong),
        "differs_from_alone_otherwise": len(differing),
        "seconds": round(elapsed, 1),
        "p50_s": round(percentile(latencies, 0.5), 2),
        "p95_s": round(percentile(latencies, 0.95), 2),
        "first_token_p50_s": round(percentile([r["first_token"] for r in done], 0.5), 2),
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / elapsed, 1),
        "answers_after_load": "reply" in alive,
        "sigterm_exit_s": round(stop_seconds, 1),
        "sigterm_returncode": server.returncode,
        "prompts_whose_three_replies_differ": sum(len({reference[(m, t)] for m in models}) == 3 for t in texts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--intent", required=True, help="a finished LoRA run directory (banking77 intents)")
    parser.add_argument("--dialogue", required=True, help="a second finished LoRA run directory")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=20, help="distinct banking77 test messages")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2, help="serve --threads")
    parser.add_argument("--hang-seconds", type=float, default=300)
    parser.add_argument("--batches", default="8,1", help="the --max-batch values to compare, in one sitting")
    parser.add_argument("--output", default=str(ROOT / "bench" / "serve_load.json"))
    args = parser.parse_args()
    texts = prompts(args.prompts)
    with tempfile.TemporaryDirectory(prefix="tunesmith-load-") as work:
        runs = [load(args, int(size), texts, Path(work)) for size in args.batches.split(",")]
    result = {
        "command": " ".join(["python", "bench/serve_load.py", *sys.argv[1:]]),
        "cpu": _cpu(),
        "cores": os.cpu_count(),
        "runs": runs,
    }
    if len(runs) == 2:
        result["throughput_ratio"] = round(runs[0]["tokens_per_s"] / runs[1]["tokens_per_s"], 2)
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=1))


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
