"""The drafter's training loss, in one place: decayed block cross-entropy plus a KL to the target's LM head.

For N blocks per sequence (anchor a_n, slots j = 0..B−1 at positions a_n + j; slot j >= 1 predicts x_{a_n+j}):

    m_{n,j} = keep_n · [a_n + j < S] · loss_mask[a_n + j] · [j >= 1]
    w_j     = exp(−(j−1)/γ)                                   (w_0 = 0: the anchor carries no loss)
    L_CE    = Σ_{n,j} w_j m_{n,j} CE(z_{n,j}, x_{a_n+j}) / Σ_{n,j} w_j m_{n,j}
    L_KL    = T² · Σ_{n, j<=P} m_{n,j} KL(p_{n,j} ‖ q_{n,j}) / Σ_{n, j<=P} m_{n,j}
    L       = L_CE + α · L_KL

with teacher p_{n,j} = softmax(target_logits[a_n + j − 1] / T) — the frozen target's own, exact next-token
distribution at the position that predicts x_{a_n+j} (HyperDFlash mean-pools the streams for its teacher; we use
the real `hc_head` logits) — and student q_{n,j} = softmax(z_{n,j} / T). With equal counts per slot
the KL mean is the paper's (T²/P) Σ_k KL(p_k ‖ q_k). Defaults: γ by block size (7 for B=16, 5 for B=10, 4 for B=8;
other B: (B−1)/2, our choice), P = 2, α = 0.1, T = 1.

Sums are over the whole (global) batch, so a sharded step computes the same number as a single-device one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PAPER_GAMMA = {16: 7.0, 10: 5.0, 8: 4.0}  # DFlash App. A.1


def default_gamma(block_size: int) -> float:
    """γ of the decay: the paper's value for B = 16 / 10 / 8, else (B − 1) / 2 (not from a paper)."""
    if block_size in PAPER_GAMMA:
        return PAPER_GAMMA[block_size]
    return max((block_size - 1) / 2.0, 0.5)


def decay_weights(block_size: int, gamma: float | None = None) -> np.ndarray:
    """[B] float32: w_0 = 0 (anchor), w_j = exp(−(j−1)/γ) for j >= 1."""
    gamma = default_gamma(block_size) if gamma is None else float(gamma)
    if gamma <= 0:
        raise ValueError(f"loss.gamma must be > 0, got {gamma}")
    w = np.array([0.0] + [math.exp(-(j - 1) / gamma) for j in range(1, block_size)], np.float64)
    return w.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    block_size: int
    gamma: float | None = None  # None → default_gamma(block_size)
    kl_alpha: float = 0.1
    kl_slots: int = 2  # P: KL on slots 1..P
    kl_temperature: float = 1.0

    def __post_init__(self):
        if self.block_size < 2:
            raise ValueError(f"loss.block_size must be >= 2, got {self.block_size}")
        if self.kl_alpha < 0:
            raise ValueError(f"loss.kl_alpha must be >= 0, got {self.kl_alpha}")
        if not 0 <= self.kl_slots <= self.block_size - 1:
            raise ValueError(f"loss.kl_slots must be in [0, {self.block_size - 1}], got {self.kl_slots}")
        if self.kl_temperature <= 0:
            raise ValueError(f"loss.kl_temperature must be > 0, got {self.kl_temperature}")

    @property
    def resolved_gamma(self) -> float:
        return default_gamma(self.block_size) if self.gamma is None else float(self.gamma)

    @property
    def uses_teacher(self) -> bool:
        return self.kl_alpha > 0 and self.kl_slots > 0


def _gather_positions(x, pos):
    """x [b, S, ...], pos [b, N, K] (clipped into range) → [b, N, K, ...]."""
    b, n, k = pos.shape
    s = x.shape[1]
    flat = jnp.clip(pos, 0, s - 1).reshape(b, n * k)
    idx = flat.reshape(b, n * k, *([1] * (x.ndim - 2)))
    out = jnp.take_along_axis(x, idx, axis=1)
    return out.reshape(b, n, k, *x.shape[2:])


