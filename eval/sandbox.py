"""Run untrusted generated code in a separate, resource-limited and isolated Python process, and take
the verdict from its checks, not from its exit code.

Model output is never executed in the evaluating process: a generated program can loop, eat
memory, crash the interpreter, call sys.exit, or attack the machine (write or delete files, read
secrets, open sockets, fork without end, signal other processes). `run_program(source, timeout_s,
checks=...)` runs it in `python -I` (no PYTHON* env vars, no user site, script dir not trusted) in a
fresh scratch folder, inside Linux namespaces (`isolation()` picks the first mechanism that works here):

- 'bwrap' (bubblewrap) or 'unshare' (util-linux, with eval/sandbox_launch.py building the view):
  new mount, PID, network, IPC and UTS namespaces. The filesystem is a minimal read-only view:
  /usr (+ the /bin, /lib... links), the Python installation and the venv, /proc of the new PID
  namespace, five devices (null, zero, full, random, urandom) and the scratch folder, the only
  writable place: a tmpfs of `scratch_bytes` that lives in the sandbox's mount namespace (never on
  the host's disk; the kernel frees it with the namespace). No network interface but loopback
  (nothing listens there). The program cannot see or signal any process outside; its parent is the
  namespace's init, which ignores its signals, and when the program ends the kernel kills whatever it
  left behind. A seccomp filter (eval.sandbox_launch.seccomp_filter) refuses new user namespaces and
  socket families other than Unix and IP.
  No privileges: as root, the program runs as uid/gid 65534 with no capabilities and no_new_privs;
  as another user, in a user namespace mapped to 65534 (capabilities are dropped at exec).
- 'none': the bare process only (no cgroup, tmpfs, IPC limits or seccomp either). Running model code
  this way needs `allow_unisolated=True`; without it `run_program` raises UnisolatedError (the message
  is printed once, loudly).

The verdict. A trusted harness (`_HARNESS`, run by `python -c`) compiles `source` and `checks` first,
then executes them in one module namespace named 'program' (not '__main__': like the official
HumanEval/MBPP harnesses, `if __name__ == '__main__':` blocks do not run). Any BaseException (SystemExit
and KeyboardInterrupt included) fails the run. Only after the last check returned does it write a
marker holding a random nonce to a pipe the parent keeps; the nonce reached it through a descriptor it
read and closed before any of the program ran. 'passed' needs exit status 0 *and* that marker, so a
program that leaves early with status 0 (os._exit(0), exec, a hook, a thread) is 'unverified'. What a
program in the same interpreter can still do (read the nonce from the harness's frame, an always-equal
object, patched builtins) is in docs/scoring_sandbox.md.

The parent trusts nothing the program leaves: it never opens a path in the scratch folder; stderr
goes to a memfd it keeps (the tail is read with a bounded pread), the marker to its own pipe; every
step after the run (reaping, reading, removing the cgroup and temp folder) is bounded by CLEANUP_S and
cannot raise out of `run_program`.

Caps (`Limits`; `caps_record()` says which apply here, and `Isolation.to_json` puts that in results.json):
- the run as a whole, where a cgroup can be made (v2 with memory and pids delegated, else v1's memory
  and pids hierarchies; needs write access, in practice root): memory (+ swap) `total_memory_bytes`
  including tmpfs, memfds, shared memory and the kernel memory of inodes, and `max_new_procs` tasks
  besides the supervisors; the kernel's OOM killer acts inside the cgroup only;
- as root, the IPC namespace's own sysctls (_IPC_LIMITS: SysV shared memory and message queues),
  set by a small root wrapper (`unshare --ipc` + sh) that also joins the cgroup before exec;
- per process (util-linux `prlimit` before it execs the sandbox, else a preexec_fn; inherited by
  everything inside): RLIMIT_AS `memory_bytes` (MemoryError), RLIMIT_CPU ceil(timeout)+1 s, RLIMIT_CORE 0,
  RLIMIT_FSIZE `file_bytes`, RLIMIT_NOFILE `open_files`, RLIMIT_MSGQUEUE 0, and RLIMIT_NPROC: the kernel
  counts all tasks of the (real) uid system-wide and ignores the limit for root, so it is the uid's
  current task count + `max_new_procs`, counted for 65534 when root drops to it inside the sandbox,
  and skipped for root without isolation.

On timeout the whole process group is SIGKILLed (the namespace dies with it); it is also killed
after a normal exit.

Status: 'passed' (exit 0 and the marker), 'unverified' (exit 0 without it: the checks did not all run),
'failed' (exit 1: an exception escaped the program or its checks, e.g. AssertionError, SystemExit, a
PermissionError or ConnectionRefusedError of a blocked action), 'timeout' (wall-clock limit, or killed
by the CPU limit), 'crashed' (any other exit code, e.g. os._exit(3), or death by a signal, e.g.
os.abort() or the cgroup's OOM killer). Inside a PID namespace a death by signal N reads as exit code
128 + N; it is reported as returncode -N, as without isolation.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import math
import os
import resource
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from eval.sandbox_launch import ALLOWED_FAMILIES, seccomp_filter

STDERR_TAIL_CHARS = 2000
SANDBOX_UID = 65534  # 'nobody' on Debian and most distributions
MECHANISMS = ("bwrap", "unshare")
STATUSES = ("passed", "unverified", "failed", "timeout", "crashed")
ENV_MECHANISM = "HDFLASH_SANDBOX"  # 'bwrap' | 'unshare' | 'none': use only this one
CLEANUP_S = 5.0  # the most the steps after a run may take together
_LAUNCHER = str(Path(__file__).with_name("sandbox_launch.py"))
_SYSTEM_TOP = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")
_DEVICES = ("null", "zero", "full", "random", "urandom")
_SUPERVISORS = 3  # tasks in a run's cgroup besides the program's: the mechanism's outer process, PID 1, the program
# The sandbox IPC namespace's sysctls (set as root): SysV shared memory 64 MiB in all, in at most 32 segments;
# at most 32 message queues (of the default 16 KiB each). Semaphores are left at the defaults (bytes each).
_IPC_LIMITS = (("kernel/shmmax", 64 << 20), ("kernel/shmall", (64 << 20) // os.sysconf("SC_PAGE_SIZE")),
               ("kernel/shmmni", 32), ("kernel/msgmni", 32))
# Run as root before the mechanism: write "$2" into file "$1" for each pair up to '--' (a cgroup's cgroup.procs
# gets "0", i.e. this shell, which then execs the rest, so the program starts inside), then exec the rest.
_WRAP_SH = 'while [ "$1" != -- ]; do printf "%s\\n" "$2" >"$1" || exit 125; shift 2; done; shift; exec "$@"'


class UnisolatedError(RuntimeError):
    """No isolation mechanism works and unisolated execution of model code was not allowed."""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # one of STATUSES
    stderr_tail: str
    returncode: int | None = None
    isolation: str = "none"  # the mechanism the program ran under
    peak_memory_bytes: int | None = None  # the run's cgroup's peak (memory of all its processes); None without one


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one run may use (see the module docstring for how each is enforced)."""

    memory_bytes: int = 1 << 30  # RLIMIT_AS, each process
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE, each file
    max_new_procs: int | None = 32  # RLIMIT_NPROC headroom; the cgroup's pids.max besides the supervisors
    total_memory_bytes: int = 1 << 30  # the run's cgroup, all processes, tmpfs, memfds and shared memory together
    scratch_bytes: int = 64 << 20  # the scratch tmpfs's size
    open_files: int = 256  # RLIMIT_NOFILE


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
                "unavailable": dict(self.unavailable),
                "caps": caps_record(self.mechanism)}


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


