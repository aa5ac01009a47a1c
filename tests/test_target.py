"""The MHC target against transformers' DeepseekV4ForCausalLM, its caches, sharding, real sizes and config errors."""

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
from flax import nnx

from hdflash_jax.config import TargetConfig, get_preset
from hdflash_jax.deepseek_v4 import mhc
from hdflash_jax.deepseek_v4.cache import init_cache, set_committed_length
from hdflash_jax.deepseek_v4.model import abstract_target, forward_full, init_target
from hdflash_jax.deepseek_v4.scan import layer_caches, layer_plan
from tests.hf_reference import hf_logits, load_hf_into, make_hf_model

TINY = get_preset("tiny").replace(n_mtp_layers=0, compress_ratios=(0, 4, 8, 4, 8, 4))
CONFIGS = {
    "tiny": TINY,
    # hc_mult=2, CSA first, HCA ratio 16, SWA last, one hash layer, other head geometry
    "hc2": TINY.replace(hc_mult=2, n_layers=4, compress_ratios=(4, 16, 0, 4), n_hash_layers=1, n_heads=2,
                        head_dim=32, rope_head_dim=8, o_groups=2, o_lora_rank=8, q_lora_rank=24, window_size=6,
                        index_topk=3, n_routed_experts=6, n_activated_experts=3),
    # three hash layers, HCA first, wider window, softmax-free top-k over more entries
    "hash3": TINY.replace(n_layers=5, compress_ratios=(8, 0, 4, 8, 4), n_hash_layers=3, window_size=12,
                          index_topk=6, dim=48, moe_inter_dim=24),
}


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    cfg = CONFIGS[request.param]
    hf = make_hf_model(cfg, seed=3)
    model = init_target(cfg)
    load_hf_into(model, hf)
    return cfg, hf, model


def test_prefill_logits_match_transformers(pair):
    """Batch 2 with different lengths (row 1 right-padded): each row against transformers run on it alone."""
    cfg, hf, model = pair
    rng = np.random.RandomState(0)
    lengths = [48, 37]
    tokens = rng.randint(0, cfg.vocab_size, (2, 48))
    cache = init_cache(cfg, 2, 48, max_block=1)
    graph, state = nnx.split(model)
    logits = jax.jit(lambda s, t, c, n: nnx.merge(graph, s)(t, c, n).logits)(
        state, jnp.asarray(tokens), cache, jnp.asarray(lengths))
    for row, n in enumerate(lengths):
        ref = hf_logits(hf, tokens[row:row + 1, :n])[0]
        err = _rel(logits[row, :n], ref)
        assert err <= 1e-4, (row, err)


def _capture(hf, tokens):
    """Inputs and outputs of every transformers sub-module the per-layer checks need."""
    seen = {}

    def hook(name):
        def fn(module, args, kwargs, output):
            seen[name] = (args, kwargs, output)
        return fn

    handles = []
    for i, layer in enumerate(hf.model.layers):
        for sub in ("attn_hc", "ffn_hc", "self_attn", "mlp"):
            handles.append(getattr(layer, sub).register_forward_hook(hook(f"{i}.{sub}"), with_kwargs=True))
    handles.append(hf.model.hc_head.register_forward_hook(hook("hc_head"), with_kwargs=True))
    with torch.no_grad():
        hf(torch.as_tensor(tokens))
    for h in handles:
        h.remove()
    return seen


