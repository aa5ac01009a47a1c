"""DSpark on the tiny target: its config from the checkpoint keys, greedy speculative output equal to greedy AR
(mean pooling and the inherited-gate pooling), seeded sampled runs, the draft ring holding committed keys only."""

import dataclasses

import numpy as np
import pytest

import jax.numpy as jnp

from hdflash_jax.config import get_preset
from hdflash_jax.decode.dspark_drafter import DSparkDrafterAdapter
from hdflash_jax.decode.generate import DecodeSettings, Generator
from hdflash_jax.deepseek_v4.model import init_target
from hdflash_jax.dspark.config import DSparkConfig, is_dspark_config
from hdflash_jax.dspark.model import init_dspark_from_target

# SWA, CSA and HCA trunk layers; the drafter taps the last two; vocabulary 512 = the Markov rank below
MICRO = get_preset("tiny").replace(n_layers=3, compress_ratios=(0, 4, 8, 0), n_hash_layers=1)
BLOCK = 4


def _dcfg(**kw):
    base = dict(block_size=BLOCK, noise_token_id=MICRO.vocab_size - 1, target_layer_ids=(1, 2),
                markov_rank=MICRO.vocab_size, n_routed_experts=4, n_activated_experts=2)
    base.update(kw)
    return DSparkConfig(**base)


def test_config_from_checkpoint_keys():
    d = {"dim": 64, "dspark_block_size": 5, "dspark_noise_token_id": 128799, "dspark_target_layer_ids": [37, 38, 39],
         "dspark_markov_rank": 256, "dspark_n_routed_experts": 128, "dspark_num_experts_per_tok": 3}
    c = DSparkConfig.from_checkpoint_dict(d)
    assert (c.block_size, c.noise_token_id, c.target_layer_ids, c.markov_rank) == (5, 128799, (37, 38, 39), 256)
    assert (c.n_routed_experts, c.n_activated_experts, c.num_blocks) == (128, 3, 3)
    assert c.to_checkpoint_dict() == {k: v for k, v in d.items() if k != "dim"}
    assert is_dspark_config(d) and not is_dspark_config({"dim": 64})
    nested = {"text_config": {k: v for k, v in d.items() if k.startswith("dspark_")}}
    assert DSparkConfig.from_checkpoint_dict(nested) == c
    with pytest.raises(ValueError, match="missing 'dspark_markov_rank'"):
        DSparkConfig.from_checkpoint_dict({k: v for k, v in d.items() if k != "dspark_markov_rank"})
    with pytest.raises(ValueError, match="field 'dspark_block_size': expected an integer, got '5'"):
        DSparkConfig.from_checkpoint_dict({**d, "dspark_block_size": "5"})
    with pytest.raises(ValueError, match="strictly increasing"):
        DSparkConfig.from_checkpoint_dict({**d, "dspark_target_layer_ids": [39, 38]})
    with pytest.raises(ValueError, match="reach past the target's 3 layers"):
        _dcfg(target_layer_ids=(2, 3)).check_target(MICRO)
    with pytest.raises(ValueError, match="outside the target's vocabulary"):
        _dcfg(noise_token_id=MICRO.vocab_size).check_target(MICRO)


@pytest.fixture(scope="module")
def target():
    return init_target(MICRO, seed=1)


def _prompts():
    rng = np.random.RandomState(0)
    return [rng.randint(2, MICRO.vocab_size, n).tolist() for n in (9, 14, 5)]


def _repeat_markov(drafter, strength=60.0):
    """Markov head = strength · identity (rank = vocabulary): the draft repeats its predecessor, which a random
    tiny target's greedy output often does too, so verify steps accept some drafts and reject others."""
    v = MICRO.vocab_size
    drafter.markov_head.markov_w1.weight[...] = jnp.eye(v, dtype=jnp.float32)
    drafter.markov_head.markov_w2.weight[...] = strength * jnp.eye(v, dtype=jnp.float32)
    return drafter


@pytest.mark.parametrize("pooling", ["mean", "gated"])
def test_greedy_equals_ar(target, pooling):
    settings = DecodeSettings(max_new_tokens=40)
    ar = Generator(target, settings=settings).generate(_prompts())
    drafter = _repeat_markov(init_dspark_from_target(target, _dcfg(pooling=pooling), seed=3))
    g = Generator(target, DSparkDrafterAdapter(drafter.dcfg, BLOCK), drafter, settings=settings)
    res = g.generate(_prompts())
    assert res.block_size == BLOCK + 1
    np.testing.assert_array_equal(res.tokens, ar.tokens)
    np.testing.assert_array_equal(res.lengths, ar.lengths)
    hist = np.bincount(res.accepted[res.accepted >= 0], minlength=BLOCK + 1)
    print(f"\nDSpark ({pooling}) greedy = AR; tau {res.stats.tau:.3f}, accepted-length histogram {hist.tolist()}")
    # the schedule the test relies on: both full rejections and partial or full acceptances occurred
    assert hist[0] > 0 and hist[1:].sum() > 0


