"""Sandbox: statuses, timeouts that kill, crashes, a fresh process; scoring on hand examples.

These run under the isolation that works here (eval.sandbox.isolation()), and unisolated where none
does; tests/test_eval_sandbox_isolation.py checks the isolation itself with hostile programs.
"""

import functools
import os
import time

import pytest

from eval import sandbox
from eval import scoring as S
from hdflash_jax.suites import load_suite

run_program = functools.partial(sandbox.run_program, allow_unisolated=True)


def test_passes_and_fails():
    assert run_program("print('ok')", 5).status == "passed"
    r = run_program("assert 1 + 1 == 3", 5)
    assert (r.passed, r.status) == (False, "failed")
    assert "AssertionError" in r.stderr_tail


def test_infinite_loop_is_killed_within_timeout():
    t = time.monotonic()
    r = run_program("while True:\n    pass\n", 1.0)
    assert (r.passed, r.status) == (False, "timeout")
    assert time.monotonic() - t < 5


def test_sleeping_child_process_is_killed_without_isolation_too(tmp_path):
    marker = tmp_path / "alive"
    src = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    time.sleep(2.0)\n"
        f"    open({str(marker)!r}, 'w').write('x')\n"
        "    os._exit(0)\n"
        "time.sleep(60)\n"
    )
    r = run_program(src, 0.5, mechanism="none")  # the marker is only writable unisolated
    assert r.status == "timeout"
    time.sleep(2.5)
    assert not marker.exists()  # the whole process group died with the parent


@pytest.mark.parametrize("src", ["import os\nos._exit(3)", "import os\nos.abort()"])
def test_crashes_are_reported(src):
    r = run_program(src, 5)
    assert (r.passed, r.status) == (False, "crashed")


def test_system_exit_is_a_failure_whatever_its_code():
    """The harness catches BaseException: SystemExit(3) and SystemExit(0) fail like an AssertionError."""
    for code in (3, 0):
        r = run_program(f"raise SystemExit({code})", 5)
        assert (r.passed, r.status, r.returncode) == (False, "failed", 1)
        assert f"SystemExit: {code}" in r.stderr_tail if code else "SystemExit" in r.stderr_tail


def test_memory_is_limited():
    r = run_program("x = bytearray(4 << 30)\n", 5)
    assert not r.passed and "MemoryError" in r.stderr_tail


def test_isolated_fresh_dir_and_env():
    src = (
        "import os, sys\n"
        f"assert os.getcwd() != {os.getcwd()!r}\n"
        "assert os.listdir('.') == [], os.listdir('.')  # the program and its output are not files in it\n"
        "assert sys.flags.isolated == 1\n"
        "assert 'PYTHONPATH' not in os.environ\n"
        "assert __name__ == 'program' and sys.argv == ['program.py']\n"
    )
    r = run_program(src, 5)
    assert r.status == "passed", r.stderr_tail


# ---- scoring ----------------------------------------------------------------------------

score = functools.partial(S.score_output, allow_unisolated=True)


def test_gsm8k_scoring():
    assert S.gsm8k_correct("So she makes 9 * 2 = $18 every day.", "18")
    assert S.gsm8k_correct("The total is 1,250 dollars.", "1250")
    assert S.gsm8k_correct("#### 2,125", "2,125")
    assert S.gsm8k_correct("3 + 4 = 7, so the answer is \\boxed{7}. Check: 7 - 4 = 3.", "7")
    assert S.gsm8k_correct("It is 18.0", "18")
    assert S.gsm8k_correct("<think>maybe 5</think>The answer is -3.", "-3")
    assert not S.gsm8k_correct("The answer is 18, not 17.", "18")
    assert not S.gsm8k_correct("no idea", "18")


def test_last_boxed_balanced():
    assert S.last_boxed("\\boxed{1} and \\boxed{\\frac{a}{b}}.") == "\\frac{a}{b}"
    assert S.last_boxed("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}") == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert S.last_boxed("\\boxed{unclosed") is None
    assert S.last_boxed("nothing") is None


def test_math500_scoring():
    ref = "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert S.math500_correct("so $\\boxed{(3,\\dfrac{\\pi}{2})}$.", ref)
    assert S.math500_correct("\\boxed{90^\\circ}", "90^\\circ")
    assert S.math500_correct("\\boxed{90}", "90^\\circ")
    assert S.math500_correct("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}")
    assert S.math500_correct("\\boxed{\\$32,\\!348.}", "\\$32,\\!348")
    assert S.math500_correct("\\boxed{10.0}", "10")
    assert not S.math500_correct("\\boxed{\\frac{\\pi}{3}}", "\\frac{\\pi}{2}")
    assert not S.math500_correct("the answer is 9", "9")  # no \boxed{}


def test_math500_reference_solutions_score_full():
    samples = load_suite("math500")
    import json

    from hdflash_jax.suites import DATA_DIR

    rows = [json.loads(line) for line in open(DATA_DIR / "math500/test.jsonl", encoding="utf-8")]
    assert sum(S.math500_correct(r["solution"], s.meta["reference"]) for r, s in zip(rows, samples)) == 500


