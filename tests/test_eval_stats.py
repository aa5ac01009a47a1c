"""eval.bootstrap: intervals of ratio statistics over prompts, paired speedups, suite means and training seeds."""

import numpy as np
import pytest

from eval.bootstrap import paired_rate_ci, ratio, ratio_ci, seed_ci, seed_suite_ci, suite_mean_ci


def test_ratio_point_is_the_pooled_figure_and_lies_inside():
    acc, steps = np.array([10, 30, 6, 9]), np.array([5, 10, 3, 3])  # τ pooled = 55 / 21
    ci = ratio_ci(acc, steps)
    assert ci.point == pytest.approx(55 / 21)
    assert ci.lo <= ci.point <= ci.hi
    assert ci.lo >= min(acc / steps) and ci.hi <= max(acc / steps)  # a ratio of sums stays within the rows'


def test_same_seed_same_interval_and_constant_data_has_zero_width():
    acc, steps = np.arange(1, 41), np.full(40, 2.0)
    assert ratio_ci(acc, steps, seed=3) == ratio_ci(acc, steps, seed=3)
    ci = ratio_ci(np.full(30, 6.0), np.full(30, 2.0))
    assert (ci.lo, ci.point, ci.hi) == (3.0, 3.0, 3.0)


def test_interval_shrinks_with_more_prompts():
    rng = np.random.default_rng(0)
    widths = []
    for n in (20, 320):
        steps = rng.integers(5, 40, n).astype(float)
        acc = steps * rng.uniform(2, 4, n)
        ci = ratio_ci(acc, steps)
        widths.append(ci.hi - ci.lo)
    assert widths[1] < widths[0] / 2.5  # ~ 1/sqrt(16) = 1/4 expected


def test_coverage_of_a_known_mean():
    # prompts whose per-step τ has mean 3 exactly: the 95% interval should hold 3 about 95% of the time
    rng = np.random.default_rng(1)
    hits, trials = 0, 200
    for _ in range(trials):
        steps = np.full(40, 10.0)
        acc = steps * rng.normal(3.0, 0.8, 40)
        ci = ratio_ci(acc, steps, n_boot=400, seed=int(rng.integers(1 << 30)))
        hits += ci.lo <= 3.0 <= ci.hi
    assert 0.88 <= hits / trials <= 0.99


def test_paired_speedup_and_rate_ratio():
    ar, m = np.array([2.0, 4.0, 6.0]), np.array([1.0, 2.0, 3.0])
    ci = paired_rate_ci(ar, m)
    assert (ci.lo, ci.point, ci.hi) == pytest.approx((2.0, 2.0, 2.0))  # pairing: every draw is exactly 2×
    # per token: AR 12 s / 12 tokens, method 6 s / 24 tokens -> (1 s/token) / (0.25 s/token) = 4×
    ci = paired_rate_ci(ar, m, [3, 4, 5], [6, 8, 10])
    assert ci.point == pytest.approx(4.0)


def test_suite_mean_is_the_mean_of_suite_ratios():
    a = np.array([[6.0, 2.0], [9.0, 3.0]])  # ratio 3
    b = np.array([[2.0, 2.0], [4.0, 4.0], [1.0, 1.0]])  # ratio 1
    ci = suite_mean_ci([a, b], ratio)
    assert ci.point == pytest.approx(2.0) and ci.lo == pytest.approx(2.0) and ci.hi == pytest.approx(2.0)


def test_seed_interval_holds_the_seed_variance():
    rng = np.random.default_rng(2)
    steps = np.full(50, 10.0)
    same = [(steps * rng.normal(3.0, 0.3, 50), steps) for _ in range(3)]
    spread = [(steps * rng.normal(mu, 0.3, 50), steps) for mu in (2.5, 3.0, 3.5)]
    w_same, w_spread = (seed_ci(x, n_boot=300) for x in (same, spread))
    assert w_spread.point == pytest.approx(3.0, abs=0.1)
    assert (w_spread.hi - w_spread.lo) > 3 * (w_same.hi - w_same.lo)


def _prompts(tau_per_prompt, steps=10.0):
    t = np.asarray(tau_per_prompt, np.float64)
    return np.stack([t * steps, np.full_like(t, steps)], axis=1)


