"""tunesmith train re-executes itself under jemalloc once, where the system has the library."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tunesmith import allocator


@pytest.fixture
def execs(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator.os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    monkeypatch.setattr(allocator, "jemalloc_library", lambda: "/usr/lib/libjemalloc.so.2")
    monkeypatch.delenv(allocator.ACTIVE, raising=False)
    monkeypatch.delenv("TUNESMITH_ALLOCATOR", raising=False)
    monkeypatch.delenv("MALLOC_CONF", raising=False)
    monkeypatch.setenv("LD_PRELOAD", "/opt/other.so")
    return calls


def test_reexec_preloads_jemalloc_that_keeps_its_pages(execs):
    allocator.reexec_with_jemalloc([sys.executable, "-m", "tunesmith", "train", "x.yaml"])
    [(path, argv, env)] = execs
    assert path == sys.executable and argv[-2:] == ["train", "x.yaml"]
    assert env["LD_PRELOAD"] == "/usr/lib/libjemalloc.so.2:/opt/other.so"  # the user's preloads are kept
    assert env["MALLOC_CONF"] == allocator.CONF and env[allocator.ACTIVE]


@pytest.mark.parametrize(
    "setting", [(allocator.ACTIVE, "/usr/lib/libjemalloc.so.2"), ("TUNESMITH_ALLOCATOR", "system")]
)
def test_no_reexec_once_active_or_when_opted_out(execs, monkeypatch, setting):
    monkeypatch.setenv(*setting)
    allocator.reexec_with_jemalloc([sys.executable, "-m", "tunesmith", "train", "x.yaml"])
    assert execs == []


def test_no_reexec_without_the_library(execs, monkeypatch):
    monkeypatch.setattr(allocator, "jemalloc_library", lambda: None)
    allocator.reexec_with_jemalloc([sys.executable, "-m", "tunesmith", "train", "x.yaml"])
    assert execs == []


# FreedPages runs in a process of its own under jemalloc (an allocator is chosen when a process starts).
STEPS = r"""
import ctypes, json, sys
from tunesmith.allocator import FreedPages, jemalloc_mallctl

libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
MB = 1 << 20
mallctl = jemalloc_mallctl()
if sys.argv[1] == "old":  # a jemalloc that cannot say what a step needed
    real = mallctl
    mallctl = lambda name, *rest: 2 if name == b"thread.peak.read" else real(name, *rest)
pages = FreedPages(mallctl)

def touched(size):
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    return block

def step(transient_mb):  # activations of the step's size, freed before it ends
    pages.step_started()
    blocks = [touched(16 * MB) for _ in range(transient_mb // 16)]
    for block in blocks:
        libc.free(block)
    pages.step_finished()

def kept_mb():
    pages._write_epoch()
    dirty = pages._read("stats.arenas.4096.pdirty") + pages._read("stats.arenas.4096.pmuzzy")
    return dirty * pages._read("arenas.page") / MB

report = {}
for _ in range(4):
    step(256)
report["equal_steps"] = {"returns": pages.returns, "kept_mb": kept_mb(), "needed_mb": pages.most_needed / MB}
outside = [touched(64 * MB) for _ in range(16)]  # 1 GiB freed outside any step: pages no step needs
for block in outside:
    libc.free(block)
step(256)
report["outgrown"] = {"returns": pages.returns, "kept_mb": kept_mb()}
print(json.dumps(report))
"""


def run_steps(mode: str) -> dict:
    library = allocator.jemalloc_library()
    if library is None:
        pytest.skip("jemalloc is not installed (Debian/Ubuntu: apt-get install libjemalloc2)")
    env = {**os.environ, "LD_PRELOAD": library, "MALLOC_CONF": allocator.CONF}
    done = subprocess.run([sys.executable, "-c", STEPS, mode], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_pages_a_step_needs_are_kept_and_the_rest_returned():
    report = run_steps("measured")
    equal = report["equal_steps"]
    # Steps of one size reuse the pages the first freed: nothing returned, the step's 256 MB kept.
    assert equal["returns"] == 0
    assert 240 <= equal["needed_mb"] <= 300 and 200 <= equal["kept_mb"] <= 1.25 * equal["needed_mb"]
    # A gigabyte freed that no step needs outgrows the bound at the next step's end: all is returned.
    assert report["outgrown"] == {"returns": 1, "kept_mb": 0.0}


def test_a_jemalloc_without_the_figures_returns_pages_after_every_step():
    report = run_steps("old")
    assert report["equal_steps"]["returns"] == 4 and report["equal_steps"]["kept_mb"] == 0.0


def test_without_jemalloc_nothing_happens():
    pages = allocator.FreedPages(mallctl=None)
    pages.mallctl = None  # this test process runs on the C library's malloc
    pages.step_started()
    pages.step_finished()
    assert pages.returns == 0 and pages.measured is None


SHAPES = """
import os, sys, torch
if sys.argv[1] == "bounded":
    from tunesmith.allocator import bound_kernel_caches
    bound_kernel_caches()
torch.set_num_threads(1)
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
weight = torch.randn(256, 1024, dtype=torch.bfloat16)
inputs, out = torch.randn(900, 256, dtype=torch.bfloat16), torch.empty(900, 1024, dtype=torch.bfloat16)
torch.mm(inputs[:8], weight, out=out[:8])
before = resident()
for rows in range(600, 900):  # a packed micro-batch's length changes every step
    torch.mm(inputs[:rows], weight, out=out[:rows])
print(resident() - before)
"""


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and __import__("torch").backends.mkldnn.is_available()),
    reason="oneDNN's caches: torch's CPU build on Linux",
)
def test_kernel_caches_stay_bounded_as_shapes_change(monkeypatch):
    for name in allocator.KERNEL_CACHES:
        monkeypatch.delenv(name, raising=False)

    def growth(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", SHAPES, mode], capture_output=True, text=True, check=True)
        return int(run.stdout.split()[-1])

    unbounded, bounded = growth("default"), growth("bounded")
    if unbounded < 64 << 20:
        pytest.skip(f"this CPU's bf16 products keep no per-shape kernels ({unbounded >> 20} MB for 300 shapes)")
    assert bounded < unbounded / 2, (bounded >> 20, unbounded >> 20)  # measured: 83 MB against 257
