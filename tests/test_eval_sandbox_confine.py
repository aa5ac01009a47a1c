"""What the sandbox adds around the program: seccomp (no new user namespaces, Unix/IP sockets only), a PID 1 that
ignores SIGINT, the scratch tmpfs, the IPC namespace's limits, the run's cgroup, and the record of which caps apply.
Controls: the same program without the seccomp filter, a Python PID 1 that keeps its SIGINT handler, the host's
own values.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from eval import sandbox as sb
from eval.sandbox_launch import seccomp_filter


def run(src, mechanism, **kw):
    return sb.run_program(src, 10, mechanism=mechanism, allow_unisolated=mechanism == "none", **kw)


def _report(r, key):
    """The value a probe program printed as 'key=value' on stderr."""
    return [line.split("=", 1)[1] for line in r.stderr_tail.splitlines() if line.startswith(key + "=")][-1]


USERNS = """\
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
rc = libc.unshare(0x10000000)  # CLONE_NEWUSER
print(f"unshare={rc} {os.strerror(ctypes.get_errno()) if rc else 'ok'}", file=sys.stderr)
if rc == 0:
    caps = [line.split()[1] for line in open("/proc/self/status") if line.startswith("CapEff")][0]
    print(f"capeff={caps}", file=sys.stderr)
"""


def test_no_new_user_namespace(mech, monkeypatch):
    """unshare(CLONE_NEWUSER) is refused. Control, bwrap: without the filter the same call succeeds and the program
    holds every capability inside the new namespace. (The unshare launcher chroots, which the kernel already
    refuses user namespaces for.)"""
    r = run(USERNS, mech)
    assert r.status == "passed" and _report(r, "unshare") == "-1 Operation not permitted"
    monkeypatch.setattr(sb, "seccomp_filter", lambda *a: None)
    control = run(USERNS, mech)
    if mech == "bwrap":
        assert _report(control, "unshare") == "0 ok" and int(_report(control, "capeff"), 16) > 0
    else:
        assert _report(control, "unshare") == "-1 Operation not permitted"


SOCKETS = """\
import socket, sys
for name, fam, kind in [("unix", 1, socket.SOCK_STREAM), ("inet", 2, socket.SOCK_DGRAM),
                        ("inet6", 10, socket.SOCK_DGRAM), ("netlink", 16, socket.SOCK_RAW),
                        ("vsock", 40, socket.SOCK_STREAM)]:
    try:
        socket.socket(fam, kind).close()
        print(f"{name}=ok", file=sys.stderr)
    except OSError as e:
        print(f"{name}={e.errno}", file=sys.stderr)
try:
    socket.socketpair(16, socket.SOCK_RAW)
except OSError as e:
    print(f"pair={e.errno}", file=sys.stderr)
"""


def test_only_unix_and_ip_sockets(mech, monkeypatch):
    """Netlink and vsock sockets fail with EAFNOSUPPORT (97); Unix and IP work. Control: without the filter the
    sandbox creates netlink and vsock sockets."""
    r = run(SOCKETS, mech)
    assert r.status == "passed"
    assert [_report(r, k) for k in ("unix", "inet", "inet6", "netlink", "vsock", "pair")] == ["ok"] * 3 + ["97"] * 3
    monkeypatch.setattr(sb, "seccomp_filter", lambda *a: None)
    control = run(SOCKETS, mech)
    assert [_report(control, k) for k in ("netlink", "vsock")] == ["ok", "ok"]


def test_the_filter_knows_its_architectures():
    """8-byte instructions; None for an architecture it has no numbers for (recorded as such)."""
    for machine in ("x86_64", "aarch64"):
        prog = seccomp_filter(machine)
        assert prog is not None and len(prog) % 8 == 0 and len(prog) // 8 >= 15
    assert seccomp_filter("riscv64") is None


SIGNAL_PID1 = """\
import os, signal, sys, time
assert os.getpid() != 1
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1):
    try:
        os.kill(1, sig)
    except PermissionError:
        pass  # bwrap's PID 1 stays root when run as root
