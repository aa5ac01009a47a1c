"""The on-device speculative decoder: lossless greedy and sampled decoding for every method, batching, EOS and
max_new_tokens inside accepted blocks, no recompilation, clear errors."""

import numpy as np
import pytest
import scipy.stats

import jax
import jax.numpy as jnp

from hdflash_jax import row_keys
from hdflash_jax.config import get_preset
from hdflash_jax.decode import generate as gen
from hdflash_jax.decode.drafters import BlockDrafterAdapter, MTPDrafter, ReplayTokens, ReplayDrafter
from hdflash_jax.decode.generate import DecodePlan, DecodeSettings, Generator
from hdflash_jax.deepseek_v4.model import init_target

# Every attention kind (SWA, CSA with indexer, HCA), hash + routed MoE and the MTP block, in 3 layers.
MICRO = get_preset("tiny").replace(n_layers=3, compress_ratios=(0, 4, 8, 0), n_hash_layers=1)
BLOCK = 8


@pytest.fixture(scope="module")
def target():
    return init_target(MICRO, seed=1)


def _prompts(batch, seed=0):
    rng = np.random.RandomState(seed)
    lengths = [9, 14, 5][:batch]
    return [rng.randint(2, MICRO.vocab_size, n).tolist() for n in lengths]


def _reference(prompts, continuation, length=96):
    """Prompt + the known continuation per row: what the replay drafter proposes."""
    ref = np.zeros((len(prompts), length), np.int32)
    for r, p in enumerate(prompts):
        row = list(p) + list(continuation[r])
        ref[r, : len(row)] = row
    return ref


@pytest.fixture(scope="module")
def ar_runs(target):
    """Greedy AR outputs (long, no EOS) for batch 3 and batch 1: what every method must reproduce."""
    out = {}
    for batch in (3, 1):
        g = Generator(target, settings=DecodeSettings(max_new_tokens=40))
        out[batch] = g.generate(_prompts(batch))
    return out


def _block_drafter(target, conditioning, seed=0, **kw):
    from hdflash_jax.config import DrafterConfig
    from hdflash_jax.drafter.model import init_drafter_from_target

    reducer = "gated" if conditioning == "final_streams" else "linear"
    layer_ids = None if conditioning == "final_streams" else (0, 1, 2)
    dcfg = DrafterConfig.for_target(MICRO, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, inter_dim=64,
                                    block_size=BLOCK, conditioning=conditioning, reducer=reducer,
                                    target_layer_ids=layer_ids, **kw)
    return BlockDrafterAdapter(dcfg, BLOCK - 1), init_drafter_from_target(target, dcfg, seed=seed)


def _drafter(name, target, prompts, ar):
    if name == "hyperdflash":
        return _block_drafter(target, "final_streams")
    if name == "dflash":
        return _block_drafter(target, "layers")
    if name == "mtp":
        return MTPDrafter(3), None
    if name == "oracle":
        return ReplayDrafter(BLOCK - 1), ReplayTokens(_reference(prompts, ar.tokens))
    raise KeyError(name)


@pytest.mark.parametrize("method,batch", [("mtp", 3), ("hyperdflash", 3), ("dflash", 3), ("oracle", 3),
                                          ("hyperdflash", 1), ("oracle", 1)])
