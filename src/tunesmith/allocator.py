"""Training runs on jemalloc where the system has it; `TUNESMITH_ALLOCATOR=system` keeps the C library's malloc.

Training allocates and frees gigabytes of activations of many sizes every step. glibc's malloc fragments
under that pattern: measured on the default model (one 4096-token LoRA step with recompute), 5.7 GB peak
RSS for about 2 GB of live tensors. jemalloc held the same step at 2.2 GB, equally fast; it keeps freed
pages a few seconds for reuse (CONF below) before returning them. BENCHMARKS.md has the
figures; the library comes from the system (Debian/Ubuntu: `apt-get install libjemalloc2`).

An allocator is chosen when a process starts, so `tunesmith train` re-executes itself once with
LD_PRELOAD set, before torch is imported. Without the library, nothing changes.
"""
from __future__ import annotations

import ctypes.util
import os
import sys

# Freed pages stay 5 s for reuse (a step's worth: little page-fault churn), then go back to the system.
# Never returning them (-1) let fragmentation from varying row lengths grow without bound: full fine-tuning
# on banking77 reached 7.3 GB after 15 steps and 22.6 GB after 82, against 3.8 GB with 5 s.
CONF = "dirty_decay_ms:5000,muzzy_decay_ms:5000"
ACTIVE = "TUNESMITH_ALLOCATOR_ACTIVE"  # set in the re-executed process, so it happens once
CANDIDATES = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
              "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")


def jemalloc_library() -> str | None:
    found = next((path for path in CANDIDATES if os.path.exists(path)), None)
    return found or ctypes.util.find_library("jemalloc")


def reexec_with_jemalloc(argv: list[str]) -> None:
    """Replace this process by `argv` under jemalloc; returns only where that does not apply."""
    if os.environ.get(ACTIVE) or os.environ.get("TUNESMITH_ALLOCATOR", "auto") == "system" \
            or not sys.platform.startswith("linux"):
        return
    library = jemalloc_library()
    if library is None:
        return
    env = {**os.environ, ACTIVE: library, "LD_PRELOAD": ":".join(filter(None, [library, os.environ.get("LD_PRELOAD")]))}
    env.setdefault("MALLOC_CONF", CONF)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
