"""Decoding and evaluation over a device mesh: `Generator(..., mesh=...)` and `eval.run --mesh`, against the
single-device run token for token (greedy and sampled with the same seed); two processes on loopback against
one process (slow).

The mesh runs use 4 of the 8 simulated CPU devices (data=2 x tensor=2): batch rows over data, the target's and the
drafter's parameters over tensor by the logical-axis rules."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from eval import run as ev
from hdflash_jax.sharding import make_mesh

REPO = Path(__file__).resolve().parent.parent
MESH = "data=2,tensor=2"
# one suite, 2 prompts in one batch of 2, few tokens: AR and HyperDFlash on the shipped small model
EVAL = ["--target", "small", "--suite", "gsm8k", "--limit", "2", "--max-new-tokens", "6", "--batch-size", "2",
        "--method", "ar,hyperdflash", "--prompt-buckets", "512", "--quiet"]


def _run(out: Path, *extra: str, monkeypatch=None) -> tuple[list[dict], dict, list]:
    """outputs.jsonl, results.json and (in-process) every generate call's token ids and accepted lengths."""
    from hdflash_jax.decode.generate import Generator

    calls, generate = [], Generator.generate

    def recorded(self, prompts, seed=0, max_steps=None, batch=None):
        res = generate(self, prompts, seed=seed, max_steps=max_steps, batch=batch)
        calls.append((self.drafter.num_drafts, res.tokens.tolist(), res.accepted.tolist()))
        return res

    if monkeypatch is None:
        assert ev.main(EVAL + ["--out", str(out), *extra]) == 0
    else:
        with monkeypatch.context() as m:
            m.setattr(Generator, "generate", recorded)
            assert ev.main(EVAL + ["--out", str(out), *extra]) == 0
    records = [json.loads(x) for x in (out / "outputs.jsonl").read_text().splitlines()]
    return records, json.loads((out / "results.json").read_text()), calls


def _cells(results: dict) -> dict:
    """What must not depend on the mesh: every cell's tokens and acceptance figures."""
    keep = ("tau", "tokens", "accepted_hist", "accept_rate_by_pos", "steps", "greedy_match_ar")
    return {su: {m: {k: c.get(k) for k in keep} for m, c in cells.items()} for su, cells in results["suites"].items()}


# greedy in the default suite; sampled (T = 1, same seed) is slow: each eval.run compiles every method's programs
@pytest.mark.parametrize("temperature", ["0", pytest.param("1", marks=pytest.mark.slow)])
def test_eval_run_on_a_mesh_equals_one_device(tmp_path, temperature, monkeypatch):
    one = _run(tmp_path / "one", "--temperature", temperature, "--seed", "5", monkeypatch=monkeypatch)
    mesh = _run(tmp_path / "mesh", "--temperature", temperature, "--seed", "5", "--mesh", MESH,
                monkeypatch=monkeypatch)
    assert mesh[2] == one[2] and len(one[2]) >= 4  # every generate call (warm-ups too): token ids, accepted lengths
    assert mesh[0] == one[0]  # every output's text and token count, per method
    assert _cells(mesh[1]) == _cells(one[1])
    assert mesh[1]["config"]["mesh"] == {"data": 2, "tensor": 2} and "mesh" not in one[1]["config"]
    if temperature == "0":
        assert sum(r["turns"][0]["tokens"] for r in one[0]) == 4 * 6  # 2 prompts x 2 methods x 6 tokens


def test_generator_on_a_mesh_is_sharded_and_equal(tmp_path):
    """Tokens and per-step acceptance equal to one device (MTP drafts, sampled), all at once and refilled on 2 rows,
    parameters really sharded, the loop state's rows over data (less temp memory per device than the single-device
    program)."""
    from hdflash_jax.config import get_preset
    from hdflash_jax.decode.drafters import MTPDrafter
    from hdflash_jax.decode.generate import DecodeSettings, Generator
    from hdflash_jax.deepseek_v4.model import init_target

    cfg = get_preset("tiny")
    target = init_target(cfg, 3)
    settings = DecodeSettings(max_new_tokens=10, temperature=1.0, prompt_buckets=(16,))
    prompts = [[5, 9, 33, 4, 7], [8, 2], [3, 3, 3, 60], [11]]
    mesh = make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4])
    single = Generator(target, MTPDrafter(2, sampled=True), settings=settings)
    sharded = Generator(target, MTPDrafter(2, sampled=True), settings=settings, mesh=mesh)
    a, b = single.generate(prompts, seed=7), sharded.generate(prompts, seed=7)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.accepted, b.accepted)
    assert a.lengths.sum() > len(prompts)
    refilled = sharded.generate(prompts, seed=7, batch=2)
    np.testing.assert_array_equal(refilled.tokens, a.tokens)
    np.testing.assert_array_equal(refilled.accepted, a.accepted)
    assert refilled.loop_steps > b.loop_steps and refilled.idle_row_steps == 0
    head = sharded.tstate["head"]["weight"][...]
    assert head.sharding.spec[0] == "tensor" and head.addressable_shards[0].data.shape[0] == cfg.vocab_size // 2
    plan = sharded.plan([len(p) for p in prompts])
    specs = {e for s in jax.tree.leaves(sharded._loop_shardings(plan).cache) for e in s.spec if e is not None}
    assert specs == {"data"}  # the row dimension of every cache array, stacked ones included
    compiled = sharded.lower(prompts, seed=7).compile()
    t_one = single.lower(prompts, seed=7).compile().memory_analysis().temp_size_in_bytes
    t_mesh = compiled.memory_analysis().temp_size_in_bytes
    assert t_mesh < 0.75 * t_one, (t_mesh, t_one)