time.sleep(0.3)
print("still here", file=sys.stderr)  # had PID 1 died, the kernel would have killed us
"""


def test_pid1_ignores_the_programs_signals(mech):
    r = run(SIGNAL_PID1, mech)
    assert (r.status, r.returncode) == ("passed", 0) and "still here" in r.stderr_tail


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_control_a_python_pid1_with_its_sigint_handler_dies():
    """Why the launcher resets SIGINT: a Python PID 1 keeps its KeyboardInterrupt handler, and the kernel delivers
    a signal from inside the namespace to PID 1 only if it has a handler."""
    body = (
        "import os, signal, sys, time\n"
        "{reset}\n"
        "if os.fork() == 0:\n"
        "    os.kill(1, signal.SIGINT)\n"
        "    os._exit(0)\n"
        "time.sleep(0.5)\n"
        "print('survived')\n"
    )
    cmd = ["unshare", "--pid", "--fork", "--kill-child", "--", sys.executable, "-I", "-c"]
    kept = subprocess.run(cmd + [body.format(reset="")], capture_output=True, text=True, timeout=30)
    reset = subprocess.run(cmd + [body.format(reset="signal.signal(signal.SIGINT, signal.SIG_DFL)")],
                           capture_output=True, text=True, timeout=30)
    assert kept.returncode != 0 and "KeyboardInterrupt" in kept.stderr and "survived" not in kept.stdout
    assert reset.returncode == 0 and "survived" in reset.stdout


MOUNT_AND_IPC = """\
import os, sys
cwd = os.getcwd()
for line in open("/proc/self/mountinfo"):
    fields = line.split()
    if fields[4] == cwd:
        print(f"mount={line.split(' - ')[1].split()[0]} {line.split(' - ')[1].split()[2]}", file=sys.stderr)
for name in ("shmmax", "shmall", "shmmni", "msgmni"):
    print(f"{name}={open('/proc/sys/kernel/' + name).read().strip()}", file=sys.stderr)
