"""Offline features (`python -m train.drafter --capture-features`, `features.mode: offline`): the step on captured
features equals the step running the target, for HyperDFlash, DFlash and DSpark (loss and every gradient, with
negative controls: features shifted by one position, features of another target; DFlash and DSpark marked slow);
an offline run interrupted and resumed ends bit-identical to an uninterrupted one; the offline trainer holds the
target's embedding and head only, and the AOT planner's --drafter-only step reads what it feeds. Refusals of bad
feature folders are rows of tests/test_bad_inputs.py.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
import optax
import pytest

from hdflash_jax.config import get_preset
from hdflash_jax.sharding import make_mesh

# 2 layers (SWA + CSA with indexer), hash + routed MoE: compiles fast (test_train.py's target)
TGT = get_preset("tiny").replace(n_layers=2, compress_ratios=(0, 4), n_mtp_layers=0, n_hash_layers=1)
BLOCK = dict(kind="block", n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, inter_dim=64, block_size=4)
DRAFTERS = {
    "hyperdflash": BLOCK,  # final streams through the inherited gate, KL on 2 slots
    "dflash": {**BLOCK, "conditioning": "layers", "reducer": "linear", "target_layer_ids": [1, 0]},
    "dspark": dict(kind="dspark", target_layer_ids=[0, 1], n_blocks=1, markov_rank=8, n_routed_experts=4,
                   n_activated_experts=2, block_size=3),
}
MAX_LEN, ANCHORS, BATCH, STEPS = 32, 4, 4, 6
TOL = 1e-5


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from flax import nnx

    from hdflash_jax.checkpoint import save_params
    from hdflash_jax.deepseek_v4.model import init_target

    root = tmp_path_factory.mktemp("offline")
    rng = np.random.RandomState(0)
    with open(root / "train.jsonl", "w") as f:
        for _ in range(12):
            q = "".join(rng.choice(list("abcdef ")) for _ in range(rng.randint(3, 9)))
            a = "".join(rng.choice(list("xyz0123")) for _ in range(rng.randint(6, 24)))
            f.write(json.dumps({"prompt": q, "response": a}) + "\n")
    targets = {}
    for seed in (3, 4):  # 4: the negative control's other target
        targets[seed] = nnx.jit(lambda s=seed: init_target(TGT, seed=s))()
        save_params(root / f"target{seed}", targets[seed], TGT)
    return {"root": root, "targets": targets, "data": root / "train.jsonl"}


def _config(work, name: str, drafter: str, mode: str = "online", seed: int = 3, **sections):
    from hdflash_jax.train_config import load_config

    base = {
        "out_dir": str(work["root"] / "runs" / name),
        "target": {"checkpoint": str(work["root"] / f"target{seed}")},
        "drafter": DRAFTERS[drafter],
        "data": {"train": str(work["data"]), "max_len": MAX_LEN, "num_anchors": ANCHORS},
        "train": {"global_batch": BATCH, "steps": STEPS},
        "optim": {"lr": 3e-3, "warmup_frac": 0.0, "end_lr_frac": 1.0},
        "checkpoint": {"every": 2, "max_to_keep": 5},
        "eval": {"every": 0, "at_start": False},
        "log": {"every": 1, "progress": False, "tensorboard": False},
        "export_drafter": False,
        "features": {"mode": mode, "dir": str(work["root"] / "features" / f"{drafter}-{seed}"), "capture_batch": 4,
                     "shard_records": 5},  # 12 records: shards of 5, 5, 2
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return load_config(data=base)


def _one_device():
    return make_mesh({"data": 1}, devices=jax.devices()[:1])


def _grads_as_updates():
    """An optimizer whose update is the gradient itself: the step's new params are params + grads."""
    return optax.GradientTransformation(lambda p: optax.EmptyState(), lambda g, s, p=None: (g, s))


def _step_and_grads(trainer, batch):
    """(metrics, gradients) of the family's pure step on `batch`, from the trainer's initial params."""
    state = trainer.init_state()
    params = jax.tree.map(np.asarray, state["params"])
    state = dict(state, opt_state=optax.EmptyState())
    trainer.parts = trainer.parts._replace(tx=_grads_as_updates())
    step = jax.jit(trainer._step)  # the function the trainer jits, with its shardings left to jit
    new, metrics = step(state, trainer.place_target(), trainer.global_batch_arrays(batch))
    grads = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b, new["params"], params)
    return jax.tree.map(np.asarray, metrics), grads


def _maxdiff(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()), a, b)))


# DFlash and DSpark: slow (≈ 40-60 s each from an empty compile cache: a capture and two steps compiled); the
# default suite runs HyperDFlash, with both negative controls
@pytest.mark.parametrize("drafter", ["hyperdflash", pytest.param("dflash", marks=pytest.mark.slow),
                                     pytest.param("dspark", marks=pytest.mark.slow)])
