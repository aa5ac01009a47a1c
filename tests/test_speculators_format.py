"""The speculators format (hdflash_jax.formats.speculators: the DFlash checkpoint vLLM's speculative decoding loads):
an export loads strictly into speculators' own `DFlashDraftModel` and gives our logits on four anchored blocks (four
decode steps' drafts), round trips are bit-identical (one stream; several streams whose fc blocks are tied), a
folder written by speculators itself imports and speculates losslessly in eval.run, and what the format cannot hold
is refused in one line. Negative controls: the slot convention read the other way, the layer ids read without the
+1 shift, a multi-stream fc with untied blocks."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("speculators")
import torch  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from convert import drafter_export as cli  # noqa: E402
from hdflash_jax.drafter.model import block_token_ids  # noqa: E402
from hdflash_jax.drafter.training import TrainAttention, train_forward  # noqa: E402
from hdflash_jax.families import family  # noqa: E402
from hdflash_jax.formats.zlab import ExportError  # noqa: E402
from ref_speculators import fixed_anchors  # noqa: E402
from test_drafter_export import D, V, flat_numpy, random_drafter, tiny_cfg  # noqa: E402

S, ANCHORS = 24, np.array([2, 7, 9, 15])
TOL, FAIL = 1e-5, 1e-2
BLOCK = family("block")
VERIFIER_OWNED = {"embed_tokens.weight", "lm_head.weight", "verifier_lm_head.weight", "verifier_norm.weight"}


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _load_there(folder, embed, head, vnorm):
    """speculators' class from the folder, as vLLM's loader would build it: strict but for the verifier's tensors."""
    from speculators.models.dflash import DFlashDraftModel

    model, info = DFlashDraftModel.from_pretrained(str(folder), output_loading_info=True)
    assert not info["unexpected_keys"] and set(info["missing_keys"]) <= VERIFIER_OWNED, info
    model = model.eval().to(torch.float32)
    model.config.transformer_layer_config._attn_implementation = "eager"
    model._attn_impl, model._create_mask_fn = "eager", __import__(
        "speculators.models.dflash.core", fromlist=["create_float_mask"]).create_float_mask
    with torch.no_grad():
        for name, value in (("embed_tokens", embed), ("lm_head", head), ("verifier_lm_head", head),
                            ("verifier_norm", vnorm)):
            getattr(model, name).weight.copy_(torch.as_tensor(value))
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cfg = tiny_cfg(hc_mult=1)
    drafter = random_drafter(cfg, seed=5)
    root = tmp_path_factory.mktemp("spec")
    src = BLOCK.save(root / "here", drafter, cfg)
    summary = BLOCK.export("speculators", src, root / "spec")
    return cfg, drafter, src, root / "spec", summary


def test_export_loads_strictly_into_speculators_and_gives_our_logits(exported):
    import speculators.models.dflash.core as core

    cfg, drafter, _, folder, summary = exported
    conf = json.loads((folder / "config.json").read_text())
    assert conf["speculators_model_type"] == "dflash" and conf["sample_from_anchor"] is False
    assert conf["aux_hidden_state_layer_ids"] == [i + 1 for i in cfg.layer_ids] == summary["aux_hidden_state_layer_ids"]
    rng = np.random.default_rng(8)
    embed = rng.standard_normal((V, D)).astype(np.float32)
    head = (rng.standard_normal((V, D)) / np.sqrt(D)).astype(np.float32)
    vnorm = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    tokens = rng.integers(0, V - 1, (1, S))
    feats = rng.standard_normal((1, S, cfg.n_feature_layers, 1, D)).astype(np.float32)
    model = _load_there(folder, embed, head, vnorm)
    with fixed_anchors(core, ANCHORS), torch.no_grad():
        _, theirs, *_ = model._backbone_forward(
            torch.as_tensor(feats.reshape(1, S, -1)), torch.as_tensor(tokens), torch.ones(1, S),
            torch.as_tensor(rng.standard_normal((1, S, D)).astype(np.float32)), torch.zeros(1, S, dtype=torch.long),
            max_anchors=len(ANCHORS))
    theirs = theirs.numpy().reshape(1, len(ANCHORS), cfg.block_size, V)
    anchors = jnp.asarray(ANCHORS[None], jnp.int32)
    blocks = block_token_ids(jnp.asarray(tokens)[:, ANCHORS], cfg.block_size, cfg.mask_token_id)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(nnx.jit(lambda d: train_forward(d, jnp.asarray(embed), jnp.asarray(head), jnp.asarray(feats),
                                                          anchors, blocks, how=TrainAttention("dense")))(drafter))
    err, shifted = _rel(ours, theirs), _rel(ours[:, :, :-1], theirs[:, :, 1:])
    print(f"\nspeculators export, logits of 4 anchored blocks: max rel err {err:.2e}; "
          f"slot-shifted control {shifted:.2e}")
    assert err <= TOL and shifted > FAIL


def test_round_trip_is_bit_identical_and_the_layer_ids_are_shifted_by_one(exported, tmp_path):
    cfg, drafter, src, folder, _ = exported
    tcfg = _target_for(cfg)
    BLOCK.import_folder("speculators", folder, tmp_path / "back", target_cfg=tcfg)
    cfg2, back = BLOCK.load(tmp_path / "back", tcfg)
    assert cfg2 == cfg
    a, b = flat_numpy(drafter), flat_numpy(back)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # negative control: the ids read as 0-based layers (no -1) tap other layers
    bad = tmp_path / "noshift"
    import shutil

    shutil.copytree(folder, bad)
    c = json.loads((bad / "config.json").read_text())
    c["aux_hidden_state_layer_ids"] = [i - 1 for i in c["aux_hidden_state_layer_ids"]]
    (bad / "config.json").write_text(json.dumps(c))
    BLOCK.import_folder("speculators", bad, tmp_path / "wrong", target_cfg=tcfg)
    assert BLOCK.load_config(tmp_path / "wrong").layer_ids != cfg.layer_ids