def _bwrap_argv(scratch: str, argv: list[str], as_root: bool, own_ipc: bool, scratch_bytes: int,
                seccomp_fd: int | None) -> list[str]:
    view = _view()
    cmd = [shutil.which("bwrap") or "bwrap", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
           "--die-with-parent", "--new-session"]
    if own_ipc:  # else the root wrapper made (and capped) the IPC namespace
        cmd.append("--unshare-ipc")
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
    # The scratch tmpfs is root's here; 01777 lets uid 65534 write (nobody else is inside).
    cmd += ["--proc", "/proc", "--size", str(scratch_bytes), "--perms", "01777", "--tmpfs", scratch,
            "--chdir", scratch, "--remount-ro", "/"]
    if seccomp_fd is not None:
        cmd += ["--seccomp", str(seccomp_fd)]
    cmd.append("--")
    if as_root:  # real uid 65534 (not a user namespace mapped to root): RLIMIT_NPROC then applies
        cmd += [shutil.which("setpriv") or "setpriv", f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}",
                "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"]
    return cmd + argv


def _unshare_argv(scratch: str, mount_root: str, argv: list[str], as_root: bool, own_ipc: bool, scratch_bytes: int,
                  seccomp: bool) -> list[str]:
    view = _view()
    spec = {"root": mount_root, "scratch": scratch, "scratch_bytes": scratch_bytes, "ro": list(view.ro),
            "symlinks": list(view.symlinks), "uid": SANDBOX_UID, "as_root": as_root, "seccomp": seccomp, "argv": argv}
    cmd = [shutil.which("unshare") or "unshare", "--mount", "--pid", "--net", "--uts", "--fork", "--kill-child"]
    if own_ipc:
        cmd.append("--ipc")
    if not as_root:
        cmd += ["--user", "--map-root-user"]  # the launcher then maps SANDBOX_UID in a nested user namespace
    return cmd + ["--", sys.executable, "-I", "-B", _LAUNCHER, json.dumps(spec)]


