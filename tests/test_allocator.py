"""tunesmith train re-executes itself under jemalloc once, where the system has the library."""
from __future__ import annotations

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


@pytest.mark.parametrize("setting", [(allocator.ACTIVE, "/usr/lib/libjemalloc.so.2"), ("TUNESMITH_ALLOCATOR", "system")])
def test_no_reexec_once_active_or_when_opted_out(execs, monkeypatch, setting):
    monkeypatch.setenv(*setting)
    allocator.reexec_with_jemalloc([sys.executable, "-m", "tunesmith", "train", "x.yaml"])
    assert execs == []


def test_no_reexec_without_the_library(execs, monkeypatch):
    monkeypatch.setattr(allocator, "jemalloc_library", lambda: None)
    allocator.reexec_with_jemalloc([sys.executable, "-m", "tunesmith", "train", "x.yaml"])
    assert execs == []
