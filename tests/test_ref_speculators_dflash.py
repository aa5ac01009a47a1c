"""The vanilla DFlash drafter against speculators' DFlashDraftModel (vllm-project; the format vLLM's DFlash loads).

The project's drafter goes out through the block family's z-lab export (speculators and z-lab share tensor names)
into speculators' class; both run the training layout: N anchored blocks in one pass, block n at positions
a_n..a_n+B-1 seeing context keys k < a_n and its own block (speculators: `create_anchor_block_mask_mod`, ours:
`drafter.training.training_mask`). fp32; the logits of every slot must agree.

The block-slot convention is explicit in speculators (`sample_from_anchor`): False (DFlash's) = slot 0 is the anchor
and carries no loss, slot j predicts token a+j from the target's distribution at a+j-1; True (DSpark's) = slot j
predicts a+j+1 from the distribution at a+j, every slot trained. Our DFlash training
(`hdflash_jax.training.losses.block_labels` / `teacher_logits_for_blocks`) follows False; read with True, the same
checkpoint's targets are one slot off (the τ≈1 trap), which the negative control shows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("speculators.models.dflash")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from hdflash_jax.families import family  # noqa: E402
from hdflash_jax.drafter.model import block_token_ids  # noqa: E402
from hdflash_jax.drafter.training import TrainAttention, train_forward  # noqa: E402
from ref_speculators import fixed_anchors, speculators_model  # noqa: E402
from test_drafter_export import D, V, random_drafter, tiny_cfg  # noqa: E402

S, ANCHORS = 24, np.array([2, 7, 9, 15])  # two blocks overlap (anchors closer than B): masks by anchor, not block
TOL, FAIL = 1e-5, 1e-2


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    import speculators.models.dflash.core as core

    cfg = tiny_cfg(hc_mult=1)
    drafter = random_drafter(cfg, seed=2)
    root = tmp_path_factory.mktemp("spec_dflash")
    family("block").export("zlab", family("block").save(root / "here", drafter, drafter.cfg), root / "zlab")
    rng = np.random.default_rng(4)
    embed = rng.standard_normal((V, D)).astype(np.float32)
    head = (rng.standard_normal((V, D)) / np.sqrt(D)).astype(np.float32)
    vnorm = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    tokens = rng.integers(0, V - 1, (1, S))
    feats = rng.standard_normal((1, S, cfg.n_feature_layers, cfg.hc_mult, D)).astype(np.float32)
    last_hidden = rng.standard_normal((1, S, D)).astype(np.float32)  # the target's last hidden (its teacher)

    def run(sample_from_anchor: bool):
        model = speculators_model(root / "zlab", embed, head, vnorm, sample_from_anchor=sample_from_anchor)
        with fixed_anchors(core, ANCHORS), torch.no_grad():
            hidden, logits, targets, loss_mask, idx = model._backbone_forward(
                torch.as_tensor(feats.reshape(1, S, -1)), torch.as_tensor(tokens), torch.ones(1, S),
                torch.as_tensor(last_hidden), torch.zeros(1, S, dtype=torch.long), max_anchors=len(ANCHORS))
            teacher = model.verifier_lm_head(model.verifier_norm(torch.as_tensor(last_hidden)))  # [1, S, V]
        n, bs = len(ANCHORS), cfg.block_size
        return (logits.numpy().reshape(1, n, bs, V), targets.numpy().reshape(1, n, bs, V),
                loss_mask.numpy().reshape(1, n, bs).astype(bool), teacher.numpy())

    anchors = jnp.asarray(ANCHORS[None], jnp.int32)
    blocks = block_token_ids(jnp.asarray(tokens)[:, ANCHORS], cfg.block_size, cfg.mask_token_id)
    # the training path (block-sparse attention; test_train_fits checks it against the dense reference path)
    fwd = nnx.jit(lambda d, e, h, f: train_forward(d, e, h, f, anchors, blocks, how=TrainAttention("block_sparse")))
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(fwd(drafter, jnp.asarray(embed), jnp.asarray(head), jnp.asarray(feats)))
    return cfg, tokens, ours, run(False), run(True)


def test_dflash_training_logits_match_speculators(case):
    cfg, _, ours, (ref, _, _, _), _ = case
    err = _rel(ours, ref)
    # negative control: the anchor's block read one slot later (slot j against the reference's slot j+1)
    neg = _rel(ours[:, :, :-1], ref[:, :, 1:])
    print(f"\nDFlash vs speculators DFlashDraftModel, max rel err: {err:.2e}; negative control (slot shifted) "
          f"{neg:.2e}")
    assert err <= TOL, err
    assert neg > FAIL, neg


def test_dflash_slot_convention_is_speculators_sample_from_anchor_false(case):
    """Our labels/teachers per slot against speculators' targets and loss mask, for both settings of the flag."""
    from hdflash_jax.training.losses import block_labels, teacher_logits_for_blocks

    cfg, tokens, _, (_, targets_f, mask_f, teacher), (_, targets_t, mask_t, _) = case
    bs, n = cfg.block_size, len(ANCHORS)
    anchors = jnp.asarray(ANCHORS[None], jnp.int32)
    ours_teacher = np.asarray(teacher_logits_for_blocks(jnp.asarray(teacher), anchors, bs - 1))  # slots 1..B-1
    _, valid = block_labels(jnp.asarray(tokens), jnp.ones((1, S), bool), anchors, jnp.ones((1, n), bool), bs)
    valid = np.asarray(valid)
    match = _rel(ours_teacher, targets_f[:, :, 1:])
    shifted = _rel(ours_teacher, targets_t[:, :, 1:])  # the same checkpoint read as DSpark-style
    print(f"\nDFlash slot convention: teachers vs speculators(sample_from_anchor=False) {match:.2e}, "
          f"vs speculators(sample_from_anchor=True) {shifted:.2e}")
    assert match <= TOL and shifted > FAIL
    np.testing.assert_array_equal(valid, mask_f)  # slot 0 never trained, the others all are here
    assert not np.array_equal(valid, mask_t)  # True trains slot 0 too
