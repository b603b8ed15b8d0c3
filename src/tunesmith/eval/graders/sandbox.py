"""Run untrusted Python source in a confined child process: call one of its functions with JSON arguments and get
back its JSON result. Nothing but JSON crosses the boundary (never pickle), and nothing it does can stop the caller.

What confines the child, each where this machine allows it; `enforcement()` says which mechanism holds each
protection here (None where none does), and the first run logs one warning naming what is missing:
- network: bubblewrap (`bwrap`, Debian/Ubuntu package `bubblewrap`) gives the child new user, PID, network, IPC and
  UTS namespaces. Its network namespace has only a loopback interface, down: the host's 127.0.0.1 included, nothing
  can be reached.
- filesystem: bubblewrap again: / is bound read-only; /root, /home, /run, /tmp and /var/tmp are hidden (secrets and
  sockets live there, and a socket can be connected to on a read-only mount) behind empty read-only mounts, except
  the interpreter's own directories; the only writable place is a private scratch directory, the child's cwd, HOME
  and TMPDIR, deleted after the run.
- processes: a pids cgroup whose pids.max bounds the child and all it forks. RLIMIT_NPROC would not: the kernel
  ignores it for uid 0, which is what the child's uid maps to when tunesmith runs as root (checked: 20 forks under
  a limit of 5 succeed in bubblewrap as root).
- cpu_time, memory, file_size: RLIMIT_CPU, RLIMIT_AS and RLIMIT_FSIZE, set by the child before the code runs
  (and RLIMIT_CORE 0: a crash writes no core dump).
- wall_clock: the child runs in a session and process group of its own, with no terminal; the group and the cgroup
  are killed (SIGKILL) at the timeout and after every run, and waited for, so nothing it forked lives on. With
  bubblewrap its PID namespace dies with it too; without bubblewrap or a cgroup, a process that leaves its group
  (setsid) escapes.
- environment: the child gets a fixed minimal environment, none of the caller's variables (API keys, tokens).

Without bubblewrap (not installed, or namespaces refused, e.g. in an unprivileged container) the child still runs
with the rlimits, the timeout and the minimal environment, and network and filesystem are reported as None.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import suppress
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

GIB = 1024**3
RESULT_BYTES = 16 * 1024**2  # the largest JSON result read back
HIDDEN = ("/root", "/home", "/run", "/tmp", "/var/tmp")  # emptied in the sandbox: home directories, sockets, temp files
SANDBOX_ID = "65534"  # the child's uid and gid inside its user namespace ("nobody")


@dataclass(frozen=True)
class Limits:
    """What one run may use."""

    seconds: float = 120.0  # wall clock; the CPU limit (RLIMIT_CPU) is the same number of seconds, rounded up
    memory_bytes: int = 2 * GIB  # address space (RLIMIT_AS)
    file_bytes: int = GIB  # the largest file it may write (RLIMIT_FSIZE), its output log included
    processes: int = 32  # tasks in its cgroup, threads included (pids.max)


class SandboxError(Exception):
    """A run that gave no result."""


class SandboxUnavailable(SandboxError):
    """The child could not be started (or its arguments are not JSON): nothing of the code ran."""


class SandboxTimeout(SandboxError):
    """The code ran out of wall-clock or CPU time and was killed."""


class SandboxFailed(SandboxError):
    """The code raised, the process died, or the result is not JSON; the message says which, with the error's line."""


# The child's program (run with `python -I -c`): limits itself, runs the source, writes the result, exits.
CHILD = r"""
import json, os, resource, sys, traceback

scratch = sys.argv[1]
with open(os.path.join(scratch, "request.json"), encoding="utf-8") as file:
    request = json.load(file)
open(os.path.join(scratch, "started"), "w").close()
for name, (soft, hard) in request["limits"].items():
    resource.setrlimit(getattr(resource, name), (soft, hard))
sys.path[:] = request["sys_path"]
first = os.getpid()


def plain(value):  # numpy scalars (np.float32, np.int64) are numbers a function may well return
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON")


def described(error):
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if frame.filename == request["filename"]]
    where = f" (line {frames[-1].lineno} of the {request['filename']})" if frames else ""
    return traceback.format_exception_only(error)[-1].strip() + where


try:
    namespace = {"__name__": "__sandbox__"}
    exec(compile(request["source"], request["filename"], "exec"), namespace)
    text = json.dumps({"value": namespace[request["function"]](*request["args"])}, default=plain)
except BaseException as error:
    text = json.dumps({"error": described(error)})
if os.getpid() == first:  # a process the code forked may get here too: only the first one answers
    with open(os.path.join(scratch, "result.json"), "w", encoding="utf-8") as file:
        file.write(text)
os._exit(0)  # now: threads the code left running must not hold the run open
"""