"""


def test_scratch_is_a_capped_tmpfs_and_ipc_is_capped(mech):
    """The program's folder is a tmpfs of scratch_bytes; its IPC namespace has _IPC_LIMITS (as root). Control: the
    host's own IPC values, unchanged and larger; unisolated, the folder is on the host's filesystem."""
    host = {n: open(f"/proc/sys/kernel/{n}").read().strip() for n in ("shmmax", "shmall", "shmmni", "msgmni")}
    r = run(MOUNT_AND_IPC, mech, scratch_bytes=48 << 20)
    assert r.status == "passed"
    fstype, options = _report(r, "mount").split()
    assert fstype == "tmpfs" and "size=49152k" in options.split(",")
    if sb._ipc_support() is None:
        limits = {name.split("/")[1]: str(v) for name, v in sb._IPC_LIMITS}
        assert {n: _report(r, n) for n in host} == limits
        assert all(int(host[n]) > int(limits[n]) for n in host)
    assert {n: open(f"/proc/sys/kernel/{n}").read().strip() for n in host} == host
    control = run(MOUNT_AND_IPC, "none")
    assert control.status == "passed" and "mount=tmpfs" not in control.stderr_tail


def test_the_runs_cgroup_has_the_limits():
    """The folders a run gets, read back: memory (+ swap where accounted) and tasks as recorded; then removed."""
    support = sb._cgroup_support()
    if isinstance(support, str):
        pytest.skip(f"no cgroup here: {support}")
    cg = sb._Cgroup(support, sb.Limits(total_memory_bytes=300 << 20, max_new_procs=5))
    try:
        read = lambda h, f: open(os.path.join(cg.dirs[h], f)).read().strip()  # noqa: E731
        if cg.version == 1:
            assert read("memory", "memory.limit_in_bytes") == str(300 << 20)
            assert read("pids", "pids.max") == str(5 + sb._SUPERVISORS)
        else:
            assert read("unified", "memory.max") == str(300 << 20)
            assert read("unified", "pids.max") == str(5 + sb._SUPERVISORS)
    finally:
        assert cg.remove(time.monotonic() + 5) == []
    assert not any(os.path.exists(d) for d in cg.dirs.values())


# ---- finding the cgroup: parsing, and the v2 path on a fake tree -------------------------------------------------

V1_CGROUP = "8:pids:/\n4:memory:/svc/a\n2:cpu,cpuacct:/\n0::/\n"
V1_MOUNTS = (
    "30 25 0:26 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory\n"
    "31 25 0:27 / /sys/fs/cgroup/pids rw,relatime shared:10 - cgroup cgroup rw,pids\n"
    "32 25 0:28 / /sys/fs/cgroup/unified rw,relatime shared:11 - cgroup2 cgroup2 rw\n"
)


def test_cgroup_v1_is_found_from_proc_text():
    own, mounts = sb._own_cgroups(V1_CGROUP), sb._cgroup_mounts(V1_MOUNTS)
    assert own["memory"] == "/svc/a" and own["cpuacct"] == "/" and own[""] == "/"
    assert mounts["memory"] == ("/", "/sys/fs/cgroup/memory") and mounts["unified"][1] == "/sys/fs/cgroup/unified"
    assert sb._folder(("/svc", "/mnt/mem"), "/svc/a") == "/mnt/mem/a" and sb._folder(("/x", "/m"), "/y") is None
    support = sb._find_cgroup_support(own, {k: v for k, v in mounts.items() if k != "unified"})
    assert support == sb._CgroupSupport(1, (("memory", "/sys/fs/cgroup/memory/svc/a"), ("pids", "/sys/fs/cgroup/pids")))


def test_cgroup_v2_on_a_fake_tree(tmp_path):
    """The v2 path, which this machine (v1) cannot run for real: found where memory and pids are delegated, refused
    with the reason where not, and the run's limits written as memory.max / memory.swap.max / pids.max."""
    base = tmp_path / "user.slice" / "eval"
    base.mkdir(parents=True)
    (base / "cgroup.controllers").write_text("cpu io memory pids\n")
    (base / "cgroup.subtree_control").write_text("memory pids\n")
    own, mounts = {"": "/user.slice/eval"}, {"unified": ("/", str(tmp_path))}
    support = sb._find_cgroup_support(own, mounts)
    assert support == sb._CgroupSupport(2, (("unified", str(base)),))
    cg = sb._Cgroup(support, sb.Limits(total_memory_bytes=123 << 20, max_new_procs=7))
    (d,) = cg.dirs.values()
    assert open(os.path.join(d, "memory.max")).read() == str(123 << 20)
    assert open(os.path.join(d, "pids.max")).read() == str(7 + sb._SUPERVISORS)
    assert not os.path.exists(os.path.join(d, "memory.swap.max"))  # optional: written only where the kernel has it
    assert cg.procs == [os.path.join(d, "cgroup.procs")]
    (base / "cgroup.controllers").write_text("cpu io\n")
    why = sb._find_cgroup_support(own, mounts)
    assert isinstance(why, str) and "lack memory or pids" in why


# ---- the record -------------------------------------------------------------------------------------------------


def test_caps_record_says_what_applies_and_why_not():
    """Every cap is either recorded with its value or named in 'unavailable' with a reason."""
    for mechanism in ("none", *sb.MECHANISMS):
        rec = sb.caps_record(mechanism)
        json.dumps(rec)
        assert rec["rlimits"]["nofile"] == sb.Limits.open_files and rec["rlimits"]["as_bytes"] == 1 << 30
        if mechanism == "none":
            assert rec["cgroup"] is None and rec["scratch"]["fs"] == "host disk" and rec["unavailable"]
            continue
        assert rec["scratch"] == {"fs": "tmpfs", "bytes": sb.Limits.scratch_bytes}
        for key in ("cgroup", "ipc_limits", "seccomp"):
            assert (rec[key] is not None) != (key in rec["unavailable"]), key
    support = sb._cgroup_support()
    if not isinstance(support, str):
        assert sb.caps_record("bwrap")["cgroup"] == {"version": support.version, "memory_bytes": 1 << 30,
                                                     "swap_bytes": 0, "max_tasks": 32 + sb._SUPERVISORS}
