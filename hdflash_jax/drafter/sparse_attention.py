"""Block-sparse training attention of the block drafter, with an online softmax and its own backward pass.

N blocks of B query slots per sequence; block n (anchor a_n) sees context keys k < a_n and the B keys of its own
block, nothing else. Queries go in chunks of G blocks; each chunk loops over context key chunks of C keys only up to
the chunk's largest anchor (the mask as block indices: the rest is never computed), then over its blocks' own keys.
Nothing of size [N·B, S] is kept: the forward pass saves the output and the log-sum-exp per query, the backward
pass recomputes each score tile (flash attention's recipe) and accumulates the context keys' gradients over the
query chunks. On a mesh with sequence axes (`expert`) the query chunks run in groups side by side, one group per
shard (`_scan_chunks`). `concat_attend` under `training_mask` (drafter/model.py, drafter/training.py) is the
reference.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hdflash_jax.sharding import constrain_groups, sequence_groups

_NEG = -1e30


class SparseLayout(NamedTuple):
    """Static tiling: G blocks of B queries per query chunk, C context keys per key chunk."""
    block_size: int
    q_blocks: int
    k_chunk: int


def _pad_axis(x, axis: int, size: int):
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _chunks(x, n_chunks: int):
    """[b, n_chunks·L, ...] → [n_chunks, b, L, ...] (the scan axis first)."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, n_chunks, t // n_chunks, *x.shape[2:]), 1, 0)


