"""Lossless sampling, checked where a wrong rule would show.

Unit level (no model, many samples in one vectorised call): the nucleus cut of `target_probs` on hand-made
distributions, and `accept_sampled` on hand-made target / draft distributions: the first emitted token must follow
p_0 and, given that drafts 1..j were accepted, the next emitted token must follow p_j, up to and including the
bonus after a fully accepted block; goodness of fit against the exact distributions. Each rule has broken variants
(residual replaced by p, draft probabilities ignored, judged against the wrong position) that the same test rejects.

End to end (the micro target): T = 0.7 and top-p = 0.8, 9 new tokens with blocks of 4 (positions past the first
full block, including its bonus), three different prompts in one batch, against AR sampling with its own seed.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

import jax
import jax.numpy as jnp

from hdflash_jax import row_keys
from hdflash_jax.config import get_preset
from hdflash_jax.decode import generate as gen
from hdflash_jax.decode.verify import accept_sampled, target_probs

# ---- the nucleus cut ----------------------------------------------------------------------------------------


def _nucleus_loop(p: np.ndarray, top_p: float) -> np.ndarray:
    kept, mass = np.zeros_like(p), 0.0
    for i in np.argsort(-p):
        if mass >= top_p:
            break
        kept[i], mass = p[i], mass + p[i]
    return kept / kept.sum()


def test_target_probs_nucleus_on_hand_made_distributions():
    p = np.array([0.05, 0.5, 0.15, 0.3], np.float64)  # sorted: 0.5, 0.3, 0.15, 0.05 (cumulative 0.5, 0.8, 0.95, 1)
    logits = jnp.asarray(np.log(p)[None], jnp.float32)
    cases = {1.0: p, 0.9: [0, 0.5, 0.15, 0.3] / np.float64(0.95), 0.75: [0, 0.5 / 0.8, 0, 0.3 / 0.8],
             0.45: [0, 1.0, 0, 0]}
    for top_p, want in cases.items():
        got = np.asarray(target_probs(logits, 1.0, top_p))[0]
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=f"top_p={top_p}")
    # temperature first, then the cut (against a plain loop: add the largest until the mass reaches top_p)
    pt = np.sqrt(p) / np.sqrt(p).sum()
    np.testing.assert_allclose(np.asarray(target_probs(logits, 2.0))[0], pt, atol=1e-6)
    for top_p in (0.3, 0.6, 0.7, 0.9):
        want = _nucleus_loop(pt, top_p)
        np.testing.assert_allclose(np.asarray(target_probs(logits, 2.0, top_p))[0], want, atol=1e-6)
    assert (_nucleus_loop(pt, 0.7) > 0).sum() == 3 and (_nucleus_loop(pt, 0.6) > 0).sum() == 2
    # rows are cut independently (batch of distributions, vocab order permuted)
    two = jnp.asarray(np.log(np.stack([p, p[::-1]])), jnp.float32)
    got = np.asarray(target_probs(two, 1.0, 0.75))
    np.testing.assert_allclose(got[1], cases[0.75][::-1], atol=1e-6)


# ---- the acceptance rule on hand-made distributions ------------------------------------------------------

V, K, N = 6, 3, 60_000
P = np.array([[.30, .25, .20, .15, .07, .03],  # p_0 .. p_K: the target at the anchor and after each draft
              [.05, .10, .40, .05, .30, .10],
              [.40, .15, .15, .10, .10, .10],
              [.02, .08, .10, .50, .10, .20]])
Q = np.array([[.10, .50, .10, .10, .10, .10],  # q_1 .. q_K: the drafter's distributions
              [.05, .05, .60, .10, .10, .10],
              [.40, .10, .10, .10, .20, .10]])
POINT = np.array([0, 2, 0])  # point-mass drafts


def _biased_residual(key, probs, drafts, draft_probs=None):
    """On rejection resample from p itself instead of the residual (double counts the rejected draft)."""
    acc = accept_sampled(key, probs, drafts, draft_probs)
    p_a = jnp.take_along_axis(probs, acc.accepted[:, None, None], axis=1)[:, 0]
    bonus = row_keys.categorical(row_keys.fold_in(key, 1), jnp.log(p_a + 1e-38))
    return acc._replace(bonus=bonus.astype(drafts.dtype))


def _point_mass_residual(key, probs, drafts, draft_probs=None):
    """Sampled drafts accepted with min(1, p/q) but, on rejection, resampled from p with only d removed (the
    point-mass rule's residual) instead of norm(max(p - q, 0)). (Ignoring q altogether would be no control: the
    point-mass rule is lossless for drafts from any proposal, only less often accepted.)"""
    acc = accept_sampled(key, probs, drafts, draft_probs)
    b, k1, v = probs.shape
    a = acc.accepted
    p_a = jnp.take_along_axis(probs, a[:, None, None], axis=1)[:, 0]
    d_a = jnp.take_along_axis(jnp.concatenate([drafts, drafts[:, :1]], axis=1), a[:, None], axis=1)[:, 0]
    residual = jnp.where((a < k1 - 1)[:, None] & (jnp.arange(v)[None] == d_a[:, None]), 0.0, p_a)
    bonus = row_keys.categorical(row_keys.fold_in(key, 1), jnp.log(residual + 1e-38))
    return acc._replace(bonus=bonus.astype(drafts.dtype))


def _wrong_position(key, probs, drafts, draft_probs=None):
    """Draft d_{i+1} judged by p_{i+1} instead of p_i (an off-by-one in the block positions)."""
    shifted = jnp.concatenate([probs[:, 1:], probs[:, -1:]], axis=1)
    return accept_sampled(key, shifted, drafts, draft_probs)


def _emitted_pvalues(rule, sampled: bool, seed: int) -> np.ndarray:
    """Goodness of fit of emitted token j given drafts 1..j accepted, j = 0..K, against p_j exactly."""
    rng = np.random.default_rng(seed)
    if sampled:
        drafts = np.stack([rng.choice(V, N, p=Q[i]) for i in range(K)], axis=1)
        q = jnp.broadcast_to(jnp.asarray(Q, jnp.float32), (N, K, V))
    else:
        drafts, q = np.broadcast_to(POINT, (N, K)), None
    probs = jnp.broadcast_to(jnp.asarray(P, jnp.float32), (N, K + 1, V))
    acc = jax.jit(rule)(jax.random.key(seed), probs, jnp.asarray(drafts, jnp.int32), q)
    a, bonus = np.asarray(acc.accepted), np.asarray(acc.bonus)
    out = []
    for j in range(K + 1):
        reach = a >= j  # emitted token j exists in this step: drafts 1..j were accepted
        tok = np.where(a[reach] > j, drafts[reach, min(j, K - 1)], bonus[reach])
        counts = np.bincount(tok, minlength=V)
        out.append((scipy.stats.chisquare(counts, P[j] * counts.sum())[1], int(reach.sum())))
    return np.array(out)


@pytest.mark.parametrize("sampled,broken", [(False, _biased_residual), (True, _biased_residual),
                                            (True, _point_mass_residual), (False, _wrong_position),
                                            (True, _wrong_position)])
def test_accept_sampled_emits_the_target_distribution(sampled, broken):
    p_ok, reached = _emitted_pvalues(accept_sampled, sampled, seed=1).T
    p_bad = _emitted_pvalues(broken, sampled, seed=1)[:, 0]
    assert reached.min() > 2000, reached  # every position has samples, the bonus after a full block included
    print(f"\n{'sampled' if sampled else 'point-mass'} drafts, control {broken.__name__}: real rule p = "
          f"{np.array2string(p_ok, precision=3)}, broken rule p = {np.array2string(p_bad, precision=2)}")
    assert (p_ok > 1e-3).all(), p_ok
    assert p_bad.min() < 1e-6, p_bad


# ---- end to end: the micro target, T = 0.7, top-p = 0.8 --------------------------------------------------

SAMPLING = get_preset("tiny").replace(n_layers=3, compress_ratios=(0, 4, 8, 0), n_hash_layers=1, vocab_size=16)
PROMPTS = ([3, 5, 7, 2, 9], [11, 4, 4, 1, 8, 13, 2, 6, 10], [14, 2])
PER_PROMPT = 1000  # default suite; the slow test with the negative control uses 2000
MAX_NEW = 9  # blocks of 4: step 1 emits positions 1..4 (4 is the bonus of a full block), step 2 reaches 5..8
SETTINGS = gen.DecodeSettings(max_new_tokens=MAX_NEW, temperature=0.7, top_p=0.8)


@pytest.fixture(scope="module")
def sampling_target():
    from hdflash_jax.deepseek_v4.model import init_target

    model = init_target(SAMPLING, seed=4)
    model.head.weight[...] = model.head.weight[...] * 8.0  # sharper distributions: drafts get accepted
    return model


def _batch(per_prompt: int = PER_PROMPT):
    return [list(PROMPTS[r % len(PROMPTS)]) for r in range(per_prompt * len(PROMPTS))]


@pytest.fixture(scope="module")
def ar_samples(sampling_target):
    return gen.Generator(sampling_target, settings=SETTINGS).generate(_batch(), seed=101).tokens


def _merge_rare(table: np.ndarray, min_count: int = 20) -> np.ndarray:
    """Pool categories with fewer than `min_count` samples in both runs together into one (chi-square validity)."""
    rare = table.sum(0) < min_count
    merged = np.concatenate([table[:, ~rare], table[:, rare].sum(1, keepdims=True)], axis=1)
    return merged[:, merged.sum(0) > 0]


def _two_sample_pvalues(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per prompt and position: chi-square of AR vs speculative token counts; plus consecutive pairs (3, 4)."""
    out = []
    n_prompts = len(PROMPTS)
    for r in range(n_prompts):
        ra, rb = a[r::n_prompts], b[r::n_prompts]
        cols = [(ra[:, j], rb[:, j]) for j in range(MAX_NEW)]
        cols.append((ra[:, 3] * 16 + ra[:, 4], rb[:, 3] * 16 + rb[:, 4]))  # joint of a full block's end
        for x, y in cols:
            table = np.stack([np.bincount(x, minlength=256), np.bincount(y, minlength=256)])
            table = _merge_rare(table[:, table.sum(0) > 0])
            out.append(1.0 if table.shape[1] < 2 else scipy.stats.chi2_contingency(table)[1])
    return np.array(out)