@dataclass(frozen=True)
class Machine:
    """What this machine offers, found once per process."""

    bwrap: str | None  # the bubblewrap that works here
    bwrap_version: str
    cgroup: Path | None  # the pids cgroup under which each run gets its own
    cgroup_version: str


def run_function(source: str, function: str, args: list, limits: Limits = Limits(), filename: str = "source") -> Any:
    """`function(*args)` of `source`, run in the sandbox; its JSON result. `filename` names the source in errors.
    Raises SandboxUnavailable, SandboxTimeout or SandboxFailed; never lets the code reach the caller's process."""
    machine = probe_machine()
    # ignore_cleanup_errors: whatever the code left in its directory must not fail the caller
    with tempfile.TemporaryDirectory(prefix="tunesmith-sandbox-", ignore_cleanup_errors=True) as directory:
        scratch = Path(directory)
        write_request(scratch, source, function, args, limits, filename)
        cgroup = new_cgroup(machine, limits.processes)
        try:
            returncode, timed_out = run_child(child_command(machine, scratch, cgroup), scratch, limits.seconds, cgroup)
        finally:
            if cgroup is not None:
                remove_cgroup(cgroup)
        return read_result(scratch, returncode, timed_out, limits)


def write_request(scratch: Path, source: str, function: str, args: list, limits: Limits, filename: str) -> None:
    cpu = math.ceil(limits.seconds)
    request = {
        "source": source,
        "function": function,
        "args": args,
        "filename": filename,
        "sys_path": [path for path in sys.path if os.path.isabs(path)],  # what the caller can import, the child can
        "limits": {
            "RLIMIT_CPU": [cpu, cpu + 1],  # SIGXCPU at the soft limit, SIGKILL a second later
            "RLIMIT_AS": [limits.memory_bytes, limits.memory_bytes],
            "RLIMIT_FSIZE": [limits.file_bytes, limits.file_bytes],
            "RLIMIT_CORE": [0, 0],  # a crash dumps no core: not in the scratch directory, not to a host-side handler
        },
    }
    try:
        text = json.dumps(request)  # NaN included: a data row may hold one, and the child's json reads it
    except (TypeError, ValueError) as error:
        raise SandboxUnavailable(f"the arguments are not JSON ({error}); fix: pass only JSON values") from None
    (scratch / "request.json").write_text(text, encoding="utf-8")


def child_environment(scratch: Path) -> dict[str, str]:
    """The child's whole environment: none of the caller's variables (keys, tokens) gets through."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(scratch),
        "TMPDIR": str(scratch),
        "LANG": "C.UTF-8",
        # BLAS libraries reserve memory per thread, one thread per core by default: on a many-core machine numpy
        # alone would pass the address-space limit. OpenAI gives python graders 2 cores.
        "OMP_NUM_THREADS": "2",
        "OPENBLAS_NUM_THREADS": "2",
        "MKL_NUM_THREADS": "2",
    }


def child_command(machine: Machine, scratch: Path, cgroup: Path | None) -> list[str]:
    command = [sys.executable, "-I", "-c", CHILD, str(scratch)]
    if machine.bwrap:
        command = [*bubblewrap_arguments(machine.bwrap, scratch), "--", *command]
    if cgroup is not None:  # the shell joins the cgroup, then becomes the child: all it starts is counted from there
        command = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup / "cgroup.procs"), *command]
    return command


def bubblewrap_arguments(bwrap: str, scratch: Path) -> list[str]:
    """bwrap's options for a child with no network, a read-only /, HIDDEN emptied and `scratch` writable."""
    hidden = [path for path in HIDDEN if os.path.isdir(path) and not os.path.islink(path)]
    arguments = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts"]
    arguments += ["--unshare-cgroup-try", "--uid", SANDBOX_ID, "--gid", SANDBOX_ID, "--cap-drop", "ALL"]
    # no --new-session: the run's own session (run_child) keeps the sandbox in the process group it kills
    arguments += ["--die-with-parent", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    for path in hidden:
        arguments += ["--tmpfs", path]
    for path in interpreter_paths():
        if any(path == root or path.startswith(root + "/") for root in hidden):
            arguments += ["--ro-bind", path, path]
    arguments += ["--bind", str(scratch), str(scratch)]
    for path in [*hidden, "/dev"]:  # after the binds: each bind below them is a mount of its own and stays as it is
        arguments += ["--remount-ro", path]
    return [*arguments, "--chdir", str(scratch)]


def interpreter_paths() -> list[str]:
    """The directories the child's interpreter reads: its prefixes and the caller's import path, outermost only."""
    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    candidates |= {os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable))}
    candidates |= {path for path in sys.path if os.path.isabs(path)}
    existing = sorted(os.path.normpath(path) for path in candidates if path and os.path.exists(path))
    outermost: list[str] = []
    for path in existing:  # sorted: a parent comes before what lies under it
        if not any(path == kept or path.startswith(kept.rstrip("/") + "/") for kept in outermost):
            outermost.append(path)
    return outermost