def test_seed_suite_average_and_the_paired_difference():
    rng = np.random.default_rng(3)
    easy, hard = rng.uniform(2.0, 6.0, 40), rng.uniform(1.0, 3.0, 30)  # prompts differ far more than the drafters
    base = [[_prompts(easy + e), _prompts(hard + e)] for e in (-0.02, 0.0, 0.02)]  # 3 seeds, 2 suites
    better = [[x + np.array([1.0, 0.0]) * 0.2 * x[:, 1:] for x in s] for s in base]  # +0.2 τ on every prompt
    (a, b), diff = seed_suite_ci([better, base], n_boot=400)
    assert b.point == pytest.approx((easy.mean() + hard.mean()) / 2) and a.point - b.point == pytest.approx(0.2)
    assert diff.point == pytest.approx(0.2) and b.lo < b.point < b.hi and b.hi - b.lo > 0.3
    # paired: the prompts' spread, common to both, cancels; only the seeds' ±0.02 is left in the difference
    assert 0.15 < diff.lo < 0.2 < diff.hi < 0.25 and diff.hi - diff.lo < (b.hi - b.lo) / 4
    (same, _), zero = seed_suite_ci([base, base], n_boot=200)
    assert zero.point == 0.0 and zero.hi - zero.lo < 0.2
    # the seeds' spread widens a group's interval
    spread = [[x * np.array([1.0 + 0.2 * m, 1.0]) for x in s] for m, s in zip((-1, 0, 1), base)]
    (wide,), none = seed_suite_ci([spread], n_boot=400)
    assert none is None and (wide.hi - wide.lo) > 1.5 * (same.hi - same.lo)
    with pytest.raises(ValueError, match="same suites and prompts"):
        seed_suite_ci([base, [[base[0][0][:-1], base[0][1]]]])


def test_bad_input():
    with pytest.raises(ValueError):
        ratio_ci([], [])
    with pytest.raises(ValueError):
        ratio_ci([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        ratio_ci([1.0], [0.0])
    with pytest.raises(ValueError):
        ratio_ci([float("nan")], [1.0])
    with pytest.raises(ValueError):
        seed_ci([])


def test_runner_intervals_from_per_sample_figures():
    from eval.runner import Cell, interval_figures

    ar, m = Cell(), Cell()
    # tokens, steps, accepted tokens, wall s, decode s per sample; AR: one token per step
    ar.per_sample = {0: [10, 10, 10, 2.0, 1.8], 1: [21, 21, 21, 4.0, 3.6]}
    m.per_sample = {0: [10, 4, 10, 1.0, 0.8], 1: [21, 7, 21, 2.0, 1.6]}
    f = interval_figures(m, ar, 2)
    lo, hi = f["tau_ci"]
    assert lo <= 31 / 11 <= hi and 10 / 4 <= lo and hi <= 3.0
    assert f["speedup_ci"] == pytest.approx((2.0, 2.0))
    # decode: AR (1.8 + 3.6) s / 29 tokens after the first vs (0.8 + 1.6) / 29 -> 5.4 / 2.4
    assert f["decode_speedup"] == pytest.approx(5.4 / 2.4)


def test_training_seeds_of_a_method(tmp_path):
    from eval.methods import Method
    from eval.runner import training_seeds
    from eval.targets import training_seeds as checkpoint_seeds

    run = tmp_path / "run"
    (run / "drafter").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 7\n")
    # a checkpoint's seed, read when its drafter source is made: the training run's config.yaml next to it
    assert checkpoint_seeds(run / "drafter") == (7,)
    assert checkpoint_seeds(tmp_path / "nowhere" / "d") == ()
    assert training_seeds(Method("ar", None, 1, "autoregressive")) == ()
    assert training_seeds(Method("mtp3", None, 4, "the target's MTP layer chained 3x")) == ()
    assert training_seeds(Method("hyperdflash-s2", None, 8, "/x/drafter")) == (2,)  # the name says it
    assert training_seeds(Method("mine", None, 8, str(run / "drafter"), seeds=(7,))) == (7,)
    assert training_seeds(Method("untrained", None, 8, "untrained preset tiny-hyperdflash")) == ()