# ---- the run's cgroup -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _CgroupSupport:
    version: int  # 1 or 2
    bases: tuple[tuple[str, str], ...]  # (hierarchy: 'unified' | 'memory' | 'pids', folder the runs' cgroups go in)


def _own_cgroups(text: str) -> dict[str, str]:
    """/proc/self/cgroup as {controller: path}; '' for the v2 hierarchy."""
    own = {}
    for line in text.splitlines():
        _, ctrls, path = line.split(":", 2)
        for c in ctrls.split(",") if ctrls else [""]:
            own[c] = path
    return own


def _cgroup_mounts(text: str) -> dict[str, tuple[str, str]]:
    """/proc/self/mountinfo's cgroup mounts as {'unified' | 'memory' | 'pids': (mount root, mount point)}."""
    mounts = {}
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, kind = left.split(), right.split()
        if len(fields) < 5 or len(kind) < 3:
            continue
        if kind[0] == "cgroup2":
            mounts.setdefault("unified", (fields[3], fields[4]))
        elif kind[0] == "cgroup":
            for c in kind[2].split(","):
                if c in ("memory", "pids"):
                    mounts.setdefault(c, (fields[3], fields[4]))
    return mounts


def _folder(mount: tuple[str, str], path: str) -> str | None:
    """Where cgroup `path` (as /proc/self/cgroup names it) is under `mount`; None if outside the mount."""
    root, point = mount
    if root == "/":
        return point + (path if path != "/" else "")
    if path == root or path.startswith(root + "/"):
        return point + path[len(root):]
    return None


def _find_cgroup_support(own: dict[str, str], mounts: dict[str, tuple[str, str]]) -> _CgroupSupport | str:
    reasons = []
    if "unified" in mounts and "" in own:
        base = _folder(mounts["unified"], own[""])
        try:
            if base is None:
                raise OSError(errno.ENOENT, "this process's cgroup is outside the mounted hierarchy")
            with open(os.path.join(base, "cgroup.controllers")) as f:
                have = set(f.read().split())
            if not {"memory", "pids"} <= have:
                raise OSError(errno.ENOTSUP, f"controllers {sorted(have)} lack memory or pids")
            with open(os.path.join(base, "cgroup.subtree_control")) as f:
                enabled = set(f.read().split())
            # Refused (EBUSY) where `base` holds processes itself: v2's no-internal-process rule.
            if not {"memory", "pids"} <= enabled:
                with open(os.path.join(base, "cgroup.subtree_control"), "w") as f:
                    f.write("+memory +pids")
            return _CgroupSupport(2, (("unified", base),))
        except OSError as e:
            reasons.append(f"v2 at {base}: {e.strerror or e}")
    bases = [(c, _folder(mounts[c], own[c])) for c in ("memory", "pids") if c in mounts and c in own]
    if len(bases) == 2 and all(b for _, b in bases):
        return _CgroupSupport(1, tuple(bases))
    reasons.append("v1: no memory and pids hierarchies mounted for this process")
    return "; ".join(reasons)


