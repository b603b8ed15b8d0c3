"""A live tunesmith service on loopback for the service tests: the app under uvicorn in a thread (or the real
`tunesmith serve` / `tunesmith worker` commands as processes), a tiny base model, keys per scope."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

MARKER = "zebracornflakes"  # a word of the training data that must never be found on disk in plaintext


def files_containing(root: Path, needle: bytes) -> list[Path]:
    """The files under `root` that hold `needle`; a running job prunes checkpoints meanwhile, so what vanishes
    while it is walked is skipped."""
    found = []
    for directory, _, names in os.walk(root):  # os.walk passes over a directory that vanishes; rglob raises
        for name in names:
            path = Path(directory) / name
            try:
                if needle in path.read_bytes():
                    found.append(path)
            except (FileNotFoundError, IsADirectoryError):
                continue
    return found


def training_rows(count: int = 12, marker: str = MARKER) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"what is the capital of France? ({marker} {i % 3})"},
                {"role": "assistant", "content": "Paris is the capital."},
            ]
        }
        for i in range(count)
    ]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_key(service, project: str, scope: str) -> str:
    from tunesmith.security import apikeys

    key = apikeys.new_key()
    service.store.add_key(key.key_id, project, scope, key.hash)
    return key.secret


@contextlib.contextmanager
def live_app(service, worker: bool = True, lease_seconds: float = 5.0) -> Iterator[str]:
    """The app under uvicorn on a free loopback port (and a worker thread); yields the /v1 base URL."""
    import uvicorn

    from tunesmith.serve.api import create_app
    from tunesmith.serve.worker import Worker

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    runner = Worker(service, lease_seconds=lease_seconds, poll_seconds=0.2) if worker else None
    if runner is not None:
        threading.Thread(target=runner.serve_forever, daemon=True).start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        if runner is not None:
            runner.stop()
        server.should_exit = True
        thread.join(timeout=10)


def start_command(args: list[str], home: Path, log: Path) -> subprocess.Popen:
    """`python -m tunesmith ARGS` with TUNESMITH_HOME=home, its output in `log`."""
    env = {**os.environ, "TUNESMITH_HOME": str(home), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "tunesmith", *args],
        env=env,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def wait_for_port(port: int, timeout: float = 60) -> None:
    def listening() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_for(listening, timeout, what=f"a server on port {port}")


def record_generations(monkeypatch) -> list[list[int]]:
    """Every reply the engine (or the service's batching scheduler) generates from now on (its token ids, in the
    order the replies end), with the end-of-turn token switched off so that only max_tokens, or the request being
    stopped, ends a reply."""
    from tunesmith.engine.generation import Engine
    from tunesmith.serve.batching import Scheduler

    generated, generate_ids, finish = [], Engine.generate_ids, Scheduler._finish

    def recording(*args, **kwargs) -> list[int]:
        generated.append(generate_ids(*args, **kwargs))
        return generated[-1]

    def recording_rows(rows, end) -> None:
        generated.extend(list(row.tokens) for row in rows)
        finish(rows, end)

    monkeypatch.setattr(Engine, "generate_ids", recording)
    monkeypatch.setattr(Scheduler, "_finish", staticmethod(recording_rows))
    monkeypatch.setattr(Engine, "stop_ids", lambda self: [10**6])
    return generated