def test_decode_rows_take_the_expert_axis_too(tmp_path):
    """On a mesh with an expert axis the decode state's rows are sharded over data AND expert ("DP attention + EP
    MoE": attention and caches have no expert dimension, so otherwise every expert group keeps a full copy of every
    row's cache); tokens and acceptance still equal one device, greedy with a block-sized MTP chain."""
    from hdflash_jax.config import get_preset
    from hdflash_jax.decode.drafters import MTPDrafter
    from hdflash_jax.decode.generate import DecodeSettings, Generator
    from hdflash_jax.deepseek_v4.model import init_target

    cfg = get_preset("tiny").replace(moe_dispatch="expert_parallel")
    target = init_target(cfg, 3)
    settings = DecodeSettings(max_new_tokens=10, prompt_buckets=(16,))
    prompts = [[5, 9, 33, 4, 7], [8, 2], [3, 3, 3, 60], [11]]
    mesh = make_mesh({"data": 2, "expert": 2, "tensor": 2})
    single = Generator(target, MTPDrafter(3), settings=settings)
    sharded = Generator(target, MTPDrafter(3), settings=settings, mesh=mesh)
    a, b = single.generate(prompts), sharded.generate(prompts)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.accepted, b.accepted)
    plan = sharded.plan([len(p) for p in prompts])
    specs = {e for s in jax.tree.leaves(sharded._loop_shardings(plan).cache) for e in s.spec if e is not None}
    assert specs == {("data", "expert")}, specs  # the row dimension of every cache array, stacked ones included


def test_mesh_argument_errors(tmp_path):
    assert ev.main(EVAL + ["--out", str(tmp_path / "x"), "--mesh", "data=64"]) == 2
    assert ev.main(EVAL + ["--out", str(tmp_path / "y"), "--mesh", "rows=2"]) == 2


def test_prompts_past_the_largest_default_bucket_fit_the_context():
    """No 4,096 ceiling: the default ladder doubles up to the model's context; an explicit list stays exact."""
    from hdflash_jax.decode.generate import DecodeSettings, plan_decode

    settings = DecodeSettings(max_new_tokens=100)
    plan = plan_decode(settings, 7, 131072, [5000])
    assert plan.bucket == 8192 and plan.max_len == 8192 + 108
    assert plan_decode(settings, 7, 131072, [131072 - 108]).max_len == 131072  # the whole context
    with pytest.raises(ValueError, match="context of 131072"):
        plan_decode(settings, 7, 131072, [131072 - 107])
    with pytest.raises(ValueError, match="largest bucket"):
        plan_decode(DecodeSettings(max_new_tokens=100, prompt_buckets=(16, 4096)), 7, 131072, [5000])


# ---- two processes on loopback (gloo) == one process --------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3",
               JAX_COMPILATION_CACHE_DIR=str(jax.config.jax_compilation_cache_dir or REPO / ".jax_cache"))
    return env


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    """Sampled, 4 prompts refilled through 2 rows: two processes (each holding one data shard of the rows) give one
    process's outputs."""
    port = _free_port()
    out = tmp_path / "two"
    procs = [subprocess.Popen([sys.executable, "-m", "eval.run", *EVAL, "--out", str(out), "--mesh", MESH,
                               "--temperature", "1", "--seed", "5", "--cpu-devices", "2", "--limit", "4",
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = [p.communicate(timeout=1500)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [x[-3000:] for x in logs]
    two = ([json.loads(x) for x in (out / "outputs.jsonl").read_text().splitlines()],
           json.loads((out / "results.json").read_text()))
    one = _run(tmp_path / "one", "--temperature", "1", "--seed", "5", "--limit", "4")
    assert two[0] == one[0]  # every output's text and token count, per method
    assert _cells(two[1]) == _cells(one[1])
    assert two[1]["config"]["processes"] == 2
