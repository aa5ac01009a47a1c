"""Partial acceptance at batch > 1, under control: the replay drafter proposes the target's own greedy continuation
corrupted at chosen positions, so the accepted length of every verify step of every row is known in advance.

Greedy verification accepts a draft iff it equals the target's argmax, so a corrupted token (the AR token + 1) is
rejected and the clean ones before it are accepted: a schedule of accepted lengths a_s per row fixes where the
corruptions go (the first draft after the a_s clean ones of step s). Rows get different prompt lengths and
different schedules covering every accepted length 0..K; one row stops at EOS and one at max_new_tokens, each
inside a partially accepted block. Everything the decoder reports (tokens, lengths, accepted lengths per step,
τ, per-position acceptance, histogram) is checked against a plain-Python simulation of the schedule, and the
batch-3 run against each prompt run alone. A rollback that keeps a rejected draft or drops an accepted token
changes the target's later logits, so it shows here as a token mismatch and a different accepted sequence.
"""

from typing import NamedTuple

import numpy as np
import pytest

from hdflash_jax.config import get_preset
from hdflash_jax.decode.drafters import ReplayDrafter, ReplayTokens
from hdflash_jax.decode.generate import DecodeSettings, Generator
from hdflash_jax.deepseek_v4.model import init_target

# the 3-layer SWA / CSA / HCA target of tests/test_decode.py (same config, so compiled programs are shared)
MICRO = get_preset("tiny").replace(n_layers=3, compress_ratios=(0, 4, 8, 0), n_hash_layers=1)
K = 7  # drafts per block (block size 8)
MAX_NEW = 48
PROMPT_LENGTHS = (9, 14, 5)
# accepted lengths per verify step and row; each row covers 0..K in another order (then repeats)
SCHEDULES = ([0, 1, 2, 3, 4, 5, 6, 7, 2, 5, 1],
             [7, 6, 5, 4, 3, 2, 1, 0, 3, 1, 6],
             [3, 0, 7, 1, 5, 2, 6, 4, 0, 2, 1])


class Expected(NamedTuple):
    tokens: list[int]  # emitted tokens (EOS included)
    accepted: list[int]  # accepted drafts per verify step
    corrupt: list[int]  # output indices whose draft is corrupted
    stop_inside: bool  # the last step emitted fewer tokens than it produced (a + 1), and it was partial (a < K)


def simulate(ar: list[int], schedule: list[int], max_new: int, eos: int | None) -> Expected:
    """What greedy speculative decoding must do with a drafter corrupted at the schedule's positions.

    `ar` is the target's greedy continuation (long enough). The step anchored at output index i proposes
    outputs i+1..i+K; accepting a of them emits outputs i+1..i+a+1 (the last one is the bonus) and anchors the
    next step at i+a+1. Emission stops after EOS or max_new tokens.
    """
    out = [ar[0]]
    accepted, corrupt, i, s = [], [], 0, 0
    stop_inside = False
    done = ar[0] == eos or max_new == 1
    while not done:
        a = schedule[s % len(schedule)]
        s += 1
        accepted.append(a)
        if a < K:
            corrupt.append(i + a + 1)
        step = ar[i + 1: i + a + 2]
        for j, t in enumerate(step):
            out.append(t)
            if t == eos or len(out) == max_new:
                done = True
                stop_inside = a < K and j < len(step) - 1
                break
        i += a + 1
    return Expected(out, accepted, corrupt, stop_inside)


def corrupted_reference(prompts, ar_tokens, corrupt, vocab, length):
    """Prompt + the AR continuation per row, with token + 1 at the corrupted output indices."""
    ref = np.zeros((len(prompts), length), np.int32)
    for r, p in enumerate(prompts):
        cont = np.array(ar_tokens[r], np.int64)
        for i in corrupt[r]:
            cont[i] = (cont[i] + 1) % vocab
        row = list(p) + cont.tolist()
        ref[r, : len(row)] = row
    return ref


