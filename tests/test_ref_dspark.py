"""The DSpark drafter against the two real DSpark implementations that install here.

**NeMo Automodel's V4 DSpark draft** (`speculative.dspark.draft_deepseek_v4.DeepseekV4DSparkModel`) keeps V4's
attention (q-LoRA, one K = V latent with kv_norm and partial interleaved RoPE, per-head sinks, inverse RoPE on the
output, grouped o-LoRA) with the context injected as keys (fc → hidden_norm → each layer's own wkv / kv_norm), the
block [anchor, noise...] non-causal, a Markov head and a confidence head; but its layers are plain pre-norm residual
blocks with a dense SwiGLU MLP, where the released V4 drafter (ours) has mHC around attention and MoE. The two are the
same function at one point of our parameter space: hc_mult 1, hc_eps 0, every mHC `fn` 0 with bases (40, 0, ·)
(pre = σ(40) = 1.0 and post = 2σ(0) = 1.0 in fp32, the 1x1 Sinkhorn = 1, hc_head's gate 1.0), the routed experts'
w2 = 0 and the shared expert = NeMo's MLP (no clamp reached). There our drafter must reproduce NeMo's training forward
(teacher-forced Markov logits, targets, eval mask), its base logits from our *inference* path (a cache of the
context before the anchor, the block drafted from it), its sequential Markov drafting, and its confidence head.
mHC, MoE and hc_head themselves are checked against NeMo in test_ref_nemo_target.py; the released layout with
them inside the stages is still tested against the transcription in test_dspark_reference.py (no installed
reference implements V4 DSpark with mHC stages: NeMo's V4.1 DSpark is the V4.1 generation).

One input differs by design and is fed explicitly: NeMo's confidence head reads the *final-normed* hidden, ours the
raw x_post_hc residual before the norm, which is what the released V4 checkpoints were trained with (NeMo's V4.1
DSpark code notes the same split: its own drafts read the normed output, the released heads the raw residual); the
test gives our head NeMo's input. NeMo's and speculators' confidence `proj` has a bias, the
released V4 head none (`mtp.2.confidence_head.proj.weight` only): the references' bias is set to 0.

**speculators' DSparkDraftModel** is DFlash (Qwen3 layers) + Markov + confidence head with
`sample_from_anchor=True` (DeepSpec's convention, ours: slot j drafts token a+j+1 from the target's distribution at
a+j, its Markov bias conditioned on the token at a+j). Its backbone is not ours, so the heads and the slot
convention are compared: its Markov bias against ours on the same tokens and anchors, its per-slot teachers
against the target logits at our slots' positions, its confidence against our head on its hidden. Read with
`sample_from_anchor=False` (DFlash's convention) the same checkpoint's slots are one token off: negative control.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

pytest.importorskip("nemo_automodel.components.speculative.dspark.draft_deepseek_v4")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from hdflash_jax.config import get_preset  # noqa: E402
from hdflash_jax.dspark.config import DSparkConfig  # noqa: E402
from hdflash_jax.dspark.model import (draft_hidden, extend_dspark_cache, init_dspark, init_dspark_cache,  # noqa: E402
                                      markov_draft, train_forward)
from ref_nemo import eager_nemo, nemo_config  # noqa: E402

V, D, R, BS = 512, 64, 16, 4
L, ANCHORS = 24, np.array([[3, 6, 11, 17], [1, 9, 10, 18]])  # batch 2; close anchors overlap
TOL, FAIL = 1e-5, 1e-2
# the identity point of mHC (see the module docstring); window 64 >= every context (NeMo's draft has no window)
TCFG = get_preset("tiny").replace(n_layers=3, compress_ratios=(0, 4, 8, 0), n_hash_layers=1, hc_mult=1, hc_eps=0.0,
                                  swiglu_limit=1e6, window_size=64)
DCFG = DSparkConfig(block_size=BS, noise_token_id=V - 1, target_layer_ids=(0, 2), markov_rank=R,
                    n_routed_experts=4, n_activated_experts=2)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


class _Args(types.SimpleNamespace):
    """NeMo's config builder reads recipe arguments by attribute and asks `"key" in args`."""

    def __contains__(self, key):
        return hasattr(self, key)


