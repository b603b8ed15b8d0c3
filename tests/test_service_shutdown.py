"""SIGTERM drains (issue 21): replies being generated end within DRAIN_SECONDS as at max_tokens, their clients get a
well-formed end, and the server exits within 10 s, where it used to wait for every reply to run its course."""

from __future__ import annotations

import signal
import threading
import time

import pytest
from service_fixtures import free_port, make_key, wait_for_port

openai = pytest.importorskip("openai")


@pytest.mark.parametrize("stream", [True, False])
def test_sigterm_ends_the_reply_in_flight_and_exits_within_ten_seconds(tmp_path, tiny_model, monkeypatch, stream):
    from tunesmith.engine.generation import Engine
    from tunesmith.serve import api as api_module
    from tunesmith.serve import batching
    from tunesmith.serve.inference import AdapterPool
    from tunesmith.serve.service import Service, Settings

    sample, sampled = batching._sample, threading.Semaphore(0)

    def slow_sample(*args):  # 20 tokens a second: 900 tokens would take 45 s
        time.sleep(0.05)
        sampled.release()
        return sample(*args)

    monkeypatch.setattr(batching, "_sample", slow_sample)
    monkeypatch.setattr(Engine, "stop_ids", lambda self: [10**6])  # only max_tokens (or the drain) ends a reply
    service = Service(Settings(home=tmp_path / "home", base_models={"tiny": str(tiny_model)}))
    key, port, pool = make_key(service, "acme", "read"), free_port(), AdapterPool()
    server = api_module.DrainingServer(api_module.create_app(service, pool), pool, host="127.0.0.1", port=port)
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    wait_for_port(port)
    client = openai.OpenAI(api_key=key, base_url=f"http://127.0.0.1:{port}/v1", max_retries=0, timeout=60)
    replies: list = []

    def ask() -> None:
        if stream:
            replies.extend(
                client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=900, stream=True
                )
            )
        else:
            replies.append(client.completions.create(model="tiny", prompt="hello", max_tokens=900))

    asking = threading.Thread(target=ask)
    asking.start()
    assert sampled.acquire(timeout=60)  # generation has started
    started = time.monotonic()
    server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
    asking.join(timeout=10)
    assert replies and replies[-1].choices[0].finish_reason == "length"  # a well-formed end, not a cut connection
    if stream:
        assert sum(bool(chunk.choices[0].delta.content) for chunk in replies) < 900
    else:
        assert replies[0].usage.completion_tokens < 900
    serving.join(timeout=10)
    assert not serving.is_alive() and time.monotonic() - started < 10
