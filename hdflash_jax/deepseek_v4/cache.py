"""Decode caches built for speculative verification and exact rollback.

A cache is a plain pytree: `{"length": [B] int32, "layers": [per-layer dict], "mtp": {"length", "layers"}}` (the
MTP layers keep their own length: their drafted positions are rolled back apart from the target's). When layers
run under scan (`hdflash_jax.deepseek_v4.scan`), "layers" holds the unrolled prefix only, "scan" one dict per unit
position with a leading unit axis, and "tail" the layers after the last unit.
`length[b]` is the number of committed tokens of row b. Everything else is position-indexed, so a rollback is
`cache["length"] = new_length` (see `set_committed_length`) and nothing else:

* sliding window: a ring of `W + max_block - 1` slots (`win_kv`, with the position each slot holds in `win_pos`).
  A call reads the ring *before* writing its own keys, and attends to its own keys directly, so verifying a block
  of up to `max_block` tokens never evicts a committed key that the step after a rollback still needs.
* compressed layers (ratio m): the compressed entries `comp` [B, max_len // m, d], entry w at index w. Entry w is
  usable by a query at p iff w < (p + 1) // m, and it is *valid* only while its whole window is committed
  (w < length // m). Every call recomputes all entries whose window closes inside the call, from the per-token
  compressor inputs (`tok_kv`, `tok_gate`, ring of `2m + max_block` slots, positions in `tok_pos`): after a
  rollback the window that was open is simply closed again from committed inputs.
* CSA layers also hold the indexer's compressed keys (`idx_comp`) and per-token inputs (`idx_tok_kv/gate`).

Rows of a batch advance independently: a call carries `n_new[b]` real tokens per row (the rest is padding whose
writes land past the row's new length, where nothing reads them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hdflash_jax.config import TargetConfig
from hdflash_jax.deepseek_v4.scan import layer_plan


def window_slots(cfg: TargetConfig, max_block: int) -> int:
    return cfg.window_size + max_block - 1


def token_slots(ratio: int, max_block: int) -> int:
    overlap = 2 if ratio == 4 else 1
    return overlap * ratio + max_block


def init_layer_cache(cfg: TargetConfig, ratio: int, batch: int, max_len: int, max_block: int, dtype) -> dict:
    d = cfg.head_dim
    r = window_slots(cfg, max_block)
    c = {"win_kv": jnp.zeros((batch, r, d), dtype), "win_pos": jnp.full((batch, r), -1, jnp.int32)}
    if ratio > 0:
        overlap = 2 if ratio == 4 else 1
        rc = token_slots(ratio, max_block)
        n_entries = max_len // ratio
        c["comp"] = jnp.zeros((batch, n_entries, d), dtype)
        c["tok_kv"] = jnp.zeros((batch, rc, overlap * d), jnp.float32)
        c["tok_gate"] = jnp.zeros((batch, rc, overlap * d), jnp.float32)
        c["tok_pos"] = jnp.full((batch, rc), -1, jnp.int32)
        if ratio == 4:
            di = cfg.index_head_dim
            c["idx_comp"] = jnp.zeros((batch, n_entries, di), dtype)
            c["idx_tok_kv"] = jnp.zeros((batch, rc, 2 * di), jnp.float32)
            c["idx_tok_gate"] = jnp.zeros((batch, rc, 2 * di), jnp.float32)
    return c


def init_cache(cfg: TargetConfig, batch: int, max_len: int, max_block: int = 16, dtype=None) -> dict:
    """An empty cache for `batch` rows of up to `max_len` tokens, verifying blocks of up to `max_block`."""
    if max_len > cfg.max_seq_len:
        raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
    dtype = dtype or jnp.dtype(cfg.dtype)
    plan = layer_plan(cfg)
    ratios = cfg.layer_ratios

    def layer(r):
        return init_layer_cache(cfg, r, batch, max_len, max_block, dtype)

    cache = {
        "length": jnp.zeros((batch,), jnp.int32),
        "layers": [layer(r) for r in ratios[:plan.prefix]],
        "mtp": {"length": jnp.zeros((batch,), jnp.int32),
                "layers": [layer(0) for _ in range(cfg.n_mtp_layers)]},
    }
    if plan.n_units:  # per unit position: that layer kind's cache with a leading unit axis
        stacked = [jax.tree.map(lambda x: jnp.broadcast_to(x, (plan.n_units,) + x.shape),
                                layer(ratios[plan.layer(0, j)])) for j in range(plan.period)]
        cache.update(scan=stacked, tail=[layer(r) for r in ratios[plan.tail_start:]])
    return cache


def set_committed_length(cache: dict, length: jax.Array) -> dict:
    """Make `length[b]` the committed length of row b: commits a prefill, or rolls back after a partial acceptance
    (exact for any length in [start, start + n] of the last call). Target and draft caches alike."""
    return {**cache, "length": jnp.asarray(length, jnp.int32)}


def ring_merge(old: jax.Array, old_pos: jax.Array, new: jax.Array, start: jax.Array, n_new: jax.Array):
    """Write the real new tokens of a call (positions start..start+n_new-1) into a position-keyed ring.

    Each slot s takes the latest real position P ≡ s (mod R) if P >= start, else keeps its old content; a gather
    rather than a scatter, so long prefills (more tokens than slots) and padding need no special cases.
    old: [B, R, ...], old_pos: [B, R], new: [B, T, ...]. Returns (ring, ring_pos).
    """
    take, latest = _ring_sources(old.shape[1], start, n_new)
    idx = jnp.clip(latest - start[:, None], 0, new.shape[1] - 1)
    gathered = jnp.take_along_axis(new, idx.reshape(idx.shape + (1,) * (new.ndim - 2)), axis=1)
    sel = take.reshape(take.shape + (1,) * (old.ndim - 2))
    return jnp.where(sel, gathered.astype(old.dtype), old), jnp.where(take, latest, old_pos)


def ring_positions(old_pos: jax.Array, start: jax.Array, n_new: jax.Array) -> jax.Array:
    """The positions a ring holds after `ring_merge` (shared by rings written in lockstep)."""
    take, latest = _ring_sources(old_pos.shape[1], start, n_new)
    return jnp.where(take, latest, old_pos)


def _ring_sources(r: int, start: jax.Array, n_new: jax.Array):
    last = start + n_new - 1  # [B]
    slots = jnp.arange(r)[None, :]
    latest = last[:, None] - jnp.mod(last[:, None] - slots, r)  # [B, R]: latest position P <= last, P = slot mod R
    take = (latest >= start[:, None]) & (n_new[:, None] > 0)
    return take, latest
