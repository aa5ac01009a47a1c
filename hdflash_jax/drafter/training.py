"""Training path of the block drafter: N blocks of B slots per sequence in one pass.

Block n (anchor a_n, slots at positions a_n..a_n+B−1) sees context keys k < a_n and its own block's keys, nothing
else (`training_mask`). The layers and the inference path are in `drafter/model.py`.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from hdflash_jax.drafter.model import BlockDrafter, frozen_embed, frozen_head, concat_attend


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


def train_forward(drafter: BlockDrafter, target_embed, target_head, ctx_feats, anchors, block_tokens, keep=None):
    """Logits [b, N, B, V] (fp32) for N blocks per sequence, one pass.

    ctx_feats [b, S, *feature_shape]: the target's features of every position (context at absolute positions
    0..S−1); anchors [b, N] (block n = slots at positions a_n..a_n+B−1, seeing context k < a_n);
    block_tokens [b, N, B] (normally `block_token_ids(tokens[a_n], B, mask_token_id)`); keep [b, N] bool.
    target_embed / target_head [V, D] are frozen (stop_gradient). Slot 0 is the anchor (no loss); slot j >= 1
    predicts x_{a_n + j}.
    """
    cfg = drafter.cfg
    b, s = ctx_feats.shape[:2]
    _, n, bs = block_tokens.shape
    chex.assert_shape(anchors, (b, n))
    embed, head = frozen_embed(target_embed, jnp.dtype(cfg.dtype)), frozen_head(target_head)
    ctx_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None, :], (b, s))
    ctx_kv = drafter.context_kv(ctx_feats, ctx_pos)
    q_pos = (jnp.asarray(anchors, jnp.int32)[:, :, None] + jnp.arange(bs, dtype=jnp.int32)).reshape(b, n * bs)
    h = embed(block_tokens.reshape(b, n * bs))
    mask = training_mask(anchors, s, bs, keep)
    scale = cfg.head_dim ** -0.5
    logits = head(drafter.hidden(h, q_pos, [concat_attend(k, v, mask, scale) for k, v in ctx_kv]))
    return logits.reshape(b, n, bs, -1)


