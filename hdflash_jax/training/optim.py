"""The optimizer of both trainers: optax chain(clip_by_global_norm, AdamW) with linear warmup then cosine decay."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import optax

from hdflash_jax.typed_config import check


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """optax chain(clip_by_global_norm, AdamW); linear warmup from 0 to `lr`, then cosine to `lr·end_lr_frac`.

    Warmup: `warmup_steps` when set, else `warmup_frac` of the run's steps. `decay_matrices_only`: weight decay on
    parameters of rank >= 2 only (not on norms, biases, gate vectors)."""
    lr: float = 6e-4
    warmup_frac: float = 0.04
    warmup_steps: int | None = None
    end_lr_frac: float = 0.0
    weight_decay: float = 0.0
    decay_matrices_only: bool = False
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # None or 0: no clipping

    def __post_init__(self):
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(0 <= self.warmup_frac <= 1, "warmup_frac", f"must be in [0, 1], got {self.warmup_frac}")
        check(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps",
              f"must be >= 0, got {self.warmup_steps}")
        check(0 <= self.end_lr_frac <= 1, "end_lr_frac", f"must be in [0, 1], got {self.end_lr_frac}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "b1", f"b1 and b2 must be in [0, 1), got {self.b1}, {self.b2}")
        check(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        check(self.grad_clip is None or self.grad_clip >= 0, "grad_clip", f"must be >= 0, got {self.grad_clip}")


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