def test_sampled_seeded_and_rows_independent(target):
    settings = DecodeSettings(max_new_tokens=24, temperature=0.8)
    drafter = _repeat_markov(init_dspark_from_target(target, _dcfg(), seed=3), strength=4.0)
    g = Generator(target, DSparkDrafterAdapter(drafter.dcfg, BLOCK, sampled=True, temperature=0.8), drafter,
                  settings=settings)
    a, b = g.generate(_prompts(), seed=5), g.generate(_prompts(), seed=5)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens >= 0).sum() == a.lengths.sum() and np.all(a.lengths == 24)


@pytest.mark.slow
def test_eval_run_dspark_checkpoint(tmp_path):
    """`eval.run --drafter dspark=CKPT` on tiny-random: the DSpark method runs, B = 5 slots verify 6 wide, greedy
    outputs equal AR's (recorded in results.json)."""
    import json

    from eval import run as ev
    from hdflash_jax.config import get_preset as preset
    from hdflash_jax.families import family
    from hdflash_jax.dspark.model import init_dspark

    tcfg = preset("tiny")
    dcfg = DSparkConfig(block_size=5, noise_token_id=tcfg.vocab_size - 1, target_layer_ids=(3, 4, 5), markov_rank=16)
    ckpt = family("dspark").save(tmp_path / "dspark", init_dspark(dcfg, tcfg, seed=2), dcfg)
    out = tmp_path / "out"
    rc = ev.main(["--suite", "gsm8k", "--method", "dspark", "--drafter", f"dspark={ckpt}", "--limit", "2",
                  "--out", str(out), "--target", "tiny-random", "--max-new-tokens", "8", "--prompt-buckets", "512",
                  "--quiet"])
    assert rc == 0
    r = json.loads((out / "results.json").read_text())
    cell = r["suites"]["gsm8k"]["dspark"]
    assert cell["greedy_match_ar"] is True and cell["block_size"] == 6 and len(cell["accepted_hist"]) == 6


@pytest.mark.slow
def test_eval_run_confidence_schedule_auto(tmp_path):
    """`eval.run --confidence-schedule auto` at T = 1: step costs measured on the compiled shape, the chosen widths
    and costs in results.json and results.md, config.confidence_schedule recorded; explicit costs of the wrong
    count are refused before any compute (one line naming the flag)."""
    import json

    from eval import run as ev
    from hdflash_jax.config import get_preset as preset
    from hdflash_jax.families import family
    from hdflash_jax.dspark.model import init_dspark

    tcfg = preset("tiny")
    dcfg = DSparkConfig(block_size=5, noise_token_id=tcfg.vocab_size - 1, target_layer_ids=(3, 4, 5), markov_rank=16)
    ckpt = family("dspark").save(tmp_path / "dspark", init_dspark(dcfg, tcfg, seed=2), dcfg)
    args = ["--suite", "gsm8k", "--method", "dspark", "--drafter", f"dspark={ckpt}", "--limit", "2", "--target",
            "tiny-random", "--max-new-tokens", "8", "--prompt-buckets", "512", "--temperature", "1.0", "--quiet"]
    assert ev.main([*args, "--out", str(tmp_path / "bad"), "--confidence-schedule", "1,2,3"]) == 2
    out = tmp_path / "out"
    assert ev.main([*args, "--out", str(out), "--confidence-schedule", "auto"]) == 0
    r = json.loads((out / "results.json").read_text())
    cell = r["suites"]["gsm8k"]["dspark"]
    assert r["config"]["confidence_schedule"] == "auto" and "verify_width_hist" not in r["suites"]["gsm8k"]["ar"]
    assert len(cell["verify_width_hist"]) == 6 and sum(cell["verify_width_hist"]) > 0
    (shape, costs), = cell["verify_costs"].items()
    assert shape == "512x1" and len(costs["measured"]) == len(costs["used"]) == 6
    assert "## Confidence schedule (DSpark)" in (out / "results.md").read_text()


# ---- the confidence schedule: the head picks how many drafts each step verifies --------------------------------

def _scheduled(target, costs, max_new_tokens=40):
    drafter = _repeat_markov(init_dspark_from_target(target, _dcfg(), seed=3))
    s = DecodeSettings(max_new_tokens=max_new_tokens, confidence_schedule=costs)
    return Generator(target, DSparkDrafterAdapter(drafter.dcfg, BLOCK), drafter, settings=s).generate(_prompts())


@pytest.mark.slow
def test_confidence_schedule_with_flat_costs_verifies_the_whole_block(target):
    """With flat costs the whole block is always the best width: under the schedule (one branch per verify width)
    tokens and accepted lengths equal the unscheduled run's bit for bit, and greedy output equals AR."""
    settings = DecodeSettings(max_new_tokens=40)
    ar = Generator(target, settings=settings).generate(_prompts())
    drafter = _repeat_markov(init_dspark_from_target(target, _dcfg(), seed=3))
    whole = Generator(target, DSparkDrafterAdapter(drafter.dcfg, BLOCK), drafter, settings=settings).generate(
        _prompts())
    flat = _scheduled(target, (1.0,) * (BLOCK + 1))
    np.testing.assert_array_equal(flat.tokens, ar.tokens)
    np.testing.assert_array_equal(flat.accepted, whole.accepted)
    assert whole.stats.tau > 1  # drafts were accepted: the comparison can see a schedule that drops them
    steps = int((flat.accepted >= 0).any(1).sum())
    assert flat.width_hist() == [0] * BLOCK + [steps] and whole.width_hist() == flat.width_hist()


