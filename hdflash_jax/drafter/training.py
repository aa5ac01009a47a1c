"""Training path of the block drafter: N blocks of B slots per sequence in one pass.

Block n (anchor a_n, slots at positions a_n..a_n+B−1) sees context keys k < a_n and its own block's keys, nothing
else (`training_mask`). Two attention paths under that mask: 'block_sparse' (drafter/sparse_attention.py: blocked
online softmax, nothing [N·B, S]-sized kept for the backward pass) and 'dense' (`concat_attend` under the dense
mask: the reference). Each draft layer can be rematerialised in the backward pass under a named policy
(`REMAT_POLICIES`). On a mesh the blocks' activations [b, N·B, D] are sharded over the rows' axes and the
sequence axes (`expert`: the drafter has no experts; left replicated there, every expert shard held and computed
a full copy of its rows). The layers and the inference path are in `drafter/model.py`.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from hdflash_jax.drafter.model import BlockDrafter, frozen_embed, frozen_head, concat_attend
from hdflash_jax.drafter.sparse_attention import SparseLayout, block_sparse_attention
from hdflash_jax.sharding import constrain_tokens

ATTENTION_OUT = "drafter_attention"  # checkpoint name of each layer's attention output

# what a rematerialised draft layer keeps for the backward pass (the rest is recomputed)
REMAT_POLICIES = {
    "none": None,  # no remat: everything the backward pass needs is kept
    "nothing": jax.checkpoint_policies.nothing_saveable,  # only the layer's input
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # matmul outputs (projections, MLP)
    "attention": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT),  # the attention output only
}
ATTENTIONS = ("block_sparse", "dense")


class TrainAttention(NamedTuple):
    """How the training forward attends and what each draft layer keeps for the backward pass."""
    impl: str = "block_sparse"  # or "dense" (the reference)
    q_blocks: int = 64  # blocks per query chunk (block_sparse)
    k_chunk: int = 512  # context keys per key chunk (block_sparse)
    remat: str = "none"  # a key of REMAT_POLICIES

    def check(self) -> None:
        if self.impl not in ATTENTIONS:
            raise ValueError(f"attention: unknown {self.impl!r}; one of {ATTENTIONS}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat: unknown {self.remat!r}; one of {sorted(REMAT_POLICIES)}")
        if self.q_blocks < 1 or self.k_chunk < 1:
            raise ValueError(f"attention: q_blocks and k_chunk must be >= 1, got {self.q_blocks}, {self.k_chunk}")


def training_mask(anchors, ctx_len: int, block_size: int, keep=None) -> jax.Array:
    """bool [b, N·B, S + N·B]: query (n, j) sees context key k iff k < a_n, and block key (m, i) iff m == n.

    A dropped block (keep[b, n] False) sees nothing (its attention outputs 0; give it no loss).
    """
    anchors = jnp.asarray(anchors, jnp.int32)
    b, n = anchors.shape
    keep = jnp.ones((b, n), bool) if keep is None else jnp.asarray(keep, bool)
    q_block = jnp.repeat(jnp.arange(n), block_size)  # [N·B]
    a_q = anchors[:, q_block]  # [b, N·B]
    keep_q = keep[:, q_block]
    ctx = jnp.arange(ctx_len)[None, None, :] < a_q[:, :, None]  # [b, N·B, S]
    blk = q_block[None, :, None] == q_block[None, None, :]  # [1, N·B, N·B]
    blk = jnp.broadcast_to(blk, (b, n * block_size, n * block_size))
    return jnp.concatenate([ctx, blk], axis=-1) & keep_q[:, :, None]


def _attend_fns(how: TrainAttention, anchors, keep, s: int, bs: int, scale: float):
    """attend(ctx_k, ctx_v) → attend(q, k, v) for one layer, by `how.impl`."""
    if how.impl == "dense":
        mask = training_mask(anchors, s, bs, keep)
        return lambda ck, cv: concat_attend(ck, cv, mask, scale)
    n = anchors.shape[1]
    layout = SparseLayout(bs, min(how.q_blocks, n), min(how.k_chunk, s))  # no padding past the real sizes
    return lambda ck, cv: (lambda q, k, v: block_sparse_attention(q, k, v, ck.astype(k.dtype), cv.astype(v.dtype),
                                                                  anchors, keep, scale, layout))


def train_hidden(drafter: BlockDrafter, target_embed, ctx_feats, anchors, block_tokens, keep=None,
                 how: TrainAttention = TrainAttention()):
    """The drafter's final-normed hidden [b, N, B, D] for N blocks per sequence, one pass (see `train_forward`)."""
    cfg = drafter.cfg
    how.check()
    b, s = ctx_feats.shape[:2]
    _, n, bs = block_tokens.shape
    chex.assert_shape(anchors, (b, n))
    anchors = jnp.asarray(anchors, jnp.int32)
    keep = jnp.ones((b, n), bool) if keep is None else jnp.asarray(keep, bool)
    ctx_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None, :], (b, s))
    ctx_kv = drafter.context_kv(ctx_feats, ctx_pos)
    q_pos = (anchors[:, :, None] + jnp.arange(bs, dtype=jnp.int32)).reshape(b, n * bs)
    h = frozen_embed(target_embed, jnp.dtype(cfg.dtype))(block_tokens.reshape(b, n * bs))
    attend_of = _attend_fns(how, anchors, keep, s, bs, cfg.head_dim ** -0.5)

    def run_layer(layer_state, h, ck, cv, graphdef):
        layer = nnx.merge(graphdef, layer_state)
        attend = attend_of(ck, cv)
        named = lambda q, k, v: checkpoint_name(attend(q, k, v), ATTENTION_OUT)
        return constrain_tokens(layer(h, q_pos, named, block_len=bs))

    policy = REMAT_POLICIES[how.remat]
    h = constrain_tokens(h.astype(jnp.dtype(cfg.dtype)))
    for layer, (ck, cv) in zip(drafter.layers, ctx_kv):
        graphdef, layer_state = nnx.split(layer)
        fn = run_layer if how.remat == "none" else jax.checkpoint(run_layer, policy=policy, static_argnums=(4,))
        h = fn(layer_state, h, ck, cv, graphdef)
    return drafter.norm(h).reshape(b, n, bs, -1)


def train_forward(drafter: BlockDrafter, target_embed, target_head, ctx_feats, anchors, block_tokens, keep=None,
                  how: TrainAttention = TrainAttention()):
    """Logits [b, N, B, V] (fp32) for N blocks per sequence, one pass.

    ctx_feats [b, S, *feature_shape]: the target's features of every position (context at absolute positions
    0..S−1); anchors [b, N] (block n = slots at positions a_n..a_n+B−1, seeing context k < a_n);
    block_tokens [b, N, B] (normally `block_token_ids(tokens[a_n], B, mask_token_id)`); keep [b, N] bool.
    target_embed / target_head [V, D] are frozen (stop_gradient). Slot 0 is the anchor (no loss); slot j >= 1
    predicts x_{a_n + j}. Training at scale uses `train_hidden` and a vocabulary-chunked loss instead (no
    [b, N, B, V] array).
    """
    hidden = train_hidden(drafter, target_embed, ctx_feats, anchors, block_tokens, keep, how)
    return frozen_head(target_head)(hidden)
