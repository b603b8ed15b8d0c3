"""The tree stays formatted and lint-clean: ruff (pinned in the test extra) with pyproject.toml's settings, so the
README's test command, and CI with it, checks both."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def ruff(*arguments: str) -> subprocess.CompletedProcess:
    command = [shutil.which("ruff")] if shutil.which("ruff") else [sys.executable, "-m", "ruff"]
    return subprocess.run([*command, *arguments], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("check", [("format", "--check", "."), ("check", ".")], ids=["format", "lint"])
def test_ruff_passes(check):
    result = ruff(*check)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_finds_what_it_is_asked_to_find(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import os\nx = {  'a':1 }\n")
    assert ruff("check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), str(sample)).returncode == 1
    assert (
        ruff("format", "--check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), str(sample)).returncode == 1
    )
