"""The optimizer of both trainers: optax chain(clip_by_global_norm, AdamW) with linear warmup then cosine decay."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import optax

from train.config import OptimConfig


class Optimizer(NamedTuple):
    tx: optax.GradientTransformation
    schedule: Callable[[Any], Any]  # step -> learning rate
    warmup_steps: int


def warmup_steps_of(cfg: OptimConfig, total_steps: int) -> int:
    """`warmup_steps` when set, else `warmup_frac` of the run; at most total_steps - 1 (the peak is reached)."""
    n = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_frac * total_steps))
    return min(n, max(total_steps - 1, 0))


def make_optimizer(cfg: OptimConfig, total_steps: int, params: Any = None) -> Optimizer:
    """The optimizer for a run of `total_steps` updates. `params` (a pytree of arrays or shapes) is needed only
    with `decay_matrices_only` (the weight-decay mask: rank >= 2)."""
    warmup = warmup_steps_of(cfg, total_steps)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup, decay_steps=max(total_steps, 1),
        end_value=cfg.lr * cfg.end_lr_frac)
    mask = None
    if cfg.decay_matrices_only and cfg.weight_decay:
        if params is None:
            raise ValueError("make_optimizer: decay_matrices_only needs the params (their ranks)")
        mask = jax.tree.map(lambda p: len(p.shape) >= 2, params)
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip else []
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask))
    return Optimizer(optax.chain(*parts), schedule, warmup)
