"""Expert-parallel MoE (shard_map over the expert / tensor / data axes, per-expert slot buffers) against the dense
dispatch, on 8 simulated devices; capacity drops counted and equal to an independent count."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from hdflash_jax.config import get_preset
from hdflash_jax.deepseek_v4.layers import KeyGen
from hdflash_jax.deepseek_v4.model import forward_full, init_target
from hdflash_jax.deepseek_v4.moe import MoE, _dense_experts
from hdflash_jax.sharding import batch_sharding, make_mesh, shard_state

CFG = get_preset("tiny").replace(n_layers=2, n_hash_layers=1, n_mtp_layers=0, compress_ratios=(4, 0))


def _moe(cfg, hashed, seed=0):
    with nnx.use_eager_sharding(False):
        moe = MoE(cfg, hashed, rngs=KeyGen(seed))
    if hashed:  # rows with a repeated expert: the dense combine sums them, EP must too
        table = np.random.RandomState(seed).randint(0, cfg.n_routed_experts, (cfg.vocab_size, cfg.n_activated_experts))
        table[:7, 1] = table[:7, 0]
        moe.gate.tid2eid[...] = jnp.asarray(table, jnp.int32)
    return moe


def _run(moe, x, ids, mesh=None):
    graph, state = nnx.split(moe)
    fn = jax.jit(lambda s, x, i: nnx.merge(graph, s).with_drops(x, i))
    if mesh is None:
        return fn(state, x, ids)
    with jax.set_mesh(mesh):
        return fn(shard_state(state, mesh), jax.device_put(x, batch_sharding(mesh, 3)),
                  jax.device_put(ids, batch_sharding(mesh, 2)))


@pytest.mark.parametrize("hashed", [False, True])
@pytest.mark.parametrize("shape", [{"expert": 8}, {"data": 2, "expert": 2, "tensor": 2}])
def test_expert_parallel_equals_dense(shape, hashed):
    assert len(jax.devices()) == 8
    rng = np.random.RandomState(1)
    x = jnp.asarray(rng.randn(4, 12, CFG.dim).astype(np.float32))
    ids = jnp.asarray(rng.randint(0, 16, (4, 12)))  # small ids: the repeated-expert rows of the hash table occur
    ref, _ = _run(_moe(CFG.replace(moe_dispatch="dense"), hashed), x, ids)
    out, dropped = _run(_moe(CFG.replace(moe_dispatch="expert_parallel"), hashed), x, ids, make_mesh(shape))
    assert int(dropped) == 0
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=1e-5 * float(np.abs(ref).max()))


def test_capacity_drops_are_counted_and_exact():
    """Capacity 0.5 on 2 data shards: per shard and expert the first `slots` assignments (token order) run, the
    rest are dropped and counted; the output equals the dense dispatch with exactly those weights zeroed."""
    cfg = CFG.replace(moe_dispatch="expert_parallel", moe_capacity=0.5)
    rng = np.random.RandomState(2)
    x = jnp.asarray(rng.randn(4, 12, cfg.dim).astype(np.float32))
    ids = jnp.asarray(rng.randint(0, cfg.vocab_size, (4, 12)))
    moe = _moe(cfg, hashed=False, seed=3)
    out, dropped = _run(moe, x, ids, make_mesh({"data": 2, "expert": 4}))
    flat = x.reshape(-1, cfg.dim)
    idx, w = moe.gate(flat, ids.reshape(-1), cfg)
    idx, w = np.asarray(idx), np.array(w)
    per_shard = flat.shape[0] // 2
    slots = int(np.ceil(0.5 * per_shard * cfg.n_activated_experts / cfg.n_routed_experts))
    expected = 0
    for shard in range(2):
        used = np.zeros(cfg.n_routed_experts, int)
        for n in range(shard * per_shard, (shard + 1) * per_shard):
            for j in range(cfg.n_activated_experts):
                e = idx[n, j]
                if used[e] >= slots:
                    w[n, j] = 0.0
                    expected += 1
                used[e] += 1
    assert expected > 0 and int(dropped) == expected
    ref = _dense_experts(flat, jnp.asarray(idx), jnp.asarray(w), moe.experts, cfg)
    ref = ref.reshape(x.shape) + moe.shared_experts(x, cfg.swiglu_limit)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=1e-5 * float(np.abs(ref).max()))


def test_model_expert_parallel_on_mesh_equals_dense_single_device():
    """The whole target: moe_dispatch from the config (load_params builds from it), sharded on 8 devices."""
    tokens = jnp.asarray(np.random.RandomState(4).randint(0, CFG.vocab_size, (2, 20)))
    dense = init_target(CFG.replace(moe_dispatch="dense"), seed=9)
    ep = init_target(CFG.replace(moe_dispatch="expert_parallel"), seed=9)
    assert ep.layers[1].ffn.dispatch == "expert_parallel" and dense.layers[1].ffn.dispatch == "dense"
    graph, state = nnx.split(dense)
    ref = jax.jit(lambda s, t: forward_full(nnx.merge(graph, s), t).logits)(state, tokens)
    mesh = make_mesh({"data": 2, "expert": 2, "tensor": 2})
    graph, state = nnx.split(ep)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda s, t: forward_full(nnx.merge(graph, s), t))(
            shard_state(state, mesh), jax.device_put(tokens, batch_sharding(mesh, 2)))
    assert int(out.moe_dropped) == 0
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref), rtol=0, atol=1e-5 * float(np.abs(ref).max()))


def test_moe_dispatch_round_trips_through_a_checkpoint(tmp_path):
    """config.json carries moe_dispatch / moe_capacity; load_params builds the MoE that the file names."""
    from hdflash_jax.checkpoint import load_params, save_params

    cfg = CFG.replace(moe_dispatch="expert_parallel", moe_capacity=1.25)
    model = init_target(cfg, seed=1)
    save_params(tmp_path / "ckpt", nnx.state(model), cfg)
    loaded_cfg, loaded = load_params(tmp_path / "ckpt")
    assert loaded_cfg == cfg
    assert {layer.ffn.dispatch for layer in loaded.layers} == {"expert_parallel"}
    with pytest.raises(ValueError, match="moe_dispatch"):
        cfg.replace(moe_dispatch="sorted")
    with pytest.raises(ValueError, match="moe_capacity"):
        cfg.replace(moe_capacity=-1.0)


def test_long_inputs_run_in_token_chunks(monkeypatch):
    """More tokens than one slot-buffer pass (chunks of 10 over 48 tokens, the last one padded): still exact."""
    from hdflash_jax.deepseek_v4 import moe as moe_module

    monkeypatch.setattr(moe_module, "TOKEN_CHUNK", 10)
    rng = np.random.RandomState(5)
    x = jnp.asarray(rng.randn(2, 24, CFG.dim).astype(np.float32))
    ids = jnp.asarray(rng.randint(0, 16, (2, 24)))
    ref, _ = _run(_moe(CFG.replace(moe_dispatch="dense"), True), x, ids)
    mesh = make_mesh({"expert": 4, "tensor": 2})
    out, dropped = _run(_moe(CFG.replace(moe_dispatch="expert_parallel"), True), x, ids, mesh)
    assert int(dropped) == 0
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=1e-5 * float(np.abs(ref).max()))


@pytest.fixture
def overflow_always(monkeypatch):
    """Small inputs normally get a slot per token (no overflow possible); these tests need the capacity pass."""
    from hdflash_jax.deepseek_v4 import moe as moe_module

    monkeypatch.setattr(moe_module, "WHOLE_SLOTS_UP_TO", 0)


def _skewed(cfg, seed=6):
    """Every token routed to experts 0 and 1 (a score-correction bias only chooses; weights stay the scores'):
    each of them receives every token, far past the main pass's ceil(1.25 · N · k / E) slots."""
    moe = _moe(cfg, hashed=False, seed=seed)
    bias = np.zeros(cfg.n_routed_experts, np.float32)
    bias[:2] = 100.0
    moe.gate.bias[...] = jnp.asarray(bias)
    return moe


@pytest.mark.parametrize("shape", [None, {"expert": 8}, {"data": 2, "expert": 2, "tensor": 2}])
def test_exact_default_runs_the_overflow_and_equals_dense(shape, overflow_always):
    """No capacity (the default): the assignments past the main pass run in overflow blocks, nothing dropped,
    equal to the dense dispatch; the same routing with a capacity drops (so the overflow path really ran)."""
    from hdflash_jax.deepseek_v4.moe import _slots

    rng = np.random.RandomState(7)
    x = jnp.asarray(rng.randn(4, 12, CFG.dim).astype(np.float32))
    ids = jnp.asarray(rng.randint(0, CFG.vocab_size, (4, 12)))
    ep_cfg = CFG.replace(moe_dispatch="expert_parallel")
    assert _slots(ep_cfg, 48) * 3 < 48  # an expert with every token needs 3 overflow blocks
    mesh = None if shape is None else make_mesh(shape)
    ref, _ = _run(_skewed(CFG.replace(moe_dispatch="dense")), x, ids)
    out, dropped = _run(_skewed(ep_cfg), x, ids, mesh)
    assert int(dropped) == 0
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=1e-5 * float(np.abs(ref).max()))
    capped, capped_dropped = _run(_skewed(ep_cfg.replace(moe_capacity=1.25)), x, ids, mesh)
    assert int(capped_dropped) > 0
    assert float(np.abs(np.asarray(capped) - np.asarray(ref)).max()) > 1e-2 * float(np.abs(ref).max())