@pytest.fixture(scope="module")
def target():
    return init_target(MICRO, seed=1)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.RandomState(0)
    return [rng.randint(2, MICRO.vocab_size, n).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def ar_long(target, prompts):
    """Greedy AR well past the budget (the drafts of the last step reach K + 1 past it)."""
    res = Generator(target, settings=DecodeSettings(max_new_tokens=MAX_NEW + K + 2)).generate(prompts)
    return [res.row_tokens(r) for r in range(len(prompts))]


@pytest.fixture(scope="module")
def plan(ar_long):
    """EOS: a token of row 0 that stops it inside a partial block, after its schedule covered 0..K, and that no
    other row meets before its own end."""
    no_eos = [simulate(ar_long[r], SCHEDULES[r], MAX_NEW, None) for r in range(3)]
    for cand in dict.fromkeys(ar_long[0][10:MAX_NEW]):
        exp = [simulate(ar_long[r], SCHEDULES[r], MAX_NEW, cand) for r in range(3)]
        if (exp[0].stop_inside and exp[0].tokens[-1] == cand and len(exp[0].tokens) < MAX_NEW
                and set(exp[0].accepted) == set(range(K + 1)) and exp[1:] == no_eos[1:]):
            return cand, exp
    raise AssertionError("no EOS candidate stops row 0 inside a partial block; change the schedule")


def _check_row(res, row, exp: Expected, ar_row):
    assert res.row_tokens(row) == exp.tokens == ar_row[: len(exp.tokens)]
    assert res.lengths[row] == len(exp.tokens) and (res.tokens[row, len(exp.tokens):] == -1).all()
    log = res.accepted[:, row]
    assert log[log >= 0].tolist() == exp.accepted and res.steps[row] == len(exp.accepted)


def test_partial_acceptance_batch3_equals_ar_and_the_schedule(target, prompts, ar_long, plan):
    eos, exp = plan
    ref = corrupted_reference(prompts, ar_long, [e.corrupt for e in exp], MICRO.vocab_size, 128)
    settings = DecodeSettings(max_new_tokens=MAX_NEW, eos_token_id=eos)
    res = Generator(target, ReplayDrafter(K), ReplayTokens(ref), settings=settings).generate(prompts)
    for r in range(3):
        _check_row(res, r, exp[r], ar_long[r])
    # row 0 stops at EOS inside a partial block, row 1 at max_new_tokens inside a partial block
    assert exp[0].tokens[-1] == eos and exp[0].stop_inside and len(exp[0].tokens) < MAX_NEW
    assert len(exp[1].tokens) == MAX_NEW and exp[1].stop_inside
    # every accepted length 0..K occurs in every row
    for e in exp:
        assert set(e.accepted) == set(range(K + 1)), e.accepted
    # τ, per-position acceptance and histogram: exactly the schedule's
    all_acc = np.concatenate([np.array(e.accepted) for e in exp])
    stats = res.stats
    hist = np.bincount(all_acc, minlength=K + 1)
    print(f"\naccepted-length histogram (batch 3, K={K}): {hist.tolist()}  tau={stats.tau:.6f}")
    assert list(stats.accepted_hist) == hist.tolist() and stats.steps == len(all_acc)
    assert stats.tau == pytest.approx(float(np.mean(all_acc + 1)), abs=1e-12)
    assert np.allclose(stats.accept_rate_by_position, [(all_acc >= j).mean() for j in range(1, K + 1)], atol=1e-12)
    assert stats.tau == pytest.approx(1 + sum(stats.accept_rate_by_position), abs=1e-12)


def test_partial_acceptance_each_prompt_alone_equals_batch3(target, prompts, ar_long, plan):
    """Rows advance independently: each prompt alone (batch 1, its own schedule) gives the batch-3 row."""
    eos, exp = plan
    settings = DecodeSettings(max_new_tokens=MAX_NEW, eos_token_id=eos)
    ref = corrupted_reference(prompts, ar_long, [e.corrupt for e in exp], MICRO.vocab_size, 128)
    g = Generator(target, ReplayDrafter(K), ReplayTokens(ref[:1]), settings=settings)
    for r in range(3):
        g.set_drafter_modules(ReplayTokens(ref[r: r + 1]))  # the reference is explicit state: no recompile
        res = g.generate([prompts[r]])
        _check_row(res, 0, exp[r], ar_long[r])
    assert g.compile_count == 1  # one batch-1 program for the three prompts (one bucket)
