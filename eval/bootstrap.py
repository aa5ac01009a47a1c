"""95% confidence intervals for τ and speedups: the percentile bootstrap over prompts (pure numpy).

The unit resampled is the prompt (an evaluation sample; both turns of an MT-Bench sample stay together), because
prompts, not verify steps, are the independent draws: steps of one prompt share its difficulty. Every statistic
here is a ratio of sums over the resampled prompts, i.e. the same pooled figure the tables report:

  τ         = Σ accepted tokens (accepted + 1 per step) / Σ steps
  speedup   = Σ AR seconds / Σ method seconds, the same prompts drawn for both (paired)
  decode    = the same on decode seconds (wall minus the prompt's prefill), per output token after the first

`suite_mean_ci` gives the tables' "avg" column its interval: the mean over suites of a per-suite ratio, prompts
resampled within each suite (stratified).

Training seeds are a second level: `seed_ci` draws seeds, then prompts within each drawn seed (a two-stage
bootstrap), so its interval holds both the prompt and the training-seed variance.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

N_BOOT = 2000
LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Interval:
    """A point estimate and its percentile-bootstrap interval."""
    point: float
    lo: float
    hi: float
    n: int  # resampled units (prompts, or seeds for `seed_ci`)

    @property
    def bounds(self) -> tuple[float, float]:
        return (self.lo, self.hi)

    def to_json(self) -> list[float]:
        return [self.lo, self.hi]

    def __str__(self) -> str:
        return f"{self.point:.2f} [{self.lo:.2f}, {self.hi:.2f}]"


def _draws(n: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n] prompt indices drawn with replacement (fixed seed: a rerun gives the same interval)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _interval(point: float, boots: np.ndarray, n: int, level: float) -> Interval:
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boots, [alpha, 1.0 - alpha])
    return Interval(float(point), float(lo), float(hi), n)


def _check(*arrays: np.ndarray) -> int:
    n = arrays[0].shape[0]
    if n < 1:
        raise ValueError("a bootstrap needs at least one unit")
    for a in arrays:
        if a.shape != (n,):
            raise ValueError(f"per-unit arrays must all have shape ({n},), got {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError("per-unit values must be finite")
    return n


def ratio_ci(num: Sequence[float], den: Sequence[float], *, n_boot: int = N_BOOT, level: float = LEVEL,
             seed: int = 0) -> Interval:
    """Σ num / Σ den with its interval, prompts resampled (τ: num = accepted tokens, den = steps)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    n = _check(num, den)
    if not den.sum() > 0:
        raise ValueError("the denominator sums to 0")
    idx = _draws(n, n_boot, seed)
    d = den[idx].sum(1)
    boots = num[idx].sum(1) / np.where(d > 0, d, np.nan)
    boots = boots[np.isfinite(boots)]  # a draw of only zero-step prompts has no ratio
    return _interval(num.sum() / den.sum(), boots, n, level)