def _target_for(cfg):
    from hdflash_jax.config import get_preset

    return get_preset("tiny", dim=cfg.dim, hc_mult=cfg.hc_mult, vocab_size=cfg.vocab_size, n_layers=cfg.target_n_layers,
                      compress_ratios=(0,) * (cfg.target_n_layers + 1))


def test_several_streams_export_as_the_stream_mean_only_when_tied(tmp_path):
    cfg = tiny_cfg(hc_mult=4)
    drafter = random_drafter(cfg, seed=3)
    untied = BLOCK.save(tmp_path / "untied", drafter, cfg)
    with pytest.raises(ExportError, match="reads each of the 4 streams of a tapped layer with its own weights"):
        BLOCK.export("speculators", untied, tmp_path / "no")
    assert not (tmp_path / "no").exists()
    fc = drafter.reducer.fc.weight[...]  # [D, K·n·D] (out, in): tie each tapped layer's 4 stream blocks
    blocks = fc.reshape(D, cfg.n_feature_layers, 4, D)
    drafter.reducer.fc.weight[...] = jnp.broadcast_to(blocks[:, :, :1], blocks.shape).reshape(fc.shape)
    tied = BLOCK.save(tmp_path / "tied", drafter, cfg)
    summary = BLOCK.export("speculators", tied, tmp_path / "spec")
    assert "stream mean" in summary["notes"][0]
    from safetensors.numpy import load_file

    assert load_file(str(tmp_path / "spec" / "model.safetensors"))["fc.weight"].shape == (D, cfg.n_feature_layers * D)
    tcfg = _target_for(cfg)
    BLOCK.import_folder("speculators", tmp_path / "spec", tmp_path / "back", target_cfg=tcfg)
    cfg2, back = BLOCK.load(tmp_path / "back", tcfg)
    assert cfg2 == cfg
    a, b = flat_numpy(drafter), flat_numpy(back)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_what_the_format_cannot_hold_is_refused_in_one_line(tmp_path, exported, capsys):
    hyper = tiny_cfg(hc_mult=1, conditioning="final_streams", target_layer_ids=None, reducer="gated", post_norm=True)
    src = BLOCK.save(tmp_path / "hd", random_drafter(hyper), hyper)
    assert cli.main(["--to", "speculators", "--src", str(src), "--dst", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "HyperDFlash's gate has no place there" in err and not (tmp_path / "x").exists()
    _, _, _, folder, _ = exported
    import shutil

    shutil.copytree(folder, tmp_path / "anchor")
    c = json.loads((tmp_path / "anchor" / "config.json").read_text())
    c["sample_from_anchor"] = True
    (tmp_path / "anchor" / "config.json").write_text(json.dumps(c))
    assert cli.main(["--to", "here", "--src", str(tmp_path / "anchor"), "--dst", str(tmp_path / "y"),
                     "--target", "tiny"]) == 2
    assert "sample_from_anchor=true" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_a_folder_speculators_wrote_imports_and_speculates_losslessly_in_eval_run(tmp_path, capsys):
    """DFlashDraftModel.save_pretrained (speculators' own writer; fc on the stream mean, as vLLM feeds DeepSeek-V4)
    → import → eval.run on the tiny target: greedy speculative output equals AR (eval.run exits 3 otherwise)."""
    import eval.run as ev
    from transformers import Qwen3Config

    from hdflash_jax.config import get_preset
    from speculators import SpeculatorsConfig, VerifierConfig
    from speculators.models.dflash import DFlashDraftModel, DFlashSpeculatorConfig
    from speculators.proposals import GreedyTokenProposalConfig

    t = get_preset("tiny")
    torch.manual_seed(0)
    tl = Qwen3Config(vocab_size=t.vocab_size, hidden_size=t.dim, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=t.norm_eps)
    tl._attn_implementation = "eager"
    spec = SpeculatorsConfig(algorithm="dflash", proposal_methods=[GreedyTokenProposalConfig(speculative_tokens=3)],
                             default_proposal_method="greedy", verifier=VerifierConfig(name_or_path=None,
                                                                                       architectures=[]))
    DFlashDraftModel(DFlashSpeculatorConfig(transformer_layer_config=tl, draft_vocab_size=t.vocab_size, block_size=4,
                                            aux_hidden_state_layer_ids=[2, 4], mask_token_id=t.vocab_size - 1,
                                            speculators_config=spec)).save_pretrained(str(tmp_path / "theirs"))
    assert cli.main(["--to", "here", "--src", str(tmp_path / "theirs"), "--dst", str(tmp_path / "imp"),
                     "--target", "tiny"]) == 0
    cfg = BLOCK.load_config(tmp_path / "imp")
    assert (cfg.layer_ids, cfg.hc_mult, cfg.block_size) == ((1, 3), t.hc_mult, 4)
    prev = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        rc = ev.main(["--target", "tiny-random", "--suite", "gsm8k", "--method", "dflash", "--drafter",
                      f"dflash={tmp_path / 'imp'}", "--limit", "1", "--max-new-tokens", "8", "--prompt-buckets",
                      "512", "--quiet", "--out", str(tmp_path / "eval")])
    finally:
        jax.config.update("jax_disable_most_optimizations", prev)
    assert rc == 0, capsys.readouterr().err
    r = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert r["suites"]["gsm8k"]["dflash"]["greedy_match_ar"] is True