def _unchunk(x):
    """[n, b, L, ...] → [b, n·L, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _key_chunks_needed(anchors_q, keep_q, c: int):
    """Key chunks a query chunk needs: ceil(max visible anchor / C) (anchors_q, keep_q [b, Qc])."""
    top = jnp.max(jnp.where(keep_q, anchors_q, 0))
    return (top + c - 1) // c


def _scores(qg, k, scale):
    """qg [b, Q, KV, g, d], k [b, C, KV, d] → fp32 [b, KV, g, Q, C]."""
    return jnp.einsum("bqkgd,bckd->bkgqc", qg, k.astype(qg.dtype), preferred_element_type=jnp.float32) * scale


def _block_scores(qg, kb, scale, bs: int):
    """Each query against its own block's keys: qg [b, Q, KV, g, d], kb [b, Q, KV, d] → [b, KV, g, Q, B]."""
    b, q, kv, g, d = qg.shape
    qn = qg.reshape(b, q // bs, bs, kv, g, d)
    kn = kb.reshape(b, q // bs, bs, kv, d).astype(qg.dtype)
    s = jnp.einsum("bnqkgd,bnckd->bkgnqc", qn, kn, preferred_element_type=jnp.float32) * scale
    return s.reshape(b, kv, g, q, bs)


def _block_pv(p, vb, bs: int):
    """p [b, KV, g, Q, B] · own-block values vb [b, Q, KV, d] → fp32 [b, KV, g, Q, d]."""
    b, kv, g, q, _ = p.shape
    pn = p.reshape(b, kv, g, q // bs, bs, bs).astype(vb.dtype)
    vn = vb.reshape(b, q // bs, bs, kv, vb.shape[-1])
    o = jnp.einsum("bkgnqc,bnckd->bkgnqd", pn, vn, preferred_element_type=jnp.float32)
    return o.reshape(b, kv, g, q, vb.shape[-1])


def _ctx_mask(kc, c: int, anchors_q, keep_q):
    """[b, 1, 1, Q, C]: key kc·C + i visible to a kept query with anchor a iff kc·C + i < a."""
    keys = kc * c + jnp.arange(c)
    return ((keys[None, None, :] < anchors_q[:, :, None]) & keep_q[:, :, None])[:, None, None]


def _forward_chunk(qg, kb, vb, anchors_q, keep_q, ctx_k, ctx_v, scale, lay: SparseLayout):
    """One query chunk: (out fp32 [b, KV, g, Q, d], lse fp32 [b, KV, g, Q])."""
    b, q, kv, g, d = qg.shape
    c = lay.k_chunk
    m0 = jnp.full((b, kv, g, q), _NEG, jnp.float32)
    l0 = jnp.zeros((b, kv, g, q), jnp.float32)
    acc0 = jnp.zeros((b, kv, g, q, d), jnp.float32)

    def online(carry, s, mask, pv):
        m, l, acc = carry
        s = jnp.where(mask, s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        corr = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None]) * mask
        return m_new, l * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv(p)

    def ctx_step(kc, carry):
        k = jax.lax.dynamic_slice_in_dim(ctx_k, kc * c, c, axis=1)
        v = jax.lax.dynamic_slice_in_dim(ctx_v, kc * c, c, axis=1)
        pv = lambda p: jnp.einsum("bkgqc,bckd->bkgqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return online(carry, _scores(qg, k, scale), _ctx_mask(kc, c, anchors_q, keep_q), pv)

    carry = jax.lax.fori_loop(0, _key_chunks_needed(anchors_q, keep_q, c), ctx_step, (m0, l0, acc0))
    own = jnp.broadcast_to(keep_q[:, None, None, :, None], (b, 1, 1, q, lay.block_size))
    m, l, acc = online(carry, _block_scores(qg, kb, scale, lay.block_size), own,
                       lambda p: _block_pv(p, vb, lay.block_size))
    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    return out, lse


def _backward_chunk(qg, kb, vb, anchors_q, keep_q, ctx_k, ctx_v, out, lse, dout, dck, dcv, scale,
                    lay: SparseLayout):
    """Gradients of one query chunk: (dq, dkb, dvb, dck, dcv) with the context ones accumulated."""
    b, q, kv, g, d = qg.shape
    c = lay.k_chunk
    delta = jnp.sum(out * dout, axis=-1)  # [b, KV, g, Q]

    def grads(s, mask):  # where, not a product: a query that sees nothing has lse 0 and exp(s) may overflow
        return jnp.where(mask, jnp.exp(jnp.where(mask, s, 0.0) - lse[..., None]), 0.0)

    def ctx_step(kc, carry):
        dq, dck, dcv = carry
        k = jax.lax.dynamic_slice_in_dim(ctx_k, kc * c, c, axis=1)
        v = jax.lax.dynamic_slice_in_dim(ctx_v, kc * c, c, axis=1)
        p = grads(_scores(qg, k, scale), _ctx_mask(kc, c, anchors_q, keep_q))
        dv = jnp.einsum("bkgqc,bkgqd->bckd", p, dout)
        dp = jnp.einsum("bkgqd,bckd->bkgqc", dout, v.astype(jnp.float32))
        ds = p * (dp - delta[..., None]) * scale
        dq = dq + jnp.einsum("bkgqc,bckd->bqkgd", ds, k.astype(jnp.float32))
        dk = jnp.einsum("bkgqc,bqkgd->bckd", ds, qg.astype(jnp.float32))
        dck = jax.lax.dynamic_update_slice_in_dim(
            dck, jax.lax.dynamic_slice_in_dim(dck, kc * c, c, axis=1) + dk, kc * c, axis=1)
        dcv = jax.lax.dynamic_update_slice_in_dim(
            dcv, jax.lax.dynamic_slice_in_dim(dcv, kc * c, c, axis=1) + dv, kc * c, axis=1)
        return dq, dck, dcv

    dq0 = jnp.zeros(qg.shape, jnp.float32)
    dq, dck, dcv = jax.lax.fori_loop(0, _key_chunks_needed(anchors_q, keep_q, c), ctx_step, (dq0, dck, dcv))
    bs = lay.block_size
    own = keep_q[:, None, None, :, None]
    p = grads(_block_scores(qg, kb, scale, bs), own)  # [b, KV, g, Q, B]
    n = q // bs
    pn = p.reshape(b, kv, g, n, bs, bs)
    don = dout.reshape(b, kv, g, n, bs, d)
    dvb = jnp.einsum("bkgnqc,bkgnqd->bnckd", pn, don).reshape(b, q, kv, d)
    vn = vb.reshape(b, n, bs, kv, d).astype(jnp.float32)
    dp = jnp.einsum("bkgnqd,bnckd->bkgnqc", don, vn)
    ds = pn * (dp - delta.reshape(b, kv, g, n, bs)[..., None]) * scale
    kn = kb.reshape(b, n, bs, kv, d).astype(jnp.float32)
    qn = qg.reshape(b, n, bs, kv, g, d).astype(jnp.float32)
    dq = dq + jnp.einsum("bkgnqc,bnckd->bnqkgd", ds, kn).reshape(b, q, kv, g, d)
    dkb = jnp.einsum("bkgnqc,bnqkgd->bnckd", ds, qn).reshape(b, q, kv, d)
    return dq, dkb, dvb, dck, dcv


def _scan_chunks(body, carry, xs):
    """`jax.lax.scan(body, carry, xs)` over the query chunks (the leading axis of xs). On a mesh whose sequence
    axes divide the chunk count, the chunks run as that many groups side by side, the group axis sharded over those
    axes (else every device would run every chunk: the queries' activations are sharded there); each group starts
    from `carry` and the groups' final carries are summed (the body only accumulates into it)."""
    n, b = jax.tree.leaves(xs)[0].shape[:2]  # xs: [chunks, rows, ...]
    groups = sequence_groups(n, b)
    if groups == 1:
        return jax.lax.scan(body, carry, xs)
    split = lambda x: constrain_groups(x.reshape(groups, n // groups, *x.shape[1:]), b, free_rest=True)
    carries, ys = jax.vmap(lambda x: jax.lax.scan(body, carry, x))(jax.tree.map(split, xs))
    ys = jax.tree.map(lambda y: constrain_groups(y, b, free_rest=True).reshape(n, *y.shape[2:]), ys)
    return jax.tree.map(lambda c: jnp.sum(c, axis=0), carries), ys


def _prepare(q, k, v, ctx_k, ctx_v, anchors, keep, lay: SparseLayout):
    """Pad blocks to a multiple of G and context to a multiple of C; split queries into chunks."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    bs, gq = lay.block_size, lay.q_blocks
    n = t // bs
    n_pad = -(-n // gq) * gq
    s_pad = -(-ctx_k.shape[1] // lay.k_chunk) * lay.k_chunk
    qg = _pad_axis(q.reshape(b, t, kv, h // kv, d), 1, n_pad * bs)
    a_q = jnp.repeat(_pad_axis(jnp.asarray(anchors, jnp.int32), 1, n_pad), bs, axis=1)
    keep_q = jnp.repeat(_pad_axis(jnp.asarray(keep, bool), 1, n_pad), bs, axis=1)
    n_chunks = n_pad // gq
    xs = tuple(_chunks(x, n_chunks) for x in (qg, _pad_axis(k, 1, n_pad * bs), _pad_axis(v, 1, n_pad * bs),
                                              a_q, keep_q))
    return xs, _pad_axis(ctx_k, 1, s_pad), _pad_axis(ctx_v, 1, s_pad)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def block_sparse_attention(q, k, v, ctx_k, ctx_v, anchors, keep, scale: float, lay: SparseLayout):
    """q [b, N·B, H, d]; k/v [b, N·B, KV, d] (the blocks' own); ctx_k/ctx_v [b, S, KV, d]; anchors / keep [b, N].
    Returns [b, N·B, H, d] in q's dtype; a dropped block (keep False) outputs 0."""
    return _sparse_fwd(q, k, v, ctx_k, ctx_v, anchors, keep, scale, lay)[0]


def _sparse_fwd(q, k, v, ctx_k, ctx_v, anchors, keep, scale, lay):
    b, t, h, d = q.shape
    xs, ck, cv = _prepare(q, k, v, ctx_k, ctx_v, anchors, keep, lay)

    def body(_, x):
        qg, kb, vb, a_q, keep_q = x
        return None, _forward_chunk(qg, kb, vb, a_q, keep_q, ck, cv, scale, lay)

    _, (out, lse) = _scan_chunks(body, None, xs)  # out [nc, b, KV, g, Q, d]
    o = jnp.moveaxis(out, 4, 2)  # [nc, b, Q, KV, g, d]
    o = _unchunk(o)[:, :t].reshape(b, t, h, d).astype(q.dtype)
    return o, (q, k, v, ctx_k, ctx_v, anchors, keep, out, lse)


def _sparse_bwd(scale, lay, res, g_out):
    q, k, v, ctx_k, ctx_v, anchors, keep, out, lse = res
    b, t, h, d = q.shape
    kv = k.shape[2]
    xs, ck, cv = _prepare(q, k, v, ctx_k, ctx_v, anchors, keep, lay)
    n_chunks = out.shape[0]
    dout = _pad_axis(g_out.astype(jnp.float32).reshape(b, t, kv, h // kv, d), 1, xs[0].shape[0] * xs[0].shape[2])
    dout = jnp.moveaxis(_chunks(dout, n_chunks), 2, 4)  # [nc, b, KV, g, Q, d]

    def body(carry, x):
        dck, dcv = carry
        qg, kb, vb, a_q, keep_q, o, l, do = x
        dq, dkb, dvb, dck, dcv = _backward_chunk(qg, kb, vb, a_q, keep_q, ck, cv, o, l, do, dck, dcv, scale, lay)
        return (dck, dcv), (dq, dkb, dvb)

    zeros = jnp.zeros(ck.shape, jnp.float32)
    (dck, dcv), (dq, dkb, dvb) = _scan_chunks(body, (zeros, zeros), xs + (out, lse, dout))
    s = ctx_k.shape[1]
    dq = _unchunk(dq)[:, :t].reshape(b, t, h, d).astype(q.dtype)
    dkb = _unchunk(dkb)[:, :t].astype(k.dtype)
    dvb = _unchunk(dvb)[:, :t].astype(v.dtype)
    return dq, dkb, dvb, dck[:, :s].astype(ctx_k.dtype), dcv[:, :s].astype(ctx_v.dtype), None, None


block_sparse_attention.defvjp(_sparse_fwd, _sparse_bwd)
