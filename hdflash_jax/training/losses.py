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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hdflash_jax.typed_config import check

_NEG = -1e30
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
    """The block drafters' loss, and their `loss:` section of a training config as it is. `block_size` None: the
    drafter's (the family resolves it before the step: `BlockFamily.loss_for`)."""
    block_size: int | None = None
    gamma: float | None = None  # None → default_gamma(block_size)
    kl_alpha: float = 0.1
    kl_slots: int = 2  # P: KL on slots 1..P
    kl_temperature: float = 1.0
    vocab_chunk: int = 8192  # vocabulary rows per step of the chunked loss (at most); 0: full logits (the reference)
    kind: str = "decayed_ce_kl"  # a key of LOSS_FUNCTIONS

    def __post_init__(self):
        bs = self.block_size
        check(bs is None or bs >= 2, "block_size", f"must be >= 2, got {bs}")
        check(self.gamma is None or self.gamma > 0, "gamma", f"must be > 0, got {self.gamma}")
        check(self.kl_alpha >= 0, "kl_alpha", f"must be >= 0, got {self.kl_alpha}")
        check(self.kl_slots >= 0 and (bs is None or self.kl_slots <= bs - 1), "kl_slots",
              f"must be in [0, {'B - 1' if bs is None else bs - 1}], got {self.kl_slots}")
        check(self.kl_temperature > 0, "kl_temperature", f"must be > 0, got {self.kl_temperature}")
        check(self.vocab_chunk >= 0, "vocab_chunk", f"must be >= 0, got {self.vocab_chunk}")
        check(self.kind in LOSS_FUNCTIONS, "kind", f"unknown {self.kind!r}; one of {', '.join(LOSS_FUNCTIONS)}")

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


# ---- the same loss from hidden states, over vocabulary chunks ---------------------------------------------------

class _Running(NamedTuple):
    """Per-slot running statistics of one pass over the vocabulary chunks (fp32)."""
    m: jax.Array  # [b, N, B] max logit so far
    s: jax.Array  # Σ exp(z − m)
    label: jax.Array  # the label's logit
    best: jax.Array  # max logit (for the argmax)
    arg: jax.Array  # its vocabulary index (first occurrence)
    mt: jax.Array  # [b, N, P] teacher max (at temperature T)
    st: jax.Array  # Σ exp(t − mt)
    cross: jax.Array  # Σ exp(t − mt) · (t − z/T)
    mq: jax.Array  # [b, N, P] student max at temperature T
    sq: jax.Array  # Σ exp(z/T − mq)


def _online(m, s, x, valid):
    m_new = jnp.maximum(m, jnp.max(x, axis=-1))
    e = jnp.where(valid, jnp.exp(x - m_new[..., None]), 0.0)
    return m_new, s * jnp.exp(m - m_new) + jnp.sum(e, axis=-1), e


def _chunk_step(hidden, teacher_hidden, labels, cfg: LossConfig, vocab: int):
    """The scan body over (head chunk [Vc, D], first row): updates `_Running`; rematerialised in the backward."""
    p, temp = cfg.kl_slots, cfg.kl_temperature

    def body(r: _Running, xs):
        w, start = xs
        cols = start + jnp.arange(w.shape[0])
        valid = cols < vocab
        z = jnp.einsum("bnjd,vd->bnjv", hidden.astype(w.dtype), w, preferred_element_type=jnp.float32)
        z = jnp.where(valid, z, _NEG)
        m, s, _ = _online(r.m, r.s, z, valid)
        label = r.label + jnp.sum(jnp.where(cols == labels[..., None], z, 0.0), axis=-1)
        cmax = jnp.max(z, axis=-1)
        take = cmax > r.best
        best = jnp.where(take, cmax, r.best)
        arg = jnp.where(take, start + jnp.argmax(z, axis=-1).astype(jnp.int32), r.arg)
        mt, st, cross, mq, sq = r.mt, r.st, r.cross, r.mq, r.sq
        if cfg.uses_teacher:
            t = jnp.einsum("bnjd,vd->bnjv", teacher_hidden.astype(w.dtype), w,
                           preferred_element_type=jnp.float32) / temp
            t = jnp.where(valid, t, _NEG)
            zq = z[:, :, 1:p + 1] / temp
            mt_old = mt
            mt, st, e = _online(mt, st, t, valid)
            cross = cross * jnp.exp(mt_old - mt) + jnp.sum(jnp.where(valid, e * (t - zq), 0.0), axis=-1)
            mq, sq, _ = _online(mq, sq, zq, valid)
        return _Running(m, s, label, best, arg, mt, st, cross, mq, sq), None

    return jax.checkpoint(body)