def paired_rate_ci(base_s: Sequence[float], method_s: Sequence[float], base_n: Sequence[float] | None = None,
                   method_n: Sequence[float] | None = None, *, n_boot: int = N_BOOT, level: float = LEVEL,
                   seed: int = 0) -> Interval:
    """Speedup of a method over a baseline on the same prompts, drawn together (the pairing removes the
    prompt-length variance both share): (Σ base_s / Σ base_n) / (Σ method_s / Σ method_n), i.e. the ratio of
    seconds per token. Without token counts (n = 1 per prompt) it is Σ base seconds / Σ method seconds."""
    bs, ms = np.asarray(base_s, np.float64), np.asarray(method_s, np.float64)
    bn = np.ones_like(bs) if base_n is None else np.asarray(base_n, np.float64)
    mn = np.ones_like(ms) if method_n is None else np.asarray(method_n, np.float64)
    n = _check(bs, ms, bn, mn)
    if not (bs.sum() > 0 and ms.sum() > 0 and bn.sum() > 0 and mn.sum() > 0):
        raise ValueError("seconds and token counts must sum to > 0")
    idx = _draws(n, n_boot, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        boots = (bs[idx].sum(1) / bn[idx].sum(1)) / (ms[idx].sum(1) / mn[idx].sum(1))
    boots = boots[np.isfinite(boots)]
    return _interval((bs.sum() / bn.sum()) / (ms.sum() / mn.sum()), boots, n, level)


def ratio(sums: np.ndarray) -> np.ndarray:
    """Column 0 / column 1 of per-draw sums (τ: accepted tokens / steps; speedup: AR s / method s)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return sums[..., 0] / sums[..., 1]


def rate_ratio(sums: np.ndarray) -> np.ndarray:
    """(col 0 / col 1) / (col 2 / col 3): baseline seconds per token over the method's."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (sums[..., 0] / sums[..., 1]) / (sums[..., 2] / sums[..., 3])


def suite_mean_ci(strata: Sequence[np.ndarray], stat: Callable[[np.ndarray], np.ndarray] = ratio, *,
                  n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> Interval:
    """Mean over strata (suites) of `stat` of each stratum's column sums; each stratum is a [prompts, columns]
    array of per-prompt figures, its prompts resampled on their own."""
    mats = [np.asarray(x, np.float64) for x in strata]
    if not mats or any(m.ndim != 2 or m.shape[0] < 1 for m in mats):
        raise ValueError("suite_mean_ci needs >= 1 stratum of shape [prompts >= 1, columns]")
    if any(not np.all(np.isfinite(m)) for m in mats):
        raise ValueError("per-unit values must be finite")
    rng = np.random.default_rng(seed)
    point = float(np.mean([stat(m.sum(0)) for m in mats]))
    boots = np.zeros(n_boot)
    for m in mats:
        idx = rng.integers(0, m.shape[0], size=(n_boot, m.shape[0]))
        boots += stat(np.stack([m[:, c][idx].sum(1) for c in range(m.shape[1])], axis=-1))
    boots /= len(mats)
    return _interval(point, boots[np.isfinite(boots)], sum(m.shape[0] for m in mats), level)


def seed_ci(per_seed: Sequence[tuple[Sequence[float], Sequence[float]]], *, n_boot: int = N_BOOT,
            level: float = LEVEL, seed: int = 0) -> Interval:
    """Mean over training seeds of each seed's Σ num / Σ den, two-stage bootstrap: seeds drawn with
    replacement, then prompts within each drawn seed. `per_seed`: one (num, den) pair of per-prompt arrays per
    seed (each seed may have its own prompts)."""
    parts = [(np.asarray(a, np.float64), np.asarray(b, np.float64)) for a, b in per_seed]
    if not parts:
        raise ValueError("seed_ci needs at least one seed")
    for a, b in parts:
        _check(a, b)
    rng = np.random.default_rng(seed)
    point = float(np.mean([a.sum() / b.sum() for a, b in parts]))
    s = len(parts)
    boots = np.empty(n_boot)
    for i in range(n_boot):
        vals = []
        for j in rng.integers(0, s, size=s):
            a, b = parts[j]
            k = rng.integers(0, a.shape[0], size=a.shape[0])
            d = b[k].sum()
            vals.append(a[k].sum() / d if d > 0 else np.nan)
        boots[i] = np.nanmean(vals)
    return _interval(point, boots[np.isfinite(boots)], s, level)


def seed_suite_ci(groups: Sequence[Sequence[Sequence[np.ndarray]]], *, n_boot: int = N_BOOT, level: float = LEVEL,
                  seed: int = 0) -> tuple[list[Interval], Interval | None]:
    """The suites' average τ of each group (a drafter variant) over its training seeds, and for two groups their
    difference (group 0 minus group 1), two-stage bootstrap with the prompts crossed: `groups[g][s][k]` is the
    [prompts, 2] (accepted tokens, steps) of group g, seed s, suite k, the same prompts in the same order in every
    group and seed. A draw resamples each suite's prompts once, shared by every group and seed (the prompts are one
    fixed set run under every drafter: the difference is paired), then each group's seeds with replacement; the
    figure is the mean over suites of the mean over the drawn seeds of Σ accepted / Σ steps."""
    mats = [[[np.asarray(x, np.float64) for x in s] for s in g] for g in groups]
    if not mats or any(not g for g in mats):
        raise ValueError("seed_suite_ci needs at least one group with at least one seed")
    n_suites = len(mats[0][0])
    shapes = [x.shape for x in mats[0][0]]
    for g in mats:
        for s in g:
            if [x.shape for x in s] != shapes:
                raise ValueError(f"every group and seed needs the same suites and prompts: {shapes}")
            if any(x.ndim != 2 or x.shape[0] < 1 or x.shape[1] != 2 or not np.all(np.isfinite(x)) for x in s):
                raise ValueError("each suite needs a finite [prompts >= 1, 2] array")
    rng = np.random.default_rng(seed)
    # taus[g][s, k, b]: seed s of group g on suite k under prompt draw b
    taus = [np.zeros((len(g), n_suites, n_boot)) for g in mats]
    for k, (n, _) in enumerate(shapes):
        idx = rng.integers(0, n, size=(n_boot, n))
        for g, t in zip(mats, taus):
            for s, suites in enumerate(g):
                with np.errstate(divide="ignore", invalid="ignore"):
                    t[s, k] = suites[k][idx, 0].sum(1) / suites[k][idx, 1].sum(1)
    points, boots = [], []
    for g, t in zip(mats, taus):
        points.append(float(np.mean([[x[:, 0].sum() / x[:, 1].sum() for x in s] for s in g])))
        pick = rng.integers(0, len(g), size=(n_boot, len(g)))  # [draw, seed slot] -> seed
        boots.append(np.nanmean(t[pick, :, np.arange(n_boot)[:, None]], axis=(1, 2)))
    intervals = [_interval(p, b[np.isfinite(b)], len(g), level) for p, b, g in zip(points, boots, mats)]
    if len(mats) != 2:
        return intervals, None
    d = boots[0] - boots[1]
    return intervals, _interval(points[0] - points[1], d[np.isfinite(d)], sum(len(g) for g in mats), level)