def test_per_layer_pieces_match_transformers(pair):
    """hc_pre / hc_post / hc_head, attention and MoE of every layer on transformers' own inputs."""
    cfg, hf, model = pair
    tokens = np.random.RandomState(1).randint(0, cfg.vocab_size, (1, 40))
    seen = _capture(hf, tokens)
    t = tokens.shape[1]
    positions = jnp.arange(t, dtype=jnp.int32)[None]
    start, n_new = jnp.zeros((1,), jnp.int32), jnp.full((1,), t, jnp.int32)
    layer_cache = layer_caches(init_cache(cfg, 1, t, max_block=1), layer_plan(cfg))  # canonical order
    assert len(layer_cache) == cfg.n_layers
    for i in range(cfg.n_layers):
        layer = model.block(i)  # every layer, scanned ones included
        for site, hc in (("attn_hc", layer.hc_attn), ("ffn_hc", layer.hc_ffn)):
            (streams,), _, (post_ref, comb_ref, x_ref) = seen[f"{i}.{site}"]
            x, post, comb = mhc.hc_pre(jnp.asarray(streams.numpy()), hc.fn[...], hc.base[...], hc.scale[...],
                                       n=cfg.hc_mult, norm_eps=cfg.norm_eps, hc_eps=cfg.hc_eps,
                                       sinkhorn_iters=cfg.hc_sinkhorn_iters)
            assert _rel(x, x_ref.numpy()) < 1e-5 and _rel(post, post_ref.numpy()) < 1e-5
            assert _rel(comb, comb_ref.numpy()) < 1e-5
            np.testing.assert_allclose(np.asarray(comb).sum(-2), 1.0, atol=1e-4)  # columns end normalised
        # hc_post: the next site's input is hc_post(block output, previous streams)
        (streams,), _, (post_ref, comb_ref, _) = seen[f"{i}.attn_hc"]
        attn_out = seen[f"{i}.self_attn"][2][0]
        after_attn = seen[f"{i}.ffn_hc"][0][0]
        mixed = mhc.hc_post(jnp.asarray(attn_out.numpy()), jnp.asarray(streams.numpy()),
                            jnp.asarray(post_ref.numpy()), jnp.asarray(comb_ref.numpy()))
        assert _rel(mixed, after_attn.numpy()) < 1e-5
        # attention on the same normed input
        attn_in = seen[f"{i}.self_attn"][1]["hidden_states"] if "hidden_states" in seen[f"{i}.self_attn"][1] \
            else seen[f"{i}.self_attn"][0][0]
        out, _ = layer.attn(jnp.asarray(attn_in.numpy()), positions, start, n_new, layer_cache[i])
        assert _rel(out, attn_out.numpy()) < 1e-5, f"attention layer {i}"
        # MoE on the same normed input and token ids
        mlp_args, mlp_kwargs, mlp_out = seen[f"{i}.mlp"]
        moe_out = layer.ffn(jnp.asarray(mlp_args[0].numpy()), jnp.asarray(tokens))
        assert _rel(moe_out, mlp_out.numpy()) < 1e-5, f"moe layer {i}"
    (streams,), _, y_ref = seen["hc_head"]
    y = model.collapse(jnp.asarray(streams.numpy()))
    assert _rel(y, y_ref.numpy()) < 1e-6


def _jit_logits(model, tokens):
    graph, state = nnx.split(model)
    return jax.jit(lambda s, t: forward_full(nnx.merge(graph, s), t).logits)(state, tokens)


def test_ragged_dispatch_equals_dense():
    cfg = TINY.replace(n_layers=2, compress_ratios=(4, 0), n_hash_layers=1)
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 24)))
    dense = _jit_logits(init_target(cfg, seed=5), tokens)
    ragged = _jit_logits(init_target(cfg, seed=5, moe_dispatch="ragged"), tokens)
    assert _rel(ragged, dense) < 1e-5


# ---- caches ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cached():
    """A tiny target (with MTP) and one jitted `extend` used for every cache shape."""
    cfg = get_preset("tiny")
    model = init_target(cfg, seed=11)
    graph, state = nnx.split(model)

    @jax.jit
    def extend(state, tokens, cache, n_new):
        out = nnx.merge(graph, state)(tokens, cache, n_new)
        return out.logits, out.cache

    return cfg, state, extend


def _fresh(cfg, extend, state, tokens, max_len, max_block, pad_to=48):
    """Logits of a fresh prefill of whole rows (the reference every cached path must reproduce).

    Rows are right-padded to one length so every reference shares one compiled shape.
    """
    b, n = tokens.shape
    padded = np.zeros((b, pad_to), np.int64)
    padded[:, :n] = tokens
    cache = init_cache(cfg, b, max_len, max_block)
    logits, _ = extend(state, jnp.asarray(padded), cache, jnp.full((b,), n, jnp.int32))
    return np.asarray(logits)[:, :n]


