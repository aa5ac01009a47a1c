"""Block verification (Sun et al. 2024; `verify.accept_block`), checked exactly and by sampling.

Hand-made targets and drafters on a small vocabulary (V = 3, K = 3 drafts) whose distributions depend on the whole
prefix, as a real model's do: P[prefix] is the target's next-token distribution, Q[prefix] the drafter's. Every
draft block of V^K is one row of a batch, so `block_verdict` gives each block's stop probabilities and residuals
and the output distribution is computed exactly by enumeration:

* lossless: the emitted tokens (kept drafts, then the bonus), continued by the target up to K + 1 tokens, follow
  the target's joint distribution over V^(K+1) to float32 precision, for sampled drafts (with q) and point-mass
  drafts; three broken verdicts (no w in the residual, no 1 − w in the stop probability, the token-level
  residual's w taken from the wrong prefix) are off by far more;
* never shorter: the expected accepted length is >= token-level verification's (computed exactly from min(1, p/q))
  for random P and Q of several sharpnesses, strictly greater on average for sampled drafts, equal for point
  masses (both reach the bound Π p(d));
* the sampler: `accept_block` on 60,000 blocks drawn from Q, continued by the target, fits the exact joint (χ²
  over the 81 sequences) and its accepted lengths fit the exact P(τ = i); a rule that keeps the first kept prefix
  instead of the longest fails both.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from hdflash_jax.decode.verify import (Acceptance, BlockVerdict, accept_block, accept_greedy, accept_sampled,
                                      block_verdict)

V, K = 3, 3
DRAFTS = np.array(list(itertools.product(range(V), repeat=K)), np.int64)  # every draft block: [V^K, K]


def _tables(seed: int, sharpness: float = 0.5, point_mass: bool = False):
    """P[prefix], Q[prefix] for every prefix of length 0..K (a dict of tuple → [V] float64)."""
    rng = np.random.default_rng(seed)
    P, Q = {}, {}
    for n in range(K + 1):
        for pre in itertools.product(range(V), repeat=n):
            P[pre] = rng.dirichlet(np.full(V, sharpness))
            Q[pre] = np.eye(V)[rng.integers(V)] if point_mass else rng.dirichlet(np.full(V, sharpness))
    return P, Q


def _rows(P, Q, drafts):
    """The batch the verifier sees: probs [N, K+1, V] along each draft path, q [N, K, V]."""
    probs = np.array([[P[tuple(d[:i])] for i in range(K + 1)] for d in drafts])
    q = np.array([[Q[tuple(d[:i])] for i in range(K)] for d in drafts])
    return probs, q


def _draft_prob(Q, d) -> float:
    return float(np.prod([Q[tuple(d[:i])][d[i]] for i in range(K)]))


def _target_joint(P) -> dict:
    return {s: float(np.prod([P[s[:i]][s[i]] for i in range(K + 1)]))
            for s in itertools.product(range(V), repeat=K + 1)}


def _continue(P, seq: tuple, mass: float, out: dict) -> None:
    """Add `mass` to the joint of `seq` continued by the target up to K + 1 tokens."""
    if len(seq) == K + 1:
        out[seq] = out.get(seq, 0.0) + mass
        return
    for z in range(V):
        _continue(P, seq + (z,), mass * P[seq][z], out)


def _exact(P, Q, verdict_fn, point_mass: bool):
    """(joint of the emitted tokens continued by the target, E[accepted]) of a verdict, by enumeration."""
    probs, q = _rows(P, Q, DRAFTS)
    v = verdict_fn(jnp.asarray(probs, jnp.float32), jnp.asarray(DRAFTS, jnp.int32),
                   None if point_mass else jnp.asarray(q, jnp.float32))
    stop, residual = np.asarray(v.stop, np.float64), np.asarray(v.residual, np.float64)
    joint, mean_tau = {}, 0.0
    for r, d in enumerate(DRAFTS):
        weight = _draft_prob(Q, d)
        if weight == 0:
            continue
        for t in range(K + 1):  # τ = t: h_t, and no longer prefix kept
            p_t = stop[r, t] * np.prod(1.0 - stop[r, t + 1:])
            mean_tau += weight * p_t * t
            res = residual[r, t] / residual[r, t].sum() if residual[r, t].sum() > 0 else probs[r, t]
            for y in range(V):
                _continue(P, tuple(d[:t]) + (y,), weight * p_t * res[y], joint)
    return joint, mean_tau


def _token_level_mean(P, Q) -> float:
    """E[accepted] of token-level verification: Σ_i Π_{j<=i} min(1, p/q) along each draft path."""
    total = 0.0
    for d in DRAFTS:
        w = _draft_prob(Q, d)
        if w == 0:
            continue
        ratios = [min(1.0, P[tuple(d[:i])][d[i]] / Q[tuple(d[:i])][d[i]]) for i in range(K)]
        total += w * float(np.sum(np.cumprod(ratios)))
    return total


def _tv(joint: dict, target: dict) -> float:
    return 0.5 * sum(abs(joint.get(s, 0.0) - p) for s, p in target.items())


# ---- broken verdicts: each changes one term of the rule ------------------------------------------------------

def _no_w_in_residual(probs, drafts, draft_probs=None):
    """The token-level residual max(p − q, 0) after the kept prefix, instead of max(w p − q, 0)."""
    v = block_verdict(probs, drafts, draft_probs)
    k = drafts.shape[1]
    q = jax.nn.one_hot(drafts, probs.shape[-1]) if draft_probs is None else draft_probs
    return v._replace(residual=v.residual.at[:, :k].set(jnp.maximum(probs[:, :k] - q, 0.0)))


def _stop_without_one_minus_w(probs, drafts, draft_probs=None):
    """h_i = r_i / r_i (1 wherever a residual exists): forgets the mass 1 − w_i still owed to longer prefixes."""
    v = block_verdict(probs, drafts, draft_probs)
    r = jnp.sum(v.residual, axis=-1)
    return v._replace(stop=v.stop.at[:, 1:-1].set(jnp.where(r[:, 1:-1] > 0, 1.0, 0.0)))


def _shifted_stop(probs, drafts, draft_probs=None):
    """h judged one prefix late (h_{i+1} used for prefix i): an off-by-one in the block positions."""
    v = block_verdict(probs, drafts, draft_probs)
    return v._replace(stop=v.stop.at[:, 1:-1].set(v.stop[:, 2:]))


@pytest.mark.parametrize("point_mass", [False, True])
def test_block_verification_is_exactly_lossless(point_mass):
    errors = []
    for seed in range(3):
        P, Q = _tables(seed, point_mass=point_mass)
        target = _target_joint(P)
        joint, _ = _exact(P, Q, block_verdict, point_mass)
        errors.append(_tv(joint, target))
        assert sum(joint.values()) == pytest.approx(1.0, abs=1e-6)
    bad = {f.__name__: max(_tv(_exact(*_tables(s, point_mass=point_mass), f, point_mass)[0],
                               _target_joint(_tables(s, point_mass=point_mass)[0])) for s in range(3))
           for f in (_no_w_in_residual, _stop_without_one_minus_w, _shifted_stop)}
    print(f"\n{'point-mass' if point_mass else 'sampled'} drafts: TV to the target's joint {max(errors):.2e}; "
          f"broken verdicts: " + ", ".join(f"{k} {v:.3f}" for k, v in bad.items()))
    assert max(errors) < 1e-6, errors  # float32 verdicts
    if point_mass:  # with q one-hot, w p − q and p − q have the same normalised positive part: no control there
        bad.pop("_no_w_in_residual")
    assert min(bad.values()) > 1e-3, bad  # >= 1000x the real rule's float32 error (the smallest: 7.6e-3)


def test_block_accepts_no_fewer_than_token_level_in_expectation():
    gains = {False: [], True: []}
    for point_mass in (False, True):
        for seed in range(12):
            P, Q = _tables(100 + seed, sharpness=(0.3, 1.0, 3.0)[seed % 3], point_mass=point_mass)
            _, block = _exact(P, Q, block_verdict, point_mass)
            gains[point_mass].append(block - _token_level_mean(P, Q))
    sampled, point = np.array(gains[False]), np.array(gains[True])
    print(f"\nE[accepted] block − token: sampled drafts min {sampled.min():.4f} mean {sampled.mean():.4f} "
          f"max {sampled.max():.4f}; point-mass drafts max |diff| {np.abs(point).max():.1e}")
    assert sampled.min() > -1e-6 and sampled.mean() > 0.01, sampled
    assert np.abs(point).max() < 1e-6, point


def first_kept_prefix(key, probs, drafts, draft_probs=None):
    """Keeps the first prefix whose η passes instead of the longest (a plausible misreading of the rule)."""
    b, k1, _ = probs.shape
    v = block_verdict(probs, drafts, draft_probs)
    kept = jax.random.uniform(jax.random.split(key)[0], (b, k1 - 1)) < v.stop[:, 1:]
    a = jnp.where(jnp.any(kept, axis=1), jnp.argmax(kept, axis=1) + 1, 0).astype(jnp.int32)
    res = jnp.take_along_axis(v.residual, a[:, None, None], axis=1)[:, 0]
    bonus = jax.random.categorical(jax.random.split(key)[1], jnp.log(res / res.sum(-1, keepdims=True) + 1e-38))
    return Acceptance(a, bonus.astype(drafts.dtype))


N = 60_000


def _sampled_sequences(P, Q, rule, seed: int, traced: bool = True):
    """N blocks drawn from Q, judged by `rule` (jitted unless not `traced`), continued by the target: ([N, K+1]
    sequences, [N] accepted)."""
    rng = np.random.default_rng(seed)
    codes = rng.choice(len(DRAFTS), N, p=[_draft_prob(Q, d) for d in DRAFTS])
    drafts = DRAFTS[codes]
    probs, q = _rows(P, Q, DRAFTS)
    acc = (jax.jit(rule) if traced else rule)(jax.random.key(seed), jnp.asarray(probs[codes], jnp.float32),
                                              jnp.asarray(drafts, jnp.int32), jnp.asarray(q[codes], jnp.float32))
    a, bonus = np.asarray(acc.accepted), np.asarray(acc.bonus)
    seqs = np.full((N, K + 1), -1, np.int64)
    for r in range(N):
        seqs[r, : a[r] + 1] = list(drafts[r, : a[r]]) + [bonus[r]]
    for j in range(1, K + 1):  # the target continues every row past its emitted tokens
        todo = np.flatnonzero(seqs[:, j] < 0)
        for pre in {tuple(x) for x in seqs[todo, :j]}:
            rows = todo[(seqs[todo, :j] == pre).all(axis=1)]
            seqs[rows, j] = rng.choice(V, len(rows), p=P[pre])
    return seqs, a


def _sequence_pvalue(P, seqs) -> float:
    """χ² goodness of fit of [N, K+1] sequences against the target's exact joint over V^(K+1)."""
    target = _target_joint(P)
    cells = list(target)
    index = {s: i for i, s in enumerate(cells)}
    counts = np.bincount([index[tuple(s)] for s in seqs], minlength=len(cells))
    return scipy.stats.chisquare(counts, np.array([target[s] for s in cells]) * len(seqs))[1]