def test_offline_step_equals_online_loss_and_gradients(work, drafter):
    from train.features import capture
    from train.trainer import Trainer

    mesh = _one_device()
    t0 = time.time()
    summary = capture(_config(work, "capture", drafter), mesh, progress=False)
    capture_s = time.time() - t0
    assert summary["records"] == 12 and summary["bytes_per_token"] > 0
    online = Trainer(_config(work, "on", drafter), mesh)
    offline = Trainer(_config(work, "off", drafter, mode="offline"), mesh)
    # the offline trainer holds the target's embedding and head, nothing of its layers
    assert sorted(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(offline._target_values)) \
        == ["['embed']", "['head']['weight']"]
    for tr in (online, offline):
        tr.setup_optimizer(STEPS)
    _, on_batches, _ = online.dataset()
    _, off_batches, _ = offline.dataset()
    on_batch, off_batch = on_batches[1], off_batches[1]  # a batch past the first, anchors of epoch 0
    for k in ("tokens", "loss_mask", "anchors", "keep", "record_id"):
        np.testing.assert_array_equal(on_batch[k], off_batch[k])
    assert off_batch["features"].shape[:2] == (BATCH, MAX_LEN) and "features" not in on_batch
    m_on, g_on = _step_and_grads(online, on_batch)
    m_off, g_off = _step_and_grads(offline, off_batch)
    loss_diff, grad_diff = abs(float(m_on["loss"]) - float(m_off["loss"])), _maxdiff(g_on, g_off)
    grad_scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(g_on))
    print(f"\n{drafter}: capture {capture_s:.1f} s; online vs offline: loss {float(m_on['loss']):.6f} diff "
          f"{loss_diff:.1e}, max gradient diff {grad_diff:.1e} (largest gradient {grad_scale:.2e})")
    assert loss_diff <= TOL and grad_diff <= TOL
    assert grad_scale > 100 * TOL  # the gradients are not all ~0: the comparison can tell them apart
    # negative control: features one position late (what an off-by-one capture would give)
    shifted = dict(off_batch, features=np.roll(off_batch["features"], 1, axis=1))
    m_shift, g_shift = _step_and_grads(offline, shifted)
    shift = max(abs(float(m_shift["loss"]) - float(m_on["loss"])), _maxdiff(g_shift, g_on))
    print(f"  control, features shifted by one position: difference {shift:.2e}")
    assert shift > 100 * TOL
    if drafter == "hyperdflash":  # negative control: features (and teacher) of another target
        other = _config(work, "capture", drafter, seed=4)
        capture(other, mesh, progress=False)
        from hdflash_jax.training.features import FeatureReader, offline_example

        reader = FeatureReader(other.features.dir)
        rows = [offline_example(reader.record(int(i)), a, offline.layout.teacher_slots)
                for i, a in zip(off_batch["record_id"], off_batch["anchors"])]
        forged = dict(off_batch, **{k: np.stack([r[k] for r in rows]) for k in rows[0]})
        m_other, g_other = _step_and_grads(offline, forged)
        diff = max(abs(float(m_other["loss"]) - float(m_on["loss"])), _maxdiff(g_other, g_on))
        print(f"  control, features of target seed 4: difference {diff:.2e}")
        assert diff > 100 * TOL