def test_cached_decoding_matches_full_recompute(cached):
    """Prefill, 8 one-token steps, then a 7-token block: every logit within 1e-4 of a full recompute."""
    cfg, state, extend = cached
    max_len, max_block = 64, 8
    rng = np.random.RandomState(3)
    tokens = rng.randint(0, cfg.vocab_size, (2, 37))
    ref = _fresh(cfg, extend, state, tokens, max_len, max_block)
    cache = init_cache(cfg, 2, max_len, max_block)
    got = []
    logits, cache = extend(state, jnp.asarray(tokens[:, :22]), cache, jnp.full((2,), 22, jnp.int32))
    got.append(np.asarray(logits))
    for p in range(22, 30):
        logits, cache = extend(state, jnp.asarray(tokens[:, p:p + 1]), cache, jnp.ones((2,), jnp.int32))
        got.append(np.asarray(logits))
    logits, cache = extend(state, jnp.asarray(tokens[:, 30:37]), cache, jnp.full((2,), 7, jnp.int32))
    got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), np.abs(got - ref).max()
    assert np.asarray(cache["length"]).tolist() == [37, 37]


@pytest.mark.parametrize("keep", range(9))
def test_rollback_is_exact(cached, keep):
    """Extend by B=8, keep k of them, continue 4 steps: equal to a fresh prefill of the committed tokens.

    Rows start at 21 and 26: the block crosses CSA (m=4) and HCA (m=8) window boundaries at 24/28/32, so the
    rollback point falls before, inside and after closed windows depending on k and the row.
    """
    cfg, state, extend = cached
    max_len, max_block = 64, 8
    rng = np.random.RandomState(100 + keep)
    starts = np.array([21, 26])
    tokens = rng.randint(0, cfg.vocab_size, (2, 48))
    drafts = rng.randint(0, cfg.vocab_size, (2, 8))  # rejected tokens: differ from what is committed later
    cache = init_cache(cfg, 2, max_len, max_block)
    pad = np.zeros((2, 26), np.int64)
    for r, s in enumerate(starts):
        pad[r, :s] = tokens[r, :s]
    _, cache = extend(state, jnp.asarray(pad), cache, jnp.asarray(starts, jnp.int32))
    block = np.where(np.arange(8)[None] < keep, tokens[np.arange(2)[:, None], starts[:, None] + np.arange(8)],
                     drafts)
    _, cache = extend(state, jnp.asarray(block), cache, jnp.full((2,), 8, jnp.int32))
    cache = set_committed_length(cache, jnp.asarray(starts + keep, jnp.int32))
    got = []
    for step in range(4):
        p = starts + keep + step
        logits, cache = extend(state, jnp.asarray(tokens[np.arange(2), p][:, None]), cache, jnp.ones((2,), jnp.int32))
        got.append(np.asarray(logits[:, 0]))
    for r, s in enumerate(starts):
        n = s + keep + 4
        ref = _fresh(cfg, extend, state, tokens[r:r + 1, :n], max_len, max_block)[0, n - 4:]
        err = np.abs(np.stack(got)[:, r] - ref).max()
        assert err <= 1e-5 * max(1.0, np.abs(ref).max()), (r, keep, err)


def test_mtp_block_runs_and_chains():
    """Position i: target streams at i + token i+1 → logits for i+2; chained on its own streams, cached."""
    cfg = get_preset("tiny").replace(n_layers=2, compress_ratios=(0, 4, 0), n_hash_layers=1)
    graph, state = nnx.split(init_target(cfg, seed=11))

    @jax.jit
    def run(state, tokens):
        model = nnx.merge(graph, state)
        out = forward_full(model, tokens)
        cache = init_cache(cfg, 2, 32, 8)
        logits, streams, cache = model.mtp_step(out.streams[:, :-1], tokens[:, 1:], cache)
        # chaining: its own last streams go back in as H for the next position, with its own draft token
        logits2, _, cache2 = model.mtp_step(streams[:, -1:], jnp.argmax(logits[:, -1:], -1), cache)
        # the same two positions computed without the cache: one call over the whole chained sequence
        seq_streams = jnp.concatenate([out.streams[:, :-1], streams[:, -1:]], axis=1)
        seq_tokens = jnp.concatenate([tokens[:, 1:], jnp.argmax(logits[:, -1:], -1)], axis=1)
        full, _, _ = model.mtp_step(seq_streams, seq_tokens, init_cache(cfg, 2, 32, 8))
        return logits, logits2, full, cache["mtp"]["length"], cache2["mtp"]["length"]

    tokens = jnp.asarray(np.random.RandomState(4).randint(0, cfg.vocab_size, (2, 12)))
    logits, logits2, full, len1, len2 = run(state, tokens)
    assert logits.shape == (2, 11, cfg.vocab_size) and bool(jnp.isfinite(logits).all())
    assert np.asarray(len1).tolist() == [11, 11] and np.asarray(len2).tolist() == [12, 12]
    np.testing.assert_allclose(np.asarray(full[:, :11]), np.asarray(logits), atol=1e-5)
    np.testing.assert_allclose(np.asarray(full[:, 11]), np.asarray(logits2[:, 0]), atol=1e-5)


