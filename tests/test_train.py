"""Drafter training: the loss pieces, the grain pipeline, a sharded step against a single-device step, two processes
on loopback against one, and a SIGKILLed run resumed to the same parameters as an uninterrupted one.

The subprocess tests share one single-process reference run (1 process × 2 simulated devices, mesh data=2) and JAX's
persistent compilation cache, so the suite compiles each program once.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from hdflash_jax.config import get_preset
from hdflash_jax.tokenizer import load_tokenizer
from train import data as D
from hdflash_jax.training.losses import LossConfig, decay_weights, default_gamma, drafter_loss

REPO = Path(__file__).resolve().parents[1]
# 2 layers (SWA + CSA with indexer), hash + routed MoE; no MTP (training never runs it): compiles fast
TGT = get_preset("tiny").replace(n_layers=2, compress_ratios=(0, 4), n_mtp_layers=0, n_hash_layers=1)
DRAFTER = dict(n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, inter_dim=64, block_size=4)
MAX_LEN, ANCHORS, BATCH, STEPS = 32, 4, 4, 6


# ---- fixtures ----------------------------------------------------------------------------------------------------

def _write_data(path: Path, n: int = 24, seed: int = 0) -> None:
    rng = np.random.RandomState(seed)
    with open(path, "w") as f:
        for i in range(n):
            q = "".join(rng.choice(list("abcdef ")) for _ in range(rng.randint(3, 9)))
            a = "".join(rng.choice(list("xyz0123")) for _ in range(rng.randint(4, 24)))
            f.write(json.dumps({"prompt": q, "response": a}) + "\n")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from hdflash_jax.checkpoint import save_params
    from hdflash_jax.deepseek_v4.model import init_target

    root = tmp_path_factory.mktemp("train")
    _write_data(root / "train.jsonl")
    from flax import nnx

    target = nnx.jit(lambda: init_target(TGT, seed=3))()  # one compiled init (persistently cached), not ~100 ops
    save_params(root / "target", target, TGT)
    return {"root": root, "target": target, "ckpt": root / "target", "data": root / "train.jsonl"}


def _config(work, out_dir, **sections):
    from train.drafter import load_config

    base = {
        "out_dir": str(out_dir),
        "target": {"checkpoint": str(work["ckpt"])},
        "drafter": {"kind": "block", **DRAFTER},
        "data": {"train": str(work["data"]), "max_len": MAX_LEN, "num_anchors": ANCHORS},
        "train": {"global_batch": BATCH, "steps": STEPS},
        # constant LR (no warmup, cosine to the same value): a 3-step run follows a 6-step run's first 3 steps
        "optim": {"lr": 3e-3, "warmup_frac": 0.0, "end_lr_frac": 1.0},
        "checkpoint": {"every": 2, "max_to_keep": 5},
        "eval": {"every": 0, "at_start": False},
        "log": {"every": 1, "progress": False, "tensorboard": False},
        "export_drafter": False,
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return load_config(data=base)


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_COMPILATION_CACHE_DIR=str(jax.config.jax_compilation_cache_dir or REPO / ".jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    return env


def _launch(cfg_path: Path, devices: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "train.drafter", "--config", str(cfg_path), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _finish(proc: subprocess.Popen, timeout: float | None = None) -> str:
    # HDFLASH_TEST_SUBPROCESS_TIMEOUT: seconds per training subprocess (a shared, overloaded machine needs more)
    timeout = timeout or float(os.environ.get("HDFLASH_TEST_SUBPROCESS_TIMEOUT", "300"))
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _write_cfg(cfg, path: Path) -> Path:
    from hdflash_jax.typed_config import to_dict

    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return path


def _losses(out_dir: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


@pytest.fixture(scope="module")
def reference_run(work):
    """One process, 2 simulated devices, mesh data=2, STEPS steps, checkpoints every 2 (the uninterrupted run)."""
    out = work["root"] / "ref"
    cfg = _write_cfg(_config(work, out, mesh="data=2"), work["root"] / "ref.yaml")
    t0 = time.time()
    _finish(_launch(cfg, 2))
    return {"out": out, "cfg": cfg, "seconds": time.time() - t0}


# ---- the config loader: every bad value named by its key path, in one line ----------------------------------------

def test_config_loader_names_the_key_path(tmp_path):
    from hdflash_jax.typed_config import ConfigError, to_dict
    from hdflash_jax.train_config import load_config

    cfg = load_config(REPO / "train" / "configs" / "tiny_hyperdflash.yaml", ["optim.lr=1e-3", "train.steps=5",
                                                                             "drafter.n_layers=3"])
    assert (cfg.optim.lr, cfg.train.steps, cfg.drafter.n_layers) == (1e-3, 5, 3)  # 1e-3: YAML 1.1 str
    assert cfg.optim.warmup_frac == 0.04 and cfg.data.max_len == 128 and cfg.drafter.loss.kl_slots == 2
    assert load_config(data=to_dict(cfg)) == cfg  # the run folder's config.yaml reads back equal
    v4 = load_config(REPO / "train" / "configs" / "v4flash_hyperdflash.yaml")
    assert v4.mesh == "data=4,fsdp=4,expert=8,tensor=4" and v4.target.checkpoint and v4.drafter.preset
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    for args, message in (
            ((None, ["optim.lr=fast"]), "optim.lr: expected a number, got 'fast'"),
            ((None, ["train.steps='three'"]), "train.steps: expected an integer, got 'three'"),
            ((None, ["optim.lrr=1"]), "optim.lrr: unknown key (known: lr, warmup_frac, warmup_steps, end_lr_frac, "
                                      "weight_decay, decay_matrices_only, b1, b2, eps, grad_clip)"),
            ((None, ["optim=3"]), "optim: expected a mapping, got 3"),
            ((None, ["drafter.n_layerz=2"]), "drafter.n_layerz: unknown key (known: kind, preset, init_from_target, "
                                             "n_layers, n_heads, n_kv_heads, head_dim, inter_dim, rope_theta, "
                                             "norm_eps, "
                                             "block_size, mask_token_id, conditioning, target_layer_ids, reducer, "
                                             "post_norm, gate_path_norm, gate_residual_rank, draft_cache, draft_chunk, "
                                             "dim, hc_mult, vocab_size, target_n_layers, hc_eps, hc_norm_eps, dtype, "
                                             "param_dtype, loss)"),
            ((None, ["drafter.kind=medusa"]), "drafter.kind: unknown 'medusa'; one of block, dflash2, dspark"),
            ((None, ["eval.every=5"]), "eval.every: > 0 needs data.eval (a JSONL of held-out prompts)"),
            ((None, ["checkpoint.max_to_keep=0"]), "checkpoint.max_to_keep: must be >= 1, got 0"),
            ((None, ["lr"]), "--override 'lr': expected key=value with a dotted key, e.g. optim.lr=3e-4"),
            ((listed, []), f"--config {listed}: expected a mapping at the top level, got a list"),
            ((tmp_path / "nope.yaml", []), f"--config {tmp_path / 'nope.yaml'}: file not found")):
        with pytest.raises(ConfigError) as e:
            load_config(*args)
        assert str(e.value) == message
    # the CLI: that line on stderr, exit 2, no traceback
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: fast}\n")
    r = subprocess.run([sys.executable, "-m", "train.drafter", "--config", str(bad)], cwd=REPO, env=_env(1),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip() == "error: optim.lr: expected a number, got 'fast'", r.stderr


# ---- (4) the loss pieces -------------------------------------------------------------------------------------------

def test_decay_weights_exact():
    assert [default_gamma(b) for b in (16, 10, 8)] == [7.0, 5.0, 4.0]
    w = decay_weights(16)
    assert w[0] == 0.0 and w[1] == 1.0
    np.testing.assert_allclose(w[1:], np.exp(-np.arange(15) / 7.0), rtol=1e-7)
    assert abs(w[15] - math.exp(-2.0)) < 1e-7  # the paper's "w_15 ≈ 0.14"
    np.testing.assert_allclose(decay_weights(8), [0.0] + [math.exp(-(j - 1) / 4.0) for j in range(1, 8)], rtol=1e-7)
    np.testing.assert_allclose(decay_weights(4, gamma=2.0), [0.0, 1.0, math.exp(-0.5), math.exp(-1.0)], rtol=1e-7)
    with pytest.raises(ValueError, match="gamma"):
        decay_weights(4, gamma=0.0)


def _loss_inputs(seed=0, b=2, s=12, n=3, bs=4, v=11):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, v, (b, s)).astype(np.int32)
    loss_mask = np.zeros((b, s), bool)
    loss_mask[:, 3:] = True
    loss_mask[1, 9:] = False  # row 1's response ends at 8
    anchors = np.array([[3, 6, 10], [4, 5, 7]], np.int32)
    keep = np.array([[True, True, True], [True, True, False]])
    logits = rng.randn(b, n, bs, v).astype(np.float32)
    target_logits = rng.randn(b, s, v).astype(np.float32) * 2
    return tokens, loss_mask, anchors, keep, logits, target_logits


def test_ce_is_the_weighted_mean_and_acc_per_slot():
    tokens, lm, anchors, keep, logits, tl = _loss_inputs()
    cfg = LossConfig(block_size=4, gamma=2.0, kl_alpha=0.0)
    loss, parts = drafter_loss(jnp.asarray(logits), tokens, lm, anchors, keep, cfg)
    w = decay_weights(4, 2.0)
    num = den = 0.0
    correct, count = np.zeros(3), np.zeros(3)
    for b in range(2):
        for n in range(3):
            for j in range(1, 4):
                p = anchors[b, n] + j
                if not keep[b, n] or p >= tokens.shape[1] or not lm[b, p]:
                    continue
                z = logits[b, n, j].astype(np.float64)
                ce = np.log(np.exp(z - z.max()).sum()) + z.max() - z[tokens[b, p]]
                num += w[j] * ce
                den += w[j]
                correct[j - 1] += z.argmax() == tokens[b, p]
                count[j - 1] += 1
    assert abs(float(loss) - num / den) < 1e-5 and abs(float(parts["ce"]) - num / den) < 1e-5
    np.testing.assert_allclose(np.asarray(parts["acc"]), correct / count, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(parts["acc_count"]), count)
    assert float(parts["kl"]) == 0.0 and abs(float(parts["weight_sum"]) - den) < 1e-5
    # a dropped block and out-of-response slots carry nothing: changing their logits changes nothing
    l2, _ = drafter_loss(jnp.asarray(logits).at[1, 2].add(5.0).at[0, 2, 2:].add(5.0), tokens, lm, anchors, keep, cfg)
    assert float(l2) == float(loss)


def test_kl_only_on_the_first_p_slots_with_the_targets_own_next_token_teacher():
    tokens, lm, anchors, keep, logits, tl = _loss_inputs(1)
    cfg = LossConfig(block_size=4, kl_alpha=0.5, kl_slots=2, kl_temperature=2.0)
    base, parts = drafter_loss(jnp.asarray(logits), tokens, lm, anchors, keep, cfg, jnp.asarray(tl))
    kl = float(parts["kl"])
    # reference: T² · mean over valid (n, j ≤ P) of KL(softmax(tl[a+j-1]/T) ‖ softmax(z_j/T))
    vals = []
    for b in range(2):
        for n in range(3):
            for j in (1, 2):
                p = anchors[b, n] + j
                if not keep[b, n] or p >= tokens.shape[1] or not lm[b, p]:
                    continue
                t = tl[b, p - 1].astype(np.float64) / 2.0
                q = logits[b, n, j].astype(np.float64) / 2.0
                lp = t - np.log(np.exp(t).sum())
                lq = q - np.log(np.exp(q).sum())
                vals.append((np.exp(lp) * (lp - lq)).sum())
    assert abs(kl - 4.0 * np.mean(vals)) < 1e-5
    assert abs(float(base) - (float(parts["ce"]) + 0.5 * kl)) < 1e-5

    def kl_of(lg=logits, t=tl):
        return float(drafter_loss(jnp.asarray(lg), tokens, lm, anchors, keep, cfg, jnp.asarray(t))[1]["kl"])

    changed = logits.copy()
    changed[:, :, 3] += np.random.RandomState(2).randn(*changed[:, :, 3].shape) * 3  # slot P+1 = 3
    assert kl_of(lg=changed) == kl
    changed = logits.copy()
    changed[:, :, 2] += 3.0 * np.random.RandomState(3).randn(*changed[:, :, 2].shape)  # slot P = 2
    assert abs(kl_of(lg=changed) - kl) > 1e-3
    # the teacher of slot j is the target at a + j − 1: position a + P (slot P+1's teacher) is unused
    t = tl.copy()
    t[0, anchors[0, 0] + 2] += 5.0
    assert kl_of(t=t) == kl
    t = tl.copy()
    t[0, anchors[0, 0]] += np.linspace(-3, 3, tl.shape[-1])  # slot 1's teacher
    assert abs(kl_of(t=t) - kl) > 1e-3


# ---- (2) the data pipeline ----------------------------------------------------------------------------------------

def test_pipeline_masks_anchors_and_resumable_iterator(tmp_path):
    tok = load_tokenizer("byte")
    path = tmp_path / "d.jsonl"
    _write_data(path, n=10)
    p, r = D.encode_record(tok, {"prompt": "ab", "response": "xyz"})
    assert r == tok.encode("xyz") + [tok.eos_id] and p[-1] != tok.eos_id
    ex = D.build_example(p, r, 16, D.pad_id_of(tok))
    n = len(p) + len(r)
    assert ex["loss_mask"].tolist() == [False] * len(p) + [True] * len(r) + [False] * (16 - n)
    assert ex["positions"].tolist() == list(range(16)) and int(ex["length"]) == n
    assert (ex["tokens"][n:] == D.pad_id_of(tok)).all()
    # anchors: a and a+1 inside the response, sorted, distinct; fewer candidates → keep marks the real ones
    a, k = D.sample_anchors(ex["loss_mask"], 8, np.random.default_rng(0))
    real = a[k]
    assert k.sum() == len(r) - 1 and list(real) == sorted(set(real))
    assert all(ex["loss_mask"][x] and ex["loss_mask"][x + 1] for x in real)

    src = D.JsonlSource(path)
    ds = D.make_batches(src, tok, max_len=24, num_anchors=3, global_batch=4, num_batches=6, seed=5)
    it = D.make_iterator(ds)
    first = next(it)
    assert first["tokens"].shape == (4, 24) and first["anchors"].shape == (4, 3)
    state = it.get_state()
    rest = [next(it) for _ in range(5)]
    it2 = D.make_iterator(ds)
    it2.set_state(json.loads(json.dumps(state)))  # JSON round trip: what the checkpoint stores
    for x, y in zip(rest, [next(it2) for _ in range(5)]):
        for key in ("tokens", "anchors", "keep", "record_id"):
            np.testing.assert_array_equal(x[key], y[key])
    # epochs: each is a permutation of the records, reshuffled, with anchors resampled for the same record
    ids = np.concatenate([first["record_id"]] + [x["record_id"] for x in rest])
    epochs = np.concatenate([first["epoch"]] + [x["epoch"] for x in rest])
    assert sorted(ids[:10]) == list(range(10)) and sorted(ids[10:20]) == list(range(10))
    assert list(ids[:10]) != list(ids[10:20]) and epochs[:10].max() == 0 and epochs[10:20].min() == 1
    assert any(not np.array_equal(D.sample_anchors(np.ones(24, bool), 3, D.anchor_rng(5, 0, i))[0],
                                  D.sample_anchors(np.ones(24, bool), 3, D.anchor_rng(5, 1, i))[0]) for i in range(10))
    # a host's rows of a global batch are those rows of the one-host batch
    half = D.make_batches(src, tok, max_len=24, num_anchors=3, global_batch=4, num_batches=6, seed=5, rows=(2, 3))
    np.testing.assert_array_equal(half[3]["tokens"], ds[3]["tokens"][2:4])
    np.testing.assert_array_equal(half[3]["anchors"], ds[3]["anchors"][2:4])
    odd = D.make_batches(src, tok, max_len=24, num_anchors=3, global_batch=4, num_batches=6, seed=5, rows=(0, 3))
    np.testing.assert_array_equal(odd[4]["tokens"], ds[4]["tokens"][[0, 3]])  # any row set (topology-aware meshes)


# ---- (1) + (4) sharded step == single-device step; frozen target, trained reducer ----------------------------------

def test_sharded_step_equals_single_device_and_only_the_drafter_trains(work, tmp_path):
    from hdflash_jax.sharding import make_mesh
    from train.drafter import Trainer

    assert len(jax.devices()) == 8
    # Adam's first steps move a weight by lr·g/(|g| + eps): a gradient that is exactly 0 in one layout and 1e-10
    # (summation-order noise) in the other would differ by 1% of lr with eps = 1e-8. That is Adam, not sharding;
    # eps = 1e-6 keeps the comparison about the sharded computation.
    cfg = _config(work, tmp_path / "unused", optim={"eps": 1e-6})
    src = D.JsonlSource(work["data"])
    tok = load_tokenizer("byte")
    batches = D.make_batches(src, tok, max_len=MAX_LEN, num_anchors=ANCHORS, global_batch=BATCH, num_batches=2,
                             seed=0)
    results = {}
    for name, mesh in (("single", make_mesh({"data": 1}, devices=jax.devices()[:1])),
                       ("sharded", make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))):
        tr = Trainer(cfg, mesh, target=work["target"], tokenizer=tok)
        tr.setup_optimizer(STEPS)
        state = tr.init_state()
        init = jax.tree.map(np.asarray, state["params"])
        tparams = tr.place_target()
        tbefore = jax.tree.map(np.asarray, tparams)
        losses, gnorms, after = [], [], []
        for k in range(2):
            state, m = tr.train_step(state, tparams, batches[k])
            losses.append(float(m["loss"]))
            gnorms.append(float(m["grad_norm"]))
            after.append(jax.tree.map(np.asarray, state["params"]))
        results[name] = dict(init=init, after=after, params=after[-1], losses=losses, gnorms=gnorms,
                             tbefore=tbefore, tafter=jax.tree.map(np.asarray, tparams), tr=tr, state=state)
        if name == "sharded":  # really sharded: target head and drafter weights by the rules, the batch over data × fsdp
            head = tparams["head"]["weight"]
            assert head.sharding.spec[0] == "tensor" and head.addressable_shards[0].data.shape[0] == TGT.vocab_size // 2
            wq = state["params"]["layers"]["0"]["wq"]["weight"]
            assert tuple(wq.sharding.spec) == ("tensor", "fsdp") and wq.addressable_shards[0].data.size == wq.size // 4
            mu = state["opt_state"][1][0].mu["layers"]["0"]["wq"]["weight"]  # Adam's moment: sharded like its param
            assert mu.sharding.spec == wq.sharding.spec
            assert tr.global_batch_arrays(batches[0])["tokens"].addressable_shards[0].data.shape[0] == BATCH // 4

    s, p = results["single"], results["sharded"]
    np.testing.assert_allclose(p["losses"], s["losses"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p["gnorms"], s["gnorms"], rtol=1e-5)
    for k in range(2):  # after the first and the second update
        diffs = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), s["after"][k], p["after"][k])
        assert max(jax.tree.leaves(diffs)) < 1e-5, (k, diffs)
    # the frozen target is unchanged; the drafter's params (embedding/head are not among them) moved,
    # the inherited reducer gate included
    for r in (s, p):
        jax.tree.map(np.testing.assert_array_equal, r["tbefore"], r["tafter"])
    tree = s["params"]
    assert "embed" not in tree and "head" not in tree
    for name in ("fn", "base", "scale"):
        assert np.abs(tree["reducer"][name] - s["init"]["reducer"][name]).max() > 0, name
    np.testing.assert_array_equal(s["init"]["reducer"]["fn"], np.asarray(work["target"].hc_head.fn[...]))
    np.testing.assert_array_equal(s["tbefore"]["head"]["weight"], np.asarray(work["target"].head.weight[...]))
    assert np.abs(tree["layers"]["0"]["wq"]["weight"] - s["init"]["layers"]["0"]["wq"]["weight"]).max() > 0
    print("sharded vs single: loss diff", np.abs(np.subtract(p["losses"], s["losses"])).max(),
          "max param diff", max(jax.tree.leaves(diffs)))


# ---- (2) two processes on loopback == one process -----------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_trainer_on_an_expert_mesh_equals_one_device_and_splits_the_work(work, tmp_path):
    """The Trainer's own jitted step on fsdp × expert × tensor (8 devices) against one device, 2 steps: same losses
    and parameters, and per-device FLOPs near 1/8 of the single device's (the drafter's tokens split over expert:
    without the step traced under the mesh every expert shard computed its rows in full, 1.55× the 1/8 share)."""
    from hdflash_jax.sharding import make_mesh
    from train.drafter import Trainer

    cfg = _config(work, tmp_path / "unused", optim={"eps": 1e-6}, train={"global_batch": 2})
    tok = load_tokenizer("byte")
    batches = D.make_batches(D.JsonlSource(work["data"]), tok, max_len=MAX_LEN, num_anchors=ANCHORS, global_batch=2,
                             num_batches=2, seed=0)
    res = {}
    for name, mesh in (("single", make_mesh({"data": 1}, devices=jax.devices()[:1])),
                       ("expert", make_mesh({"fsdp": 2, "expert": 2, "tensor": 2}, devices=jax.devices()[:8]))):
        tr = Trainer(cfg, mesh, target=work["target"], tokenizer=tok)
        tr.setup_optimizer(STEPS)
        state, tparams = tr.init_state(), tr.place_target()
        flops = tr.step_fn.lower(state, tparams, tr.global_batch_arrays(batches[0])).compile().cost_analysis()["flops"]
        losses = []
        for k in range(2):
            state, m = tr.train_step(state, tparams, batches[k])
            losses.append(float(m["loss"]))
        res[name] = (losses, jax.tree.map(np.asarray, state["params"]), flops)
    np.testing.assert_allclose(res["expert"][0], res["single"][0], rtol=1e-5, atol=1e-5)
    worst = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), res["single"][1],
                                             res["expert"][1])))
    share = res["expert"][2] / (res["single"][2] / 8)
    print(f"\nexpert mesh vs one device: max param diff {worst:.1e}; per-device FLOPs {share:.2f}x the 1/8 share")
    assert worst < 1e-5 and share < 1.35


def test_two_processes_match_one_process(work, reference_run):
    out = work["root"] / "multi"
    cfg = _write_cfg(_config(work, out, mesh="data=2", train={"steps": 3}), work["root"] / "multi.yaml")
    port = _free_port()
    procs = [_launch(cfg, 1, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i))
             for i in range(2)]
    outs = [_finish(p) for p in procs]
    assert "2 process(es), rows 0..1 here" in outs[0]  # process 0 logs; it reads rows 0, 1 of 4
    ref, multi = _losses(reference_run["out"]), _losses(out)
    assert sorted(multi) == [1, 2, 3]
    traj = [(k, ref[k], multi[k]) for k in (1, 2, 3)]
    print("loss trajectory (step, 1 process, 2 processes):", traj)
    for _, a, b in traj:
        assert a == b, traj  # bit for bit, as docs/training.md says: the same reduction order on one and two processes
    assert ref[3] < ref[1]  # it trains


# ---- (3) SIGKILL mid-way, resume: the same final parameters ---------------------------------------------------------

def test_killed_run_resumes_to_the_uninterrupted_parameters(work, reference_run):
    from train.drafter import load_run_params

    out = work["root"] / "killed"
    cfg = _write_cfg(_config(work, out, mesh="data=2", debug={"step_sleep": 0.6}), work["root"] / "killed.yaml")
    proc = _launch(cfg, 2)
    deadline = time.time() + float(os.environ.get("HDFLASH_TEST_SUBPROCESS_TIMEOUT", "240"))
    ck = out / "checkpoints"
    while time.time() < deadline and proc.poll() is None:
        done = [int(p.name) for p in ck.glob("*") if p.name.isdigit() and (p / "commit_success.txt").exists()] \
            if ck.exists() else []
        if done and max(done) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.communicate()[0][-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    killed_at = max(int(p.name) for p in ck.glob("*") if p.name.isdigit())
    assert killed_at < STEPS
    log = _finish(_launch(cfg, 2))
    assert "resumed from" in log
    step_a, final = load_run_params(out)
    step_b, ref = load_run_params(reference_run["out"])
    assert step_a == step_b == STEPS
    jax.tree.map(np.testing.assert_array_equal, final, ref)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # the killed run's extra lines were dropped, nothing is missing
    assert _losses(out) == _losses(reference_run["out"])


# ---- (5) a trained drafter beats an untrained one on held-out τ (slow: minutes) --------------------------------------

@pytest.mark.slow
def test_smoke_trained_drafter_raises_heldout_tau(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "train.smoke_tau", "--out", str(tmp_path / "smoke"), "--steps", "400",
                           "--train-prompts", "512", "--max-new-tokens", "48"], cwd=REPO, env=_env(1),
                          capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "smoke" / "smoke_tau.json").read_text())
    print("held-out tau untrained / trained:", res["tau_untrained"], res["tau_trained"])
    assert res["tau_untrained"] < 1.05
    assert res["tau_trained"] > res["tau_untrained"] + 0.1


# ---- regeneration: resumable, exactly ----------------------------------------------------------------------------

def test_regenerate_resumes_to_the_same_output(work, tmp_path):
    from train import regenerate as R

    tok = load_tokenizer("byte")
    rows = R.load_rows(str(work["data"]), tok, limit=5)
    kw = dict(batch_size=2, max_new_tokens=6, temperature=1.0, seed=7, progress=False)  # sampled: seeds matter
    full = tmp_path / "full.jsonl"
    assert R.regenerate(work["target"], tok, rows, full, **kw)["written"] == 5
    part = tmp_path / "part.jsonl"
    R.regenerate(work["target"], tok, rows[:3], part, **kw)  # chunks [0, 1], [2] (padded)
    with open(part, "a") as f:
        f.write('{"id": 3, "prompt_ids": [1, 2')  # a torn line from a killed writer
    stats = R.regenerate(work["target"], tok, rows, part, **kw)
    assert stats == {"rows": 5, "skipped": 3, "written": 2}
    a = [json.loads(x) for x in full.read_text().splitlines()]
    b = [json.loads(x) for x in part.read_text().splitlines()]
    assert a == b and [r["id"] for r in a] == [0, 1, 2, 3, 4]
    for rec in a:
        p, r = D.encode_record(tok, rec)
        eos = [tok.eos_id] if rec["stop"] == "eos" else []  # a row cut by max_new_tokens gets no EOS to learn
        assert p == rec["prompt_ids"] and r == rec["response_ids"] + eos
        assert rec["stop"] == "eos" or len(rec["response_ids"]) == 6
    assert a[0]["prompt"] == D.JsonlSource(work["data"])[0]["prompt"] and "response" in a[0]
