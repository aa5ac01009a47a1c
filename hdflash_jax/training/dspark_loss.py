"""DSpark's training loss (DeepSpec's), as one pure function over the outputs of `dspark.model.train_forward`.

    loss = α_ce · CE + α_tv · L1 + α_conf · BCE
each a weighted mean over supervised slots with weights w_j = exp(−j/γ) (slot j of a block; γ ≤ 0: uniform):
CE of the Markov-corrected draft logits on the true next token; L1 = Σ_v |p − q| between the target's
distribution p at the same position and the draft's q (twice the total variation; 1 − L1/2 is the probability
that speculative sampling accepts the slot); the confidence head by binary cross-entropy towards that acceptance,
with p and the label detached. DeepSpec's recipe: α_ce 0.1, α_tv 0.9, γ 4.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from hdflash_jax.typed_config import check


@dataclasses.dataclass(frozen=True)
class DSparkLossConfig:
    """DSpark's loss, and its `drafter.loss` section of a training config (hdflash_jax.train_config)."""
    ce_weight: float = 0.1
    tv_weight: float = 0.9
    confidence_weight: float = 0.0  # > 0 trains the confidence head too
    gamma: float = 4.0  # <= 0: uniform slot weights

    def __post_init__(self):
        for f in ("ce_weight", "tv_weight", "confidence_weight"):
            check(getattr(self, f) >= 0, f, f"must be >= 0, got {getattr(self, f)}")
        check(self.ce_weight + self.tv_weight > 0, "ce_weight", "ce_weight + tv_weight must be > 0")


def slot_weights(eval_mask, gamma: float):
    w = eval_mask.astype(jnp.float32)
    if gamma > 0:
        w = w * jnp.exp(-jnp.arange(eval_mask.shape[-1], dtype=jnp.float32) / gamma)
    return w


def dspark_loss(out: dict, target_logits, cfg: DSparkLossConfig):
    """out: `train_forward`'s dict; target_logits [b, N, B, V]: the target's logits at out["positions"] (None
    without a distribution term). Returns (loss, metrics)."""
    w = slot_weights(out["eval_mask"], cfg.gamma)
    den = jnp.sum(w) + 1e-6
    logq = jax.nn.log_softmax(out["logits"].astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logq, out["targets"][..., None], axis=-1)[..., 0]
    ce_loss = jnp.sum(ce * w) / den
    # per slot: teacher-forced top-1 accuracy of the Markov-corrected logits where slots 0..j are supervised
    m = out["eval_mask"].astype(jnp.float32)
    hit = (jnp.argmax(out["logits"], axis=-1) == out["targets"]).astype(jnp.float32) * m
    flat = m.shape[-1]
    count = jnp.sum(m.reshape(-1, flat), axis=0)
    acc = jnp.sum(hit.reshape(-1, flat), axis=0) / jnp.maximum(count, 1.0)
    loss, metrics = cfg.ce_weight * ce_loss, {"ce": ce_loss, "acc": acc, "acc_count": count, "n_tokens": jnp.sum(m)}
    if target_logits is not None:
        p = jax.lax.stop_gradient(jax.nn.softmax(target_logits.astype(jnp.float32), axis=-1))
        l1 = jnp.sum(jnp.abs(p - jnp.exp(logq)), axis=-1)
        l1_loss = jnp.sum(l1 * w) / den
        accept = jnp.clip(1.0 - 0.5 * l1, 0.0, 1.0)
        loss = loss + cfg.tv_weight * l1_loss
        metrics.update(l1=l1_loss, accept_rate=jnp.sum(accept * m) / (jnp.sum(m) + 1e-6),
                       tau_expected=_expected_tau(accept, out["eval_mask"]))
        if cfg.confidence_weight > 0 and out.get("confidence") is not None:
            c = jnp.clip(out["confidence"], 1e-6, 1 - 1e-6)
            label = jax.lax.stop_gradient(accept)
            bce = -(label * jnp.log(c) + (1 - label) * jnp.log(1 - c))
            conf_loss = jnp.sum(bce * w) / den
            loss = loss + cfg.confidence_weight * conf_loss
            metrics["confidence_bce"] = conf_loss
    metrics["loss"] = loss
    return loss, metrics


def _expected_tau(accept, eval_mask):
    """1 + Σ_j Π_{i≤j} accept_i per block with a supervised slot, averaged: τ if drafts were sampled from q."""
    m = eval_mask.astype(jnp.float32)
    blocks = jnp.any(eval_mask, axis=-1).astype(jnp.float32)
    tau = 1.0 + jnp.sum(jnp.cumprod(accept * m, axis=-1), axis=-1)
    return jnp.sum(tau * blocks) / (jnp.sum(blocks) + 1e-6)


def dspark_target_inputs(target, tokens, anchors, target_layer_ids: tuple[int, ...], block_size: int) -> dict:
    """What the frozen target gives one DSpark step (outside value_and_grad): the tapped layers' streams, its
    normed hidden states at each block's slot positions (`teacher_positions`: their head rows are the
    distributions the slots approximate), its embedding and head; all under stop_gradient."""
    from hdflash_jax.deepseek_v4.model import forward_full
    from hdflash_jax.training.features import teacher_hidden_at_slots

    out = forward_full(target, tokens, return_layers=tuple(target_layer_ids))
    sg = jax.lax.stop_gradient
    return {"streams": tuple(sg(s) for s in out.layer_streams),
            "teacher_hidden": sg(teacher_hidden_at_slots(target, out.streams, anchors, block_size)),
            "embed": sg(target.embed[...]), "head": sg(target.head.weight[...])}


def dspark_offline_inputs(batch: dict, embed, head) -> dict:
    """`dspark_target_inputs` from an offline batch: `features` [b, S, K, n, D] (the tapped layers' streams, the
    capture's `DSparkFamily.capture`) and `teacher_hidden` [b, N, B, D], with the target's embedding and head."""
    sg = jax.lax.stop_gradient
    feats = batch["features"]
    return {"streams": tuple(sg(feats[:, :, k]) for k in range(feats.shape[2])),
            "teacher_hidden": sg(batch["teacher_hidden"]), "embed": sg(embed), "head": sg(head)}


def dspark_batch_loss(drafter, inputs: dict, batch: dict, cfg: DSparkLossConfig):
    """(loss, metrics) of a DSpark drafter on a batch {tokens, loss_mask, anchors, keep} (the drafter trainer's
    batch) with `dspark_target_inputs`: the hook a trainer's loss_fn calls."""
    from hdflash_jax.dspark.model import train_forward

    embed, head = inputs["embed"], inputs["head"]

    def head_logits(h):
        return jnp.einsum("...d,vd->...v", h.astype(head.dtype), head, preferred_element_type=jnp.float32)

    out = train_forward(drafter, lambda ids: embed[ids], head_logits, inputs["streams"], batch["tokens"],
                        batch["anchors"], batch["keep"], batch["loss_mask"])
    # the target's logits at each slot's position a_n + j (clipped into the row: slots past the sequence end are
    # unsupervised but must read finite logits, NaN · 0 being NaN), from its hidden states there
    tl = head_logits(inputs["teacher_hidden"])
    return dspark_loss(out, tl.reshape(out["logits"].shape), cfg)
