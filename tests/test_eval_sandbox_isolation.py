"""Sandbox isolation: hostile programs are contained under every mechanism that works here.

Each hostile program does one thing and lets the error escape, so its status ('failed') and the
error in stderr say what happened; the test then checks the world outside is unchanged. Where a
control run without isolation is harmless, it shows the same program does succeed there (so the
checks are not vacuous).
"""

import os
import socket
import sys
import time
import uuid

import pytest

from conftest import FORK_BOMB, sandbox_why_not
from eval import sandbox as sb
from eval import scoring as S
from hdflash_jax.suites import load_suite


def run(src, mechanism, timeout_s=10, **kw):
    return sb.run_program(src, timeout_s, mechanism=mechanism, allow_unisolated=mechanism == "none", **kw)


@pytest.fixture
def planted(tmp_path):
    """A file and a secret outside the scratch folder, in a temp dir the test owns (mode 0644)."""
    f = tmp_path / "planted.txt"
    f.write_text("original")
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t-" + uuid.uuid4().hex)
    os.chmod(secret, 0o644)  # readable by any uid: only the namespace can hide it
    return f, secret


@pytest.fixture
def visible_file():
    """A file inside the sandbox's read-only view (the venv root), removed afterwards."""
    f = os.path.join(os.path.realpath(sys.prefix), f"hdflash-sandbox-test-{uuid.uuid4().hex}.txt")
    with open(f, "w") as fh:
        fh.write("original")
    yield f
    os.remove(f)


def test_writing_outside_scratch_is_contained(mech, planted, visible_file):
    f, _ = planted
    new = f.parent / "new.txt"
    r = run(f"open({str(new)!r}, 'w').write('pwned')\n", mech)
    assert (r.status, r.isolation) == ("failed", mech) and "FileNotFoundError" in r.stderr_tail
    assert not new.exists()
    r = run(f"open({visible_file!r}, 'w').write('pwned')\n", mech)
    assert r.status == "failed" and "Read-only file system" in r.stderr_tail
    for path in ("/hdflash-evil.txt", "/tmp/hdflash-evil.txt", "/dev/shm/hdflash-evil.txt"):
        r = run(f"open({path!r}, 'w').write('pwned')\n", mech)
        assert r.status == "failed" and ("Read-only" in r.stderr_tail or "No such file" in r.stderr_tail), path
    assert open(visible_file).read() == "original"
    control = run(f"open({str(new)!r}, 'w').write('pwned')\n", "none")
    assert control.status == "passed" and new.read_text() == "pwned"


def test_deleting_outside_scratch_is_contained(mech, planted, visible_file):
    f, _ = planted
    r = run(f"import os\nos.remove({str(f)!r})\n", mech)
    assert r.status == "failed" and "FileNotFoundError" in r.stderr_tail
    r = run(f"import os\nos.remove({visible_file!r})\n", mech)
    assert r.status == "failed" and "Read-only file system" in r.stderr_tail
    assert f.read_text() == "original" and open(visible_file).read() == "original"
    control = run(f"import os\nos.remove({str(f)!r})\n", "none")
    assert control.status == "passed" and not f.exists()


def test_reading_a_secret_outside_is_contained(mech, planted):
    _, secret = planted
    text = secret.read_text()
    src = f"import sys\nprint(open({str(secret)!r}).read(), file=sys.stderr)\n"
    r = run(src, mech)
    assert r.status == "failed" and "FileNotFoundError" in r.stderr_tail and text not in r.stderr_tail
    r = run(f"import os, sys\nprint(os.listdir({str(secret.parent)!r}), file=sys.stderr)\n", mech)
    assert r.status == "failed" and "FileNotFoundError" in r.stderr_tail and "secret.txt" not in r.stderr_tail
    control = run(src, "none")
    assert control.status == "passed" and text in control.stderr_tail


@pytest.fixture
def listener():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.5)
    yield srv
    srv.close()


