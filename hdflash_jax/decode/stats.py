"""Acceptance statistics of speculative decoding: the one definition of τ, r_j and the accepted-length histogram.

Conventions:
- One step is one target verification of one row. The drafter proposes B − 1 tokens (draft positions 1..B−1,
  B = block size); the target accepts the longest agreeing prefix, `accepted` in 0..B−1, and adds a bonus token.
- `accepted` is an integer array of any shape (steps × rows or rows × steps); `valid` a bool array of the same
  shape, False where the entry is not a real step (the row had finished, or padding). `valid=None` means every
  entry is a step. Only valid entries count and the layout does not matter.
- Pooling over prompts and batches concatenates their valid steps (every step weighs the same, not a mean of
  per-prompt means); histograms are counts, so histograms of different runs sum to the pooled one exactly.
- τ = mean(accepted + 1): tokens a step commits, bonus included; the last step of a row counts in full even
  where EOS or the token budget cut its output short. AR has B = 1, so τ = 1.
- r_j = P(accepted ≥ j), j = 1..B−1: cumulative (r_1 ≥ r_2 ≥ ...), and τ = 1 + Σ r_j.
- No valid step at all (every row ended before its first verify step): τ is NaN, the rates are NaN, the
  histogram is zeros and steps = 0.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np


def valid_steps(accepted, valid=None, *, block_size: int) -> np.ndarray:
    """Flat int64 array of the valid entries of `accepted`, checked to lie in 0..block_size−1."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    acc = np.asarray(accepted)
    if valid is not None:
        mask = np.asarray(valid)
        if mask.shape != acc.shape:
            raise ValueError(f"valid has shape {mask.shape}, accepted has shape {acc.shape}")
        acc = acc[mask.astype(bool)]
    acc = acc.reshape(-1)
    if acc.size and not np.issubdtype(acc.dtype, np.integer) and not np.all(acc == np.round(acc)):
        raise ValueError("accepted counts must be integers")
    acc = acc.astype(np.int64)
    if acc.size and (acc.min() < 0 or acc.max() > block_size - 1):
        raise ValueError(f"accepted counts must lie in 0..{block_size - 1} (block_size={block_size}); "
                         f"got min {acc.min()}, max {acc.max()}")
    return acc


def pool_hists(hists: Iterable) -> np.ndarray:
    """Sum histograms of possibly different lengths (shorter ones padded with zeros)."""
    hs = [np.asarray(h, dtype=np.int64) for h in hists]
    if not hs:
        return np.zeros(0, np.int64)
    out = np.zeros(max(h.size for h in hs), np.int64)
    for h in hs:
        out[: h.size] += h
    return out


@dataclasses.dataclass(frozen=True)
class AcceptanceStats:
    """τ, per-position acceptance rates and the accepted-length histogram of a set of verify steps."""
    tau: float  # mean(accepted + 1) over the steps; NaN without steps
    accept_rate_by_position: tuple[float, ...]  # r_1..r_{B−1}; () for AR
    accepted_hist: tuple[int, ...]  # step counts of accepted = 0..B−1 (length B)
    steps: int

    @property
    def block_size(self) -> int:
        return len(self.accepted_hist)

    @classmethod
    def from_hist(cls, hist) -> AcceptanceStats:
        """Everything follows from the histogram of accepted lengths 0..B−1."""
        h = np.asarray(hist, dtype=np.int64).reshape(-1)
        if h.size < 1 or (h < 0).any():
            raise ValueError(f"a histogram needs >= 1 non-negative counts, got {h.tolist()}")
        total = int(h.sum())
        if total == 0:
            return cls(float("nan"), (float("nan"),) * (h.size - 1), tuple(int(x) for x in h), 0)
        tail = np.cumsum(h[::-1])[::-1]  # tail[j] = count(accepted >= j)
        tau = float(np.dot(np.arange(1, h.size + 1), h) / total)
        return cls(tau, tuple(float(x) for x in tail[1:] / total), tuple(int(x) for x in h), total)

    @classmethod
    def from_accepted(cls, accepted, valid=None, *, block_size: int) -> AcceptanceStats:
        """From per-step accepted counts (see the module docstring for `valid`)."""
        acc = valid_steps(accepted, valid, block_size=block_size)
        return cls.from_hist(np.bincount(acc, minlength=block_size))

    @classmethod
    def pooled(cls, parts: Iterable[AcceptanceStats]) -> AcceptanceStats:
        """The statistics of all steps of `parts` together (histograms summed)."""
        return cls.from_hist(pool_hists(p.accepted_hist for p in parts))

    def to_json(self) -> dict:
        """The keys results.json uses: tau, accept_rate_by_pos, accepted_hist, steps."""
        return {"tau": self.tau, "accept_rate_by_pos": list(self.accept_rate_by_position),
                "accepted_hist": list(self.accepted_hist), "steps": self.steps}


def acceptance_stats(accepted, valid=None, *, block_size: int) -> AcceptanceStats:
    """`AcceptanceStats.from_accepted` as a function."""
    return AcceptanceStats.from_accepted(accepted, valid, block_size=block_size)
