"""Metrics on a hand-made run: known accepted lengths -> known tau, rates, histogram."""

import numpy as np
import pytest

from eval import metrics as M

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
    assert M.tau(ACCEPTED, VALID, block_size=B) == pytest.approx(22 / 9)


def test_rates_by_position():
    # r1 = #(>=1)/9 = 7/9; r2 = #(>=2)/9 = 4/9; r3 = #(>=3)/9 = 2/9
    r = M.accept_rate_by_position(ACCEPTED, VALID, block_size=B)
    np.testing.assert_allclose(r, [7 / 9, 4 / 9, 2 / 9])
    assert 1 + r.sum() == pytest.approx(M.tau(ACCEPTED, VALID, block_size=B))


def test_hist_and_hist_identities():
    h = M.accepted_hist(ACCEPTED, VALID, block_size=B)
    np.testing.assert_array_equal(h, [2, 3, 2, 2])
    np.testing.assert_allclose(M.rates_from_hist(h), [7 / 9, 4 / 9, 2 / 9])
    assert M.tau_from_hist(h) == pytest.approx(22 / 9)


def test_summarize_is_json_ready():
    s = M.summarize(ACCEPTED, VALID, block_size=B)
    assert s == {
        "tau": pytest.approx(22 / 9),
        "accept_rate_by_pos": pytest.approx([7 / 9, 4 / 9, 2 / 9]),
        "accepted_hist": [2, 3, 2, 2],
        "steps": 9,
    }
    assert all(type(x) is float for x in s["accept_rate_by_pos"])
    assert all(type(x) is int for x in s["accepted_hist"])


def test_layout_does_not_matter():
    assert M.tau(ACCEPTED.T, VALID.T, block_size=B) == pytest.approx(22 / 9)


def test_aggregate_concatenates_steps():
    # Batch 2: one row, accepted 3,3,3 -> pooled: 12 steps, sum(acc+1) = 22 + 12 = 34.
    pooled = M.concat_steps([(ACCEPTED, VALID), (np.array([[3], [3], [3]]), None)], block_size=B)
    assert pooled.size == 12
    assert M.tau(pooled, block_size=B) == pytest.approx(34 / 12)  # not the mean of per-batch taus
    np.testing.assert_allclose(M.accept_rate_by_position(pooled, block_size=B), [10 / 12, 7 / 12, 5 / 12])
    np.testing.assert_array_equal(
        M.pool_hists([M.accepted_hist(ACCEPTED, VALID, block_size=B), [0, 0, 0, 3]]), [2, 3, 2, 5]
    )
    np.testing.assert_array_equal(M.pool_hists([[1, 2], [1, 1, 1]]), [2, 3, 1])


def test_ar_has_tau_one_and_no_positions():
    s = M.summarize(np.zeros((5, 2), int), block_size=1)
    assert s["tau"] == 1.0 and s["accept_rate_by_pos"] == [] and s["accepted_hist"] == [10]


def test_throughput_and_speedup():
    assert M.tokens_per_second(1000, 4.0) == 250.0
    assert M.speedup(ar_wall_s=10.0, method_wall_s=4.0) == 2.5
    with pytest.raises(ValueError):
        M.tokens_per_second(10, 0.0)
    with pytest.raises(ValueError):
        M.speedup(1.0, 0.0)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="0..3"):
        M.tau(np.array([4]), block_size=B)
    with pytest.raises(ValueError, match="0..3"):
        M.tau(np.array([-1]), block_size=B)
    with pytest.raises(ValueError, match="shape"):
        M.tau(ACCEPTED, VALID[:2], block_size=B)
    with pytest.raises(ValueError, match="no valid steps"):
        M.tau(ACCEPTED, np.zeros_like(VALID), block_size=B)