def _nemo_draft():
    from nemo_automodel.components.speculative.dspark.config import build_deepseek_v4_draft_config
    from nemo_automodel.components.speculative.dspark.draft_deepseek_v4 import DeepseekV4DSparkModel

    eager_nemo()
    args = _Args(num_draft_layers=DCFG.num_blocks, target_layer_ids=list(DCFG.target_layer_ids),
                 confidence_head_alpha=1.0, confidence_head_with_markov=True, markov_rank=R,
                 markov_head_type="vanilla", block_size=BS, mask_token_id=DCFG.noise_token_id,
                 num_anchors=ANCHORS.shape[1])
    cfg = build_deepseek_v4_draft_config(nemo_config(TCFG), args)
    torch.manual_seed(0)
    model = DeepseekV4DSparkModel(cfg).eval().to(torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # nothing at a symmetric default: norms, sinks, Markov rows all random
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "sinks" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif name == "confidence_head.proj.bias":
                p.zero_()  # the released V4 head has no bias
            elif name in ("embed_tokens.weight", "markov_head.markov_w1.weight"):
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p.shape[-1]))
    return model


def _ours_from(nemo, root):
    """Our drafter at mHC's identity point holding NeMo's weights: NeMo name → our tree path (written here) →
    the released layout's names (`mtp.<i>.*`, our DSpark key map) in an official V4 DSpark checkpoint with a
    random trunk → `convert/torch_to_flax.py` → `load_dspark`, the way a released DSpark drafter arrives."""
    import json

    from convert import torch_to_flax as t2f
    from hdflash_jax.safetensors_io import write_safetensors
    from hdflash_jax.families import family
    from hdflash_jax.dspark.keymap import tree_to_dspark_names
    from ref_nemo import official_weights

    d = init_dspark(DCFG, TCFG)
    t = {k: v.detach().numpy() for k, v in nemo.state_dict().items()}
    rng = np.random.default_rng(3)
    tree = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(d))}
    out = {"main_proj.weight": t["fc.weight"], "main_norm.weight": t["hidden_norm.weight"],
           "norm.weight": t["norm.weight"], "markov_head.markov_w1.weight": t["markov_head.markov_w1.weight"],
           "markov_head.markov_w2.weight": t["markov_head.markov_w2.weight"],
           "confidence_head.proj.weight": t["confidence_head.proj.weight"],
           "hc_head.fn": np.zeros_like(tree["hc_head.fn"]), "hc_head.base": np.full_like(tree["hc_head.base"], 40.0),
           "hc_head.scale": rng.standard_normal(tree["hc_head.scale"].shape)}
    attn = {"wq_a.weight": "wq_a.weight", "q_norm.weight": "q_norm.weight", "wq_b.weight": "wq_b.weight",
            "wkv.weight": "wkv.weight", "kv_norm.weight": "kv_norm.weight", "wo_a.weight": "wo_a.weight",
            "wo_b.weight": "wo_b.weight", "attn_sink": "sinks_param.weight"}
    for i in range(DCFG.num_blocks):
        ours, theirs = f"layers.{i}.", f"layers.{i}."
        out.update({ours + "attn." + k: t[theirs + "self_attn." + v] for k, v in attn.items()})
        out[ours + "attn_norm.weight"] = t[theirs + "input_layernorm.weight"]
        out[ours + "ffn_norm.weight"] = t[theirs + "post_attention_layernorm.weight"]
        for site in ("hc_attn", "hc_ffn"):
            base = rng.standard_normal(tree[ours + site + ".base"].shape)
            base[0], base[1] = 40.0, 0.0  # pre = 1, post = 1; the comb logit is free (1x1 Sinkhorn = 1)
            out.update({ours + site + ".fn": np.zeros_like(tree[ours + site + ".fn"]), ours + site + ".base": base,
                        ours + site + ".scale": rng.standard_normal(3)})
        for w, m in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            out[ours + f"ffn.shared_experts.{w}.weight"] = t[theirs + f"mlp.{m}.weight"]
        e = ours + "ffn.experts."
        out.update({e + "w1": rng.standard_normal(tree[e + "w1"].shape) / 8, e + "w3":
                    rng.standard_normal(tree[e + "w3"].shape) / 8, e + "w2": np.zeros_like(tree[e + "w2"]),
                    ours + "ffn.gate.weight": rng.standard_normal(tree[ours + "ffn.gate.weight"].shape),
                    ours + "ffn.gate.bias": rng.standard_normal(tree[ours + "ffn.gate.bias"].shape)})
    assert set(out) == set(tree), sorted(set(tree) ^ set(out))
    trunk_cfg = TCFG.replace(n_mtp_layers=0, compress_ratios=TCFG.compress_ratios[:TCFG.n_layers])
    off = official_weights(trunk_cfg, seed=9)
    for path, v in out.items():
        v = np.asarray(v, np.float32)
        names = tree_to_dspark_names(path, DCFG.num_blocks, v.shape[0] if ".experts." in path else None)
        off.update({n: np.ascontiguousarray(v[e]) for e, n in enumerate(names)} if len(names) > 1
                   else {names[0]: v})
    src = root / "official"
    src.mkdir()
    write_safetensors(src / "model.safetensors", off)
    (src / "config.json").write_text(json.dumps({**TCFG.to_dict(), "dtype": "fp8", **DCFG.to_checkpoint_dict()}))
    report = t2f.convert(src, root / "flax", dtype="fp32", progress=False, log=lambda *_: None)
    assert report["mtp_layout"] == "dspark"
    got_cfg, drafter = family("dspark").load(root / "flax" / "dspark", trunk_cfg)
    assert got_cfg == DCFG
    return drafter