def _accepted(srv) -> bool:
    try:
        conn, _ = srv.accept()
    except socket.timeout:
        return False
    conn.close()
    return True


def test_socket_to_a_local_listener_is_contained(mech, listener):
    port = listener.getsockname()[1]
    src = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=3)\ns.sendall(b'hi')\n"
    r = run(src, mech)
    assert r.status == "failed"
    assert "ConnectionRefusedError" in r.stderr_tail or "Network is unreachable" in r.stderr_tail
    assert not _accepted(listener)  # the listener saw nothing
    control = run(src, "none")
    assert control.status == "passed" and _accepted(listener)


def test_fork_bomb_is_capped(mech):
    cap = 8
    r = run(FORK_BOMB, mech, max_new_procs=cap)
    assert r.status == "failed" and "BlockingIOError" in r.stderr_tail
    n = int(r.stderr_tail.split("forked ")[1].split()[0])
    assert 0 < n < cap  # the program itself (and the namespace's init as uid 65534) count too


def test_killing_the_parent_is_contained(mech):
    me = os.getpid()
    src = (
        "import os, signal, sys, time\n"
        "assert os.getppid() == 1, 'expected the namespace init as parent'\n"
        "try:\n"
        "    os.kill(os.getppid(), signal.SIGKILL)  # ignored: a PID namespace's init is immune from inside\n"
        "except PermissionError:\n"
        "    pass  # bwrap's init stays root when run as root\n"
        "time.sleep(0.2)\n"
        "print('still here', file=sys.stderr)  # had init died, the kernel would have killed us\n"
        f"os.kill({me}, signal.SIGKILL)  # the evaluator: no such process in the namespace\n"
    )
    r = run(src, mech)
    assert r.status == "failed" and "still here" in r.stderr_tail and "ProcessLookupError" in r.stderr_tail


def _processes_with(token: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if token.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("mechanism", ["none", *sb.MECHANISMS])
@pytest.mark.parametrize("main_waits", [False, True])
def test_no_child_outlives_the_program(mechanism, main_waits):
    if mechanism != "none" and sandbox_why_not(mechanism) is not None:
        pytest.skip(f"{mechanism} does not isolate here")
    token = f"hdflash-stray-{uuid.uuid4().hex}"
    src = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()  # leave the process group too\n"
        f"    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)', {token!r}])\n"
        "time.sleep(0.5)\n"
        + ("time.sleep(60)\n" if main_waits else "")
    )
    r = run(src, mechanism, timeout_s=2.0)
    assert r.status == ("timeout" if main_waits else "passed")
    time.sleep(0.3)
    left = _processes_with(token)
    for pid in left:  # do not leave them running even when the test fails
        os.kill(pid, 9)
    if mechanism == "none":
        assert left  # without a PID namespace a setsid child escapes the group kill (why isolation matters)
    else:
        assert not left


# ---- the record, the probe and the refusal ----------------------------------------------


def test_probe_rejects_an_unisolated_run():
    r = sb._execute(sb._PROBE, "", 10.0, "none", sb.Limits())
    assert r.status == "failed" and ("runs as root" in r.stderr_tail or "no PID namespace" in r.stderr_tail)