@functools.cache
def _cgroup_support() -> _CgroupSupport | str:
    """How runs get a cgroup here (probed once: one is made with the default limits and removed), else why not."""
    try:
        with open("/proc/self/cgroup") as f, open("/proc/self/mountinfo") as g:
            support = _find_cgroup_support(_own_cgroups(f.read()), _cgroup_mounts(g.read()))
    except OSError as e:
        return f"cannot read /proc/self/cgroup or /proc/self/mountinfo: {e}"
    if isinstance(support, str):
        return support
    try:
        _Cgroup(support, Limits()).remove(time.monotonic() + CLEANUP_S)
    except OSError as e:
        return f"v{support.version}: cannot make a cgroup with limits under {support.bases[0][1]}: {e.strerror or e}"
    return support


def _write(folder: str, name: str, value: str, optional: bool = False) -> None:
    path = os.path.join(folder, name)
    if optional and not os.path.exists(path):
        return
    with open(path, "w") as f:
        f.write(value)


class _Cgroup:
    """One run's cgroup (one folder per hierarchy), made with its limits set."""

    def __init__(self, support: _CgroupSupport, limits: Limits):
        self.version = support.version
        self.dirs: dict[str, str] = {}
        name = f"hdflash-sandbox-{os.getpid()}-{secrets.token_hex(4)}"
        mem, tasks = str(limits.total_memory_bytes), ("max" if limits.max_new_procs is None
                                                       else str(limits.max_new_procs + _SUPERVISORS))
        try:
            for hierarchy, base in support.bases:
                os.mkdir(os.path.join(base, name))
                self.dirs[hierarchy] = os.path.join(base, name)
            if self.version == 2:
                d = self.dirs["unified"]
                _write(d, "memory.max", mem)
                _write(d, "memory.swap.max", "0", optional=True)
                _write(d, "pids.max", tasks)
            else:
                _write(self.dirs["memory"], "memory.limit_in_bytes", mem)
                _write(self.dirs["memory"], "memory.memsw.limit_in_bytes", mem, optional=True)  # no swap beyond it
                _write(self.dirs["pids"], "pids.max", tasks)
        except BaseException:
            self.remove(time.monotonic() + CLEANUP_S)
            raise

    @property
    def procs(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.dirs.values()]

    def _memory_file(self, v2_name: str, v1_name: str) -> str:
        return os.path.join(self.dirs["unified" if self.version == 2 else "memory"],
                            v2_name if self.version == 2 else v1_name)

    def peak_memory(self) -> int | None:
        try:
            with open(self._memory_file("memory.peak", "memory.max_usage_in_bytes")) as f:
                return int(f.read())
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int:
        try:
            with open(self._memory_file("memory.events", "memory.oom_control")) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def remove(self, deadline: float) -> list[str]:
        """Remove the folders (waiting, until `deadline`, for the killed tasks to leave); what could not be."""
        left = []
        for d in self.dirs.values():
            while True:
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        left.append(f"{d}: {e.strerror}")
                        break
                    time.sleep(0.005)
        return left


