"""eval.entropy: the entropy of softmax(logits / T), and its alignment with the answer tokens it is taken for."""

import numpy as np
import pytest

from eval.entropy import answer_entropies, token_entropies
from hdflash_jax.config import get_preset

MICRO = get_preset("tiny").replace(n_layers=3, compress_ratios=(0, 4, 8, 0), n_hash_layers=1)


def test_token_entropies():
    v = 7
    np.testing.assert_allclose(token_entropies(np.zeros((2, v)), 1.0), np.log(v), rtol=1e-6)
    sharp = np.array([[30.0, 0.0, 0.0]])
    assert float(token_entropies(sharp, 1.0)[0]) < 1e-9
    logits = np.array([[2.0, 1.0, 0.0]])
    p = np.exp(logits[0]) / np.exp(logits[0]).sum()
    np.testing.assert_allclose(float(token_entropies(logits, 1.0)[0]), -(p * np.log(p)).sum(), rtol=1e-6)
    assert float(token_entropies(logits, 2.0)[0]) > float(token_entropies(logits, 1.0)[0])  # hotter: flatter


@pytest.fixture(scope="module")
def target():
    from hdflash_jax.deepseek_v4.model import init_target

    return init_target(MICRO, seed=1)


@pytest.mark.slow
def test_answer_entropies_are_those_of_the_positions_that_predict_the_answer(target):
    """Row r's j-th entropy = that of the target's last logits after prompt + answer[:j] (a call per prefix); the
    position one later (the off-by-one a slicing bug makes) differs."""
    import jax.numpy as jnp

    from hdflash_jax.deepseek_v4.cache import init_cache

    rng = np.random.RandomState(0)
    prompts = [rng.randint(2, MICRO.vocab_size, n).tolist() for n in (5, 9)]
    answers = [rng.randint(2, MICRO.vocab_size, n).tolist() for n in (4, 2)]
    got = answer_entropies(target, prompts, answers, 1.0)
    assert [len(g) for g in got] == [4, 2]
    for p, a, g in zip(prompts, answers, got):
        want = []
        for j in range(len(a) + 1):
            seq = p + a[:j]
            out = target(jnp.asarray([seq], jnp.int32), init_cache(MICRO, 1, 64, max_block=len(seq)))
            want.append(float(token_entropies(out.logits[:, -1], 1.0)[0]))
        np.testing.assert_allclose(g, want[:-1], rtol=1e-4, atol=1e-5)
        assert not np.allclose(g, want[1:], rtol=1e-4, atol=1e-5)
