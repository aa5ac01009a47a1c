"""The generate program's chunked prefill (`DecodeSettings.prefill_chunk`) against one call over the whole bucket:
the same target cache, the same drafter state for every family (what each drafter observed of every prompt
position), the same first token and finiteness flag, and the same greedy output and acceptance.

Prompts of 23, 9 and 20 tokens in a 32-token bucket, chunks of 5: rows end in different chunks (one on a chunk
boundary), compressor windows (m = 4, 8) and the sliding window straddle chunk boundaries, and the last chunk runs
past the bucket (35 > 32; with AR's one new token past the cache's 34 slots too). fp32, highest matmul precision.
"""

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from hdflash_jax.config import DrafterConfig, get_preset
from hdflash_jax.decode import generate as gen
from hdflash_jax.decode.drafters import NoDrafter, ReplayTokens
from hdflash_jax.decode.generate import DecodeSettings, Generator
from hdflash_jax.deepseek_v4.model import init_target
from hdflash_jax.families import family

MICRO = get_preset("tiny").replace(n_layers=3, compress_ratios=(0, 4, 8, 0), n_hash_layers=1)
LENGTHS, BUCKET, CHUNK = (23, 9, 20), 32, 5
# by default one of each kind of drafter state: none (ar), a block drafter's cache, DSpark's ring; the rest slow
FAMILIES = ("ar", "hyperdflash", "dspark") + tuple(pytest.param(n, marks=pytest.mark.slow)
                                                   for n in ("replay", "mtp", "dflash"))


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
    """XLA without most optimisations: about half the compile time; both sides of every comparison are compiled
    alike (as in test_eval_run.py)."""
    prev = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", prev)


@pytest.fixture(scope="module")
def target():
    return nnx.jit(lambda: init_target(MICRO, seed=1))()


def _prompts(seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(2, MICRO.vocab_size, n).tolist() for n in LENGTHS]


def _drafter(name, target):
    """(adapter, modules) of a family, untrained (the state comparison needs no skill)."""
    if name == "dflash":
        dcfg = DrafterConfig.for_target(MICRO, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, inter_dim=64,
                                        block_size=4, conditioning="layers", reducer="linear",
                                        target_layer_ids=(0, 1, 2))
        fam = family("block")
    else:
        fam = family("block" if name == "hyperdflash" else name)
        dcfg = fam.example_config(MICRO)
    k = fam.num_drafts(dcfg, None)
    if fam.config_file:
        modules = fam.init(dcfg, target, seed=1)
    elif fam.replays_reference:  # any reference will do: the state comparison does not depend on it
        modules = ReplayTokens(np.ones((len(LENGTHS), 64), np.int32))
    else:
        modules = fam.decode_modules(dcfg)
    return fam.adapter(dcfg, k, 0.0), modules


class _Prefill:
    """The generate program's start alone (its LoopState: every row filled from the queue, each prompt prefilled)
    for prompts padded to BUCKET, compiled once."""

    def __init__(self, target, drafter, modules, chunk):
        settings = DecodeSettings(max_new_tokens=2, prompt_buckets=(BUCKET,), prefill_chunk=chunk)  # 1 would free
        # each row at its first token (the next prompt would take it)
        self.g = g = Generator(target, drafter, modules, settings=settings)
        plan = g.plan(LENGTHS)

        def run(tstate, dstate, queue):
            t = nnx.merge(g.tgraph, tstate)
            m = nnx.merge(g.dgraph, dstate) if g.dgraph is not None else None
            return gen._start(t, m, g.drafter, settings, plan, queue, 0)

        self.run = jax.jit(run)

    def __call__(self, prompts):
        queue, _ = self.g.prepare(prompts)
        return self.run(self.g.tstate, self.g.dstate, gen.Queue(*(jnp.asarray(x) for x in queue)))


def _worst(a, b) -> float:
    """Largest difference between two pytrees: relative for floats, 0/inf for integers and bools."""
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape
        if np.issubdtype(x.dtype, np.floating):
            scale = max(np.abs(y).max(initial=0.0), 1e-30)
            worst = max(worst, float(np.abs(x.astype(np.float64) - y).max(initial=0.0) / scale))
        elif not np.array_equal(x, y):
            worst = np.inf
    return worst


