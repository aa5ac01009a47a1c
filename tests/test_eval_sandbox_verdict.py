"""The verdict comes from the checks, not the exit code: forged passes fail, honest programs pass.

Each forged row is a wrong answer plus a way for a Python program to end with status 0 although its checks
fail or never ran. The negative control is the old verdict, exit-code-only: the same text run as one script
(`python -I -B program.py`, as the sandbox did before) with status 0 counted as passed. Every forged row must
pass that way (else the row shows nothing) and fail the new way; every honest row must pass both ways.
"""

import functools
import subprocess
import sys
import time

import pytest

from eval import sandbox as sb
from eval import scoring as S
from hdflash_jax.suites import load_suite


@functools.cache
def _samples():
    he = load_suite("humaneval", limit=3)
    return {"humaneval": he[0], "humaneval/2": he[2], "mbpp": load_suite("mbpp", limit=1)[0]}


def _parts(suite: str, completion: str) -> tuple[str, str]:
    m = _samples()[suite].meta
    if suite.startswith("humaneval"):
        return S.humaneval_program(m["prompt"], completion, m["test"], m["entry_point"])
    return S.mbpp_program(completion, m["test_setup_code"], m["test_list"])


def old_verdict(suite: str, completion: str, tmp_path) -> bool:
    """Exit-code-only: program and checks as one script, passed iff status 0 (the previous eval.sandbox)."""
    src, checks = _parts(suite, completion)
    path = tmp_path / "program.py"
    path.write_text(f"{src}\n{checks}")
    r = subprocess.run([sys.executable, "-I", "-B", str(path)], cwd=tmp_path, stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=30)
    return r.returncode == 0


def new_verdict(suite: str, completion: str, mechanism: str) -> sb.SandboxResult:
    src, checks = _parts(suite, completion)
    return sb.run_program(src, 10, checks=checks, mechanism=mechanism, allow_unisolated=mechanism == "none")


HE_WRONG = "    return False\n"  # fails HumanEval/0's first assert
MBPP_WRONG = "def remove_Occ(s, ch):\n    return s\n"  # fails mbpp/11's first assert
UNITTEST_BOILERPLATE = (
    "\n\nimport unittest\n\nclass TestIt(unittest.TestCase):\n"
    "    def test_runs(self):\n        self.assertTrue(True)\n\n"
    "if __name__ == '__main__':\n    unittest.main()\n"
)

# (name, suite, completion, the statuses the new verdict may give)
FORGED = [
    ("raise SystemExit in the body", "humaneval", "    raise SystemExit\n", {"failed"}),
    ("sys.exit(0) in the body", "humaneval", "    import sys\n    sys.exit(0)\n", {"failed"}),
    ("os._exit(0) in the body", "humaneval", "    import os\n    os._exit(0)\n", {"unverified"}),
    ("os._exit(0) at top level", "humaneval", HE_WRONG + "\nimport os\nos._exit(0)\n", {"unverified"}),
    ("exit() at top level", "mbpp", MBPP_WRONG + "\nexit()\n", {"failed"}),
    ("quit() at top level", "mbpp", MBPP_WRONG + "\nquit()\n", {"failed"}),
    ("__main__ block that exits", "humaneval",
     HE_WRONG + "\nif __name__ == '__main__':\n    import sys\n    sys.exit(0)\n", {"failed"}),
    ("unittest.main() boilerplate", "mbpp", MBPP_WRONG + UNITTEST_BOILERPLATE, {"failed"}),
    ("doctest boilerplate + SystemExit(0)", "humaneval",
     HE_WRONG + "\nif __name__ == '__main__':\n    import doctest\n    doctest.testmod()\n    raise SystemExit(0)\n",
     {"failed"}),
    ("sys.excepthook exits 0", "humaneval", HE_WRONG + "\nimport os, sys\nsys.excepthook = lambda *a: os._exit(0)\n",
     {"failed"}),
    ("atexit hook exits 0", "humaneval", HE_WRONG + "\nimport atexit, os\natexit.register(os._exit, 0)\n", {"failed"}),
    ("finalizer exits 0", "humaneval",
     HE_WRONG + "\nimport os\n\nclass _Bye:\n    def __del__(self):\n        os._exit(0)\n\n_bye = _Bye()\n",
     {"failed"}),
    ("thread exits 0 after the checks failed", "humaneval",
     HE_WRONG + "\nimport os, threading, time\n"
     "threading.Thread(target=lambda: (time.sleep(0.5), os._exit(0))).start()\n",
     {"failed"}),
    ("exec into an interpreter that exits 0", "humaneval",
     HE_WRONG + "\nimport os, sys\nos.execv(sys.executable, [sys.executable, '-c', 'pass'])\n", {"unverified"}),
    ("fork: the parent exits 0, the child fails", "humaneval",
     HE_WRONG + "\nimport os\nif os.fork():\n    os.wait()\n    os._exit(0)\n", {"unverified"}),
    ("a guessed marker on every descriptor, then exit 0", "humaneval",
     HE_WRONG + "\nimport os\nfor fd in range(3, 64):\n    try:\n"
     "        os.write(fd, b'passed ' + b'0' * 32 + b'\\n')\n"
     "    except OSError:\n        pass\nos._exit(0)\n", {"unverified"}),
]

