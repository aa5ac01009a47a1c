"""Parameter counts the trainer and the planner share (the FLOPs floor of a step, MFU)."""

from __future__ import annotations

import numpy as np
from flax import nnx


def active_params(cfg, state) -> int:
    """Parameters one token's forward multiplies by: all but the embedding (a lookup) and the routed experts it
    does not use (k of E per MoE layer)."""
    total = routed = 0
    for path, var in nnx.to_flat_state(state):
        size = int(np.prod(var.shape))
        keys = tuple(str(k) for k in path)
        if keys[0] == "embed":
            continue
        total += size
        if "experts" in keys and "shared_experts" not in keys:
            routed += size
    return total - routed + routed * cfg.n_activated_experts // cfg.n_routed_experts