@pytest.mark.parametrize("name", FAMILIES)
def test_chunked_prefill_state_equals_one_call(target, name):
    """Target cache, drafter state, first token and finiteness after the prefill: chunks of 5 equal one call over
    the bucket (≤ 1e-5 relative in fp32; integers exact). Negative control: the same comparison against a one-call
    prefill whose row 0 differs in one token of the first chunk finds a difference in the target cache and, for a
    drafter with state, in what it observed — so the comparison sees the first chunk's positions."""
    drafter, modules = _drafter(name, target)
    prompts = _prompts()
    one_call = _Prefill(target, drafter, modules, BUCKET)
    one, chunked = one_call(prompts), _Prefill(target, drafter, modules, CHUNK)(prompts)
    assert np.asarray(one.out.prefill_finite).tolist() == [True] * 3
    assert np.array_equal(one.anchor, chunked.anchor) and np.array_equal(one.out.tokens, chunked.out.tokens)
    assert np.array_equal(one.out.prefill_finite, chunked.out.prefill_finite)
    assert np.asarray(chunked.cache["length"]).tolist() == list(LENGTHS)
    assert _worst(chunked.cache, one.cache) <= 1e-5
    assert _worst(chunked.drafter, one.drafter) <= 1e-5, name

    other = [list(p) for p in prompts]
    other[0][2] = (other[0][2] + 1) % MICRO.vocab_size
    changed = one_call(other)
    assert _worst(chunked.cache, changed.cache) > 1e-3
    if jax.tree.leaves(one.drafter):
        assert _worst(chunked.drafter, changed.drafter) > 1e-3, name


@dataclasses.dataclass(frozen=True)
class _Recorder:
    """A drafter that records what it observes per position: the next token it was handed and the sum of the
    target's streams there (positions it never observed keep -1 and 0)."""
    num_drafts: int = 0
    return_layers: tuple[int, ...] = ()
    sampled: bool = False

    def init_state(self, target, modules, batch, max_len):
        return {"next": jnp.full((batch, max_len), -1, jnp.int32), "feat": jnp.zeros((batch, max_len), jnp.float32),
                "len": jnp.zeros((batch,), jnp.int32)}

    def observe(self, target, modules, state, out, n_valid, next_tokens):
        b, t = next_tokens.shape
        pos = state["len"][:, None] + jnp.arange(t)[None, :]
        pos = jnp.where(jnp.arange(t)[None, :] < n_valid[:, None], pos, state["next"].shape[1])  # dropped
        rows = jnp.arange(b)[:, None]
        feat = out.streams.astype(jnp.float32).sum(axis=(2, 3))
        return {"next": state["next"].at[rows, pos].set(next_tokens, mode="drop"),
                "feat": state["feat"].at[rows, pos].set(feat, mode="drop"), "len": state["len"] + n_valid}

    def propose(self, target, modules, state, anchor, position, key):
        return jnp.zeros((anchor.shape[0], 0), jnp.int32), None, state


def test_the_drafter_observes_every_prompt_position_once_with_the_token_after_it(target):
    """Every prompt position is observed once, in order, with the token that follows it (the next prompt token;
    after the last one, the first generated token) and the target's features there as one call gives them; padding
    is never observed."""
    prompts = _prompts()
    one, chunked = (_Prefill(target, _Recorder(), None, c)(prompts) for c in (BUCKET, CHUNK))
    first = np.asarray(chunked.anchor)
    for r, p in enumerate(prompts):
        n = len(p)
        expect = p[1:] + [int(first[r])]
        assert np.asarray(chunked.drafter["next"][r, :n]).tolist() == expect
        assert (np.asarray(chunked.drafter["next"][r, n:]) == -1).all()
        assert (np.asarray(chunked.drafter["feat"][r, n:]) == 0).all()
        assert (np.asarray(chunked.drafter["feat"][r, :n]) != 0).all()
    assert np.asarray(chunked.drafter["len"]).tolist() == list(LENGTHS)
    assert _worst(chunked.drafter, one.drafter) <= 1e-5


@pytest.mark.parametrize("name", ["ar"] + [pytest.param(n, marks=pytest.mark.slow)
                                           for n in ("mtp", "hyperdflash", "dspark")])
def test_greedy_generate_with_chunked_prefill_equals_one_call(target, name):
    """Greedy output and every step's accepted length: chunks of 5 equal one call; and each prompt alone (one call,
    its own smallest bucket) gives its row of the batch, so padding changes nothing."""
    drafter, modules = _drafter(name, target)
    prompts = _prompts()
    runs = {c: Generator(target, drafter, modules, settings=DecodeSettings(
        max_new_tokens=12, prompt_buckets=(BUCKET,), prefill_chunk=c)).generate(prompts) for c in (BUCKET, CHUNK)}
    one, chunked = runs[BUCKET], runs[CHUNK]
    np.testing.assert_array_equal(chunked.tokens, one.tokens)
    np.testing.assert_array_equal(chunked.accepted, one.accepted)
    assert chunked.lengths.tolist() == [12] * 3 and chunked.prefill_finite.tolist() == [True] * 3
    if name == "ar":
        single = Generator(target, settings=DecodeSettings(max_new_tokens=12, prompt_buckets=(BUCKET,)))
        for r, p in enumerate(prompts):  # alone: no other rows beside it
            assert single.generate([p]).row_tokens(0) == chunked.row_tokens(r)


