"""Acceptance statistics on a hand-made run: known accepted lengths -> known tau, rates, histogram."""

import math

import numpy as np
import pytest

from eval import metrics as M
from hdflash_jax.decode.stats import AcceptanceStats, acceptance_stats, pool_hists

B = 4  # draft positions 1..3
# steps x rows; row 1 finishes after 2 steps, row 2 after 3 (later entries are garbage).
ACCEPTED = np.array([
    [3, 0, 1],
    [2, 1, 3],
    [0, 9, 2],
    [1, 9, 9],
])
VALID = np.array([
    [True, True, True],
    [True, True, True],
    [True, False, True],
    [True, False, False],
])
# valid accepted: 3,0,1,2,1,3,0,2,1  (9 steps)


def test_tau():
    # mean(accepted + 1) = (4+1+2+3+2+4+1+3+2) / 9 = 22/9
    assert acceptance_stats(ACCEPTED, VALID, block_size=B).tau == pytest.approx(22 / 9)


def test_rates_by_position():
    # r1 = #(>=1)/9 = 7/9; r2 = #(>=2)/9 = 4/9; r3 = #(>=3)/9 = 2/9
    s = AcceptanceStats.from_accepted(ACCEPTED, VALID, block_size=B)
    np.testing.assert_allclose(s.accept_rate_by_position, [7 / 9, 4 / 9, 2 / 9])
    assert 1 + sum(s.accept_rate_by_position) == pytest.approx(s.tau)


def test_hist_and_hist_identities():
    s = AcceptanceStats.from_accepted(ACCEPTED, VALID, block_size=B)
    assert s.accepted_hist == (2, 3, 2, 2) and s.steps == 9 and s.block_size == B
    assert AcceptanceStats.from_hist([2, 3, 2, 2]) == s


def test_to_json_is_json_ready():
    s = AcceptanceStats.from_accepted(ACCEPTED, VALID, block_size=B).to_json()
    assert s == {
        "tau": pytest.approx(22 / 9),
        "accept_rate_by_pos": pytest.approx([7 / 9, 4 / 9, 2 / 9]),
        "accepted_hist": [2, 3, 2, 2],
        "steps": 9,
    }
    assert all(type(x) is float for x in s["accept_rate_by_pos"])
    assert all(type(x) is int for x in s["accepted_hist"])


def test_layout_does_not_matter():
    assert acceptance_stats(ACCEPTED.T, VALID.T, block_size=B).tau == pytest.approx(22 / 9)


def test_pooling_concatenates_steps():
    # Batch 2: one row, accepted 3,3,3 -> pooled: 12 steps, sum(acc+1) = 22 + 12 = 34.
    pooled = AcceptanceStats.pooled([acceptance_stats(ACCEPTED, VALID, block_size=B),
                                     acceptance_stats(np.array([[3], [3], [3]]), block_size=B)])
    assert pooled.steps == 12
    assert pooled.tau == pytest.approx(34 / 12)  # not the mean of per-batch taus
    np.testing.assert_allclose(pooled.accept_rate_by_position, [10 / 12, 7 / 12, 5 / 12])
    assert pooled.accepted_hist == (2, 3, 2, 5)
    np.testing.assert_array_equal(pool_hists([[1, 2], [1, 1, 1]]), [2, 3, 1])


def test_ar_has_tau_one_and_no_positions():
    s = acceptance_stats(np.zeros((5, 2), int), block_size=1).to_json()
    assert s["tau"] == 1.0 and s["accept_rate_by_pos"] == [] and s["accepted_hist"] == [10]


def test_no_valid_steps():
    s = acceptance_stats(ACCEPTED, np.zeros_like(VALID), block_size=B)
    assert math.isnan(s.tau) and s.steps == 0 and s.accepted_hist == (0, 0, 0, 0)
    assert len(s.accept_rate_by_position) == B - 1 and all(math.isnan(x) for x in s.accept_rate_by_position)


def test_throughput_and_speedup():
    assert M.tokens_per_second(1000, 4.0) == 250.0
    assert M.speedup(ar_wall_s=10.0, method_wall_s=4.0) == 2.5
    with pytest.raises(ValueError):
        M.tokens_per_second(10, 0.0)
    with pytest.raises(ValueError):
        M.speedup(1.0, 0.0)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="0..3"):
        acceptance_stats(np.array([4]), block_size=B)
    with pytest.raises(ValueError, match="0..3"):
        acceptance_stats(np.array([-1]), block_size=B)
    with pytest.raises(ValueError, match="shape"):
        acceptance_stats(ACCEPTED, VALID[:2], block_size=B)
    with pytest.raises(ValueError, match="integers"):
        acceptance_stats(np.array([1.5]), block_size=B)
    with pytest.raises(ValueError, match="non-negative"):
        AcceptanceStats.from_hist([1, -1])