def test_greedy_speculative_equals_autoregressive(target, ar_runs, method, batch):
    prompts = _prompts(batch)
    ar = ar_runs[batch]
    drafter, modules = _drafter(method, target, prompts, ar)
    res = Generator(target, drafter, modules, settings=DecodeSettings(max_new_tokens=40)).generate(prompts)
    np.testing.assert_array_equal(res.tokens, ar.tokens)
    assert res.lengths.tolist() == [40] * batch and res.prefill_finite.tolist() == [True] * batch
    if method == "oracle":
        # every draft accepted: τ equals the block size on every step
        assert res.stats.tau == BLOCK and (res.accepted[res.accepted >= 0] == BLOCK - 1).all()
        assert res.steps.tolist() == [5] * batch  # 1 prefill token + ceil(39 / 8) verify steps
    else:
        # τ is the mean of what each step committed, and the steps stop exactly when the budget is reached:
        # 1 prefill token + Σ (a + 1) reaches 40 at the last step and not before (partial acceptance with
        # controlled lengths: tests/test_decode_partial.py)
        for r in range(batch):
            a = res.accepted[:, r][res.accepted[:, r] >= 0]
            assert len(a) == res.steps[r] and 1 + (a[:-1] + 1).sum() < 40 <= 1 + (a + 1).sum()
        valid = res.accepted[res.accepted >= 0]
        assert res.stats.tau == pytest.approx(float(np.mean(valid + 1)), abs=1e-12)
        assert list(res.stats.accepted_hist) == np.bincount(valid, minlength=drafter.num_drafts + 1).tolist()
        print(f"\n{method} batch {batch}: accepted-length histogram {list(res.stats.accepted_hist)}")


def test_greedy_decoding_is_the_same_program_under_either_verify_rule(target, ar_runs):
    """At T = 0 the acceptance rule is argmax matching whatever `verify` says: block verification compiles the
    very same program as token-level (lowered text identical), so greedy output is unchanged bit for bit; it
    equals AR. Control: at T = 1 the two rules are different programs."""
    prompts = _prompts(1)
    drafter, modules = _drafter("hyperdflash", target, prompts, ar_runs[1])

    def program(rule, temperature=0.0):
        settings = DecodeSettings(max_new_tokens=40, temperature=temperature, verify=rule)
        return Generator(target, drafter, modules, settings=settings)

    assert program("token").lower(prompts).as_text() == program("block").lower(prompts).as_text()
    assert program("token", 1.0).lower(prompts).as_text() != program("block", 1.0).lower(prompts).as_text()
    res = program("block").generate(prompts)
    np.testing.assert_array_equal(res.tokens, ar_runs[1].tokens)
    with pytest.raises(ValueError, match="DecodeSettings.verify must be one of token, block"):
        program("tree")


def test_eos_and_max_new_tokens_inside_accepted_blocks(target, ar_runs):
    """With the oracle every step accepts a whole block, so the stop lands mid-block and must cut there."""
    prompts = _prompts(3)
    ar = ar_runs[3]
    eos = int(ar.tokens[0, 11])  # row 0 stops at its 12th token, in the middle of its second block
    first_eos = [int(np.argmax(ar.tokens[r] == eos)) if (ar.tokens[r] == eos).any() else None for r in range(3)]
    drafter, modules = _drafter("oracle", target, prompts, ar)
    res = Generator(target, drafter, modules,
                    settings=DecodeSettings(max_new_tokens=21, eos_token_id=eos)).generate(prompts)
    for r in range(3):
        stop = min(first_eos[r] + 1 if first_eos[r] is not None else 21, 21)
        assert res.lengths[r] == stop
        assert res.row_tokens(r) == ar.tokens[r, :stop].tolist()
        assert (res.tokens[r, stop:] == -1).all()
    assert res.lengths[0] <= 12


def test_no_recompilation_for_a_second_prompt_of_the_same_bucket(target):
    g = Generator(target, ReplayDrafter(3), ReplayTokens(np.ones((3, 64), np.int32)),
                  settings=DecodeSettings(max_new_tokens=6))
    g.generate(_prompts(3, seed=1))
    g.generate(_prompts(3, seed=2))  # other tokens and lengths, same bucket (16) and batch
    assert g.compile_count == 1
    g.generate([[5] * 20, [7] * 3, [9] * 17])  # next bucket: one more program
    assert g.compile_count == 2
    # a new reference of the same shape is new state for the same programs; another structure is refused (the
    # compiled programs hold the drafter's graph)
    g.set_drafter_modules(ReplayTokens(np.full((3, 64), 2, np.int32)))
    g.generate(_prompts(3, seed=3))
    assert g.compile_count == 2
    with pytest.raises(ValueError, match="structure differs"):
        g.set_drafter_modules(_block_drafter(target, "final_streams")[1])


