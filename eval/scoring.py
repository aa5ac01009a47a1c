"""Answer scoring: GSM8K/MATH-500 final-answer match, HumanEval/MBPP by running tests.

Code is only ever run through eval.sandbox.run_program (a separate, limited, isolated process);
without a working isolation mechanism the code scorers raise eval.sandbox.UnisolatedError unless
`allow_unisolated=True`.

Conventions (kept light on purpose: the point is to check that speculative decoding does not
change answer quality, not to compete with a full grader):
- Reasoning-model outputs: anything up to the last '</think>' is dropped first.
- GSM8K: the last number of the output (commas removed), or, if the output has a \\boxed{},
  the last number inside the last one; equal to the reference numerically (|a-b| <= 1e-6).
- MATH-500: the content of the last \\boxed{...} (balanced braces), normalised
  (`normalize_math_answer`), equal to the normalised reference; or both parse as equal floats.
- HumanEval: the program is prompt + completion, the checks test + `check(entry_point)`. The
  completion may be a body or a whole function: redefining the function after the prompt's
  docstring-only definition is valid Python. MBPP: the program is the completion, the checks
  test_setup_code + the test_list asserts. The sandbox compiles the two separately (the
  completion's text cannot swallow a check) and runs them in one namespace; only a run whose
  every check returned passes (eval.sandbox: an exit, a hook or `if __name__ == '__main__':`
  boilerplate cannot pass a wrong answer).
- Code completions: the fenced ```python block (the one defining the entry point if there are
  several), else the raw text.
"""

from __future__ import annotations

import re
from typing import Sequence

from eval.sandbox import SandboxResult, run_program

