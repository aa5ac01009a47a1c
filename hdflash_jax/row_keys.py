"""Randomness per batch row: the decoder draws every row's tokens from that row's own key.

A key is either one PRNG key (every row's draws from it together, as `jax.random` does) or a key per row [B] (typed
keys). The decoder passes a key per row, made from the run's seed, a key of the row's prompt and the row's own step
(`prompt_row_keys`), so a prompt samples the same tokens alone, in any batch, in any row, or started in a row another
prompt left (continuous refill). The functions below are `jax.random`'s, taking either kind: the acceptance rules,
the drafters and the selector call them, and a caller with one key (a test, the training code) gets `jax.random`'s
own draws.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def per_row(key: jax.Array) -> bool:
    """Whether `key` is a key per row (a typed key array of rank 1) rather than one key."""
    return jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 1


def prompt_row_keys(seed: jax.Array, prompt_keys: jax.Array, counters: jax.Array) -> jax.Array:
    """A key per row [B]: key(seed) folded with the row's prompt key, then with the row's own counter (its step)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda p, c: jax.random.fold_in(jax.random.fold_in(base, p), c))(prompt_keys, counters)


def split(key: jax.Array, n: int) -> jax.Array:
    """`n` keys: [n] from one key; [n, B] from a key per row (row b's n keys from its own)."""
    if per_row(key):
        return jax.vmap(lambda k: jax.random.split(k, n), out_axes=1)(key)
    return jax.random.split(key, n)


def fold_in(key: jax.Array, data: int) -> jax.Array:
    """`jax.random.fold_in` of one key, or of each row's."""
    if per_row(key):
        return jax.vmap(lambda k: jax.random.fold_in(k, data))(key)
    return jax.random.fold_in(key, data)


def categorical(key: jax.Array, log_probs: jax.Array) -> jax.Array:
    """One draw per row of log_probs [B, ..., V] over its last axis."""
    if per_row(key):
        return jax.vmap(lambda k, lp: jax.random.categorical(k, lp, axis=-1))(key, log_probs)
    return jax.random.categorical(key, log_probs, axis=-1)


def uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """U[0, 1) of `shape` = (B, ...)."""
    if per_row(key):
        return jax.vmap(lambda k: jax.random.uniform(k, shape[1:]))(key)
    return jax.random.uniform(key, shape)
