"""The parent trusts nothing the program leaves: links, special files, deep trees, many files, and the memory of
many processes are contained, and every run returns within timeout + CLEANUP_S without raising.

Each test prints the time its contained run took (pytest -s shows it). The controls show that each attack is
real: the removed parent logic (`old_tail`, `shutil.rmtree`) on the same thing leaks, hangs or raises, or the
same program takes more when its cap is raised.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest

from conftest import FORK_BOMB
from eval import sandbox as sb


def cgroup_or_skip():
    support = sb._cgroup_support()
    if isinstance(support, str):
        pytest.skip(f"no cgroup here: {support}")
    return support


def timed(what, src, mechanism, timeout_s=10.0, **kw):
    t = time.monotonic()
    r = sb.run_program(src, timeout_s, mechanism=mechanism, allow_unisolated=mechanism == "none", **kw)
    dt = time.monotonic() - t
    print(f"\n[{mechanism}] {what}: {r.status} in {dt:.2f} s (peak {r.peak_memory_bytes})")
    assert dt < timeout_s + sb.CLEANUP_S
    return r, dt


def old_tail(path, n=sb.STDERR_TAIL_CHARS):
    """The removed parent logic: re-open the program's stderr file by path and read its end."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4 * n))
        return f.read().decode("utf-8", errors="replace")[-n:]


def _leftovers(before):
    return sorted(set(p for p in os.listdir(tempfile.gettempdir()) if p.startswith("hdflash-sandbox-")) - before)


@pytest.fixture
def no_leftover():
    """No temp folder of a run stays behind (other sessions' runs may come and go meanwhile: only new names count,
    and only those still there a moment later)."""
    before = set(p for p in os.listdir(tempfile.gettempdir()) if p.startswith("hdflash-sandbox-"))
    yield
    left = _leftovers(before)
    if left:
        time.sleep(1.0)
        left = [p for p in _leftovers(before) if os.path.exists(os.path.join(tempfile.gettempdir(), p))]
    assert not left


@pytest.fixture
def root_only_secret(tmp_path):
    secret = tmp_path / "root-only.txt"
    secret.write_text("s3cr3t-" + uuid.uuid4().hex)
    os.chmod(secret, 0o600)
    return secret


# ---- links ----------------------------------------------------------------------------------------------------


def test_a_planted_link_is_never_followed(mech, root_only_secret, tmp_path, no_leftover):
    """The old attack: replace stderr.txt in the scratch folder by a link to a file only root can read. The parent
    now reads its own memfd, so the link is just a file of the program's. Control: the old parent logic reads the
    secret through the same link (made unisolated, where the test can reach it)."""
    secret = root_only_secret
    src = (
        "import os, sys\n"
        f"for name in ('stderr.txt', 'stdout.txt', 'program.py'):\n"
        f"    os.symlink({str(secret)!r}, name)\n"
        "print('linked', sorted(os.listdir('.')), file=sys.stderr)\n"
        f"os.dup2(os.open('.', os.O_RDONLY), 2)  # fd 2 now a directory\n"
    )
    r, _ = timed("stderr.txt -> a root-only file", src, mech)
    assert r.status == "passed" and "linked ['program.py', 'stderr.txt', 'stdout.txt']" in r.stderr_tail
    assert secret.read_text() not in r.stderr_tail
    control = tmp_path / "stderr.txt"
    control.symlink_to(secret)
    assert old_tail(control) == secret.read_text()


# ---- special files ----------------------------------------------------------------------------------------------


def test_special_files_cannot_hang_or_flood_the_parent(mech, tmp_path, no_leftover):
    """A FIFO where stderr.txt was, fd 2 turned into the FIFO, the stderr memfd grown to the file-size cap (sparse)
    and written past it: the run returns at once and the tail is the bounded end of the memfd. Control: the old
    parent logic blocks on the FIFO."""
    src = (
        "import os, sys\n"
        "print('start', file=sys.stderr, flush=True)\n"
        "os.ftruncate(2, 16 << 20)  # sparse, up to RLIMIT_FSIZE\n"
        "os.lseek(2, 0, os.SEEK_END)\n"
        "try:\n"
        "    os.write(2, b'x' * (1 << 20))  # past the file-size cap\n"
        "except OSError as e:\n"
        "    os.lseek(2, (16 << 20) - 100, os.SEEK_SET)\n"
        "    os.write(2, f'EFBIG={e.errno}\\n'.encode())\n"
        "os.mkfifo('stderr.txt')\n"
        "os.dup2(os.open('stderr.txt', os.O_RDWR), 2)\n"
        "os.symlink('/dev/zero', 'stdout.txt')\n"
    )
    r, dt = timed("FIFO, /dev/zero link, 16 MiB stderr", src, mech)
    assert r.status == "passed" and "EFBIG=27" in r.stderr_tail and len(r.stderr_tail) <= sb.STDERR_TAIL_CHARS
    assert dt < 5
    fifo = tmp_path / "stderr.txt"
    os.mkfifo(fifo)

    def old_parent():
        try:
            old_tail(fifo)
        except OSError:  # io.UnsupportedOperation (not seekable) once the test lets its open() through
            pass

    reader = threading.Thread(target=old_parent, daemon=True)
    reader.start()
    reader.join(1.0)
    assert reader.is_alive()  # the old logic hangs on the FIFO (the run's timeout did not cover it)
    with open(fifo, "wb"):  # unblock it
        pass
    reader.join(5.0)


