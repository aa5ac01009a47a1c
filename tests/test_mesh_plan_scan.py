"""The AOT planner (hdflash_jax.aot_plan) under scan: a scanned unit adds (almost) no per-device temp memory, so nothing
of ours is held per unit (no stream, cache copy or weight copy that outlives its unit). fp32 weights, because XLA:CPU
makes an fp32 copy of every bf16 array that a scan slices, and hoists it out of the loop: with bf16 weights each
scanned layer adds its weights in fp32 to the CPU temp (docs/scaling.md, "The planner"); TPU/GPU slice bf16 natively."""

import json

from hdflash_jax.aot_plan import cli as mesh_plan
from hdflash_jax.config import PRESETS
from hdflash_jax.deepseek_v4.scan import layer_plan


def test_a_scanned_unit_adds_no_temp(tmp_path):
    cfg = PRESETS["tiny"].replace(n_layers=9, compress_ratios=(0, 4) + (8, 4) * 3 + (8, 0))
    path = tmp_path / "deep.json"
    path.write_text(json.dumps(cfg.to_dict()))
    seq = 2048
    common = ["--preset", str(path), "--mesh", "expert=2,tensor=2", "--program", "prefill", "--seq", str(seq),
              "--override", "moe_dispatch=expert_parallel", "--override", "attention_chunk=256"]
    plans = {n: layer_plan(cfg.replace(n_layers=n, compress_ratios=cfg.compress_ratios[:n], n_mtp_layers=0))
             for n in (7, 9)}
    assert (plans[7].n_units, plans[9].n_units) == (2, 3) and plans[7].prefix == plans[9].prefix  # one unit more
    two, three = (mesh_plan.plan_programs(common + ["--layers", str(n)])[0] for n in (7, 9))
    streams = seq * cfg.hc_mult * cfg.dim * 4  # one layer's output streams [T, n, D] fp32, unsharded
    assert three.hlo_chars < 1.05 * two.hlo_chars  # the unit is compiled once
    # measured: +14,848 B a unit; +285,824 B when the stacked caches were scan outputs (a second copy of them)
    assert three.temp_bytes - two.temp_bytes < streams / 32, (two.temp_bytes, three.temp_bytes)