@pytest.fixture(scope="module")
def nemo_case(tmp_path_factory):
    import nemo_automodel.components.speculative.dspark.draft_deepseek_v4 as dv4

    nemo = _nemo_draft()
    drafter = _ours_from(nemo, tmp_path_factory.mktemp("nemo_dspark"))
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, V - 1, (2, L))
    loss_mask = np.ones((2, L), bool)
    loss_mask[1, 20:] = False  # row 1: the last slots of the last block are unsupervised (eval mask cut)
    taps = [rng.standard_normal((2, L, 1, D)).astype(np.float32) for _ in DCFG.target_layer_ids]
    captured = {}
    backbone = nemo._forward_backbone

    def capture(**kw):
        captured["hidden"] = backbone(**kw)
        return captured["hidden"]

    orig = dv4.sample_anchor_positions
    dv4.sample_anchor_positions = lambda **kw: (torch.as_tensor(ANCHORS), torch.ones(ANCHORS.shape, dtype=torch.bool))
    nemo._forward_backbone = capture
    try:
        with torch.no_grad():
            feats = torch.cat([torch.as_tensor(s)[:, :, 0] for s in taps], -1)
            out = nemo(torch.as_tensor(tokens), feats, torch.as_tensor(loss_mask).float())
            hidden = captured["hidden"]
            base = nemo.compute_logits(hidden)
    finally:
        dv4.sample_anchor_positions = orig
    n = ANCHORS.shape[1]
    ref = {"logits": out.draft_logits.numpy(), "targets": out.target_ids.numpy(), "eval_mask": out.eval_mask.numpy(),
           "confidence": torch.sigmoid(out.confidence_pred).numpy(), "base": base.numpy().reshape(2, n, BS, V),
           "hidden": hidden.numpy().reshape(2, n, BS, D)}
    return nemo, drafter, tokens, loss_mask, taps, ref