def test_interrupted_offline_run_resumes_bit_identical(work, monkeypatch):
    """An offline run stopped after 3 steps (its newest checkpoint: step 2) and started again ends on the
    uninterrupted run's parameters and metrics, bit for bit (mesh data=2: the features' rows sharded)."""
    import train.drafter as td
    from train.features import capture

    mesh = make_mesh({"data": 2}, devices=jax.devices()[:2])
    capture(_config(work, "capture", "hyperdflash"), mesh, progress=False, overwrite=True)
    whole = _config(work, "whole", "hyperdflash", mode="offline")
    td.run(whole, mesh)
    cut = _config(work, "cut", "hyperdflash", mode="offline", debug={"step_sleep": 1e-3})
    calls = []

    def stop_after_three(_s):
        calls.append(1)
        if len(calls) == 3:  # after step 3: its checkpoint (every 2) is step 2
            raise KeyboardInterrupt

    monkeypatch.setattr(td.time, "sleep", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        td.run(cut, mesh)
    monkeypatch.undo()
    out = td.Path(cut.out_dir)
    assert max(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == 2
    td.run(cut, mesh)
    step_a, a = td.load_run_params(whole.out_dir)
    step_b, b = td.load_run_params(cut.out_dir)
    assert step_a == step_b == STEPS
    jax.tree.map(np.testing.assert_array_equal, a, b)

    def metrics(d):
        return [{k: v for k, v in json.loads(x).items() if "per_s" not in k and k != "mfu"}
                for x in (td.Path(d) / "metrics.jsonl").read_text().splitlines()]

    assert [m["step"] for m in metrics(cut.out_dir)] == list(range(1, STEPS + 1))
    assert metrics(cut.out_dir) == metrics(whole.out_dir)
    print("\nresumed offline run: losses", [round(m["loss"], 6) for m in metrics(cut.out_dir)])


def test_capture_writes_the_layout_and_prints_its_cost_first(work, capfd):
    """The folder holds the layout's shards (12 records in shards of 5, 5, 2), the index records where the
    features come from, and the cost line is logged before the first shard is written."""
    from hdflash_jax.training.features import FeatureReader
    from train.features import capture

    cfg = _config(work, "capture", "dspark")
    capture(cfg, _one_device(), progress=False, overwrite=True)
    err = capfd.readouterr().err
    assert err.index("bytes/token") < err.index("wrote 12 records")
    index = json.loads((work["root"] / "features" / "dspark-3" / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [5, 5, 2]
    assert index["source"]["drafter.target_layer_ids"] == [0, 1] and index["source"]["data.max_len"] == MAX_LEN
    assert index["source"]["target.checkpoint"] == str((work["root"] / "target3").resolve())
    reader = FeatureReader(cfg.features.dir)
    assert reader.layout.arrays["features"] == ((2, TGT.hc_mult, TGT.dim), "float32")
    per = reader.layout.bytes_per_token()
    assert per == {"tokens": 4, "features": 2 * TGT.hc_mult * TGT.dim * 4, "hidden": TGT.dim * 4}
    assert f"{sum(per.values()):,} bytes/token" in err


def test_the_planners_drafter_only_step_reads_what_the_offline_trainer_feeds(work):
    """`aot_plan --program train --drafter-only` builds the offline step: the target params are the embedding and
    head alone, and the batch is the one the offline trainer's pipeline gives (keys, shapes, dtypes), through the
    same `offline_batch_spec`; the family's step traces on it."""
    from hdflash_jax.aot_plan.cli import _config as plan_config
    from hdflash_jax.aot_plan.cli import _parse
    from hdflash_jax.aot_plan.train import build
    from train.trainer import Trainer

    args = _parse(["--program", "train", "--preset", "tiny", "--layers", "2", "--mesh", "data=2", "--batch",
                   str(BATCH), "--seq", str(MAX_LEN), "--anchors", str(ANCHORS), "--drafter", "tiny-hyperdflash",
                   "--drafter-only"])
    mesh = make_mesh({"data": 2}, devices=jax.devices()[:2])
    prog = build("train", plan_config(args), args, mesh)
    _, target_params, batch = prog.args
    assert sorted(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(target_params)) \
        == ["['embed']", "['head']['weight']"]
    cfg = _config(work, "planned", "hyperdflash", mode="offline")
    from train.features import capture

    if not (work["root"] / "features" / "hyperdflash-3" / "index.json").is_file():
        capture(_config(work, "capture", "hyperdflash"), mesh, progress=False)
    tr = Trainer(cfg, mesh)
    tr.setup_optimizer(STEPS)
    fed = tr.global_batch_arrays(tr.dataset()[1][0])
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: (v.shape, v.dtype) for k, v in fed.items()}
    assert {k: v.sharding for k, v in batch.items()} == {k: v.sharding for k, v in fed.items()}
    new_state, metrics = jax.eval_shape(prog.fn, *prog.args)
    assert metrics["loss"].shape == ()


def _tiny_capture(folder, n=3, length=8):
    from hdflash_jax.training.features import FeatureWriter, Layout

    layout = Layout({"tokens": ((), "int32"), "features": ((2, 4), "bfloat16"), "hidden": ((4,), "float32")}, 2)
    w = FeatureWriter(folder, layout, {"data.max_len": length}, n, length, 2)
    rng = np.random.default_rng(0)
    rows = {"tokens": rng.integers(0, 9, (n, length)).astype(np.int32),
            "features": rng.standard_normal((n, length, 2, 4)).astype(jax.numpy.bfloat16),
            "hidden": rng.standard_normal((n, length, 4)).astype(np.float32)}
    folder.mkdir()
    w.add({k: v[:2] for k, v in rows.items()})
    w.add({k: v[2:] for k, v in rows.items()})
    w.finish()
    return rows


def test_reader_round_trip_teacher_gather_and_bad_records(tmp_path):
    """bfloat16 survives the .npy round trip; the teacher is gathered at a + i (clipped); a record whose tokens
    differ from the pipeline's row, or that holds a NaN, is refused naming its shard file."""
    from hdflash_jax.training.features import FeatureReader, offline_example

    rows = _tiny_capture(tmp_path / "f")
    reader = FeatureReader(tmp_path / "f")
    for i in range(3):
        got = reader.record(i, tokens=rows["tokens"][i])
        for k in rows:
            assert got[k].dtype == rows[k].dtype
            np.testing.assert_array_equal(got[k], rows[k][i])
    ex = offline_example(reader.record(2), np.array([0, 6, 7]), 2)
    np.testing.assert_array_equal(ex["teacher_hidden"], rows["hidden"][2][[[0, 1], [6, 7], [7, 7]]])
    with pytest.raises(ValueError, match=r"f/tokens-00001\.npy: record 2's tokens differ from the row data.train "
                                         r"gives now"):
        reader.record(2, tokens=rows["tokens"][2] + 1)
    shard = np.load(tmp_path / "f" / "hidden-00001.npy")
    shard[0, 3, 1] = np.nan
    np.save(tmp_path / "f" / "hidden-00001.npy", shard)
    with pytest.raises(ValueError, match=r"f/hidden-00001\.npy: record 2 holds non-finite values"):
        FeatureReader(tmp_path / "f").record(2)
