"""DSpark training: the many-blocks training pass equals the inference path block by block, the loss equals a
direct numpy computation of DeepSpec's formula, and a few optimizer steps on it lower it."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from hdflash_jax.config import get_preset
from hdflash_jax.deepseek_v4.model import forward_full, init_target
from hdflash_jax.dspark.config import DSparkConfig
from hdflash_jax.dspark.model import (draft_hidden, extend_dspark_cache, init_dspark_cache, init_dspark_from_target,
                                      sample_anchors, train_forward)
from hdflash_jax.training.dspark_loss import DSparkLossConfig, dspark_batch_loss, dspark_loss, dspark_target_inputs

MICRO = get_preset("tiny").replace(n_layers=3, compress_ratios=(0, 4, 8, 0), n_hash_layers=1)  # window 8
DCFG = DSparkConfig(block_size=4, noise_token_id=MICRO.vocab_size - 1, target_layer_ids=(1, 2), markov_rank=16,
                    n_routed_experts=4, n_activated_experts=2)
L = 24


@pytest.fixture(scope="module")
def setup():
    target = init_target(MICRO, seed=1)
    drafter = init_dspark_from_target(target, DCFG, seed=2)
    tokens = jnp.asarray(np.random.default_rng(0).integers(2, MICRO.vocab_size - 1, (2, L)), jnp.int32)
    out = nnx.jit(lambda t, x: forward_full(t, x, return_layers=DCFG.target_layer_ids))(target, tokens)
    return target, drafter, tokens, out


def test_training_pass_equals_inference_per_block(setup):
    target, drafter, tokens, out = setup
    anchors = jnp.array([[3, 9, 14, 21], [0, 5, 12, 20]], jnp.int32)  # 14, 20, 21: windows cut the context
    keep = jnp.ones(anchors.shape, bool)
    tr = nnx.jit(lambda d, t, s: train_forward(d, t.embed_tokens, t.head_logits, s, tokens, anchors, keep,
                                               jnp.ones(tokens.shape, bool)))(drafter, target, out.layer_streams)

    @nnx.jit
    def infer(d, t, streams, a):
        cache = extend_dspark_cache(d, d.pool(streams), a, init_dspark_cache(d, 2))
        x = draft_hidden(d, t.embed_tokens, jnp.take_along_axis(tokens, a[:, None], 1)[:, 0], cache,
                         DCFG.block_size)
        return d.base_logits(t.head_logits, x)

    worst = 0.0
    for n in range(anchors.shape[1]):
        base = np.asarray(infer(drafter, target, out.layer_streams, anchors[:, n]))
        worst = max(worst, float(np.abs(base - np.asarray(tr["base"][:, n])).max() / np.abs(base).max()))
    print(f"\ntraining pass vs inference path, base logits: relative error {worst:.2e}")
    assert worst <= 1e-5
    # slots past the sequence end are not supervised, and the mask is a prefix per block
    em = np.asarray(tr["eval_mask"])
    assert em[0, 3].tolist() == [True, True, False, False] and em[1, 3].tolist() == [True, True, True, False]
    assert np.all(np.diff(em.astype(int), axis=-1) <= 0)


def _numpy_loss(logits, targets, mask, target_logits, gamma, a_ce, a_tv):
    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    q, p = softmax(logits.astype(np.float64)), softmax(target_logits.astype(np.float64))
    w = mask * np.exp(-np.arange(mask.shape[-1]) / gamma)
    ce = -np.log(np.take_along_axis(q, targets[..., None], -1)[..., 0])
    l1 = np.abs(p - q).sum(-1)
    return a_ce * (ce * w).sum() / w.sum() + a_tv * (l1 * w).sum() / w.sum()


def test_loss_matches_numpy():
    rng = np.random.default_rng(4)
    shape = (2, 3, 4, 11)
    logits, tl = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    targets = rng.integers(0, 11, shape[:-1])
    mask = np.cumprod(rng.random(shape[:-1]) < 0.8, axis=-1).astype(bool)
    out = {"logits": jnp.asarray(logits), "targets": jnp.asarray(targets), "eval_mask": jnp.asarray(mask),
           "confidence": None}
    loss, metrics = dspark_loss(out, jnp.asarray(tl), DSparkLossConfig())
    want = _numpy_loss(logits, targets, mask, tl, 4.0, 0.1, 0.9)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert 1.0 <= float(metrics["tau_expected"]) <= 5.0


def test_blocks_running_past_the_sequence_end_keep_the_loss_finite(setup):
    """Anchors whose blocks reach past the last token (their tail slots unsupervised): loss, metrics and gradients
    finite, eagerly and under jit (an out-of-range gather of the target's logits fills NaN, and NaN · 0 = NaN)."""
    target, drafter, tokens, _ = setup
    batch = {"tokens": tokens, "loss_mask": jnp.ones(tokens.shape, bool), "keep": jnp.ones((2, 4), bool),
             "anchors": jnp.array([[3, 9, L - 3, L - 2], [0, 5, 12, L - 1]], jnp.int32)}
    inputs = dspark_target_inputs(target, tokens, batch["anchors"], DCFG.target_layer_ids, DCFG.block_size)
    graphdef, params, rest = nnx.split(drafter, nnx.Param, ...)

    def loss_fn(p):
        return dspark_batch_loss(nnx.merge(graphdef, p, rest), inputs, batch, DSparkLossConfig())

    _, metrics = loss_fn(params)
    assert all(np.isfinite(np.asarray(v)).all() for v in metrics.values()), metrics
    (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    assert np.isfinite(float(loss)) and all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


@pytest.mark.slow
def test_a_few_steps_lower_the_loss(setup):
    import optax

    target, drafter, tokens, _ = setup
    key = jax.random.key(0)
    loss_mask = jnp.ones(tokens.shape, bool)
    anchors, keep = sample_anchors(key, loss_mask, 6)
    assert bool(jnp.all(keep)) and bool(jnp.all(jnp.diff(anchors, axis=1) > 0))
    graphdef, params, rest = nnx.split(drafter, nnx.Param, ...)
    inputs = dspark_target_inputs(target, tokens, anchors, DCFG.target_layer_ids, DCFG.block_size)
    batch = {"tokens": tokens, "loss_mask": loss_mask, "anchors": anchors, "keep": keep}

    def loss_fn(p):
        return dspark_batch_loss(nnx.merge(graphdef, p, rest), inputs, batch, DSparkLossConfig())[0]

    opt = optax.adam(3e-3)
    state = opt.init(params)
    step = jax.jit(jax.value_and_grad(loss_fn))
    losses = []
    for _ in range(12):
        loss, g = step(params)
        upd, state = opt.update(g, state, params)
        params = optax.apply_updates(params, upd)
        losses.append(float(loss))
    print(f"\nDSpark loss over 12 Adam steps: {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < 0.9 * losses[0]


def test_drafter_trainer_runs_dspark_and_exports_a_loadable_checkpoint(tmp_path):
    """`drafter.kind: dspark` through the drafter trainer (train.drafter.run): DeepSpec's loss falls over the run, the
    export is a DSpark checkpoint eval.run loads, and its params are the trained state's."""
    import json

    from hdflash_jax.checkpoint import save_params
    from hdflash_jax.families import family
    from train.drafter import load_config, load_run_params, run

    target = nnx.jit(lambda: init_target(MICRO, seed=1))()
    save_params(tmp_path / "target", target, MICRO)
    rng = np.random.default_rng(0)
    with open(tmp_path / "train.jsonl", "w") as f:
        for _ in range(32):  # a learnable language: responses repeat a short motif
            motif = "".join(rng.choice(list("abcd"), 3))
            f.write(json.dumps({"prompt": "q " + motif, "response": motif * 6}) + "\n")
    cfg = load_config(data={
        "out_dir": str(tmp_path / "run"), "target": {"checkpoint": str(tmp_path / "target")},
        "drafter": {"kind": "dspark", "target_layer_ids": [1, 2], "n_blocks": 1, "markov_rank": 8,
                    "n_routed_experts": 4, "n_activated_experts": 2, "block_size": 3},
        "data": {"train": str(tmp_path / "train.jsonl"), "max_len": 32, "num_anchors": 4},
        "train": {"global_batch": 4, "steps": 16},
        "optim": {"lr": 1e-2, "warmup_frac": 0.0, "end_lr_frac": 1.0},
        "checkpoint": {"every": 16}, "eval": {"every": 0, "at_start": False},
        "log": {"every": 1, "progress": False, "tensorboard": False}})
    from hdflash_jax.sharding import make_mesh

    summary = run(cfg, make_mesh({"data": 1}, jax.devices()[:1]))
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    print(f"\nDSpark through the drafter trainer: loss {np.mean(losses[:3]):.4f} -> {np.mean(losses[-3:]):.4f}")
    assert summary["steps"] == 16 and len(recs[-1]["acc"]) == 3
    assert np.mean(losses[-3:]) < 0.95 * np.mean(losses[:3])  # a random target: the TV term falls slowly
    dcfg, drafter = family("dspark").load(tmp_path / "run" / "drafter", MICRO)
    assert dcfg.block_size == 3 and dcfg.target_layer_ids == (1, 2) and dcfg.noise_token_id == MICRO.vocab_size - 1
    _, params = load_run_params(tmp_path / "run")
    exported = nnx.to_flat_state(nnx.state(drafter, nnx.Param))
    trained = {tuple(map(str, k)): v for k, v in nnx.traversals.flatten_mapping(params).items()}
    assert len(trained) == len(exported)
    for path, var in exported:
        want = np.asarray(trained[tuple(map(str, path))]).astype(var[...].dtype)
        np.testing.assert_array_equal(np.asarray(var[...]), want)


@pytest.mark.parametrize("data, message", [
    ({"drafter": {"kind": "medusa"}}, "drafter.kind: unknown 'medusa'; one of block, dflash2, dspark"),
    ({"drafter": {"kind": "dspark", "reducer": "gated"}},
     "drafter.reducer: unknown key (known: kind, init_from_target, block_size, noise_token_id, target_layer_ids, "
     "markov_rank, n_routed_experts, n_activated_experts, n_blocks, pooling, confidence_head, loss)"),
    ({"drafter": {"kind": "dspark", "preset": "tiny-hyperdflash"}}, "drafter.preset: unknown key (known: kind, "
     "init_from_target, block_size, noise_token_id, target_layer_ids, markov_rank, n_routed_experts, "
     "n_activated_experts, n_blocks, pooling, confidence_head, loss)"),
    ({"drafter": {"kind": "dspark", "loss": {"tv_weight": -1}}}, "drafter.loss.tv_weight: must be >= 0, got -1.0"),
])
def test_dspark_training_config_errors_name_the_key(data, message):
    from hdflash_jax.typed_config import ConfigError
    from train.drafter import load_config

    with pytest.raises(ConfigError) as e:
        load_config(data=data)
    assert str(e.value) == message