def test_dspark_training_forward_matches_nemo(nemo_case):
    nemo, drafter, tokens, loss_mask, taps, ref = nemo_case
    embed = jnp.asarray(nemo.embed_tokens.weight.detach().numpy())
    head = jnp.asarray(nemo.lm_head.weight.detach().numpy())
    @nnx.jit
    def run(d, taps, tokens, loss_mask, nemo_hidden):
        out = train_forward(d, lambda i: embed[i], lambda x: jnp.einsum("...d,vd->...v", x, head), taps, tokens,
                            jnp.asarray(ANCHORS, jnp.int32), jnp.ones(ANCHORS.shape, bool), loss_mask)
        prev = jnp.concatenate([tokens[np.arange(2)[:, None], ANCHORS][..., None], out["targets"][..., :-1]], -1)
        conf = d.confidence(nemo_hidden.reshape(2, -1, D), prev.reshape(2, -1)).reshape(prev.shape)
        return out, conf

    with jax.default_matmul_precision("highest"):
        out, conf = run(drafter, [jnp.asarray(s) for s in taps], jnp.asarray(tokens), jnp.asarray(loss_mask),
                        jnp.asarray(ref["hidden"]))
    got = {k: np.asarray(v) for k, v in out.items() if v is not None}
    errs = {"Markov logits": _rel(got["logits"], ref["logits"]), "base logits": _rel(got["base"], ref["base"]),
            "confidence (NeMo's normed input)": _rel(conf, ref["confidence"])}
    neg = {"slot shifted by one": _rel(got["logits"][:, :, :-1], ref["logits"][:, :, 1:]),
           "confidence on the raw residual": _rel(got["confidence"], ref["confidence"])}
    print("\nDSpark vs NeMo V4 DSpark (training forward), max rel err: "
          + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()) + "; negative controls: "
          + ", ".join(f"{k} {v:.2e}" for k, v in neg.items()))
    assert all(v <= TOL for v in errs.values()), errs
    assert all(v > FAIL for v in neg.values()), neg
    np.testing.assert_array_equal(got["targets"], ref["targets"])  # slot j: token a+j+1 (DeepSpec's convention)
    np.testing.assert_array_equal(got["eval_mask"], ref["eval_mask"])
    assert not np.array_equal(got["targets"][:, :, 1:], ref["targets"][:, :, :-1])  # the shifted reading differs


def test_dspark_inference_block_and_markov_drafting_match_nemo(nemo_case):
    """Block n of NeMo's training pass = our inference draft with the context cut at the anchor (cache of the
    positions before a_n, then [anchor, noise...] at a_n..a_n+B-1); NeMo's sequential Markov sampler (T=0) on
    those base logits = ours."""
    nemo, drafter, tokens, _, taps, ref = nemo_case
    embed = jnp.asarray(nemo.embed_tokens.weight.detach().numpy())
    head = jnp.asarray(nemo.lm_head.weight.detach().numpy())
    n = 2  # the third anchor of each row: 11 and 10
    a = ANCHORS[:, n]
    anchor = jnp.asarray(tokens[np.arange(2), a], jnp.int32)

    @nnx.jit
    def run(d, taps, n_ctx, anchor):
        cache = extend_dspark_cache(d, d.pool(taps), n_ctx, init_dspark_cache(d, 2))
        x = draft_hidden(d, lambda i: embed[i], anchor, cache, BS)
        base = d.base_logits(lambda h: jnp.einsum("...d,vd->...v", h, head), x)
        keys = jax.random.split(jax.random.key(0), BS)
        drafts, logits, _ = markov_draft(d, base, anchor, lambda lg, k: (jnp.argmax(lg, -1).astype(jnp.int32), None),
                                         keys)
        return base, drafts, logits, base + d.markov_head.bias(anchor)[:, None]

    with jax.default_matmul_precision("highest"):
        base, drafts, logits, anchor_only = run(drafter, [jnp.asarray(s) for s in taps], jnp.asarray(a, jnp.int32),
                                                anchor)
    with torch.no_grad():
        ref_drafts, ref_logits = nemo.sample_draft_tokens(torch.as_tensor(np.array(base)),
                                                          first_prev_token_ids=torch.as_tensor(np.asarray(anchor)),
                                                          temperature=0.0)
    errs = {"base logits (cache path)": _rel(base, ref["base"][:, n]),
            "Markov drafting logits": _rel(logits, ref_logits.numpy())}
    neg = {"Markov on the anchor for every slot": _rel(anchor_only, ref_logits.numpy())}
    print("\nDSpark inference vs NeMo: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
          + "; negative control: " + ", ".join(f"{k} {v:.2e}" for k, v in neg.items()))
    assert all(v <= TOL for v in errs.values()), errs
    assert all(v > FAIL for v in neg.values()), neg
    np.testing.assert_array_equal(np.asarray(drafts), ref_drafts.numpy())


