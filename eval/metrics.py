"""Throughput metrics of an evaluation (pure Python).

The acceptance statistics (τ, per-position acceptance rates, the accepted-length histogram) have one owner:
`hdflash_jax.decode.stats.AcceptanceStats`.
"""

from __future__ import annotations


def tokens_per_second(tokens: int, wall_s: float) -> float:
    """Generated tokens / wall-clock seconds of generation (compilation excluded by the caller)."""
    if not wall_s > 0:
        raise ValueError(f"wall_s must be > 0, got {wall_s}")
    return float(tokens) / float(wall_s)


def speedup(ar_wall_s: float, method_wall_s: float) -> float:
    """Wall-clock speedup over AR on the same prompts in the same run: AR time / method time."""
    if not (ar_wall_s > 0 and method_wall_s > 0):
        raise ValueError(f"times must be > 0, got ar={ar_wall_s}, method={method_wall_s}")
    return float(ar_wall_s) / float(method_wall_s)