@pytest.mark.slow
def test_sampled_generate_with_chunked_prefill_equals_one_call(target):
    """Sampling (T = 1, top-p 0.9) from the same seed: the first token is drawn per chunk from the rows that ended
    there, with the one key the one-call prefill uses, so every row draws the same tokens. Control: another seed
    draws others (the tokens are samples, not the greedy ones)."""
    prompts = _prompts()
    runs = {c: Generator(target, settings=DecodeSettings(max_new_tokens=12, temperature=1.0, top_p=0.9,
                                                         prompt_buckets=(BUCKET,), prefill_chunk=c))
            for c in (BUCKET, CHUNK)}
    one, chunked = (runs[c].generate(prompts, seed=5) for c in (BUCKET, CHUNK))
    np.testing.assert_array_equal(chunked.tokens, one.tokens)
    other = runs[CHUNK].generate(prompts, seed=6)
    assert all(other.row_tokens(r) != chunked.row_tokens(r) for r in range(3))


def test_negative_control_a_lost_chunk_changes_the_output(target, monkeypatch):
    """The comparison above sees the prefill: a chunked prefill that lost its first chunk (its tokens zeroed, as a
    wrong slice would) gives other tokens."""
    real = gen.chunked_prefill

    def lossy(model, tokens, prompt_len, cache, chunk, **kw):
        return real(model, tokens.at[:, :chunk].set(0), prompt_len, cache, chunk, **kw)

    prompts = _prompts()
    settings = DecodeSettings(max_new_tokens=12, prompt_buckets=(BUCKET,), prefill_chunk=CHUNK)
    good = Generator(target, settings=settings).generate(prompts)
    monkeypatch.setattr(gen, "chunked_prefill", lossy)
    bad = Generator(target, settings=settings).generate(prompts)
    assert all(bad.row_tokens(r) != good.row_tokens(r) for r in range(3))


def test_non_finite_logits_are_found_in_any_chunk(target):
    """The finiteness check runs per chunk: a NaN that enters at one position of a later chunk is found, for the
    row whose prompt holds it only."""
    model = nnx.jit(lambda: init_target(MICRO, seed=1))()
    bad = 7
    model.embed[...] = model.embed[...].at[bad].set(jnp.nan)  # one token's embedding: NaN from its position on
    prompts = _prompts()
    prompts[0][17] = bad  # row 0 (23 tokens): chunk 3; rows 1 and 2 never see the token
    for chunk in (BUCKET, CHUNK):
        st = _Prefill(model, NoDrafter(), None, chunk)(prompts)
        assert np.asarray(st.out.prefill_finite).tolist() == [False, True, True], chunk
    assert np.asarray(_Prefill(model, NoDrafter(), None, CHUNK)(_prompts()).out.prefill_finite).all()  # the control


def test_prefill_chunk_must_be_positive(target):
    with pytest.raises(ValueError, match="prefill_chunk"):
        Generator(target, settings=DecodeSettings(max_new_tokens=4, prefill_chunk=0))


@pytest.mark.slow
def test_eval_run_on_the_small_model_with_prompts_past_one_chunk(tmp_path):
    """`eval.run --target small` with chunks of 32 tokens (first-turn prompts of 46 to 90 tokens, second turns
    longer, in a 256 bucket: 8 chunks, 2 to 3 of them holding the first turns) writes the same outputs as with the
    default (one call), and the trained drafters' acceptance histograms are the same: they observed the same features
    (they accept many drafts, so a drafter fed wrong features would show)."""
    import json
    from pathlib import Path

    from eval import run as ev

    if not (Path(__file__).resolve().parents[1] / "models" / "small" / "manifest.json").exists():
        pytest.skip("models/small not built")
    argv = ["--target", "small", "--suite", "gsm8k,mt_bench", "--limit", "2", "--max-new-tokens", "24",
            "--method", "ar,mtp3,hyperdflash", "--prompt-buckets", "256", "--quiet"]
    runs = {}
    for chunk in (None, 32):
        out = tmp_path / f"chunk{chunk}"
        assert ev.main(argv + ["--out", str(out)] + (["--prefill-chunk", str(chunk)] if chunk else [])) == 0
        runs[chunk] = ((out / "outputs.jsonl").read_text(), json.loads((out / "results.json").read_text()))
    (one_out, one), (chunked_out, chunked) = runs[None], runs[32]
    assert one["config"]["prefill_chunk"] == 4096 and chunked["config"]["prefill_chunk"] == 32
    assert chunked_out == one_out
    for suite, cells in one["suites"].items():
        for m, cell in cells.items():
            assert chunked["suites"][suite][m]["accepted_hist"] == cell["accepted_hist"], (suite, m)
        assert cells["mtp3"]["tau"] > 2 and cells["hyperdflash"]["tau"] > 1.2, suite