def _replay_drafter(ar_other: np.ndarray, per_prompt: int = PER_PROMPT):
    """Point-mass drafts: each row replays another AR sample of its own prompt (plausible, often accepted)."""
    from hdflash_jax.decode.drafters import ReplayDrafter, ReplayTokens

    ref = np.zeros((len(ar_other), 64), np.int32)
    for r, p in enumerate(_batch(per_prompt)):
        ref[r, : len(p) + MAX_NEW] = list(p) + ar_other[r].tolist()
    return ReplayDrafter(K), ReplayTokens(ref)


def _replay_run(sampling_target, per_prompt: int, seed: int):
    batch = _batch(per_prompt)
    other = gen.Generator(sampling_target, settings=SETTINGS).generate(batch, seed=seed + 1).tokens
    drafter, modules = _replay_drafter(other, per_prompt)
    res = gen.Generator(sampling_target, drafter, modules, settings=SETTINGS).generate(batch, seed=seed + 2)
    hist = res.stats.accepted_hist
    print(f"\nreplay drafts, T=0.7 top_p=0.8, {per_prompt} per prompt: accepted-length histogram {list(hist)}, "
          f"tau {res.stats.tau:.3f}")
    assert min(hist) > per_prompt // 3, hist  # every accepted length, full blocks (and their bonus) included
    return drafter, modules, res