def test_probe_names_a_missing_tool(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert sb.probe("bwrap").endswith("not found") and sb.probe("unshare") == "unshare not found"


@pytest.fixture
def no_isolation(monkeypatch):
    sb.isolation.cache_clear()
    monkeypatch.setenv(sb.ENV_MECHANISM, "none")
    yield
    sb.isolation.cache_clear()


def test_without_isolation_scoring_refuses_unless_allowed(no_isolation, capsys):
    iso = sb.isolation()
    assert sb.isolation() is iso and iso.mechanism == "none" and not iso.isolated
    assert capsys.readouterr().err.count("NO ISOLATION WORKS HERE") == 1  # said once, loudly
    with pytest.raises(sb.UnisolatedError, match="--allow-unisolated"):
        sb.run_program("print(1)", 5)
    with pytest.raises(sb.UnisolatedError):
        sb.require_isolation()
    s = load_suite("humaneval", limit=1)[0]
    with pytest.raises(sb.UnisolatedError):
        S.score_output(s, s.meta["canonical_solution"])
    assert S.score_output(s, s.meta["canonical_solution"], allow_unisolated=True) is True
    assert sb.run_program("print(1)", 5, allow_unisolated=True).isolation == "none"
    rec = sb.require_isolation(allow_unisolated=True).to_json(allow_unisolated=True)
    assert rec["mechanism"] == "none (allowed by --allow-unisolated)"
    assert rec["unavailable"] == {"all": "HDFLASH_SANDBOX=none"}
    with pytest.raises(sb.UnisolatedError):
        sb.run_program("print(1)", 5, mechanism="none")


def test_isolation_record_names_the_mechanism(mech, monkeypatch):
    sb.isolation.cache_clear()
    monkeypatch.setenv(sb.ENV_MECHANISM, mech)
    try:
        iso = sb.require_isolation()
        assert iso == sb.Isolation(mech, ()) and iso.to_json()["mechanism"] == mech
        assert iso.to_json(allow_unisolated=True)["mechanism"] == mech
        s = load_suite("mbpp", limit=1)[0]
        assert S.mbpp_run(s.meta["reference_code"], s.meta).isolation == mech
    finally:
        sb.isolation.cache_clear()


# ---- the eval CLI -----------------------------------------------------------------------


def _fake_execute(plan):
    from eval.results import CellResult, Results
    from hdflash_jax.decode.stats import AcceptanceStats

    cell = CellResult(AcceptanceStats.from_hist([1]), 1, 1.0, 1.0, 0.0, 1.0, None, 1.0)
    return Results({}, {}, {"gsm8k": {"ar": cell}}), []


CLI = ["--suite", "gsm8k", "--method", "ar", "--limit", "1", "--score", "--quiet"]


def test_cli_refuses_to_score_unisolated_before_compute(no_isolation, monkeypatch, tmp_path, capsys):
    import eval.run as ev

    monkeypatch.setattr(ev, "execute", lambda plan: pytest.fail("computed although scoring was refused"))
    assert ev.main([*CLI, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "error: no sandbox isolation works here" in err and "--allow-unisolated" in err
    assert not (tmp_path / "out").exists()


def test_cli_records_the_isolation_in_results_json(no_isolation, monkeypatch, tmp_path):
    import json

    import eval.run as ev

    monkeypatch.setattr(ev, "execute", _fake_execute)
    assert ev.main([*CLI, "--allow-unisolated", "--out", str(tmp_path / "a")]) == 0
    rec = json.loads((tmp_path / "a/results.json").read_text())["config"]["isolation"]
    assert rec["mechanism"] == "none (allowed by --allow-unisolated)"
    assert rec["caps"]["cgroup"] is None and rec["caps"]["rlimits"]["nofile"] == sb.Limits.open_files
    sb.isolation.cache_clear()
    monkeypatch.delenv(sb.ENV_MECHANISM)
    assert ev.main([*CLI, "--out", str(tmp_path / "b")]) == (0 if sb.isolation().isolated else 2)
    if sb.isolation().isolated:
        rec = json.loads((tmp_path / "b/results.json").read_text())["config"]["isolation"]
        assert rec["mechanism"] == sb.isolation().mechanism in sb.MECHANISMS
        assert rec["caps"] == sb.caps_record(rec["mechanism"]) and rec["caps"]["scratch"]["fs"] == "tmpfs"


def test_runner_scores_pass_the_permission_on(no_isolation):
    from eval.runner import _scores

    s = load_suite("humaneval", limit=1)[0]
    assert _scores([s], {0: [s.meta["canonical_solution"]]}, 10.0, True) == [True]
    with pytest.raises(sb.UnisolatedError):
        _scores([s], {0: [s.meta["canonical_solution"]]}, 10.0, False)