def _head_chunks(head, chunk: int):
    """head [V, D] → ([n, c, D], first rows [n]): c the largest divisor of V in [chunk/2, chunk] (no padded copy
    of the head), else c = chunk and the last chunk zero-padded."""
    v = head.shape[0]
    chunk = next((c for c in range(chunk, (chunk + 1) // 2 - 1, -1) if v % c == 0), chunk)
    n = -(-v // chunk)
    if n * chunk == v:
        return head.reshape(n, chunk, head.shape[1]), jnp.arange(n, dtype=jnp.int32) * chunk
    padded = jnp.pad(head, ((0, n * chunk - v), (0, 0)))
    return padded.reshape(n, chunk, head.shape[1]), jnp.arange(n, dtype=jnp.int32) * chunk


def decayed_ce_kl(hidden, head, tokens, loss_mask, anchors, keep, cfg: LossConfig, teacher_hidden=None,
                  ) -> tuple[jax.Array, dict[str, Any]]:
    """`drafter_loss` from the drafter's final-normed hidden [b, N, B, D] and the frozen head [V, D]: the logits
    exist one vocabulary chunk at a time (forward and backward), never as [b, N, B, V]. teacher_hidden
    [b, N, P, D]: the target's normed hidden at positions a_n + j − 1, j = 1..P (its head gives the teacher
    logits, chunk by chunk). `cfg.vocab_chunk == 0` computes the full logits and calls `drafter_loss`."""
    head = jax.lax.stop_gradient(head)
    if teacher_hidden is not None:
        teacher_hidden = jax.lax.stop_gradient(teacher_hidden)
    if cfg.vocab_chunk == 0:
        def logits_of(x):
            return jnp.einsum("...d,vd->...v", x.astype(head.dtype), head, preferred_element_type=jnp.float32)
        teacher = logits_of(teacher_hidden) if teacher_hidden is not None else None
        return drafter_loss(logits_of(hidden), tokens, loss_mask, anchors, keep, cfg, teacher)
    b, n, bs, _ = hidden.shape
    if bs != cfg.block_size:
        raise ValueError(f"hidden has block size {bs}, the loss config says {cfg.block_size}")
    if cfg.uses_teacher and teacher_hidden is None:
        raise ValueError("decayed_ce_kl: kl_alpha > 0 needs the target's hidden at the KL slots (teacher_hidden)")
    labels, valid = block_labels(tokens, loss_mask, anchors, keep, bs)
    p = cfg.kl_slots if cfg.uses_teacher else 0
    full, part = jnp.full((b, n, bs), _NEG, jnp.float32), jnp.full((b, n, p), _NEG, jnp.float32)
    zero, zpart = jnp.zeros((b, n, bs), jnp.float32), jnp.zeros((b, n, p), jnp.float32)
    init = _Running(full, zero, zero, full, jnp.zeros((b, n, bs), jnp.int32), part, zpart, zpart, part, zpart)
    chunks = _head_chunks(head, min(cfg.vocab_chunk, head.shape[0]))
    r, _ = jax.lax.scan(_chunk_step(hidden, teacher_hidden, labels, cfg, head.shape[0]), init, chunks)

    m = valid.astype(jnp.float32)
    ce_tok = r.m + jnp.log(r.s) - r.label
    w = jnp.asarray(decay_weights(bs, cfg.resolved_gamma)) * m
    weight_sum = jnp.sum(w)
    ce = jnp.sum(w * ce_tok) / jnp.maximum(weight_sum, 1e-12)
    correct = (r.arg == labels).astype(jnp.float32) * m
    acc_count = jnp.sum(m, axis=(0, 1))[1:]
    acc = jnp.sum(correct, axis=(0, 1))[1:] / jnp.maximum(acc_count, 1.0)
    kl = jnp.zeros((), jnp.float32)
    if p:
        kl_tok = r.cross / r.st - (r.mt + jnp.log(r.st)) + (r.mq + jnp.log(r.sq))
        mk = m[:, :, 1:p + 1]
        kl = cfg.kl_temperature ** 2 * jnp.sum(mk * kl_tok) / jnp.maximum(jnp.sum(mk), 1.0)
    loss = ce + cfg.kl_alpha * kl
    parts = dict(loss=loss, ce=ce, kl=kl, acc=acc, acc_count=acc_count, weight_sum=weight_sum, n_tokens=jnp.sum(m))
    return loss, parts


# the loss the trainer calls, chosen by `LossConfig.kind`: fn(hidden, head, tokens, loss_mask, anchors, keep, cfg,
# teacher_hidden) -> (loss, parts with at least loss, acc, n_tokens)
LOSS_FUNCTIONS = {"decayed_ce_kl": decayed_ce_kl}


def loss_function(cfg: LossConfig):
    if cfg.kind not in LOSS_FUNCTIONS:
        raise ValueError(f"loss.kind: unknown {cfg.kind!r}; one of {sorted(LOSS_FUNCTIONS)}")
    return LOSS_FUNCTIONS[cfg.kind]
