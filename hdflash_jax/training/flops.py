"""Model FLOPs of a drafter training step (the trainer's MFU and the AOT planner's floor use the same count)."""

from __future__ import annotations

from typing import NamedTuple


class DraftShape(NamedTuple):
    """What `drafter_step_flops` reads of a drafter (a DrafterConfig has these fields; DSpark is described by one)."""
    n_layers: int
    n_heads: int
    head_dim: int
    block_size: int


def drafter_step_flops(n_target_active: int, n_drafter: int, dcfg, batch: int, seq: int, anchors: int,
                       online: bool = True) -> float:
    """Model FLOPs of one drafter training step (forward + backward = 3 x forward for the drafter; the frozen
    target forward only): 2·P_target·tokens + 6·P_drafter·slots + the drafter's attention, each query seeing
    ≈ S/2 context keys (anchors are uniform over the sequence) plus its block. Target attention is not counted."""
    slots = batch * anchors * dcfg.block_size
    attn = 3 * 4 * dcfg.n_layers * dcfg.n_heads * dcfg.head_dim * slots * (seq / 2 + dcfg.block_size)
    target = 2.0 * n_target_active * batch * seq if online else 0.0
    return target + 6.0 * n_drafter * slots + attn
