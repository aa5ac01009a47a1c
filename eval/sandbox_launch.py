"""Inside `unshare` (new mount, PID, network, IPC and UTS namespaces): build a minimal read-only root,
drop privileges, run the program and report its exit status. Also the seccomp filter both mechanisms load.

Run by eval.sandbox as `python -I -B sandbox_launch.py SPEC_JSON` where it is PID 1 of the new PID
namespace and (as root, or as the owner of a new user namespace) may mount. SPEC_JSON holds:
  root:     an empty directory to mount the new root (a tmpfs) on;
  scratch:  the program's folder, the only writable place: a new tmpfs of `scratch_bytes` bytes
            (nothing of it reaches the host's disk; it vanishes with the mount namespace);
  ro:       directories bound read-only (nosuid, nodev) at the same path;
  symlinks: [path, target] pairs recreated as symlinks (e.g. /bin -> usr/bin);
  uid:      the id (uid and gid) to run the program as. As real root: switch to it. In a user namespace
            (root there = the unprivileged caller): enter a nested user namespace mapping it to that root,
            so the program runs as `uid` and loses every capability at exec;
  as_root:  whether the caller is real root;
  seccomp:  whether to load seccomp_filter() in the program's process before exec;
  argv:     the program's command line (run with the inherited environment and file descriptors, cwd = scratch).
Exit status: the program's, or 128 + N if it died of signal N (PID 1 cannot re-raise it). When PID 1
exits the kernel kills every other process of the namespace, so no child outlives the program.
PID 1 leaves every signal at its default action: the kernel then drops the signals that processes of
the namespace send it (Python's own SIGINT handler would let a SIGINT from the program kill it).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import struct
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
PR_CAPBSET_DROP, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 24, 22, 38
SECCOMP_MODE_FILTER = 2
CLONE_NEWUSER = 0x10000000
DEVICES = ("null", "zero", "full", "random", "urandom")

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda s: None if s is None else s.encode())
    if _libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {src} on {target}: {os.strerror(err)}")


def _bind_ro(src: str, target: str) -> None:
    _mount(src, target, None, MS_BIND)
    _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | MS_RDONLY)


# ---- seccomp: no new user namespaces, no socket families but Unix and IP ---------------------------

# Per architecture: the audit arch the kernel reports, and the numbers of the filtered syscalls.
_ARCHES = {
    "x86_64": (0xC000003E, {"socket": 41, "socketpair": 53, "clone": 56, "unshare": 272, "clone3": 435}),
    "aarch64": (0xC00000B7, {"socket": 198, "socketpair": 199, "clone": 220, "unshare": 97, "clone3": 435}),
}
ALLOWED_FAMILIES = (1, 2, 10)  # AF_UNIX, AF_INET, AF_INET6
_EPERM, _EAFNOSUPPORT, _ENOSYS = 1, 97, 38
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000
_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|{JEQ,JGE,JSET}|K, BPF_RET|K
_NR, _ARCH, _ARG0 = 0, 4, 16  # offsets in struct seccomp_data (arg 0's low 32 bits on little-endian)


def seccomp_filter(machine: str | None = None) -> bytes | None:
    """A classic-BPF seccomp program (struct sock_filter[]), or None for an architecture it does not know.

    - unshare() and clone() with CLONE_NEWUSER fail with EPERM, clone3() with ENOSYS (its flags sit in
      memory a filter cannot read; glibc then falls back to clone()): no new user namespace, so no
      capabilities regained inside one;
    - socket() and socketpair() of a family other than AF_UNIX/AF_INET/AF_INET6 fail with EAFNOSUPPORT
      (netlink, packet, AF_ALG, vsock...: kernel interfaces the network namespace does not cover);
    - any other architecture's syscalls (i386 through int 0x80, x32) fail with ENOSYS, so the numbers
      above cannot be dodged.
    """
    machine = machine or os.uname().machine
    if machine not in _ARCHES:
        return None
    arch, nr = _ARCHES[machine]
    prog = []  # (code, jump-if-true label, jump-if-false label, k); a label is an index into `prog` or a name

    def op(code, k, jt=None, jf=None):
        prog.append((code, jt, jf, k))

    op(_LD_W_ABS, _ARCH)
    op(_JEQ, arch, None, "enosys")
    op(_LD_W_ABS, _NR)
    if machine == "x86_64":
        op(_JGE, 0x40000000, "enosys", None)  # the x32 ABI's numbers
    op(_JEQ, nr["socket"], "family", None)
    op(_JEQ, nr["socketpair"], "family", None)
    op(_JEQ, nr["unshare"], "newuser", None)
    op(_JEQ, nr["clone"], "newuser", None)
    op(_JEQ, nr["clone3"], "enosys", None)
    op(_RET, _RET_ALLOW)
    labels = {"family": len(prog)}
    op(_LD_W_ABS, _ARG0)
    for fam in ALLOWED_FAMILIES:
        op(_JEQ, fam, "allow", None)
    op(_RET, _RET_ERRNO | _EAFNOSUPPORT)
    labels["newuser"] = len(prog)
    op(_LD_W_ABS, _ARG0)
    op(_JSET, CLONE_NEWUSER, "eperm", None)
    labels["allow"] = len(prog)
    op(_RET, _RET_ALLOW)
    labels["eperm"] = len(prog)
    op(_RET, _RET_ERRNO | _EPERM)
    labels["enosys"] = len(prog)
    op(_RET, _RET_ERRNO | _ENOSYS)

    out = []
    for i, (code, jt, jf, k) in enumerate(prog):
        rel = [0 if t is None else labels[t] - i - 1 for t in (jt, jf)]  # jumps count from the next instruction
        out.append(struct.pack("=HBBI", code, rel[0], rel[1], k))
    return b"".join(out)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load_seccomp(prog: bytes) -> None:
    """Install `prog` in this process (needs no_new_privs or CAP_SYS_ADMIN); inherited across fork and exec."""
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = _SockFprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_SECCOMP): {os.strerror(err)}")


# ---- the namespace's root ---------------------------------------------------------------------------


def _build_root(spec: dict) -> None:
    root = spec["root"]
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    for path in spec["ro"]:
        os.makedirs(root + path, mode=0o755, exist_ok=True)
        _bind_ro(path, root + path)
    for path, target in spec["symlinks"]:
        os.symlink(target, root + path)
    os.makedirs(root + spec["scratch"], mode=0o755, exist_ok=True)
    # Owned by the program: uid `uid` as root; the user namespace's root (mapped to `uid` in the nested one) otherwise.
    owner = f",uid={spec['uid']},gid={spec['uid']}" if spec["as_root"] else ""
    _mount("tmpfs", root + spec["scratch"], "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={spec['scratch_bytes']},mode=0755{owner}")
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
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # see the module docstring; inherited as default by the program
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
            if spec["seccomp"]:
                load_seccomp(seccomp_filter())
            os.execv(spec["argv"][0], spec["argv"])
        except BaseException as e:
            os.write(2, f"eval.sandbox_launch: cannot start the program: {e}\n".encode())
        finally:
            os._exit(127)
    os._exit(_wait_for(pid))


if __name__ == "__main__":
    main()