def test_sampling_lossless_past_the_first_block_batched_prompts_t07_top_p08(sampling_target, ar_samples):
    _, _, res = _replay_run(sampling_target, PER_PROMPT, seed=200)
    p_ok = _two_sample_pvalues(ar_samples, res.tokens)
    print(f"real rule: min p {p_ok.min():.3g} over {p_ok.size} tests")
    assert (p_ok > 1e-4).all(), p_ok  # 30 tests: a per-test 1e-4 keeps the family's false alarms under 0.3 %


@pytest.fixture(scope="module")
def ar_samples_2x(sampling_target):
    """AR at twice the samples: the slow tests, whose negative controls need the power."""
    return gen.Generator(sampling_target, settings=SETTINGS).generate(_batch(2 * PER_PROMPT), seed=111).tokens


@pytest.mark.slow
def test_sampling_end_to_end_rejects_a_biased_rule(sampling_target, ar_samples_2x, monkeypatch):
    """The same comparison at twice the samples, and a biased residual that it rejects."""
    n, ar = 2 * PER_PROMPT, ar_samples_2x
    drafter, modules, res = _replay_run(sampling_target, n, seed=300)
    p_ok = _two_sample_pvalues(ar, res.tokens)
    monkeypatch.setattr(gen, "accept_sampled", _biased_residual)
    bad = gen.Generator(sampling_target, drafter, modules, settings=SETTINGS).generate(_batch(n), seed=302)
    p_bad = _two_sample_pvalues(ar, bad.tokens)
    print(f"real rule: min p {p_ok.min():.3g}; biased residual: min p {p_bad.min():.3g}")
    assert (p_ok > 1e-4).all(), p_ok
    assert p_bad.min() < 1e-6, p_bad


