"""DeepSeek-V4 MoE: every layer, sqrt-softplus scores, hash routing on the first layers, shared expert.

Experts are stacked ([E, I, D] / [E, D, I]) so an `expert` mesh axis shards them. Three dispatch strategies
compute the same function (`TargetConfig.moe_dispatch`):
* `dense`: every expert on every token, weighted by a sparse combine matrix (simple, GSPMD-friendly, right for
  small expert counts);
* `ragged`: tokens sorted by expert and fed to `jax.lax.ragged_dot` (top-k work where ragged_dot has a native
  kernel; XLA:CPU lowers it to a masked dense matmul over all groups);
* `expert_parallel`: a `shard_map` over the `expert` (and `tensor`) axes; each device gathers the assignments of
  its own experts into per-expert slot buffers, runs them as one batched matmul, scatters back, and the partial
  outputs are summed over the axes. Slots per expert are the token count (never drops: exact) unless
  `moe_capacity` > 0, which bounds them to ceil(capacity · tokens · k / E) and counts what did not fit.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

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


def resolve_dispatch(cfg: TargetConfig) -> str:
    """`auto`: dense for small expert counts (cheap, and exact in any mesh), expert-parallel otherwise."""
    if cfg.moe_dispatch != "auto":
        return cfg.moe_dispatch
    return "dense" if cfg.n_routed_experts <= 16 else "expert_parallel"


class MoE(nnx.Module):
    def __init__(self, cfg: TargetConfig, hashed: bool, *, rngs: nnx.Rngs, dispatch: str | None = None):
        dt = jnp.dtype(cfg.param_dtype)
        self.cfg, self.dispatch = cfg, dispatch or resolve_dispatch(cfg)
        self.gate = Gate(cfg, hashed, rngs=rngs)
        self.experts = Experts(cfg, rngs=rngs)
        inter = cfg.n_shared_experts * cfg.moe_inter_dim
        self.shared_experts = SharedExpert(cfg.dim, inter, dtype=dt, rngs=rngs) if inter else None

    def __call__(self, x, token_ids):
        return self.with_drops(x, token_ids)[0]

    def with_drops(self, x, token_ids):
        """(output, dropped assignments [] int32: nonzero only for expert_parallel with a capacity)."""
        cfg = self.cfg
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        idx, w = self.gate(flat, token_ids.reshape(-1), cfg)
        dropped = jnp.zeros((), jnp.int32)
        if self.dispatch == "ragged":
            routed = _ragged_experts(flat, idx, w, self.experts, cfg)
        elif self.dispatch == "expert_parallel":
            routed, dropped = _expert_parallel(flat, idx, w, self.experts, cfg)
        else:
            routed = _dense_experts(flat, idx, w, self.experts, cfg)
        out = routed.astype(x.dtype).reshape(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x, cfg.swiglu_limit)
        return out, dropped


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


def _dedupe(idx, w):
    """Fold repeated experts within a row into their first occurrence (weights summed, as the dense combine sums
    them); repeats become -1 (no expert). Afterwards a token occupies at most one slot per expert."""
    k = idx.shape[-1]
    same = idx[:, :, None] == idx[:, None, :]  # [N, k, k]
    repeat = jnp.any(same & jnp.tril(jnp.ones((k, k), bool), -1)[None], axis=-1)
    summed = jnp.sum(jnp.where(same, w[:, None, :], 0.0), axis=-1)
    return jnp.where(repeat, -1, idx), jnp.where(repeat, 0.0, summed)


def _local_experts(x, idx, w, w1, w3, w2, *, first, slots: int, limit: float):
    """The assignments of experts [first, first + E_l) (E_l = w1.shape[0]) through slot buffers [E_l, slots, D].

    x [N, D]; idx, w [N, k] (deduplicated). Returns (partial output [N, D] fp32, assignments that found no slot)."""
    n, k = idx.shape
    n_local = w1.shape[0]
    e = idx.reshape(-1) - first
    mine = (idx.reshape(-1) >= 0) & (e >= 0) & (e < n_local)
    group = jnp.where(mine, e, n_local)  # n_local: someone else's (or no) expert
    order = jnp.argsort(group, stable=True)
    counts = jnp.bincount(group, length=n_local + 1)
    starts = jnp.cumsum(counts) - counts
    slot = jnp.zeros((n * k,), jnp.int32).at[order].set(jnp.arange(n * k) - starts[group[order]])
    keep = mine & (slot < slots)
    dest = jnp.where(keep, group * slots + slot, n_local * slots)  # out of range -> dropped by the scatter
    src = jnp.full((n_local * slots,), n, jnp.int32).at[dest].set(jnp.arange(n * k) // k, mode="drop")
    wslot = jnp.zeros((n_local * slots,), jnp.float32).at[dest].set(w.reshape(-1), mode="drop")
    xs = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])[src].reshape(n_local, slots, -1)
    xs = xs.astype(w1.dtype)
    gate = jnp.einsum("ecd,eid->eci", xs, w1, preferred_element_type=jnp.float32)
    up = jnp.einsum("ecd,eid->eci", xs, w3, preferred_element_type=jnp.float32)
    h = swiglu(gate, up, limit) * wslot.reshape(n_local, slots, 1)
    y = jnp.einsum("eci,edi->ecd", h.astype(w2.dtype), w2, preferred_element_type=jnp.float32)
    out = jnp.zeros((n + 1, x.shape[1]), jnp.float32).at[src].add(y.reshape(n_local * slots, -1))
    return out[:n], jnp.sum(mine & ~keep).astype(jnp.int32)


def _slots(cfg: TargetConfig, n_tokens: int) -> int:
    if cfg.moe_capacity == 0:
        return n_tokens  # distinct experts per token: no expert can receive more than every token
    want = math.ceil(cfg.moe_capacity * n_tokens * cfg.n_activated_experts / cfg.n_routed_experts)
    return max(1, min(n_tokens, want))


TOKEN_CHUNK = 2048  # tokens per slot-buffer pass: bounds the buffers [E_local, slots <= chunk, D] on long prompts


def _token_chunks(x, idx, w, w1, w3, w2, *, first, cfg: TargetConfig):
    """`_local_experts` over chunks of at most TOKEN_CHUNK tokens (slots, and capacity, count per chunk)."""
    n = x.shape[0]
    c = min(n, TOKEN_CHUNK)
    if n == c:
        return _local_experts(x, idx, w, w1, w3, w2, first=first, slots=_slots(cfg, c), limit=cfg.swiglu_limit)
    n_chunks = -(-n // c)
    pad = n_chunks * c - n

    def split(a, value):
        return jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), constant_values=value).reshape(n_chunks, c, -1)

    def one(args):
        return _local_experts(*args, w1, w3, w2, first=first, slots=_slots(cfg, c), limit=cfg.swiglu_limit)

    out, dropped = jax.lax.map(one, (split(x, 0), split(idx, -1), split(w, 0.0)))  # padding: no expert
    return out.reshape(n_chunks * c, -1)[:n], jnp.sum(dropped)


def _mesh_axis(sizes: dict, name: str, dim: int) -> str | None:
    """`name` if the mesh has it (size > 1) and it divides `dim`, else None (that dimension stays whole)."""
    size = sizes.get(name, 1)
    return name if size > 1 and dim % size == 0 else None


def _expert_parallel(x, idx, w, experts: Experts, cfg: TargetConfig):
    idx, w = _dedupe(idx, w)
    w1, w3, w2 = experts.w1[...], experts.w3[...], experts.w2[...]
    mesh = jax.sharding.get_abstract_mesh()
    sizes = {} if mesh.empty else dict(mesh.shape)
    ex = _mesh_axis(sizes, "expert", cfg.n_routed_experts)
    tp = _mesh_axis(sizes, "tensor", cfg.moe_inter_dim)
    rows = tuple(a for a in ("data", "fsdp") if sizes.get(a, 1) > 1)
    n_rows = math.prod(sizes[a] for a in rows)
    if x.shape[0] % n_rows:  # tokens that do not split over the data axes stay whole on every device
        rows, n_rows = (), 1
    if ex is None and tp is None and not rows:
        return _token_chunks(x, idx, w, w1, w3, w2, first=0, cfg=cfg)
    n_local = cfg.n_routed_experts // (sizes[ex] if ex else 1)
    summed = tuple(a for a in (ex, tp) if a)

    def local(x, idx, w, w1, w3, w2):
        first = jax.lax.axis_index(ex) * n_local if ex else 0
        out, dropped = _token_chunks(x, idx, w, w1, w3, w2, first=first, cfg=cfg)
        out = jax.lax.psum(out, summed) if summed else out
        dropped = jax.lax.psum(dropped, tuple(a for a in (ex,) + rows if a))
        return out, dropped

    row = P(rows if len(rows) > 1 else (rows[0] if rows else None), None)
    return jax.shard_map(local, mesh=mesh, check_vma=False,
                         in_specs=(row, row, row, P(ex, tp, None), P(ex, tp, None), P(ex, None, tp)),
                         out_specs=(row, P()))(x, idx, w, w1, w3, w2)
