"""Training that fits at scale, checked against the exact paths it replaces (fp32, tiny shapes):

* block-sparse training attention (blocked online softmax, own backward) == `concat_attend` under the dense
  `training_mask`: outputs and the gradients of q, k, v and the context K/V, dropped blocks and ragged tilings;
* the drafter's training forward with block-sparse attention and each remat policy == the dense one: loss and
  every parameter gradient;
* the vocabulary-chunked decayed CE + KL == `drafter_loss` on full logits (value, parts, gradient);
* the teacher from the gathered hidden states == the full target's logits at the KL slots;
* fp32 master params: the compute copy is the drafter's own dtype again;
* on an fsdp x expert x tensor mesh the training forward's blocks are sharded over expert, loss and gradients
  equal to one device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hdflash_jax.config import get_drafter_preset, get_preset
from hdflash_jax.drafter.model import block_token_ids, init_drafter, masked_attention
from hdflash_jax.drafter.sparse_attention import SparseLayout, block_sparse_attention
from hdflash_jax.drafter.training import TrainAttention, train_hidden, training_mask
from hdflash_jax.training.losses import LossConfig, decayed_ce_kl, drafter_loss, teacher_logits_for_blocks

TOL = 1e-5
ANCHORS = np.array([[0, 3, 5, 9, 12], [1, 2, 7, 8, 11]], np.int32)
KEEP = np.array([[1, 1, 1, 0, 1], [1, 1, 1, 1, 0]], bool)


def _maxdiff(a, b):
    return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("layout", [(2, 4), (5, 16), (3, 5)])  # (blocks per query chunk, keys per key chunk)
def test_block_sparse_attention_equals_dense(layout):
    rng = np.random.RandomState(0)
    b, n, bs, s, h, kv, d = 2, 5, 4, 13, 4, 2, 8
    q, k, v = (jnp.asarray(rng.randn(b, n * bs, hh, d), jnp.float32) for hh in (h, kv, kv))
    ck, cv = (jnp.asarray(rng.randn(b, s, kv, d), jnp.float32) for _ in range(2))
    scale = d ** -0.5
    w = jnp.asarray(rng.randn(b, n * bs, h, d), jnp.float32)
    mask = training_mask(ANCHORS, s, bs, KEEP)

    def dense(q, k, v, ck, cv):
        return masked_attention(q, jnp.concatenate([ck, k], 1), jnp.concatenate([cv, v], 1), mask, scale)

    def sparse(q, k, v, ck, cv):
        return block_sparse_attention(q, k, v, ck, cv, ANCHORS, KEEP, scale, SparseLayout(bs, *layout))

    args = (q, k, v, ck, cv)
    out_d, out_s = dense(*args), jax.jit(sparse)(*args)
    assert _maxdiff(out_d, out_s) < TOL
    dropped = np.repeat(~KEEP, bs, axis=1)
    assert float(jnp.abs(out_s[dropped]).max()) == 0.0  # a dropped block sees nothing
    grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * w), argnums=tuple(range(5))))(*args)
             for f in (dense, sparse)]
    assert _maxdiff(*grads) < TOL, [float(jnp.abs(x - y).max()) for x, y in zip(*grads)]
    assert float(jnp.abs(grads[1][3]).max()) > 0  # the context keys really get gradient
    # keys at or after every kept anchor of a row get none (they are never seen)
    last = max(a for a, kp in zip(ANCHORS[1], KEEP[1]) if kp)
    assert float(jnp.abs(grads[1][3][1, last:]).max()) == 0.0


def _drafter_setup():
    cfg = get_drafter_preset("tiny-hyperdflash", dtype="float32", param_dtype="float32")
    d = init_drafter(cfg, seed=1)
    rng = np.random.RandomState(2)
    s = 16
    feats = jnp.asarray(rng.randn(2, s, cfg.hc_mult, cfg.dim), jnp.float32)
    embed = jnp.asarray(rng.randn(cfg.vocab_size, cfg.dim) * 0.1, jnp.float32)
    head = jnp.asarray(rng.randn(cfg.vocab_size, cfg.dim) * 0.1, jnp.float32)
    tokens = rng.randint(0, cfg.vocab_size - 1, (2, s)).astype(np.int32)
    anchors = np.array([[0, 3, 5, 9, 12], [1, 2, 7, 8, 11]], np.int32)
    loss_mask = np.ones((2, s), bool)
    return cfg, d, feats, embed, head, tokens, anchors, loss_mask


@pytest.mark.parametrize("remat", ["none", "nothing", "attention"])
def test_training_step_loss_and_grads_equal_dense(remat):
    cfg, d, feats, embed, head, tokens, anchors, loss_mask = _drafter_setup()
    blocks = block_token_ids(jnp.take_along_axis(jnp.asarray(tokens), anchors, 1), cfg.block_size,
                             cfg.mask_token_id)
    graph, params = nnx.split(d, nnx.Param)
    lcfg = LossConfig(block_size=cfg.block_size, kl_alpha=0.0, vocab_chunk=0)

    def loss(params, how):
        hidden = train_hidden(nnx.merge(graph, params), embed, feats, anchors, blocks, KEEP, how)
        return decayed_ce_kl(hidden, head, tokens, loss_mask, anchors, KEEP, lcfg)[0]

    ref = jax.jit(jax.value_and_grad(lambda p: loss(p, TrainAttention(impl="dense"))))(params)
    how = TrainAttention(impl="block_sparse", q_blocks=2, k_chunk=4, remat=remat)
    got = jax.jit(jax.value_and_grad(lambda p: loss(p, how)))(params)
    assert abs(float(ref[0]) - float(got[0])) < TOL
    assert _maxdiff(ref[1], got[1]) < TOL
    assert float(jnp.abs(got[1]["layers"][0]["wk"]["weight"][...]).max()) > 0


def test_training_step_on_an_expert_mesh_equals_one_device_and_shards_the_blocks():
    """On a mesh with an `expert` axis (the drafter has no experts) the training forward's token activations are
    sharded over it and the block-sparse attention's query chunks run in groups over it: loss and every gradient
    equal the single-device ones."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from hdflash_jax.sharding import make_mesh, sequence_groups

    cfg, d, feats, embed, head, tokens, anchors, loss_mask = _drafter_setup()
    anchors, keep = anchors[:, :4], KEEP[:, :4]  # 4 blocks: 2 per expert shard
    blocks = block_token_ids(jnp.take_along_axis(jnp.asarray(tokens), anchors, 1), cfg.block_size,
                             cfg.mask_token_id)
    teacher = jnp.asarray(np.random.RandomState(3).randn(2, 4, 2, cfg.dim), jnp.float32)
    graph, params = nnx.split(d, nnx.Param)
    lcfg = LossConfig(block_size=cfg.block_size, kl_alpha=0.5, kl_slots=2, vocab_chunk=96)
    how = TrainAttention(impl="block_sparse", q_blocks=1, k_chunk=4)  # 4 query chunks: 2 groups of 2

    def step(params, feats, blocks):
        def loss(params):
            hidden = train_hidden(nnx.merge(graph, params), embed, feats, anchors, blocks, keep, how)
            return decayed_ce_kl(hidden, head, tokens, loss_mask, anchors, keep, lcfg, teacher)[0], hidden
        return jax.value_and_grad(loss, has_aux=True)(params)

    (ref, _), ref_g = jax.jit(step)(params, feats, blocks)
    mesh = make_mesh({"fsdp": 2, "expert": 2, "tensor": 2})
    rows = lambda x: jax.device_put(x, NamedSharding(mesh, P("fsdp")))
    with jax.set_mesh(mesh):
        assert sequence_groups(4, 2) == 2  # the grouped attention path runs (2 rows leave expert free)
        (got, hidden), got_g = jax.jit(step)(params, rows(feats), rows(blocks))
    assert abs(float(ref) - float(got)) < TOL
    assert _maxdiff(ref_g, got_g) < TOL
    # the hidden [b, N, B, D]: rows over fsdp and blocks over expert (not a copy per expert shard)
    assert tuple(hidden.sharding.spec)[:2] == ("fsdp", "expert"), hidden.sharding.spec
    assert hidden.addressable_shards[0].data.shape[:2] == (1, 2)


