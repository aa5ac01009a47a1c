"""The AOT planner (hdflash_jax.aot_plan): abstract-shape AOT compiles on simulated devices, per-device figures,
JSON, errors."""

import json

import pytest

from hdflash_jax.aot_plan import cli as mesh_plan
from hdflash_jax.errors import UsageError

KEYS = {"program", "preset", "layers", "mesh", "batch", "seq", "argument_bytes", "output_bytes", "temp_bytes",
        "alias_bytes", "flops", "bytes_accessed", "compile_s", "hlo_chars"}


def test_prefill_plan_json_and_linear_attention_memory(tmp_path, capsys):
    """CSA, HCA and SWA layers of the tiny model, 4096-token prompt on expert=2 x tensor=2: the JSON has every key,
    and chunked attention needs far less temp memory than the dense reference, whose score matrix is [T, T]."""
    common = ["--preset", "tiny", "--layers", "3", "--mesh", "expert=2,tensor=2", "--program", "prefill",
              "--seq", "4096", "--fits", "h100"]
    out = tmp_path / "plan.json"
    chunked = mesh_plan.plan_programs(common + ["--override", "attention_chunk=64", "--json", str(out)])[0]
    dense = mesh_plan.plan_programs(common + ["--override", "attention_impl=dense"])[0]
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and KEYS <= set(rows[0]) and rows[0]["mesh"] == {"expert": 2, "tensor": 2}
    assert rows[0]["layers"] == 3 and rows[0]["seq"] == 4096 and rows[0]["temp_bytes"] == chunked.temp_bytes
    assert chunked.flops > 0 and chunked.bytes_accessed > 0 and chunked.hlo_chars > 0
    assert chunked.loop_dot_flops >= chunked.flops * 0.5 and dense.loop_dot_flops > 0
    # dense holds H/2 x T x (R + T + N) fp32 scores per device: 2 heads x 4096 x 4096 x 4 bytes = 128 MiB at least
    assert dense.temp_bytes >= 128 * 2**20 > 2 * chunked.temp_bytes
    assert "h100:" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--program", "train", "--drafter", "nope"], "--drafter"),
    (["--program", "draft", "--drafter", "nope"], "--drafter"),
    (["--program", "decode"], "unknown"),
    (["--mesh", "expert=64"], "needs 64 devices"),
    (["--layers", "9"], "--layers"),
    (["--override", "attention_impl=flash"], "attention_impl"),
    (["--override", "scan_layers=maybe"], "expected true or false"),
    (["--preset", "nope"], "--preset"),
])
def test_bad_arguments_exit_with_a_message(argv, message):
    with pytest.raises(UsageError, match=message):
        mesh_plan.plan_programs(["--preset", "tiny", "--mesh", "expert=2", "--seq", "16"] + argv)


def test_loop_bodies_count_once_per_iteration():
    """cost_analysis counts a while-loop body once; loop_dot_flops multiplies it by the trip count."""
    import jax
    import jax.numpy as jnp

    x = jax.ShapeDtypeStruct((16, 64, 64), jnp.float32)
    compiled = jax.jit(lambda x: jax.lax.map(lambda a: a @ a, x)).lower(x).compile()
    flops, unknown = mesh_plan.loop_dot_flops(compiled.as_text())
    assert unknown == 0 and flops == 16 * 2 * 64 ** 3


def test_accelerator_temp_removes_the_cpus_fp32_weight_copies(capsys):
    """bf16 weights on XLA:CPU: the program keeps fp32 copies of the weights it multiplies, so its temp exceeds the
    same program's with fp32 weights (which have nothing to copy) by at least the copies of one layer's experts;
    the report gives both fits."""
    r = mesh_plan.plan_programs(["--preset", "tiny", "--layers", "3", "--mesh", "expert=2", "--program", "verify",
                        "--batch", "2", "--seq", "8", "--context", "256", "--fits", "h100", "--accelerator-temp",
                        "--override", "param_dtype=bfloat16", "--override", "dtype=bfloat16"])[0]
    assert 0 < r.temp_fp32_weights_bytes < r.temp_bytes
    assert "without the CPU's fp32 weight copies" in capsys.readouterr().out
    with pytest.raises(UsageError, match="only for the target's programs"):
        mesh_plan.plan_programs(["--preset", "tiny", "--mesh", "expert=2", "--program", "draft", "--seq", "8",
                        "--accelerator-temp"])
