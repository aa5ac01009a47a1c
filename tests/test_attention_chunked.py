"""Chunked attention (query chunks, online softmax with sinks) against the dense reference, in fp32.

Chunks of 5 queries against a window of 8, CSA (m=4, top-4) and HCA (m=8) windows and a cache of 64 slots (8 HCA
entries, scanned in blocks of 5): windows, compressor windows and top-k sets straddle chunk boundaries, and the
cache path is checked after a rollback with a block of new tokens, not only on prefill.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from hdflash_jax.config import get_preset
from hdflash_jax.deepseek_v4.cache import init_cache, set_committed_length
from hdflash_jax.deepseek_v4.model import init_target

BASE = get_preset("tiny").replace(n_layers=3, n_hash_layers=1, n_mtp_layers=0, compress_ratios=(4, 8, 0))
MAX_LEN, MAX_BLOCK = 64, 8


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def extends():
    """One jitted cache extension per implementation, same weights (the switch does not change parameters)."""
    out = {}
    for impl in ("dense", "chunked"):
        cfg = BASE.replace(attention_impl=impl, attention_chunk=5)
        graph, state = nnx.split(init_target(cfg, seed=21))

        def extend(state, tokens, cache, n_new, graph=graph):
            o = nnx.merge(graph, state)(tokens, cache, n_new)
            return o.logits, o.cache

        out[impl] = (cfg, state, jax.jit(extend))
    return out


def test_config_switch_is_validated():
    with pytest.raises(ValueError, match="attention_impl"):
        BASE.replace(attention_impl="flash")
    with pytest.raises(ValueError, match="attention_chunk"):
        BASE.replace(attention_chunk=0)


def test_prefill_chunked_equals_dense(extends):
    """Rows of 48 and 37 real tokens (48 = 9 chunks of 5 + a padded one)."""
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, BASE.vocab_size, (2, 48)))
    n_new = jnp.asarray([48, 37], jnp.int32)
    logits = {}
    for impl, (cfg, state, extend) in extends.items():
        logits[impl], _ = extend(state, tokens, init_cache(cfg, 2, MAX_LEN, MAX_BLOCK), n_new)
    assert _rel(logits["chunked"][0], logits["dense"][0]) <= 1e-5
    assert _rel(logits["chunked"][1, :37], logits["dense"][1, :37]) <= 1e-5
    cfg, state, _ = extends["chunked"]
    graph = nnx.graphdef(init_target(cfg, seed=21))
    last = jax.jit(lambda s, t, c, n: nnx.merge(graph, s)(t, c, n, last_logits=True).logits)(
        state, tokens, init_cache(cfg, 2, MAX_LEN, MAX_BLOCK), n_new)
    assert last.shape == (2, 1, cfg.vocab_size)  # each row's last real token: 47 and 36
    assert _rel(last[0, 0], logits["chunked"][0, 47]) <= 1e-6 and _rel(last[1, 0], logits["chunked"][1, 36]) <= 1e-6


def test_cache_path_after_rollback_chunked_equals_dense(extends):
    """Prefill rows to 21 and 26, verify a block of 8, keep 3 (rollback), then a block of 7 new tokens in one call
    (crossing CSA/HCA window closes at 24, 28, 32) and two one-token steps: every call's logits and the caches."""
    rng = np.random.RandomState(1)
    starts = np.array([21, 26])
    tokens = rng.randint(0, BASE.vocab_size, (2, 48))
    prompt = np.zeros((2, 26), np.int64)
    for r, s in enumerate(starts):
        prompt[r, :s] = tokens[r, :s]
    drafts = rng.randint(0, BASE.vocab_size, (2, 8))
    follow = tokens[np.arange(2)[:, None], starts[:, None] + 3 + np.arange(9)]
    got = {}
    for impl, (cfg, state, extend) in extends.items():
        cache = init_cache(cfg, 2, MAX_LEN, MAX_BLOCK)
        calls = []
        logits, cache = extend(state, jnp.asarray(prompt), cache, jnp.asarray(starts, jnp.int32))
        calls.append(logits)
        logits, cache = extend(state, jnp.asarray(drafts), cache, jnp.full((2,), 8, jnp.int32))
        calls.append(logits)
        cache = set_committed_length(cache, jnp.asarray(starts + 3, jnp.int32))
        logits, cache = extend(state, jnp.asarray(follow[:, :7]), cache, jnp.full((2,), 7, jnp.int32))
        calls.append(logits)
        for j in (7, 8):
            logits, cache = extend(state, jnp.asarray(follow[:, j:j + 1]), cache, jnp.ones((2,), jnp.int32))
            calls.append(logits)
        got[impl] = (calls, cache)
    for k, (a, b) in enumerate(zip(got["chunked"][0], got["dense"][0])):
        if k == 0:  # row 0's prompt is 21 real tokens of 26
            assert _rel(a[0, :21], b[0, :21]) <= 1e-5 and _rel(a[1], b[1]) <= 1e-5, k
        else:
            assert _rel(a, b) <= 1e-5, k
    for x, y in zip(jax.tree.leaves(got["chunked"][1]), jax.tree.leaves(got["dense"][1])):
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype.kind == "f":
            assert np.abs(x - y).max() <= 1e-5 * max(1.0, np.abs(y).max())
        else:
            assert (x == y).all()


def test_chunk_groups_on_a_mesh_equal_dense(extends):
    """On a mesh with an expert axis, chunk groups run side by side over it (sequence sharding): same logits."""
    from hdflash_jax.sharding import batch_sharding, make_mesh, shard_state

    tokens = jnp.asarray(np.random.RandomState(3).randint(0, BASE.vocab_size, (2, 48)))
    block = jnp.asarray(np.random.RandomState(4).randint(0, BASE.vocab_size, (2, 7)))
    n_new = jnp.asarray([48, 37], jnp.int32)
    cfg, state, extend = extends["dense"]
    ref, cache = extend(state, tokens, init_cache(cfg, 2, MAX_LEN, MAX_BLOCK), n_new)
    ref_block, _ = extend(state, block, cache, jnp.full((2,), 7, jnp.int32))
    cfg, state, extend = extends["chunked"]
    mesh = make_mesh({"data": 2, "expert": 2, "tensor": 2})
    with jax.set_mesh(mesh):
        sharded = shard_state(state, mesh)
        got, cache = extend(sharded, jax.device_put(tokens, batch_sharding(mesh, 2)),
                            init_cache(cfg, 2, MAX_LEN, MAX_BLOCK), n_new)
        got_block, _ = extend(sharded, jax.device_put(block, batch_sharding(mesh, 2)), cache,
                              jnp.full((2,), 7, jnp.int32))
    assert _rel(got[0], ref[0]) <= 1e-5 and _rel(got[1, :37], ref[1, :37]) <= 1e-5
    assert _rel(got_block, ref_block) <= 1e-5
