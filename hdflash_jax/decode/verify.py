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
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


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


def accept_greedy(logits: jax.Array, drafts: jax.Array) -> Acceptance:
    """logits: [B, K+1, V] at the block positions; drafts: [B, K]."""
    choice = jnp.argmax(logits, axis=-1).astype(drafts.dtype)  # y_0..y_K
    matches = (drafts == choice[:, :-1]).astype(jnp.int32)
    a = jnp.sum(jnp.cumprod(matches, axis=-1), axis=-1)
    return Acceptance(a, jnp.take_along_axis(choice, a[:, None], axis=1)[:, 0])


def accept_sampled(key: jax.Array, probs: jax.Array, drafts: jax.Array, draft_probs: jax.Array | None = None,
                   ) -> Acceptance:
    """Lossless speculative sampling. probs: [B, K+1, V] target; draft_probs: [B, K, V] or None (point mass)."""
    b, k1, v = probs.shape
    k = k1 - 1
    key_u, key_res = jax.random.split(key)
    p_d = jnp.take_along_axis(probs[:, :k], drafts[..., None], axis=-1)[..., 0]  # p_i(d_{i+1})
    if draft_probs is None:
        q = jax.nn.one_hot(drafts, v, dtype=probs.dtype)
        q_d = jnp.ones_like(p_d)
    else:
        q = draft_probs
        q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    u = jax.random.uniform(key_u, (b, k))
    ok = (u * q_d < p_d).astype(jnp.int32)  # u < p/q without dividing by a zero q
    a = jnp.sum(jnp.cumprod(ok, axis=-1), axis=-1)
    # residual at the first rejection (norm(max(p - q, 0))), or the plain target distribution after all K
    p_a = jnp.take_along_axis(probs, a[:, None, None], axis=1)[:, 0]
    q_a = jnp.take_along_axis(jnp.concatenate([q, jnp.zeros((b, 1, v), q.dtype)], axis=1), a[:, None, None],
                              axis=1)[:, 0]
    residual = jnp.maximum(p_a - q_a, 0.0)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p_a)
    bonus = jax.random.categorical(key_res, jnp.log(residual + 1e-38), axis=-1).astype(drafts.dtype)
    return Acceptance(a, bonus)


def sample(key: jax.Array, logits: jax.Array, temperature: float, top_p: float = 1.0) -> jax.Array:
    """One token per row from [B, V] logits (argmax when temperature == 0)."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    probs = target_probs(logits, temperature, top_p)
    return jax.random.categorical(key, jnp.log(probs + 1e-38), axis=-1).astype(jnp.int32)