def test_a_step_budget_runs_the_same_program_for_fewer_steps(target, ar_runs):
    """`max_steps` is an argument of the compiled program, not part of its shape: 0 steps is the prefill and
    first token (what eval times a shape's prefill with), 5 steps the first 5 tokens more, both without a
    recompile and equal to the full run's prefix."""
    prompts = _prompts(3)
    g = Generator(target, settings=DecodeSettings(max_new_tokens=40))
    full = g.generate(prompts)
    none = g.generate(prompts, max_steps=0)
    five = g.generate(prompts, max_steps=5)
    assert g.compile_count == 1
    assert none.lengths.tolist() == [1, 1, 1] and none.steps.tolist() == [0, 0, 0]
    assert five.lengths.tolist() == [6, 6, 6] and five.steps.tolist() == [5, 5, 5]
    for r in range(3):
        assert full.row_tokens(r) == ar_runs[3].row_tokens(r)
        assert none.row_tokens(r) == full.row_tokens(r)[:1]
        assert five.row_tokens(r) == full.row_tokens(r)[:6]


def test_block_drafter_sampled_drafts_are_lossless_too(sampling_target):
    """Sampled drafts with their probabilities (standard rejection sampling) against AR."""
    from hdflash_jax.config import DrafterConfig
    from hdflash_jax.drafter.model import init_drafter_from_target

    dcfg = DrafterConfig.for_target(SAMPLING, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, inter_dim=64,
                                    block_size=4)
    settings = DecodeSettings(max_new_tokens=3, temperature=1.0)
    ar = _first_tokens(Generator(sampling_target, settings=settings), seed=11, n_samples=1500)
    drafter = BlockDrafterAdapter(dcfg, 3, sampled=True)
    spec = _first_tokens(Generator(sampling_target, drafter, init_drafter_from_target(sampling_target, dcfg),
                                   settings=settings), seed=12, n_samples=1500)
    p = _chi2_pvalues(ar, spec)
    assert (p > 1e-3).all(), p


def test_clear_errors_before_compiling(target):
    g = Generator(target, settings=DecodeSettings(max_new_tokens=4, prompt_buckets=(16,)))
    # AR: the cache holds the 16-slot bucket, 4 new tokens and one block of 1
    assert g.plan([3, 16]) == DecodePlan(bucket=16, batch=2, max_len=21, queue=2) and g.plan([3], batch=4).shape == (16, 4, 4)
    assert g.plan([3] * 5, batch=2).queue == 8  # refill: the batch doubled until it holds the prompts
    with pytest.raises(ValueError, match="empty prompt"):
        g.generate([[1, 2], []])
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        g.generate([[1] * 17])
    with pytest.raises(ValueError, match="no prompts"):
        g.generate([])
    with pytest.raises(ValueError, match="outside"):
        g.generate([[MICRO.vocab_size]])
    small = init_target(MICRO.replace(max_seq_len=24), seed=0)
    with pytest.raises(ValueError, match="context"):
        Generator(small, settings=DecodeSettings(max_new_tokens=16)).generate([[1, 2, 3]])
    assert g.compile_count == 0
    other = MICRO.replace(dim=48)
    from hdflash_jax.config import DrafterConfig

    with pytest.raises(ValueError, match="another target: dim"):
        Generator(target, BlockDrafterAdapter(DrafterConfig.for_target(other, n_layers=1), 7), settings=g.settings)
    with pytest.raises(ValueError, match="block size must be >= 2"):
        Generator(target, MTPDrafter(0), settings=g.settings)
    with pytest.raises(ValueError, match="no MTP layer"):
        Generator(init_target(MICRO.replace(n_mtp_layers=0, compress_ratios=(0, 4, 8))), MTPDrafter(3),
                  settings=g.settings)