@pytest.mark.parametrize("chunk", [5, 16, 37])
def test_vocab_chunked_loss_equals_full_logits(chunk):
    rng = np.random.RandomState(0)
    b, s, n, bs, v, d, p = 2, 12, 3, 4, 37, 8, 2
    tokens = rng.randint(0, v, (b, s)).astype(np.int32)
    lm = np.zeros((b, s), bool)
    lm[:, 3:] = True
    lm[1, 9:] = False
    anchors = np.array([[3, 6, 10], [4, 5, 7]], np.int32)
    keep = np.array([[1, 1, 1], [1, 1, 0]], bool)
    hidden = jnp.asarray(rng.randn(b, n, bs, d), jnp.float32)
    head = jnp.asarray(rng.randn(v, d), jnp.float32)
    teacher = jnp.asarray(rng.randn(b, n, p, d), jnp.float32)
    cfg = LossConfig(block_size=bs, kl_alpha=0.5, kl_slots=p, kl_temperature=1.5, vocab_chunk=chunk)

    def full(h):  # the reference: full logits, then the existing loss
        logits = jnp.einsum("bnjd,vd->bnjv", h, head)
        return drafter_loss(logits, tokens, lm, anchors, keep, cfg, jnp.einsum("bnjd,vd->bnjv", teacher, head))

    (l0, p0), g0 = jax.value_and_grad(full, has_aux=True)(hidden)
    f = jax.jit(jax.value_and_grad(lambda h: decayed_ce_kl(h, head, tokens, lm, anchors, keep, cfg, teacher),
                                   has_aux=True))
    (l1, p1), g1 = f(hidden)
    assert float(p0["kl"]) > 0.1 and float(p0["ce"]) > 0.1
    for k in p0:
        np.testing.assert_allclose(np.asarray(p1[k]), np.asarray(p0[k]), rtol=TOL, atol=TOL, err_msg=k)
    assert abs(float(l1) - float(l0)) < TOL and _maxdiff(g0, g1) < TOL
    # the chunked pass never builds [b, N, B, V]: no array of that size in its jaxpr
    jaxpr = str(jax.make_jaxpr(lambda h: decayed_ce_kl(h, head, tokens, lm, anchors, keep, cfg, teacher))(hidden))
    if chunk < v:
        assert f"{b},{n},{bs},{v}]" not in jaxpr


