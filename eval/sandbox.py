"""Run untrusted generated code in a separate, resource-limited and isolated Python process.

Model output is never executed in the evaluating process: a generated program can loop, eat
memory, crash the interpreter, call sys.exit, or attack the machine (write or delete files, read
secrets, open sockets, fork without end, signal other processes). `run_program` runs it in
`python -I` (no PYTHON* env vars, no user site, script dir not trusted) in a fresh scratch folder,
inside Linux namespaces (`isolation()` picks the first mechanism that works here):

- 'bwrap' (bubblewrap) or 'unshare' (util-linux, with eval/sandbox_launch.py building the view):
  new mount, PID, network, IPC and UTS namespaces. The filesystem is a minimal read-only view:
  /usr (+ the /bin, /lib... links), the Python installation and the venv, /proc of the new PID
  namespace, five devices (null, zero, full, random, urandom) and the scratch folder, the only
  writable place. No network interface but loopback (nothing listens there). The program cannot
  see or signal any process outside; its parent is the namespace's init, which ignores its signals,
  and when the program ends the kernel kills whatever it left behind.
  No privileges: as root, the program runs as uid/gid 65534 with no capabilities and no_new_privs;
  as another user, in a user namespace mapped to 65534 (capabilities are dropped at exec).
- 'none': the bare process only. Running model code this way needs `allow_unisolated=True`;
  without it `run_program` raises UnisolatedError (the message is printed once, loudly).

Resource limits (set by util-linux `prlimit` before it execs the sandbox, else by a preexec_fn;
inherited by everything inside):
- RLIMIT_AS (address space, default 1 GiB): runaway allocations fail with MemoryError;
- RLIMIT_CPU (ceil(timeout)+1 s): a CPU-bound child dies even if the parent is stuck;
- RLIMIT_CORE = 0: no core files; RLIMIT_FSIZE (default 16 MiB): no disk filling;
- RLIMIT_NPROC: caps fork bombs. The kernel counts all tasks of the (real) uid system-wide and
  ignores the limit for root, so it is the uid's current task count + `max_new_procs`, counted for
  65534 when root drops to it inside the sandbox, and skipped for root without isolation.

On timeout the whole process group is SIGKILLed (the namespace dies with it); it is also killed
after a normal exit. stdout/stderr go to files in the scratch folder (bounded by RLIMIT_FSIZE)
rather than pipes, so a huge or held-open output cannot hang the parent.

Status: 'passed' (exit 0), 'failed' (exit 1: an uncaught exception such as AssertionError, e.g. a
PermissionError or ConnectionRefusedError of a blocked action), 'timeout' (wall-clock limit, or
killed by the CPU limit), 'crashed' (any other exit code, e.g. SystemExit(3), or death by a signal,
e.g. os.abort()). Inside a PID namespace a death by signal N reads as exit code 128 + N; it is
reported as returncode -N, as without isolation.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

STDERR_TAIL_CHARS = 2000
SANDBOX_UID = 65534  # 'nobody' on Debian and most distributions
MECHANISMS = ("bwrap", "unshare")
ENV_MECHANISM = "HDFLASH_SANDBOX"  # 'bwrap' | 'unshare' | 'none': use only this one
_LAUNCHER = str(Path(__file__).with_name("sandbox_launch.py"))
_SYSTEM_TOP = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
_DEVICES = ("null", "zero", "full", "random", "urandom")


class UnisolatedError(RuntimeError):
    """No isolation mechanism works and unisolated execution of model code was not allowed."""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # 'passed' | 'failed' | 'timeout' | 'crashed'
    stderr_tail: str
    returncode: int | None = None
    isolation: str = "none"  # the mechanism the program ran under


@dataclasses.dataclass(frozen=True)
class Isolation:
    """Which mechanism runs generated code here, and why the ones tried before it did not work."""

    mechanism: str  # 'bwrap' | 'unshare' | 'none'
    unavailable: tuple[tuple[str, str], ...] = ()  # (mechanism, reason)

    @property
    def isolated(self) -> bool:
        return self.mechanism != "none"

    def label(self, allow_unisolated: bool = False) -> str:
        if self.isolated or not allow_unisolated:
            return self.mechanism
        return "none (allowed by --allow-unisolated)"

    def to_json(self, allow_unisolated: bool = False) -> dict:
        return {"mechanism": self.label(allow_unisolated),
                "uid": SANDBOX_UID if self.isolated else os.getuid(),  # the program's uid (inside the sandbox)
                "unavailable": dict(self.unavailable)}


@dataclasses.dataclass(frozen=True)
class _View:
    """The read-only part of the sandbox's filesystem."""

    ro: tuple[str, ...]  # directories bound read-only at the same path
    symlinks: tuple[tuple[str, str], ...]  # (path, target), e.g. ('/bin', 'usr/bin')