# ---- lossless sampling -------------------------------------------------------------------------------------------

SAMPLING = MICRO.replace(vocab_size=16)
N_SAMPLES = 3000


def _first_tokens(generator, seed, n_tokens=3, n_samples=N_SAMPLES):
    """The first tokens of n_samples independent runs (one batch, one key per row)."""
    res = generator.generate([[3, 5, 7, 2, 9]] * n_samples, seed=seed)
    return res.tokens[:, :n_tokens]


def _biased_accept(key, probs, drafts, draft_probs=None):
    """A classic bug: on rejection resample from p itself instead of the residual (double counts d)."""
    acc = gen_accept_sampled(key, probs, drafts, draft_probs)
    p_a = jnp.take_along_axis(probs, acc.accepted[:, None, None], axis=1)[:, 0]
    bonus = row_keys.categorical(row_keys.fold_in(key, 1), jnp.log(p_a + 1e-38)).astype(drafts.dtype)
    return acc._replace(bonus=bonus)


gen_accept_sampled = gen.accept_sampled


@pytest.fixture(scope="module")
def sampling_target():
    model = init_target(SAMPLING, seed=4)
    model.head.weight[...] = model.head.weight[...] * 8.0  # less uniform distributions: a sharper test
    return model


def _constant_drafter(token):
    """Always proposes `token`: the rejection path carries all the weight, so a wrong residual shows at once."""
    return ReplayDrafter(3), ReplayTokens(np.full((N_SAMPLES, 64), token, np.int32))


def _chi2_pvalues(a, b):
    out = []
    for pos in range(a.shape[1]):
        table = np.stack([np.bincount(a[:, pos], minlength=16), np.bincount(b[:, pos], minlength=16)])
        table = table[:, table.sum(0) > 0]
        out.append(scipy.stats.chi2_contingency(table)[1])
    return np.array(out)


def test_speculative_sampling_is_lossless(sampling_target, monkeypatch):
    """Two-sample chi-square per position: AR vs speculative sampling, each with its own seed (a shared seed
    couples the draws and would make any rule look right)."""
    settings = DecodeSettings(max_new_tokens=3, temperature=1.0)
    ar = _first_tokens(Generator(sampling_target, settings=settings), seed=1)
    const = _first_tokens(Generator(sampling_target, *_constant_drafter(3), settings=settings), seed=3)
    p_ok = _chi2_pvalues(ar, const)
    assert (p_ok > 1e-3).all(), p_ok
    # the same test rejects a deliberately biased acceptance rule
    monkeypatch.setattr(gen, "accept_sampled", _biased_accept)
    biased = _first_tokens(Generator(sampling_target, *_constant_drafter(3), settings=settings), seed=3)
    p_bad = _chi2_pvalues(ar, biased)
    assert p_bad[1:].min() < 1e-6, p_bad


@pytest.mark.slow
def test_mtp_sampling_is_lossless(sampling_target):
    settings = DecodeSettings(max_new_tokens=3, temperature=1.0)
    ar = _first_tokens(Generator(sampling_target, settings=settings), seed=21)
    mtp = _first_tokens(Generator(sampling_target, MTPDrafter(3), settings=settings), seed=22)
    p = _chi2_pvalues(ar, mtp)
    assert (p > 1e-3).all(), p


def test_sampling_is_seeded_and_reproducible(sampling_target):
    g = Generator(sampling_target, settings=DecodeSettings(max_new_tokens=5, temperature=1.0, top_p=0.9))
    a = g.generate([[1, 2, 3]] * 4, seed=7).tokens
    b = g.generate([[1, 2, 3]] * 4, seed=7).tokens
    c = g.generate([[1, 2, 3]] * 4, seed=8).tokens
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