def block_labels(tokens, loss_mask, anchors, keep, block_size: int):
    """(labels [b, N, B] int32, valid [b, N, B] bool): slot j's label x_{a+j} and m_{n,j} (slot 0 never valid)."""
    tokens = jnp.asarray(tokens)
    s = tokens.shape[1]
    pos = jnp.asarray(anchors, jnp.int32)[:, :, None] + jnp.arange(block_size, dtype=jnp.int32)
    labels = _gather_positions(tokens, pos).astype(jnp.int32)
    lm = _gather_positions(jnp.asarray(loss_mask).astype(bool), pos)
    slot = jnp.arange(block_size) >= 1
    valid = jnp.asarray(keep, bool)[:, :, None] & (pos < s) & lm & slot
    return labels, valid


def teacher_logits_for_blocks(target_logits, anchors, kl_slots: int):
    """[b, N, P, V]: target logits at positions a_n + j − 1 for j = 1..P (they predict x_{a_n+j})."""
    pos = jnp.asarray(anchors, jnp.int32)[:, :, None] + jnp.arange(kl_slots, dtype=jnp.int32)
    return _gather_positions(target_logits, pos)


def drafter_loss(draft_logits, tokens, loss_mask, anchors, keep, cfg: LossConfig, teacher_logits=None,
                 ) -> tuple[jax.Array, dict[str, Any]]:
    """The training loss and its parts.

    draft_logits [b, N, B, V] (from `train_forward`); tokens / loss_mask [b, S]; anchors / keep [b, N];
    teacher_logits: the frozen target's logits [b, S, V] over the same sequences (needed when α > 0 and P > 0),
    or already gathered [b, N, P, V].
    Returns (loss, parts) with parts: loss, ce, kl (T²-scaled, before α), acc [B−1] (per slot j = 1..B−1),
    acc_count [B−1] (tokens behind each accuracy), weight_sum (Σ w·m), n_tokens (Σ m).
    """
    b, n, bs, v = draft_logits.shape
    if bs != cfg.block_size:
        raise ValueError(f"draft_logits have block size {bs}, the loss config says {cfg.block_size}")
    labels, valid = block_labels(tokens, loss_mask, anchors, keep, bs)
    logits = draft_logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    ce_tok = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]  # [b, N, B]
    m = valid.astype(jnp.float32)
    w = jnp.asarray(decay_weights(bs, cfg.resolved_gamma)) * m
    weight_sum = jnp.sum(w)
    ce = jnp.sum(w * ce_tok) / jnp.maximum(weight_sum, 1e-12)

    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32) * m
    acc_count = jnp.sum(m, axis=(0, 1))[1:]
    acc = jnp.sum(correct, axis=(0, 1))[1:] / jnp.maximum(acc_count, 1.0)

    kl = jnp.zeros((), jnp.float32)
    if cfg.uses_teacher:
        if teacher_logits is None:
            raise ValueError("drafter_loss: kl_alpha > 0 needs the target's logits (teacher_logits)")
        p_slots = cfg.kl_slots
        if teacher_logits.ndim == 3:
            teacher = teacher_logits_for_blocks(teacher_logits, anchors, p_slots)
        else:
            teacher = teacher_logits
        teacher = jax.lax.stop_gradient(teacher.astype(jnp.float32)) / cfg.kl_temperature
        log_p = jax.nn.log_softmax(teacher, axis=-1)
        log_q = jax.nn.log_softmax(logits[:, :, 1:p_slots + 1] / cfg.kl_temperature, axis=-1)
        kl_tok = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)  # [b, N, P]
        mk = m[:, :, 1:p_slots + 1]
        kl = cfg.kl_temperature ** 2 * jnp.sum(mk * kl_tok) / jnp.maximum(jnp.sum(mk), 1.0)

    loss = ce + cfg.kl_alpha * kl
    parts = dict(loss=loss, ce=ce, kl=kl, acc=acc, acc_count=acc_count, weight_sum=weight_sum, n_tokens=jnp.sum(m))
    return loss, parts