def test_overflow_with_token_chunks_over_the_sequence_axis(monkeypatch, overflow_always):
    """Skewed routing, chunks of 16 gathered tokens (2 per expert-axis device) over 48 tokens, several overflow
    passes per chunk (one block per pass): still equal to dense."""
    from hdflash_jax.deepseek_v4 import moe as moe_module

    monkeypatch.setattr(moe_module, "TOKEN_CHUNK", 16)
    monkeypatch.setattr(moe_module, "OVERFLOW_GROUP", 1)
    rng = np.random.RandomState(8)
    x = jnp.asarray(rng.randn(2, 24, CFG.dim).astype(np.float32))
    ids = jnp.asarray(rng.randint(0, CFG.vocab_size, (2, 24)))
    ref, _ = _run(_skewed(CFG.replace(moe_dispatch="dense")), x, ids)
    out, dropped = _run(_skewed(CFG.replace(moe_dispatch="expert_parallel")), x, ids, make_mesh({"expert": 8}))
    assert int(dropped) == 0
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=1e-5 * float(np.abs(ref).max()))


def test_tokens_that_do_not_split_over_the_expert_axis():
    """3 tokens on expert=8 (a one-token decode step is the same case): tokens stay whole on every device, the
    partial outputs are summed over the expert axis; skewed routing, still equal to dense."""
    rng = np.random.RandomState(9)
    x = jnp.asarray(rng.randn(1, 3, CFG.dim).astype(np.float32))
    ids = jnp.asarray(rng.randint(0, CFG.vocab_size, (1, 3)))
    ref, _ = _run(_skewed(CFG.replace(moe_dispatch="dense")), x, ids)
    out, dropped = _run(_skewed(CFG.replace(moe_dispatch="expert_parallel")), x, ids, make_mesh({"expert": 8}))
    assert int(dropped) == 0
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0, atol=1e-5 * float(np.abs(ref).max()))


def test_small_calls_get_a_slot_per_token():
    from hdflash_jax.deepseek_v4.moe import WHOLE_SLOTS_UP_TO, _slots

    cfg = CFG.replace(moe_dispatch="expert_parallel")
    assert _slots(cfg, 16) == 16 and _slots(cfg, WHOLE_SLOTS_UP_TO) == WHOLE_SLOTS_UP_TO
    assert _slots(cfg, 2048) == 640 and _slots(cfg.replace(moe_capacity=1.0), 16) == 4
