"""The python grader and its sandbox: a grade(sample, item) scores samples; broken sources are refused before any
sample is graded; and the code cannot reach the network, write outside its scratch directory, fork without bound,
see the caller's environment, or outlive its time limit.

Protections rest on what the machine offers (bubblewrap's namespaces, a pids cgroup); where one is missing, the
test asserts what the sandbox reports and does instead, and says so in a warning rather than skipping.
CPU only, a few seconds each.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import pytest

from tunesmith.errors import UserError
from tunesmith.eval.graders import GraderFailure, Sample, run_grader, sandbox, validate_grader
from tunesmith.eval.graders.python import run_grade

GSM8K = """
import re

def grade(sample, item):
    found = re.search(r"####\\s*(-?[\\d,.]+)", sample["output_text"])
    return 1.0 if found and found.group(1).replace(",", "") == item["answer"] else 0.0
"""
QUICK = sandbox.Limits(seconds=1.0)


def python_grader(source: str, **extra) -> dict:
    return {"type": "python", "name": "p", "source": source, **extra}


def problems_of(spec: dict) -> list[str]:
    with pytest.raises(UserError) as refused:
        validate_grader(spec)
    return [str(problem) for problem in refused.value.problems]


def enforced(protection: str) -> bool:
    return sandbox.enforcement()[protection] is not None


def stray_processes(under: Path) -> list[str]:
    """Processes whose command line names a path under `under` (each run's scratch directory is its argument)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(under) in command:
                found.append(f"{entry.name}: {command[:120]}")
    return found


@pytest.fixture(params=["this machine", "no cgroup", "no bubblewrap, no cgroup"])
def machine(request, monkeypatch) -> str:
    """Each sandbox test runs with what this machine offers, and as on machines offering less (a user who is not
    root has no cgroup; a container may refuse namespaces): each must still do what it reports."""
    here = sandbox.probe_machine()
    if request.param == "no cgroup":
        monkeypatch.setattr(sandbox, "probe_machine", lambda: replace(here, cgroup=None, cgroup_version=""))
    elif request.param != "this machine":
        bare = sandbox.Machine(bwrap=None, bwrap_version="", cgroup=None, cgroup_version="")
        monkeypatch.setattr(sandbox, "probe_machine", lambda: bare)
    return request.param


@pytest.fixture
def scratch_root(tmp_path, monkeypatch) -> Path:
    """Runs' scratch directories under a folder of this test's own, so that its processes can be found by name."""
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


# ---- the grader ------------------------------------------------------------------------------------------------------


def test_a_gsm8k_grader_scores_the_number_after_the_hashes():
    spec = python_grader(GSM8K)
    validate_grader(spec)
    assert run_grader(spec, "6 * 7 = 42\n#### 42", {"answer": "42"}).reward == 1.0
    wrong = run_grader(spec, "6 * 7 = 41\n#### 41", {"answer": "42"})
    assert wrong.reward == 0.0 and not any(value is True for value in wrong.errors.values())


def test_the_sample_holds_the_reply_as_text_and_as_json_and_the_item_arrives_whole():
    source = "def grade(sample, item):\n    return sample['output_json']['score'] if sample['output_json'] else -1\n"
    assert run_grader(python_grader(source), '{"score": 0.25}').reward == 0.25
    assert run_grader(python_grader(source), "not json").reward == -1.0
    source = "def grade(sample, item):\n    return float(item['gap'] != item['gap'] and item['n'] == [1, 'a'])\n"
    assert run_grader(python_grader(source), "x", {"gap": float("nan"), "n": [1, "a"]}).reward == 1.0


@pytest.mark.parametrize(
    "body, detail",
    [
        ("return 1 / 0", "ZeroDivisionError: division by zero (line 3 of the grader source)"),
        ("return float('nan')", "grade returned nan, not a finite number"),
        ("return 'yes'", "grade returned 'yes', not a finite number"),
        ("return {1}", "TypeError: set is not JSON"),
        ("raise SystemExit(3)", "SystemExit: 3"),
    ],
)
def test_a_grade_that_raises_or_returns_no_number_fails_with_the_reason(body, detail):
    result = run_grader(python_grader(f"\ndef grade(sample, item):\n    {body}\n"), "42", {})
    assert result.reward == 0.0 and result.errors["python_grader_runtime_error"]
    assert detail in result.errors["python_grader_runtime_error_details"]


def test_check_names_a_syntax_error_s_line_and_column():
    (problem,) = problems_of(python_grader("import re\ndef grade(sample, item)\n    return 1.0\n"))
    assert problem.startswith("grader.source: line 2, column 24: expected ':'")


@pytest.mark.parametrize(
    "source, message",
    [
        ("def score(sample, item):\n    return 1.0\n", "defines no top-level function grade"),
        ("class A:\n    def grade(self, sample, item):\n        return 1\n", "defines no top-level function grade"),
        ("def grade(sample):\n    return 1.0\n", "grade takes (sample), but it is called as grade(sample, item)"),
        ("def grade(a, b, c):\n    return 1.0\n", "grade takes (a, b, c)"),
        ("async def grade(sample, item):\n    return 1.0\n", "grade is async"),
        ("return 1.0\n", "'return' outside function"),
        ("", "is not Python source"),
        (3, "is not Python source"),
    ],
)
def test_check_refuses_a_source_without_a_callable_grade(source, message):
    (problem,) = problems_of(python_grader(source))
    assert problem.startswith("grader.source: ") and message in problem


def test_check_takes_grade_with_defaults_or_varargs():
    validate_grader(python_grader("def grade(sample, item, strict=True):\n    return 1.0\n"))
    validate_grader(python_grader("def grade(*args):\n    return 1.0\n"))


def test_check_refuses_image_tag_a_large_source_and_unknown_keys_all_at_once():
    spec = python_grader("x = 1\n" * 50_000 + GSM8K, image_tag="2025-05-08", timeout=5)
    problems = problems_of(spec)
    assert any(p.startswith("grader.image_tag: '2025-05-08'") and "remove image_tag" in p for p in problems)
    assert any(p.startswith("grader.source: is 300,") and "less than 262,144" in p for p in problems)
    assert any(p.startswith("grader.timeout: is not a known key") for p in problems)


# ---- the sandbox -----------------------------------------------------------------------------------------------------


def test_the_report_names_a_mechanism_or_none_for_every_protection():
    report = sandbox.enforcement()
    assert set(report) == {
        "network",
        "filesystem",
        "processes",
        "cpu_time",
        "memory",
        "file_size",
        "wall_clock",
        "environment",
    }
    assert report["cpu_time"] == "RLIMIT_CPU" and report["memory"] == "RLIMIT_AS" and report["file_size"]
    assert report["network"] == report["filesystem"] is None or "bubblewrap" in report["network"]
    for protection, how in report.items():  # said in the test summary, rather than passed over
        if how is None:
            warnings.warn(f"the sandbox does not enforce {protection} on this machine; its tests check the fallback")


def test_the_code_runs_under_its_limits_with_none_of_the_callers_environment(monkeypatch):
    monkeypatch.setenv("TUNESMITH_TEST_SECRET", "hunter2")
    source = """
import os, resource

def limits():
    names = ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_CORE")
    soft = [resource.getrlimit(getattr(resource, name))[0] for name in names]
    return {"limits": soft, "environment": dict(os.environ)}
"""
    limits = sandbox.Limits(seconds=3, memory_bytes=1536 * 1024**2, file_bytes=8 * 1024**2)
    seen = sandbox.run_function(source, "limits", [], limits)
    assert seen["limits"] == [3, 1536 * 1024**2, 8 * 1024**2, 0]
    assert "TUNESMITH_TEST_SECRET" not in seen["environment"] and "hunter2" not in str(seen["environment"])
    assert set(seen["environment"]) - {"PWD"} == set(sandbox.child_environment(Path()))


def test_memory_and_file_size_past_their_limits_fail_the_grade():
    source = "def grade(sample, item):\n    return len(bytearray(1024**3))\n"
    with pytest.raises(GraderFailure) as failed:
        run_grade(source, Sample("x"), {}, sandbox.Limits(seconds=5, memory_bytes=512 * 1024**2))
    assert failed.value.flag == "python_grader_runtime_error" and "MemoryError" in failed.value.detail
    source = "def grade(sample, item):\n    open('big', 'wb').write(bytes(2 * 1024**2))\n    return 1.0\n"
    with pytest.raises(GraderFailure) as failed:
        run_grade(source, Sample("x"), {}, sandbox.Limits(seconds=5, file_bytes=1024**2))
    assert "File too large" in failed.value.detail


NETWORK = """
import errno, socket

def connect(port):
    answers = []
    for address in [("127.0.0.1", port), ("192.0.2.1", 80)]:  # the test's listener; TEST-NET-1, routed nowhere
        try:
            socket.create_connection(address, timeout=0.5).close()
            answers.append("connected")
        except OSError as error:
            answers.append(errno.errorcode.get(error.errno, str(error)))
    return answers
"""


def test_the_sandbox_refuses_the_network(machine):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        answers = sandbox.run_function(NETWORK, "connect", [listener.getsockname()[1]], sandbox.Limits(seconds=5))
        try:
            listener.accept()[0].close()
            reached = True
        except BlockingIOError:
            reached = False
    if enforced("network"):
        assert answers[0] in {"ECONNREFUSED", "ENETUNREACH"} and answers[1] == "ENETUNREACH" and not reached
    else:
        assert answers[0] == "connected" and reached  # the report's None is the truth: the host is reachable


WRITES = """
import errno, os

def write(outside, secret, visible):
    def attempt(action):
        try:
            return action()
        except OSError as error:
            return errno.errorcode[error.errno]

    with open("mine.txt", "w") as file:  # the scratch directory is the working directory
        file.write("kept")
    return {
        "scratch": open("mine.txt").read(),
        "outside": attempt(lambda: open(outside, "w").write("escaped")),
        "secret": attempt(lambda: open(secret).read()),
        "visible": attempt(lambda: open(visible, "w").write("escaped")) if visible else None,
    }
"""


def test_the_sandbox_writes_only_in_its_scratch_directory(tmp_path, machine):
    outside, secret = tmp_path / "escaped.txt", tmp_path / "secret.txt"
    secret.write_text("hunter2")
    visible = Path(__file__).parent / "escaped-from-the-sandbox.txt"  # a directory the sandbox sees, read-only
    isolated = enforced("filesystem")
    try:
        answers = sandbox.run_function(WRITES, "write", [str(outside), str(secret), str(visible) if isolated else ""])
    finally:
        visible.unlink(missing_ok=True)
    assert answers["scratch"] == "kept"
    if isolated:
        assert answers["outside"] in {"EROFS", "ENOENT"} and not outside.exists()  # /tmp is emptied and read-only
        assert answers["secret"] == "ENOENT"
        assert answers["visible"] == "EROFS"
    else:
        assert outside.read_text() == "escaped" and answers["secret"] == "hunter2"


def test_a_fork_bomb_fails_the_grade_and_leaves_no_process(scratch_root, machine):
    if enforced("processes"):
        source = "import os\n\ndef grade(sample, item):\n    while True:\n        os.fork()\n"
        with pytest.raises(GraderFailure) as failed:
            run_grade(source, Sample("x"), {}, sandbox.Limits(seconds=5, processes=16))
        assert failed.value.flag == "python_grader_runtime_error"
        assert "BlockingIOError" in failed.value.detail or "Resource temporarily unavailable" in failed.value.detail
    else:  # no bound on forks here: a bounded swarm of sleepers, which the run must still take down with it
        source = "import os, time\n\ndef grade(sample, item):\n    for _ in range(20):\n        if os.fork() == 0:\n"
        source += "            time.sleep(60)\n    return 1.0\n"
        assert run_grade(source, Sample("x"), {}, QUICK) == 1.0
    assert stray_processes(scratch_root) == []


def test_an_endless_loop_is_killed_at_the_timeout(scratch_root, machine):
    started = time.monotonic()
    with pytest.raises(GraderFailure) as failed:
        run_grade("def grade(sample, item):\n    while True:\n        pass\n", Sample("x"), {}, QUICK)
    assert failed.value.flag == "unresponsive_reward_error"
    # whichever limit comes first (a spinning loop spends CPU time as fast as wall-clock time) takes it down
    assert re.search(r"killed after 1 s of (wall-clock|CPU) time", failed.value.detail)
    assert time.monotonic() - started < 4
    assert stray_processes(scratch_root) == []


def test_a_sandbox_that_cannot_start_is_a_server_error(monkeypatch):
    sandbox.enforcement()  # found with the real interpreter
    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")
    with pytest.raises(GraderFailure) as failed:
        run_grade(GSM8K, Sample("#### 1"), {"answer": "1"})
    assert failed.value.flag == "python_grader_server_error"
