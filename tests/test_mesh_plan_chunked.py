"""The AOT planner (hdflash_jax.aot_plan) --chunk: the prefill program through the cache in chunks compiles, reports its
chunk, and needs less temp memory than one call over the whole prompt (whose activations are [T, ...] wide)."""

import json

import pytest

from hdflash_jax.aot_plan import cli as mesh_plan
from hdflash_jax.errors import UsageError


def test_chunked_prefill_plan(tmp_path):
    common = ["--preset", "tiny", "--layers", "3", "--mesh", "expert=2,tensor=2", "--program", "prefill",
              "--seq", "4096", "--override", "attention_chunk=64"]
    out = tmp_path / "plan.json"
    chunked = mesh_plan.plan_programs(common + ["--chunk", "256", "--json", str(out)])[0]
    whole = mesh_plan.plan_programs(common)[0]
    row = json.loads(out.read_text())[0]
    assert row["chunk"] == 256 and whole.chunk == 0
    assert chunked.loop_dot_flops > 0 and chunked.hlo_chars > 0
    assert 2 * chunked.temp_bytes < whole.temp_bytes


def test_chunk_must_be_positive():
    with pytest.raises(UsageError, match="--chunk"):
        mesh_plan.plan_programs(["--preset", "tiny", "--layers", "1", "--mesh", "expert=2", "--chunk", "0"])