def test_stream_pooling_and_anchor_rule_match_nemo(nemo_case):
    """NeMo collapses a tapped V4 layer's hc_mult streams by their mean (target.py), as our `pool` does; an
    anchor is a candidate iff it and its first target are supervised, in both."""
    from nemo_automodel.components.speculative.dspark.common import build_anchor_candidate_mask
    from nemo_automodel.components.speculative.dspark.target import HFDSparkTargetModel

    rng = np.random.default_rng(0)
    streams = [rng.standard_normal((2, 7, 4, D)).astype(np.float32) for _ in DCFG.target_layer_ids]
    ref = torch.cat([HFDSparkTargetModel._collapse_hc_streams(None, torch.as_tensor(s)) for s in streams], -1)
    ours = nemo_case[1].pool([jnp.asarray(s) for s in streams])  # mean pooling reads no weights
    err = _rel(ours, ref.numpy())
    first_stream = np.concatenate([s[:, :, 0] for s in streams], -1)
    assert err <= 1e-6 and _rel(first_stream, ref.numpy()) > FAIL, err
    loss_mask = rng.random((3, 30)) < 0.6
    want = build_anchor_candidate_mask(seq_len=30, loss_mask=torch.as_tensor(loss_mask).float()).numpy()
    from hdflash_jax.dspark.model import sample_anchors

    anchors, keep = jax.jit(sample_anchors, static_argnums=2)(jax.random.key(1), jnp.asarray(loss_mask), 29)
    picked = np.zeros_like(want)
    for r in range(3):
        picked[r, np.asarray(anchors[r])[np.asarray(keep[r])]] = True
    np.testing.assert_array_equal(picked, want)  # all 29 candidates asked for: exactly the valid ones come back


# ---- speculators' DSparkDraftModel: the heads and the slot convention ----------------------------------------------

S_SPEC, ANCHORS_SPEC = 24, np.array([2, 7, 9, 15])


@pytest.fixture(scope="module")
def spec_case(tmp_path_factory):
    """speculators' DSpark (the DFlash export of a random project drafter as backbone, our DSpark heads' weights)
    run with both slot conventions, its internals captured; our DSpark training forward on the same tokens."""
    pytest.importorskip("speculators.models.dspark")
    import speculators.models.dflash.core as core
    import speculators.models.dspark.core as dcore

    from hdflash_jax.families import family
    from ref_speculators import fixed_anchors, speculators_model
    from test_drafter_export import D as DD, V as VV, random_drafter, tiny_cfg

    bcfg = tiny_cfg(hc_mult=1)
    root = tmp_path_factory.mktemp("spec_dspark")
    here = family("block").save(root / "here", random_drafter(bcfg, seed=6), bcfg)
    family("block").export("zlab", here, root / "zlab")
    tcfg = TCFG.replace(vocab_size=VV, dim=DD, hc_mult=4, hc_eps=1e-6, swiglu_limit=10.0, window_size=8)
    dcfg = DCFG.replace(block_size=bcfg.block_size, noise_token_id=bcfg.mask_token_id)
    ours = init_dspark(dcfg, tcfg, seed=4)
    rng = np.random.default_rng(8)
    ours.markov_head.markov_w1.weight[...] = jnp.asarray(rng.standard_normal((VV, R)), jnp.float32)
    ours.markov_head.markov_w2.weight[...] = jnp.asarray(rng.standard_normal((VV, R)) / np.sqrt(R), jnp.float32)
    ours.confidence_head.proj.weight[...] = jnp.asarray(rng.standard_normal((1, DD + R)) / np.sqrt(DD), jnp.float32)
    heads = {"markov_head.markov_w1.weight": np.asarray(ours.markov_head.markov_w1.weight[...]),
             "markov_head.markov_w2.weight": np.asarray(ours.markov_head.markov_w2.weight[...]),
             "confidence_head.proj.weight": np.asarray(ours.confidence_head.proj.weight[...]),
             "confidence_head.proj.bias": np.zeros((1,), np.float32)}  # the released V4 head has no bias
    embed = rng.standard_normal((VV, DD)).astype(np.float32)
    head = (rng.standard_normal((VV, DD)) / np.sqrt(DD)).astype(np.float32)
    vnorm = (1 + 0.1 * rng.standard_normal(DD)).astype(np.float32)
    tokens = rng.integers(0, VV - 1, (1, S_SPEC))
    feats = rng.standard_normal((1, S_SPEC, bcfg.n_feature_layers * DD)).astype(np.float32)
    last_hidden = rng.standard_normal((1, S_SPEC, DD)).astype(np.float32)
    n, bs = len(ANCHORS_SPEC), bcfg.block_size

    def run(sample_from_anchor):
        model = speculators_model(root / "zlab", embed, head, vnorm, cls_name="dspark", extra=heads,
                                  sample_from_anchor=sample_from_anchor, markov_rank=R)
        got = {}
        backbone, prev_emb = model._backbone_forward, model.markov_head.prev_embeddings

        def capture_backbone(*a, **kw):
            got["hidden"], got["base"], *_ = out = backbone(*a, **kw)
            return out

        def capture_prev(ids):
            got["prev"] = ids
            return prev_emb(ids)

        def capture_metrics(logits, targets, confidence_logits, loss_mask, *a, **kw):
            got.update(logits=logits, targets=targets, confidence=confidence_logits, loss_mask=loss_mask)
            return torch.zeros(()), {}

        model._backbone_forward, model.markov_head.prev_embeddings = capture_backbone, capture_prev
        metrics = dcore.compute_metrics
        dcore.compute_metrics = capture_metrics
        try:
            with fixed_anchors(core, ANCHORS_SPEC), torch.no_grad():
                model(torch.as_tensor(feats), torch.as_tensor(tokens), torch.ones(1, S_SPEC),
                      torch.as_tensor(last_hidden), torch.zeros(1, S_SPEC, dtype=torch.long), max_anchors=n)
                teacher = model.verifier_lm_head(model.verifier_norm(torch.as_tensor(last_hidden)))
        finally:
            dcore.compute_metrics = metrics
        out = {k: v.numpy() for k, v in got.items()}
        out["bias"] = (out["logits"] - out["base"]).reshape(1, n, bs, VV)
        out["teacher"] = teacher.numpy()
        return out

    taps = [jnp.asarray(rng.standard_normal((1, S_SPEC, tcfg.hc_mult, DD)), jnp.float32)
            for _ in dcfg.target_layer_ids]

    @nnx.jit
    def ours_forward(d, taps, tokens, embed, head):
        return train_forward(d, lambda i: embed[i], lambda x: jnp.einsum("...d,vd->...v", x, head), taps, tokens,
                             jnp.asarray(ANCHORS_SPEC[None], jnp.int32), jnp.ones((1, n), bool),
                             jnp.ones((1, S_SPEC), bool))

    with jax.default_matmul_precision("highest"):
        out = ours_forward(ours, taps, jnp.asarray(tokens), jnp.asarray(embed), jnp.asarray(head))
    return ours, {k: np.asarray(v) for k, v in out.items() if v is not None}, run(True), run(False)


