"""Small building blocks shared by the target and the drafters: linear, RMSNorm, interleaved RoPE.

Weights keep DeepSeek's layout, `weight[out, in]`, so a checkpoint tensor lands in the tree without a transpose
and the name map stays a rename. Every parameter carries logical axis names (see `hdflash_jax.sharding`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class Buffer(nnx.Variable):
    """Checkpoint state that is not trained (hash routing table, router score-correction bias)."""


class KeyGen:
    """A stateless stand-in for `nnx.Rngs` (same `.params()` call) for building big models.

    `nnx.Rngs` threads its counter through NNX state, which makes tracing (`nnx.eval_shape` of a 61-layer model)
    quadratic in the number of parameters; folding a Python counter into one key keeps it linear.
    """

    def __init__(self, seed: int):
        self.key, self.count = jax.random.key(seed), 0

    def params(self) -> jax.Array:
        self.count += 1
        return jax.random.fold_in(self.key, self.count)


def param(rngs: "nnx.Rngs | KeyGen | None", shape, axes, dtype, init="normal", std=0.02) -> nnx.Param:
    if init == "zeros":
        fn = nnx.initializers.zeros
    elif init == "ones":
        fn = nnx.initializers.ones
    else:
        fn = nnx.initializers.normal(std)
    return nnx.Param(fn(rngs.params() if rngs is not None else None, shape, dtype), out_sharding=axes)


class Linear(nnx.Module):
    def __init__(self, in_dim: int, out_dim: int, axes: tuple, *, dtype, rngs: nnx.Rngs):
        self.weight = param(rngs, (out_dim, in_dim), axes, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.weight[...]
        return jnp.einsum("...i,oi->...o", x.astype(w.dtype), w)


class RMSNorm(nnx.Module):
    """w · x / rms(x), computed in fp32 and cast back (DeepSeek keeps the weights apart from the matmul dtype)."""

    def __init__(self, dim: int, eps: float, *, dtype, axes=("norm",)):
        self.weight = nnx.Param(jnp.ones((dim,), dtype), out_sharding=axes)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


def rms_norm(x: jax.Array, weight: jax.Array | None, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight.astype(jnp.float32)
    return y.astype(x.dtype)


def rope_angles(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos/sin of p·θ_i for each interleaved pair: [..., rope_dim/2] in fp32."""
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, inverse: bool = False) -> jax.Array:
    """Rotate the trailing rope dims of x, pairs (2i, 2i+1) as complex numbers (DeepSeek-V4's interleaved RoPE).

    x: [..., S, (H,) d]; cos/sin: [..., S, r/2], broadcast over a head axis when x has one more dim.
    """
    r = cos.shape[-1] * 2
    if x.ndim == cos.ndim + 1:
        cos, sin = cos[..., None, :], sin[..., None, :]
    if inverse:
        sin = -sin
    nope, rope = x[..., :-r], x[..., -r:].astype(jnp.float32)
    re, im = rope[..., 0::2], rope[..., 1::2]
    out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1).reshape(rope.shape)
    return jnp.concatenate([nope, out.astype(x.dtype)], axis=-1)
