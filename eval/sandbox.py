"""Run untrusted generated code in a separate, resource-limited Python process.

Model output is never executed in the evaluating process: a generated program can loop, eat
memory, crash the interpreter, or call sys.exit. `run_program` runs it in `python -I` (isolated:
no PYTHON* env vars, no user site, script dir not trusted) in a fresh temporary directory, with
its own session/process group and rlimits set in the child before exec:

- RLIMIT_AS (address space, default 1 GiB): runaway allocations fail with MemoryError;
- RLIMIT_CPU (ceil(timeout)+1 s): a CPU-bound child dies even if the parent is stuck;
- RLIMIT_CORE = 0: no core files; RLIMIT_FSIZE (default 16 MiB): no disk filling;
- RLIMIT_NPROC: caps fork bombs. The kernel counts all threads of the user system-wide (and
  ignores the limit for root), so it is set to the user's current task count + `max_new_procs`.

On timeout the whole process group is SIGKILLed (children included); it is also killed after
a normal exit, so a stray background child never outlives the call. stdout/stderr go to files
in the temp dir (bounded by RLIMIT_FSIZE) rather than pipes, so a huge or held-open output
cannot hang the parent.

Status: 'passed' (exit 0), 'failed' (exit 1: an uncaught exception such as AssertionError),
'timeout' (wall-clock limit, or killed by the CPU limit), 'crashed' (any other exit code,
e.g. SystemExit(3), or death by a signal, e.g. os.abort()).
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

STDERR_TAIL_CHARS = 2000


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # 'passed' | 'failed' | 'timeout' | 'crashed'
    stderr_tail: str
    returncode: int | None = None


def _user_task_count() -> int | None:
    """Threads+processes of this real uid, as RLIMIT_NPROC counts them; None if unknown."""
    uid = os.getuid()
    count = 0
    try:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{pid}/task"))
            except OSError:
                continue
    except OSError:
        return None
    return count


def _limits(timeout_s: float, memory_bytes: int, file_bytes: int, max_new_procs: int | None):
    """The (resource, soft, hard) triples to set in the child.

    The CPU hard limit is one second above the soft one, so the child first gets SIGXCPU
    (reported as 'timeout') rather than an anonymous SIGKILL.
    """
    cpu = int(math.ceil(timeout_s)) + 1
    limits = [
        (resource.RLIMIT_AS, memory_bytes, memory_bytes),
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_FSIZE, file_bytes, file_bytes),
    ]
    if max_new_procs is not None and os.getuid() != 0:
        current = _user_task_count()
        if current is not None:
            n = current + max_new_procs
            limits.append((resource.RLIMIT_NPROC, n, n))
    return limits


def _make_preexec(limits):
    def preexec():  # runs in the child between fork and exec: keep it minimal
        for res, soft, hard in limits:
            _, old_hard = resource.getrlimit(res)
            if old_hard != resource.RLIM_INFINITY:  # an unprivileged child cannot raise it
                soft, hard = min(soft, old_hard), min(hard, old_hard)
            try:
                resource.setrlimit(res, (soft, hard))
            except (ValueError, OSError):
                pass

    return preexec


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path, n: int = STDERR_TAIL_CHARS) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4 * n))
            return f.read().decode("utf-8", errors="replace")[-n:]
    except OSError:
        return ""


def run_program(
    source: str,
    timeout_s: float,
    *,
    memory_bytes: int = 1 << 30,
    file_bytes: int = 16 << 20,
    max_new_procs: int | None = 32,
) -> SandboxResult:
    """Run `source` as a script in a sandboxed subprocess; never executes it in-process."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    limits = _limits(timeout_s, memory_bytes, file_bytes, max_new_procs)
    with tempfile.TemporaryDirectory(prefix="hdflash-sandbox-", ignore_cleanup_errors=True) as tmp:
        tmpdir = Path(tmp)
        script = tmpdir / "program.py"
        script.write_text(source, encoding="utf-8")
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": tmp,
            "TMPDIR": tmp,
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        with open(tmpdir / "stdout.txt", "wb") as out, open(tmpdir / "stderr.txt", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", str(script)],
                cwd=tmp,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=_make_preexec(limits),
                close_fds=True,
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)  # pgid == pid thanks to start_new_session
                proc.wait()
        stderr_tail = _tail(tmpdir / "stderr.txt")
    rc = proc.returncode
    if timed_out or rc == -signal.SIGXCPU:
        status = "timeout"
    elif rc == 0:
        status = "passed"
    elif rc == 1:
        status = "failed"
    else:
        status = "crashed"
    return SandboxResult(passed=status == "passed", status=status, stderr_tail=stderr_tail, returncode=rc)
