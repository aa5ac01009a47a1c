"""DeepSeek-V4 MoE (spec §5): every layer, sqrt-softplus scores, hash routing on the first layers, shared expert.

Experts are stacked ([E, I, D] / [E, D, I]) so an `expert` mesh axis shards them. Two dispatch strategies compute
the same function: `dense` (every expert on every token, weighted by a sparse combine matrix: simple, GSPMD-friendly,
right for small expert counts) and `ragged` (tokens sorted by expert and fed to `jax.lax.ragged_dot`: top-k work
only, for real expert counts on one device).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hdflash_jax.config import TargetConfig
from hdflash_jax.deepseek_v4.layers import Buffer, Linear, param


def swiglu(gate, up, limit: float):
    """SiLU(min(gate, L)) · clamp(up, -L, L): the gate is clamped from above only."""
    return jax.nn.silu(jnp.minimum(gate, limit)) * jnp.clip(up, -limit, limit)


def route_scores(logits: jax.Array, score_func: str) -> jax.Array:
    if score_func == "sqrtsoftplus":
        return jnp.sqrt(jax.nn.softplus(logits))
    if score_func == "sigmoid":
        return jax.nn.sigmoid(logits)
    return jax.nn.softmax(logits, axis=-1)


class Gate(nnx.Module):
    def __init__(self, cfg: TargetConfig, hashed: bool, *, rngs: nnx.Rngs):
        self.hashed = hashed
        self.weight = param(rngs, (cfg.n_routed_experts, cfg.dim), ("expert", "embed"), jnp.dtype(cfg.param_dtype))
        if hashed:  # token id -> its experts; distinct ids per row by default (the reference drops duplicates)
            self.tid2eid = Buffer(jnp.zeros((cfg.vocab_size, cfg.n_activated_experts), jnp.int32))
        else:  # score correction: affects which experts are chosen, never their weights
            self.bias = Buffer(jnp.zeros((cfg.n_routed_experts,), jnp.float32))

    def __call__(self, x, token_ids, cfg: TargetConfig):
        """Returns (expert ids [N, k], weights [N, k] fp32) for flat tokens x [N, D]."""
        logits = jnp.einsum("nd,ed->ne", x.astype(jnp.float32), self.weight[...].astype(jnp.float32))
        scores = route_scores(logits, cfg.score_func)
        if self.hashed:
            idx = self.tid2eid[...][token_ids]
        else:
            _, idx = jax.lax.top_k(scores + self.bias[...], cfg.n_activated_experts)
        w = jnp.take_along_axis(scores, idx, axis=-1)
        w = w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20) * cfg.route_scale
        return idx, w


class Experts(nnx.Module):
    def __init__(self, cfg: TargetConfig, *, rngs: nnx.Rngs):
        e, i, d, dt = cfg.n_routed_experts, cfg.moe_inter_dim, cfg.dim, jnp.dtype(cfg.param_dtype)
        self.w1 = param(rngs, (e, i, d), ("expert", "mlp", "embed"), dt)
        self.w3 = param(rngs, (e, i, d), ("expert", "mlp", "embed"), dt)
        self.w2 = param(rngs, (e, d, i), ("expert", "embed", "mlp"), dt)


class MoE(nnx.Module):
    def __init__(self, cfg: TargetConfig, hashed: bool, *, rngs: nnx.Rngs, dispatch: str = "dense"):
        dt = jnp.dtype(cfg.param_dtype)
        self.cfg, self.dispatch = cfg, dispatch
        self.gate = Gate(cfg, hashed, rngs=rngs)
        self.experts = Experts(cfg, rngs=rngs)
        inter = cfg.n_shared_experts * cfg.moe_inter_dim
        self.shared_experts = SharedExpert(cfg.dim, inter, dtype=dt, rngs=rngs) if inter else None

    def __call__(self, x, token_ids):
        cfg = self.cfg
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        idx, w = self.gate(flat, token_ids.reshape(-1), cfg)
        if self.dispatch == "ragged":
            routed = _ragged_experts(flat, idx, w, self.experts, cfg)
        else:
            routed = _dense_experts(flat, idx, w, self.experts, cfg)
        out = routed.astype(x.dtype).reshape(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x, cfg.swiglu_limit)
        return out


class SharedExpert(nnx.Module):
    def __init__(self, dim: int, inter: int, *, dtype, rngs: nnx.Rngs):
        self.w1 = Linear(dim, inter, ("mlp", "embed"), dtype=dtype, rngs=rngs)
        self.w3 = Linear(dim, inter, ("mlp", "embed"), dtype=dtype, rngs=rngs)
        self.w2 = Linear(inter, dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)

    def __call__(self, x, limit: float):
        h = swiglu(self.w1(x).astype(jnp.float32), self.w3(x).astype(jnp.float32), limit)
        return self.w2(h.astype(x.dtype)).astype(x.dtype)


def _dense_experts(x, idx, w, experts: Experts, cfg: TargetConfig):
    combine = jnp.zeros((x.shape[0], cfg.n_routed_experts), jnp.float32)
    combine = combine.at[jnp.arange(x.shape[0])[:, None], idx].add(w)  # duplicates sum, as in transformers
    w1, w3, w2 = experts.w1[...], experts.w3[...], experts.w2[...]
    xc = x.astype(w1.dtype)
    gate = jnp.einsum("nd,eid->nei", xc, w1, preferred_element_type=jnp.float32)
    up = jnp.einsum("nd,eid->nei", xc, w3, preferred_element_type=jnp.float32)
    h = swiglu(gate, up, cfg.swiglu_limit) * combine[..., None]
    return jnp.einsum("nei,edi->nd", h.astype(w2.dtype), w2, preferred_element_type=jnp.float32)


def _ragged_experts(x, idx, w, experts: Experts, cfg: TargetConfig):
    n, k = idx.shape
    flat_e = idx.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)
    token_of = order // k
    group_sizes = jnp.bincount(flat_e, length=cfg.n_routed_experts).astype(jnp.int32)
    w1, w3, w2 = experts.w1[...], experts.w3[...], experts.w2[...]
    xs = x[token_of].astype(w1.dtype)
    gate = jax.lax.ragged_dot(xs, jnp.swapaxes(w1, 1, 2), group_sizes, preferred_element_type=jnp.float32)
    up = jax.lax.ragged_dot(xs, jnp.swapaxes(w3, 1, 2), group_sizes, preferred_element_type=jnp.float32)
    h = swiglu(gate, up, cfg.swiglu_limit) * w.reshape(-1)[order][:, None]
    y = jax.lax.ragged_dot(h.astype(w2.dtype), jnp.swapaxes(w2, 1, 2), group_sizes,
                           preferred_element_type=jnp.float32)
    return jnp.zeros((n, x.shape[-1]), jnp.float32).at[token_of].add(y)