DEFAULT_TIMEOUT_S = 10.0

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def strip_thinking(text: str) -> str:
    """Drop a reasoning preamble: everything up to the last '</think>'."""
    i = text.rfind("</think>")
    return text[i + len("</think>"):] if i >= 0 else text


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if absent/unclosed."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    i = starts[-1]
    depth = 1
    for j in range(i, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def extract_last_number(text: str) -> str | None:
    """Last number in `text`, commas removed ('1,234.5' -> '1234.5'); None if there is none."""
    nums = [m.group(0).replace(",", "") for m in _NUMBER.finditer(text)]
    return nums[-1] if nums else None


def _to_float(s: str | None) -> float | None:
    try:
        return float(s) if s is not None else None
    except ValueError:
        return None


def gsm8k_answer(output: str) -> str | None:
    """The predicted GSM8K number (see module conventions)."""
    text = strip_thinking(output)
    boxed = last_boxed(text)
    if boxed is not None and extract_last_number(boxed) is not None:
        return extract_last_number(boxed)
    return extract_last_number(text)


def gsm8k_correct(output: str, reference: str) -> bool:
    """Whether the output's final number equals the reference number."""
    pred = _to_float(gsm8k_answer(output))
    ref = _to_float(str(reference).replace(",", "").strip())
    return pred is not None and ref is not None and abs(pred - ref) <= 1e-6


def _unwrap_text(s: str) -> str:
    """\\text{X} / \\textbf{X} / \\mbox{X} / \\mathrm{X} -> X (innermost braces without nesting)."""
    prev = None
    while prev != s:
        prev = s
        s = re.sub(r"\\(?:text|textbf|textit|mbox|mathrm)\{([^{}]*)\}", r"\1", s)
    return s


def normalize_math_answer(s: str) -> str:
    """Light normalisation so that equal answers written slightly differently compare equal."""
    s = s.strip()
    s = re.sub(r"\\left(?![a-zA-Z])", "", s)
    s = re.sub(r"\\right(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s)
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\:", "")
    s = _unwrap_text(s)
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    return s


def math_answer(output: str) -> str | None:
    """The predicted MATH answer: the last \\boxed{...} of the output, normalised."""
    boxed = last_boxed(strip_thinking(output))
    return normalize_math_answer(boxed) if boxed is not None else None


def math_equal(pred: str | None, reference: str) -> bool:
    """Normalised string equality, or equal as floats when both are plain numbers."""
    if pred is None:
        return False
    a, b = normalize_math_answer(pred), normalize_math_answer(reference)
    if a == b:
        return True
    fa, fb = _to_float(a.replace(",", "")), _to_float(b.replace(",", ""))
    return fa is not None and fb is not None and abs(fa - fb) <= 1e-9 * max(1.0, abs(fb))


def math500_correct(output: str, reference: str) -> bool:
    """Whether the last \\boxed{} of the output matches the reference answer."""
    return math_equal(math_answer(output), reference)


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(output: str, entry_point: str | None = None) -> str:
    """The code in a model answer: a fenced block (python/py/untagged preferred; the first one
    defining `entry_point` if given and any does, else the first), or the raw text if unfenced."""
    text = strip_thinking(output)
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    if not blocks:
        return text
    py = [b for lang, b in blocks if lang in ("python", "py", "python3", "")] or [b for _, b in blocks]
    if entry_point:
        defining = [b for b in py if re.search(rf"def\s+{re.escape(entry_point)}\s*\(", b)]
        if defining:
            return defining[0]
    return py[0]


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> tuple[str, str]:
    """(program, checks): prompt + completion, then test + check(entry_point), as the HumanEval harness runs them."""
    return f"{prompt}{completion}\n", f"{test}\n\ncheck({entry_point})\n"


def mbpp_program(completion: str, test_setup_code: str, test_list: Sequence[str]) -> tuple[str, str]:
    """(program, checks): the completion, then test_setup_code + the test asserts."""
    tests = "\n".join(test_list)
    return f"{completion}\n", f"{test_setup_code}\n\n{tests}\n"


def humaneval_run(output: str, meta: dict, timeout_s: float = DEFAULT_TIMEOUT_S, *,
                  allow_unisolated: bool = False) -> SandboxResult:
    """Run a HumanEval answer (raw model output) against its tests in the sandbox."""
    code = extract_code(output, meta["entry_point"])
    src, checks = humaneval_program(meta["prompt"], code, meta["test"], meta["entry_point"])
    return run_program(src, timeout_s, checks=checks, allow_unisolated=allow_unisolated)


def mbpp_run(output: str, meta: dict, timeout_s: float = DEFAULT_TIMEOUT_S, *,
             allow_unisolated: bool = False) -> SandboxResult:
    """Run an MBPP answer (raw model output) against its asserts in the sandbox."""
    entry = re.match(r"assert\s+(?:not\s+)?\(?\s*(?:set\()?\s*([A-Za-z_]\w*)\s*\(", meta["test_list"][0])
    code = extract_code(output, entry.group(1) if entry else None)
    src, checks = mbpp_program(code, meta["test_setup_code"], meta["test_list"])
    return run_program(src, timeout_s, checks=checks, allow_unisolated=allow_unisolated)


def score_output(sample, output: str, timeout_s: float = DEFAULT_TIMEOUT_S, *,
                 allow_unisolated: bool = False) -> bool | None:
    """Whether `output` answers `sample` (an hdflash_jax.suites.Sample) correctly; None if unscored.

    MT-Bench (open-ended, judged by an LLM in the original) is not scored: returns None.
    """
    suite, meta = sample.suite, sample.meta
    if suite == "gsm8k":
        return gsm8k_correct(output, meta["reference"])
    if suite == "math500":
        return math500_correct(output, meta["reference"])
    if suite == "humaneval":
        return humaneval_run(output, meta, timeout_s, allow_unisolated=allow_unisolated).passed
    if suite == "mbpp":
        return mbpp_run(output, meta, timeout_s, allow_unisolated=allow_unisolated).passed
    if suite == "mt_bench":
        return None
    raise ValueError(f"no scorer for suite {suite!r}")


def score_outputs(samples, outputs: Sequence[str], timeout_s: float = DEFAULT_TIMEOUT_S, *,
                  allow_unisolated: bool = False) -> float | None:
    """Accuracy (fraction correct) over samples of a suite; None if the suite is unscored.

    For multi-turn samples pass the last turn's answer.
    """
    if len(samples) != len(outputs):
        raise ValueError(f"{len(samples)} samples but {len(outputs)} outputs")
    scores = [score_output(s, o, timeout_s, allow_unisolated=allow_unisolated) for s, o in zip(samples, outputs)]
    scored = [x for x in scores if x is not None]
    return sum(scored) / len(scored) if scored else None
