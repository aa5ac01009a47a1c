"""The drafter's inference context cache and its attention over the live context.

What a context position keeps (`DrafterConfig.draft_cache`):
* 'cond': the conditioning vector c_p [D] once, in the compute dtype; every draft step recomputes each layer's
  K/V from it (k-norm and RoPE at p), chunk by chunk. Exact: the same function of the same stored value as 'kv'.
* 'kv': every layer's injected K/V [KV, hd] (the reference layout; no recompute, n_layers · 2 · KV · hd values).
* 'cond_fp8': c_p in float8_e4m3fn with one fp32 scale per position (amax / 448). Lossy.

The draft step's queries see the committed context through an online softmax over fixed-size chunks of
`draft_chunk` positions, the loop bound from the longest live row, so its cost follows the live length and not
the cache's size; the block's own keys are merged in last (always visible, so no query is left without a key).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp

from hdflash_jax.config import DrafterConfig

_NEG = -1e30
_FP8 = jnp.float8_e4m3fn
_FP8_MAX = 448.0


# ---- layout ----------------------------------------------------------------------------------------------------

def init_draft_cache(cfg: DrafterConfig, batch: int, max_len: int, dtype=None) -> dict:
    """Empty cache: {"length": [b] int32} plus, by `cfg.draft_cache`,
    'cond': {"cond": [b, max_len, D]}; 'cond_fp8': {"cond": fp8 [b, max_len, D], "scale": fp32 [b, max_len]};
    'kv': {"layers": [{"k", "v": [b, max_len, KV, hd]}] × n_layers}.
    Holds committed context only (never block K/V); writes past `max_len` are dropped."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    out = {"length": jnp.zeros((batch,), jnp.int32)}
    if cfg.draft_cache == "kv":
        shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        out["layers"] = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.n_layers)]
    elif cfg.draft_cache == "cond":
        out["cond"] = jnp.zeros((batch, max_len, cfg.dim), dtype)
    else:
        out["cond"] = jnp.zeros((batch, max_len, cfg.dim), _FP8)
        out["scale"] = jnp.zeros((batch, max_len), jnp.float32)
    return out


def cache_max_len(cache: dict) -> int:
    return (cache["layers"][0]["k"] if "layers" in cache else cache["cond"]).shape[1]


def draft_cache_bytes_per_token(cfg: DrafterConfig, dtype=None) -> int:
    """Bytes one context position costs one row of the cache."""
    size = jnp.dtype(dtype or cfg.dtype).itemsize
    if cfg.draft_cache == "kv":
        return cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * size
    if cfg.draft_cache == "cond":
        return cfg.dim * size
    return cfg.dim * 1 + 4


def _logical_axes(cache: dict) -> dict:
    """Logical axis names of every leaf (same structure as the cache)."""
    out = {"length": ("decode_batch",)}
    if "layers" in cache:
        kv = ("decode_batch", None, "draft_kv", None)
        out["layers"] = [{"k": kv, "v": kv} for _ in cache["layers"]]
    if "cond" in cache:
        out["cond"] = ("decode_batch", None, "draft_embed")
    if "scale" in cache:
        out["scale"] = ("decode_batch", None)
    return out


def draft_cache_specs(cache: dict, mesh) -> dict:
    """PartitionSpecs of a cache (arrays or abstract shapes): rows over data/fsdp/expert, the feature (or KV head)
    dimension over tensor, each where it divides (`hdflash_jax.sharding` rules)."""
    from hdflash_jax.sharding import logical_to_spec

    return jax.tree.map(lambda names, x: logical_to_spec(names, x.shape, mesh), _logical_axes(cache), cache,
                        is_leaf=lambda x: isinstance(x, tuple))


def draft_cache_shardings(cache: dict, mesh) -> dict:
    from jax.sharding import NamedSharding

    return jax.tree.map(lambda s: NamedSharding(mesh, s), draft_cache_specs(cache, mesh))


