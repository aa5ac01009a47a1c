"""DeepSeek-V4 attention: single-KV-head MQA over a sliding window plus compressed entries, with sinks.

Layer kinds by compress ratio m: 0 = sliding window only (SWA); 4 = compressed sparse attention (CSA: overlapping
compressor + lightning indexer top-k); other m = heavily compressed attention (HCA: all causal entries).

Every call extends the cache by a block of T tokens per row (prefill, one-token step and draft verification are
the same code) and returns the updated cache; see `cache.py` for the layout and why rollback is exact.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hdflash_jax.config import TargetConfig, yarn_inv_freq
from hdflash_jax.deepseek_v4.cache import ring_merge, ring_positions
from hdflash_jax.sharding import constrain_groups, sequence_groups
from hdflash_jax.deepseek_v4.layers import Linear, RMSNorm, apply_rope, param, rms_norm, rope_angles

NEG_INF = -1e30  # finite, so fully masked rows never make NaN; every query sees at least itself


class Compressor(nnx.Module):
    """Gated softmax pooling of m tokens into one entry (c = 2 overlapping halves when m == 4)."""

    def __init__(self, dim: int, head_dim: int, ratio: int, eps: float, *, dtype, rngs: nnx.Rngs):
        c = 2 if ratio == 4 else 1
        self.ratio, self.head_dim, self.eps = ratio, head_dim, eps
        self.wkv = Linear(dim, c * head_dim, ("kv", "embed"), dtype=dtype, rngs=rngs)
        self.wgate = Linear(dim, c * head_dim, ("kv", "embed"), dtype=dtype, rngs=rngs)
        self.ape = param(rngs, (ratio, c * head_dim), (None, "kv"), jnp.float32, init="zeros")
        self.norm = RMSNorm(head_dim, eps, dtype=dtype, axes=("kv",))

    def __call__(self, x, start, n_new, tok_kv, tok_gate, tok_pos, comp, inv_freq):
        """Recompute every entry whose window closes in this call and write it into `comp`.

        x: [B, T, D]; start, n_new: [B]; tok_*: the per-token ring; comp: [B, N, d].
        Returns (comp, tok_kv, tok_gate) updated (the caller merges tok_pos once for all rings).
        """
        b, t, _ = x.shape
        m, d = self.ratio, self.head_dim
        overlap = m == 4
        a = self.wkv(x).astype(jnp.float32)
        z = self.wgate(x).astype(jnp.float32)
        n_windows = (t + m - 1) // m  # windows that can close inside a block of t tokens
        w = start[:, None] // m + jnp.arange(n_windows)[None, :]  # [B, K]
        if overlap:  # slots 0..m-1: previous window's A half; m..2m-1: this window's B half
            offs = np.concatenate([np.arange(m) - m, np.arange(m)])
        else:
            offs = np.arange(m)
        pos = m * w[:, :, None] + offs[None, None, :]  # [B, K, S]
        from_new = pos >= start[:, None, None]
        new_idx = jnp.clip(pos - start[:, None, None], 0, t - 1).reshape(b, -1)
        ring_idx = jnp.mod(pos, tok_kv.shape[1]).reshape(b, -1)

        def gather(new_vals, ring_vals):
            fresh = jnp.take_along_axis(new_vals, new_idx[..., None], axis=1)
            old = jnp.take_along_axis(ring_vals, ring_idx[..., None], axis=1)
            return jnp.where(from_new.reshape(b, -1)[..., None], fresh, old).reshape(b, n_windows, len(offs), -1)

        kv, gate = gather(a, tok_kv), gather(z, tok_gate)  # [B, K, S, c*d]
        ape = self.ape[...].astype(jnp.float32)
        if overlap:
            kv = jnp.concatenate([kv[:, :, :m, :d], kv[:, :, m:, d:]], axis=2)
            gate = jnp.concatenate([gate[:, :, :m, :d] + ape[:, :d], gate[:, :, m:, d:] + ape[:, d:]], axis=2)
        else:
            gate = gate + ape
        gate = jnp.where((pos >= 0)[..., None], gate, -jnp.inf)  # window 0 has no previous window
        pooled = jnp.sum(jax.nn.softmax(gate, axis=2) * kv, axis=2)  # [B, K, d]
        pooled = rms_norm(pooled.astype(comp.dtype), self.norm.weight[...], self.eps)
        cos, sin = rope_angles(m * w, inv_freq)
        entry = apply_rope(pooled, cos, sin)
        closes = m * w + m - 1 < (start + n_new)[:, None]
        target = jnp.where(closes, w, comp.shape[1])  # out of range -> dropped
        comp = comp.at[jnp.arange(b)[:, None], target].set(entry.astype(comp.dtype), mode="drop")
        tok_kv, _ = ring_merge(tok_kv, tok_pos, a, start, n_new)
        tok_gate, _ = ring_merge(tok_gate, tok_pos, z, start, n_new)
        return comp, tok_kv, tok_gate


class Indexer(nnx.Module):
    """Lightning indexer: scores compressed entries per query, keeps the causal top-k."""

    def __init__(self, cfg: TargetConfig, *, dtype, rngs: nnx.Rngs):
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.wq_b = Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, ("heads", "q_lora"),
                           dtype=dtype, rngs=rngs)
        self.weights_proj = Linear(cfg.dim, cfg.index_n_heads, (None, "embed"), dtype=dtype, rngs=rngs)
        self.compressor = Compressor(cfg.dim, cfg.index_head_dim, 4, cfg.norm_eps, dtype=dtype, rngs=rngs)

    def select(self, x, q_lat, positions, keys, cos, sin):
        """Top-k compressed entry ids per query [B, T, k] and their validity (w < (p + 1) // 4)."""
        b, t, _ = x.shape
        q = self.wq_b(q_lat).reshape(b, t, self.n_heads, self.head_dim)
        q = apply_rope(q, cos, sin)
        weights = self.weights_proj(x).astype(jnp.float32) * (self.n_heads ** -0.5)
        dots = jnp.einsum("bthc,bsc->bths", q.astype(jnp.float32), keys.astype(jnp.float32))
        scores = jnp.einsum("bths,bth->bts", jax.nn.relu(dots) * (self.head_dim ** -0.5), weights)
        limit = (positions + 1) // 4  # [B, T]
        causal = jnp.arange(keys.shape[1])[None, None, :] < limit[..., None]
        scores = jnp.where(causal, scores, -jnp.inf)
        k = min(self.topk, keys.shape[1])
        _, idx = jax.lax.top_k(scores, k)
        return idx, idx < limit[..., None]


class AttentionInputs(NamedTuple):
    """What the attention core reads: queries and this call's keys, the committed ring, compressed entries, and
    the inputs the CSA indexer needs per query."""
    q: jax.Array  # [B, T, H, d], rope applied
    kv: jax.Array  # [B, T, d]: this call's keys (= values)
    ring_kv: jax.Array  # [B, R, d]: committed window keys
    ring_pos: jax.Array  # [B, R]: their positions, -2**30 where not committed
    positions: jax.Array  # [B, T]
    comp: jax.Array | None  # [B, N, d] compressed entries (CSA/HCA), None for SWA
    x: jax.Array  # [B, T, D] (indexer weights)
    q_lat: jax.Array  # [B, T, q_lora] (indexer queries)
    cos: jax.Array
    sin: jax.Array


def _window_mask(q_pos, k_pos, window: int):
    rel = q_pos[:, :, None] - k_pos[:, None, :]
    return (rel >= 0) & (rel < window)  # [B, Tq, S]


def sink_softmax(scores, sink):
    """Softmax over the last axis with a per-head sink [H] that only adds to the denominator."""
    sink = sink[None, :, None, None]
    top = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sink)
    p = jnp.exp(scores - top)
    return p / (jnp.sum(p, axis=-1, keepdims=True) + jnp.exp(sink - top))


