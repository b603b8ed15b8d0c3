"""What this machine's processor multiplies fast: whether bfloat16 matrix products are native on its CPU.

Recent CPUs multiply bf16 in hardware: Intel AMX (`amx_bf16`) and AVX512-BF16 (`avx512_bf16`, also AMD Zen 4/5),
and Arm's BF16 extension (`bf16` in /proc/cpuinfo's Features). Elsewhere PyTorch emulates bf16, which is slower
than float32 and must never be chosen. So a CPU counts as native only when its flags name one of these and a
timed matmul confirms it: bf16 at least MIN_SPEEDUP times float32's speed. The timing (about a tenth of a second)
is cached per machine in `$TUNESMITH_HOME/hardware.json`, keyed by the processor's name, its bf16 flags and the
torch version, so a changed machine or library is measured again. It runs on one thread: the per-core ratio is
the processor's, where a multi-threaded timing would also measure whatever else the machine is running.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tunesmith import paths
from tunesmith.errors import UserError

if TYPE_CHECKING:  # torch is imported where a function needs it
    import torch

BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")  # Intel AMX, AVX512-BF16 (Intel, AMD), Arm FEAT_BF16
MIN_SPEEDUP = 1.3  # bf16 must beat float32 by this much to be worth its rounding
MATMUL_SIZE = 512  # big enough for the kernels' steady state (measured: 1.6 ms a product in fp32 on one core)
CACHE_FILE = "hardware.json"


@dataclass(frozen=True)
class Bf16Support:
    native: bool
    reason: str  # what was found, for the line a run prints


OFF_SWITCH = "TUNESMITH_CPU_BF16"  # "0": treat this CPU as without native bf16 (auto then stays float32)


def cpu_bf16() -> Bf16Support:
    """Whether this CPU multiplies bf16 natively, with the evidence: its flags, then a cached timing. Setting
    TUNESMITH_CPU_BF16=0 says no without looking (float32 runs that must match another machine's, the test suite)."""
    if os.environ.get(OFF_SWITCH) == "0":
        return Bf16Support(False, f"{OFF_SWITCH}=0")
    found = bf16_flags()
    if not found:
        return Bf16Support(False, "no bf16 instructions in the CPU flags (amx_bf16, avx512_bf16 or Arm bf16)")
    key = machine_key(found)
    cache = paths.home() / CACHE_FILE
    known = read_cache(cache)
    speedup = known.get(key, {}).get("bf16_speedup")
    origin = "cached"
    if not isinstance(speedup, (int, float)):
        speedup, origin = matmul_speedup(), "measured"
        known[key] = {"bf16_speedup": speedup, "cpu": processor_name(), "flags": found}
        write_cache(cache, known)
    flags = ", ".join(found)
    timing = f"a {MATMUL_SIZE}x{MATMUL_SIZE} bf16 matmul runs at {speedup:.1f}x float32's speed ({origin})"
    if speedup < MIN_SPEEDUP:
        return Bf16Support(False, f"{flags} in the CPU flags, but {timing}, under {MIN_SPEEDUP}x")
    return Bf16Support(True, f"{flags} in the CPU flags; {timing}")


@functools.cache
def cpuinfo() -> str:
    """/proc/cpuinfo's text; empty where there is none (macOS, Windows: bf16 is then never assumed)."""
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def cpu_flags(text: str | None = None) -> frozenset[str]:
    """The CPU's feature flags (x86 `flags`, Arm `Features`) from cpuinfo `text`, this machine's by default. Parsed
    once per text: attention asks on every call (attention.bf16_limits)."""
    return _parsed_flags(cpuinfo() if text is None else text)


@functools.cache
def _parsed_flags(text: str) -> frozenset[str]:
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def bf16_flags(text: str | None = None) -> list[str]:
    """Which of BF16_FLAGS the CPU has, in BF16_FLAGS' order."""
    return [flag for flag in BF16_FLAGS if flag in cpu_flags(text)]


def processor_name(text: str | None = None) -> str:
    """cpuinfo's model name, with x86's family and model numbers (a virtual machine's name is often only "Intel(R)
    Xeon(R) Processor"; the numbers still tell its generation), or Arm's part number."""
    fields = {}
    for line in (cpuinfo() if text is None else text).splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    if "model name" in fields:
        numbers = [f"{key} {fields[key]}" for key in ("cpu family", "model") if key in fields]
        return fields["model name"] + (f" ({', '.join(numbers)})" if numbers else "")
    if "CPU part" in fields:
        return f"Arm CPU part {fields['CPU part']}"
    return platform.processor() or platform.machine()


def describe(text: str | None = None) -> str:
    """The processor in one line for reports: its name, its cores and its bf16 instructions, which decide what
    a figure measured on it means (a bf16 figure from an AMX processor says little about an AVX2 one)."""
    return f"{processor_name(text)}, {os.cpu_count()} cores, bf16: {', '.join(bf16_flags(text)) or 'none'}"


def machine_key(flags: list[str]) -> str:
    import torch

    text = json.dumps([processor_name(), sorted(flags), torch.__version__])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def matmul_speedup(repeats: int = 5) -> float:
    """float32's best time over bf16's for one MATMUL_SIZE-square product on one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = {}
        for dtype in (torch.float32, torch.bfloat16):
            generator = torch.Generator().manual_seed(0)
            a, b = (torch.randn(MATMUL_SIZE, MATMUL_SIZE, generator=generator).to(dtype) for _ in range(2))
            a @ b  # the first call picks and warms the kernel
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - start)
            best[dtype] = min(times)
        return best[torch.float32] / best[torch.bfloat16]
    finally:
        torch.set_num_threads(before)


def read_cache(path: Path) -> dict:
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # missing or damaged: measure again
    return known if isinstance(known, dict) else {}


def write_cache(path: Path, known: dict) -> None:
    """Write through a temporary file, so a reader never sees half of it; an unwritable home only costs a
    timing next time."""
    try:
        paths.make_private(path.parent, directory=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_text(json.dumps(known, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(temporary, path)
    except (OSError, UserError):
        pass


PROBE_SIZE = 1024  # the matmul matmul_peak times


def resident_bytes() -> float:
    """This process's resident set now (Linux: /proc; elsewhere its peak so far)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def available_memory(device: torch.device) -> float | None:
    """Bytes a run may take: a GPU's free memory; on a CPU, what the kernel reports available (MemAvailable, within
    the cgroup's limit where one is set) plus what this process already holds (the run will be this process)."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    fields = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, value = line.partition(":")
            fields[name] = float(value.split()[0]) * 1024
    if "MemAvailable" not in fields:
        return None
    available = fields["MemAvailable"]
    limit = cgroup_room()
    if limit is not None:
        available = min(available, limit)
    return available + resident_bytes()


def cgroup_room() -> float | None:
    """What this process's cgroup (v2) still allows, where it sets a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
    except OSError:
        return None
    return None if limit == "max" else float(limit) - float(used)


def matmul_peak(device: torch.device, amp_dtype: torch.dtype | None) -> float:
    """FLOP/s of a PROBE_SIZE-square matmul in the compute dtype on `device`, all threads, the best of four."""
    import torch

    dtype = amp_dtype or torch.float32
    a = torch.randn(PROBE_SIZE, PROBE_SIZE, device=device).to(dtype)
    best = math.inf
    for _ in range(4):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * PROBE_SIZE**3 / best