def constrain_draft_cache(cache: dict) -> dict:
    """Pin a cache to its shardings under the current mesh (so a donated cache is updated in place: its output
    sharding is its input's); unchanged outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return cache
    return jax.tree.map(jax.lax.with_sharding_constraint, cache, draft_cache_specs(cache, mesh))


# ---- writes ----------------------------------------------------------------------------------------------------

def _quantize(c):
    """c [.., D] → (fp8 [.., D], fp32 scale [..]) with scale = amax / 448 (1 where c is all zero)."""
    x = c.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(amax > 0, amax / _FP8_MAX, 1.0)
    return (x / scale[..., None]).astype(_FP8), scale


def _dequantize(q, scale, dtype):
    return (q.astype(jnp.float32) * scale[..., None]).astype(dtype)


def _write_rows(buf, idx, new):
    """buf [b, L, ...] ← new [b, T, ...] at idx [b, T] (out of range: dropped), one scatter per row (vmapped, so
    the row dimension stays a batch dimension that a mesh can split)."""
    return jax.vmap(lambda x, i, v: x.at[i].set(v.astype(x.dtype), mode="drop"))(buf, idx, new)


def extend_draft_cache(drafter, ctx_feats_new, n_ctx_new, cache: dict) -> dict:
    """Append the first n_ctx_new[b] rows of ctx_feats_new [b, T, *] at positions length[b]..length[b]+n−1.

    `drafter` is the `BlockDrafter` (its reducer and, for 'kv', its layers' K/V projections). Padding rows
    (t >= n_ctx_new[b]) are not written; the length becomes length + n_ctx_new.
    """
    b, t = ctx_feats_new.shape[:2]
    n = jnp.asarray(n_ctx_new, jnp.int32)
    chex.assert_shape(n, (b,))
    if t == 0:  # nothing new (static): the cache as it is
        return cache
    length = cache["length"]
    max_len = cache_max_len(cache)
    pos = length[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    idx = jnp.where(jnp.arange(t)[None, :] < n[:, None], pos, max_len)  # padding → out of bounds → dropped
    out = {**cache, "length": length + n}
    if "layers" in cache:
        out["layers"] = [{"k": _write_rows(lc["k"], idx, k), "v": _write_rows(lc["v"], idx, v)}
                         for (k, v), lc in zip(drafter.context_kv(ctx_feats_new, pos), cache["layers"])]
    elif "scale" in cache:
        q, scale = _quantize(drafter.condition(ctx_feats_new))
        out["cond"], out["scale"] = _write_rows(cache["cond"], idx, q), _write_rows(cache["scale"], idx, scale)
    else:
        out["cond"] = _write_rows(cache["cond"], idx, drafter.condition(ctx_feats_new))
    return constrain_draft_cache(out)


# ---- attention over the live context ---------------------------------------------------------------------------

class _Partial(NamedTuple):
    """Softmax pieces over a key set: running max m [b, KV, G, Tq], sum l (same), unnormalised o [b, Tq, KV, G, d]."""
    m: jax.Array
    l: jax.Array
    o: jax.Array


def _partial(qg, k, v, valid, scale) -> _Partial:
    """qg [b, Tq, KV, G, d]; k/v [b, S, KV, d]; valid [b, S] (or None: all visible)."""
    s = jnp.einsum("bqkgd,bskd->bkgqs", qg, k.astype(qg.dtype), preferred_element_type=jnp.float32) * scale
    if valid is not None:
        s = jnp.where(valid[:, None, None, None, :], s, _NEG)
    m = jnp.max(s, axis=-1)
    p = jnp.exp(s - m[..., None])
    if valid is not None:
        p = p * valid[:, None, None, None, :]
    o = jnp.einsum("bkgqs,bskd->bqkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return _Partial(m, jnp.sum(p, axis=-1), o)


def _frame(factor):  # [b, KV, G, Tq] → [b, Tq, KV, G, 1]
    return jnp.moveaxis(factor, 3, 1)[..., None]


def _merge(a: _Partial, b: _Partial) -> _Partial:
    m = jnp.maximum(a.m, b.m)
    fa, fb = jnp.exp(a.m - m), jnp.exp(b.m - m)
    return _Partial(m, a.l * fa + b.l * fb, a.o * _frame(fa) + b.o * _frame(fb))


def _chunk_kv(layer, cache: dict, index: int, off, size: int):
    """K/V [b, size, KV, hd] of positions off..off+size−1 for draft layer `index`."""
    def rows(x):
        return jax.lax.dynamic_slice_in_dim(x, off, size, axis=1)

    if "layers" in cache:
        lc = cache["layers"][index]
        return rows(lc["k"]), rows(lc["v"])
    dtype = jnp.dtype(layer.cfg.dtype)
    c = rows(cache["cond"])
    if "scale" in cache:
        c = _dequantize(c, rows(cache["scale"]), dtype)
    b = c.shape[0]
    pos = jnp.broadcast_to(off + jnp.arange(size, dtype=jnp.int32)[None, :], (b, size))
    return layer.context_kv(c, pos)


def cache_attend(layer, index: int, cache: dict, chunk: int, scale: float) -> Callable:
    """attend(q, k, v) for `DraftLayer.__call__`: the committed context of `cache` (keys < length[b]), `chunk`
    positions per loop step over ceil(max(length) / chunk) steps, then the block's own keys (all visible)."""
    length = cache["length"]
    max_len = cache_max_len(cache)
    c = min(chunk, max_len)

    def attend(q, k, v):
        b, tq, h, d = q.shape
        kvh = k.shape[2]
        qg = q.reshape(b, tq, kvh, h // kvh, d)
        init = _Partial(jnp.full((b, kvh, h // kvh, tq), _NEG, jnp.float32),
                        jnp.zeros((b, kvh, h // kvh, tq), jnp.float32),
                        jnp.zeros((b, tq, kvh, h // kvh, d), jnp.float32))
        if max_len == 0:
            acc = init
        else:
            def step(i, acc):
                lo = i * c
                off = jnp.minimum(lo, max_len - c)  # the last chunk may overlap the one before: mask what it saw
                ck, cv = _chunk_kv(layer, cache, index, off, c)
                key_pos = off + jnp.arange(c, dtype=jnp.int32)
                valid = (key_pos[None, :] >= lo) & (key_pos[None, :] < length[:, None])
                return _merge(acc, _partial(qg, ck, cv, valid, scale))

            n_steps = jnp.minimum((jnp.max(length) + c - 1) // c, -(-max_len // c))  # a length past max_len: all
            acc = jax.lax.fori_loop(0, n_steps, step, init)
        acc = _merge(acc, _partial(qg, k, v, None, scale))
        out = acc.o / _frame(acc.l)
        return out.reshape(b, tq, h, d).astype(q.dtype)

    return attend


def bytes_note(cfg: DrafterConfig) -> str:  # for reports: the per-token cost of each layout
    kinds = ("cond", "kv", "cond_fp8")
    return ", ".join(f"{k} {draft_cache_bytes_per_token(cfg.replace(draft_cache=k))}" for k in kinds)

