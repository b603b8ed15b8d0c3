"""tunesmith's processes reach no network through the libraries beneath it (offline.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

IMPORT_BITSANDBYTES = """
import socket, sys
attempts = []

def refuse(*args, **kwargs):
    attempts.append(args[:1])
    raise OSError("the test allows no network")

socket.getaddrinfo = refuse
socket.socket.connect = refuse
if sys.argv[1] == "offline":
    from tunesmith.offline import stay_offline
    stay_offline()
import bitsandbytes
print(len(attempts))
"""


def test_importing_bitsandbytes_reaches_for_no_hub_kernel():
    pytest.importorskip("bitsandbytes")

    # the suite's own offline settings (conftest.py) are not what a user's shell has
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}

    def attempts(mode: str) -> int:
        command = [sys.executable, "-c", IMPORT_BITSANDBYTES, mode]
        run = subprocess.run(command, capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        return int(run.stdout.split()[-1])

    if attempts("default") == 0:
        pytest.skip("bitsandbytes asks the Hub for no kernel on this CPU (it does where AVX512-BF16 is present)")
    assert attempts("offline") == 0