def run_child(command: list[str], scratch: Path, seconds: float, cgroup: Path | None) -> tuple[int, bool]:
    """(exit status, whether it was killed at the timeout). Every process of the run is dead when this returns."""
    with open(scratch / "output.log", "wb") as log:
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=scratch,
                env=child_environment(scratch),
                start_new_session=True,  # its own process group, and no terminal to type into (TIOCSTI)
            )
        except OSError as error:
            raise SandboxUnavailable(f"could not start {command[0]}: {error}") from None
    exited = wait_unreaped(process.pid, seconds)
    with suppress(ProcessLookupError, PermissionError):  # the leader is a zombie or alive: its group id is still ours
        os.killpg(process.pid, signal.SIGKILL)
    returncode = process.wait()
    kill_group(process.pid)
    if cgroup is not None:
        kill_cgroup(cgroup)
    return returncode, not exited


def wait_unreaped(pid: int, seconds: float) -> bool:
    """Whether `pid` exited within `seconds`. It is left a zombie: its pid, and so its process group id, cannot be
    reused before the group is killed."""
    deadline = time.monotonic() + seconds
    delay = 0.001
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.05)
    return True


def kill_group(group: int) -> None:
    """SIGKILL process group `group` until no member of it lives: a killed process lingers a moment. (While any
    member is left, even a zombie, the group's id cannot be given to a new process.)"""
    for _ in range(1000):
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        if not living_members(group):  # zombies only: bwrap's orphaned init waits for pid 1 to reap it
            return
        time.sleep(0.005)
    logger.warning("processes of a sandbox run are still alive in process group %d", group)


def living_members(group: int) -> list[int]:
    """The processes of process group `group` that are not zombies."""
    members = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with suppress(OSError, ValueError):
                stat = Path(entry.path, "stat").read_text()
                state, _, process_group = stat[stat.rindex(")") + 2 :].split()[:3]  # after "pid (command) "
                if int(process_group) == group and state not in ("Z", "X"):
                    members.append(int(entry.name))
    return members


def read_result(scratch: Path, returncode: int, timed_out: bool, limits: Limits) -> Any:
    """The value the code returned, or the error that says why there is none."""
    result = scratch / "result.json"
    if timed_out:
        raise SandboxTimeout(f"killed after {limits.seconds:g} s of wall-clock time")
    if result.is_file():
        if result.stat().st_size > RESULT_BYTES:
            raise SandboxFailed(f"the result is larger than {RESULT_BYTES // 1024**2} MiB")
        try:
            reply = json.loads(result.read_text(encoding="utf-8"))
        except ValueError as error:
            raise SandboxFailed(f"the result is not JSON ({error})") from None
        if isinstance(reply, dict) and "error" in reply:
            raise SandboxFailed(str(reply["error"]))
        if isinstance(reply, dict) and "value" in reply:
            return reply["value"]
        raise SandboxFailed("the result file was overwritten by the code")
    signal_number = -returncode if returncode < 0 else returncode - 128 if returncode > 128 else 0  # bwrap: 128+N
    if signal_number == signal.SIGXCPU:
        raise SandboxTimeout(f"killed after {math.ceil(limits.seconds)} s of CPU time")
    output = last_line(scratch / "output.log")
    if not (scratch / "started").exists():
        raise SandboxUnavailable(f"the sandbox did not start (exit status {returncode}): {output}")
    if signal_number in set(signal.Signals):
        raise SandboxFailed(f"the process was killed by {signal.Signals(signal_number).name}; {output}".rstrip("; "))
    raise SandboxFailed(f"the process exited with status {returncode} before answering; {output}".rstrip("; "))


def last_line(path: Path) -> str:
    """The last line the child printed (an interpreter's fatal error, bwrap's complaint), or ''."""
    with suppress(OSError), open(path, "rb") as file:
        file.seek(max(0, path.stat().st_size - 4096))
        lines = file.read().decode("utf-8", "replace").strip().splitlines()
        return lines[-1].strip() if lines else ""
    return ""