@functools.cache
def _ipc_support() -> str | None:
    """None if the root wrapper can make a new IPC namespace and set _IPC_LIMITS in it (probed once), else why not."""
    if os.geteuid() != 0:
        return "needs root (the wrapper makes the IPC namespace and sets its sysctls from outside the sandbox)"
    tool = shutil.which("unshare")
    if tool is None:
        return "unshare not found"
    items = [x for name, v in _IPC_LIMITS for x in (f"/proc/sys/{name}", str(v))]
    try:
        r = subprocess.run([tool, "--ipc", "--", "/bin/sh", "-c", _WRAP_SH, "sh", *items, "--", "true"],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot run {tool}: {e}"
    lines = r.stderr.decode(errors="replace").strip().splitlines()
    return None if r.returncode == 0 else f"setting them failed (exit {r.returncode}): {lines[-1] if lines else ''}"


def _wrapper_argv(cgroup: _Cgroup | None, ipc: bool) -> list[str]:
    """The root wrapper (see _WRAP_SH): joins the cgroup and, with `ipc`, makes and caps the IPC namespace."""
    items = [x for p in (cgroup.procs if cgroup else []) for x in (p, "0")]
    if ipc:
        items += [x for name, v in _IPC_LIMITS for x in (f"/proc/sys/{name}", str(v))]
    if not items:
        return []
    pre = [shutil.which("unshare") or "unshare", "--ipc", "--"] if ipc else []
    return pre + ["/bin/sh", "-c", _WRAP_SH, "sh", *items, "--"]


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


def _limits(timeout_s: float, limits: Limits, nproc_uid: int | None):
    """The (resource, soft, hard) triples to set in the child, within this process's hard limits
    (an unprivileged child cannot raise them).

    The CPU hard limit is one second above the soft one, so the child first gets SIGXCPU
    (reported as 'timeout') rather than an anonymous SIGKILL.
    """
    cpu = int(math.ceil(timeout_s)) + 1
    triples = [
        (resource.RLIMIT_AS, limits.memory_bytes, limits.memory_bytes),
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_FSIZE, limits.file_bytes, limits.file_bytes),
        (resource.RLIMIT_NOFILE, limits.open_files, limits.open_files),
        (resource.RLIMIT_MSGQUEUE, 0, 0),  # POSIX message queues live in kernel memory outside any file
    ]
    if limits.max_new_procs is not None and nproc_uid is not None:
        current = _task_count(nproc_uid)
        if current is not None:
            n = current + limits.max_new_procs
            triples.append((resource.RLIMIT_NPROC, n, n))
    clamped = []
    for res, soft, hard in triples:
        _, old_hard = resource.getrlimit(res)
        if old_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, old_hard), min(hard, old_hard)
        clamped.append((res, soft, hard))
    return clamped


_PRLIMIT_NAMES = {resource.RLIMIT_AS: "as", resource.RLIMIT_CPU: "cpu", resource.RLIMIT_CORE: "core",
                  resource.RLIMIT_FSIZE: "fsize", resource.RLIMIT_NPROC: "nproc", resource.RLIMIT_NOFILE: "nofile",
                  resource.RLIMIT_MSGQUEUE: "msgqueue"}


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


def _wait(proc: subprocess.Popen, timeout_s: float) -> None:
    """proc.wait(timeout_s), woken by the exit itself: Popen.wait with a timeout polls with sleeps of up to 50 ms,
    which added 0-50 ms to every run. A pidfd (Linux 5.3+) becomes readable when the process ends."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        proc.wait(timeout=timeout_s)
        return
    try:
        ready, _, _ = select.select([fd], [], [], timeout_s)
    finally:
        os.close(fd)
    if not ready:
        raise subprocess.TimeoutExpired(proc.args, timeout_s)
    proc.wait()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# The program's interpreter runs this (python -I -B -c _HARNESS JOB_FD VERDICT_FD). JOB_FD holds "NONCE LEN\n", then
# LEN bytes of program and the checks (UTF-8); it is read and closed before any of the program runs. The functions
# it calls after the program are bound first (default arguments), so patching os or builtins cannot redirect them.
_HARNESS = r"""
import os, sys


def _report(exc, parts, write):
    try:
        sys.stderr.flush()
    except BaseException:
        pass
    try:
        import linecache, traceback
        for name, text in parts:
            linecache.cache[name] = (len(text), None, text.splitlines(True), name)
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == "<string>":  # hide the harness's frames
            tb = tb.tb_next
        msg = "".join(traceback.format_exception(type(exc), exc, tb))
    except BaseException:
        msg = "eval.sandbox: the program raised an exception that could not be formatted\n"
    try:
        write(2, msg.encode("utf-8", "replace"))
    except BaseException:
        pass


