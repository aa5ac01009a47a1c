"""DFlash 2 against the references: speculators' `DFlash2DraftModel` (the format vLLM's DFlash 2 loads) and z-lab's
`CandidateSelector.select` (the sequential proposal of `dflash_generate`).

The project's drafter (tapped layers + linear compressor, convolutions and selector all random, hc_mult = 1 so that
speculators' fc reads the same features) goes out through the DFlash 2 family's speculators export into speculators'
class, which must take every tensor. Both then run the training layout (N anchored blocks in one pass, two of them
overlapping): the unary logits of every slot, the selector's scores of the unary top-K with the teacher-forced
predecessor, and the selector's per-slot cross-entropy after the label is put into the candidates must agree.
The sequential proposal (slot j's predecessor is the token chosen at j − 1) is compared with z-lab's `select` on the
same hidden states and logits, greedy and at T = 1 (its q over the K candidates). Negative controls: the predecessor
one slot off (training), the anchor as every slot's predecessor (proposal).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

pytest.importorskip("speculators.models.dflash2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from hdflash_jax.drafter.dflash2 import DFlash2Config, select_drafts  # noqa: E402
from hdflash_jax.drafter.model import block_token_ids  # noqa: E402
from hdflash_jax.drafter.training import TrainAttention, train_hidden  # noqa: E402
from hdflash_jax.families import family  # noqa: E402
from hdflash_jax.training.dflash2_loss import training_candidates  # noqa: E402
from ref_speculators import fixed_anchors, load_weights  # noqa: E402
from test_dflash2 import randomize_convs  # noqa: E402
from test_drafter_export import D, V, random_drafter, tiny_cfg  # noqa: E402

S, ANCHORS = 24, np.array([2, 7, 9, 15])  # two blocks overlap: masks by anchor
TOL, FAIL = 1e-5, 1e-2
TOP_K, RANK = 6, 8


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def dflash2_cfg(**kw) -> DFlash2Config:
    base = dataclasses.asdict(tiny_cfg(hc_mult=1))
    return DFlash2Config(**{**base, "conv_kernel_size": 3, "conv_group_size": 8, "selector_rank": RANK,
                            "selector_top_k": TOP_K, **kw})


def random_dflash2(cfg: DFlash2Config, seed: int = 0):
    """Every parameter random, the convolutions' taps and projections included (identity convolutions would hide a
    wrong tap order, group layout or side)."""
    from hdflash_jax.drafter.dflash2 import DFlash2Drafter
    from hdflash_jax.drafter.model import init_drafter

    base = random_drafter(cfg, seed)  # norms random
    d = init_drafter(cfg, seed, DFlash2Drafter)
    nnx.update(d, nnx.state(base))
    randomize_convs(d, seed + 7, scale=0.1)
    rng = np.random.default_rng(seed + 7)
    sel = d.selector
    for p in (sel.predecessor_codebook, sel.successor_codebook):
        p[...] = jnp.asarray(0.7 * rng.standard_normal(p[...].shape), jnp.float32)
    return d


def speculators_dflash2(folder, embed, head, vnorm):
    """speculators' DFlash2DraftModel from an export folder; every exported tensor taken, only the verifier's own
    tensors left."""
    from safetensors.torch import load_file
    from transformers import Qwen3Config

    from speculators.config import SpeculatorsConfig, VerifierConfig
    from speculators.models.dflash2 import DFlash2DraftModel, DFlash2SpeculatorConfig
    from speculators.proposals.greedy import GreedyTokenProposalConfig

    raw = json.loads((folder / "config.json").read_text())
    tl = Qwen3Config(**raw["transformer_layer_config"])
    tl._attn_implementation = "eager"
    spec = SpeculatorsConfig(algorithm="dflash2", default_proposal_method="greedy",
                             proposal_methods=[GreedyTokenProposalConfig(speculative_tokens=raw["block_size"] - 1)],
                             verifier=VerifierConfig(name_or_path=None, architectures=[]))
    cfg = DFlash2SpeculatorConfig(
        transformer_layer_config=tl, draft_vocab_size=raw["draft_vocab_size"], block_size=raw["block_size"],
        aux_hidden_state_layer_ids=raw["aux_hidden_state_layer_ids"], mask_token_id=raw["mask_token_id"],
        sample_from_anchor=raw["sample_from_anchor"], speculators_config=spec,
        **{k: raw[k] for k in ("conv_kernel_size", "conv_group_size", "selector_rank", "selector_top_k")})
    model = DFlash2DraftModel(cfg).eval().to(torch.float32)
    return load_weights(model, load_file(str(folder / "model.safetensors")), embed, head, vnorm)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    import speculators.models.dflash.core as core

    cfg = dflash2_cfg()
    drafter = random_dflash2(cfg, seed=3)
    fam = family("dflash2")
    root = tmp_path_factory.mktemp("spec_dflash2")
    summary = fam.export("speculators", fam.save(root / "here", drafter, cfg), root / "spec")
    rng = np.random.default_rng(5)
    embed = rng.standard_normal((V, D)).astype(np.float32)
    head = (rng.standard_normal((V, D)) / np.sqrt(D) * 4).astype(np.float32)
    vnorm = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    tokens = rng.integers(0, V - 1, (1, S))
    feats = rng.standard_normal((1, S, cfg.n_feature_layers, 1, D)).astype(np.float32)
    last_hidden = rng.standard_normal((1, S, D)).astype(np.float32)
    model = speculators_dflash2(root / "spec", embed, head, vnorm)
    n, bs = len(ANCHORS), cfg.block_size
    with fixed_anchors(core, ANCHORS), torch.no_grad():
        hidden, logits, targets, loss_mask, idx = model._backbone_forward(
            torch.as_tensor(feats.reshape(1, S, -1)), torch.as_tensor(tokens), torch.ones(1, S),
            torch.as_tensor(last_hidden), torch.zeros(1, S, dtype=torch.long), max_anchors=n)
        prev = model._predecessor_ids(torch.as_tensor(tokens), idx)  # [N, B]
        cand = logits.topk(TOP_K, dim=-1).indices
        scores = model.candidate_selector.score_candidates(logits, hidden, prev.reshape(1, -1), cand)
    ref = {"hidden": hidden.numpy().reshape(1, n, bs, D), "logits": logits.numpy().reshape(1, n, bs, V),
           "cand": cand.numpy().reshape(1, n, bs, TOP_K), "scores": scores.numpy().reshape(1, n, bs, TOP_K),
           "prev": prev.numpy().reshape(1, n, bs), "mask": loss_mask.numpy().reshape(1, n, bs)}

    anchors = jnp.asarray(ANCHORS[None], jnp.int32)
    blocks = block_token_ids(jnp.asarray(tokens)[:, ANCHORS], bs, cfg.mask_token_id)
    with jax.default_matmul_precision("highest"):
        ours_hidden = train_hidden(drafter, jnp.asarray(embed), jnp.asarray(feats), anchors, blocks,
                                   how=TrainAttention("block_sparse"))
        ours_logits = jnp.einsum("bnjd,vd->bnjv", ours_hidden, jnp.asarray(head))
    return dict(cfg=cfg, drafter=drafter, tokens=tokens, head=head, root=root, summary=summary, ref=ref, model=model,
                hidden=np.asarray(ours_hidden), logits=np.asarray(ours_logits))


def test_dflash2_training_logits_match_speculators(case):
    ref = case["ref"]
    err = _rel(case["logits"], ref["logits"])
    neg = _rel(case["logits"][:, :, :-1], ref["logits"][:, :, 1:])  # the block read one slot later
    print(f"\nDFlash 2 vs speculators DFlash2DraftModel: unary logits max rel err {err:.2e} (negative control, slot "
          f"shifted: {neg:.2e})")
    assert err <= TOL, err
    assert neg > FAIL, neg


def test_dflash2_selector_scores_match_speculators(case):
    """The scores of the reference's candidates (its unary top-K) with the teacher-forced predecessor x_{a+j−1}."""
    ref, drafter, tokens = case["ref"], case["drafter"], case["tokens"]
    cand = jnp.asarray(ref["cand"], jnp.int32)
    unary = jnp.take_along_axis(jnp.asarray(case["logits"]), cand, axis=-1)
    pos = ANCHORS[:, None] + np.arange(case["cfg"].block_size)
    prev = np.concatenate([tokens[0, pos[:, :1]], tokens[0, pos[:, :-1]]], axis=1)[None]  # slot 0: itself
    np.testing.assert_array_equal(prev, ref["prev"])  # our predecessor rule is speculators' (sample_from_anchor false)
    hidden = jnp.asarray(case["hidden"])
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(drafter.selector.scores(unary, hidden, jnp.asarray(prev), cand))
        shifted = np.asarray(drafter.selector.scores(unary, hidden, jnp.asarray(np.roll(prev, 1, axis=-1)), cand))
    valid = ref["mask"].astype(bool)
    err, neg = _rel(ours[valid], ref["scores"][valid]), _rel(shifted[valid], ref["scores"][valid])
    same_top = np.mean(np.asarray(jax.lax.top_k(jnp.asarray(case["logits"]), TOP_K)[1]) == ref["cand"])
    print(f"\nselector scores vs speculators: max rel err {err:.2e} (negative control, predecessor one slot off: "
          f"{neg:.2e}); unary top-{TOP_K} ids equal: {same_top:.3f}")
    assert err <= TOL, err
    assert neg > FAIL, neg
    assert same_top == 1.0


