"""DeepSeek-V4 MoE: every layer, sqrt-softplus scores, hash routing on the first layers, shared expert.

Experts are stacked ([E, I, D] / [E, D, I]) so an `expert` mesh axis shards them. Three dispatch strategies
compute the same function (`TargetConfig.moe_dispatch`):
* `dense`: every expert on every token, weighted by a sparse combine matrix (simple, GSPMD-friendly, right for
  small expert counts);
* `ragged`: tokens sorted by expert and fed to `jax.lax.ragged_dot` (top-k work where ragged_dot has a native
  kernel; XLA:CPU lowers it to a masked dense matmul over all groups);
* `expert_parallel`: a `shard_map` over the `expert` (and `tensor`) axes; each device gathers the assignments of
  its own experts into per-expert slot buffers, runs them as one batched matmul, scatters back, and the partial
  outputs are summed over the axes. The main pass has ceil(1.25 · tokens · k / E) slots per expert; by default
  the assignments that did not fit run in overflow blocks after it (exact, nothing dropped, and a balanced
  routing costs ≈ 1.25× the active FLOPs); `moe_capacity` > 0 sets the main pass's factor and drops (and
  counts) what does not fit instead.
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


def _slot_ffn(xs, wslot, w1, w3, w2, limit: float):
    """SwiGLU experts over slot buffers: xs [G, S, D], wslot [G, S], weights [G, ...] -> [G, S, D] fp32."""
    xs = xs.astype(w1.dtype)
    gate = jnp.einsum("ecd,eid->eci", xs, w1, preferred_element_type=jnp.float32)
    up = jnp.einsum("ecd,eid->eci", xs, w3, preferred_element_type=jnp.float32)
    h = swiglu(gate, up, limit) * wslot[..., None]
    return jnp.einsum("eci,edi->ecd", h.astype(w2.dtype), w2, preferred_element_type=jnp.float32)


def _fill(dest, n_buf: int, token, flat_w, n: int):
    """Slot buffer contents from each assignment's destination (n_buf = out of range, dropped by the scatter):
    (source token per slot, n = the zero row; weight per slot)."""
    src = jnp.full((n_buf,), n, jnp.int32).at[dest].set(token, mode="drop")
    wslot = jnp.zeros((n_buf,), jnp.float32).at[dest].set(flat_w, mode="drop")
    return src, wslot


def _local_experts(x, idx, w, w1, w3, w2, *, first, slots: int, limit: float, exact: bool):
    """The assignments of experts [first, first + E_l) (E_l = w1.shape[0]) through slot buffers.

    Main pass: [E_l, slots, D], an expert's first `slots` assignments (token order). With `exact`, the
    assignments past that run afterwards in overflow blocks of `slots` (a block = one expert's next `slots`
    assignments), `OVERFLOW_GROUP` blocks per pass with their experts' weights gathered, passes while blocks
    remain: nothing is dropped, and a balanced routing pays for the main pass only. Without `exact` the rest is
    dropped and counted. x [N, D]; idx, w [N, k] (deduplicated: at most one slot per token and expert).
    Returns (partial output [N, D] fp32, assignments that found no slot)."""
    n, k = idx.shape
    n_local = w1.shape[0]
    e = idx.reshape(-1) - first
    mine = (idx.reshape(-1) >= 0) & (e >= 0) & (e < n_local)
    group = jnp.where(mine, e, n_local)  # n_local: someone else's (or no) expert
    order = jnp.argsort(group, stable=True)
    counts = jnp.bincount(group, length=n_local + 1)
    starts = jnp.cumsum(counts) - counts
    rank = jnp.zeros((n * k,), jnp.int32).at[order].set(jnp.arange(n * k) - starts[group[order]])
    token, flat_w = jnp.arange(n * k) // k, w.reshape(-1)
    xz = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])
    dest = jnp.where(mine & (rank < slots), group * slots + rank, n_local * slots)
    src, wslot = _fill(dest, n_local * slots, token, flat_w, n)
    y = _slot_ffn(xz[src].reshape(n_local, slots, -1), wslot.reshape(n_local, slots), w1, w3, w2, limit)
    out = jnp.zeros((n + 1, x.shape[1]), jnp.float32).at[src].add(y.reshape(n_local * slots, -1))
    overflow = mine & (rank >= slots)
    if not exact or slots >= n:  # an expert holds each token at most once: `slots >= n` never overflows
        return out[:n], jnp.sum(overflow).astype(jnp.int32)
    return _overflow_blocks(out, xz, group, rank, overflow, token, flat_w, counts[:n_local], w1, w3, w2,
                            slots=slots, limit=limit)[:n], jnp.zeros((), jnp.int32)


OVERFLOW_GROUP = 4  # overflow blocks (expert, `slots` assignments) per overflow pass


def _overflow_blocks(out, xz, group, rank, overflow, token, flat_w, counts, w1, w3, w2, *, slots, limit):
    """Run every assignment past an expert's first `slots` (rank >= slots), exactly once, into `out`."""
    n = xz.shape[0] - 1
    n_local = w1.shape[0]
    g = min(OVERFLOW_GROUP, n_local)
    blocks = (jnp.maximum(counts, 1) - 1) // slots  # per expert: ceil(max(count - slots, 0) / slots)
    first_block = jnp.cumsum(blocks) - blocks  # [E_l]
    n_blocks = jnp.sum(blocks)
    safe_group = jnp.minimum(group, n_local - 1)
    block_of = jnp.where(overflow, first_block[safe_group] + rank // slots - 1, -1)  # global overflow block id
    max_blocks = group.shape[0] // slots + g  # counts sum to <= N·k; + g: a pass never slices past the end
    block_expert = jnp.searchsorted(jnp.cumsum(blocks), jnp.arange(max_blocks), side="right")  # expert per block

    def one_pass(carry):
        out, p = carry
        local = block_of - p * g
        keep = overflow & (local >= 0) & (local < g)
        dest = jnp.where(keep, local * slots + rank % slots, g * slots)
        src, wslot = _fill(dest, g * slots, token, flat_w, n)
        experts = jnp.minimum(jax.lax.dynamic_slice_in_dim(block_expert, p * g, g), n_local - 1)
        y = _slot_ffn(xz[src].reshape(g, slots, -1), wslot.reshape(g, slots), w1[experts], w3[experts],
                      w2[experts], limit)
        return out.at[src].add(y.reshape(g * slots, -1)), p + 1

    out, _ = jax.lax.while_loop(lambda c: c[1] * g < n_blocks, one_pass, (out, jnp.int32(0)))
    return out


def _slots(cfg: TargetConfig, n_tokens: int) -> int:
    """Main-pass slots per expert: ceil(capacity · tokens · k / E); the exact default (capacity 0) sizes them
    with EXACT_CAPACITY and sends what does not fit through the overflow blocks, except for small calls (decode,
    verify: up to WHOLE_SLOTS_UP_TO tokens), which are bound by reading the weights: a slot per token, no overflow."""
    if cfg.moe_capacity == 0 and n_tokens <= WHOLE_SLOTS_UP_TO:
        return n_tokens
    capacity = cfg.moe_capacity or EXACT_CAPACITY
    want = math.ceil(capacity * n_tokens * cfg.n_activated_experts / cfg.n_routed_experts)
    return max(1, min(n_tokens, want))


EXACT_CAPACITY = 1.25  # main-pass slots of the exact (no-drop) default, in units of the balanced load
WHOLE_SLOTS_UP_TO = 128  # exact default: chunks of at most this many tokens get a slot per token (never overflow)
TOKEN_CHUNK = 2048  # tokens per slot-buffer pass: bounds the buffers [E_local, slots <= chunk, D] on long prompts


def _mesh_axis(sizes: dict, name: str, dim: int) -> str | None:
    """`name` if the mesh has it (size > 1) and it divides `dim`, else None (that dimension stays whole)."""
    size = sizes.get(name, 1)
    return name if size > 1 and dim % size == 0 else None


def _token_chunks(x, idx, w, w1, w3, w2, *, first, cfg: TargetConfig, seq: str | None, ways: int, summed: tuple):
    """`_local_experts` over chunks of about TOKEN_CHUNK tokens (slots, and capacity, count per chunk).

    `seq`: the mesh axis (of size `ways`) the tokens are split over inside a shard_map, else None. Each chunk
    gathers every device's next rows over `seq`, and its output is reduce-scattered back, so a device only holds
    its own rows of the output ([N_local, D]), never all N. `summed`: axes whose partial outputs are added."""
    n = x.shape[0]
    c = max(1, min(n, TOKEN_CHUNK // ways))
    n_chunks = -(-n // c)
    pad = n_chunks * c - n
    slots = _slots(cfg, c * ways)

    def one(args):
        xc, ic, wc = args
        if seq:
            xc, ic, wc = (jax.lax.all_gather(a, seq, tiled=True) for a in (xc, ic, wc))
        out, dropped = _local_experts(xc, ic, wc, w1, w3, w2, first=first, slots=slots, limit=cfg.swiglu_limit,
                                      exact=cfg.moe_capacity == 0)
        rest = tuple(a for a in summed if a != seq)
        out = jax.lax.psum(out, rest) if rest else out
        if seq:
            out = jax.lax.psum_scatter(out, seq, scatter_dimension=0, tiled=True)
        return out.astype(x.dtype), dropped

    if n_chunks == 1:
        return one((x, idx, w))

    def split(a, value):
        return jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), constant_values=value).reshape(n_chunks, c, -1)

    out, dropped = jax.lax.map(one, (split(x, 0), split(idx, -1), split(w, 0.0)))  # padding: no expert
    return out.reshape(n_chunks * c, -1)[:n], jnp.sum(dropped)


def _expert_parallel(x, idx, w, experts: Experts, cfg: TargetConfig):
    """Tokens split over the data axes and, where they divide, over the expert axis too (each chunk is gathered
    over it and its output reduce-scattered back); experts split over `expert`, their hidden dim over `tensor`."""
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
        return _token_chunks(x, idx, w, w1, w3, w2, first=0, cfg=cfg, seq=None, ways=1, summed=())
    seq = ex if ex and x.shape[0] % (n_rows * sizes[ex]) == 0 else None
    n_local = cfg.n_routed_experts // (sizes[ex] if ex else 1)
    summed = tuple(a for a in (ex, tp) if a)

    def local(x, idx, w, w1, w3, w2):
        first = jax.lax.axis_index(ex) * n_local if ex else 0
        out, dropped = _token_chunks(x, idx, w, w1, w3, w2, first=first, cfg=cfg, seq=seq,
                                       ways=sizes[seq] if seq else 1, summed=summed)
        # each device counts its own experts' drops over the tokens it saw: sum over experts, and over token
        # shards (rows; and `seq`, whose devices saw the same gathered chunks but own different experts)
        dropped = jax.lax.psum(dropped, tuple(a for a in (ex,) + rows if a))
        return out, dropped

    token_axes = rows + ((seq,) if seq else ())
    row = P(token_axes if len(token_axes) > 1 else (token_axes[0] if token_axes else None), None)
    return jax.shard_map(local, mesh=mesh, check_vma=False,
                         in_specs=(row, row, row, P(ex, tp, None), P(ex, tp, None), P(ex, None, tp)),
                         out_specs=(row, P()))(x, idx, w, w1, w3, w2)