def _fit(P, Q, rule, seed: int) -> tuple[float, float]:
    """χ² p-values: the sequences against the target's joint, the accepted lengths against block's exact P(τ)."""
    seqs, a = _sampled_sequences(P, Q, rule, seed)
    p_seq = _sequence_pvalue(P, seqs)
    probs, q = _rows(P, Q, DRAFTS)
    v = block_verdict(jnp.asarray(probs, jnp.float32), jnp.asarray(DRAFTS, jnp.int32), jnp.asarray(q, jnp.float32))
    stop = np.asarray(v.stop, np.float64)
    tau = np.zeros(K + 1)
    for r, d in enumerate(DRAFTS):
        for t in range(K + 1):
            tau[t] += _draft_prob(Q, d) * stop[r, t] * np.prod(1.0 - stop[r, t + 1:])
    p_tau = scipy.stats.chisquare(np.bincount(a, minlength=K + 1), tau / tau.sum() * N)[1]
    return p_seq, p_tau


def test_accept_block_samples_the_target_and_the_exact_accepted_lengths():
    P, Q = _tables(7)
    ok = _fit(P, Q, accept_block, seed=1)
    bad = _fit(P, Q, first_kept_prefix, seed=1)
    print(f"\naccept_block: sequences p = {ok[0]:.3g}, accepted lengths p = {ok[1]:.3g}; "
          f"first kept prefix: {bad[0]:.2g}, {bad[1]:.2g}")
    assert min(ok) > 1e-4, ok
    assert max(bad) < 1e-6, bad