def test_dspark_heads_and_slot_convention_match_speculators(spec_case):
    ours, out, ref, other = spec_case
    n, bs = out["targets"].shape[1:]
    positions = out["positions"].reshape(-1)  # our slot (n, j) approximates the target's distribution here
    with jax.default_matmul_precision("highest"):
        conf = np.asarray(ours.confidence(jnp.asarray(ref["hidden"]), jnp.asarray(ref["prev"]).reshape(1, -1)))
        conf_other = np.asarray(ours.confidence(jnp.asarray(ref["hidden"]), jnp.asarray(other["prev"]).reshape(1, -1)))
    ref_conf = torch.sigmoid(torch.as_tensor(ref["confidence"])).numpy()
    errs = {"Markov bias": _rel(out["logits"] - out["base"], ref["bias"]),
            "slot teachers": _rel(ref["teacher"][:, positions], ref["targets"]),
            "confidence": _rel(conf, ref_conf)}
    neg = {"Markov bias, sample_from_anchor=False": _rel(out["logits"] - out["base"], other["bias"]),
           "slot teachers, sample_from_anchor=False": _rel(ref["teacher"][:, positions], other["targets"]),
           "confidence, False's prev tokens": _rel(conf_other, ref_conf)}
    print("\nDSpark heads vs speculators DSparkDraftModel (sample_from_anchor=True), max rel err: "
          + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()) + "; negative controls: "
          + ", ".join(f"{k} {v:.2e}" for k, v in neg.items()))
    assert all(v <= TOL for v in errs.values()), errs
    assert all(v > FAIL for v in neg.values()), neg
    # every slot trained with True (DSpark drafts B tokens per block); False leaves the anchor slot out
    assert ref["loss_mask"].all() and not other["loss_mask"].reshape(n, bs)[:, 0].any()