def test_dflash2_selector_loss_matches_speculators(case):
    """The per-slot selector cross-entropy after the label is put into the candidates (speculators'
    `selector_training_candidates` + `_candidate_cross_entropy`) equals ours (`training_candidates`); labels =
    the reference's hard targets, so about half the slots need the injection."""
    from speculators.models.dflash2.metrics import _candidate_cross_entropy, selector_training_candidates

    ref, drafter = case["ref"], case["drafter"]
    rng = np.random.default_rng(11)
    labels = np.where(rng.random(ref["cand"].shape[:-1]) < 0.5, ref["cand"][..., 2],
                      rng.integers(0, V - 1, ref["cand"].shape[:-1]))  # in the top-K or (mostly) not
    t_cand, t_where, t_has = selector_training_candidates(torch.as_tensor(ref["cand"]), torch.as_tensor(labels))
    ours_cand, ours_where, ours_has = training_candidates(jnp.asarray(ref["cand"]), jnp.asarray(labels))
    np.testing.assert_array_equal(np.asarray(ours_cand), t_cand.numpy())
    np.testing.assert_array_equal(np.asarray(ours_where), t_where.numpy())
    np.testing.assert_array_equal(np.asarray(ours_has), t_has.numpy())
    with torch.no_grad():
        t_scores = case["model"].candidate_selector.score_candidates(
            torch.as_tensor(ref["logits"].reshape(1, -1, V)), torch.as_tensor(ref["hidden"].reshape(1, -1, D)),
            torch.as_tensor(ref["prev"].reshape(1, -1)), t_cand.reshape(1, -1, TOP_K))
        t_ce = _candidate_cross_entropy(t_scores, t_where.reshape(1, -1)).numpy().reshape(labels.shape)
    unary = jnp.take_along_axis(jnp.asarray(case["logits"]), ours_cand, axis=-1)
    with jax.default_matmul_precision("highest"):
        s = drafter.selector.scores(unary, jnp.asarray(case["hidden"]), jnp.asarray(ref["prev"]), ours_cand)
    ce = np.asarray(jax.nn.logsumexp(s, -1) - jnp.take_along_axis(s, ours_where[..., None], -1)[..., 0])
    valid = ref["mask"].astype(bool)
    err = _rel(ce[valid], t_ce[valid])
    print(f"\nselector CE vs speculators: max rel err {err:.2e}; {np.mean(~np.asarray(ours_has)):.2f} of the slots "
          "had the label injected")
    assert err <= TOL, err
    assert 0.2 < np.mean(~np.asarray(ours_has)) < 0.8