def _under(path: str, dirs) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


@functools.cache
def _view() -> _View:
    ro, links = [], []
    for name in _SYSTEM_TOP:
        p = "/" + name
        if os.path.islink(p):
            links.append((p, os.readlink(p)))
        elif os.path.isdir(p):
            ro.append(p)
    # The interpreter, its standard library and the venv (site-packages), wherever they live.
    exe_dir = os.path.dirname(os.path.realpath(sys.executable))
    for p in (sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix, exe_dir):
        p = os.path.realpath(p)
        if p != "/" and not _under(p, ro):
            ro = [d for d in ro if not _under(d, [p])] + [p]
    return _View(tuple(ro), tuple(links))


def _parents(paths) -> list[str]:
    """Every proper ancestor directory of `paths` except '/', parents first."""
    out = set()
    for p in paths:
        q = os.path.dirname(p)
        while q not in ("/", ""):
            out.add(q)
            q = os.path.dirname(q)
    return sorted(out, key=lambda q: (q.count("/"), q))


def _bwrap_argv(scratch: str, argv: list[str], as_root: bool) -> list[str]:
    view = _view()
    cmd = [shutil.which("bwrap") or "bwrap", "--unshare-ipc", "--unshare-pid", "--unshare-net",
           "--unshare-uts", "--unshare-cgroup-try", "--die-with-parent", "--new-session"]
    if not as_root:  # unprivileged: a user namespace, mapped to the sandbox uid
        cmd += ["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--cap-drop", "ALL"]
    for d in _parents(list(view.ro) + [scratch]):
        if not _under(d, view.ro):
            cmd += ["--perms", "0755", "--dir", d]  # bwrap would create them 0700, closed to uid 65534
    for d in view.ro:
        cmd += ["--ro-bind", d, d]
    for path, target in view.symlinks:
        cmd += ["--symlink", target, path]
    cmd += ["--perms", "0755", "--dir", "/dev"]
    for name in _DEVICES:
        cmd += ["--dev-bind", f"/dev/{name}", f"/dev/{name}"]
    cmd += ["--proc", "/proc", "--bind", scratch, scratch, "--chdir", scratch, "--remount-ro", "/", "--"]
    if as_root:  # real uid 65534 (not a user namespace mapped to root): RLIMIT_NPROC then applies
        cmd += [shutil.which("setpriv") or "setpriv", f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}",
                "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"]
    return cmd + argv


def _unshare_argv(scratch: str, mount_root: str, argv: list[str], as_root: bool) -> list[str]:
    view = _view()
    spec = {"root": mount_root, "scratch": scratch, "ro": list(view.ro), "symlinks": list(view.symlinks),
            "uid": SANDBOX_UID, "as_root": as_root, "argv": argv}
    cmd = [shutil.which("unshare") or "unshare", "--mount", "--pid", "--net", "--ipc", "--uts", "--fork",
           "--kill-child"]
    if not as_root:
        cmd += ["--user", "--map-root-user"]  # the launcher then maps SANDBOX_UID in a nested user namespace
    return cmd + ["--", sys.executable, "-I", "-B", _LAUNCHER, json.dumps(spec)]


def _task_count(uid: int) -> int | None:
    """Threads+processes of real uid `uid`, as RLIMIT_NPROC counts them; None if unknown."""
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


