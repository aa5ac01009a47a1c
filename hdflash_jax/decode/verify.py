"""The acceptance rule: the one place where drafts become committed tokens (shared by every drafter).

Verification gives the target's distribution at each of the K + 1 block positions: position i (0 = the anchor)
predicts the token after it, so p_i judges draft d_{i+1} and p_K gives the bonus when every draft is accepted.

* greedy (temperature 0): accept while d_{i+1} == argmax p_i; the bonus is argmax p_a at the first mismatch a.
  a = Σ_j Π_{i≤j} [d_i = y_{i-1}]  (cumprod of matches, then sum).
* sampling, point-mass drafts (the block drafters' greedy proposals): accept d with probability p(d); on the
  first rejection draw from p with d removed and renormalised. This is Leviathan et al.'s rejection sampling
  with q = δ_d, so every committed token is an exact sample of the target.
* sampling, sampled drafts with probabilities q: accept with min(1, p(d)/q(d)), on rejection draw from
  norm(max(p − q, 0)). The point-mass rule is this rule with q one-hot.

Those two are token-level verification (`accept_sampled`, `verify="token"`). Block verification (Sun et al.,
"Block Verification Accelerates Speculative Decoding", 2024, Algorithm 2; `accept_block`, `verify="block"`)
judges the block jointly: with w_0 = 1 and w_i = min(1, w_{i-1} · p_{i-1}(d_i) / q_{i-1}(d_i)), the residual mass
r_i = Σ_x max(w_i p_i(x) − q_i(x), 0) and the stop probability h_i = r_i / (r_i + 1 − w_i) (i < K), h_K = w_K,
it keeps the longest prefix i whose independent uniform η_i < h_i (τ = 0 if none) and draws the token after it
from norm(max(w_τ p_τ − q_τ, 0)) (from p_K when τ = K). A later draft can rescue an earlier one that token-level
verification would reject, since w only shrinks by the ratio and grows back towards 1. Every emitted sequence is
an exact sample of the target, and its expected accepted length is never below token-level's; for point-mass
drafts the two accept the same lengths in distribution (Π p(d) bounds both). Greedy decoding never calls either.

Every rule takes `n_verify` ([B] or a scalar; None = K): only drafts 1..n_verify are judged, the rest are never
accepted and the token after an accepted prefix of n_verify comes from the target alone (as if the block had been
n_verify drafts long: q is zero past it, so the residual there is p itself). That is all a verify schedule does
(drop a block's tail), and it keeps every rule exact on one condition: whether draft j is judged may depend on the
drafts before j only (a stopping time). Greedy drafts are fixed by the context, so any schedule is exact for them;
a schedule that looks at a sampled draft to decide whether to judge it makes the judged drafts no longer samples
of q (tests/test_block_verify.py measures the bias). `schedule_width` is DSpark's schedule: a draft's confidence
c_j estimates P(draft j accepted | drafts < j accepted) from the drafted token before it, so S_j = Π_{i<=j} c_i
estimates that draft j is accepted, and the width w (anchor + w − 1 drafts) is chosen for the expected committed
tokens (1 + Σ_{j<w} S_j per row) per unit of the step's measured cost at that width. The serving engines take the
global maximum over their width buckets (sglang-jax `dspark_planner.select_dspark_verify_budget`); that looks at
the survival of drafts past the ones it keeps, so here the width is the first local maximum scanning up from the
narrowest — the same width whenever tokens per cost is unimodal in w (concave expected tokens over an increasing
affine cost), and a stopping time always.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from hdflash_jax import row_keys


class Acceptance(NamedTuple):
    accepted: jax.Array  # [B] number of accepted drafts a ∈ [0, K]
    bonus: jax.Array  # [B] the target's token after the accepted drafts (becomes the next anchor)



MIN_BLOCK = 2  # a speculative verify block holds the anchor plus at least one draft


def check_block_size(block_size: int | None, where: str = "--block-size") -> None:
    """The one block-size rule of a speculative verify block (AR's block of 1 is not one): anchor + >= 1 draft."""
    if block_size is not None and block_size < MIN_BLOCK:
        raise ValueError(f"{where} must be >= {MIN_BLOCK} (anchor + at least one draft), got {block_size}")

def target_probs(logits: jax.Array, temperature: float, top_p: float = 1.0) -> jax.Array:
    """The sampling distribution at temperature T (> 0), optionally restricted to the top-p nucleus."""
    probs = jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    if top_p >= 1.0:
        return probs
    sorted_p = jnp.sort(probs, axis=-1)[..., ::-1]
    cum = jnp.cumsum(sorted_p, axis=-1)
    # keep the smallest set whose mass reaches top_p: the threshold is the last kept probability
    cutoff_idx = jnp.sum(cum - sorted_p < top_p, axis=-1, keepdims=True) - 1
    threshold = jnp.take_along_axis(sorted_p, cutoff_idx, axis=-1)
    kept = jnp.where(probs >= threshold, probs, 0.0)
    return kept / jnp.sum(kept, axis=-1, keepdims=True)


def _judged(drafts: jax.Array, n_verify) -> jax.Array | None:
    """[B, K] bool: the drafts a schedule verifies (None: all)."""
    if n_verify is None:
        return None
    n = jnp.broadcast_to(jnp.asarray(n_verify, jnp.int32), drafts.shape[:1])
    return jnp.arange(drafts.shape[1])[None, :] < n[:, None]


def _draft_terms(probs, drafts, draft_probs, n_verify):
    """What both sampled rules read of a block: p_d [B, K] = p_i(d_{i+1}), the draft distributions q [B, K, V]
    (one-hot for point masses; zero past a schedule's cut: no q to subtract from the target there), q_d [B, K] =
    q_i(d_{i+1}) and the judged drafts [B, K] (None: all)."""
    k, v = drafts.shape[1], probs.shape[-1]
    p_d = jnp.take_along_axis(probs[:, :k], drafts[..., None], axis=-1)[..., 0]
    if draft_probs is None:
        q = jax.nn.one_hot(drafts, v, dtype=probs.dtype)
        q_d = jnp.ones_like(p_d)
    else:
        q = draft_probs.astype(probs.dtype)
        q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    judged = _judged(drafts, n_verify)
    if judged is not None:
        q = jnp.where(judged[..., None], q, 0.0)
    return p_d, q, q_d, judged


def _draw_bonus(key, residual, fallback, dtype):
    """The token after the kept prefix: a draw from norm(residual), or from `fallback` where it has no mass."""
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    dist = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), fallback)
    return row_keys.categorical(key, jnp.log(dist + 1e-38)).astype(dtype)