def _zlab_selector(drafter, cfg):
    """z-lab's CandidateSelector (dflash==0.1.0) holding our selector's weights."""
    from transformers import Qwen3Config

    from dflash.model import CandidateSelector

    c = Qwen3Config(vocab_size=cfg.vocab_size, hidden_size=cfg.dim)
    c.dflash_config = {"selector_rank": cfg.selector_rank, "selector_top_k": cfg.selector_top_k}
    sel = CandidateSelector(c).eval()
    with torch.no_grad():
        sel.predecessor_codebook.weight.copy_(torch.tensor(np.array(drafter.selector.predecessor_codebook[...])))
        sel.successor_codebook.weight.copy_(torch.tensor(np.array(drafter.selector.successor_codebook[...])))
        sel.hidden_projection.weight.copy_(torch.tensor(np.array(drafter.selector.hidden_projection.weight[...])))
    return sel


def test_dflash2_sequential_proposal_matches_zlab(case):
    """Greedy: the chosen tokens of every slot (each the next slot's predecessor) equal z-lab's `select` on the same
    hidden and logits, over 64 rows of random blocks; T = 1: z-lab's q over its K candidates equals ours at those
    candidates, given the same chosen path (ours fed z-lab's choices). Control: every slot conditioned on the anchor."""
    pytest.importorskip("dflash.model")
    from hdflash_jax.decode.drafters import choose_drafts

    cfg, drafter = case["cfg"], case["drafter"]
    rng = np.random.default_rng(21)
    b, k = 64, cfg.block_size - 1
    hidden = rng.standard_normal((b, k, D)).astype(np.float32)
    logits = (0.1 * hidden @ case["head"].T).astype(np.float32)  # unary margins the transitions can overturn
    anchor = rng.integers(0, V - 1, b)
    sel = _zlab_selector(drafter, cfg)
    with torch.no_grad():
        z_path, z_cand, _ = sel.select(torch.as_tensor(hidden), torch.as_tensor(logits), torch.as_tensor(anchor), 0.0)
    keys = jax.random.split(jax.random.key(0), k)
    greedy = lambda l, key: choose_drafts(l, key, False, 1.0)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        ours, _ = select_drafts(drafter.selector, jnp.asarray(logits), jnp.asarray(hidden), jnp.asarray(anchor),
                                greedy, keys)

        class AnchorOnly:  # the negative control: no chain, slot j scored with the anchor as its predecessor
            top_k = drafter.selector.top_k

            def scores(self, unary, hidden, prev, cand):
                return drafter.selector.scores(unary, hidden, jnp.asarray(anchor, jnp.int32), cand)
        bad, _ = select_drafts(AnchorOnly(), jnp.asarray(logits), jnp.asarray(hidden), jnp.asarray(anchor), greedy,
                               keys)
    same, same_bad = np.mean(np.asarray(ours) == z_path.numpy()), np.mean(np.asarray(bad) == z_path.numpy())
    # T = 1: z-lab samples; its q rows over the candidates of its own path
    torch.manual_seed(0)
    with torch.no_grad():
        t_path, t_cand, t_q = sel.select(torch.as_tensor(hidden), torch.as_tensor(logits), torch.as_tensor(anchor),
                                         1.0)
    chain = np.concatenate([anchor[:, None], t_path.numpy()[:, :-1]], axis=1)  # the predecessor of each slot
    cand = jnp.asarray(t_cand.numpy(), jnp.int32)
    with jax.default_matmul_precision("highest"):
        s = drafter.selector.scores(jnp.take_along_axis(jnp.asarray(logits), cand, -1), jnp.asarray(hidden),
                                    jnp.asarray(chain, jnp.int32), cand)
    q_err = float(np.abs(np.asarray(jax.nn.softmax(s, -1)) - t_q.numpy()).max())
    print(f"\nselector proposal vs z-lab select: greedy tokens equal {same:.3f} of {b}x{k} (control, anchor as every "
          f"predecessor: {same_bad:.3f}); T = 1 q over the K candidates max abs err {q_err:.2e}")
    assert same == 1.0
    assert same_bad < 0.9
    assert q_err < 1e-5