def _limits(timeout_s: float, memory_bytes: int, file_bytes: int, max_new_procs: int | None, nproc_uid: int | None):
    """The (resource, soft, hard) triples to set in the child, within this process's hard limits
    (an unprivileged child cannot raise them).

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
    if max_new_procs is not None and nproc_uid is not None:
        current = _task_count(nproc_uid)
        if current is not None:
            n = current + max_new_procs
            limits.append((resource.RLIMIT_NPROC, n, n))
    clamped = []
    for res, soft, hard in limits:
        _, old_hard = resource.getrlimit(res)
        if old_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, old_hard), min(hard, old_hard)
        clamped.append((res, soft, hard))
    return clamped


_PRLIMIT_NAMES = {resource.RLIMIT_AS: "as", resource.RLIMIT_CPU: "cpu", resource.RLIMIT_CORE: "core",
                  resource.RLIMIT_FSIZE: "fsize", resource.RLIMIT_NPROC: "nproc"}


def _prlimit_argv(limits) -> list[str]:
    """util-linux prlimit setting `limits` before it execs the rest of the command line."""
    def value(v):
        return "unlimited" if v == resource.RLIM_INFINITY else str(v)

    return [shutil.which("prlimit")] + [f"--{_PRLIMIT_NAMES[r]}={value(s)}:{value(h)}" for r, s, h in limits] + ["--"]


def _make_preexec(limits):
    def preexec():  # runs in the child between fork and exec: keep it minimal
        for res, soft, hard in limits:
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


def _status(rc: int, timed_out: bool, mechanism: str) -> tuple[str, int]:
    """(status, returncode); inside a PID namespace exit code 128 + N means death by signal N."""
    if mechanism != "none" and 128 < rc < 128 + signal.NSIG:
        rc = -(rc - 128)
    if timed_out or rc == -signal.SIGXCPU:
        return "timeout", rc
    if rc == 0:
        return "passed", rc
    if rc == 1:
        return "failed", rc
    return "crashed", rc


def _execute(source: str, timeout_s: float, mechanism: str, limits_args: tuple) -> SandboxResult:
    as_root = os.geteuid() == 0
    if as_root:  # RLIMIT_NPROC counts the real uid outside any user namespace; it cannot cap root
        nproc_uid = None if mechanism == "none" else SANDBOX_UID
    else:
        nproc_uid = os.getuid()
    limits = _limits(*limits_args, nproc_uid)
    with tempfile.TemporaryDirectory(prefix="hdflash-sandbox-", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp) / "work"  # the scratch folder; nothing else of `tmp` is visible inside
        work.mkdir(mode=0o755)
        if mechanism != "none" and as_root:
            os.chown(work, SANDBOX_UID, SANDBOX_UID)
        script = work / "program.py"
        script.write_text(source, encoding="utf-8")
        argv = [sys.executable, "-I", "-B", str(script)]
        if mechanism == "bwrap":
            argv = _bwrap_argv(str(work), argv, as_root)
        elif mechanism == "unshare":
            (Path(tmp) / "root").mkdir()
            argv = _unshare_argv(str(work), str(Path(tmp) / "root"), argv, as_root)
        elif mechanism != "none":
            raise ValueError(f"unknown sandbox mechanism {mechanism!r}")
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(work),
            "TMPDIR": str(work),
            "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        # prlimit sets the limits and execs, so no Python runs between fork and exec (a preexec_fn forks the
        # whole, possibly multithreaded, evaluator: JAX warns that it may deadlock); preexec_fn is the fallback.
        preexec = None
        if shutil.which("prlimit"):
            argv = _prlimit_argv(limits) + argv
        else:
            preexec = _make_preexec(limits)
        with open(work / "stdout.txt", "wb") as out, open(work / "stderr.txt", "wb") as err:
            proc = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, preexec_fn=preexec, close_fds=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)  # pgid == pid thanks to start_new_session
                proc.wait()
        stderr_tail = _tail(work / "stderr.txt")
    status, rc = _status(proc.returncode, timed_out, mechanism)
    return SandboxResult(status == "passed", status, stderr_tail, rc, mechanism)


# The probe passes only where the program runs unprivileged, in its own PID namespace, without
# network interfaces, on a read-only root, seeing nothing of its temp dir but the scratch folder.
_PROBE = """\
import os, socket
assert os.getuid() != 0 and os.geteuid() != 0, "runs as root"
assert os.getpid() <= 3, "no PID namespace"
assert {n for _, n in socket.if_nameindex()} <= {"lo"}, "network interfaces visible"
assert os.listdir("..") == ["work"], "temp dir visible"
try:
    open("/hdflash-probe", "w")
