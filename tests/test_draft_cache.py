"""The draft cache layouts ('cond' default, 'kv', 'cond_fp8') and the chunked attention over the live context.

Asserted: the chunked draft step equals the dense per-layer-K/V reference (≤ 1e-5, fp32) for every exact layout,
with row lengths straddling chunk boundaries, a cache size that is no multiple of the chunk, and after a rollback;
slots past the live length are never read; bytes per token at V4-Flash width; on a data × expert × tensor mesh
the cache is split over rows and features, comes back with its input sharding and gives the unsharded result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hdflash_jax.config import get_drafter_preset
from hdflash_jax.deepseek_v4.cache import set_committed_length
from hdflash_jax.drafter.cache import draft_cache_bytes_per_token, draft_cache_shardings
from hdflash_jax.drafter.model import (
    draft_block, draft_block_dense, extend_draft_cache, init_draft_cache, init_drafter,
)

MAX_LEN, CHUNK, T = 22, 4, 7  # 22 = 5 chunks of 4 + 2: the last chunk overlaps its neighbour
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def setup():
    cfg = get_drafter_preset("tiny-hyperdflash", draft_chunk=CHUNK)  # fp32, dim 64, 2 layers, B = 4
    d = init_drafter(cfg, seed=1)
    k = jax.random.split(jax.random.key(0), 4)
    io = (jax.random.normal(k[0], (cfg.vocab_size, cfg.dim)), jax.random.normal(k[1], (cfg.vocab_size, cfg.dim)) * .1)
    feats = jax.random.normal(k[2], (3, 3 * T, cfg.hc_mult, cfg.dim))
    anchors = jax.random.randint(k[3], (3,), 0, cfg.vocab_size - 1)
    return cfg, d, io, feats, anchors


_extend = nnx.jit(extend_draft_cache)
_block = nnx.jit(draft_block)
_dense = nnx.jit(draft_block_dense)


def _filled(cfg, d, feats, steps, kind):
    """A cache of layout `kind` after appending per-row counts `steps` (list of [3] arrays), T features a call."""
    cache = init_draft_cache(cfg.replace(draft_cache=kind), 3, MAX_LEN)
    for i, n in enumerate(steps):
        cache = _extend(d, feats[:, i * T:(i + 1) * T], jnp.asarray(n), cache)
    return cache


@pytest.mark.parametrize("kind", ["cond", "kv"])
def test_chunked_equals_dense_reference(setup, kind):
    cfg, d, io, feats, anchors = setup
    steps = [[3, 4, 7], [1, 4, 6], [5, 0, 7]]  # lengths 3 → 4 → 8 (row 0), 4 → 8 → 8 (row 1), 7 → 13 → 20 (row 2)
    ref_cache = _filled(cfg, d, feats, steps[:1], "kv")
    cache = _filled(cfg, d, feats, steps[:1], kind)
    for i, n in enumerate(steps):
        if i:
            ref_cache = _extend(d, feats[:, i * T:(i + 1) * T], jnp.asarray(n), ref_cache)
            cache = _extend(d, feats[:, i * T:(i + 1) * T], jnp.asarray(n), cache)
        np.testing.assert_array_equal(cache["length"], ref_cache["length"])
        toks, logits = _block(d, io, anchors, cache)
        rtoks, rlogits = _dense(d, io, anchors, ref_cache)
        np.testing.assert_allclose(logits, rlogits, **TOL)
        np.testing.assert_array_equal(toks, rtoks)
    # a rollback into the middle of a chunk, then a rewrite of the rejected positions
    back = jnp.array([6, 5, 9])
    cache, ref_cache = set_committed_length(cache, back), set_committed_length(ref_cache, back)
    np.testing.assert_allclose(_block(d, io, anchors, cache)[1], _dense(d, io, anchors, ref_cache)[1], **TOL)
    n = jnp.array([7, 2, 7])
    cache = _extend(d, feats[:, 2 * T:] * 1.5, n, cache)
    ref_cache = _extend(d, feats[:, 2 * T:] * 1.5, n, ref_cache)
    np.testing.assert_allclose(_block(d, io, anchors, cache)[1], _dense(d, io, anchors, ref_cache)[1], **TOL)
    # a full cache (every slot live; a write past max_len is dropped) and an empty one
    full = _extend(d, feats[:, :T], jnp.array([7, 7, 7]), _filled(cfg, d, feats, steps, kind))
    ref_full = _extend(d, feats[:, :T], jnp.array([7, 7, 7]), _filled(cfg, d, feats, steps, "kv"))
    assert int(full["length"].max()) > MAX_LEN
    np.testing.assert_allclose(_block(d, io, anchors, full)[1], _dense(d, io, anchors, ref_full)[1], **TOL)
    full = set_committed_length(full, jnp.array([MAX_LEN, 21, 17]))
    ref_full = set_committed_length(ref_full, jnp.array([MAX_LEN, 21, 17]))
    np.testing.assert_allclose(_block(d, io, anchors, full)[1], _dense(d, io, anchors, ref_full)[1], **TOL)
    empty, ref_empty = _filled(cfg, d, feats, [], kind), _filled(cfg, d, feats, [], "kv")
    np.testing.assert_allclose(_block(d, io, anchors, empty)[1], _dense(d, io, anchors, ref_empty)[1], **TOL)


def test_slots_past_the_live_length_are_never_read(setup):
    """NaN in every chunk past the longest row: the chunked step stays finite and unchanged (the dense reference,
    which reads all max_len slots, turns NaN)."""
    cfg, d, io, feats, anchors = setup
    cache = _filled(cfg, d, feats, [[3, 5, 8]], "kv")  # longest row 8 = 2 chunks
    ref = _block(d, io, anchors, cache)[1]
    poison = jax.tree.map(lambda x: x.at[:, 2 * CHUNK:].set(jnp.nan), cache["layers"])
    bad = {**cache, "layers": poison}
    np.testing.assert_array_equal(_block(d, io, anchors, bad)[1], ref)
    assert np.isnan(np.asarray(_dense(d, io, anchors, bad)[1])).any()
    cond = _filled(cfg, d, feats, [[3, 5, 8]], "cond")
    cond = {**cond, "cond": cond["cond"].at[:, 2 * CHUNK:].set(jnp.nan)}
    np.testing.assert_allclose(_block(d, io, anchors, cond)[1], ref, **TOL)


def test_fp8_store_is_close_and_smaller(setup):
    """'cond_fp8' is lossy: e4m3 keeps 3 mantissa bits (relative error ≤ 2^-4 per element), so the logits move
    by a few percent of their spread, not more."""
    cfg, d, io, feats, anchors = setup
    steps = [[7, 7, 7], [6, 3, 7]]
    exact = _block(d, io, anchors, _filled(cfg, d, feats, steps, "cond"))[1]
    fp8_cache = _filled(cfg, d, feats, steps, "cond_fp8")
    assert fp8_cache["cond"].dtype == jnp.float8_e4m3fn and fp8_cache["scale"].shape == (3, MAX_LEN)
    lossy = _block(d, io, anchors, fp8_cache)[1]
    err = float(jnp.abs(lossy - exact).max())
    assert 0 < err < 0.1 * float(exact.std())


def test_bytes_per_token_at_v4_flash_width():
    from hdflash_jax.aot_plan.draft import target_cache_bytes_per_token
    from hdflash_jax.config import get_preset

    target = target_cache_bytes_per_token(get_preset("v4-flash"))
    assert target == 6880  # the target cache's growth per token per row (rings and buffers cancel)
    for name in ("v4-flash-hyperdflash", "v4-flash-dflash"):
        cfg = get_drafter_preset(name)  # 5 layers, K and V of 8 heads × 128: exact, 3x the target's per token
        assert cfg.draft_cache == "kv" and draft_cache_bytes_per_token(cfg) == 5 * 2 * 8 * 128 * 2 == 20480 > target
        assert draft_cache_bytes_per_token(cfg.replace(n_kv_heads=2)) == 5120 <= target  # the cut the study undid
        assert draft_cache_bytes_per_token(cfg.replace(draft_cache="cond")) == 4096 * 2 == 8192
        assert draft_cache_bytes_per_token(cfg.replace(draft_cache="cond_fp8")) == 4096 + 4


@pytest.mark.parametrize("kind", ["cond", "kv"])
def test_sharded_cache_matches_unsharded(setup, kind):
    from jax.sharding import PartitionSpec as P

    from hdflash_jax.decode.drafters import BlockDrafterAdapter
    from hdflash_jax.sharding import make_mesh

    cfg, d, io, feats, anchors = setup
    cfg = cfg.replace(draft_cache=kind)
    mesh = make_mesh({"data": 2, "expert": 2, "tensor": 2}, devices=jax.devices()[:8])
    b = 4
    f = jnp.concatenate([feats, feats[:1] * 0.5])[:b, :T]
    a = jnp.concatenate([anchors, anchors[:1]])[:b]
    n = jnp.array([7, 3, 5, 6])
    graph, state = nnx.split(d)

    def step(state, f, n, a, cache):
        m = nnx.merge(graph, state)
        cache = extend_draft_cache(m, f, n, cache)
        return draft_block(m, io, a, cache)[1], cache

    cache = init_draft_cache(cfg, b, MAX_LEN - 2)  # 20 slots
    want, want_cache = jax.jit(step)(state, f, n, a, cache)
    sh = draft_cache_shardings(cache, mesh)
    rows = ("data", "expert")  # c over D, K/V over their (2) heads: both on tensor
    expected = {"cond": P(rows, None, "tensor")} if kind == "cond" else {"layers": [{"k": P(rows, None, "tensor", None),
                                                                                    "v": P(rows, None, "tensor", None)}] * 2}
    assert jax.tree.map(lambda s: s.spec, {k: v for k, v in sh.items() if k != "length"}) == expected
    with jax.set_mesh(mesh):
        placed = jax.device_put(cache, sh)
        got, got_cache = jax.jit(step, donate_argnums=(4,))(state, f, n, a, placed)
    same = lambda x, s: x.sharding.is_equivalent_to(s, x.ndim)  # noqa: E731 (a spec's trailing Nones may differ)
    assert all(jax.tree.leaves(jax.tree.map(same, got_cache, sh)))
    # the decoder's drafter state starts on the same sharding
    adapter = BlockDrafterAdapter(cfg, num_drafts=cfg.block_size - 1)
    with jax.set_mesh(mesh):
        fresh = jax.jit(lambda: adapter.init_state(None, None, b, MAX_LEN - 2))()["cache"]
    assert all(jax.tree.leaves(jax.tree.map(same, fresh, sh)))
    # and the Generator's loop state carries it in that layout (the adapter's own state_shardings, not the row rule)
    own = adapter.state_shardings(mesh, jax.eval_shape(lambda: adapter.init_state(None, None, b, MAX_LEN - 2)))
    assert jax.tree.map(lambda s: s.spec, own["cache"]) == jax.tree.map(lambda s: s.spec, sh)
    np.testing.assert_allclose(got, want, **TOL)
    for g, w in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
        np.testing.assert_allclose(g, w, **TOL)  # the sharded reducer sums in another order


def test_mesh_plan_draft_updates_the_cache_in_place(capsys):
    """The draft program of the AOT planner: the donated cache comes back aliased (alias bytes = its bytes on one
    device: rows over data × expert, features over tensor)."""
    from hdflash_jax.aot_plan import cli as mesh_plan

    r = mesh_plan.plan_programs(["--preset", "tiny", "--mesh", "data=2,expert=2,tensor=2", "--program", "draft",
                        "--drafter", "tiny-hyperdflash", "--batch", "8", "--context", "60"])[0]
    cfg = get_drafter_preset("tiny-hyperdflash")
    slots = 60 + cfg.block_size
    cache_bytes = (8 * slots * cfg.dim * 4) // 8 + (8 * 4) // 4  # cond over 8 ways, length over the 4 row ways
    assert r.alias_bytes == cache_bytes and r.argument_bytes > cache_bytes
    assert "256 bytes per token per row" in capsys.readouterr().out


def test_config_fields():
    from hdflash_jax.config import DrafterConfig

    for bad, match in [(dict(draft_cache="int4"), "draft_cache"), (dict(draft_chunk=0), "draft_chunk")]:
        with pytest.raises(ValueError, match=match):
            DrafterConfig(**bad)
    old = {k: v for k, v in DrafterConfig().to_dict().items() if k not in ("draft_cache", "draft_chunk")}
    assert DrafterConfig.from_dict(old).draft_cache == "cond"  # a drafter_config.json from before the field