def test_dflash2_speculators_export_imports_back_exactly(case, tmp_path):
    """speculators folder → a DFlash 2 checkpoint: every parameter bit-identical to the exported drafter's."""
    from hdflash_jax.formats.zlab import flat_params

    fam = family("dflash2")
    fam.import_folder("speculators", case["root"] / "spec", tmp_path / "back",
                      target_cfg=_target_cfg(case["cfg"]))
    cfg, back = fam.load(tmp_path / "back")
    assert cfg == case["cfg"]
    a, b = flat_params(case["drafter"]), flat_params(back)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
    print(f"\nspeculators DFlash 2 round trip: {len(a)} tensors bit-identical; export summary {case['summary']}")


def _target_cfg(cfg):
    from hdflash_jax.config import PRESETS

    return PRESETS["tiny"].replace(dim=cfg.dim, hc_mult=cfg.hc_mult, vocab_size=cfg.vocab_size,
                                   n_layers=cfg.target_n_layers)


def test_dflash2_speculators_refuses_the_gate_and_foreign_tensors(case, tmp_path):
    """HyperDFlash-2 (the gate) has no place in speculators' fc: refused by name; a folder with a stray selector tensor
    is refused before anything is written."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from hdflash_jax.formats.zlab import ExportError

    fam = family("dflash2")
    gated = dflash2_cfg(conditioning="final_streams", reducer="gated", post_norm=True, target_layer_ids=None)
    from hdflash_jax.drafter.dflash2 import DFlash2Drafter
    from hdflash_jax.drafter.model import init_drafter

    src = fam.save(tmp_path / "gated", init_drafter(gated, 0, DFlash2Drafter), gated)
    with pytest.raises(ExportError, match="linear fc"):
        fam.export("speculators", src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    bad = tmp_path / "bad"
    shutil.copytree(case["root"] / "spec", bad)
    t = load_file(str(bad / "model.safetensors"))
    t["candidate_selector.extra_codebook"] = np.zeros((2, 2), np.float32)
    save_file(t, str(bad / "model.safetensors"))
    with pytest.raises(ExportError, match="extra_codebook"):
        fam.import_folder("speculators", bad, tmp_path / "back", target_cfg=_target_cfg(case["cfg"]))
    assert not (tmp_path / "back").exists()
