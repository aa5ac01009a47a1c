"""The AOT planner's generate program is the program `eval.run` compiles (one builder: `generate_program`), the
target programs count the MTP layer the process holds, and every figure says where it comes from."""

import functools
import json
import re

import jax
import pytest

from hdflash_jax.aot_plan import cli as mesh_plan
from hdflash_jax.aot_plan import target as plan_target
from hdflash_jax.aot_plan.programs import per_device_bytes
from hdflash_jax.config import PRESETS
from hdflash_jax.decode import generate as gen
from hdflash_jax.decode.generate import DecodeSettings, Generator
from hdflash_jax.deepseek_v4.model import init_target
from hdflash_jax.sharding import mesh_from_spec

ARGV = ["--preset", "tiny", "--layers", "3", "--mesh", "expert=2,tensor=2", "--program", "generate", "--batch", "4",
        "--seq", "32", "--context", "48", "--chunk", "8"]


def _planner_program(argv):
    args = mesh_plan._parse(argv)
    cfg = mesh_plan._config(args)
    mesh = mesh_from_spec(args.mesh, jax.devices(), use_first=True)
    return cfg, mesh, plan_target.build("generate", cfg, args, mesh)


def _text(lowered) -> str:
    """StableHLO of a lowering, without the module's name (the jitted function's name)."""
    return re.sub(r"^module @[\w.]+", "module", lowered.as_text(), count=1)


def test_the_planners_generate_is_the_generators_program():
    """Built by the same function from the same settings: the planner's program over abstract parameters lowers to
    the same StableHLO as the Generator's over real ones (shardings, chunked prefill, loop and all). Negative
    control: the planner's program for another chunk size lowers to another text."""
    cfg, mesh, prog = _planner_program(ARGV)
    assert prog.fn.func is gen._generate and prog.chunk == 8
    with jax.set_mesh(mesh):
        planned = _text(prog.jit(prog.fn).lower(*prog.args))
    settings = DecodeSettings(max_new_tokens=16, prompt_buckets=(32,), prefill_chunk=8)
    g = Generator(init_target(cfg, seed=0), settings=settings, mesh=mesh)
    assert g.program(g.plan([32] * 4)).fn.func is gen._generate
    run = _text(g.lower([[1] * 32] * 4))
    assert planned == run
    _, _, other = _planner_program(ARGV[:-1] + ["16"])
    with jax.set_mesh(mesh):
        assert _text(other.jit(other.fn).lower(*other.args)) != planned


def test_the_mtp_layer_is_counted_and_figures_say_where_they_come_from(tmp_path, capsys):
    """The target programs take the MTP layer (jit would drop it as unused; the process still holds it): the
    argument bytes exceed the same program's without an MTP layer by the MTP layer's parameter bytes per device
    (plus its small ring in the cache). Negative control: jitted without keep_unused, exactly the MTP layer's
    parameter bytes are dropped. Every figure in the JSON and the report names its source."""
    base = ["--preset", "tiny", "--layers", "3", "--mesh", "expert=2,tensor=2", "--program", "prefill", "--batch",
            "2", "--seq", "64"]
    no_mtp = PRESETS["tiny"].replace(n_mtp_layers=0, compress_ratios=PRESETS["tiny"].compress_ratios[:6])
    path = tmp_path / "no_mtp.json"
    path.write_text(json.dumps(no_mtp.to_dict()))
    out = tmp_path / "plan.json"
    with_mtp = mesh_plan.plan_programs(base + ["--json", str(out), "--fits", "h100"])[0]
    report = capsys.readouterr().out
    without = mesh_plan.plan_programs(["--preset", str(path)] + base[2:])[0]
    assert with_mtp.mtp_layers == 1 and without.mtp_layers == 0 and without.mtp_param_bytes == 0
    args = mesh_plan._parse(base)
    cfg = mesh_plan._config(args)
    mesh = mesh_from_spec(args.mesh, jax.devices(), use_first=True)
    prog = plan_target.build("prefill", cfg, args, mesh)
    # besides its parameters, a target with an MTP layer has the MTP layer's (small) ring in its cache
    ring = per_device_bytes(prog.args[2]["mtp"])
    assert 0 < ring < with_mtp.mtp_param_bytes / 10
    assert with_mtp.mtp_param_bytes <= with_mtp.argument_bytes - without.argument_bytes <= (
        with_mtp.mtp_param_bytes + ring)
    assert with_mtp.active_flops == without.active_flops  # the forward does not run it
    with jax.set_mesh(mesh):
        dropped = jax.jit(prog.fn, donate_argnums=prog.donate).lower(*prog.args).compile()
    assert dropped.memory_analysis().argument_size_in_bytes == with_mtp.argument_bytes - with_mtp.mtp_param_bytes

    row = json.loads(out.read_text())[0]
    assert row["mtp_param_bytes"] == with_mtp.mtp_param_bytes
    figures = [k for k, v in row.items() if k.endswith(("_bytes", "flops")) or k in ("bytes_accessed", "compile_s")]
    assert set(figures) - {"temp_fp32_weights_bytes"} <= set(row["sources"]), set(figures) - set(row["sources"])
    assert all(v.startswith(("XLA:CPU compile", "estimate", "formula", "abstract")) for v in row["sources"].values())
    assert row["sources"]["argument_bytes"].startswith("XLA:CPU compile")
    for line in report.splitlines()[1:]:  # the header, then one line per group of figures
        if re.search(r"\d", line):
            assert "XLA:CPU compile" in line or "estimate" in line or "formula" in line, line
    assert "bandwidth floor" in report and "(estimate: bytes accessed / HBM bandwidth)" in report



@pytest.mark.slow  # two train-program compiles; the target programs' MTP count is checked by default above
def test_the_train_program_counts_the_mtp_layer_the_trainer_holds(monkeypatch):
    """Online, the trainer holds the whole target (MTP layer included) though the step never reads the MTP layer:
    the train program takes it, compiled with keep_unused, and its argument bytes hold it. Offline (the drafter
    half) the trainer holds the embedding and head alone: nothing of the MTP layer."""
    from hdflash_jax.aot_plan import train as plan_train

    argv = ["--preset", "tiny", "--layers", "3", "--mesh", "fsdp=2,expert=2", "--program", "train", "--batch", "2",
            "--seq", "32", "--anchors", "4", "--drafter", "tiny-hyperdflash"]
    args = mesh_plan._parse(argv)
    cfg = mesh_plan._config(args)
    mesh = mesh_from_spec(args.mesh, jax.devices(), use_first=True)
    prog = plan_train.build("train", cfg, args, mesh)
    mtp = per_device_bytes(prog.args[1]["mtp"])
    assert cfg.n_mtp_layers == 1 and prog.mtp_bytes == mtp > 0
    result = mesh_plan.plan_programs(argv)[0]
    assert result.mtp_layers == 1 and result.mtp_param_bytes == mtp
    assert result.argument_bytes >= per_device_bytes(prog.args)  # every argument counted, the MTP layer too
    offline = plan_train.build("train", cfg, mesh_plan._parse(argv + ["--drafter-only"]), mesh)
    assert offline.mtp_bytes == 0 and "mtp" not in offline.args[1]
    # control: jitted as before (no keep_unused), the MTP layer is dropped from the arguments
    plain = plan_train.build
    monkeypatch.setattr(plan_train, "build", lambda *a: plain(*a)._replace(
        jit=functools.partial(jax.jit, donate_argnums=(0,))))
    dropped = mesh_plan.plan_programs(argv)[0]
    assert dropped.argument_bytes < per_device_bytes(prog.args)
