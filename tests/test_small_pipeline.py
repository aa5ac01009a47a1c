"""The built-in small model, stages 1–3: corpus decontamination, the BPE tokenizer, target pretraining.

The pretraining tests share one micro target (1 CSA layer with a hash-routed MoE, the MTP block with a
score-routed one, 2 Sinkhorn iterations) and one compiled training step; the end-to-end `run` test (resume,
export) is marked slow.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from hdflash_jax.config import TargetConfig, get_preset
from train import corpus as C
from train import pretrain_target as P
from train import tokenizer_train as TT
from train.checkpointing import Checkpointer
from hdflash_jax.typed_config import ConfigError
from hdflash_jax.typed_config import to_dict as config_dict

REPO = Path(__file__).resolve().parents[1]

MICRO = TargetConfig(
    vocab_size=300, dim=32, n_layers=1, n_heads=2, head_dim=32, rope_head_dim=8, q_lora_rank=16, o_groups=2,
    o_lora_rank=8, window_size=8, index_n_heads=2, index_head_dim=16, index_topk=2, n_routed_experts=4,
    n_activated_experts=2, n_shared_experts=1, moe_inter_dim=16, n_hash_layers=1, original_seq_len=32,
    compress_ratios=(4, 0), max_seq_len=256, hc_sinkhorn_iters=2, dtype="float32", param_dtype="float32")
MICRO_RUN = P.load_config(data={
    "train": {"seq_len": 16, "batch_size": 2, "steps": 4, "bias_update_speed": 1e-3, "eval_every": 2,
              "eval_batches": 1},
    "optim": {"lr": 1e-2, "warmup_steps": 0}, "log": {"every": 1, "progress": False}, "checkpoint": {"every": 2}})
MICRO_TRAIN = MICRO_RUN.train


# ---- stage 1: corpus -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eval_index():
    return C.EvalIndex.from_suites("all", n=13)


def _eval_rows(rel):
    with open(REPO / "hdflash_jax" / "suites_data" / rel, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _text_doc(text, i=0):
    return {"id": f"planted/{i}", "source": "python_stdlib", "kind": "text", "text": text}


def test_overlap_check_catches_planted_eval_prompts(eval_index):
    gsm = _eval_rows("gsm8k/test.jsonl")[0]["question"]  # Janet's ducks
    he = _eval_rows("humaneval/HumanEval.jsonl")[0]["prompt"]
    mbpp = next(r for r in _eval_rows("mbpp/mbpp.jsonl") if r["task_id"] == 11)["text"]
    mt = _eval_rows("mt_bench/question.jsonl")[0]["turns"][1]
    math_q = _eval_rows("math500/test.jsonl")[3]["problem"]
    planted = {
        # different case, spacing and punctuation do not hide it
        "gsm8k/0": "Some preamble.\n" + re.sub(r"\s+", "  ", gsm.upper()).replace(".", " ;") + "\nmore text",
        "HumanEval/0": "# a source file\nimport os\n" + he + "    pass\n",
        "mbpp/11": "TODO: " + mbpp,
        "mt_bench/81": "Notes: " + mt,
    }
    docs = [_text_doc(t, i) for i, t in enumerate(planted.values())]
    docs.append(_text_doc("x = 1\n" + math_q + "\n", 9))
    # chat documents in the evaluation's own template are clean when their content is new
    docs += list(C.gsm8k_documents([{"question": "Ann has 3 red pens and buys 4 more blue pens at the shop today. "
                                                 "How many pens does Ann have now in her bag?",
                                     "answer": "3+4=<<3+4=7>>7\n#### 7"}]))
    docs += [_text_doc("def add(a, b):\n    return a + b\n", 20)]
    hits = C.find_overlaps(docs, eval_index)
    by_doc = {h["doc"]: h["eval_id"] for h in hits}
    for i, sid in enumerate(planted):
        assert by_doc.get(f"planted/{i}") == sid, (sid, hits)
    assert "planted/9" in by_doc and by_doc["planted/9"].startswith("test/")  # a MATH-500 unique_id
    assert "gsm8k_train/0" not in by_doc and "planted/20" not in by_doc
    assert len(hits) == len(planted) + 1


def test_overlap_check_on_vendored_mbpp_finds_known_near_duplicates(eval_index):
    rows = C.read_jsonl(C.DATA_DIR / C.MBPP_FILE)
    hits = {h["doc"]: h["eval_id"] for h in C.find_overlaps(C.mbpp_documents(rows), eval_index)}
    assert hits.get("mbpp/569") == "mbpp/104"  # "sort each sublist of strings in a given list" (test task 104)
    assert 0 < len(hits) < len(rows) // 5  # templates shared by design do not flag every prompt


def test_vendored_training_data_matches_licenses_and_excludes_test_split():
    table = (C.DATA_DIR / "LICENSES.md").read_text()
    for meta in C.SOURCES.values():
        p = C.DATA_DIR / meta["file"]
        assert hashlib.sha256(p.read_bytes()).hexdigest() in table, meta["file"]
    ids = [r["task_id"] for r in C.read_jsonl(C.DATA_DIR / C.MBPP_FILE)]
    assert set(ids) == C.MBPP_NONTEST_IDS and not set(ids) & set(C.MBPP_TEST_IDS)
    with pytest.raises(ValueError, match="held-out test split"):
        list(C.mbpp_documents([{"task_id": 11, "text": "t", "code": "c", "test_list": []}]))
    assert C.gsm8k_answer_text("a <<1+1=2>>2 b\n#### 1,000") == "a 2 b\nThe answer is \\boxed{1,000}."


# ---- stage 2: tokenizer ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_tokenizer():
    rows = C.read_jsonl(C.DATA_DIR / C.MBPP_FILE)
    texts = [t for d in C.mbpp_documents(rows) for t in C.document_texts(d)]
    return TT.train_tokenizer(texts, vocab_size=512)


def test_tokenizer_layout_round_trip_and_atomic_specials(small_tokenizer, tmp_path):
    tok = small_tokenizer
    assert tok.get_vocab_size(with_added_tokens=True) == 512
    assert [tok.token_to_id(s) for s in TT.LEADING_SPECIALS] == [0, 1, 2, 3, 4]
    assert tok.token_to_id(TT.MASK) == 511
    for text in ["def f(x):\n\treturn  x ** 2   # ünïcödé 😀 \r\n", "  leading and trailing  ", "12345 + 678 = 13023",
                 "日本語のテキスト", ""]:
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text
    assert tok.encode("12345", add_special_tokens=False).tokens == list("12345")  # digits one by one
    chat = TT.render_role_tags([{"role": "user", "content": "Hi<there>|"}, {"role": "assistant", "content": "ok"}],
                          add_generation_prompt=False)
    assert chat == "<|bos|><|user|>Hi<there>|<|assistant|>ok<|eos|>"
    ids = tok.encode(chat, add_special_tokens=False).ids
    assert ids[:2] == [0, 3] and ids[-1] == 1 and ids.count(4) == 1 and 511 not in ids
    assert tok.encode("a<|mask|>b", add_special_tokens=False).ids[1] == 511
    # prompt + answer + eos tokenizes exactly as the whole conversation (the drafter data path relies on it)
    prompt = TT.render_role_tags([{"role": "user", "content": "Hi<there>|"}])
    enc = lambda t: tok.encode(t, add_special_tokens=False).ids  # noqa: E731
    assert enc(prompt) + enc("ok") + [1] == ids
    # the saved artefacts load with plain `tokenizers` and through the project's HFTokenizer
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(TT.tokenizer_config(512)))
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(chat, add_special_tokens=False).ids == ids
    from hdflash_jax.tokenizer import load_tokenizer

    hf = load_tokenizer(tmp_path)  # tokenizer_config.json names the chat format ("role_tags") and the mask id
    assert (hf.vocab_size, hf.bos_id, hf.eos_id, hf.mask_id, hf.chat_template) == (512, 0, 1, 511, "role_tags")
    assert hf.encode(hf.apply_chat_template([{"role": "user", "content": "Hi<there>|"}])) == \
        tok.encode(prompt, add_special_tokens=False).ids


def test_build_tokenizer_from_corpus_folder_is_cached(tmp_path):
    rows = C.read_jsonl(C.DATA_DIR / C.MBPP_FILE)
    docs = list(C.mbpp_documents(rows))
    (tmp_path / "c").mkdir()
    C._write_jsonl(tmp_path / "c" / "train.jsonl", docs[:-20])
    C._write_jsonl(tmp_path / "c" / "heldout.jsonl", docs[-20:])
    (tmp_path / "c" / "manifest.json").write_text("{}")
    logs = []
    p = TT.build_tokenizer(tmp_path / "c", tmp_path / "t", vocab_size=400, log=logs.append)
    cfg = json.loads((tmp_path / "t" / "tokenizer_config.json").read_text())
    assert cfg["ids"]["mask"] == 399 and cfg["chat_template"] == TT.CHAT_FORMAT
    assert TT.build_tokenizer(tmp_path / "c", tmp_path / "t", vocab_size=400, log=logs.append) == p
    assert "cached" in logs[-1]


# ---- stage 3: pretraining -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trainer():
    return P.Trainer(MICRO, MICRO_RUN)


def _batch(seed=0):
    return np.random.default_rng(seed).integers(5, MICRO.vocab_size - 1, (2, MICRO_TRAIN.seq_len + 1)).astype(np.int32)


def test_window_split_alignment():
    t = np.arange(10)[None] + 100
    x, y, nxt, y2 = P.split_window(t)
    assert x.tolist() == [list(range(100, 109))]
    assert (y == x + 1).all() and y.shape == x.shape
    assert nxt.shape[1] == y2.shape[1] == x.shape[1] - 1
    assert (nxt == x[:, :-1] + 1).all() and (y2 == x[:, :-1] + 2).all()  # MTP at i: reads t_{i+1}, predicts t_{i+2}


def test_mtp_alignment_by_causality_and_loss_value(trainer):
    """MTP position i must see the main streams at i and the embedding of t_{i+1} — nothing later — and its loss
    must be the CE against t_{i+2}. Changing t_j changes MTP logits from i = j − 1 on (through t_{i+1}'s
    embedding: the main streams at j − 1 cannot see t_j) and leaves i < j − 1 untouched."""
    fwd = jax.jit(lambda p, b, x: P.model_outputs(trainer._merge(p, b), x))
    tok = _batch(1)
    logits, y, mtp, y2 = fwd(trainer.params, trainer.buffers, tok)
    j = 9
    tok2 = tok.copy()
    tok2[:, j] = (tok2[:, j] + 17) % (MICRO.vocab_size - 1)
    logits_b, _, mtp_b, _ = fwd(trainer.params, trainer.buffers, tok2)
    diff = np.abs(np.asarray(mtp) - np.asarray(mtp_b)).max(axis=(0, 2))
    main_diff = np.abs(np.asarray(logits) - np.asarray(logits_b)).max(axis=(0, 2))
    assert (diff[: j - 1] == 0).all() and diff[j - 1] > 1e-6 and (diff[j - 1:] > 0).all()
    assert (main_diff[:j] == 0).all() and main_diff[j] > 1e-6
    assert np.isfinite(np.asarray(mtp)).all() and mtp.shape == (2, MICRO_TRAIN.seq_len - 1, MICRO.vocab_size)
    # the loss: mean CE of the MTP logits against t_{i+2}, computed here by hand
    lp = np.asarray(jax.nn.log_softmax(mtp, axis=-1))
    want = -np.mean(np.take_along_axis(lp, tok[:, 2:, None], axis=-1))
    total, parts = jax.jit(lambda p, b, x: P.losses(trainer._merge(p, b), x, 0.3))(trainer.params, trainer.buffers,
                                                                                  tok)
    np.testing.assert_allclose(float(parts["mtp_ce"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(total), float(parts["ce"]) + 0.3 * want, rtol=1e-5)
    assert abs(float(parts["ce"]) - np.log(MICRO.vocab_size)) < 0.5  # near-uniform at init


def test_train_step_lowers_loss_trains_params_only_and_resumes(trainer, tmp_path):
    cfg = MICRO
    assert not any(k.endswith(("tid2eid", "bias")) for k in trainer.params)
    assert set(trainer.buffers) == {"layers.0.ffn.gate.tid2eid", "mtp.0.block.ffn.gate.bias"}
    table = np.asarray(trainer.buffers["layers.0.ffn.gate.tid2eid"])
    assert table.shape == (cfg.vocab_size, cfg.n_activated_experts) and table.min() >= 0
    assert table.max() < cfg.n_routed_experts and (table[:, 0] != table[:, 1]).all()  # k distinct experts per id
    assert len({tuple(r) for r in table}) > 1  # really hashed, not one expert set for all
    bias0 = np.asarray(trainer.buffers["mtp.0.block.ffn.gate.bias"]).copy()
    emb0 = np.asarray(trainer.params["embed"]).copy()
    batch = _batch(0)
    ck = Checkpointer(tmp_path / "ck")
    trainer.save(ck)
    m = [trainer.train_step(batch) for _ in range(3)]  # each reports the loss before its update
    losses = [float(x["loss"]) for x in m]
    assert all(np.isfinite(losses)) and losses[1] < losses[0] and losses[2] < losses[1], losses
    assert np.isfinite(float(m[0]["mtp_ce"])) and float(m[0]["grad_norm"]) > 0
    assert not np.array_equal(np.asarray(trainer.params["embed"]), emb0)
    np.testing.assert_array_equal(np.asarray(trainer.buffers["layers.0.ffn.gate.tid2eid"]), table)
    step = np.asarray(trainer.buffers["mtp.0.block.ffn.gate.bias"]) - bias0  # sign updates of ±γ per step only
    assert np.allclose(np.round(step / MICRO_TRAIN.bias_update_speed), step / MICRO_TRAIN.bias_update_speed,
                       atol=1e-3) and np.abs(step).max() > 0
    # resume: restoring the step-0 checkpoint replays the same losses
    trainer.restore(ck)
    ck.close()
    assert trainer.step == 0 and np.array_equal(np.asarray(trainer.params["embed"]), emb0)
    again = [float(trainer.train_step(batch)["loss"]) for _ in range(3)]
    np.testing.assert_allclose(again, losses, rtol=1e-6)
    # the finished model is a regular target checkpoint (params and buffers)
    from hdflash_jax.checkpoint import load_params, save_params

    save_params(tmp_path / "model", trainer.model(), cfg)
    got_cfg, state = load_params(tmp_path / "model", as_model=False)
    flat = P.flat_values(state)
    assert got_cfg == cfg and set(flat) == set(trainer.params) | set(trainer.buffers)
    for k, v in {**trainer.params, **trainer.buffers}.items():
        np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(v), err_msg=k)


def test_config_resolution_and_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text(json.dumps({"preset": "small", "model": {"dim": 96}, "train": {"steps": 7}, "out_dir": "x"}))
    pcfg = P.load_config(f, ["model.compress_ratios=[0,4,0]", "model.n_layers=2", "optim.lr=1e-3",
                             "train.batch_size=4"])
    cfg = P.build_model_config(pcfg, vocab_size=1000, bos=0, eos=1)
    assert (cfg.dim, cfg.n_layers, cfg.compress_ratios, cfg.vocab_size) == (96, 2, (0, 4, 0), 1000)
    assert (pcfg.train.steps, pcfg.optim.lr, pcfg.train.batch_size, pcfg.out_dir) == (7, 0.001, 4, "x")
    assert pcfg.optim.b2 == 0.95 and pcfg.optim.decay_matrices_only  # the pretraining defaults of the section
    for override, message in (
            ("dim=3", "dim: unknown key (known: out_dir, preset, model, data, train, optim, checkpoint, log)"),
            ("model.nope=3", "model.nope: unknown key (not a TargetConfig field)"),
            ("model.dim=big", "model.dim: expected an integer, got 'big'"),
            ("train.steps=three", "train.steps: expected an integer, got 'three'"),
            ("train.seq_len=2", "train.seq_len: the MTP loss needs at least 3 tokens, got 2"),
            ("preset=huge", "preset: unknown preset 'huge'; one of ['small', 'tiny', 'v4-flash', 'v4-pro']")):
        with pytest.raises(ConfigError) as e:
            P.load_config(None, [override])
        assert str(e.value) == message
    small = get_preset("small")
    assert {0, 4} <= set(small.layer_ratios) and any(r > 4 for r in small.layer_ratios)  # SWA, CSA, HCA
    assert small.n_hash_layers >= 1 and small.n_mtp_layers == 1 and small.hc_mult == 4
    assert small.index_topk < P.PretrainTrain().seq_len // 4  # the indexer really selects
    tokens = np.arange(5000, dtype=np.uint16)
    a, b = P.train_batch(tokens, MICRO_TRAIN, 3), P.train_batch(tokens, MICRO_TRAIN, 3)
    assert a.shape == (2, 17) and np.array_equal(a, b) and not np.array_equal(a, P.train_batch(tokens, MICRO_TRAIN, 4))
    assert (np.diff(a, axis=1) == 1).all()  # contiguous windows


@pytest.mark.slow
def test_run_end_to_end_resumes_and_exports(tmp_path, small_tokenizer):
    """`run` on a tiny corpus: stops at 3 steps, resumes to 4, exports a loadable target."""
    rows = C.read_jsonl(C.DATA_DIR / C.MBPP_FILE)
    docs = list(C.mbpp_documents(rows))
    cdir, tdir = tmp_path / "corpus", tmp_path / "tok"
    cdir.mkdir()
    C._write_jsonl(cdir / "train.jsonl", docs[:-30])
    C._write_jsonl(cdir / "heldout.jsonl", docs[-30:])
    (cdir / "manifest.json").write_text("{}")
    TT.build_tokenizer(cdir, tdir, vocab_size=MICRO.vocab_size, log=lambda *a: None)
    model_over = {k: v for k, v in MICRO.to_dict().items() if k not in ("vocab_size", "bos_token_id", "eos_token_id")}
    out = tmp_path / "run"
    base = {**config_dict(MICRO_RUN), "preset": "small", "model": model_over, "out_dir": str(out),
            "data": {"corpus": str(cdir), "tokenizer": str(tdir)}}
    r1 = P.run(P.load_config(data=base, overrides=["train.steps=3"]), log=lambda *a: None)
    assert r1["step"] == 3 and (out / "model").is_dir()
    import shutil

    shutil.rmtree(out / "model")
    r2 = P.run(P.load_config(data=base), log=lambda *a: None)
    assert r2["step"] == 4 and r2["finished"] and np.isfinite(r2["val_ce"])
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4]
    from hdflash_jax.checkpoint import load_params

    cfg, _ = load_params(out / "model", as_model=False)
    assert cfg.vocab_size == MICRO.vocab_size and cfg.compress_ratios == MICRO.compress_ratios


def test_trainer_checkpoints_at_a_relative_path(trainer, tmp_path, monkeypatch):
    """orbax refuses relative paths; `--out runs/small/target` (relative) must still checkpoint and resume."""
    monkeypatch.chdir(tmp_path)
    step = trainer.step
    with Checkpointer(Path("rel") / "ck") as ck:
        trainer.save(ck)
        ck.wait()
        assert (tmp_path / "rel" / "ck" / str(step)).is_dir()
        trainer.restore(ck)
    assert trainer.step == step
    from hdflash_jax.checkpoint import load_params, save_params

    save_params(Path("rel") / "model", trainer.model(), MICRO)
    cfg, _ = load_params(Path("rel") / "model", as_model=False)
    assert cfg == MICRO


# ---- stages 4–6 and shipping: the whole pipeline at CI size, and the shipped model -----------------------------

@pytest.mark.slow
def test_pipeline_ci_size(tmp_path):
    """`python -m train.small_pipeline --size ci`: every stage runs (corpus → tokenizer → pretraining → regenerated
    responses → HyperDFlash and DFlash drafters → eval greedy and T = 1 → report), greedy speculative outputs equal
    AR's (eval.run exits 3 otherwise, failing the stage), and both trained drafters beat their untrained start."""
    import subprocess
    import sys

    out = tmp_path / "ci"
    r = subprocess.run([sys.executable, "-m", "train.small_pipeline", "--size", "ci", "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads((out / "results" / "results.json").read_text())
    assert set(res["runs"]) == {"greedy", "t1"}
    for run in res["runs"].values():
        for suite, methods in run["suites"].items():
            assert set(methods) == {"ar", "mtp3", "mtp7", "dflash", "hyperdflash"}, suite
            if run["config"]["greedy"]:
                assert all(m["greedy_match_ar"] for k, m in methods.items() if k != "ar"), suite
    for name in ("hyperdflash", "dflash"):
        t = res["drafter_training"][name]
        # trained beats untrained on held-out prompts by a margin (docs/training.md: 1.52 / 1.24 vs 1.00); a drafter
        # that learned nothing stays at ~1.00 (the old check, tau_end > tau_start, passed at 1.000 -> 1.001)
        assert t["tau_start"] < 1.05 and t["tau_end"] > 1.1, (name, t)
    assert (out / "results" / "acceptance_by_position.png").stat().st_size > 1000
    # cached: a rerun does no work
    r2 = subprocess.run([sys.executable, "-m", "train.small_pipeline", "--size", "ci", "--out", str(out)], cwd=REPO,
                        capture_output=True, text=True)
    assert r2.returncode == 0, r2.stderr[-2000:]
    for stage in ("train.pretrain_target", "train.regenerate", "train.drafter", "eval.run"):
        assert f"-m {stage} " not in r2.stderr, stage


SHIPPED = REPO / "models" / "small"
# The shipped drafters reach held-out τ 3.4–4.2 (B = 8, greedy; docs/results.md); an untrained one gives 1.00. 1.5
# on one short prompt leaves room for prompt-to-prompt spread and still fails for a drafter that learned nothing.
TAU_FLOOR = 1.5


def test_shipped_small_model_is_complete():
    """models/small (what `--target small` and the README's main command load) holds every piece, at the sizes
    its manifest states: the target, its tokenizer, HyperDFlash, DFlash, DSpark, DSpark-gated, DFlash 2 and
    HyperDFlash-2."""
    from hdflash_jax.checkpoint import load_config
    from hdflash_jax.families import family
    from hdflash_jax.tokenizer import load_tokenizer

    assert (SHIPPED / "manifest.json").is_file(), "the built-in small model is missing: python -m train.small_pipeline"
    manifest = json.loads((SHIPPED / "manifest.json").read_text())
    assert manifest["bytes"] == sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file()
                                    and f.name != "manifest.json")
    cfg = load_config(SHIPPED / "target")
    assert set(cfg.layer_ratios) >= {0, 4, 16} and cfg.n_hash_layers >= 1 and cfg.n_mtp_layers == 1
    assert cfg.hc_mult == 4 and cfg.n_routed_experts > cfg.n_activated_experts
    tok = load_tokenizer(SHIPPED / "tokenizer")
    assert tok.vocab_size == cfg.vocab_size and tok.chat_template == "role_tags" and tok.mask_id == cfg.vocab_size - 1

    for name, want in (("hyperdflash", ("final_streams", "gated")), ("dflash", ("layers", "linear"))):
        d = family("block").load_config(SHIPPED / "drafters" / name)
        assert (d.conditioning, d.reducer) == want and d.mask_token_id == tok.mask_id
    for name, pooling in (("dspark", "mean"), ("dspark-gated", "gated")):
        d = family("dspark").load_config(SHIPPED / "drafters" / name)
        assert d.pooling == pooling and d.noise_token_id == tok.mask_id and d.block_size == 7
    for name, want in (("hyperdflash2", ("final_streams", "gated")), ("dflash2", ("layers", "linear"))):
        d = family("dflash2").load_config(SHIPPED / "drafters" / name)
        assert (d.conditioning, d.reducer) == want and d.mask_token_id == tok.mask_id and d.selector_rank == 32


def test_shipped_small_model_speculates_losslessly(tmp_path):
    """`eval.run --target small`: greedy speculative outputs equal AR's (exit 0, not 3) and the trained drafters
    accept real drafts on a GSM8K prompt."""
    from eval import run as ev

    out = tmp_path / "e"
    rc = ev.main(["--target", "small", "--suite", "gsm8k", "--limit", "1", "--max-new-tokens", "48",
                  "--method", "ar,mtp3,dflash,hyperdflash", "--prompt-buckets", "128", "--out", str(out), "--quiet"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())["suites"]["gsm8k"]
    assert all(res[m]["greedy_match_ar"] for m in ("mtp3", "dflash", "hyperdflash"))
    assert res["hyperdflash"]["tau"] > TAU_FLOOR and res["dflash"]["tau"] > TAU_FLOOR and res["mtp3"]["tau"] > 1.2, res


def test_pipeline_configs_load_through_the_trainers_loaders(tmp_path):
    """Every drafter config the pipeline writes, and the CI pretraining overrides, pass the typed loaders."""
    from train import small_pipeline as SP
    from hdflash_jax.train_config import load_config

    for size_name, size in SP.SIZES.items():
        for v in size["variants"]:
            cfg = load_config(data=SP.drafter_config(v, size, tmp_path))
            var = SP.VARIANTS[v]
            assert cfg.drafter.block_size == var.block and cfg.train.steps == size["drafter"]["steps"] * var.budget
            assert cfg.eval.num_prompts == cfg.eval.batch_size == size["drafter"]["eval_prompts"]
            assert cfg.drafter.kind == var.kind and all(getattr(cfg.drafter, k) == x for k, x in var.overrides.items())
            if var.kind == "block":  # the block loss's KL settings (DSpark's loss keeps DeepSpec's defaults)
                assert (cfg.drafter.loss.kl_alpha, cfg.drafter.loss.kl_slots) == (var.loss.get("kl_alpha", 0.1),
                                                                                  var.loss.get("kl_slots", 2))
            assert cfg.data.train.endswith(f"{SP.REGEN_DIRS[var.regen]}/train.jsonl")
            assert cfg.eval.temperature == (1.0 if var.regen == "t1" else 0.0)
        pcfg = P.load_config(None, size["pretrain"])
        cmd = SP.pretrain_command("python", size, tmp_path, None)
        assert cmd.count("--override") == len(size["pretrain"])
    assert (pcfg.train.steps, pcfg.model["compress_ratios"], pcfg.optim.warmup_steps) == (30, (0, 4, 8, 0), 5)
    # the seed study: same config but the seed (init, RNG, data order) and the run folder <variant>-s<seed>
    size = SP.SIZES["full"]
    base, seeded = SP.drafter_config("dflash", size, tmp_path), SP.drafter_config("dflash", size, tmp_path, 2)
    assert seeded["seed"] == seeded["data"]["shuffle_seed"] == 2 and seeded["out_dir"].endswith("dflash-s2")
    assert {k: v for k, v in seeded.items() if k not in ("seed", "out_dir", "data")} == \
        {k: v for k, v in base.items() if k not in ("seed", "out_dir", "data")}
    load_config(data=seeded)
    # the KV-head study: HyperDFlash's config but the KV-head count (and the run folder)
    hd = SP.drafter_config("hyperdflash", size, tmp_path)
    for v, n in (("hd-kv4", 4), ("hd-kv1", 1)):
        kv = SP.drafter_config(v, size, tmp_path)
        assert kv["drafter"]["n_kv_heads"] == n != hd["drafter"]["n_kv_heads"] and kv["out_dir"].endswith(v)
        same = lambda c: {**c, "out_dir": None, "drafter": {**c["drafter"], "n_kv_heads": None}}  # noqa: E731
        assert same(kv) == same(hd)
    runs = SP.eval_runs(size, tmp_path, ("hyperdflash", "dflash"), (1, 2))
    assert "hyperdflash-s1,hyperdflash-s2,dflash-s1,dflash-s2" in runs["seeds"]
    # the full comparison: DSpark in the main runs, the T = 1 drafters in the T = 1 run only, ablations apart
    runs = SP.eval_runs(size, tmp_path, tuple(SP.VARIANTS))
    method = lambda run: runs[run][runs[run].index("--method") + 1].split(",")  # noqa: E731
    assert method("greedy") == list(SP.MAIN_METHODS)
    assert method("t1") == list(SP.MAIN_METHODS) + ["hyperdflash-t1", "dflash-t1", "hyperdflash-t1-kl7",
                                                    "hyperdflash-t1-kl7a1"]
    assert method("ablations") == ["hyperdflash", "hd-linear", "hd-layers", "hd-nokl", "hd-b16", "hyperdflash-x2",
                                   "dflash-x2", "hyperdflash-x4", "dflash-x4", "hd-linear-x4", "hd-layers-x4",
                                   "hd-kv4", "hd-kv1", "dflash2-conv"]
    assert all(f"{m}=" in " ".join(runs["t1"]) for m in ("dspark-gated", "dflash-t1"))
    assert method("gates") == ["hyperdflash", "dflash", "hd-pathnorm", "hd-lowrank"]
