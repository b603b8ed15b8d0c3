"""tunesmith's processes reach no network through the libraries beneath it (offline.py)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from tunesmith.hardware import cpu_flags

IMPORT_BITSANDBYTES = """
import socket
attempts = []

def refuse(*args, **kwargs):
    attempts.append(args[:1])
    raise OSError("the test allows no network")

socket.getaddrinfo = refuse
socket.socket.connect = refuse
from tunesmith.offline import stay_offline
stay_offline()
import bitsandbytes
print(len(attempts))
"""


@pytest.mark.skipif(
    not (
        "avx512_bf16" in cpu_flags()
        and importlib.util.find_spec("bitsandbytes")
        and importlib.util.find_spec("kernels")
    ),
    reason="bitsandbytes asks the kernels package for a Hub kernel only on an AVX512-BF16 CPU with kernels installed",
)
def test_importing_bitsandbytes_reaches_for_no_hub_kernel():
    # Without stay_offline this import resolves huggingface.co twice here (bitsandbytes 0.49, kernels 0.19); the
    # suite's own offline settings (conftest.py) are taken away, so that only stay_offline can keep it off the network
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    run = subprocess.run([sys.executable, "-c", IMPORT_BITSANDBYTES], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert int(run.stdout.split()[-1]) == 0
