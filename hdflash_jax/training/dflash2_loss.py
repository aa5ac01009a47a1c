"""DFlash 2's selector objective, beside the block drafters' loss (`training.losses`).

For each draft slot (n, j ≥ 1) the serving candidate set is the unary top-K of the drafter's own logits; the label
x_{a_n+j} is put in the K-th place when it is missing, so every slot has a K-way label (speculators'
`selector_training_candidates`). The selector scores the K candidates with the teacher-forced predecessor
x_{a_n+j−1} (slot 1: the anchor) and the slot's final-normed hidden, and is trained by cross-entropy over them,
decayed per slot like the unary loss:

    L_sel = Σ_{n,j} w_j m_{n,j} CE_K(score_{n,j}, label position) / Σ_{n,j} w_j m_{n,j}
    L     = L_block (decayed CE + α KL, `LossConfig`) + selector_alpha · L_sel

(speculators: `DFlash2DraftModel.forward` / `compute_selector_loss`; its unary term is a KL to the verifier, ours
the project's decayed CE on the target's own answers plus the KL on the first P slots.) The candidate search never
builds [b, N, B, V]: the top-K is merged over vocabulary chunks, without gradient, and the K unary scores are
recomputed from the head's K rows (differentiable in the hidden).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from hdflash_jax.training.losses import LossConfig, _head_chunks, block_labels, decay_weights
from hdflash_jax.typed_config import check

_NEG = -1e30


@dataclasses.dataclass(frozen=True)
class DFlash2LossConfig(LossConfig):
    """The block loss (`LossConfig`) plus the selector's weight (speculators' `selector_loss_alpha`)."""
    selector_alpha: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        check(self.selector_alpha >= 0, "selector_alpha", f"must be >= 0, got {self.selector_alpha}")


def top_k_over_head(hidden, head, k: int, chunk: int):
    """The ids [..., K] of the K largest logits hidden · head^T (hidden [..., D], head [V, D]), best first, merged
    over vocabulary chunks of at most `chunk` rows (0: the full logits); no gradient."""
    hidden, head = jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(head)
    v = head.shape[0]
    if chunk == 0 or chunk >= v:
        z = jnp.einsum("...d,vd->...v", hidden.astype(head.dtype), head, preferred_element_type=jnp.float32)
        return jax.lax.top_k(z, k)[1].astype(jnp.int32)
    chunks, starts = _head_chunks(head, chunk)
    lead = hidden.shape[:-1]

    def body(carry, xs):
        vals, ids = carry
        w, start = xs
        cols = start + jnp.arange(w.shape[0], dtype=jnp.int32)
        z = jnp.einsum("...d,vd->...v", hidden.astype(w.dtype), w, preferred_element_type=jnp.float32)
        z = jnp.where(cols < v, z, _NEG)
        all_vals = jnp.concatenate([vals, z], axis=-1)
        all_ids = jnp.concatenate([ids, jnp.broadcast_to(cols, lead + cols.shape)], axis=-1)
        best, at = jax.lax.top_k(all_vals, k)
        return (best, jnp.take_along_axis(all_ids, at, axis=-1)), None

    init = (jnp.full(lead + (k,), -jnp.inf, jnp.float32), jnp.zeros(lead + (k,), jnp.int32))
    (_, ids), _ = jax.lax.scan(body, init, (chunks, starts))
    return ids


def training_candidates(cand, labels):
    """(candidates with a missing label put in the last place, the label's place [...], whether the unary top-K
    held it [...]): cand [..., K], labels [...]."""
    match = cand == labels[..., None]
    contains = jnp.any(match, axis=-1)
    k = cand.shape[-1]
    where = jnp.where(contains, jnp.argmax(match, axis=-1), k - 1).astype(jnp.int32)
    cand = cand.at[..., -1].set(jnp.where(contains, cand[..., -1], labels))
    return cand, where, contains


def selector_loss(selector, hidden, head, tokens, loss_mask, anchors, keep, cfg: DFlash2LossConfig, top_k: int):
    """(L_sel, metrics) for the drafter's final-normed hidden [b, N, B, D] and the frozen head [V, D]."""
    head = jax.lax.stop_gradient(head)
    bs = hidden.shape[2]
    labels, valid = block_labels(tokens, loss_mask, anchors, keep, bs)
    cand = top_k_over_head(hidden, head, top_k, cfg.vocab_chunk)
    cand, where, contains = training_candidates(cand, labels)
    unary = jnp.einsum("bnjd,bnjkd->bnjk", hidden.astype(head.dtype), head[cand], preferred_element_type=jnp.float32)
    prev = jnp.concatenate([labels[..., :1], labels[..., :-1]], axis=-1)  # slot j's predecessor x_{a+j−1}
    scores = selector.scores(unary, hidden, prev, cand)
    ce = jax.nn.logsumexp(scores, axis=-1) - jnp.take_along_axis(scores, where[..., None], axis=-1)[..., 0]
    m = valid.astype(jnp.float32)
    w = jnp.asarray(decay_weights(bs, cfg.resolved_gamma)) * m
    loss = jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1e-12)
    serving = m * contains  # slots whose label the serving candidate set holds
    hit = (jnp.argmax(scores, axis=-1) == where).astype(jnp.float32) * serving
    n = jnp.maximum(jnp.sum(m), 1.0)
    return loss, {"selector_ce": loss, "selector_acc": jnp.sum(hit) / jnp.maximum(jnp.sum(serving), 1.0),
                  f"recall_at_{top_k}": jnp.sum(serving) / n}