def test_teacher_from_gathered_hidden_equals_full_logits():
    from hdflash_jax.deepseek_v4.model import forward_full, init_target
    from hdflash_jax.training.step import teacher_hidden_at_slots

    tcfg = get_preset("tiny").replace(n_layers=2, compress_ratios=(0, 4), n_mtp_layers=0, n_hash_layers=1)
    target = init_target(tcfg, seed=3)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, tcfg.vocab_size, (2, 16)), jnp.int32)
    anchors = jnp.asarray([[2, 5, 14], [0, 7, 15]], jnp.int32)
    out = forward_full(target, tokens)
    ref = teacher_logits_for_blocks(out.logits, anchors, 2)
    got = target.head_logits(teacher_hidden_at_slots(target, out.streams, anchors, 2))
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=1e-5)


def test_master_params_fp32_and_compute_copy():
    from hdflash_jax.training.pure import PureModule
    from train.trainer import master_params

    cfg = get_drafter_preset("tiny-hyperdflash", dtype="bfloat16", param_dtype="bfloat16")
    pure = PureModule(init_drafter(cfg, seed=0), params_only=True)
    own = pure.tree()
    master = master_params(own, "float32")
    assert jnp.dtype("bfloat16") in {x.dtype for x in jax.tree.leaves(own)}  # the layers (the gate is fp32)
    assert {x.dtype for x in jax.tree.leaves(master)} == {jnp.dtype("float32")}
    back = pure.in_own_dtypes(master)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, own)
    assert jax.tree.map(lambda x: x.dtype, back) == jax.tree.map(lambda x: x.dtype, own)


@pytest.mark.slow
def test_mesh_plan_train_program_and_overrides(tmp_path):
    """`python -m hdflash_jax.aot_plan --program train` compiles the real step on a mesh; `--train-override` /
    `--drafter-only` reach it (minutes: three compiles)."""
    from hdflash_jax.aot_plan.cli import plan_programs

    common = ["--program", "train", "--preset", "tiny", "--layers", "2", "--mesh", "fsdp=2,expert=2", "--batch", "2",
              "--seq", "64", "--anchors", "8", "--drafter", "tiny-hyperdflash"]
    new = plan_programs(common)[0]
    dense = plan_programs(["--train-override", "train.attention=dense", "--train-override",
                           "drafter.loss.vocab_chunk=0"] + common)[0]
    alone = plan_programs(["--drafter-only"] + common)[0]
    assert new.program == "train" and new.temp_bytes > 0 and new.active_flops > 0
    assert new.hlo_chars != dense.hlo_chars  # another program
    assert alone.flops < new.flops  # no target forward