@pytest.mark.slow
def test_confidence_schedule_with_steep_costs_verifies_less(target):
    """Costs that make every draft too dear: the schedule verifies the anchor alone (τ = 1 exactly) and greedy
    output still equals AR; the flat schedule accepted more."""
    ar = Generator(target, settings=DecodeSettings(max_new_tokens=40)).generate(_prompts())
    steep = _scheduled(target, tuple(1.0 + 2.0 * w for w in range(BLOCK + 1)))
    np.testing.assert_array_equal(steep.tokens, ar.tokens)
    assert steep.stats.tau == 1.0 and _scheduled(target, (1.0,) * (BLOCK + 1)).stats.tau > 1.0
    assert steep.width_hist()[1:] == [0] * BLOCK and steep.width_hist()[0] > 0


@pytest.mark.slow
def test_confidence_schedule_on_measured_costs(target):
    """`measure_step_costs` times a step at each verify width on the batch's shape; set for that shape, the
    schedule chooses among the widths and greedy output still equals AR's; another shape keeps the settings'."""
    from hdflash_jax.decode.verify_costs import measure_step_costs

    settings = DecodeSettings(max_new_tokens=40)
    ar = Generator(target, settings=settings).generate(_prompts())
    drafter = _repeat_markov(init_dspark_from_target(target, _dcfg(), seed=3))
    g = Generator(target, DSparkDrafterAdapter(drafter.dcfg, BLOCK), drafter, settings=settings)
    costs = measure_step_costs(g, _prompts(), repeats=3)
    print(f"\nmeasured step seconds per verify width 1..{BLOCK + 1}: {[round(c, 5) for c in costs]}")
    assert len(costs) == BLOCK + 1 and all(c > 0 for c in costs)
    plan = g.plan([len(p) for p in _prompts()])
    g.set_confidence_schedule(plan.shape, costs)
    assert g.settings_for(plan).confidence_schedule == costs
    assert g.settings_for(dataclasses.replace(plan, batch=7)).confidence_schedule is None
    res = g.generate(_prompts())
    np.testing.assert_array_equal(res.tokens, ar.tokens)
    print(f"widths chosen: {res.width_hist()}")
    assert sum(res.width_hist()) == int((res.accepted >= 0).any(1).sum())
    with pytest.raises(ValueError, match="already compiled"):
        g.set_confidence_schedule(plan.shape, (1.0,) * (BLOCK + 1))


def test_confidence_schedule_needs_a_confidence_head(target):
    from hdflash_jax.decode.drafters import MTPDrafter

    s = DecodeSettings(max_new_tokens=4, confidence_schedule=(1.0,) * (BLOCK + 1))
    drafter = init_dspark_from_target(target, _dcfg(confidence_head=False), seed=3)
    with pytest.raises(ValueError, match="confidence_schedule: this drafter has no confidence head"):
        Generator(target, DSparkDrafterAdapter(drafter.dcfg, BLOCK), drafter, settings=s)
    with pytest.raises(ValueError, match="confidence_schedule: this drafter has no confidence head"):
        Generator(target, MTPDrafter(BLOCK), settings=s)
    drafter = init_dspark_from_target(target, _dcfg(), seed=3)
    with pytest.raises(ValueError, match=r"one cost > 0 per verify width 1..5, got \[1.0, 1.0\]"):
        Generator(target, DSparkDrafterAdapter(drafter.dcfg, BLOCK), drafter,
                  settings=DecodeSettings(max_new_tokens=4, confidence_schedule=(1.0, 1.0)))


def test_affine_costs_denoise_measured_step_costs():
    """The schedule reads the least-squares line through the measured costs (a step's work is linear in the width):
    a line comes back as it is, noise around a rising line is smoothed to a rising line (so tokens per cost is
    unimodal and the first local maximum is the global one), a falling fit is clipped flat."""
    from hdflash_jax.decode.verify_costs import affine_costs

    np.testing.assert_allclose(affine_costs([2.0, 3.0, 4.0, 5.0]), [2.0, 3.0, 4.0, 5.0])
    noisy = affine_costs([20.98, 19.66, 19.86, 23.13, 21.27, 22.03, 23.96, 23.42])  # measured, ms (small model)
    assert all(b > a for a, b in zip(noisy, noisy[1:]))
    np.testing.assert_allclose(np.mean(noisy), np.mean([20.98, 19.66, 19.86, 23.13, 21.27, 22.03, 23.96, 23.42]))
    assert affine_costs([3.0, 2.0, 1.0]) == (2.0, 2.0, 2.0)