def _main(read=os.read, write=os.write, close=os.close, exit=os._exit, getpid=os.getpid, compile=compile, exec=exec):
    job_fd, verdict_fd = int(sys.argv[1]), int(sys.argv[2])
    chunks = []
    while True:
        chunk = read(job_fd, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    close(job_fd)
    head, _, body = b"".join(chunks).partition(b"\n")
    nonce, n = head.split()
    parts = (("program.py", body[:int(n)].decode()), ("checks.py", body[int(n):].decode()))
    del chunks, body
    sys.argv[:] = ["program.py"]
    pid = getpid()
    try:
        codes = [compile(text, name, "exec") for name, text in parts]  # both before any of it runs
        import types
        module = types.ModuleType("program")
        sys.modules["program"] = module
        for code in codes:
            exec(code, module.__dict__)
    except BaseException as e:  # SystemExit and KeyboardInterrupt too: the checks did not all pass
        _report(e, parts, write)
        exit(1)
    if getpid() != pid:  # a forked copy that got here did not run the program from the start
        exit(1)
    write(verdict_fd, b"passed " + nonce + b"\n")
    exit(0)  # no atexit hooks, finalizers or waiting for threads: the verdict is in


_main()
"""


def _marker(nonce: str) -> bytes:
    return b"passed " + nonce.encode() + b"\n"


def _read_marker(fd: int, nonce: str) -> bool:
    """Whether the verdict pipe holds exactly the harness's marker (one non-blocking read: never waits)."""
    try:
        os.set_blocking(fd, False)
        data = os.read(fd, 256)
    except OSError:  # BlockingIOError: nothing was written
        return False
    return data == _marker(nonce)


def _tail(fd: int, n: int = STDERR_TAIL_CHARS) -> str:
    """The last `n` characters of the stderr memfd, read with one bounded pread (the parent's own descriptor)."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return ""
        start = max(0, st.st_size - 4 * n)
        data = os.pread(fd, min(st.st_size - start, 4 * n), start)
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")[-n:]


def _status(rc: int | None, timed_out: bool, mechanism: str, verified: bool) -> tuple[str, int | None]:
    """(status, returncode); inside a PID namespace exit code 128 + N means death by signal N."""
    if rc is None:  # not reaped within CLEANUP_S of its SIGKILL
        return ("timeout" if timed_out else "crashed"), rc
    if mechanism != "none" and 128 < rc < 128 + signal.NSIG:
        rc = -(rc - 128)
    if timed_out or rc == -signal.SIGXCPU:
        return "timeout", rc
    if rc == 0:
        return ("passed" if verified else "unverified"), rc
    if rc == 1:
        return "failed", rc
    return "crashed", rc


def _warn(what: str) -> None:
    print(f"eval.sandbox: {what}", file=sys.stderr, flush=True)


def _remove_tree(path: str, deadline: float) -> None:
    """Best effort, never raising: only unisolated runs leave anything of the program's here."""
    try:
        shutil.rmtree(path)
        return
    except FileNotFoundError:
        return
    except Exception:  # OSError, or RecursionError on a deep enough tree: rm walks any depth
        pass
    try:
        subprocess.run(["rm", "-rf", "--one-file-system", path], stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=max(0.1, deadline - time.monotonic()))
    except Exception:
        pass
    if os.path.lexists(path):
        _warn(f"could not remove {path} within CLEANUP_S")


def _execute(source: str, checks: str, timeout_s: float, mechanism: str, limits: Limits) -> SandboxResult:
    if mechanism not in MECHANISMS + ("none",):
        raise ValueError(f"unknown sandbox mechanism {mechanism!r}")
    isolated, as_root = mechanism != "none", os.geteuid() == 0
    if as_root:  # RLIMIT_NPROC counts the real uid outside any user namespace; it cannot cap root
        nproc_uid = SANDBOX_UID if isolated else None
    else:
        nproc_uid = os.getuid()
    rlimits = _limits(timeout_s, limits, nproc_uid)
    support = _cgroup_support() if isolated else None
    ipc = isolated and _ipc_support() is None
    filt = seccomp_filter() if isolated else None
    nonce = secrets.token_hex(16)
    src, chk = source.encode("utf-8"), checks.encode("utf-8")

    cgroup, deadline = None, None
    tmp = tempfile.mkdtemp(prefix="hdflash-sandbox-")
    mine: list[int] = []  # the parent's descriptors, closed at the end
    try:
        cgroup = _Cgroup(support, limits) if isinstance(support, _CgroupSupport) else None
        job = os.memfd_create("hdflash-job")
        mine.append(job)
        os.write(job, f"{nonce} {len(src)}\n".encode() + src + chk)
        os.lseek(job, 0, os.SEEK_SET)
        err = os.memfd_create("hdflash-stderr")
        mine.append(err)
        verdict_r, verdict_w = os.pipe()
        mine += [verdict_r, verdict_w]
        pass_fds = [job, verdict_w]
        scratch = os.path.join(tmp, "work")  # exists on the host only for 'none'; else a tmpfs inside
        argv = [sys.executable, "-I", "-B", "-c", _HARNESS, str(job), str(verdict_w)]
        if mechanism == "bwrap":
            seccomp_fd = None
            if filt is not None:
                seccomp_fd, w = os.pipe()
                mine.append(seccomp_fd)
                os.write(w, filt)
                os.close(w)
                pass_fds.append(seccomp_fd)
            argv = _bwrap_argv(scratch, argv, as_root, not ipc, limits.scratch_bytes, seccomp_fd)
        elif mechanism == "unshare":
            os.mkdir(os.path.join(tmp, "root"))
            argv = _unshare_argv(scratch, os.path.join(tmp, "root"), argv, as_root, not ipc, limits.scratch_bytes,
                                 filt is not None)
        else:
            os.mkdir(scratch)
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": scratch,
            "TMPDIR": scratch,
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
            argv = _prlimit_argv(rlimits) + argv
        else:
            preexec = _make_preexec(rlimits)
        argv = _wrapper_argv(cgroup, ipc) + argv
        proc = subprocess.Popen(argv, cwd=scratch if not isolated else tmp, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True, preexec_fn=preexec,
                                close_fds=True, pass_fds=pass_fds)
        os.close(verdict_w)  # only the program holds the write end now
        mine.remove(verdict_w)
        timed_out = False
        try:
            _wait(proc, timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(proc.pid)  # pgid == pid thanks to start_new_session
        # From here on: bounded by CLEANUP_S, nothing raises.
        deadline = time.monotonic() + CLEANUP_S
        try:
            _wait(proc, CLEANUP_S)
        except subprocess.TimeoutExpired:
            _warn(f"pid {proc.pid} not reaped {CLEANUP_S} s after SIGKILL")
        verified = _read_marker(verdict_r, nonce)
        stderr_tail = _tail(err)
        peak = cgroup.peak_memory() if cgroup else None
        killed = cgroup.oom_kills() if cgroup else 0
        if killed:
            stderr_tail += (f"\n[eval.sandbox] the run reached its memory cap ({limits.total_memory_bytes} bytes): "
                            f"the kernel killed {killed} of its processes\n")
    finally:
        for fd in mine:
            try:
                os.close(fd)
            except OSError:
                pass
        if deadline is None:  # the run did not start
            deadline = time.monotonic() + CLEANUP_S
        if cgroup is not None:
            for what in cgroup.remove(deadline):
                _warn(f"could not remove cgroup {what}")
        _remove_tree(tmp, deadline)
    status, rc = _status(proc.returncode, timed_out, mechanism, verified)
    return SandboxResult(status == "passed", status, stderr_tail, rc, mechanism, peak)


# The probe passes only where the program runs unprivileged, in its own PID namespace, without
# network interfaces, on a read-only root, seeing nothing of its temp dir but the scratch folder.
# (Interfaces from /proc/net/dev: socket.if_nameindex() needs a netlink socket, which the seccomp filter refuses.)
_PROBE = """\
import os
assert os.getuid() != 0 and os.geteuid() != 0, "runs as root"
assert os.getpid() <= 3, "no PID namespace"
with open("/proc/net/dev") as f:
    assert {line.split(":")[0].strip() for line in f.readlines()[2:]} <= {"lo"}, "network interfaces visible"
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
    r = _execute(_PROBE, "", timeout_s, mechanism, Limits(file_bytes=1 << 20, max_new_procs=64))
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


def caps_record(mechanism: str, limits: Limits = Limits()) -> dict:
    """Which caps a run under `mechanism` gets on this machine with `limits` (the defaults are what scoring uses),
    and why the others do not apply; recorded in results.json through Isolation.to_json."""
    as_root = os.geteuid() == 0
    nproc = None
    if limits.max_new_procs is not None and (not as_root or mechanism != "none"):
        nproc = f"the uid's current tasks + {limits.max_new_procs}"
    rec: dict = {"rlimits": {"as_bytes": limits.memory_bytes, "cpu_s": "ceil(timeout) + 1", "core": 0,
                             "fsize_bytes": limits.file_bytes, "nofile": limits.open_files, "msgqueue_bytes": 0,
                             "nproc": nproc}}
    missing = {}
    if mechanism == "none":
        rec.update(cgroup=None, scratch={"fs": "host disk", "bytes": None}, ipc_limits=None, seccomp=None)
        missing["cgroup, scratch tmpfs, ipc_limits, seccomp"] = "unisolated run (mechanism 'none')"
    else:
        support = _cgroup_support()
        if isinstance(support, _CgroupSupport):
            tasks = None if limits.max_new_procs is None else limits.max_new_procs + _SUPERVISORS
            rec["cgroup"] = {"version": support.version, "memory_bytes": limits.total_memory_bytes,
                             "swap_bytes": 0, "max_tasks": tasks}
        else:
            rec["cgroup"] = None
            missing["cgroup"] = support
        rec["scratch"] = {"fs": "tmpfs", "bytes": limits.scratch_bytes}
        why = _ipc_support()
        rec["ipc_limits"] = {name.replace("/", "."): v for name, v in _IPC_LIMITS} if why is None else None
        if why is not None:
            missing["ipc_limits"] = why
        machine = os.uname().machine
        if seccomp_filter(machine) is not None:
            rec["seccomp"] = {"arch": machine, "user_namespaces": "refused", "socket_families": list(ALLOWED_FAMILIES)}
        else:
            rec["seccomp"] = None
            missing["seccomp"] = f"no filter for architecture {machine}"
    rec["unavailable"] = missing
    return rec


def run_program(
    source: str,
    timeout_s: float,
    *,
    checks: str = "",
    allow_unisolated: bool = False,
    mechanism: str | None = None,
    memory_bytes: int = Limits.memory_bytes,
    file_bytes: int = Limits.file_bytes,
    max_new_procs: int | None = Limits.max_new_procs,
    total_memory_bytes: int = Limits.total_memory_bytes,
    scratch_bytes: int = Limits.scratch_bytes,
    open_files: int = Limits.open_files,
) -> SandboxResult:
    """Run `source`, then `checks` (the benchmark's tests), in a sandboxed subprocess; never executes them
    in-process. 'passed' only if both ran to their end without an exception (see the module docstring).

    `mechanism` overrides isolation() ('none' still needs `allow_unisolated`).
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if mechanism is None:
        mechanism = require_isolation(allow_unisolated).mechanism
    elif mechanism == "none" and not allow_unisolated:
        raise UnisolatedError("mechanism='none' runs model-written code unisolated: pass allow_unisolated=True")
    limits = Limits(memory_bytes, file_bytes, max_new_procs, total_memory_bytes, scratch_bytes, open_files)
    return _execute(source, checks, timeout_s, mechanism, limits)