except OSError:
    pass
else:
    raise AssertionError("root filesystem writable")
"""


def probe(mechanism: str, timeout_s: float = 20.0) -> str | None:
    """None if `mechanism` isolates a program here, else why not."""
    if mechanism not in MECHANISMS:
        raise ValueError(f"unknown sandbox mechanism {mechanism!r}")
    tools = ["bwrap"] if mechanism == "bwrap" else ["unshare"]
    if mechanism == "bwrap" and os.geteuid() == 0:
        tools.append("setpriv")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return f"{' and '.join(missing)} not found"
    r = _execute(_PROBE, timeout_s, mechanism, (timeout_s, 1 << 30, 1 << 20, 64))
    if r.passed:
        return None
    lines = [line for line in r.stderr_tail.strip().splitlines() if line.strip()]
    return f"probe {r.status} (exit {r.returncode}): {lines[-1] if lines else 'no output'}"


@functools.cache
def isolation() -> Isolation:
    """The first mechanism of MECHANISMS (or only $HDFLASH_SANDBOX) that works here; probed once."""
    forced = os.environ.get(ENV_MECHANISM, "").strip()
    if forced and forced not in MECHANISMS + ("none",):
        raise ValueError(f"{ENV_MECHANISM}={forced!r}: expected one of {MECHANISMS + ('none',)}")
    candidates = (forced,) if forced else MECHANISMS
    unavailable = []
    for m in candidates:
        if m == "none":
            unavailable.append(("all", f"{ENV_MECHANISM}=none"))
            break
        why = probe(m)
        if why is None:
            return Isolation(m, tuple(unavailable))
        unavailable.append((m, why))
    reasons = "; ".join(f"{m}: {why}" for m, why in unavailable)
    print(f"\n{'!' * 100}\n!! eval.sandbox: NO ISOLATION WORKS HERE ({reasons}).\n!! Generated programs would run with "
          f"this user's access to files, network and processes. Scoring refuses to run them unless unisolated\n"
          f"!! execution is allowed explicitly (--allow-unisolated). Install bubblewrap (apt-get install "
          f"bubblewrap) to isolate them.\n{'!' * 100}\n", file=sys.stderr, flush=True)
    return Isolation("none", tuple(unavailable))


def require_isolation(allow_unisolated: bool = False) -> Isolation:
    """isolation(), or UnisolatedError if it is 'none' and unisolated execution is not allowed."""
    iso = isolation()
    if not iso.isolated and not allow_unisolated:
        reasons = "; ".join(f"{m}: {why}" for m, why in iso.unavailable)
        raise UnisolatedError(f"no sandbox isolation works here ({reasons}); refusing to run model-written code "
                              "unisolated. Install bubblewrap, or pass --allow-unisolated to accept the risk.")
    return iso


def run_program(
    source: str,
    timeout_s: float,
    *,
    allow_unisolated: bool = False,
    mechanism: str | None = None,
    memory_bytes: int = 1 << 30,
    file_bytes: int = 16 << 20,
    max_new_procs: int | None = 32,
) -> SandboxResult:
    """Run `source` as a script in a sandboxed subprocess; never executes it in-process.

    `mechanism` overrides isolation() ('none' still needs `allow_unisolated`).
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if mechanism is None:
        mechanism = require_isolation(allow_unisolated).mechanism
    elif mechanism == "none" and not allow_unisolated:
        raise UnisolatedError("mechanism='none' runs model-written code unisolated: pass allow_unisolated=True")
    return _execute(source, timeout_s, mechanism, (timeout_s, memory_bytes, file_bytes, max_new_procs))
