"""Chunked prefill (hdflash_jax.decode.prefill) against one-shot prefill, in fp32.

Prompt chunks of 5 tokens against a window of 8, CSA (m=4) and HCA (m=8) compressor windows, the layers under
scan: windows and compressor groups straddle chunk boundaries; rows of 37, 22 and 30 tokens end in different
chunks (one mid-chunk, one on a boundary). Checked: each row's last-token logits, every cache array, and a
verify block of 4 tokens after the prefill.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from hdflash_jax.config import get_preset
from hdflash_jax.decode.prefill import chunk_valid, chunked_prefill
from hdflash_jax.deepseek_v4.cache import init_cache, set_committed_length
from hdflash_jax.deepseek_v4.model import init_target

CFG = get_preset("tiny").replace(n_layers=3, n_hash_layers=1, n_mtp_layers=0, compress_ratios=(0, 4, 8),
                                 attention_chunk=3)
MAX_LEN, MAX_BLOCK, CHUNK = 64, 4, 5
LENGTHS = (37, 22, 30)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.abs(b).max()
    return float(np.abs(a - b).max() / scale) if scale else float(np.abs(a).max())


@pytest.fixture(scope="module")
def runs():
    graph, state = nnx.split(init_target(CFG, seed=5))
    rng = np.random.RandomState(3)
    tokens = jnp.asarray(rng.randint(0, CFG.vocab_size, (3, max(LENGTHS))))
    lens = jnp.asarray(LENGTHS, jnp.int32)
    block = jnp.asarray(rng.randint(0, CFG.vocab_size, (3, MAX_BLOCK)))

    def one_shot(state, tokens, lens):
        out = nnx.merge(graph, state)(tokens, init_cache(CFG, 3, MAX_LEN, MAX_BLOCK), lens, last_logits=True)
        return out.logits[:, 0], set_committed_length(out.cache, lens)

    def chunked(state, tokens, lens):
        def count(carry, out, n, i, last):  # the hook sees every chunk's real tokens once
            return carry + n

        r = chunked_prefill(nnx.merge(graph, state), tokens, lens, init_cache(CFG, 3, MAX_LEN, MAX_BLOCK), CHUNK,
                            on_chunk=count, carry=jnp.zeros((3,), jnp.int32))
        return r.logits, r.cache, r.carry, r.moe_dropped

    def verify(state, cache):
        return nnx.merge(graph, state)(block, cache).logits

    ref_logits, ref_cache = jax.jit(one_shot)(state, tokens, lens)
    logits, cache, seen, dropped = jax.jit(chunked)(state, tokens, lens)
    verify = jax.jit(verify)
    return dict(ref=(ref_logits, ref_cache, verify(state, ref_cache)),
                chunked=(logits, cache, verify(state, cache)), seen=seen, dropped=dropped)


def test_chunk_valid_counts():
    lens = jnp.asarray(LENGTHS)
    per_chunk = np.stack([np.asarray(chunk_valid(lens, i, CHUNK)) for i in range(8)])
    assert per_chunk.sum(0).tolist() == list(LENGTHS)
    assert per_chunk[:, 1].tolist() == [5, 5, 5, 5, 2, 0, 0, 0]


def test_last_token_logits_equal_one_shot(runs):
    (ref, _, _), (got, _, _) = runs["ref"], runs["chunked"]
    assert _rel(got, ref) <= 1e-5
    assert runs["seen"].tolist() == list(LENGTHS)
    assert int(runs["dropped"]) == 0


def test_cache_equals_one_shot(runs):
    (_, ref, _), (_, got, _) = runs["ref"], runs["chunked"]
    assert got["length"].tolist() == list(LENGTHS)
    ref_leaves, ref_tree = jax.tree.flatten_with_path(ref)
    got_leaves, got_tree = jax.tree.flatten_with_path(got)
    assert ref_tree == got_tree
    for (path, r), (_, g) in zip(ref_leaves, got_leaves):
        if jnp.issubdtype(r.dtype, jnp.integer):
            assert np.array_equal(np.asarray(g), np.asarray(r)), jax.tree_util.keystr(path)
        else:
            assert _rel(g, r) <= 1e-5, jax.tree_util.keystr(path)


def test_verify_after_chunked_prefill_equals_one_shot(runs):
    assert _rel(runs["chunked"][2], runs["ref"][2]) <= 1e-5


def test_chunk_must_be_positive():
    model = init_target(CFG, seed=0)
    with pytest.raises(ValueError, match="chunk"):
        chunked_prefill(model, jnp.zeros((1, 4), jnp.int32), jnp.asarray([4]), init_cache(CFG, 1, 8, 1), 0)