def _sampled_drafter_check(sampling_target, ar_samples, drafter, modules, monkeypatch, name):
    batch = _batch(2 * PER_PROMPT)
    res = gen.Generator(sampling_target, drafter, modules, settings=SETTINGS).generate(batch, seed=404)
    p_ok = _two_sample_pvalues(ar_samples, res.tokens)
    monkeypatch.setattr(gen, "accept_sampled", _point_mass_residual)
    bad = gen.Generator(sampling_target, drafter, modules, settings=SETTINGS).generate(batch, seed=404)
    p_bad = _two_sample_pvalues(ar_samples, bad.tokens)
    print(f"\n{name} sampled drafts: hist {list(res.stats.accepted_hist)}; real rule min p {p_ok.min():.3g}; "
          f"point-mass residual: min p {p_bad.min():.3g}")
    assert (p_ok > 1e-4).all(), p_ok
    assert p_bad.min() < 1e-6, p_bad


@pytest.mark.slow
def test_dflash_sampled_drafts_lossless(sampling_target, ar_samples_2x, monkeypatch):
    from hdflash_jax.config import DrafterConfig
    from hdflash_jax.decode.drafters import BlockDrafterAdapter
    from hdflash_jax.drafter.model import init_drafter_from_target

    dcfg = DrafterConfig.for_target(SAMPLING, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, inter_dim=64,
                                    block_size=K + 1, conditioning="layers", reducer="linear",
                                    target_layer_ids=(0, 1, 2))
    drafter = BlockDrafterAdapter(dcfg, K, sampled=True, temperature=0.7, top_p=SETTINGS.top_p)
    _sampled_drafter_check(sampling_target, ar_samples_2x, drafter, init_drafter_from_target(sampling_target, dcfg),
                           monkeypatch, "DFlash")


@pytest.mark.slow
def test_mtp_sampled_drafts_lossless(sampling_target, ar_samples_2x, monkeypatch):
    from hdflash_jax.decode.drafters import MTPDrafter

    _sampled_drafter_check(sampling_target, ar_samples_2x, MTPDrafter(K, sampled=True, temperature=0.7,
                                                                      top_p=SETTINGS.top_p), None, monkeypatch, "MTP")


# ---- sampled drafts come from the run's nucleus (every family through the registry) --------------------------

def _capture_drafts(monkeypatch):
    """Record the drafts and their probabilities that reach the acceptance rule at every step of a run."""
    seen = []
    rule = gen.accept_sampled

    def recording(key, probs, drafts, draft_probs=None):
        if draft_probs is not None:
            jax.debug.callback(lambda d, q: seen.append((np.asarray(d), np.asarray(q))), drafts, draft_probs)
        return rule(key, probs, drafts, draft_probs)

    monkeypatch.setattr(gen, "accept_sampled", recording)
    return seen


def _mtp_via_registry(top_p: float):
    from hdflash_jax.families import family
    from hdflash_jax.families.mtp import MTPConfig

    return family("mtp").adapter(MTPConfig(K), K, SETTINGS.temperature, top_p)