def test_token_level_rule_on_the_same_tables_is_lossless_too():
    """The sequence test is not special to block verification: token-level's output fits the same joint (and its
    accepted lengths are shorter on these tables)."""
    P, Q = _tables(7)
    seqs, a = _sampled_sequences(P, Q, accept_sampled, seed=2)
    p = _sequence_pvalue(P, seqs)
    _, block_mean = _exact(P, Q, block_verdict, False)
    assert p > 1e-4, p
    assert a.mean() == pytest.approx(_token_level_mean(P, Q), abs=0.02) and _token_level_mean(P, Q) < block_mean


def test_verdict_shapes_and_edge_cases():
    """AR's block of one keeps nothing; p = q everywhere keeps the whole block; a zero-probability draft is never
    kept by itself."""
    probs = jnp.full((2, 1, 4), 0.25)
    assert np.asarray(block_verdict(probs, jnp.zeros((2, 0), jnp.int32)).stop).tolist() == [[1.0], [1.0]]
    acc = accept_block(jax.random.key(0), probs, jnp.zeros((2, 0), jnp.int32))
    assert np.asarray(acc.accepted).tolist() == [0, 0]
    p = jnp.asarray(np.tile([0.1, 0.2, 0.3, 0.4], (1, 3, 1)), jnp.float32)
    same = block_verdict(p, jnp.array([[1, 3]], jnp.int32), p[:, :2])
    assert np.asarray(same.stop).tolist() == [[1.0, 0.0, 1.0]]  # w stays 1: nothing owed, never stop early
    zero = jnp.asarray([[[0.0, 0.5, 0.5], [0.2, 0.4, 0.4]]], jnp.float32)
    v = block_verdict(zero, jnp.array([[0]], jnp.int32))  # point mass on a token the target never emits
    assert np.asarray(v.stop).tolist() == [[1.0, 0.0]]
    assert isinstance(v, BlockVerdict)