def dense_core(a: AttentionInputs, sink, window: int, ratio: int, select):
    """Reference: one score matrix over [ring | all new keys | compressed] per query. Memory O(T·(R + T + N))."""
    q, d = a.q, a.q.shape[-1]
    keys = jnp.concatenate([a.ring_kv, a.kv], axis=1)
    key_pos = jnp.concatenate([a.ring_pos, a.positions], axis=1)
    scores = jnp.einsum("bthd,bsd->bhts", q, keys, preferred_element_type=jnp.float32)
    scores = jnp.where(_window_mask(a.positions, key_pos, window)[:, None], scores, NEG_INF)
    if ratio and select is not None:
        sel, valid = select(a.x, a.q_lat, a.positions, a.cos, a.sin)
        comp_keys = jnp.take_along_axis(a.comp[:, None], sel[..., None], axis=2).astype(q.dtype)  # [B, T, k, d]
        c_scores = jnp.einsum("bthd,btkd->bhtk", q, comp_keys, preferred_element_type=jnp.float32)
        c_scores = jnp.where(valid[:, None], c_scores, NEG_INF)
    elif ratio:
        causal = jnp.arange(a.comp.shape[1])[None, None, :] < ((a.positions + 1) // ratio)[..., None]
        c_scores = jnp.einsum("bthd,bsd->bhts", q, a.comp.astype(q.dtype), preferred_element_type=jnp.float32)
        c_scores = jnp.where(causal[:, None], c_scores, NEG_INF)
    if ratio:
        scores = jnp.concatenate([scores, c_scores], axis=-1)
    p = sink_softmax(scores * (1.0 / math.sqrt(d)), sink).astype(q.dtype)
    n_win = keys.shape[1]
    out = jnp.einsum("bhts,bsd->bthd", p[..., :n_win], keys)
    if ratio and select is not None:
        out = out + jnp.einsum("bhtk,btkd->bthd", p[..., n_win:], comp_keys)
    elif ratio:
        out = out + jnp.einsum("bhts,bsd->bthd", p[..., n_win:], a.comp.astype(q.dtype))
    return out


# ---- chunked: an online softmax over the keys each query chunk may see -------------------------------------

class _Partial(NamedTuple):
    """Softmax pieces over one key set: running max m [B, H, C], sum l [B, H, C], unnormalised out o [B, C, H, d]."""
    m: jax.Array
    l: jax.Array
    o: jax.Array


def _partial(scores, mask, values, spec: str) -> _Partial:
    scores = jnp.where(mask, scores, NEG_INF)
    m = jnp.max(scores, axis=-1)
    p = jnp.where(mask, jnp.exp(scores - m[..., None]), 0.0)
    o = jnp.einsum(spec, p.astype(values.dtype), values, preferred_element_type=jnp.float32)
    return _Partial(m, jnp.sum(p, axis=-1), o)


def _rescale(o, factor):
    return o * jnp.swapaxes(factor, 1, 2)[..., None]  # factor [B, H, C] -> [B, C, H, 1]


def _merge(a: _Partial, b: _Partial) -> _Partial:
    m = jnp.maximum(a.m, b.m)
    fa, fb = jnp.exp(a.m - m), jnp.exp(b.m - m)
    return _Partial(m, a.l * fa + b.l * fb, _rescale(a.o, fa) + _rescale(b.o, fb))


def _finish(part: _Partial, sink):
    """Normalise, the sink in the denominator: o / (l + e^sink), all in the running-max frame."""
    s = jnp.broadcast_to(sink[None, :, None], part.m.shape)
    m = jnp.maximum(part.m, s)
    f = jnp.exp(part.m - m)
    denom = part.l * f + jnp.exp(s - m)
    return _rescale(part.o, f / denom)


def _hca_blocks(q, q_pos, comp, ratio: int, block: int, scale: float) -> _Partial:
    """All causal compressed entries (w < (p + 1) // m), `block` entries at a time."""
    b, n, d = comp.shape
    limit = (q_pos + 1) // ratio  # [B, C]

    def one(ent, ent_idx):
        s = jnp.einsum("bthd,bsd->bhts", q, ent, preferred_element_type=jnp.float32) * scale
        mask = (ent_idx[None, None, :] < limit[..., None])[:, None]
        return _partial(s, mask, ent, "bhts,bsd->bthd")

    if n <= block:
        return one(comp.astype(q.dtype), jnp.arange(n))
    n_blocks = -(-n // block)
    padded = jnp.pad(comp.astype(q.dtype), ((0, 0), (0, n_blocks * block - n), (0, 0)))

    def step(acc, i):
        ent = jax.lax.dynamic_slice_in_dim(padded, i * block, block, axis=1)
        return _merge(acc, one(ent, i * block + jnp.arange(block))), None

    c, h = q.shape[1], q.shape[2]
    init = _Partial(jnp.full((b, h, c), NEG_INF, jnp.float32), jnp.zeros((b, h, c), jnp.float32),
                    jnp.zeros((b, c, h, d), jnp.float32))
    acc, _ = jax.lax.scan(step, init, jnp.arange(n_blocks))
    return acc


def chunked_core(a: AttentionInputs, sink, window: int, ratio: int, select, chunk: int):
    """Queries in chunks of `chunk`; each chunk sees the ring, the band of new keys its window reaches, and its
    compressed entries (all causal ones for HCA, blocked; its top-k for CSA, gathered per chunk). Memory per
    chunk O(chunk · (R + chunk + W + block or k)); equal to `dense_core` up to summation order."""
    b, t, h, d = a.q.shape
    c = min(chunk, t)
    n_chunks = -(-t // c)
    t_pad = n_chunks * c
    band = min(t_pad, c + window - 1)

    def pad(x, value=0):
        return jnp.pad(x, [(0, 0), (0, t_pad - t)] + [(0, 0)] * (x.ndim - 2), constant_values=value)

    scale = 1.0 / math.sqrt(d)
    q = pad(a.q)
    kv, positions = pad(a.kv), pad(a.positions, 2**29)  # padded keys lie in every real query's future
    x, q_lat, cos, sin = pad(a.x), pad(a.q_lat), pad(a.cos), pad(a.sin)

    def one(i):
        def rows(arr):
            return jax.lax.dynamic_slice_in_dim(arr, i * c, c, axis=1)

        q_i, pos_i = rows(q), rows(positions)
        off = jnp.clip(i * c - (window - 1), 0, t_pad - band)
        keys = jnp.concatenate([a.ring_kv, jax.lax.dynamic_slice_in_dim(kv, off, band, axis=1)], axis=1)
        key_pos = jnp.concatenate([a.ring_pos, jax.lax.dynamic_slice_in_dim(positions, off, band, axis=1)], axis=1)
        s = jnp.einsum("bthd,bsd->bhts", q_i, keys, preferred_element_type=jnp.float32) * scale
        part = _partial(s, _window_mask(pos_i, key_pos, window)[:, None], keys, "bhts,bsd->bthd")
        if ratio and select is not None:
            sel, valid = select(rows(x), rows(q_lat), pos_i, rows(cos), rows(sin))
            comp_keys = jnp.take_along_axis(a.comp[:, None], sel[..., None], axis=2).astype(q.dtype)
            s = jnp.einsum("bthd,btkd->bhtk", q_i, comp_keys, preferred_element_type=jnp.float32) * scale
            part = _merge(part, _partial(s, valid[:, None], comp_keys, "bhtk,btkd->bthd"))
        elif ratio:
            part = _merge(part, _hca_blocks(q_i, pos_i, a.comp, ratio, chunk, scale))
        return _finish(part, sink).astype(a.q.dtype)

    if n_chunks == 1:
        return one(0)[:, :t]
    groups = sequence_groups(n_chunks, b)
    if groups > 1:  # chunk groups side by side over the sequence axis of the mesh, each group's chunks in turn
        ids = constrain_groups(jnp.arange(n_chunks).reshape(groups, n_chunks // groups), b)
        out = constrain_groups(jax.vmap(lambda row: jax.lax.map(one, row))(ids), b).reshape(n_chunks, b, c, h, d)
    else:
        out = jax.lax.map(one, jnp.arange(n_chunks))  # [n_chunks, B, c, H, d]
    return jnp.moveaxis(out, 0, 1).reshape(b, t_pad, h, d)[:, :t]


class Attention(nnx.Module):
    def __init__(self, cfg: TargetConfig, ratio: int, *, dtype, rngs: nnx.Rngs):
        self.cfg, self.ratio = cfg, ratio
        h, d = cfg.n_heads, cfg.head_dim
        self.wq_a = Linear(cfg.dim, cfg.q_lora_rank, ("q_lora", "embed"), dtype=dtype, rngs=rngs)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps, dtype=dtype, axes=("q_lora",))
        self.wq_b = Linear(cfg.q_lora_rank, h * d, ("heads", "q_lora"), dtype=dtype, rngs=rngs)
        self.wkv = Linear(cfg.dim, d, ("kv", "embed"), dtype=dtype, rngs=rngs)
        self.kv_norm = RMSNorm(d, cfg.norm_eps, dtype=dtype, axes=("kv",))
        self.wo_a = Linear(h * d // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, ("o_groups", "o_group_in"),
                           dtype=dtype, rngs=rngs)
        self.wo_b = Linear(cfg.o_groups * cfg.o_lora_rank, cfg.dim, ("embed", "o_groups"), dtype=dtype, rngs=rngs)
        self.attn_sink = param(rngs, (h,), ("heads_only",), jnp.float32, init="zeros")
        self.compressor = Compressor(cfg.dim, d, ratio, cfg.norm_eps, dtype=dtype, rngs=rngs) if ratio else None
        self.indexer = Indexer(cfg, dtype=dtype, rngs=rngs) if ratio == 4 else None

    def __call__(self, x, positions, start, n_new, cache: dict):
        cfg = self.cfg
        b, t, _ = x.shape
        h, d = cfg.n_heads, cfg.head_dim
        inv_freq = yarn_inv_freq(cfg, compressed=self.ratio > 0)
        cos, sin = rope_angles(positions, inv_freq)
        q_lat = self.q_norm(self.wq_a(x))
        q = self.wq_b(q_lat).reshape(b, t, h, d)
        q = rms_norm(q, None, cfg.norm_eps)
        q = apply_rope(q, cos, sin)
        kv = apply_rope(self.kv_norm(self.wkv(x)), cos, sin)  # [B, T, d]: key and value at once

        # Sliding window: committed ring entries (positions < start) followed by this call's own keys.
        ring_pos = jnp.where((cache["win_pos"] >= 0) & (cache["win_pos"] < start[:, None]), cache["win_pos"], -2**30)
        ring_kv = cache["win_kv"].astype(kv.dtype)
        new_cache = dict(cache)
        win_kv, win_pos = ring_merge(cache["win_kv"], cache["win_pos"], kv, start, n_new)
        new_cache.update(win_kv=win_kv, win_pos=win_pos)

        comp, select = None, None
        if self.ratio:
            comp, tok_kv, tok_gate = self.compressor(x, start, n_new, cache["tok_kv"], cache["tok_gate"],
                                                     cache["tok_pos"], cache["comp"], inv_freq)
            new_cache.update(comp=comp, tok_kv=tok_kv, tok_gate=tok_gate)
            if self.indexer is not None:
                idx_comp, idx_kv, idx_gate = self.indexer.compressor(
                    x, start, n_new, cache["idx_tok_kv"], cache["idx_tok_gate"], cache["tok_pos"],
                    cache["idx_comp"], inv_freq)
                new_cache.update(idx_comp=idx_comp, idx_tok_kv=idx_kv, idx_tok_gate=idx_gate)
                indexer = self.indexer

                def select(xc, q_lat_c, pos_c, cos_c, sin_c):
                    return indexer.select(xc, q_lat_c, pos_c, idx_comp, cos_c, sin_c)
            new_cache["tok_pos"] = ring_positions(cache["tok_pos"], start, n_new)

        core = AttentionInputs(q=q, kv=kv, ring_kv=ring_kv, ring_pos=ring_pos, positions=positions, comp=comp,
                               x=x, q_lat=q_lat, cos=cos, sin=sin)
        sink = self.attn_sink[...].astype(jnp.float32)
        if cfg.attention_impl == "dense":
            out = dense_core(core, sink, cfg.window_size, self.ratio, select)
        else:
            out = chunked_core(core, sink, cfg.window_size, self.ratio, select, cfg.attention_chunk)
        out = apply_rope(out, cos, sin, inverse=True)  # K = V carried rope; undo it at the query position

        g = cfg.o_groups
        grouped = out.reshape(b, t, g, h * d // g)
        wo_a = self.wo_a.weight[...].reshape(g, cfg.o_lora_rank, h * d // g)
        u = jnp.einsum("btgi,goi->btgo", grouped.astype(wo_a.dtype), wo_a).reshape(b, t, g * cfg.o_lora_rank)
        return self.wo_b(u), new_cache