# ---- the pids cgroup ------------------------------------------------------------------------------------------------


def pids_cgroup_root() -> tuple[Path | None, str]:
    """The cgroup this process is in, in a hierarchy with the pids controller, if new cgroups can be made under it."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None, ""
    for line in lines:
        _, controllers, relative = line.split(":", 2)
        if "pids" in controllers.split(","):
            candidate, version = Path("/sys/fs/cgroup/pids") / relative.lstrip("/"), "v1"
        elif controllers == "":
            candidate, version = Path("/sys/fs/cgroup") / relative.lstrip("/"), "v2"
            with suppress(OSError):
                if "pids" not in (candidate / "cgroup.subtree_control").read_text().split():
                    continue
        else:
            continue
        probe = candidate / f"tunesmith-probe-{uuid.uuid4().hex[:12]}"
        try:
            probe.mkdir()
            probe.rmdir()
        except OSError:
            continue
        return candidate, version
    return None, ""


def new_cgroup(machine: Machine, processes: int) -> Path | None:
    if machine.cgroup is None:
        return None
    cgroup = machine.cgroup / f"tunesmith-sandbox-{uuid.uuid4().hex[:12]}"
    try:
        cgroup.mkdir()
        (cgroup / "pids.max").write_text(str(processes))
    except OSError as error:
        with suppress(OSError):
            cgroup.rmdir()
        raise SandboxUnavailable(f"could not make the run's pids cgroup {cgroup}: {error}") from None
    return cgroup


def kill_cgroup(cgroup: Path) -> None:
    """SIGKILL every process left in `cgroup` until it is empty (a process may fork while its siblings die)."""
    for _ in range(400):
        try:
            pids = (cgroup / "cgroup.procs").read_text().split()
        except OSError:
            return
        if not pids:
            return
        for pid in pids:
            with suppress(ProcessLookupError, PermissionError):
                os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.005)
    logger.warning("processes of a sandbox run are still alive in %s", cgroup)


def remove_cgroup(cgroup: Path) -> None:
    kill_cgroup(cgroup)
    for _ in range(100):  # a killed process leaves its cgroup a moment after it dies
        try:
            cgroup.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)
    logger.warning("could not remove the sandbox's cgroup %s", cgroup)


# ---- what this machine enforces -------------------------------------------------------------------------------------


def working_bubblewrap() -> tuple[str | None, str]:
    """(bwrap's path, its version) if it is installed and can make its namespaces here, else (None, why not)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None, "bwrap is not installed (apt-get install bubblewrap)"
    with tempfile.TemporaryDirectory(prefix="tunesmith-sandbox-") as directory:
        scratch = Path(directory)
        command = [*bubblewrap_arguments(bwrap, scratch), "--", sys.executable, "-I", "-c", "pass"]
        try:
            probe = subprocess.run(command, capture_output=True, text=True, timeout=30, env=child_environment(scratch))
            version = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired) as error:
            return None, f"{bwrap} did not run: {error}"
    if probe.returncode != 0:
        return None, f"{bwrap} cannot make its sandbox here: {probe.stderr.strip()[-300:]}"
    return bwrap, version.strip()


@cache
def probe_machine() -> Machine:
    bwrap, detail = working_bubblewrap()  # detail: bwrap's version, or why it does not work here
    cgroup, cgroup_version = pids_cgroup_root()
    machine = Machine(bwrap, detail, cgroup, cgroup_version)
    missing = [name for name, how in describe(machine).items() if how is None]
    if missing:
        why = "" if bwrap else f" ({detail})"
        logger.warning("the python sandbox does not enforce %s on this machine%s", ", ".join(missing), why)
    return machine


def describe(machine: Machine) -> dict[str, str | None]:
    bwrap = machine.bwrap_version if machine.bwrap else None
    return {
        "network": f"{bwrap}: a network namespace with no interface up" if bwrap else None,
        "filesystem": f"{bwrap}: / read-only, {', '.join(HIDDEN)} emptied, a private scratch directory"
        if bwrap
        else None,
        "processes": f"cgroup {machine.cgroup_version} pids.max" if machine.cgroup else None,
        "cpu_time": "RLIMIT_CPU",
        "memory": "RLIMIT_AS",
        "file_size": "RLIMIT_FSIZE",
        "wall_clock": "SIGKILL to the process group" + (" and its PID namespace" if bwrap else ""),
        "environment": "a minimal environment: PATH, HOME, TMPDIR, LANG and thread counts only",
    }


def enforcement() -> dict[str, str | None]:
    """Each protection -> the mechanism that enforces it on this machine, or None where nothing does."""
    return describe(probe_machine())