def accept_greedy(logits: jax.Array, drafts: jax.Array, n_verify=None) -> Acceptance:
    """logits: [B, K+1, V] at the block positions; drafts: [B, K]; n_verify: drafts judged (None: all)."""
    choice = jnp.argmax(logits, axis=-1).astype(drafts.dtype)  # y_0..y_K
    matches = (drafts == choice[:, :-1]).astype(jnp.int32)
    judged = _judged(drafts, n_verify)
    if judged is not None:
        matches = matches * judged
    a = jnp.sum(jnp.cumprod(matches, axis=-1), axis=-1)
    return Acceptance(a, jnp.take_along_axis(choice, a[:, None], axis=1)[:, 0])


def accept_sampled(key: jax.Array, probs: jax.Array, drafts: jax.Array, draft_probs: jax.Array | None = None,
                   n_verify=None) -> Acceptance:
    """Lossless speculative sampling. probs: [B, K+1, V] target; draft_probs: [B, K, V] or None (point mass);
    n_verify: drafts judged (None: all)."""
    b, k1, v = probs.shape
    k = k1 - 1
    key_u, key_res = row_keys.split(key, 2)
    p_d, q, q_d, judged = _draft_terms(probs, drafts, draft_probs, n_verify)
    u = row_keys.uniform(key_u, (b, k))
    ok = (u * q_d < p_d).astype(jnp.int32)  # u < p/q without dividing by a zero q
    if judged is not None:  # past the schedule: never accepted
        ok = ok * judged
    a = jnp.sum(jnp.cumprod(ok, axis=-1), axis=-1)
    # residual at the first rejection (norm(max(p - q, 0))), or the plain target distribution after all K
    p_a = jnp.take_along_axis(probs, a[:, None, None], axis=1)[:, 0]
    q_a = jnp.take_along_axis(jnp.concatenate([q, jnp.zeros((b, 1, v), q.dtype)], axis=1), a[:, None, None],
                              axis=1)[:, 0]
    return Acceptance(a, _draw_bonus(key_res, jnp.maximum(p_a - q_a, 0.0), p_a, drafts.dtype))


VERIFY_RULES = ("token", "block")  # the acceptance rules at T > 0: `accept_sampled`, `accept_block`


def check_verify_rule(rule: str, where: str = "--verify") -> None:
    if rule not in VERIFY_RULES:
        raise ValueError(f"{where} must be one of {', '.join(VERIFY_RULES)}, got {rule!r}")


class BlockVerdict(NamedTuple):
    """What block verification decides from, per row (before any randomness): `stop` [B, K+1] = h_0..h_K (the
    probability of keeping prefix i when no longer prefix is kept; h_0 = 1) and `residual` [B, K+1, V], the
    unnormalised distribution of the token after a kept prefix i (max(w_i p_i − q_i, 0); p_K at i = K)."""
    stop: jax.Array
    residual: jax.Array