# ---- deep trees and many files ----------------------------------------------------------------------------------

DEEP = """\
import os, sys
depth = 0
try:
    while depth < {n}:
        os.mkdir("d")
        os.chdir("d")
        depth += 1
finally:
    print("depth", depth, file=sys.stderr)
"""


def test_a_deep_tree_cannot_break_cleanup(mech, no_leftover):
    """A 3000-deep tree in the scratch folder: it lives in the sandbox's tmpfs and goes with its namespace; the
    parent removes nothing of it (the control is the next test)."""
    r, dt = timed("3000-deep tree", DEEP.format(n=3000), mech)
    assert r.status == "passed" and "depth 3000" in r.stderr_tail and dt < 5


def test_control_the_removed_cleanup_raises_on_a_deep_tree(tmp_path):
    """shutil.rmtree, as the parent cleaned the scratch folder before, raises on a 1500-deep tree."""
    subprocess.run([sys.executable, "-c", DEEP.format(n=1500)], cwd=tmp_path, check=True, capture_output=True)
    with pytest.raises(RecursionError):
        shutil.rmtree(tmp_path / "d")
    subprocess.run(["rm", "-rf", str(tmp_path / "d")], check=True)


@pytest.mark.slow
def test_a_deep_tree_unisolated_does_not_raise_either(no_leftover):
    """Without isolation the scratch folder is on the host: shutil.rmtree raises on it, rm -rf takes over."""
    r, _ = timed("3000-deep tree", DEEP.format(n=3000), "none")
    assert r.status == "passed" and "depth 3000" in r.stderr_tail


MANY_FILES = """\
import os, sys
written, made = 0, 0
try:
    for i in range(64):
        with open(f"big{i}", "wb") as f:
            for _ in range(16):
                f.write(b"x" * (1 << 20))
                f.flush()
                written += 1 << 20
except OSError as e:
    print("stopped:", e.strerror, file=sys.stderr)
for i in range(20000):
    try:
        open(f"f{i}", "w").close()
        made += 1
    except OSError:
        break
print("written", written, "made", made, file=sys.stderr)
"""


def _written(r):
    return int(r.stderr_tail.split("written ")[1].split()[0])


def test_many_files_fill_only_the_scratch_tmpfs(mech, no_leftover):
    """Files until the scratch tmpfs is full: what one run can write is its size, off the host's disk; 20,000 empty
    files more cost the parent nothing. Control: a larger scratch takes more."""
    cap = 32 << 20
    r, dt = timed("16 MiB files until full + 20,000 empty files", MANY_FILES, mech, scratch_bytes=cap)
    assert r.status == "passed" and "No space left on device" in r.stderr_tail
    assert cap - (1 << 20) <= _written(r) <= cap and dt < 8
    bigger, _ = timed("the same, scratch 3x", MANY_FILES, mech, scratch_bytes=3 * cap)
    assert _written(bigger) > 2 * cap


# ---- memory of many processes -----------------------------------------------------------------------------------

CHILDREN = """\
import os, sys, time
pids = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        block = b"x" * ({mib} << 20)  # touched: resident, under RLIMIT_AS
        time.sleep(1.5)
        os._exit(0)
    pids.append(pid)
died = 0
for pid in pids:
    _, status = os.waitpid(pid, 0)
    died += status != 0
print("children killed", died, file=sys.stderr)
"""


@pytest.mark.slow
def test_the_memory_of_many_processes_is_capped_as_a_whole(mech, no_leftover):
    """Four children of 300 MiB each (each under the 1 GiB RLIMIT_AS): the run's cgroup holds them to 512 MiB in all,
    its OOM killer acting inside only. Control: with a 2 GiB cap the same run peaks above 1.2 GiB."""
    cgroup_or_skip()
    cap = 512 << 20
    r, _ = timed("4 x 300 MiB children, cap 512 MiB", CHILDREN.format(mib=300), mech, total_memory_bytes=cap)
    assert r.peak_memory_bytes is not None and r.peak_memory_bytes <= cap
    assert "reached its memory cap" in r.stderr_tail
    free, _ = timed("4 x 300 MiB children, cap 2 GiB", CHILDREN.format(mib=300), mech, total_memory_bytes=2 << 30)
    assert free.status == "passed" and "children killed 0" in free.stderr_tail
    assert free.peak_memory_bytes > 1200 << 20


MEMFDS = """\
import os, sys
done = 0
fds = []
for i in range({n}):
    fd = os.memfd_create(f"m{{i}}")
    fds.append(fd)
    for _ in range(16):
        os.write(fd, b"x" * (1 << 20))
        done += 1
print("memfd MiB", done, file=sys.stderr)
"""


