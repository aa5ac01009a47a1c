"""Inside `unshare` (new mount, PID, network, IPC and UTS namespaces): build a minimal read-only root,
drop privileges, run the program and report its exit status.

Run by eval.sandbox as `python -I -B sandbox_launch.py SPEC_JSON` where it is PID 1 of the new PID
namespace and (as root, or as the owner of a new user namespace) may mount. SPEC_JSON holds:
  root:     an empty directory to mount the new root (a tmpfs) on;
  scratch:  the program's folder, the only writable place, bound at the same path;
  ro:       directories bound read-only (nosuid, nodev) at the same path;
  symlinks: [path, target] pairs recreated as symlinks (e.g. /bin -> usr/bin);
  uid:      the id (uid and gid) to run the program as. As real root: switch to it. In a user namespace
            (root there = the unprivileged caller): enter a nested user namespace mapping it to that root,
            so the program runs as `uid` and loses every capability at exec;
  as_root:  whether the caller is real root;
  argv:     the program's command line (run with the inherited environment, cwd = scratch).
Exit status: the program's, or 128 + N if it died of signal N (PID 1 cannot re-raise it). When PID 1
exits the kernel kills every other process of the namespace, so no child outlives the program.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
CLONE_NEWUSER = 0x10000000
DEVICES = ("null", "zero", "full", "random", "urandom")

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda s: None if s is None else s.encode())
    if _libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {src} on {target}: {os.strerror(err)}")


def _bind(src: str, target: str, writable: bool) -> None:
    _mount(src, target, None, MS_BIND)
    ro = 0 if writable else MS_RDONLY
    _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | ro)


def _build_root(spec: dict) -> None:
    root = spec["root"]
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    for path in spec["ro"]:
        os.makedirs(root + path, mode=0o755, exist_ok=True)
        _bind(path, root + path, writable=False)
    for path, target in spec["symlinks"]:
        os.symlink(target, root + path)
    os.makedirs(root + spec["scratch"], mode=0o755, exist_ok=True)
    _bind(spec["scratch"], root + spec["scratch"], writable=True)
    os.makedirs(root + "/dev", mode=0o755)
    for name in DEVICES:
        open(f"{root}/dev/{name}", "w").close()
        _mount(f"/dev/{name}", f"{root}/dev/{name}", None, MS_BIND)
    os.makedirs(root + "/proc", mode=0o555)
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _enter_nested_userns(uid: int) -> None:
    """A user namespace where `uid` is this process's id (root of the outer one); before chroot (EPERM after)."""
    if _libc.unshare(CLONE_NEWUSER) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} 0 1\n"), ("gid_map", f"{uid} 0 1\n")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def _drop_privileges(uid: int, as_root: bool) -> None:
    cap = 0
    while _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:  # empty the bounding set (EINVAL past the last)
        cap += 1
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if as_root:  # leaving uid 0 clears every capability
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)


def _wait_for(pid: int) -> int:
    """Reap children (PID 1 inherits orphans) until `pid` ends; its exit code, or 128 + signal."""
    while True:
        done, status = os.wait()
        if done == pid:
            return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def main() -> None:
    spec = json.loads(sys.argv[1])
    _build_root(spec)
    if not spec["as_root"]:
        _enter_nested_userns(spec["uid"])
    os.chroot(spec["root"])
    os.chdir(spec["scratch"])
    _drop_privileges(spec["uid"], spec["as_root"])
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            os.execv(spec["argv"][0], spec["argv"])
        finally:
            os._exit(127)
    os._exit(_wait_for(pid))


if __name__ == "__main__":
    main()