# Right answers, some with boilerplate or hooks: passed both ways.
HONEST = [
    ("canonical", "humaneval", None),
    ("canonical + __main__ block that exits 0", "humaneval",
     "\nif __name__ == '__main__':\n    import sys\n    sys.exit(0)\n"),
    ("canonical + unittest.main() boilerplate", "mbpp", UNITTEST_BOILERPLATE),
    ("canonical + atexit hook", "humaneval", "\nimport atexit\natexit.register(print, 'bye')\n"),
    ("canonical (mbpp)", "mbpp", None),
]


def _canonical(suite: str) -> str:
    m = _samples()[suite].meta
    return m["canonical_solution"] if suite.startswith("humaneval") else m["reference_code"] + "\n"


def _table(mechanism, tmp_path):
    rows = []
    for name, suite, completion, allowed in FORGED:
        t = time.monotonic()
        r = new_verdict(suite, completion, mechanism)
        dt = time.monotonic() - t
        rows.append(("forged", name, old_verdict(suite, completion, tmp_path), r.status, allowed, dt))
    for name, suite, extra in HONEST:
        completion = _canonical(suite) + (extra or "")
        t = time.monotonic()
        r = new_verdict(suite, completion, mechanism)
        dt = time.monotonic() - t
        rows.append(("honest", name, old_verdict(suite, completion, tmp_path), r.status, {"passed"}, dt))
    print(f"\n[{mechanism}] {'kind':7} {'program':52} {'old (exit code)':16} {'new':11} new run s")
    for kind, name, old, new, _, dt in rows:
        pad = " " * (len(mechanism) + 3)
        print(f"{pad}{kind:7} {name:52} {'passed' if old else 'not passed':16} {new:11} {dt:.2f}")
    return rows


def _check(rows):
    for kind, name, old, new, allowed, _ in rows:
        assert old, f"{name}: the old verdict did not pass it, so the row shows nothing"
        assert new in allowed, f"{name}: new verdict {new!r}, expected one of {sorted(allowed)}"
    assert sum(kind == "forged" for kind, *_ in rows) == len(FORGED) and all(
        new != "passed" for kind, _, _, new, _, _ in rows if kind == "forged")


def test_forged_passes_fail_and_honest_programs_pass(tmp_path):
    """Under the isolation scoring uses here (unisolated where none works)."""
    iso = sb.isolation()
    _check(_table(iso.mechanism, tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("mechanism", ["none", *sb.MECHANISMS])
def test_forged_passes_fail_under_each_mechanism(mechanism, tmp_path):
    if mechanism != "none" and sb.probe(mechanism) is not None:
        pytest.skip(f"{mechanism} does not isolate here")
    _check(_table(mechanism, tmp_path))


def test_scoring_uses_the_verdict():
    """score_output through the real scoring path: a forged pass is False, the canonical answer True."""
    s = _samples()["humaneval"]
    assert S.score_output(s, HE_WRONG + "\nimport os\nos._exit(0)\n", allow_unisolated=True) is False
    assert S.score_output(s, "    raise SystemExit\n", allow_unisolated=True) is False
    assert S.score_output(s, s.meta["canonical_solution"], allow_unisolated=True) is True


def test_a_program_can_lose_its_marker_but_not_forge_it():
    """A right answer that points every descriptor at /dev/null first: the harness's marker goes there, so the
    run is 'unverified' (a program can only fail itself this way). Control: without the redirection it passes."""
    s = _samples()["humaneval"]
    redirect = ("\nimport os\nnull = os.open('/dev/null', os.O_WRONLY)\nfor fd in range(3, 64):\n    if fd != null:\n"
                "        try:\n            os.dup2(null, fd)\n        except OSError:\n            pass\n")
    mech = sb.isolation().mechanism
    assert new_verdict("humaneval", s.meta["canonical_solution"] + redirect, mech).status == "unverified"
    assert new_verdict("humaneval", s.meta["canonical_solution"], mech).status == "passed"


# ---- what one interpreter cannot stop (docs/scoring_sandbox.md) ---------------------------------------

# (name, suite, the wrong answer with the trick, the same wrong answer without it)
REMAINING = [
    ("an always-equal object", "humaneval",
     "    class _Eq:\n        def __eq__(self, other):\n            return True\n    return _Eq()\n", HE_WRONG),
    ("patched builtins (abs)", "humaneval/2", "    return 0.5\n\nimport builtins\nbuiltins.abs = lambda x: 0\n",
     "    return 0.5\n"),
    ("the nonce read from the harness's frame", "humaneval",
     HE_WRONG + "\nimport os, sys\n_h = sys._getframe(1).f_locals\n"
     "os.write(_h['verdict_fd'], b'passed ' + _h['nonce'] + b'\\n')\nos._exit(0)\n", HE_WRONG),
]


@pytest.mark.parametrize("name,suite,trick,plain", REMAINING, ids=[r[0] for r in REMAINING])
def test_what_one_interpreter_cannot_stop(name, suite, trick, plain):
    """Known limits, documented: these wrong answers still pass. If one starts failing, update the docs.
    Control: the same wrong answer without the trick fails."""
    mech = sb.isolation().mechanism
    r = new_verdict(suite, trick, mech)
    assert r.status == "passed", r.stderr_tail
    assert new_verdict(suite, plain, mech).status == "failed"
