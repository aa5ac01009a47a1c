"""Benchmark suites as lists of `Sample`s, read from the vendored files in hdflash_jax/suites_data/.

Every suite is read from a file checked into the repository (see hdflash_jax/suites_data/LICENSES.md), so a
run needs no network and the prompts are the same on every machine. Samples keep the file's
order, and `limit` takes the first `limit` of them, so a small run is a prefix of the full run.

Suites and what `Sample.meta` holds:

- gsm8k (1319, test split): {"reference": number after '####', commas removed}
- math500 (500): {"reference": the `answer` field, "subject", "level", "unique_id"}
- humaneval (164): {"prompt": signature + docstring, "entry_point", "test", "canonical_solution"}
- mbpp (500, test split = task_ids 11..510 as in Austin et al. 2021):
  {"text", "test_setup_code", "test_list": tuple[str, ...], "reference_code"}
- mt_bench (80, two turns each): {"category", "reference": tuple[str, ...] | None}

`turns` holds the user messages only. The caller renders them with the tokenizer's chat
template; for MT-Bench the second user turn follows the model's own first answer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from hdflash_jax.fileio import read_jsonl

DATA_DIR = Path(__file__).resolve().parent / "suites_data"

SUITES = ("gsm8k", "math500", "humaneval", "mbpp", "mt_bench")

FILES = {
    "gsm8k": "gsm8k/test.jsonl",
    "math500": "math500/test.jsonl",
    "humaneval": "humaneval/HumanEval.jsonl",
    "mbpp": "mbpp/mbpp.jsonl",
    "mt_bench": "mt_bench/question.jsonl",
}

# The original MBPP paper: task_ids 11..510 are the test split (1..10 are few-shot prompts).
MBPP_TEST_IDS = range(11, 511)

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
HUMANEVAL_TEMPLATE = (
    "Complete the following Python function. Return the complete function (with any imports "
    "it needs) in a single ```python code block.\n\n```python\n{prompt}```"
)
MBPP_TEMPLATE = (
    "You are an expert Python programmer, and here is your task: {text} "
    "Your code should pass these tests:\n\n{tests}\n\n"
    "Return the code in a single ```python code block."
)


@dataclasses.dataclass(frozen=True)
class Sample:
    """One benchmark item. `turns` are user messages; `meta` holds what scoring needs.

    `meta` is left out of hashing (dicts are unhashable); (suite, id, turns) identify a sample.
    """

    suite: str
    id: str
    turns: tuple[str, ...]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict, hash=False)


def expand_suites(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """'all' or 'a,b' (or a list of names) -> tuple of valid suite names, in the given order.

    Raises ValueError naming an unknown suite and listing the valid ones.
    """
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    out: list[str] = []
    for n in names:
        for s in SUITES if n == "all" else (n,):
            if s not in SUITES:
                raise ValueError(f"unknown suite {n!r}; valid suites: {', '.join(SUITES)}, all")
            if s not in out:
                out.append(s)
    if not out:
        raise ValueError(f"no suite selected; valid suites: {', '.join(SUITES)}, all")
    return tuple(out)


def _gsm8k(rows: list[dict]) -> list[Sample]:
    return [
        Sample(
            suite="gsm8k",
            id=f"gsm8k/{i}",
            turns=(f"{r['question']}\n{MATH_INSTRUCTION}",),
            meta={"reference": r["answer"].split("####")[-1].strip().replace(",", "")},
        )
        for i, r in enumerate(rows)
    ]


def _math500(rows: list[dict]) -> list[Sample]:
    return [
        Sample(
            suite="math500",
            id=r["unique_id"],
            turns=(f"{r['problem']}\n{MATH_INSTRUCTION}",),
            meta={
                "reference": r["answer"],
                "subject": r["subject"],
                "level": r["level"],
                "unique_id": r["unique_id"],
            },
        )
        for r in rows
    ]


def _humaneval(rows: list[dict]) -> list[Sample]:
    return [
        Sample(
            suite="humaneval",
            id=r["task_id"],
            turns=(HUMANEVAL_TEMPLATE.format(prompt=r["prompt"]),),
            meta={
                "prompt": r["prompt"],
                "entry_point": r["entry_point"],
                "test": r["test"],
                "canonical_solution": r["canonical_solution"],
            },
        )
        for r in rows
    ]


def _mbpp(rows: list[dict]) -> list[Sample]:
    test_rows = [r for r in rows if r["task_id"] in MBPP_TEST_IDS]
    return [
        Sample(
            suite="mbpp",
            id=f"mbpp/{r['task_id']}",
            turns=(MBPP_TEMPLATE.format(text=r["text"], tests="\n".join(r["test_list"])),),
            meta={
                "text": r["text"],
                "test_setup_code": r["test_setup_code"],
                "test_list": tuple(r["test_list"]),
                "reference_code": r["code"],
            },
        )
        for r in test_rows
    ]


def _mt_bench(rows: list[dict]) -> list[Sample]:
    return [
        Sample(
            suite="mt_bench",
            id=f"mt_bench/{r['question_id']}",
            turns=tuple(r["turns"]),
            meta={
                "category": r["category"],
                "reference": tuple(r["reference"]) if r.get("reference") else None,
            },
        )
        for r in rows
    ]


_BUILDERS = {
    "gsm8k": _gsm8k,
    "math500": _math500,
    "humaneval": _humaneval,
    "mbpp": _mbpp,
    "mt_bench": _mt_bench,
}


def load_suite(name: str, limit: int | None = None, data_dir: Path | str | None = None) -> list[Sample]:
    """Samples of suite `name` ('all' or 'a,b' concatenates suites), first `limit` of each suite.

    Raises ValueError for an unknown suite and for an empty selection (limit <= 0), so that a
    typo never silently yields a run over nothing.
    """
    suites = expand_suites(name)
    if limit is not None and limit <= 0:
        raise ValueError(f"empty selection: limit={limit} leaves no samples of {name!r}")
    root = Path(data_dir) if data_dir is not None else DATA_DIR
    out: list[Sample] = []
    for s in suites:
        path = root / FILES[s]
        try:
            samples = _BUILDERS[s](read_jsonl(path))
        except (KeyError, TypeError, AttributeError) as e:  # valid JSON, but not this suite's records
            raise ValueError(f"{path}: not a {s} file ({type(e).__name__}: {e})") from None
        out.extend(samples if limit is None else samples[:limit])
    return out
