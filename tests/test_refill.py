"""Continuous refill: a generate program works through a queue of prompts with fewer rows than prompts, each row
taking the next prompt as it finishes one (`decode.generate`). For every registered family (the toy family of
tests/toy_family.py included, whose state the decoder resets without knowing it):

* greedy: each prompt's tokens and its accepted length at every step are the same refilled (2 rows), all at once
  (one row per prompt) and alone — the reset of a reused row leaves nothing of the prompt before it;
* T = 1: each prompt's tokens are the same alone, batched and refilled (its randomness is its own);
* the program's counters: no row sits free while prompts are queued; rows drain only at the end.

Negative controls: a row reused without resetting the drafter's state accepts other drafts; keys per row instead of
per prompt make a prompt's samples depend on its neighbours. The target has layers under scan (stacked caches: the
reset finds each leaf's row axis)."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import toy_family  # noqa: F401 — registers "toy-bigram"
from hdflash_jax.config import get_preset
from hdflash_jax.decode import generate as gen
from hdflash_jax.decode.drafters import ReplayTokens
from hdflash_jax.decode.generate import DecodeSettings, Generator
from hdflash_jax.deepseek_v4.cache import layer_plan
from hdflash_jax.deepseek_v4.model import init_target
from hdflash_jax.families import families, family, register, unregister

TCFG = get_preset("tiny", n_layers=5, n_hash_layers=1, compress_ratios=(0, 4, 0, 4, 0, 0))
NAMES = [f.name for f in families()]
PROMPTS = [[5, 9, 23, 7, 41, 3], [17, 2, 88, 60], [8, 8, 1, 30, 12, 77, 5, 2, 9], [44, 3], [61, 20, 19, 5, 5]]
NEW = 10
EOS = 12  # two prompts end early (AR: at their 9th and 5th token): rows free at different steps
BUCKET = 16


def setup_module():
    if "toy-bigram" not in [f.name for f in families()]:  # another module's teardown unregistered it
        register(toy_family.BigramFamily)


def teardown_module():
    unregister("toy-bigram")


@pytest.fixture(scope="module")
def target():
    assert layer_plan(TCFG).n_units > 0  # stacked layer caches: the reset must find the row axis inside them
    return nnx.jit(lambda: init_target(TCFG, seed=3))()


def _settings(temperature=0.0):
    return DecodeSettings(max_new_tokens=NEW, temperature=temperature, eos_token_id=EOS, prompt_buckets=(BUCKET,))


@pytest.fixture(scope="module")
def ar_tokens(target):
    res = Generator(target, settings=_settings()).generate(PROMPTS)
    return [res.row_tokens(r) for r in range(len(PROMPTS))]


def _generator(name, target, ar_tokens, temperature=0.0):
    fam = family(name)
    cfg = fam.example_config(TCFG)
    if fam.config_file:
        modules = fam.init(cfg, target, seed=1)
    elif fam.replays_reference:  # the reference is per queue entry: the prompts in the queue's order
        modules = ReplayTokens.of_answers(PROMPTS, ar_tokens, BUCKET + NEW + 8)
    else:
        modules = fam.decode_modules(cfg)
    return Generator(target, fam.adapter(cfg, fam.num_drafts(cfg, None), temperature), modules,
                     settings=_settings(temperature))


def _per_prompt(res):
    return [(res.row_tokens(r), res.accepted[: res.steps[r], r].tolist()) for r in range(len(res.lengths))]


@pytest.mark.parametrize("name", NAMES)
def test_refilled_rows_give_each_prompt_what_it_gets_alone(name, target, ar_tokens):
    """Greedy: tokens (= AR's) and the accepted length of every step per prompt, refilled on 2 rows = one row per
    prompt = each prompt alone; the refilled run really reused rows, and no row sat free while prompts waited."""
    g = _generator(name, target, ar_tokens)
    together = g.generate(PROMPTS)
    refilled = g.generate(PROMPTS, batch=2)
    assert [t for t, _ in _per_prompt(together)] == ar_tokens, name
    assert _per_prompt(refilled) == _per_prompt(together), name
    if not family(name).replays_reference:  # the replay's reference is the whole queue's
        for r, p in enumerate(PROMPTS):
            assert _per_prompt(g.generate([p]))[0] == _per_prompt(together)[r], (name, r)
    assert refilled.batch == 2 and refilled.idle_row_steps == 0
    steps = together.steps
    assert together.drain_row_steps == int((steps.max() - steps).sum())  # no refill: every row waits for the slowest
    assert refilled.loop_steps * 2 == int(steps.sum()) + refilled.drain_row_steps  # every row-step is work or drain
    assert refilled.drain_row_steps <= steps.max()  # 2 rows: one waits at most for the other's last prompt
    assert len(set(steps.tolist())) > 1  # the prompts took different numbers of steps


def test_control_a_row_reused_without_its_reset(target, ar_tokens, monkeypatch):
    """The comparison sees each reset. A refilled row that keeps the target cache of the prompt before it continues
    that context: its tokens are no longer AR's. One that keeps the drafter's state (the replay's: which reference
    to read) drafts another prompt's continuation: the tokens stay AR's (the acceptance rule is exact) but its
    accepted lengths are no longer its own."""
    together = _per_prompt(_generator("replay", target, ar_tokens).generate(PROMPTS))
    real = gen.put_row
    monkeypatch.setattr(gen, "put_row", lambda batched, row, r, b: batched if "layers" in batched
                        else real(batched, row, r, b))  # the target cache kept
    stale_cache = _per_prompt(_generator("replay", target, ar_tokens).generate(PROMPTS, batch=2))
    assert [t for t, _ in stale_cache] != ar_tokens
    monkeypatch.setattr(gen, "put_row", lambda batched, row, r, b: real(batched, row, r, b) if "layers" in batched
                        else batched)  # the drafter's state kept
    stale_drafter = _per_prompt(_generator("replay", target, ar_tokens).generate(PROMPTS, batch=2))
    assert [t for t, _ in stale_drafter] == ar_tokens
    assert [a for _, a in stale_drafter] != [a for _, a in together]


@pytest.mark.parametrize("name", NAMES)
def test_a_prompt_samples_alike_alone_batched_and_refilled(name, target, ar_tokens):
    """T = 1 with the family's sampled drafts: each prompt's tokens alone = in one batch = refilled on 2 rows (its
    randomness comes from the seed, the prompt and its own steps); another seed gives other tokens."""
    g = _generator(name, target, ar_tokens, temperature=1.0)
    together = g.generate(PROMPTS, seed=5)
    refilled = g.generate(PROMPTS, seed=5, batch=2)
    alone = [g.generate([p], seed=5).row_tokens(0) for p in PROMPTS]
    tokens = [together.row_tokens(r) for r in range(len(PROMPTS))]
    assert [refilled.row_tokens(r) for r in range(len(PROMPTS))] == tokens == alone, name
    other = g.generate(PROMPTS, seed=6)
    assert [other.row_tokens(r) for r in range(len(PROMPTS))] != tokens


def test_control_keys_per_row_make_samples_depend_on_the_batch(target, ar_tokens, monkeypatch):
    """The comparison sees the keys: with one key per position in the call (as a batch-wide key split over rows
    would give) a prompt's samples depend on where it runs."""
    monkeypatch.setattr(gen, "prompt_keys", lambda prompts: np.arange(len(prompts), dtype=np.int32))
    g = _generator("ar", target, ar_tokens, temperature=1.0)
    together = g.generate(PROMPTS, seed=5)
    alone = [g.generate([p], seed=5).row_tokens(0) for p in PROMPTS]
    assert [together.row_tokens(r) for r in range(len(PROMPTS))] != alone


def test_copies_of_one_prompt_sample_apart():
    """Equal prompts in one call get their own keys (k-th copy), so n copies are n samples; the first copy's key is
    the prompt's key alone."""
    keys = gen.prompt_keys([[1, 2], [3], [1, 2], [1, 2]])
    assert len(set(keys.tolist())) == 4
    assert keys[0] == gen.prompt_keys([[1, 2]])[0] and keys[1] == gen.prompt_keys([[3]])[0]


def test_the_host_driven_loop_runs_the_same_steps(target, ar_tokens):
    """`generate_host_loop` (one jitted step and refill per Python iteration: what the while_loop saves, for the
    benchmarks) gives the program's tokens, steps and counters, refilled on 2 rows."""
    g = _generator("mtp", target, ar_tokens)
    a, b = g.generate(PROMPTS, batch=2), g.generate_host_loop(PROMPTS, batch=2)
    assert _per_prompt(a) == _per_prompt(b)
    assert (a.loop_steps, a.idle_row_steps, a.drain_row_steps) == (b.loop_steps, b.idle_row_steps, b.drain_row_steps)