# ---- a verify schedule drops a block's tail: every rule judges exactly the first n_verify drafts ----------------

def _stopping(drafts):
    """A stopping time: judge drafts up to and including the first 0 (whether draft j is judged reads d_<j only)."""
    d = np.asarray(drafts)
    first_zero = np.where((d == 0).any(1), np.argmax(d == 0, axis=1) + 1, d.shape[1])
    return jnp.asarray(first_zero)


def _look_ahead(drafts):
    """Not a stopping time: judge the whole block only when its last draft is 0, else one draft less."""
    d = np.asarray(drafts)
    return jnp.asarray(np.where(d[:, -1] == 0, d.shape[1], d.shape[1] - 1))


def test_a_truncated_block_is_exactly_a_shorter_block():
    """`n_verify = m` gives the verdict of the block of its first m drafts (stop probabilities equal, residuals equal
    up to their scale), and nothing past it is kept."""
    P, Q = _tables(3)
    probs, q = _rows(P, Q, DRAFTS)
    args = jnp.asarray(probs, jnp.float32), jnp.asarray(DRAFTS, jnp.int32), jnp.asarray(q, jnp.float32)
    unit = lambda r: np.asarray(r) / np.maximum(np.asarray(r).sum(-1, keepdims=True), 1e-30)  # noqa: E731
    for m in range(K + 1):
        cut = block_verdict(*args, n_verify=m)
        short = block_verdict(args[0][:, : m + 1], args[1][:, :m], args[2][:, :m])
        np.testing.assert_allclose(np.asarray(cut.stop[:, : m + 1]), np.asarray(short.stop), atol=1e-7)
        np.testing.assert_allclose(unit(cut.residual[:, : m + 1]), unit(short.residual), atol=1e-6)
        assert not np.asarray(cut.stop[:, m + 1:]).any()


