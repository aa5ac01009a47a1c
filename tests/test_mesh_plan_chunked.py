"""eval.mesh_plan --chunk: the prefill program through the cache in chunks compiles, reports its chunk, and needs
less temp memory than one call over the whole prompt (whose activations are [T, ...] wide)."""

import json

import pytest

from eval import mesh_plan


def test_chunked_prefill_plan(tmp_path):
    common = ["--preset", "tiny", "--layers", "3", "--mesh", "expert=2,tensor=2", "--program", "prefill",
              "--seq", "4096", "--override", "attention_chunk=64"]
    out = tmp_path / "plan.json"
    chunked = mesh_plan.main(common + ["--chunk", "256", "--json", str(out)])[0]
    whole = mesh_plan.main(common)[0]
    row = json.loads(out.read_text())[0]
    assert row["chunk"] == 256 and whole.chunk == 0
    assert chunked.loop_dot_flops > 0 and chunked.hlo_chars > 0
    assert 2 * chunked.temp_bytes < whole.temp_bytes


def test_chunk_must_be_positive():
    with pytest.raises(SystemExit, match="--chunk"):
        mesh_plan.main(["--preset", "tiny", "--layers", "1", "--mesh", "expert=2", "--chunk", "0"])