@pytest.mark.slow
def test_memfds_filled_with_write_are_capped(mech, no_leftover):
    """memfds grown with write() (no mapping: RLIMIT_AS does not see them), 16 MiB each: the cgroup caps them.
    Control: with a 1 GiB cap all 640 MiB are written."""
    cgroup_or_skip()
    cap = 256 << 20
    r, _ = timed("40 memfds x 16 MiB, cap 256 MiB", MEMFDS.format(n=40), mech, total_memory_bytes=cap)
    assert r.status != "passed" and r.peak_memory_bytes <= cap
    free, _ = timed("40 memfds x 16 MiB, cap 1 GiB", MEMFDS.format(n=40), mech, total_memory_bytes=1 << 30)
    assert free.status == "passed" and "memfd MiB 640" in free.stderr_tail and free.peak_memory_bytes > 640 << 20


SHM = """\
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
total, ids = 0, []
try:
    for _ in range({n}):
        sid = libc.shmget(0, 16 << 20, 0o1600)  # IPC_PRIVATE, IPC_CREAT | 0600
        if sid < 0:
            print("shmget:", os.strerror(ctypes.get_errno()), file=sys.stderr)
            break
        ids.append(sid)
        addr = libc.shmat(sid, None, 0)
        ctypes.memset(addr, 1, 16 << 20)
        libc.shmdt(ctypes.c_void_p(addr))  # detached, not removed: it outlives this process in its IPC namespace
        total += 16 << 20
finally:
    print("shm MiB", total >> 20, file=sys.stderr)
    if {remove}:
        for sid in ids:
            libc.shmctl(sid, 0, None)  # IPC_RMID
"""


def test_detached_shared_memory_is_capped_by_the_ipc_namespace(mech, no_leftover):
    """Detached SysV segments of 16 MiB: the sandbox's IPC namespace allows 64 MiB in all, the host's is untouched.
    Control: unisolated (the host's namespace, its own limits), 128 MiB go through (removed again)."""
    why = sb._ipc_support()
    if why is not None:
        pytest.skip(f"no IPC limits here: {why}")
    host = open("/proc/sys/kernel/shmall").read()
    r, _ = timed("16 MiB SysV segments", SHM.format(n=8, remove=False), mech)
    assert r.status == "passed" and "shm MiB 64" in r.stderr_tail and "No space left on device" in r.stderr_tail
    assert open("/proc/sys/kernel/shmall").read() == host and int(host) > (128 << 20) // os.sysconf("SC_PAGE_SIZE")
    control, _ = timed("16 MiB SysV segments", SHM.format(n=8, remove=True), "none")
    assert control.status == "passed" and "shm MiB 128" in control.stderr_tail



def test_the_cgroup_caps_tasks_without_rlimit_nproc(mech, monkeypatch, no_leftover):
    """RLIMIT_NPROC left out (as where the uid's task count is unknown): the cgroup's pids.max still stops a fork
    bomb at max_new_procs. Control: with no cgroup either, all 64 forks succeed."""
    cgroup_or_skip()
    monkeypatch.setattr(sb, "_task_count", lambda uid: None)
    r, _ = timed("fork bomb, pids.max only", FORK_BOMB, mech, max_new_procs=8)
    n = int(r.stderr_tail.split("forked ")[1].split()[0])
    assert r.status == "failed" and "BlockingIOError" in r.stderr_tail
    assert n == 8  # pids.max = 8 + _SUPERVISORS: the mechanism's outer process, PID 1 and the program
    monkeypatch.setattr(sb, "_cgroup_support", lambda: "disabled by the test")
    control, _ = timed("fork bomb, no cap", FORK_BOMB, mech, max_new_procs=8)
    assert control.status == "passed" and "forked 64" in control.stderr_tail


# ---- cleanup never raises ---------------------------------------------------------------------------------------


def test_cleanup_failures_do_not_raise(monkeypatch, capsys, no_leftover):
    """A cgroup that will not go and a temp folder shutil.rmtree cannot remove: the result still comes back (rm -rf
    takes the folder), the evaluator is told on stderr. The cgroups are removed for real afterwards."""
    iso = sb.isolation()
    if not iso.isolated:
        pytest.skip("no isolation here")
    cgroup_or_skip()
    made = []
    real_init = sb._Cgroup.__init__

    def record(self, *a):
        real_init(self, *a)
        made.append(self)

    def failing_rmtree(path, *a, **kw):
        raise OSError(16, "Device or resource busy", path)

    monkeypatch.setattr(sb._Cgroup, "__init__", record)
    monkeypatch.setattr(sb._Cgroup, "remove", lambda self, deadline: [f"{d}: held" for d in self.dirs.values()])
    monkeypatch.setattr(sb.shutil, "rmtree", failing_rmtree)
    r, _ = timed("cleanup failing", "print('ok')", iso.mechanism)
    assert r.status == "passed" and len(made) == 1
    assert "could not remove cgroup" in capsys.readouterr().err
    monkeypatch.undo()
    assert made[0].remove(time.monotonic() + 5) == []
