"""The DSpark drafter on a DeepSeek-V4 target (the layout of the `mtp.*` tensors in the DSpark checkpoints).

Conditioning: each tapped target layer's output streams [n, D] are pooled to [D] (mean over the n streams, or the
target's hc_head gate for `pooling="gated"`), the K layers concatenated and projected, c = main_norm(main_proj(f)).
Every block projects c with its own `wkv` (kv_norm, RoPE at the context position): those keys (= values) come
before the block's own. The block is [anchor, noise x (B-1)] at positions start..start+B-1 (start = committed
length, the anchor the bonus token at `start`), embedded with the target's frozen embedding and broadcast to the
n streams; it runs through V4 blocks (mHC around attention and MoE, sliding window only, no compressor or
indexer), whose queries see the context keys inside the window and every key of their own block (non-causal),
with the per-head sinks. The last block's hc_head collapses the streams, its norm and the target's frozen head give
base logits for all B slots: slot j drafts the token at start + j + 1, so a block of B drafts B tokens.

The Markov head then drafts sequentially over the block: logits_j = base_j + W2 W1[prev_j], prev_0 = the anchor,
prev_j = the token drafted at j - 1. The confidence head, sigmoid(proj([x_post_hc_j; W1[prev_j]])), estimates
the acceptance of slot j given that the slots before it were accepted (a scheduler's input; drafting does not use
it).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from hdflash_jax.config import TargetConfig, yarn_inv_freq
from hdflash_jax.deepseek_v4.attention import NEG_INF, Attention, sink_softmax
from hdflash_jax.deepseek_v4.cache import ring_merge, ring_positions
from hdflash_jax.deepseek_v4.layers import KeyGen, Linear, RMSNorm, apply_rope, param, rms_norm, rope_angles
from hdflash_jax.deepseek_v4.mhc import HyperHead, hc_head, hc_post
from hdflash_jax.deepseek_v4.model import Block
from hdflash_jax.dspark.config import DSparkConfig


class MarkovHead(nnx.Module):
    """Rank-r bigram bias: bias(prev) = W2 · W1[prev] over the vocabulary (W1 [V, r] a lookup, W2 [V, r])."""

    def __init__(self, vocab: int, rank: int, *, dtype, rngs):
        self.markov_w1 = nnx.Module()
        self.markov_w1.weight = param(rngs, (vocab, rank), ("vocab", None), dtype)
        self.markov_w2 = Linear(rank, vocab, ("vocab", None), dtype=dtype, rngs=rngs)

    def prev_embed(self, prev_ids):
        return self.markov_w1.weight[...][prev_ids]

    def bias(self, prev_ids):
        e = self.prev_embed(prev_ids)
        w = self.markov_w2.weight[...]
        return jnp.einsum("...r,vr->...v", e.astype(w.dtype), w, preferred_element_type=jnp.float32)


class ConfidenceHead(nnx.Module):
    def __init__(self, in_dim: int, *, dtype, rngs):
        self.proj = Linear(in_dim, 1, (None, None), dtype=dtype, rngs=rngs)


class PoolGate(nnx.Module):
    """`dspark-gated`: one tapped layer's streams collapsed by a gate initialised from the target's hc_head."""

    def __init__(self, n: int, dim: int, *, rngs):
        self.hc_head = HyperHead(n, dim, rngs=rngs)


class DSparkDrafter(nnx.Module):
    def __init__(self, dcfg: DSparkConfig, tcfg: TargetConfig, *, rngs):
        dcfg.check_target(tcfg)
        self.dcfg, self.tcfg = dcfg, tcfg
        self.bcfg = dcfg.block_config(tcfg)
        dt = jnp.dtype(tcfg.param_dtype)
        d, n, k = tcfg.dim, tcfg.hc_mult, len(dcfg.target_layer_ids)
        self.main_proj = Linear(k * d, d, ("embed_out", "embed"), dtype=dt, rngs=rngs)
        self.main_norm = RMSNorm(d, tcfg.norm_eps, dtype=dt)
        self.pool_gates = (nnx.List([PoolGate(n, d, rngs=rngs) for _ in range(k)])
                           if dcfg.pooling == "gated" else None)
        self.layers = nnx.List([Block(self.bcfg, 0, False, rngs=rngs) for _ in range(dcfg.num_blocks)])
        self.hc_head = HyperHead(n, d, rngs=rngs)
        self.norm = RMSNorm(d, tcfg.norm_eps, dtype=dt)
        self.markov_head = MarkovHead(tcfg.vocab_size, dcfg.markov_rank, dtype=dt, rngs=rngs)
        self.confidence_head = (ConfidenceHead(d + dcfg.markov_rank, dtype=dt, rngs=rngs)
                                if dcfg.confidence_head else None)

    # ---- conditioning --------------------------------------------------------------------------------------
    def pool(self, layer_streams) -> jax.Array:
        """Tapped layers' streams (K arrays [b, T, n, D], in target_layer_ids order) → features [b, T, K·D]."""
        tc = self.tcfg
        if len(layer_streams) != len(self.dcfg.target_layer_ids):
            raise ValueError(f"expected {len(self.dcfg.target_layer_ids)} tapped layers' streams, "
                             f"got {len(layer_streams)}")
        if self.pool_gates is None:
            pooled = [jnp.mean(s.astype(jnp.float32), axis=-2) for s in layer_streams]
        else:
            pooled = [g.hc_head(s, norm_eps=tc.norm_eps, hc_eps=tc.hc_eps).astype(jnp.float32)
                      for g, s in zip(self.pool_gates, layer_streams)]
        return jnp.concatenate(pooled, axis=-1).astype(jnp.dtype(tc.dtype))

    def context_kv(self, feats, positions) -> list[jax.Array]:
        """Pooled features [b, T, K·D] at positions [b, T] → each block's context keys (= values) [b, T, d]."""
        c = self.main_norm(self.main_proj(feats))
        cos, sin = rope_angles(positions, yarn_inv_freq(self.bcfg, compressed=False))
        return [apply_rope(layer.attn.kv_norm(layer.attn.wkv(c)), cos, sin) for layer in self.layers]

    # ---- the block pass ------------------------------------------------------------------------------------
    def hidden(self, embed: Callable, block_ids, positions, ctx_kvs, mask) -> jax.Array:
        """Block ids [b, T] at positions [b, T] → collapsed streams x_post_hc [b, T, D] (before the last norm).

        ctx_kvs: per block [b, S, d]; mask [b, T, S + T]: which context and block keys each query sees."""
        tc = self.tcfg
        h = embed(block_ids).astype(jnp.dtype(tc.dtype))
        streams = jnp.broadcast_to(h[:, :, None, :], h.shape[:2] + (tc.hc_mult, tc.dim))
        for layer, ctx_kv in zip(self.layers, ctx_kvs):
            streams = _block(layer, self.bcfg, streams, block_ids, positions, ctx_kv, mask)
        return self.hc_head(streams, norm_eps=tc.norm_eps, hc_eps=tc.hc_eps)

    def base_logits(self, head_logits: Callable, x_post_hc) -> jax.Array:
        return head_logits(self.norm(x_post_hc))

    def confidence(self, x_post_hc, prev_ids) -> jax.Array:
        """P(slot accepted | the slots before it accepted) [b, T] from x_post_hc [b, T, D] and prev ids [b, T]."""
        if self.confidence_head is None:
            raise ValueError("this DSpark drafter has no confidence head")
        e = self.markov_head.prev_embed(prev_ids).astype(x_post_hc.dtype)
        z = self.confidence_head.proj(jnp.concatenate([x_post_hc, e], axis=-1))[..., 0]
        return jax.nn.sigmoid(z.astype(jnp.float32))


