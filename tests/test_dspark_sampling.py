"""Sampled DSpark drafts are lossless: the Markov-corrected proposal of each slot is what the rejection sampler
gets, so speculative samples follow the target's distribution (two-sample chi-square per prompt and position
against AR), and a rule that treats the drafts as point masses is rejected (the negative control)."""

import pytest

from hdflash_jax.decode.dspark_drafter import DSparkDrafterAdapter
from hdflash_jax.dspark.config import DSparkConfig
from hdflash_jax.dspark.model import init_dspark_from_target
from test_sampling import K, SAMPLING, _sampled_drafter_check, ar_samples_2x, sampling_target  # noqa: F401


@pytest.mark.slow
def test_dspark_sampled_drafts_lossless(sampling_target, ar_samples_2x, monkeypatch):  # noqa: F811
    import jax.numpy as jnp

    v = SAMPLING.vocab_size
    dcfg = DSparkConfig(block_size=K, noise_token_id=v - 1, target_layer_ids=(1, 2), markov_rank=v,
                        n_routed_experts=4, n_activated_experts=2)
    modules = init_dspark_from_target(sampling_target, dcfg, seed=5)
    # a Markov head that leans on the previous token: proposals far from uniform, drafts often accepted
    modules.markov_head.markov_w1.weight[...] = jnp.eye(v, dtype=jnp.float32)
    modules.markov_head.markov_w2.weight[...] = 3.0 * jnp.eye(v, dtype=jnp.float32)
    drafter = DSparkDrafterAdapter(dcfg, K, sampled=True, temperature=0.7, top_p=0.8)  # the run's nucleus
    _sampled_drafter_check(sampling_target, ar_samples_2x, drafter, modules, monkeypatch, "DSpark")