def test_mtp_sampled_drafts_honour_top_p_and_stay_lossless(sampling_target, ar_samples, monkeypatch):
    """The registry hands the run's top-p to MTP's adapter: every draft's proposal is cut to the nucleus (tokens
    outside it have probability 0, and no draft is one of them), and the run stays lossless against AR. Control:
    at top-p 1 the same capture sees no cut (what MTP's drafts looked like at every top-p before)."""
    seen = _capture_drafts(monkeypatch)
    res = gen.Generator(sampling_target, _mtp_via_registry(SETTINGS.top_p), settings=SETTINGS).generate(
        _batch(PER_PROMPT // 4), seed=700)  # the slow tests' MTP / DFlash / DSpark runs at top-p have the power
    drafts = np.concatenate([d.reshape(-1) for d, _ in seen])
    q = np.concatenate([x.reshape(-1, x.shape[-1]) for _, x in seen])
    q_d = np.take_along_axis(q, drafts[:, None], axis=1)[:, 0]
    cut = (q == 0).sum(-1)
    p_ok = _two_sample_pvalues(ar_samples, res.tokens)
    print(f"\nMTP drafts at top-p {SETTINGS.top_p}: {len(drafts)} proposals, tokens cut per proposal "
          f"{cut.mean():.2f} of {q.shape[-1]}, min q(draft) {q_d.min():.3g}; min p {p_ok.min():.3g}")
    assert (cut > 0).mean() > 0.9 and (q_d > 0).all()
    np.testing.assert_allclose(q.sum(-1), 1.0, atol=1e-5)
    assert (p_ok > 1e-4).all(), p_ok
    seen.clear()
    gen.Generator(sampling_target, _mtp_via_registry(1.0), settings=SETTINGS).generate(_batch(2), seed=701)
    assert seen and all((x > 0).all() for _, x in seen)


# ---- block verification end to end (`DecodeSettings.verify="block"`; exact checks: tests/test_block_verify.py) ----

BLOCK_SETTINGS = gen.DecodeSettings(max_new_tokens=MAX_NEW, temperature=0.7, top_p=0.8, verify="block")


def _self_drafter():
    """Sampled drafts with q ≠ p that are often accepted (full blocks too): the target itself sampled at T = 1 with
    no nucleus, judged at T = 0.7, top-p 0.8 — where block and token-level verification differ."""
    from hdflash_jax.decode.drafters import TargetSampleDrafter

    return TargetSampleDrafter(K, sampled=True, temperature=1.0)


def _block_run(sampling_target, per_prompt: int, seed: int, settings=BLOCK_SETTINGS):
    return gen.Generator(sampling_target, _self_drafter(), settings=settings).generate(_batch(per_prompt), seed=seed)


def test_block_verification_lossless_with_sampled_drafts_t07_top_p08(sampling_target, ar_samples):
    """Block verification of sampled drafts, three prompts in one batch, against AR: the per-position two-sample χ²
    of the token-level test (half the rows of AR's sample, for the default suite's time; the slow test has the power
    and the negative control)."""
    res = _block_run(sampling_target, PER_PROMPT // 2, seed=500)
    p_ok = _two_sample_pvalues(ar_samples, res.tokens)
    print(f"\nblock verification, sampled drafts: hist {list(res.stats.accepted_hist)}, tau {res.stats.tau:.3f}; "
          f"min p {p_ok.min():.3g} over {p_ok.size} tests")
    assert min(res.stats.accepted_hist) > PER_PROMPT // 6, res.stats.accepted_hist  # every length, full blocks too
    assert (p_ok > 1e-4).all(), p_ok


@pytest.mark.slow
def test_block_verification_end_to_end_rejects_a_biased_block_rule(sampling_target, ar_samples_2x, monkeypatch):
    """Twice the samples; keeping the first passing prefix instead of the longest is rejected by the same test."""
    from test_block_verify import first_kept_prefix

    n = 2 * PER_PROMPT
    res = _block_run(sampling_target, n, seed=600)
    p_ok = _two_sample_pvalues(ar_samples_2x, res.tokens)
    monkeypatch.setattr(gen, "accept_block", first_kept_prefix)
    bad = _block_run(sampling_target, n, seed=600)
    p_bad = _two_sample_pvalues(ar_samples_2x, bad.tokens)
    print(f"\nblock: tau {res.stats.tau:.3f}, min p {p_ok.min():.3g}; first kept prefix: tau {bad.stats.tau:.3f}, "
          f"min p {p_bad.min():.3g}")
    assert (p_ok > 1e-4).all(), p_ok
    assert p_bad.min() < 1e-6, p_bad


# ---- DSpark's confidence schedule at T > 0 (the rule's exactness under cuts: tests/test_block_verify.py) -----------

def _dspark_with_head(sampling_target):
    import jax.numpy as jnp

    from hdflash_jax.decode.dspark_drafter import DSparkDrafterAdapter
    from hdflash_jax.dspark.config import DSparkConfig
    from hdflash_jax.dspark.model import init_dspark_from_target

    v = SAMPLING.vocab_size
    dcfg = DSparkConfig(block_size=K, noise_token_id=v - 1, target_layer_ids=(1, 2), markov_rank=v,
                        n_routed_experts=4, n_activated_experts=2)
    modules = init_dspark_from_target(sampling_target, dcfg, seed=5)
    modules.markov_head.markov_w1.weight[...] = jnp.eye(v, dtype=jnp.float32)  # proposals that are often accepted
    modules.markov_head.markov_w2.weight[...] = 3.0 * jnp.eye(v, dtype=jnp.float32)
    return DSparkDrafterAdapter(dcfg, K, sampled=True, temperature=0.7, top_p=0.8), modules


# the head's confidences pick width 3 of 4 here (2 of 3 drafts judged: the cut is exercised). Rows share one width
# per step and 3000 rows make it the same every step; per-row widths that depend on earlier drafts are checked
# exactly in tests/test_block_verify.py
SCHEDULE_COSTS = tuple(1.0 + 0.1 * w for w in range(K + 1))


def _scheduled_run(sampling_target, per_prompt: int, seed: int, verify: str = "token"):
    drafter, modules = _dspark_with_head(sampling_target)
    settings = gen.DecodeSettings(max_new_tokens=MAX_NEW, temperature=0.7, top_p=0.8, verify=verify,
                                  confidence_schedule=SCHEDULE_COSTS)
    return gen.Generator(sampling_target, drafter, modules, settings=settings).generate(_batch(per_prompt), seed=seed)


def _stale_q_at_the_cut(key, probs, drafts, draft_probs=None, n_verify=None):
    """A schedule bug: the token after a fully accepted cut prefix drawn from norm(max(p − q, 0)) with the q of the
    draft that was cut off (as if it had been judged and rejected) instead of from p."""
    acc = accept_sampled(key, probs, drafts, draft_probs, n_verify=n_verify)
    b, k1, v = probs.shape
    at_cut = (acc.accepted == n_verify) & (acc.accepted < k1 - 1)
    idx = jnp.minimum(acc.accepted, k1 - 2)[:, None, None]
    res = jnp.maximum(jnp.take_along_axis(probs, idx, 1)[:, 0] - jnp.take_along_axis(draft_probs, idx, 1)[:, 0], 0)
    stale = row_keys.categorical(row_keys.fold_in(key, 7), jnp.log(res + 1e-38)).astype(drafts.dtype)
    return acc._replace(bonus=jnp.where(at_cut, stale, acc.bonus))


@pytest.mark.slow
@pytest.mark.parametrize("verify", ["token", "block"])
def test_confidence_schedule_lossless_t07_top_p08(sampling_target, ar_samples, verify):
    """Sampled DSpark drafts cut by the confidence schedule (a width short of the block), three prompts in one
    batch, against AR (half AR's rows; the other slow test has the control)."""
    res = _scheduled_run(sampling_target, PER_PROMPT // 2, seed=800, verify=verify)
    p_ok = _two_sample_pvalues(ar_samples, res.tokens)
    print(f"\nscheduled DSpark ({verify}): widths {res.width_hist()}, hist {list(res.stats.accepted_hist)}, "
          f"tau {res.stats.tau:.3f}; min p {p_ok.min():.3g}")
    assert sum(res.width_hist()[:-1]) > 0  # the schedule cut blocks
    assert (p_ok > 1e-4).all(), p_ok


@pytest.mark.slow
def test_confidence_schedule_end_to_end_rejects_a_stale_q_at_the_cut(sampling_target, ar_samples_2x, monkeypatch):
    """The control: a rule that draws the token after a fully accepted cut prefix from the cut draft's residual
    (as if it had been judged) fails the same comparison the scheduled run passes."""
    res = _scheduled_run(sampling_target, 2 * PER_PROMPT, seed=900)
    p_ok = _two_sample_pvalues(ar_samples_2x, res.tokens)
    assert sum(res.width_hist()[:-1]) > 0
    monkeypatch.setattr(gen, "accept_sampled", _stale_q_at_the_cut)
    bad = _scheduled_run(sampling_target, 2 * PER_PROMPT, seed=900)
    p_bad = _two_sample_pvalues(ar_samples_2x, bad.tokens)
    print(f"\nscheduled DSpark: min p {p_ok.min():.3g}; stale q at the cut: min p {p_bad.min():.3g}")
    assert (p_ok > 1e-4).all(), p_ok
    assert p_bad.min() < 1e-6, p_bad
