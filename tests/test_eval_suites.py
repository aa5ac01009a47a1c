"""Suite loaders: vendored file integrity, documented counts, prompt/reference contents, errors."""

import hashlib

import pytest

from hdflash_jax.suites import DATA_DIR, FILES, SUITES, Sample, expand_suites, load_suite

SHA256 = {
    "gsm8k/test.jsonl": "752adc99f23132275139f1f7be57126b08735a55daf0c56859ee6df70abafbac",
    "math500/test.jsonl": "35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132",
    "humaneval/HumanEval.jsonl": "1d49078ba3e2b196b9344535bef34a43021f038fad9561d6ee7c53450609a6a2",
    "mbpp/mbpp.jsonl": "0b7004a79cd62d9ec7ecdd5a6e5f0ef1210ff00b286df3c5d5b57bf38c58e19a",
    "mt_bench/question.jsonl": "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7",
}
COUNTS = {"gsm8k": 1319, "math500": 500, "humaneval": 164, "mbpp": 500, "mt_bench": 80}


@pytest.mark.parametrize("rel", sorted(SHA256))
def test_vendored_file_sha256(rel):
    assert hashlib.sha256((DATA_DIR / rel).read_bytes()).hexdigest() == SHA256[rel]


def test_every_suite_file_is_hashed_and_licensed():
    assert set(FILES.values()) == set(SHA256)
    licenses = (DATA_DIR / "LICENSES.md").read_text(encoding="utf-8")
    for rel, digest in SHA256.items():
        assert rel in licenses and digest in licenses


@pytest.mark.parametrize("name", SUITES)
def test_counts_and_unique_ids(name):
    samples = load_suite(name)
    assert len(samples) == COUNTS[name]
    assert len({s.id for s in samples}) == COUNTS[name]
    assert all(isinstance(s, Sample) and s.suite == name and s.turns for s in samples)


def test_all_expands_in_order():
    assert expand_suites("all") == SUITES
    assert expand_suites("mbpp,gsm8k,mbpp") == ("mbpp", "gsm8k")
    samples = load_suite("all", limit=2)
    assert [s.suite for s in samples] == [s for s in SUITES for _ in range(2)]
    assert len(load_suite("all")) == sum(COUNTS.values())


def test_limit_takes_prefix():
    assert [s.id for s in load_suite("gsm8k", limit=3)] == ["gsm8k/0", "gsm8k/1", "gsm8k/2"]


def test_gsm8k_reference():
    s = load_suite("gsm8k", limit=1)[0]
    assert s.turns[0].startswith("Janet’s ducks lay 16 eggs")
    assert s.meta["reference"] == "18"
    refs = [x.meta["reference"] for x in load_suite("gsm8k")]
    assert "," not in "".join(refs)  # '2,125' is stored as '2125'
    assert "2125" in refs


def test_math500_reference():
    s = load_suite("math500", limit=1)[0]
    assert s.id == "test/precalculus/807.json"
    assert s.meta["reference"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert "\\boxed{}" in s.turns[0]


def test_humaneval_prompt_is_signature_and_docstring():
    s = load_suite("humaneval", limit=1)[0]
    assert s.id == "HumanEval/0"
    assert s.meta["entry_point"] == "has_close_elements"
    assert s.meta["prompt"].startswith("from typing import List")
    assert s.meta["prompt"] in s.turns[0]
    assert "def check(candidate)" in s.meta["test"]


def test_mbpp_test_split_is_11_to_510():
    samples = load_suite("mbpp")
    assert samples[0].id == "mbpp/11" and samples[-1].id == "mbpp/510"
    assert samples[0].meta["test_list"][0] in samples[0].turns[0]
    assert all(len(s.meta["test_list"]) == 3 for s in samples)


def test_mt_bench_two_turns():
    samples = load_suite("mt_bench")
    assert samples[0].id == "mt_bench/81"
    assert all(len(s.turns) == 2 for s in samples)
    assert samples[0].turns[1] == "Rewrite your previous response. Start every sentence with the letter A."
    assert sum(s.meta["reference"] is not None for s in samples) == 39


def test_sample_is_frozen_and_hashable():
    s = load_suite("gsm8k", limit=1)[0]
    with pytest.raises(Exception):
        s.id = "x"
    assert hash(s) == hash(load_suite("gsm8k", limit=1)[0])


def test_unknown_suite_names_it_and_lists_valid():
    with pytest.raises(ValueError, match="gsm9k") as e:
        load_suite("gsm9k")
    assert all(n in str(e.value) for n in SUITES)


@pytest.mark.parametrize("limit", [0, -1])
def test_empty_selection_raises(limit):
    with pytest.raises(ValueError, match="empty selection"):
        load_suite("gsm8k", limit=limit)