def test_extract_code():
    out = "Here:\n```python\ndef f(x):\n    return x\n```\nand a test:\n```python\nprint(f(1))\n```"
    assert S.extract_code(out, "f") == "def f(x):\n    return x\n"
    assert S.extract_code("```\nprint(2)\n```") == "print(2)\n"
    assert S.extract_code("    return 1\n") == "    return 1\n"


@pytest.mark.parametrize("i", [0, 1, 2])
def test_humaneval_canonical_passes(i):
    s = load_suite("humaneval", limit=3)[i]
    assert score(s, s.meta["canonical_solution"]) is True  # a body completion
    fenced = "```python\n" + s.meta["prompt"] + s.meta["canonical_solution"] + "```"
    assert score(s, fenced) is True  # a whole-function answer


def test_humaneval_wrong_fails():
    s = load_suite("humaneval", limit=1)[0]
    r = S.humaneval_run("    return False\n", s.meta, allow_unisolated=True)
    assert (r.passed, r.status) == (False, "failed")
    assert score(s, "    while True:\n        pass\n", timeout_s=1.0) is False


@pytest.mark.parametrize("i", [0, 1, 2])
def test_mbpp_canonical_passes(i):
    s = load_suite("mbpp", limit=3)[i]
    assert score(s, "```python\n" + s.meta["reference_code"] + "\n```") is True


def test_mbpp_wrong_fails_and_setup_code_runs():
    s = load_suite("mbpp", limit=1)[0]
    assert score(s, "def remove_Occ(s, ch):\n    return s\n") is False
    (s367,) = [x for x in load_suite("mbpp") if x.id == "mbpp/367"]
    assert s367.meta["test_setup_code"]  # builds trees with the completion's Node class
    assert score(s367, s367.meta["reference_code"]) is True


def test_score_outputs_accuracy():
    samples = load_suite("gsm8k", limit=2)
    assert S.score_outputs(samples, ["#### 18", "#### 4"], allow_unisolated=True) == 0.5
    assert S.score_outputs(load_suite("mt_bench", limit=2), ["a", "b"]) is None


# ---- honest programs pass inside the isolation -----------------------------------------

# Its asserts expect tuple({12, ..., 16}) in sorted order; CPython iterates that set as 16, 12, 13, 14, 15.
MBPP_FLAWED = {"mbpp/341"}


def _not_passing(samples, mechanism, timeout_s):
    bad = []
    for s in samples:
        m = s.meta
        if s.suite == "humaneval":
            src, checks = S.humaneval_program(m["prompt"], m["canonical_solution"], m["test"], m["entry_point"])
        else:
            src, checks = S.mbpp_program(m["reference_code"], m["test_setup_code"], m["test_list"])
        if not sandbox.run_program(src, timeout_s, checks=checks, mechanism=mechanism).passed:
            bad.append(s.id)
    return bad


def _isolating():
    return [m for m in sandbox.MECHANISMS if sandbox.probe(m) is None]


def test_canonical_solutions_pass_isolated_sample():
    """Every 20th HumanEval canonical solution and every 25th MBPP reference, under the isolation scoring uses."""
    iso = sandbox.isolation()
    if not iso.isolated:
        pytest.skip("no isolation mechanism works here")
    samples = load_suite("humaneval")[::20] + load_suite("mbpp")[::25]
    assert len(samples) == 9 + 20
    assert _not_passing(samples, iso.mechanism, S.DEFAULT_TIMEOUT_S) == []


@pytest.mark.slow
def test_all_canonical_solutions_pass_isolated():
    """All 164 HumanEval canonical solutions and the 500 MBPP references, under each mechanism (30 s each: mbpp/123
    takes ~8 s on a loaded 2-core machine and would time out at the default 10 s; the isolation is not on trial
    there)."""
    mechs = _isolating()
    if not mechs:
        pytest.skip("no isolation mechanism works here")
    samples = load_suite("humaneval") + load_suite("mbpp")
    for m in mechs:
        assert set(_not_passing(samples, m, 30.0)) == MBPP_FLAWED, m


@pytest.mark.parametrize("prlimit", [True, False])
def test_limits_are_set_with_and_without_prlimit(monkeypatch, prlimit):
    """util-linux prlimit sets the limits before exec; where it is missing, a preexec_fn sets the same."""
    if not prlimit:
        which = sandbox.shutil.which
        monkeypatch.setattr(sandbox.shutil, "which", lambda name: None if name == "prlimit" else which(name))
    src = ("import resource as r, sys\n"
           "print(r.getrlimit(r.RLIMIT_FSIZE), r.getrlimit(r.RLIMIT_NOFILE), file=sys.stderr)\n")
    r = run_program(src, 5, file_bytes=12345, open_files=77)
    assert r.passed and "(12345, 12345) (77, 77)" in r.stderr_tail
    r = run_program("x = bytearray(4 << 30)\n", 5)
    assert not r.passed and "MemoryError" in r.stderr_tail