# ---- sharding --------------------------------------------------------------------------------------------------

def test_sharded_forward_equals_single_device():
    from hdflash_jax.sharding import batch_sharding, make_mesh, shard_state

    assert len(jax.devices()) == 8
    cfg = TINY
    model = init_target(cfg, seed=7)
    graph, state = nnx.split(model)
    tokens = jnp.asarray(np.random.RandomState(5).randint(0, cfg.vocab_size, (4, 32)))
    fwd = jax.jit(lambda s, t: forward_full(nnx.merge(graph, s), t).logits)
    ref = np.asarray(fwd(state, tokens))
    mesh = make_mesh({"data": 2, "expert": 2, "tensor": 2})
    sharded = shard_state(state, mesh)
    w1 = sharded["layers"][1]["ffn"]["experts"]["w1"].get_value()
    assert w1.sharding.spec[0] == "expert" and w1.addressable_shards[0].data.shape[0] == cfg.n_routed_experts // 2
    head = sharded["head"]["weight"].get_value()
    assert head.sharding.spec[0] == "tensor" and head.addressable_shards[0].data.shape[0] == cfg.vocab_size // 2
    with jax.set_mesh(mesh):
        out = fwd(sharded, jax.device_put(tokens, batch_sharding(mesh, 2)))
    assert out.sharding.mesh.shape == mesh.shape
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5 * np.abs(ref).max())


# ---- real sizes --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected", [("v4-flash", 284_332_230_231), ("v4-pro", 1_572_997_179_491)])
def test_real_sizes_without_allocating(name, expected):
    """Counts as transformers counts parameters (without MTP; tid2eid and the router bias are buffers)."""
    cfg = get_preset(name)
    cfg = cfg.replace(n_mtp_layers=0, compress_ratios=cfg.compress_ratios[:cfg.n_layers])
    params = nnx.state(abstract_target(cfg), nnx.Param)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == expected


# ---- configs -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change,field", [
    (dict(compress_ratios=(0, 4, 8)), "compress_ratios"),
    (dict(rope_head_dim=128), "rope_head_dim"),
    (dict(score_func="relu"), "score_func"),
    (dict(hc_mult=0), "hc_mult"),
    (dict(o_groups=3), "o_groups"),
    (dict(n_activated_experts=9), "n_activated_experts"),
    (dict(compress_ratios=(0, 4, 8, 4, 8, 4, 4)), "compress_ratios"),
])
def test_bad_configs_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        get_preset("tiny").replace(**change)


def test_config_files_round_trip(tmp_path):
    import json

    cfg = get_preset("tiny")
    (tmp_path / "hf.json").write_text(json.dumps({"model_type": "deepseek_v4", **cfg.to_hf_dict()}))
    loaded = TargetConfig.from_json_file(tmp_path / "hf.json", dtype="float32", param_dtype="float32")
    assert loaded == cfg
    official = {k: v for k, v in cfg.to_dict().items() if k not in ("dtype", "param_dtype")}
    (tmp_path / "official.json").write_text(json.dumps(official))
    assert TargetConfig.from_json_file(tmp_path / "official.json", dtype="float32", param_dtype="float32") == cfg
    flash = {"vocab_size": 129280, "dim": 4096, "n_layers": 43, "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0]}
    assert TargetConfig.from_official_dict(flash) == get_preset("v4-flash")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json"):
        TargetConfig.from_json_file(tmp_path / "broken.json")
