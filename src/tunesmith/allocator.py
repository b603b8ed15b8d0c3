"""Training runs on jemalloc where the system has it; `TUNESMITH_ALLOCATOR=system` keeps the C library's malloc.

Training allocates and frees gigabytes of activations of many sizes every step. glibc's malloc fragments
under that pattern: measured on the default model (one 4096-token LoRA step with recompute), 5.7 GB peak
RSS for about 2 GB of live tensors. jemalloc held the same step at 2.2 GB. It keeps the pages a step frees
for the next step, and `FreedPages` gives them back when they outgrow what a step needs. BENCHMARKS.md has
the figures; the library comes from the system (Debian/Ubuntu: `apt-get install libjemalloc2`).

An allocator is chosen when a process starts, so `tunesmith train` re-executes itself once with
LD_PRELOAD set, before torch is imported. Without the library, nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# jemalloc returns no freed page on a timer: `FreedPages` decides, once per optimizer step. A timer cost a
# page fault per 4 KiB on every step, since a step frees its activations in backward and the next forward
# asks for them again: LoRA on 4 x 512 tokens, 1 thread, ran 102.8 tokens/s with 6.8M minor faults under a
# 5 s decay, 105.4 under 30 s, and 121.6 with 0.9M faults keeping them (glibc: 118.4).
CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
# oneDNN (torch's CPU matrix products in bfloat16) and ideep above it each keep what they built for a matrix
# shape, 1,024 shapes by default, 0.6-0.9 MB apiece (pytorch#27971). Packed micro-batches change length every
# step, so the main job's live memory grew by 650 MB over its first 40 steps (590 MB after the first, 1,225 MB
# from the 40th on) and its resident set with it. At 64 each it stayed at 571 MB, for 2.19 s a step against
# 2.16 (cache 256: 731 MB, 2.21 s). A setting the user gives wins.
KERNEL_CACHES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "64"}
ACTIVE = "TUNESMITH_ALLOCATOR_ACTIVE"  # set in the re-executed process, so it happens once
CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
)


def bound_kernel_caches() -> None:
    """Bound oneDNN's and ideep's caches of built kernels (KERNEL_CACHES); they read these when they are first used,
    so this must run before this process's first matrix product. Child processes inherit them."""
    for name, value in KERNEL_CACHES.items():
        os.environ.setdefault(name, value)


def jemalloc_library() -> str | None:
    found = next((path for path in CANDIDATES if os.path.exists(path)), None)
    return found or ctypes.util.find_library("jemalloc")


def reexec_with_jemalloc(argv: list[str]) -> None:
    """Replace this process by `argv` under jemalloc; returns only where that does not apply."""
    if (
        os.environ.get(ACTIVE)
        or os.environ.get("TUNESMITH_ALLOCATOR", "auto") == "system"
        or not sys.platform.startswith("linux")
    ):
        return
    library = jemalloc_library()
    if library is None:
        return
    env = {**os.environ, ACTIVE: library, "LD_PRELOAD": ":".join(filter(None, [library, os.environ.get("LD_PRELOAD")]))}
    env.setdefault("MALLOC_CONF", CONF)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


def jemalloc_mallctl():
    """jemalloc's control function where this process runs on it (preloaded), else None."""
    function = getattr(ctypes.CDLL(None), "mallctl", None)
    if function is not None:
        function.argtypes = [
            ctypes.c_char_p,
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_size_t),
            ctypes.c_void_p,
            ctypes.c_size_t,
        ]
    return function


class FreedPages:
    """Gives the pages that training steps freed back to the system once they outgrow what a step needs.

    Kept pages are what makes the next step fast (CONF), but rows of varying length fragment them: with
    nothing returned, full fine-tuning on banking77 grew to 7.3 GB after 15 steps and 22.6 GB after 82. So
    after each step the freed pages jemalloc keeps are compared with the most any step has needed beyond
    the tensors it left alive (the calling thread's peak, which holds the activations); past SLACK times
    that, all are returned, and the next step alone pays the page faults. A jemalloc without these figures
    (before 5.3, or built without statistics) has its pages returned after every step. Without jemalloc it
    does nothing.
    """

    SLACK = 1.25
    FLOOR = 64 << 20  # never bother for less

    def __init__(self, mallctl=None) -> None:
        self.mallctl = mallctl if mallctl is not None else jemalloc_mallctl()
        self.measured: bool | None = None  # whether this jemalloc reports what a step needs; known at the first step
        self.most_needed = 0
        self.returns = 0
        self._net_at_start = 0

    def step_started(self) -> None:
        if self.mallctl is None:
            return
        if self.measured is None:
            self.measured = self._probe()
        if self.measured:
            self._call("thread.peak.reset")
            self._net_at_start = self._net()

    def step_finished(self) -> None:
        if self.mallctl is None or self.measured is None:
            return
        if self.measured:
            needed = self._read("thread.peak.read") - (self._net() - self._net_at_start)
            self.most_needed = max(self.most_needed, needed)
            self._write_epoch()
            kept = (self._read("stats.arenas.4096.pdirty") + self._read("stats.arenas.4096.pmuzzy")) * self._read(
                "arenas.page"
            )
            if kept <= max(self.SLACK * self.most_needed, self.FLOOR):
                return
        self.release()

    def release(self) -> None:
        """Return every freed page now: at a step's end past the bound, before a checkpoint is written, and when
        training ends (writing a checkpoint or the outputs wants large buffers the kept pages seldom fit:
        full fine-tuning's last checkpoint peaked at 7.9 GB with them kept, 5.0 GB returned)."""
        if self.mallctl is not None:
            self._call("arena.4096.purge")  # 4096: every arena
            self.returns += 1

    def _probe(self) -> bool:
        try:
            self._write_epoch()
            for name in (
                "thread.peak.read",
                "thread.allocated",
                "thread.deallocated",
                "arenas.page",
                "stats.arenas.4096.pdirty",
                "stats.arenas.4096.pmuzzy",
            ):
                self._read(name)
        except OSError:
            return False
        return True

    def _net(self) -> int:
        return self._read("thread.allocated") - self._read("thread.deallocated")

    def _read(self, name: str) -> int:
        value, size = ctypes.c_uint64(), ctypes.c_size_t(8)  # every figure read here is 8 bytes (size_t, uint64)
        if self.mallctl(name.encode(), ctypes.byref(value), ctypes.byref(size), None, 0) != 0:
            raise OSError(f"jemalloc: mallctl({name}) failed")
        return value.value

    def _write_epoch(self) -> None:  # statistics are a snapshot taken at each new epoch
        value, size = ctypes.c_uint64(1), ctypes.c_size_t(8)
        if self.mallctl(b"epoch", ctypes.byref(value), ctypes.byref(size), ctypes.byref(value), 8) != 0:
            raise OSError("jemalloc: mallctl(epoch) failed")

    def _call(self, name: str) -> None:
        self.mallctl(name.encode(), None, None, None, 0)


FREED_PAGES = FreedPages()
