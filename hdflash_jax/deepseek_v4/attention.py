"""DeepSeek-V4 attention (spec §4): single-KV-head MQA over a sliding window plus compressed entries, with sinks.

Layer kinds by compress ratio m: 0 = sliding window only (SWA); 4 = compressed sparse attention (CSA: overlapping
compressor + lightning indexer top-k); other m = heavily compressed attention (HCA: all causal entries).

Every call extends the cache by a block of T tokens per row (prefill, one-token step and draft verification are
the same code) and returns the updated cache; see `cache.py` for the layout and why rollback is exact.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hdflash_jax.config import TargetConfig, yarn_inv_freq
from hdflash_jax.deepseek_v4.cache import ring_merge, ring_positions
from hdflash_jax.deepseek_v4.layers import Linear, RMSNorm, apply_rope, param, rms_norm, rope_angles

NEG_INF = -1e30  # finite, so fully masked rows never make NaN; every query sees at least itself


class Compressor(nnx.Module):
    """Gated softmax pooling of m tokens into one entry (c = 2 overlapping halves when m == 4), spec §4.3."""

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
    """Lightning indexer (spec §4.4): scores compressed entries per query, keeps the causal top-k."""

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


class Attention(nnx.Module):
    def __init__(self, cfg: TargetConfig, ratio: int, *, dtype, rngs: nnx.Rngs):
        self.cfg, self.ratio = cfg, ratio
        h, d = cfg.n_heads, cfg.head_dim
        self.wq_a = Linear(cfg.dim, cfg.q_lora_rank, ("q_lora", "embed"), dtype=dtype, rngs=rngs)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps, dtype=dtype, axes=("q_lora",))
        self.wq_b = Linear(cfg.q_lora_rank, h * d, ("heads", "q_lora"), dtype=dtype, rngs=rngs)
        self.wkv = Linear(cfg.dim, d, ("kv", "embed"), dtype=dtype, rngs=rngs)
        self.kv_norm = RMSNorm(d, cfg.norm_eps, dtype=dtype, axes=("kv",))
        self.wo_a = Linear(h * d // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, ("o_groups", None),
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
        keys = jnp.concatenate([cache["win_kv"].astype(kv.dtype), kv], axis=1)
        key_pos = jnp.concatenate([ring_pos, positions], axis=1)
        rel = positions[:, :, None] - key_pos[:, None, :]
        win_mask = (rel >= 0) & (rel < cfg.window_size)  # [B, T, R + T]
        scores = jnp.einsum("bthd,bsd->bhts", q, keys, preferred_element_type=jnp.float32)
        scores = jnp.where(win_mask[:, None], scores, NEG_INF)
        new_cache = dict(cache)
        win_kv, win_pos = ring_merge(cache["win_kv"], cache["win_pos"], kv, start, n_new)
        new_cache.update(win_kv=win_kv, win_pos=win_pos)

        values = [keys]
        if self.ratio:
            m = self.ratio
            comp, tok_kv, tok_gate = self.compressor(x, start, n_new, cache["tok_kv"], cache["tok_gate"],
                                                     cache["tok_pos"], cache["comp"], inv_freq)
            new_cache.update(comp=comp, tok_kv=tok_kv, tok_gate=tok_gate)
            if self.indexer is not None:
                idx_comp, idx_kv, idx_gate = self.indexer.compressor(
                    x, start, n_new, cache["idx_tok_kv"], cache["idx_tok_gate"], cache["tok_pos"],
                    cache["idx_comp"], inv_freq)
                new_cache.update(idx_comp=idx_comp, idx_tok_kv=idx_kv, idx_tok_gate=idx_gate)
                sel, valid = self.indexer.select(x, q_lat, positions, idx_comp, cos, sin)
                comp_keys = jnp.take_along_axis(comp[:, None], sel[..., None], axis=2)  # [B, T, k, d]
                c_scores = jnp.einsum("bthd,btkd->bhtk", q, comp_keys.astype(q.dtype),
                                      preferred_element_type=jnp.float32)
                c_scores = jnp.where(valid[:, None], c_scores, NEG_INF)
                values.append(comp_keys)
            else:
                causal = jnp.arange(comp.shape[1])[None, None, :] < ((positions + 1) // m)[..., None]
                c_scores = jnp.einsum("bthd,bsd->bhts", q, comp.astype(q.dtype), preferred_element_type=jnp.float32)
                c_scores = jnp.where(causal[:, None], c_scores, NEG_INF)
                values.append(comp)
            new_cache["tok_pos"] = ring_positions(cache["tok_pos"], start, n_new)
            scores = jnp.concatenate([scores, c_scores], axis=-1)

        scores = scores * (1.0 / math.sqrt(d))
        # Softmax with a per-head sink that only adds to the denominator.
        sink = self.attn_sink[...].astype(jnp.float32)[None, :, None, None]
        top = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sink)
        p = jnp.exp(scores - top)
        denom = jnp.sum(p, axis=-1, keepdims=True) + jnp.exp(sink - top)
        p = (p / denom).astype(q.dtype)
        n_win = keys.shape[1]
        out = jnp.einsum("bhts,bsd->bthd", p[..., :n_win], keys)
        if self.ratio:
            if self.indexer is not None:
                out = out + jnp.einsum("bhtk,btkd->bthd", p[..., n_win:], values[1].astype(q.dtype))
            else:
                out = out + jnp.einsum("bhts,bsd->bthd", p[..., n_win:], values[1].astype(q.dtype))
        out = apply_rope(out, cos, sin, inverse=True)  # K = V carried rope; undo it at the query position

        g = cfg.o_groups
        grouped = out.reshape(b, t, g, h * d // g)
        wo_a = self.wo_a.weight[...].reshape(g, cfg.o_lora_rank, h * d // g)
        u = jnp.einsum("btgi,goi->btgo", grouped.astype(wo_a.dtype), wo_a).reshape(b, t, g * cfg.o_lora_rank)
        return self.wo_b(u), new_cache