def block_verdict(probs: jax.Array, drafts: jax.Array, draft_probs: jax.Array | None = None,
                  n_verify=None) -> BlockVerdict:
    """Sun et al.'s block verification, the deterministic half. probs [B, K+1, V] target; drafts [B, K];
    draft_probs [B, K, V] or None (point masses); n_verify: drafts judged (None: all)."""
    b, k1, v = probs.shape
    k = k1 - 1
    p_d, q, q_d, judged = _draft_terms(probs, drafts, draft_probs, n_verify)  # past a cut q = 0: h there is w
    tiny = jnp.finfo(probs.dtype).tiny

    def weight(w, pq):  # w_i = min(1, w_{i-1} p / q); a zero q (never drawn) with p > 0 gives 1, with p = 0 gives 0
        p_i, q_i = pq
        w = jnp.minimum(w * p_i / jnp.maximum(q_i, tiny), 1.0)
        return w, w

    _, ws = jax.lax.scan(weight, jnp.ones((b,), probs.dtype), (p_d.T, q_d.T))
    w = jnp.concatenate([jnp.ones((b, 1), probs.dtype), ws.T], axis=1)  # [B, K+1]: w_0..w_K
    residual = jnp.maximum(w[:, :k, None] * probs[:, :k] - q, 0.0)  # after prefix i < K
    r = jnp.sum(residual, axis=-1)
    den = r + 1.0 - w[:, :k]
    h = jnp.where(den > 0, r / jnp.where(den > 0, den, 1.0), 0.0)  # 0/0 (w = 1, no residual): never stop there
    tail = [h[:, 1:], w[:, k:]] if k else []  # h_1..h_{K-1}, h_K = w_K (AR's block of one: h_0 alone)
    stop = jnp.concatenate([jnp.ones((b, 1), probs.dtype)] + tail, axis=1)
    if judged is not None:  # a prefix longer than the schedule's is never kept
        stop = stop * jnp.concatenate([jnp.ones((b, 1), bool), judged], axis=1)
    return BlockVerdict(stop, jnp.concatenate([residual, probs[:, k:]], axis=1))


def accept_block(key: jax.Array, probs: jax.Array, drafts: jax.Array, draft_probs: jax.Array | None = None,
                 n_verify=None) -> Acceptance:
    """Block verification (lossless; see the module docstring): the same arguments as `accept_sampled`."""
    b, k1, v = probs.shape
    key_u, key_res = row_keys.split(key, 2)
    verdict = block_verdict(probs, drafts, draft_probs, n_verify)
    u = row_keys.uniform(key_u, (b, k1 - 1))
    kept = u < verdict.stop[:, 1:]
    a = jnp.max(jnp.where(kept, jnp.arange(1, k1)[None, :], 0), axis=1, initial=0).astype(jnp.int32)  # longest
    res = jnp.take_along_axis(verdict.residual, a[:, None, None], axis=1)[:, 0]
    p_a = jnp.take_along_axis(probs, a[:, None, None], axis=1)[:, 0]
    return Acceptance(a, _draw_bonus(key_res, res, p_a, drafts.dtype))


def schedule_width(confidence: jax.Array, live: jax.Array, costs: tuple[float, ...]) -> jax.Array:
    """DSpark's verify schedule (see the module docstring): the verify width w in 1..K+1 (anchor included) at the
    first local maximum, scanning up from 1, of the expected committed tokens per unit of `costs[w − 1]` (the
    step's measured cost at width w). confidence [B, K]: c_j of each row's drafts; live [B]: rows still
    generating. Going from w to w + 1 reads S_w, i.e. the drafts before draft w: a stopping time."""
    s = jnp.cumprod(jnp.clip(confidence.astype(jnp.float32), 0.0, 1.0), axis=-1)  # S_j, j = 1..K
    rows = live.astype(jnp.float32)[:, None]
    expected = jnp.sum(rows * (1.0 + jnp.concatenate([jnp.zeros_like(s[:, :1]), jnp.cumsum(s, axis=-1)], -1)), 0)
    rate = expected / jnp.asarray(costs, jnp.float32)  # per width 1..K+1
    better = jnp.concatenate([rate[1:] > rate[:-1], jnp.zeros((1,), bool)])  # is w + 1 better than w?
    return (jnp.argmin(better) + 1).astype(jnp.int32)  # the first w whose successor is no better


def sample(key: jax.Array, logits: jax.Array, temperature: float, top_p: float = 1.0) -> jax.Array:
    """One token per row from [B, V] logits (argmax when temperature == 0)."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    probs = target_probs(logits, temperature, top_p)
    return row_keys.categorical(key, jnp.log(probs + 1e-38)).astype(jnp.int32)
