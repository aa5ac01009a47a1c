"""Speculative-decoding metrics from the decoder's per-step statistics (pure numpy).

Conventions
-----------
- One *step* is one target-model verification of one row (prompt) of a batch. In a step the
  drafter proposes B-1 tokens (draft positions 1..B-1, B = block size); the target accepts the
  longest agreeing prefix, `accepted` in 0..B-1, and adds one token of its own (the bonus).
- `accepted` is an integer array of any shape, typically (steps, rows) or (rows, steps);
  `valid` is a bool array of the same shape, False where the entry is not a real step (the row
  had already finished, or padding). Only valid entries count; the layout does not matter.
- Aggregating over prompts and batches = concatenating their valid steps (`concat_steps`), so
  every step weighs the same, as in the paper (not a mean of per-prompt means).
- tau (mean acceptance length) = mean(accepted + 1) over valid steps: tokens a step commits,
  bonus included. The last step of a row counts in full, even where EOS or the token budget
  cut its output short. AR has B = 1, so accepted = 0 always and tau = 1.
- Acceptance rate at draft position j: r_j = P(accepted >= j), j = 1..B-1: the fraction of
  valid steps whose j-th draft token was accepted. It is cumulative (r_1 >= r_2 >= ...), and
  tau = 1 + sum_j r_j.
- Histogram: counts of accepted = 0..B-1 (length B). Counts, not frequencies, so histograms
  of different runs can be summed and turned into pooled rates/tau exactly.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


def valid_steps(accepted, valid=None, *, block_size: int) -> np.ndarray:
    """Flat int64 array of the valid entries of `accepted`, checked to lie in 0..block_size-1."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    acc = np.asarray(accepted)
    if valid is not None:
        mask = np.asarray(valid)
        if mask.shape != acc.shape:
            raise ValueError(f"valid has shape {mask.shape}, accepted has shape {acc.shape}")
        acc = acc[mask.astype(bool)]
    acc = acc.reshape(-1)
    if acc.size and not np.issubdtype(acc.dtype, np.integer):
        if not np.all(acc == np.round(acc)):
            raise ValueError("accepted counts must be integers")
    acc = acc.astype(np.int64)
    if acc.size and (acc.min() < 0 or acc.max() > block_size - 1):
        raise ValueError(
            f"accepted counts must lie in 0..{block_size - 1} (block_size={block_size}); "
            f"got min {acc.min()}, max {acc.max()}"
        )
    return acc


def concat_steps(batches: Iterable[tuple], *, block_size: int) -> np.ndarray:
    """Pool steps over prompts/batches: [(accepted, valid), ...] -> flat array of valid counts."""
    parts = [valid_steps(a, v, block_size=block_size) for a, v in batches]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _nonempty(acc: np.ndarray) -> np.ndarray:
    if acc.size == 0:
        raise ValueError("no valid steps: every entry is masked out")
    return acc


def tau(accepted, valid=None, *, block_size: int) -> float:
    """Mean acceptance length: mean(accepted + 1) over valid steps (bonus token included)."""
    acc = _nonempty(valid_steps(accepted, valid, block_size=block_size))
    return float(np.mean(acc + 1))


def accept_rate_by_position(accepted, valid=None, *, block_size: int) -> np.ndarray:
    """r_j = fraction of valid steps with accepted >= j, for draft positions j = 1..B-1."""
    acc = _nonempty(valid_steps(accepted, valid, block_size=block_size))
    positions = np.arange(1, block_size)
    return (acc[:, None] >= positions[None, :]).mean(axis=0)


def accepted_hist(accepted, valid=None, *, block_size: int) -> np.ndarray:
    """Counts of accepted = 0..B-1 over valid steps (int64, length B)."""
    acc = valid_steps(accepted, valid, block_size=block_size)
    return np.bincount(acc, minlength=block_size).astype(np.int64)


def rates_from_hist(hist) -> np.ndarray:
    """Per-position rates r_1..r_{B-1} from a histogram of accepted lengths 0..B-1."""
    h = np.asarray(hist, dtype=np.float64)
    total = h.sum()
    if total <= 0:
        raise ValueError("empty histogram")
    tail = np.cumsum(h[::-1])[::-1]  # tail[j] = count(accepted >= j)
    return tail[1:] / total


def tau_from_hist(hist) -> float:
    """tau from a histogram of accepted lengths 0..B-1: sum_k (k+1) h_k / sum_k h_k."""
    h = np.asarray(hist, dtype=np.float64)
    total = h.sum()
    if total <= 0:
        raise ValueError("empty histogram")
    return float(np.dot(np.arange(1, h.size + 1), h) / total)


def pool_hists(hists: Iterable) -> np.ndarray:
    """Sum histograms of possibly different lengths (shorter ones padded with zeros)."""
    hs = [np.asarray(h, dtype=np.int64) for h in hists]
    if not hs:
        return np.zeros(0, np.int64)
    out = np.zeros(max(h.size for h in hs), np.int64)
    for h in hs:
        out[: h.size] += h
    return out


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


def summarize(accepted, valid=None, *, block_size: int) -> dict:
    """The per-(suite, method) acceptance statistics, JSON-ready.

    Returns {"tau": float, "accept_rate_by_pos": [r_1..r_{B-1}], "accepted_hist": [c_0..c_{B-1}],
    "steps": int}.
    """
    acc = _nonempty(valid_steps(accepted, valid, block_size=block_size))
    return {
        "tau": tau(acc, block_size=block_size),
        "accept_rate_by_pos": [float(x) for x in accept_rate_by_position(acc, block_size=block_size)],
        "accepted_hist": [int(x) for x in accepted_hist(acc, block_size=block_size)],
        "steps": int(acc.size),
    }
