"""Manifold-constrained hyper-connections (mHC): hc_pre, Sinkhorn–Knopp, hc_post, hc_head.

All mixing math runs in fp32. Streams H have shape [..., n, D] (n = hc_mult).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hdflash_jax.deepseek_v4.layers import param


def _flat_rms_mix(streams: jax.Array, fn: jax.Array, norm_eps: float) -> jax.Array:
    """μ = ρ·(fn x): fn applied to the weightless-RMS-normed flattened streams (x = vec(H), stream-major)."""
    x = streams.reshape(*streams.shape[:-2], -1).astype(jnp.float32)
    rho = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + norm_eps)
    return jnp.einsum("...i,oi->...o", x, fn.astype(jnp.float32)) * rho


def sinkhorn(logits: jax.Array, iters: int, eps: float) -> jax.Array:
    """Near doubly stochastic C from [.., n, n] logits, in DeepSeek's exact order (ends on a column step)."""
    c = jax.nn.softmax(logits, axis=-1) + eps
    c = c / (jnp.sum(c, axis=-2, keepdims=True) + eps)

    def rows_then_cols(_, c):
        c = c / (jnp.sum(c, axis=-1, keepdims=True) + eps)
        return c / (jnp.sum(c, axis=-2, keepdims=True) + eps)

    # a rolled loop: the same arithmetic as unrolling, a fraction of the compile time
    return jax.lax.fori_loop(0, iters - 1, rows_then_cols, c)


def hc_pre(streams, fn, base, scale, *, n: int, norm_eps: float, hc_eps: float, sinkhorn_iters: int):
    """Collapse n streams into one block input and compute the post weights and the mixing matrix.

    Returns (x_in [.., D] in the streams' dtype, post [.., n] fp32, comb [.., n, n] fp32 with comb[j, k] moving
    old stream j into new stream k).
    """
    mu = _flat_rms_mix(streams, fn, norm_eps)
    base = base.astype(jnp.float32)
    scale = scale.astype(jnp.float32)
    pre = jax.nn.sigmoid(mu[..., :n] * scale[0] + base[:n]) + hc_eps
    post = 2.0 * jax.nn.sigmoid(mu[..., n:2 * n] * scale[1] + base[n:2 * n])
    comb_logits = mu[..., 2 * n:] * scale[2] + base[2 * n:]
    comb = sinkhorn(comb_logits.reshape(*comb_logits.shape[:-1], n, n), sinkhorn_iters, hc_eps)
    x_in = jnp.einsum("...k,...kd->...d", pre, streams.astype(jnp.float32)).astype(streams.dtype)
    return x_in, post, comb


def hc_post(block_out, streams, post, comb):
    """H'_k = post_k · f + Σ_j C_jk · H_j  (note the transpose: C is not symmetric)."""
    mixed = jnp.einsum("...jk,...jd->...kd", comb, streams.astype(jnp.float32))
    out = post[..., :, None] * block_out.astype(jnp.float32)[..., None, :] + mixed
    return out.astype(streams.dtype)


def hc_head(streams, fn, base, scale, *, norm_eps: float, hc_eps: float) -> jax.Array:
    """The final collapse y = Σ_k w_k H_k with independent sigmoid gates w (no Sinkhorn, no post/comb).

    This one function is also HyperDFlash's gated residual reducer (`hdflash_jax.drafter.reducer`).
    """
    mu = _flat_rms_mix(streams, fn, norm_eps)
    w = jax.nn.sigmoid(mu * scale.astype(jnp.float32) + base.astype(jnp.float32)) + hc_eps
    return jnp.einsum("...k,...kd->...d", w, streams.astype(jnp.float32)).astype(streams.dtype)


class HyperConnection(nnx.Module):
    """Parameters of one hc_pre site (`hc_attn_*` / `hc_ffn_*`): fn [(2+n)n, nD], base [(2+n)n], scale [3]."""

    def __init__(self, n: int, dim: int, *, rngs: nnx.Rngs):
        m = (2 + n) * n
        self.fn = param(rngs, (m, n * dim), ("hc", "hc_in"), jnp.float32)
        self.base = param(rngs, (m,), ("hc",), jnp.float32, init="zeros")
        self.scale = param(rngs, (3,), (None,), jnp.float32, init="ones")


class HyperHead(nnx.Module):
    """Parameters of hc_head: fn [n, nD], base [n], scale [1]."""

    def __init__(self, n: int, dim: int, *, rngs: nnx.Rngs):
        self.fn = param(rngs, (n, n * dim), ("hc", "hc_in"), jnp.float32)
        self.base = param(rngs, (n,), ("hc",), jnp.float32, init="zeros")
        self.scale = param(rngs, (1,), (None,), jnp.float32, init="ones")

    def __call__(self, streams, *, norm_eps: float, hc_eps: float):
        return hc_head(streams, self.fn[...], self.base[...], self.scale[...], norm_eps=norm_eps, hc_eps=hc_eps)
