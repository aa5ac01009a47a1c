"""DFlash 2 (`hdflash_jax.drafter.dflash2`): what the two parts change and what they must not.

* at init (identity convolutions) the drafter's unary logits are the block drafter's with the same weights, and a
  non-zero tap changes them (control);
* the inference path (draft cache, one block per row) equals the training path (N blocks per sequence in one pass)
  with random convolutions and adjacent blocks, where a convolution that read across a block boundary would differ
  (control: the training path's blocks treated as one);
* the vocabulary-chunked candidate search equals the full one; the selector loss with it too;
* sampled selector drafts are lossless at T = 1 (two-sample χ² against AR per prompt and position), and the
  point-mass residual rule on the same drafts is rejected (the negative control).
Parity with the references: tests/test_ref_dflash2.py; greedy = AR and the checkpoint round trips: test_families.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hdflash_jax.config import get_drafter_preset
from hdflash_jax.drafter import dflash2
from hdflash_jax.drafter.dflash2 import DFlash2Config, DFlash2Drafter
from hdflash_jax.drafter.model import (block_token_ids, draft, init_draft_cache, init_drafter)
from hdflash_jax.drafter.training import train_forward
from hdflash_jax.training.dflash2_loss import DFlash2LossConfig, selector_loss, top_k_over_head
from test_sampling import sampling_target  # noqa: F401,F811 — the micro target of the sampling tests

TOL = dict(rtol=2e-5, atol=2e-5)
MAX_LEN, T = 32, 6


@pytest.fixture(scope="module")
def setup():
    base = get_drafter_preset("tiny-hyperdflash")  # dim 64, 4 streams, 2 layers, B = 4, vocab 512
    cfg = DFlash2Config(**dataclasses.asdict(base), conv_kernel_size=3, conv_group_size=8, selector_rank=8,
                        selector_top_k=8)
    k = jax.random.split(jax.random.key(0), 4)
    embed = jax.random.normal(k[0], (cfg.vocab_size, cfg.dim))
    head = jax.random.normal(k[1], (cfg.vocab_size, cfg.dim)) * 0.1
    feats = jax.random.normal(k[2], (1, 20, cfg.hc_mult, cfg.dim))
    tokens = jax.random.randint(k[3], (1, 20), 0, cfg.vocab_size - 1)
    return base, cfg, (embed, head), feats, tokens


def randomize_convs(d, seed: int = 0, scale: float = 0.2):
    """Every convolution's taps and kernel projection random (identity convolutions would hide a wrong tap order,
    group layout or side)."""
    rng = np.random.default_rng(seed)
    for layer in d.layers:
        for conv in (layer.attention_conv, layer.mlp_conv):
            conv.base_kernel[...] = jnp.asarray(0.5 + 0.3 * rng.standard_normal(conv.base_kernel[...].shape),
                                                jnp.float32)
            w = conv.kernel_projection.weight
            w[...] = jnp.asarray(scale * rng.standard_normal(w[...].shape), jnp.float32)
    return d


_train = nnx.jit(train_forward)
_draft = nnx.jit(draft, static_argnames=("block_size",))


def test_identity_convolutions_give_the_block_drafter(setup):
    base, cfg, io, feats, tokens = setup
    anchors = jnp.array([[3, 7, 11]])
    blocks = block_token_ids(tokens[0][anchors[0]][None], cfg.block_size, cfg.mask_token_id)
    plain = init_drafter(base, seed=1)
    d2 = init_drafter(cfg, seed=1, cls=DFlash2Drafter)
    nnx.update(d2, nnx.state(plain))  # the shared parameters equal; the convolutions at their identity init
    ref = np.asarray(_train(plain, *io, feats, anchors, blocks))
    same = np.asarray(_train(d2, *io, feats, anchors, blocks))
    np.testing.assert_array_equal(same, ref)
    moved = np.asarray(_train(randomize_convs(d2), *io, feats, anchors, blocks))
    assert np.abs(moved - ref).max() > 1e-2


def test_dflash2_inference_equals_training_across_adjacent_blocks(setup, monkeypatch):
    _, cfg, io, feats, tokens = setup
    d = randomize_convs(init_drafter(cfg, seed=2, cls=DFlash2Drafter), seed=3)
    anchors = jnp.array([[3, 7, 11]])  # B = 4: blocks 3..6, 7..10, 11..14 touch
    blocks = block_token_ids(tokens[0][anchors[0]][None], cfg.block_size, cfg.mask_token_id)
    ref = np.asarray(_train(d, *io, feats, anchors, blocks))
    for n, a in enumerate(np.asarray(anchors[0])):
        cache = init_draft_cache(cfg, 1, MAX_LEN)
        ctx = jnp.concatenate([feats[:, :a], jnp.zeros((1, MAX_LEN - a) + feats.shape[2:])], axis=1)[:, :16]
        _, logits, _ = _draft(d, io, ctx, jnp.array([a]), tokens[:, a], cache)
        np.testing.assert_allclose(np.asarray(logits[0]), ref[0, n, 1:], **TOL)
    # control: the training path's blocks read as one long block (a convolution across block boundaries)
    call = dflash2.DFlash2Layer.__call__
    monkeypatch.setattr(dflash2.DFlash2Layer, "__call__",
                        lambda self, h, positions, attend, block_len=None: call(self, h, positions, attend, None))
    leaky = np.asarray(nnx.jit(train_forward)(d, *io, feats, anchors, blocks))
    np.testing.assert_allclose(leaky[0, 0], ref[0, 0], **TOL)  # the first block has nothing before it
    assert np.abs(leaky[0, 1:] - ref[0, 1:]).max() > 1e-3


def test_chunked_candidate_search_equals_full(setup):
    _, cfg, io, feats, tokens = setup
    hidden = jax.random.normal(jax.random.key(5), (2, 3, 4, cfg.dim))
    head = io[1]
    full = np.asarray(top_k_over_head(hidden, head, 8, 0))
    for chunk in (100, 128, 511):  # a divisor of V and two that are not
        np.testing.assert_array_equal(np.asarray(top_k_over_head(hidden, head, 8, chunk)), full)
    z = np.einsum("bnjd,vd->bnjv", np.asarray(hidden), np.asarray(head))
    np.testing.assert_array_equal(full, np.argsort(-z, axis=-1)[..., :8])
    d = init_drafter(cfg, seed=4, cls=DFlash2Drafter)
    tok = jax.random.randint(jax.random.key(6), (2, 16), 0, cfg.vocab_size)
    anchors, keep = jnp.array([[1, 5, 9], [0, 4, 12]]), jnp.ones((2, 3), bool)
    losses = [selector_loss(d.selector, hidden, head, tok, jnp.ones((2, 16), bool), anchors, keep,
                            DFlash2LossConfig(block_size=4, vocab_chunk=c), 8)[0] for c in (0, 100)]
    np.testing.assert_allclose(float(losses[0]), float(losses[1]), rtol=1e-6)


# ---- sampled selector drafts are lossless -------------------------------------------------------------------------

def _sampled_dflash2(target, top_k: int):
    from test_sampling import K, SAMPLING

    from hdflash_jax.decode.drafters import DFlash2DrafterAdapter
    from hdflash_jax.drafter.model import init_drafter_from_target

    cfg = DFlash2Config.for_target(SAMPLING, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, inter_dim=64,
                                   block_size=K + 1, conditioning="layers", reducer="linear",
                                   target_layer_ids=(0, 1, 2), conv_group_size=8, selector_rank=4,
                                   selector_top_k=top_k)
    modules = randomize_convs(init_drafter_from_target(target, cfg, seed=3, cls=DFlash2Drafter), seed=9)
    rng = np.random.default_rng(2)
    for p in (modules.selector.predecessor_codebook, modules.selector.successor_codebook):
        p[...] = jnp.asarray(rng.standard_normal(p[...].shape), jnp.float32)  # transitions that matter
    return DFlash2DrafterAdapter(cfg, K, sampled=True, temperature=1.0, top_p=1.0), modules


@pytest.mark.slow
def test_dflash2_sampled_drafts_lossless_at_t1(sampling_target, monkeypatch):  # noqa: F811
    """T = 1, top-p 1: drafts sampled from the selector's softmax over its top-4 candidates (q zero elsewhere), judged
    by the rejection sampler; 2,000 samples per prompt against 2,000 of AR. Control: the point-mass residual."""
    from test_sampling import MAX_NEW, PER_PROMPT, _batch, _point_mass_residual, _two_sample_pvalues

    from hdflash_jax.decode import generate as gen

    target = sampling_target
    settings = gen.DecodeSettings(max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0)
    batch = _batch(2 * PER_PROMPT)
    ar = gen.Generator(target, settings=settings).generate(batch, seed=111).tokens
    drafter, modules = _sampled_dflash2(target, top_k=4)
    res = gen.Generator(target, drafter, modules, settings=settings).generate(batch, seed=404)
    p_ok = _two_sample_pvalues(ar, res.tokens)
    monkeypatch.setattr(gen, "accept_sampled", _point_mass_residual)
    bad = gen.Generator(target, drafter, modules, settings=settings).generate(batch, seed=404)
    p_bad = _two_sample_pvalues(ar, bad.tokens)
    print(f"\nDFlash 2 sampled selector drafts, T = 1: accepted-length hist {list(res.stats.accepted_hist)}, tau "
          f"{res.stats.tau:.3f}; real rule min p {p_ok.min():.3g} over {p_ok.size} tests; point-mass residual min p "
          f"{p_bad.min():.3g}")
    assert (p_ok > 1e-4).all(), p_ok
    assert p_bad.min() < 1e-6, p_bad
