"""Layers under scan: the plan, scanned == unrolled through prefill / verify / rollback, checkpoints, HLO size."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from hdflash_jax.checkpoint import abstract_leaves, load_params, save_params
from hdflash_jax.config import get_preset
from hdflash_jax.deepseek_v4.cache import init_cache, set_committed_length
from hdflash_jax.deepseek_v4.model import init_target
from hdflash_jax.deepseek_v4.scan import LayerPlan, find_repeats, layer_plan, layer_caches
from hdflash_jax.keymap import assemble_tree, tree_to_official

# one hash layer (unrolled prefix), two [CSA, HCA] units, an SWA tail layer, one MTP layer
CFG = get_preset("tiny").replace(n_layers=6, n_hash_layers=1, compress_ratios=(0, 4, 8, 4, 8, 0, 0))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def test_layer_plan():
    assert layer_plan(get_preset("v4-flash")) == LayerPlan(3, 2, 20)  # 3 unrolled, 20 × [CSA, HCA]
    assert layer_plan(CFG) == LayerPlan(1, 2, 2) and LayerPlan(1, 2, 2).tail_start == 5
    assert layer_plan(CFG.replace(scan_layers=False)) == LayerPlan(6, 0, 0)
    small = get_preset("small")  # (0, 4, 16, 4, 0): nothing repeats twice after the hash layer
    assert layer_plan(small) == LayerPlan(small.n_layers, 0, 0)
    assert find_repeats((0, 0, 4, 128, 4, 128, 4), 0) == LayerPlan(2, 2, 2)  # [4, 128] covers 4 > [0] twice
    assert find_repeats((4, 4, 4, 4), 0) == LayerPlan(0, 1, 4)  # the shortest unit on a tie
    plan = LayerPlan(1, 2, 2)
    assert [plan.locate(i) for i in range(6)] == [("layers", 0, None), ("scan", 0, 0), ("scan", 1, 0),
                                                  ("scan", 0, 1), ("scan", 1, 1), ("tail", 0, None)]


def test_scanned_parameters_stack_canonical_layers():
    scanned, unrolled = init_target(CFG, seed=2), init_target(CFG.replace(scan_layers=False), seed=2)
    w = scanned.scan[1].attn.wq_a.weight
    assert w.shape == (2,) + unrolled.layers[2].attn.wq_a.weight.shape
    assert w.get_metadata()["out_sharding"][0] == "layers"
    for i in range(CFG.n_layers):  # same seed, same weights: built in canonical order either way
        a, b = nnx.state(scanned.block(i)), nnx.state(unrolled.layers[i])
        for (pa, va), (pb, vb) in zip(nnx.to_flat_state(a), nnx.to_flat_state(b)):
            assert pa == pb and va.get_metadata().get("out_sharding") == vb.get_metadata().get("out_sharding")
            np.testing.assert_array_equal(np.asarray(va.get_value()), np.asarray(vb.get_value()))


def _steps(model, tokens, lengths, taps):
    """Prefill in two calls, verify a block, roll back to a partial acceptance, verify again: every output."""
    graph, state = nnx.split(model)
    fn = jax.jit(lambda s, t, c, n: nnx.merge(graph, s)(t, c, n, return_layers=taps))
    cache = init_cache(model.cfg, 2, 40, max_block=6)
    outs = []
    for k, n in enumerate(lengths):
        out = fn(state, tokens[:, 6 * k:6 * k + 6], cache, jnp.asarray(n))
        outs.append(out)
        cache = out.cache
        if k == 2:  # after the first verify: row 0 keeps 2 of its 6 tokens, row 1 keeps 4 of 5
            cache = set_committed_length(cache, cache["length"] - jnp.asarray([4, 1]))
    return outs


def test_scanned_equals_unrolled_prefill_verify_rollback():
    """Logits, final and tapped streams (prefix, both units and positions, tail), every layer's cache and the MTP
    input streams agree ≤ 1e-6 relative in fp32 between the scanned and the unrolled model."""
    taps = (0, 1, 2, 4, 5)
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, CFG.vocab_size, (2, 24)))
    lengths = [[6, 6], [6, 3], [6, 5], [6, 6]]
    scanned = _steps(init_target(CFG, seed=5), tokens, lengths, taps)
    unrolled = _steps(init_target(CFG.replace(scan_layers=False), seed=5), tokens, lengths, taps)
    plan = layer_plan(CFG)
    for step, (a, b) in enumerate(zip(scanned, unrolled)):
        assert _rel(a.logits, b.logits) <= 1e-6, step
        assert _rel(a.streams, b.streams) <= 1e-6, step
        assert len(a.layer_streams) == len(b.layer_streams) == len(taps)
        for i, x, y in zip(taps, a.layer_streams, b.layer_streams):
            assert _rel(x, y) <= 1e-6, (step, i)
        np.testing.assert_array_equal(np.asarray(a.cache["length"]), np.asarray(b.cache["length"]))
        mine, ref = layer_caches(a.cache, plan), b.cache["layers"]
        assert len(mine) == len(ref) == CFG.n_layers
        for i, (ca, cb) in enumerate(zip(mine, ref)):
            assert sorted(ca) == sorted(cb), i
            for key in ca:
                if np.issubdtype(np.asarray(cb[key]).dtype, np.integer):
                    np.testing.assert_array_equal(np.asarray(ca[key]), np.asarray(cb[key]), err_msg=f"{i}.{key}")
                else:
                    assert _rel(ca[key], cb[key]) <= 1e-6, (step, i, key)
    assert scanned[-1].cache["scan"][0]["comp"].shape[0] == plan.n_units  # caches really are stacked


def test_checkpoints_keep_the_unrolled_layout(tmp_path):
    """On disk the scanned model is per layer (the canonical names); it loads back scanned or unrolled."""
    model = init_target(CFG, seed=4)
    save_params(tmp_path / "m", model, CFG)
    cfg, back = load_params(tmp_path / "m")
    assert cfg.scan_layers and layer_plan(cfg).n_units == 2 and len(back.scan) == 2
    for (pa, va), (pb, vb) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(back))):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(va.get_value()), np.asarray(vb.get_value()))
    _, flat = load_params(tmp_path / "m", cfg_overrides={"scan_layers": False})
    assert len(flat.layers) == CFG.n_layers and len(flat.scan) == 0
    for i in range(CFG.n_layers):
        np.testing.assert_array_equal(np.asarray(flat.layers[i].ffn.experts.w2.get_value()),
                                      np.asarray(model.block(i).ffn.experts.w2.get_value()))
    # the official names of the canonical tree assemble into the scanned tree (converter / transformers loads)
    leaves = abstract_leaves(CFG)
    assert not any(k.startswith(("scan.", "tail.")) for k in leaves)
    canon = {p: np.asarray(v.get_value()) for p, v in
             ((".".join(map(str, p)), v) for p, v in nnx.to_flat_state(nnx.state(flat)))}
    official = {}
    for path, value in canon.items():
        names = tree_to_official(path, CFG.n_routed_experts)
        official.update(zip(names, value) if len(names) > 1 else [(names[0], value)])
    tree = assemble_tree(official, nnx.state(model))
    assert tree["scan.1.attn.wkv.weight"].shape[0] == 2
    for p, v in nnx.to_flat_state(nnx.state(model)):
        np.testing.assert_array_equal(tree[".".join(map(str, p))], np.asarray(v.get_value()))
    with pytest.raises(KeyError, match=r"layers\.3\.attn\.wkv\.weight"):
        assemble_tree({k: v for k, v in official.items() if k != "layers.3.attn.wkv.weight"}, nnx.state(model))


def test_hlo_size_flat_in_depth():
    """The lowered prefill of 2 and of 6 units differ by less than one unrolled layer's HLO would add."""
    def hlo_chars(cfg):
        with nnx.use_eager_sharding(False):
            abstract = nnx.eval_shape(lambda: init_target(cfg))
        graph, state = nnx.split(abstract)
        cache = jax.eval_shape(lambda: init_cache(cfg, 1, 32, max_block=1))
        fn = jax.jit(lambda s, t, c: nnx.merge(graph, s)(t, c).logits)
        return len(fn.lower(state, jax.ShapeDtypeStruct((1, 16), jnp.int32), cache).as_text())

    deep = CFG.replace(n_layers=14, compress_ratios=(0,) + (4, 8) * 6 + (0, 0))
    assert layer_plan(deep) == LayerPlan(1, 2, 6)
    short, long_ = hlo_chars(CFG), hlo_chars(deep)
    unrolled = hlo_chars(CFG.replace(scan_layers=False))
    per_layer = (unrolled - short) / 2  # the scanned model compiles 4 layer bodies (prefix, one unit, tail), not 6
    assert per_layer > 0
    print("hlo chars: scanned 6 layers", short, "scanned 14 layers", long_, "unrolled 6 layers", unrolled)
    assert long_ - short < per_layer, (short, long_, unrolled)


@pytest.mark.slow
def test_generate_with_mtp_same_tokens_scanned_or_unrolled():
    """End to end: greedy MTP-3 speculative decoding (draft, verify, rollback every step) emits the same tokens
    and accepts the same drafts per step with the scanned target as with the unrolled one."""
    from hdflash_jax.decode.drafters import MTPDrafter
    from hdflash_jax.decode.generate import DecodeSettings, Generator

    prompts = [[3, 5, 7, 2, 9, 11, 4, 8, 6], [12, 3, 3, 40, 7]]
    settings = DecodeSettings(max_new_tokens=24, prompt_buckets=(16,))
    res = [Generator(init_target(cfg, seed=6), MTPDrafter(3), settings=settings).generate(prompts)
           for cfg in (CFG, CFG.replace(scan_layers=False))]
    np.testing.assert_array_equal(res[0].tokens, res[1].tokens)
    np.testing.assert_array_equal(res[0].accepted, res[1].accepted)
    assert (res[0].lengths == 24).all()