def _attention(attn: Attention, cfg: TargetConfig, x, positions, ctx_kv, mask):
    """V4 sliding-window MQA with sinks over [context keys; the block's own keys] under `mask` [b, T, S + T]."""
    b, t, _ = x.shape
    h, d = cfg.n_heads, cfg.head_dim
    cos, sin = rope_angles(positions, yarn_inv_freq(cfg, compressed=False))
    q = attn.wq_b(attn.q_norm(attn.wq_a(x))).reshape(b, t, h, d)
    q = apply_rope(rms_norm(q, None, cfg.norm_eps), cos, sin)
    kv = apply_rope(attn.kv_norm(attn.wkv(x)), cos, sin)
    keys = jnp.concatenate([ctx_kv.astype(kv.dtype), kv], axis=1)
    s = jnp.einsum("bthd,bsd->bhts", q, keys, preferred_element_type=jnp.float32) * (1.0 / math.sqrt(d))
    s = jnp.where(mask[:, None], s, NEG_INF)
    p = sink_softmax(s, attn.attn_sink[...].astype(jnp.float32)).astype(q.dtype)
    out = apply_rope(jnp.einsum("bhts,bsd->bthd", p, keys), cos, sin, inverse=True)
    g = cfg.o_groups
    wo_a = attn.wo_a.weight[...].reshape(g, cfg.o_lora_rank, h * d // g)
    u = jnp.einsum("btgi,goi->btgo", out.reshape(b, t, g, h * d // g).astype(wo_a.dtype), wo_a)
    return attn.wo_b(u.reshape(b, t, g * cfg.o_lora_rank))


def _block(layer: Block, cfg: TargetConfig, streams, ids, positions, ctx_kv, mask):
    """The target's block wiring (hc_pre → norm → attention → hc_post; hc_pre → norm → MoE → hc_post)."""
    x, post, comb = layer._pre(layer.hc_attn, streams)
    a = _attention(layer.attn, cfg, layer.attn_norm(x), positions, ctx_kv, mask)
    streams = hc_post(a, streams, post, comb)
    x, post, comb = layer._pre(layer.hc_ffn, streams)
    f, _ = layer.ffn.with_drops(layer.ffn_norm(x), ids)
    return hc_post(f, streams, post, comb)


def block_ids(anchor, block_size: int, noise_token_id: int) -> jax.Array:
    """[b, B] = [anchor, noise x (B-1)]."""
    anchor = jnp.asarray(anchor, jnp.int32)
    noise = jnp.full(anchor.shape + (block_size - 1,), noise_token_id, jnp.int32)
    return jnp.concatenate([anchor[..., None], noise], axis=-1)


def markov_draft(drafter: DSparkDrafter, base, anchor, choose: Callable, keys):
    """Sequential drafting over the block: base [b, B, V] fp32, anchor [b], choose(logits, key) → (token, probs).

    Returns (tokens [b, B], corrected logits [b, B, V], probs [b, B, V] or None)."""
    def step(prev, inp):
        logits_j, key = inp
        logits_j = logits_j + drafter.markov_head.bias(prev)
        tok, probs = choose(logits_j, key)
        return tok, (tok, logits_j, probs)

    _, (tokens, logits, probs) = jax.lax.scan(step, jnp.asarray(anchor, jnp.int32),
                                              (jnp.swapaxes(base, 0, 1), keys))
    probs = None if probs is None else jnp.swapaxes(probs, 0, 1)
    return tokens.T, jnp.swapaxes(logits, 0, 1), probs


# ---- inference cache: the committed context's keys, a sliding-window ring per block ----------------------

def init_dspark_cache(drafter: DSparkDrafter, batch: int) -> dict:
    """{"length": [b], "pos": [b, W] (-1 = empty), "layers": [[b, W, d]] x blocks}: W = the window, which is all a
    block at positions >= length can see of the committed context."""
    tc = drafter.tcfg
    w = tc.window_size
    return {"length": jnp.zeros((batch,), jnp.int32), "pos": jnp.full((batch, w), -1, jnp.int32),
            "layers": [jnp.zeros((batch, w, tc.head_dim), jnp.dtype(tc.dtype)) for _ in drafter.layers]}


def extend_dspark_cache(drafter: DSparkDrafter, feats_new, n_new, cache: dict) -> dict:
    """Append committed positions length..length+n_new-1 (pooled features [b, T, K·D], first n_new[b] real)."""
    b, t = feats_new.shape[:2]
    n = jnp.asarray(n_new, jnp.int32)
    start = cache["length"]
    pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    kvs = drafter.context_kv(feats_new, pos)
    layers = [ring_merge(old, cache["pos"], kv, start, n)[0] for old, kv in zip(cache["layers"], kvs)]
    return {"length": start + n, "pos": ring_positions(cache["pos"], start, n), "layers": layers}


def draft_hidden(drafter: DSparkDrafter, embed: Callable, anchor, cache: dict, block_size: int):
    """x_post_hc [b, B, D] of the block [anchor, noise...] at positions length..length+B-1 (cache unchanged)."""
    tc = drafter.tcfg
    start = cache["length"]
    positions = start[:, None] + jnp.arange(block_size, dtype=jnp.int32)[None, :]
    rel = positions[:, :, None] - cache["pos"][:, None, :]
    ctx_ok = (cache["pos"][:, None, :] >= 0) & (rel > 0) & (rel < tc.window_size)
    b = start.shape[0]
    mask = jnp.concatenate([ctx_ok, jnp.ones((b, block_size, block_size), bool)], axis=-1)
    ids = block_ids(anchor, block_size, drafter.dcfg.noise_token_id)
    return drafter.hidden(embed, ids, positions, cache["layers"], mask)


# ---- construction --------------------------------------------------------------------------------------------

def init_dspark(dcfg: DSparkConfig, tcfg: TargetConfig, seed: int = 0) -> DSparkDrafter:
    with nnx.use_eager_sharding(False):
        return DSparkDrafter(dcfg, tcfg, rngs=KeyGen(seed))


def init_dspark_from_target(target, dcfg: DSparkConfig, seed: int = 0) -> DSparkDrafter:
    """Random blocks; the gated pooling's gates, hc_head and final norm copied from the target (hc_head, norm)."""
    d = init_dspark(dcfg, target.cfg, seed)
    src = target.hc_head
    heads = [d.hc_head] + ([g.hc_head for g in d.pool_gates] if d.pool_gates is not None else [])
    for g in heads:
        for name in ("fn", "base", "scale"):
            getattr(g, name)[...] = jnp.array(getattr(src, name)[...], copy=True)
    d.norm.weight[...] = jnp.array(target.norm.weight[...], dtype=d.norm.weight[...].dtype, copy=True)
    return d


def abstract_dspark(dcfg: DSparkConfig, tcfg: TargetConfig) -> DSparkDrafter:
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: DSparkDrafter(dcfg, tcfg, rngs=KeyGen(0)))


# ---- training: many blocks per sequence in one pass -------------------------------------------------------

def sample_anchors(key, loss_mask, n_anchors: int):
    """Anchors per row where the anchor and its first target are supervised, up to `n_anchors`, sorted.

    loss_mask [b, L] bool → (anchors [b, N] int32 (0 where unused), keep [b, N] bool)."""
    b, length = loss_mask.shape
    valid = loss_mask[:, :-1] & loss_mask[:, 1:]  # candidates 0..L-2
    r = jnp.where(valid, jax.random.uniform(key, valid.shape), 2.0)
    order = jnp.argsort(r, axis=1)[:, :n_anchors]
    keep = jnp.take_along_axis(r, order, axis=1) < 2.0
    anchors = jnp.sort(jnp.where(keep, order, length), axis=1)  # unused ones sort last
    keep = anchors < length
    return jnp.where(keep, anchors, 0).astype(jnp.int32), keep


def train_forward(drafter: DSparkDrafter, embed: Callable, head_logits: Callable, layer_streams, tokens,
                  anchors, keep, loss_mask):
    """Blocks at `anchors` [b, N] over a sequence tokens [b, L] with the tapped layers' streams (K x [b, L, n, D]).

    Block n is [tokens[a_n], noise x (B-1)] at positions a_n..a_n+B-1; it sees context keys k < a_n inside the
    window and its own block's keys (the inference path's view with a committed length of a_n). The Markov
    head is teacher-forced (prev = the true tokens). Returns a dict: logits [b, N, B, V] (Markov-corrected),
    base [b, N, B, V], targets [b, N, B], eval_mask [b, N, B] (slot j counts while slots 0..j are inside the
    sequence and supervised), confidence [b, N, B] (or None), positions [b, N, B] (a_n + j: the target's logits
    there are the distributions the slots approximate)."""
    cfg, tc = drafter.dcfg, drafter.tcfg
    b, length = tokens.shape
    n, bs = anchors.shape[1], cfg.block_size
    ctx_pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None], (b, length))
    ctx_kvs = drafter.context_kv(drafter.pool(layer_streams), ctx_pos)
    pos = anchors[:, :, None] + jnp.arange(bs, dtype=jnp.int32)[None, None, :]  # [b, N, B]
    ids = jnp.where(jnp.arange(bs)[None, None, :] == 0, jnp.take_along_axis(tokens, anchors, axis=1)[..., None],
                    cfg.noise_token_id).reshape(b, n * bs)
    q_pos, q_anchor = pos.reshape(b, n * bs), jnp.repeat(anchors, bs, axis=1)
    rel = q_pos[:, :, None] - ctx_pos[:, None, :]
    ctx_ok = (ctx_pos[:, None, :] < q_anchor[:, :, None]) & (rel < tc.window_size)
    blk = jnp.arange(n * bs) // bs
    own = jnp.broadcast_to(blk[:, None] == blk[None, :], (b, n * bs, n * bs))
    mask = jnp.concatenate([ctx_ok, own], axis=-1)
    x = drafter.hidden(embed, ids, q_pos, ctx_kvs, mask)  # [b, N*B, D]
    base = drafter.base_logits(head_logits, x).reshape(b, n, bs, -1)
    label_idx = pos + 1
    targets = jnp.take_along_axis(tokens, jnp.clip(label_idx, 0, length - 1).reshape(b, -1), axis=1).reshape(pos.shape)
    sup = jnp.take_along_axis(loss_mask, jnp.clip(label_idx, 0, length - 1).reshape(b, -1), axis=1).reshape(pos.shape)
    eval_mask = jnp.cumprod((sup & (label_idx < length) & keep[..., None]).astype(jnp.int32), axis=-1) > 0
    prev = jnp.concatenate([jnp.take_along_axis(tokens, anchors, axis=1)[..., None], targets[..., :-1]], axis=-1)
    logits = base + drafter.markov_head.bias(prev)
    conf = (drafter.confidence(x, prev.reshape(b, n * bs)).reshape(b, n, bs)
            if drafter.confidence_head is not None else None)
    return {"logits": logits, "base": base, "targets": targets, "eval_mask": eval_mask, "confidence": conf,
            "positions": pos}
