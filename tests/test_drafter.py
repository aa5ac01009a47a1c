"""The block drafters: HyperDFlash's gated residual reducer, vanilla DFlash's linear compressor, the block drafter.

Numbers asserted: parameter counts at V4-Flash dims (65,541 vs 67,108,864), exact reproduction of the target's
hc_head at init, mask semantics, batch/padding independence, one compiled pass per shape, and equality of the
inference (draft cache) and training (train_forward) paths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hdflash_jax.config import DrafterConfig, build_target_layer_ids, get_drafter_preset, get_preset
from hdflash_jax.deepseek_v4.cache import set_committed_length
from hdflash_jax.drafter import model as dm
from hdflash_jax.drafter.model import (
    block_token_ids, count_params, draft, draft_block, init_draft_cache, init_drafter, init_drafter_from_target,
    make_draft_fn,
)
from hdflash_jax.drafter.training import train_forward, training_mask
from hdflash_jax.drafter.reducer import features_from_target, make_reducer, target_return_layers

TOL = dict(rtol=2e-5, atol=2e-5)
T, MAX_LEN, ANCHORS = 6, 24, (3, 5, 9)  # one chunk length and cache size for every cache test: compiled once per batch size


def _reducer_params(cfg: DrafterConfig) -> nnx.State:
    with nnx.use_eager_sharding(False):
        return nnx.state(nnx.eval_shape(lambda: make_reducer(cfg, rngs=nnx.Rngs(0))), nnx.Param)


# ---- (a) sizes at V4-Flash dims, nothing allocated ----------------------------------------------------------

def test_reducer_param_counts_v4_flash():
    flash = get_preset("v4-flash")
    gate = _reducer_params(DrafterConfig.for_target(flash, post_norm=False))
    assert count_params(gate) == 4 * 16384 + 4 + 1 == 65_541
    assert count_params(_reducer_params(DrafterConfig.for_target(flash))) == 65_541 + 4096  # + post RMSNorm
    lin = _reducer_params(DrafterConfig.for_target(flash, reducer="linear"))
    assert lin["fc"]["weight"].shape == (4096, 16384)
    assert count_params(lin["fc"]) == 16384 * 4096 == 67_108_864
    assert count_params(lin) == 67_108_864 + 4096  # + hidden_norm
    dflash = _reducer_params(DrafterConfig.for_target(flash, conditioning="layers", reducer="linear"))
    assert count_params(dflash["fc"]) == 5 * 16384 * 4096 == 335_544_320  # K = 5 multi-stream layers
    assert 67_108_864 // 65_541 == 1023  # "three orders of magnitude"


def test_full_drafter_sizes_v4_flash():
    cfg = get_drafter_preset("v4-flash-hyperdflash", n_layers=1)
    m = dm.abstract_drafter(cfg)
    per_layer = 4096 * 4096 * 2 + 2 * 4096 * 1024 + 3 * 4096 * 12288 + 2 * 4096 + 2 * 128  # q, o; k, v (8 heads)
    assert count_params(m.layers[0]) == per_layer
    assert count_params(m) == per_layer + 65_541 + 4096 + 4096
    state = nnx.state(m, nnx.Param)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))  # nothing allocated
    assert all(cfg.vocab_size not in x.shape for x in jax.tree.leaves(state))  # no embedding / head copies


# ---- config ------------------------------------------------------------------------------------------------

def test_layer_id_rule_and_config():
    assert build_target_layer_ids(36, 5) == (1, 9, 17, 25, 33)  # Qwen3-8B-DFlash-b16's target_layer_ids
    assert build_target_layer_ids(36, 1) == (18,)
    assert build_target_layer_ids(43, 5) == (1, 11, 20, 30, 40)  # round-half-even, as the reference
    cfg = DrafterConfig.for_target(get_preset("v4-flash"), conditioning="layers", reducer="linear")
    assert cfg.layer_ids == (1, 11, 20, 30, 40) and cfg.n_feature_layers == 5 and not cfg.post_norm
    assert DrafterConfig.for_target(get_preset("tiny"), conditioning="layers", reducer="linear",
                                    n_layers=1).layer_ids == (3,)
    hyper = get_drafter_preset("v4-flash-hyperdflash")
    assert hyper == DrafterConfig(draft_cache="kv") and hyper.layer_ids == () and hyper.n_drafts == 7
    assert DrafterConfig.from_dict(cfg.to_dict()) == cfg
    for bad, match in [(dict(n_heads=6, n_kv_heads=4), "n_kv_heads"), (dict(block_size=1), "block_size"),
                       (dict(mask_token_id=129280), "mask_token_id"), (dict(reducer="conv"), "reducer"),
                       (dict(conditioning="layers", target_layer_ids=(0, 43)), "target_layer_ids"),
                       (dict(target_layer_ids=(3,)), "only used with conditioning='layers'"),
                       (dict(reducer="linear", post_norm=True), "post_norm")]:
        with pytest.raises(ValueError, match=match):
            DrafterConfig(**bad)


# ---- fixtures ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup():
    """A tiny HyperDFlash drafter (fp32) with random frozen embedding/head, random features and tokens."""
    cfg = get_drafter_preset("tiny-hyperdflash")  # dim 64, 4 streams, 2 layers, B = 4, vocab 512
    d = init_drafter(cfg, seed=1)
    k = jax.random.split(jax.random.key(0), 4)
    embed = jax.random.normal(k[0], (cfg.vocab_size, cfg.dim))
    head = jax.random.normal(k[1], (cfg.vocab_size, cfg.dim)) * 0.1
    feats = jax.random.normal(k[2], (2, 16, cfg.hc_mult, cfg.dim))
    tokens = jax.random.randint(k[3], (2, 16), 0, cfg.vocab_size - 1)
    return cfg, d, (embed, head), feats, tokens


_train = nnx.jit(train_forward)
_draft = nnx.jit(draft, static_argnames=("block_size",))
_draft_block = nnx.jit(draft_block, static_argnames=("block_size",))


# ---- (b) the inherited gate reproduces the target's collapse -----------------------------------------------

def test_gated_reducer_equals_target_hc_head():
    from hdflash_jax.deepseek_v4.model import init_target

    t = init_target(get_preset("tiny"), seed=0)
    # make the inherited gate non-trivial (init has base 0, scale 1)
    t.hc_head.base[...] = jnp.array([0.3, -0.2, 0.1, 0.5], jnp.float32)
    t.hc_head.scale[...] = jnp.array([1.7], jnp.float32)
    t.norm.weight[...] = 1.0 + 0.1 * jax.random.normal(jax.random.key(5), (t.cfg.dim,))
    streams = 2.0 * jax.random.normal(jax.random.key(3), (2, 7, t.cfg.hc_mult, t.cfg.dim))
    ref = t.collapse(streams)
    plain = init_drafter_from_target(t, get_drafter_preset("tiny-hyperdflash", post_norm=False), seed=4)
    np.testing.assert_allclose(plain.reducer(streams), ref, rtol=0, atol=1e-7)
    print("max |gated reducer - target.collapse| =", float(jnp.abs(plain.reducer(streams) - ref).max()))
    fn0 = np.asarray(t.hc_head.fn[...])
    plain.reducer.fn[...] = plain.reducer.fn[...] * 0.0  # a copy, trainable on its own: the target keeps its own
    np.testing.assert_array_equal(t.hc_head.fn[...], fn0)
    normed = init_drafter_from_target(t, get_drafter_preset("tiny-hyperdflash"), seed=4)
    np.testing.assert_allclose(normed.reducer(streams), t.norm(ref), rtol=0, atol=1e-6)
    # c of the post-normed gate through the target head = the target's own logits
    np.testing.assert_allclose(t.head_logits(normed.reducer(streams)), t.lm_head(ref), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(normed.norm.weight[...], t.norm.weight[...])
    # ablation 'layers' + 'gated': K inherited gates, averaged
    lg = init_drafter_from_target(t, get_drafter_preset("tiny-hyperdflash", conditioning="layers",
                                                        target_layer_ids=(1, 3), post_norm=False), seed=4)
    np.testing.assert_allclose(lg.reducer(jnp.stack([streams, streams], axis=2)), ref, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="built for another target: dim=4096, the target has 64"):
        init_drafter_from_target(t, get_drafter_preset("v4-flash-hyperdflash"))


def test_gate_variants_start_where_they_should():
    """The low-rank residual starts as the inherited gate (U = 0) and then moves it; the per-path norm starts as the
    gate over RMS-normalised streams; both are refused outside final_streams + gated, naming the field."""
    from hdflash_jax.deepseek_v4.mhc import hc_head
    from hdflash_jax.deepseek_v4.model import init_target

    t = init_target(get_preset("tiny"), seed=0)
    streams = 2.0 * jax.random.normal(jax.random.key(3), (2, 7, t.cfg.hc_mult, t.cfg.dim))
    ref = t.collapse(streams)
    res = init_drafter_from_target(t, get_drafter_preset("tiny-hyperdflash", post_norm=False,
                                                         gate_residual_rank=4), seed=4)
    np.testing.assert_allclose(res.reducer(streams), ref, rtol=0, atol=1e-7)
    res.reducer.res_up[...] = jnp.ones_like(res.reducer.res_up[...])
    assert float(jnp.abs(res.reducer(streams) - ref).max()) > 1e-2
    pn = init_drafter_from_target(t, get_drafter_preset("tiny-hyperdflash", post_norm=False, gate_path_norm=True),
                                  seed=4)
    normed = streams * jax.lax.rsqrt(jnp.mean(streams * streams, axis=-1, keepdims=True) + t.cfg.norm_eps)
    g = t.hc_head
    want = hc_head(normed, g.fn[...], g.base[...], g.scale[...], norm_eps=t.cfg.norm_eps, hc_eps=t.cfg.hc_eps)
    np.testing.assert_allclose(pn.reducer(streams), want, rtol=1e-6, atol=1e-6)
    for field in ("gate_path_norm", "gate_residual_rank"):
        with pytest.raises(ValueError, match=f"DrafterConfig.{field}: applies to the gated reducer on final_streams"):
            get_drafter_preset("tiny-hyperdflash", reducer="linear", post_norm=False,
                               **{field: True if field == "gate_path_norm" else 2})


# ---- (c) training mask ---------------------------------------------------------------------------------------

def test_training_mask_layout():
    anchors = jnp.array([[2, 5, 3]])
    keep = jnp.array([[True, True, False]])
    m = np.asarray(training_mask(anchors, 6, 2, keep))[0]
    assert m.shape == (6, 6 + 6)
    want = np.zeros((6, 12), bool)
    for n, a in enumerate([2, 5]):
        for j in range(2):
            want[n * 2 + j, :a] = True
            want[n * 2 + j, 6 + n * 2: 6 + n * 2 + 2] = True
    np.testing.assert_array_equal(m, want)


def test_train_forward_mask_semantics(setup):
    cfg, d, io, feats, tokens = setup
    f, x = feats[:1], tokens[:1]
    anchors = jnp.array([ANCHORS])  # 3, 5, 9
    blocks = block_token_ids(x[0][anchors[0]][None], cfg.block_size, cfg.mask_token_id)  # [1, 3, B]
    keep = jnp.ones((1, 3), bool)
    base = _train(d, *io, f, anchors, blocks, keep)
    assert base.shape == (1, 3, cfg.block_size, cfg.vocab_size)

    def changed(f=f, blocks=blocks, keep=keep):
        out = _train(d, *io, f, anchors, blocks, keep)
        return np.abs(np.asarray(out - base)).max(axis=(-1, -2))[0]  # per block

    # the context at an anchor's own position is hidden from its block (strict k < a), shown to later ones
    diff = changed(f=f.at[0, 5].add(1.0))
    assert diff[0] == 0.0 and diff[1] == 0.0 and diff[2] > 1e-3
    diff = changed(f=f.at[0, 4].add(1.0))  # 3 < 4 < 5: block 0 hidden, blocks 1, 2 shown
    assert diff[0] == 0.0 and diff[1] > 1e-3 and diff[2] > 1e-3
    diff = changed(f=f.at[0, 2].add(1.0))  # before every anchor: shown to all
    assert diff.min() > 1e-3
    diff = changed(f=f.at[0, 9:].add(1.0))  # at/after the last anchor: hidden from all
    assert diff.max() == 0.0
    diff = changed(blocks=blocks.at[0, 1, 2].set(7))  # another block's token: hidden from blocks 0 and 2
    assert diff[0] == 0.0 and diff[2] == 0.0 and diff[1] > 1e-3
    # within a block: non-causal, slot 1 sees slot 3
    out = _train(d, *io, f, anchors, blocks.at[0, 0, 3].set(7), keep)
    assert np.abs(np.asarray(out - base)[0, 0, 1]).max() > 1e-3
    # a dropped block changes nothing else
    diff = changed(keep=keep.at[0, 1].set(False))
    assert diff[0] == 0.0 and diff[2] == 0.0


# ---- (f) inference path == training path ---------------------------------------------------------------------

def test_draft_cache_equals_train_forward(setup):
    cfg, d, io, feats, tokens = setup
    f, x = feats[:1], tokens[:1]
    anchors = jnp.array([ANCHORS])
    blocks = block_token_ids(x[0][anchors[0]][None], cfg.block_size, cfg.mask_token_id)
    ref = _train(d, *io, f, anchors, blocks, jnp.ones((1, 3), bool))  # [1, 3, B, V]
    cache = init_draft_cache(cfg, 1, MAX_LEN)

    def chunk(lo, hi, junk_from=None):  # positions lo..hi-1, padded to T with garbage
        c = f[:, lo:hi]
        if junk_from is not None:
            c = c.at[:, junk_from - lo:].set(50.0)
        return jnp.concatenate([c, jnp.full((1, T - (hi - lo)) + f.shape[2:], 1e3)], axis=1)

    # step 1: prefill context 0..2, anchor x_3
    t1, l1, cache = _draft(d, io, chunk(0, 3), jnp.array([3]), x[:, 3], cache)
    np.testing.assert_allclose(l1[0], ref[0, 0, 1:], **TOL)
    np.testing.assert_array_equal(t1[0], jnp.argmax(ref[0, 0, 1:], -1))
    # step 2: the verify pass gave features for 3..6 of which 5, 6 were rejected: append, then roll back to 5
    _, _, cache = _draft(d, io, chunk(3, 7, junk_from=5), jnp.array([4]), x[:, 7], cache)
    assert int(cache["length"][0]) == 7
    cache = set_committed_length(cache, jnp.array([5]))
    _, l2 = _draft_block(d, io, x[:, 5], cache)
    np.testing.assert_allclose(l2[0], ref[0, 1, 1:], **TOL)
    # step 3: positions 5..8 (overwriting the rejected ones), anchor x_9
    _, l3, cache = _draft(d, io, chunk(5, 9), jnp.array([4]), x[:, 9], cache)
    assert int(cache["length"][0]) == 9
    np.testing.assert_allclose(l3[0], ref[0, 2, 1:], **TOL)
    # a smaller block at inference than in training (B = 4 → 3): static block_size, same cache
    t_small, l_small = _draft_block(d, io, x[:, 9], cache, block_size=3)
    assert t_small.shape == (1, 2) and l_small.shape == (1, 2, cfg.vocab_size)


# ---- (d) rows are independent ------------------------------------------------------------------------------

def test_rows_independent_of_padding_and_batch(setup):
    cfg, d, io, feats, tokens = setup
    n = jnp.array([5, 2])  # per-row lengths in a T = 6 chunk (row 0: 1 padding row, row 1: 4)
    anchors = jnp.array([tokens[0, 5], tokens[1, 2]])
    batched = _draft(d, io, feats[:, :T], n, anchors, init_draft_cache(cfg, 2, MAX_LEN))
    for r in range(2):  # each row alone, its padding garbage
        f_r = feats[r:r + 1, :T].at[:, int(n[r]):].set(1e3)
        alone = _draft(d, io, f_r, n[r:r + 1], anchors[r:r + 1], init_draft_cache(cfg, 1, MAX_LEN))
        np.testing.assert_allclose(batched[1][r], alone[1][0], **TOL)
        np.testing.assert_array_equal(batched[0][r], alone[0][0])
    # garbage in row 1's padding and a change to row 0 leave row 1 alone (bitwise)
    f2 = feats[:, :T].at[1, 2:].set(-7e2).at[0].multiply(3.0)
    other = _draft(d, io, f2, n, anchors.at[0].set(5), init_draft_cache(cfg, 2, MAX_LEN))
    np.testing.assert_array_equal(other[1][1], batched[1][1])
    assert np.abs(np.asarray(other[1][0] - batched[1][0])).max() > 1e-3
    np.testing.assert_array_equal(other[2]["length"], n)
    # a second step on the batched cache with different per-row advances keeps matching the rows alone
    n2 = jnp.array([1, 3])
    a2 = jnp.array([tokens[0, 6], tokens[1, 5]])
    step2 = _draft(d, io, jnp.stack([feats[0, 5:5 + T], feats[1, 2:2 + T]]), n2, a2, batched[2])
    for r in range(2):
        c = init_draft_cache(cfg, 1, MAX_LEN)
        f_r = feats[r:r + 1, :T].at[:, int(n[r] + n2[r]):].set(1e3)
        alone = _draft(d, io, f_r, (n + n2)[r:r + 1], a2[r:r + 1], c)
        np.testing.assert_allclose(step2[1][r], alone[1][0], **TOL)


# ---- (e) one forward pass, compiled once per shape ---------------------------------------------------------

def test_draft_is_one_pass_compiled_once(setup, monkeypatch):
    cfg, d, io, feats, tokens = setup
    counts = {"trace": 0, "layer": 0, "head": 0}
    layer_call = dm.DraftLayer.__call__
    head_fn = dm.frozen_head

    def counting_layer(self, *a, **k):
        counts["layer"] += 1
        return layer_call(self, *a, **k)

    def counting_head(h):
        f = head_fn(h)
        return lambda x: (counts.__setitem__("head", counts["head"] + 1), f(x))[1]

    monkeypatch.setattr(dm.DraftLayer, "__call__", counting_layer)
    monkeypatch.setattr(dm, "frozen_head", counting_head)
    graphdef, state = nnx.split(d)
    inner = make_draft_fn(graphdef, jit=False)

    def traced(*args):
        counts["trace"] += 1
        return inner(*args)

    step = jax.jit(traced)
    cache = init_draft_cache(cfg, 2, MAX_LEN)
    n = jnp.array([5, 3])
    toks, logits, cache1 = step(state, *io, feats[:, :T], n, tokens[:, 5], cache)
    assert toks.shape == (2, cfg.block_size - 1) and logits.shape == (2, cfg.block_size - 1, cfg.vocab_size)
    assert counts == {"trace": 1, "layer": cfg.n_layers, "head": 1}  # B−1 tokens from one pass of the layers
    # same shapes, other values (other lengths, other anchors, a grown cache): no recompilation
    step(state, *io, feats[:, 5:5 + T] * 2, jnp.array([2, 5]), tokens[:, 7], cache1)
    step(state, *io, feats[:, 3:3 + T], jnp.array([0, 1]), tokens[:, 0], cache1)
    assert step._cache_size() == 1 and counts["trace"] == 1
    step(state, *io, feats[:, :7], jnp.array([7, 7]), tokens[:, 7], cache)  # a new chunk length: one more
    assert step._cache_size() == 2 and counts["trace"] == 2
    # the pure step equals the module call
    ref = _draft(d, io, feats[:, :T], n, tokens[:, 5], init_draft_cache(cfg, 2, MAX_LEN))
    np.testing.assert_allclose(logits, ref[1], **TOL)


# ---- the real target: conditioning features and the layer-id off-by-one ------------------------------------

def test_target_features_layer_offset_and_end_to_end():
    from hdflash_jax.deepseek_v4.model import forward_full, init_target

    tcfg = get_preset("tiny", n_layers=2, compress_ratios=(0, 0, 0), n_hash_layers=1)
    target = init_target(tcfg, seed=2)
    # DFlash on this 2-layer target, taps given out of order: id L−1 = 1, then id 0
    small = dict(n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, inter_dim=64, block_size=3)
    dcfg = DrafterConfig.for_target(tcfg, conditioning="layers", reducer="linear", target_layer_ids=(1, 0), **small)
    assert target_return_layers(dcfg) == (0, 1)
    tokens = jax.random.randint(jax.random.key(0), (1, 6), 0, 500)
    out = nnx.jit(lambda m, x: forward_full(m, x, return_layers=(0, 1)))(target, tokens)
    feats = features_from_target(dcfg, out)
    assert feats.shape == (1, 6, 2, tcfg.hc_mult, tcfg.dim)
    # id i is the OUTPUT of 0-based decoder layer i = HF hidden_states[i + 1]: id L−1 is the final streams ...
    np.testing.assert_array_equal(feats[:, :, 0], out.streams)
    # ... and id 0 is one layer past the embedding (HF hidden_states[0]), not the embedding itself
    emb = jnp.broadcast_to(target.embed_tokens(tokens)[:, :, None, :], out.streams.shape)
    assert np.abs(np.asarray(feats[:, :, 1] - emb)).max() > 1e-3
    np.testing.assert_array_equal(features_from_target(DrafterConfig.for_target(tcfg, **small), out), out.streams)
    with pytest.raises(ValueError, match="return_layers"):
        features_from_target(dcfg.replace(target_layer_ids=(1,)), out)
    # end to end: the target module passed in (frozen, not copied into the drafter)
    d = init_drafter_from_target(target, dcfg, seed=0)
    toks, logits, cache = _draft(d, target, feats, jnp.array([6]), tokens[:, 5], init_draft_cache(dcfg, 1, 8))
    assert toks.shape == (1, 2) and logits.shape == (1, 2, tcfg.vocab_size) and int(cache["length"][0]) == 6
    assert np.isfinite(np.asarray(logits)).all()
    np.testing.assert_array_equal(toks, jnp.argmax(logits, -1))
    e, h = dm.target_io(target)
    assert e is target.embed[...] and h is target.head.weight[...]


def test_train_forward_gradients_reach_drafter_only(setup):
    cfg, d, io, feats, tokens = setup
    anchors = jnp.array([ANCHORS, ANCHORS])
    blocks = block_token_ids(jnp.take_along_axis(tokens, anchors, 1), cfg.block_size, cfg.mask_token_id)

    def loss(d, embed, head):
        logits = train_forward(d, embed, head, feats, anchors, blocks, jnp.ones((2, 3), bool))
        return -jax.nn.log_softmax(logits[:, :, 1:]).mean()

    gd, ge, gh = nnx.jit(nnx.grad(loss, argnums=(0, 1, 2)))(d, *io)
    assert float(jnp.abs(ge).max()) == 0.0 and float(jnp.abs(gh).max()) == 0.0  # embedding and head frozen
    assert float(jnp.abs(gd.reducer.fn[...]).max()) > 0.0  # the inherited gate is trainable
    assert float(jnp.abs(gd.layers[0].wk.weight[...]).max()) > 0.0


def test_drafter_sizes_script(tmp_path, capsys):
    from eval.bench.drafter_sizes import main

    assert main(["--json", str(tmp_path / "sizes.json")]) == 0
    import json
    rows = json.loads((tmp_path / "sizes.json").read_text())["designs"]
    assert rows["hyperdflash"]["reducer_core_params"] == 65_541
    assert rows["final_streams+linear"]["reducer_core_params"] == 67_108_864
    assert rows["dflash"]["target_layer_ids"] == [1, 11, 20, 30, 40]
    # a layer: q, k, v (8 KV heads), o, MLP, norms
    assert rows["hyperdflash"]["total_params"] == 5 * 192_946_432 + 65_541 + 4096 + 4096
    assert "1024x" in capsys.readouterr().out


# ---- RoPE frequencies: one definition for target and drafter ------------------------------------------------

def _yarn_reference(cfg, compressed):
    """The YaRN blend written out independently of hdflash_jax.config (float64, one rounding at the end)."""
    import math

    dim, base = cfg.rope_head_dim, (cfg.compress_rope_theta if compressed else cfg.rope_theta)
    inv = np.array([base ** (-(2.0 * i) / dim) for i in range(dim // 2)], np.float64)
    if not compressed or cfg.rope_factor <= 1.0:
        return inv.astype(np.float32)
    corr = [dim * math.log(cfg.original_seq_len / (b * 2 * math.pi)) / (2 * math.log(base))
            for b in (cfg.beta_fast, cfg.beta_slow)]
    lo, hi = max(math.floor(corr[0]), 0), min(math.ceil(corr[1]), dim - 1)
    ramp = np.clip((np.arange(dim // 2) - lo) / max(hi - lo, 1e-3), 0.0, 1.0)
    return (inv / cfg.rope_factor * ramp + inv * (1.0 - ramp)).astype(np.float32)


def test_rope_frequencies_have_one_definition():
    from hdflash_jax.config import rope_inv_freq, yarn_inv_freq

    got = rope_inv_freq(8, 10000.0)
    assert got.dtype == np.float32 and got[0] == 1.0
    np.testing.assert_array_equal(got, np.float32([1.0, 0.1, 0.01, 0.001]))  # 10000^(-2i/8) = 10^-i
    for name in ("tiny", "v4-flash", "v4-pro"):
        cfg = get_preset(name)
        for compressed in (False, True):
            np.testing.assert_array_equal(yarn_inv_freq(cfg, compressed), _yarn_reference(cfg, compressed))
    d = get_drafter_preset("tiny-hyperdflash")
    ref = np.array([d.rope_theta ** (-(2.0 * i) / d.head_dim) for i in range(d.head_dim // 2)]).astype(np.float32)
    np.testing.assert_array_equal(rope_inv_freq(d.head_dim, d.rope_theta), ref)