@pytest.mark.parametrize("point_mass", [False, True])
def test_a_schedule_that_reads_only_earlier_drafts_stays_exact(point_mass):
    """Block verification cut by a stopping time is exactly lossless (enumeration); a schedule that looks at the
    drafts it cuts is not for sampled drafts (their judged part is no longer a sample of q) and is harmless for
    point masses, which are not random."""
    errs = {}
    for name, schedule in (("stopping", _stopping), ("look-ahead", _look_ahead)):
        errs[name] = max(_tv(_exact(*_tables(s, point_mass=point_mass),
                                    lambda p, d, qq: block_verdict(p, d, qq, n_verify=schedule(d)), point_mass)[0],
                             _target_joint(_tables(s, point_mass=point_mass)[0])) for s in range(3))
    print(f"\n{'point-mass' if point_mass else 'sampled'} drafts, TV to the target: {errs}")
    assert errs["stopping"] < 1e-6
    assert errs["look-ahead"] > 1e-3 if not point_mass else errs["look-ahead"] < 1e-6


@pytest.mark.parametrize("rule", [accept_sampled, accept_block])
def test_sampled_rules_under_a_schedule_emit_the_target(rule):
    """χ² of the emitted sequences (continued by the target) against the exact joint, every block cut by the stopping
    schedule; the look-ahead schedule fails the same test."""
    P, Q = _tables(7)

    def cut(schedule):
        return lambda k, p, d, qq: rule(k, p, d, qq, n_verify=schedule(d))

    ok = _sequence_pvalue(P, _sampled_sequences(P, Q, cut(_stopping), seed=3, traced=False)[0])
    bad = _sequence_pvalue(P, _sampled_sequences(P, Q, cut(_look_ahead), seed=3, traced=False)[0])
    print(f"\n{rule.__name__} cut by a stopping time: p = {ok:.3g}; by a look-ahead schedule: p = {bad:.2g}")
    assert ok > 1e-4 and bad < 1e-6


def test_greedy_rule_under_a_schedule():
    logits = jnp.log(jnp.asarray([[[.1, .9], [.8, .2], [.3, .7], [.6, .4]]]))
    drafts = jnp.asarray([[1, 0, 1]])  # all three match the argmax chain
    assert [int(accept_greedy(logits, drafts, n_verify=m).accepted[0]) for m in range(4)] == [0, 1, 2, 3]
    assert [int(accept_greedy(logits, drafts, n_verify=m).bonus[0]) for m in range(4)] == [1, 0, 1, 0]


def _rate(conf, live, costs):
    s = np.cumprod(np.clip(np.asarray(conf, np.float64), 0, 1), axis=1)
    expected = (np.asarray(live)[:, None] * (1 + np.concatenate([np.zeros((len(s), 1)), np.cumsum(s, 1)], 1))).sum(0)
    return expected / np.asarray(costs)


def test_schedule_width_maximises_tokens_per_cost_reading_earlier_drafts_only():
    """On unimodal tokens per cost (affine costs) the width is the global maximum of expected committed tokens per
    cost; it never changes when the confidences of drafts it does not judge change (a stopping time), which the
    global maximum over the same rates does (the control)."""
    from hdflash_jax.decode.verify import schedule_width

    rng = np.random.default_rng(0)
    live = np.array([True, True])
    stepped = (1.0, 1.6, 1.6, 1.6, 1.6, 1.7, 1.7, 1.8)  # not affine: a jump, then flat (where the two differ)
    moved = 0
    for i in range(120):
        conf = rng.uniform(0.3, 1.0, (2, 7))
        costs = 1.0 + rng.uniform(0.0, 0.3) * np.arange(8) if i % 2 else np.array(stepped)  # affine / stepped
        w = int(schedule_width(jnp.asarray(conf), jnp.asarray(live), tuple(costs)))
        if i % 2:
            assert w == int(np.argmax(_rate(conf, live, costs))) + 1
        other = conf.copy()
        other[:, w:] = rng.uniform(0.0, 1.0, other[:, w:].shape)  # drafts w + 1.. (not judged at width w)
        assert int(schedule_width(jnp.asarray(other), jnp.asarray(live), tuple(costs))) == w
        moved += int(np.argmax(_rate(other, live, costs))) != int(np.argmax(_rate(conf, live, costs)))
    assert moved > 0, moved  # the global maximum reads them
    conf = jnp.asarray([[0.9, 0.5, 0.2]])
    assert int(schedule_width(conf, jnp.asarray([True]), (1.0, 1.0, 1.0, 1.0))) == 4  # flat costs: the whole block
    assert int(schedule_width(conf, jnp.asarray([True]), (1.0, 2.0, 3.0, 4.0))) == 1  # verify nothing but the anchor
