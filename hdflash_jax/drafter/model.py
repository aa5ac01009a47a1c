"""The block drafter (vanilla DFlash and HyperDFlash): one non-causal pass drafts B−1 tokens.

Per committed context position p the target's features (final pre-collapse streams, or K tapped layers) go
through the reducer to one conditioning vector c_p [D]. Every draft layer projects c_p with its *own* K/V
projections (k-norm and RoPE at position p on the keys; no input norm on c, no queries, no residual path) and puts
those keys/values before the block's own. The block is [anchor, mask × (B−1)] at positions start..start+B−1
(start = the committed length; the anchor is the bonus token at `start`, known but not yet in the context), embedded
with the target's frozen embedding; its B queries see every committed context key and all B block keys
(non-causal). Logits of slots 1..B−1 come from the drafter's final norm and the target's frozen LM head.

Two paths share every layer:
* inference: `draft(...)` appends the new context positions to a position-indexed draft cache (`drafter/cache.py`:
  c once per position by default, K/V recomputed per step over the live length), then runs the block; the
  block's own K/V never enter the cache, and a rollback is `deepseek_v4.cache.set_committed_length(cache, length)`;
* training (`drafter/training.py`): `train_forward(...)` runs N blocks of B slots per sequence in one pass under `training_mask` (block n,
  anchor a_n, sees context keys k < a_n and its own block's keys, nothing else).

The target's embedding and head are passed into the calls (the target module itself, or the two arrays) and are
never part of the drafter's parameters.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hdflash_jax.config import DrafterConfig, rope_inv_freq
from hdflash_jax.drafter.cache import cache_attend, cache_max_len, extend_draft_cache, init_draft_cache  # noqa: F401
from hdflash_jax.drafter.reducer import feature_shape, make_reducer
from hdflash_jax.deepseek_v4.layers import Linear, RMSNorm, apply_rope, rope_angles

_NEG = -1e30


# ---- layers --------------------------------------------------------------------------------------------------

def masked_attention(q, k, v, mask, scale: float):
    """GQA attention. q [b, Tq, H, d], k/v [b, Tk, KV, d], mask [b, Tq, Tk] bool → [b, Tq, H, d].

    Softmax in fp32; masked keys get exactly zero weight, and a query with no visible key outputs 0 (not NaN).
    """
    b, tq, h, d = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, tq, kv, h // kv, d)
    s = jnp.einsum("bqkgd,bskd->bkgqs", qg, k.astype(q.dtype), preferred_element_type=jnp.float32) * scale
    m = mask[:, None, None, :, :]
    s = jnp.where(m, s, _NEG)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True)) * m
    den = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(den > 0, den, 1.0)
    out = jnp.einsum("bkgqs,bskd->bqkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, tq, h, d).astype(q.dtype)


class DraftLayer(nnx.Module):
    """Pre-norm decoder layer (Qwen3-style: q/k RMSNorm per head, RoPE, GQA, SwiGLU) with KV injection."""

    def __init__(self, cfg: DrafterConfig, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        d, h, kv, hd = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.input_norm = RMSNorm(d, cfg.norm_eps, dtype=pdt)
        self.wq = Linear(d, h * hd, ("heads", "embed"), dtype=pdt, rngs=rngs)
        self.wk = Linear(d, kv * hd, ("kv", "embed"), dtype=pdt, rngs=rngs)
        self.wv = Linear(d, kv * hd, ("kv", "embed"), dtype=pdt, rngs=rngs)
        self.wo = Linear(h * hd, d, ("embed", "heads"), dtype=pdt, rngs=rngs)
        self.q_norm = RMSNorm(hd, cfg.norm_eps, dtype=pdt, axes=(None,))
        self.k_norm = RMSNorm(hd, cfg.norm_eps, dtype=pdt, axes=(None,))
        self.post_attn_norm = RMSNorm(d, cfg.norm_eps, dtype=pdt)
        self.w1 = Linear(d, cfg.inter_dim, ("mlp", "embed"), dtype=pdt, rngs=rngs)
        self.w3 = Linear(d, cfg.inter_dim, ("mlp", "embed"), dtype=pdt, rngs=rngs)
        self.w2 = Linear(cfg.inter_dim, d, ("embed", "mlp"), dtype=pdt, rngs=rngs)

    def _kv(self, x, positions):
        """K/V of inputs x [b, T, D] at positions [b, T]: k = RoPE(knorm(W_k x)), v = W_v x."""
        cfg = self.cfg
        b, t, _ = x.shape
        cos, sin = rope_angles(positions, rope_inv_freq(cfg.head_dim, cfg.rope_theta))
        k = self.k_norm(self.wk(x).reshape(b, t, cfg.n_kv_heads, cfg.head_dim))
        v = self.wv(x).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        return apply_rope(k, cos, sin), v

    def context_kv(self, c, positions):
        """KV injection: the conditioning vectors c [b, T, D] (already normed; no input norm here)."""
        return self._kv(c.astype(jnp.dtype(self.cfg.dtype)), positions)

    def attention(self, x, positions, attend: Callable):
        """The attention sublayer on normed inputs x [b, Tq, D]: q/k/v, `attend`, the output projection."""
        cfg = self.cfg
        b, t, _ = x.shape
        cos, sin = rope_angles(positions, rope_inv_freq(cfg.head_dim, cfg.rope_theta))
        q = apply_rope(self.q_norm(self.wq(x).reshape(b, t, cfg.n_heads, cfg.head_dim)), cos, sin)
        k, v = self._kv(x, positions)
        return self.wo(attend(q, k, v).reshape(b, t, cfg.n_heads * cfg.head_dim))

    def mlp(self, x):
        return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))

    def __call__(self, h, positions, attend: Callable, block_len: int | None = None):
        """h [b, Tq, D] at positions [b, Tq]. `attend(q, k, v)` gets the block's own q [b, Tq, H, hd] and
        k/v [b, Tq, KV, hd] (normed, RoPE'd) and returns [b, Tq, H, hd]: it puts the injected context keys before
        the block's and applies the path's mask (inference: `cache_attend`; training: `drafter.training`).
        `block_len`: the rows of h are blocks of this many slots (None: one block); a plain layer ignores it."""
        h = h + self.attention(self.input_norm(h), positions, attend).astype(h.dtype)
        return h + self.mlp(self.post_attn_norm(h)).astype(h.dtype)


def concat_attend(ctx_k, ctx_v, mask, scale: float) -> Callable:
    """attend(q, k, v) over [context keys; block keys] under a dense mask [b, Tq, S + Tq] (the reference path)."""
    def attend(q, k, v):
        keys = jnp.concatenate([ctx_k.astype(k.dtype), k], axis=1)
        values = jnp.concatenate([ctx_v.astype(v.dtype), v], axis=1)
        return masked_attention(q, keys, values, mask, scale)
    return attend


class BlockDrafter(nnx.Module):
    """reducer (gated / linear) → n_layers DraftLayers with KV injection → final norm (→ target head)."""
    layer_cls = DraftLayer  # DFlash 2's drafter (drafter/dflash2.py) wraps each sublayer in a convolution

    def __init__(self, cfg: DrafterConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.reducer = make_reducer(cfg, rngs=rngs)
        self.layers = nnx.List([self.layer_cls(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype=jnp.dtype(cfg.param_dtype))

    def condition(self, ctx_feats: jax.Array) -> jax.Array:
        """Context features [b, T, *feature_shape] → c [b, T, D] (reducer math in fp32, cast to cfg.dtype)."""
        want = feature_shape(self.cfg)
        if tuple(ctx_feats.shape[2:]) != want:
            raise ValueError(f"ctx_feats: expected trailing shape {want} for conditioning="
                             f"{self.cfg.conditioning!r}, got {tuple(ctx_feats.shape)}")
        return self.reducer(ctx_feats).astype(jnp.dtype(self.cfg.dtype))

    def context_kv(self, ctx_feats, positions) -> list[tuple[jax.Array, jax.Array]]:
        c = self.condition(ctx_feats)
        return [layer.context_kv(c, positions) for layer in self.layers]

    def hidden(self, h, positions, attends: list[Callable]) -> jax.Array:
        """Run the layers over block inputs h [b, Tq, D], layer i attending with attends[i]; returns the
        final-normed hidden [b, Tq, D]."""
        h = h.astype(jnp.dtype(self.cfg.dtype))
        for layer, attend in zip(self.layers, attends):
            h = layer(h, positions, attend)  # one block per row: a layer's default
        return self.norm(h)


# ---- frozen target pieces ------------------------------------------------------------------------------------

def _target_fns(target, dtype) -> tuple[Callable, Callable]:
    """(embed_tokens, head_logits) from a target module (`DeepseekV4`) or a pair (embed [V, D], head [V, D])."""
    if hasattr(target, "embed_tokens") and hasattr(target, "head_logits"):
        return (lambda ids: jax.lax.stop_gradient(target.embed_tokens(ids)).astype(dtype)), target.head_logits
    embed, head = target
    return frozen_embed(embed, dtype), frozen_head(head)


def frozen_embed(embed, dtype):
    return lambda ids: jax.lax.stop_gradient(embed)[ids].astype(dtype)


def frozen_head(head):
    def f(normed):
        w = jax.lax.stop_gradient(head)
        return jnp.einsum("...d,vd->...v", normed.astype(w.dtype), w, preferred_element_type=jnp.float32)
    return f


def target_io(target) -> tuple[jax.Array, jax.Array]:
    """The two frozen arrays the drafter uses from a `DeepseekV4`: (embedding [V, D], LM head weight [V, D])."""
    return target.embed[...], target.head.weight[...]


def target_io_tree(tree: dict) -> dict:
    """The part of a target's params tree (`training.pure.PureModule.tree()`) that `target_io` reads: what a
    training step on offline features holds of the target."""
    return {"embed": tree["embed"], "head": {"weight": tree["head"]["weight"]}}


def target_io_arrays(tree: dict) -> tuple:
    """`target_io` of a target's params tree, whole or `target_io_tree`."""
    return tree["embed"], tree["head"]["weight"]


# ---- inference: draft cache + one-pass drafting --------------------------------------------------------------

def block_token_ids(anchor_tokens, block_size: int, mask_token_id: int) -> jax.Array:
    """[..., B] = [anchor, mask × (B−1)] for anchor_tokens [...]."""
    anchor_tokens = jnp.asarray(anchor_tokens, jnp.int32)
    masks = jnp.full(anchor_tokens.shape + (block_size - 1,), mask_token_id, jnp.int32)
    return jnp.concatenate([anchor_tokens[..., None], masks], axis=-1)


def _block_inputs(drafter: BlockDrafter, target, anchor_tokens, start, bs: int):
    cfg = drafter.cfg
    embed, head = _target_fns(target, jnp.dtype(cfg.dtype))
    positions = start[:, None] + jnp.arange(bs, dtype=jnp.int32)[None, :]
    return embed(block_token_ids(anchor_tokens, bs, cfg.mask_token_id)), positions, head


def draft_block(drafter: BlockDrafter, target, anchor_tokens, cache: dict, *, block_size: int | None = None):
    """Draft from the cache as it is: the block [anchor, masks] at positions length..length+B−1, attending to the
    live context in chunks (`cache_attend`).

    Returns (draft_tokens [b, B−1] int32 greedy, draft_logits [b, B−1, V] fp32). The cache is not changed.
    """
    hidden, head = draft_block_hidden(drafter, target, anchor_tokens, cache, block_size=block_size)
    logits = head(hidden)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits


def draft_block_hidden(drafter: BlockDrafter, target, anchor_tokens, cache: dict, *, block_size: int | None = None):
    """`draft_block` up to the final-normed hidden of the draft slots [b, B−1, D]; returns (hidden, head), head the
    frozen LM head as a function (DFlash 2's selector reads the hidden beside the logits)."""
    cfg = drafter.cfg
    bs = block_size or cfg.block_size
    h, positions, head = _block_inputs(drafter, target, anchor_tokens, cache["length"], bs)
    scale = cfg.head_dim ** -0.5
    attends = [cache_attend(layer, i, cache, cfg.draft_chunk, scale) for i, layer in enumerate(drafter.layers)]
    return drafter.hidden(h, positions, attends)[:, 1:], head


def draft_block_dense(drafter: BlockDrafter, target, anchor_tokens, cache: dict, *, block_size: int | None = None):
    """The reference for `draft_block`: a per-layer K/V cache ('kv'), every query against all `max_len` context
    slots and the block under one dense mask [b, B, max_len + B]."""
    cfg = drafter.cfg
    bs = block_size or cfg.block_size
    start = cache["length"]
    h, positions, head = _block_inputs(drafter, target, anchor_tokens, start, bs)
    b, max_len = start.shape[0], cache_max_len(cache)
    ctx_ok = jnp.arange(max_len)[None, :] < start[:, None]  # [b, max_len]
    mask = jnp.concatenate([jnp.broadcast_to(ctx_ok[:, None, :], (b, bs, max_len)),
                            jnp.ones((b, bs, bs), bool)], axis=-1)
    scale = cfg.head_dim ** -0.5
    attends = [concat_attend(lc["k"], lc["v"], mask, scale) for lc in cache["layers"]]
    logits = head(drafter.hidden(h, positions, attends)[:, 1:])
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits


def draft(drafter: BlockDrafter, target, ctx_feats_new, n_ctx_new, anchor_tokens, cache: dict, *,
          block_size: int | None = None):
    """One drafting step: extend the context by the new committed features, then draft B−1 tokens in one pass.

    drafter: `BlockDrafter`; target: the `DeepseekV4` module or (embed [V, D], head [V, D]) (frozen, not copied);
    ctx_feats_new [b, T, *feature_shape] (row b's first n_ctx_new[b] are real, for positions
    length[b]..length[b]+n−1); anchor_tokens [b] (the bonus token at position start = length + n_ctx_new);
    block_size: static, default cfg.block_size (a drafter trained at B may draft smaller blocks).
    Returns (draft_tokens [b, B−1] int32, draft_logits [b, B−1, V] fp32, new_cache with length = start).
    """
    cache = extend_draft_cache(drafter, ctx_feats_new, n_ctx_new, cache)
    tokens, logits = draft_block(drafter, target, jnp.asarray(anchor_tokens, jnp.int32), cache,
                                 block_size=block_size)
    return tokens, logits, cache


def make_draft_fn(graphdef, *, block_size: int | None = None, jit: bool = True):
    """A pure (jittable) drafting step over split drafter state and the two frozen target arrays:

    fn(drafter_state, target_embed, target_head, ctx_feats_new, n_ctx_new, anchor_tokens, cache)
        -> (draft_tokens, draft_logits, new_cache)
    with `graphdef, drafter_state = nnx.split(drafter)`. Shapes are static: one compilation per shape.
    """
    def fn(state, target_embed, target_head, ctx_feats_new, n_ctx_new, anchor_tokens, cache):
        drafter = nnx.merge(graphdef, state)
        return draft(drafter, (target_embed, target_head), ctx_feats_new, n_ctx_new, anchor_tokens, cache,
                     block_size=block_size)
    return jax.jit(fn) if jit else fn


# ---- construction --------------------------------------------------------------------------------------------

def init_drafter(cfg: DrafterConfig, seed: int = 0, cls: type = BlockDrafter) -> BlockDrafter:
    """Random drafter of class `cls` (no mesh: eager sharding off; under a mesh build it inside `jax.set_mesh`)."""
    with nnx.use_eager_sharding(False):
        return cls(cfg, rngs=nnx.Rngs(seed))


def init_drafter_from_target(target, cfg: DrafterConfig, seed: int = 0, *, copy_final_norm: bool = True,
                             cls: type = BlockDrafter) -> BlockDrafter:
    """A drafter whose gate(s) are copies of the target's hc_head (fn, base, scale), post RMSNorm and (with
    `copy_final_norm`) final norm copies of the target's final norm weight. Embedding and head are not copied.
    """
    tc = target.cfg
    cfg.check_target(tc)
    d = init_drafter(cfg, seed, cls)
    d.reducer.load_from_target(target)
    if copy_final_norm:
        w = target.norm.weight[...]
        d.norm.weight[...] = jnp.array(w, dtype=d.norm.weight[...].dtype, copy=True)
    return d


def count_params(module_or_state: Any) -> int:
    state = module_or_state if isinstance(module_or_state, nnx.State) else nnx.state(module_or_state, nnx.Param)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))


def abstract_drafter(cfg: DrafterConfig, cls: type = BlockDrafter) -> BlockDrafter:
    """Shapes only (no allocation): for parameter counts and checkpoint restore targets."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
