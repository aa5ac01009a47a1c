"""Nothing a command did not create is ever deleted: the one output rule (`hdflash_jax.fileio.check_output`) held
against random arrangements of inputs and outputs, for every command that writes, and the commands that continue
an earlier output (a resumed training run, a corrupt checkpoint, an interrupted conversion).

The property: for any arrangement (the output equal to an input, nested in it either way, a sibling, a symlink to
either, a folder of the user's own files, the checkout), with or without --overwrite, a command either refuses in
one line (exit 2) having changed nothing, or succeeds having changed nothing outside its output.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from hdflash_jax.errors import OutputRefused
from hdflash_jax.fileio import OutputKind, atomic_dir, check_output, has_files
from tests.test_bad_inputs import official_tensors, snapshot, tiny_cfg

REPO = Path(__file__).resolve().parents[1]
OWN = OutputKind("an output of this kind (own.txt)", has_files("own.txt"))


# ---- the rule itself, on random trees ---------------------------------------------------------------------------

ARRANGEMENTS = ("equal", "inside", "contains", "sibling_new", "sibling_users", "sibling_own", "link_to_input",
                "link_to_ancestor", "input_via_link", "empty_folder")
REFUSED = {"equal", "inside", "contains", "link_to_input", "link_to_ancestor", "input_via_link", "sibling_users"}


def arrange(world: Path, how: str, depth: int, input_is_file: bool) -> tuple[Path, Path]:
    """(input as given to the command, output path) inside `world` for one arrangement."""
    parent = world.joinpath(*[f"d{i}" for i in range(depth)])
    parent.mkdir(parents=True, exist_ok=True)
    inp = parent / "input"
    if input_is_file:
        inp.write_text("input bytes")
    else:
        inp.mkdir()
        (inp / "data.bin").write_bytes(b"\x00\x01input")
    given_input = inp
    if how == "equal":
        out = inp
    elif how == "inside":
        out = inp / "out"
    elif how == "contains":
        out = world if depth == 0 else world / "d0"
    elif how == "sibling_new":
        out = parent / "out"
    elif how == "sibling_users":
        out = parent / "mine"
        out.mkdir()
        (out / "notes.txt").write_text("the user's own")
    elif how == "sibling_own":
        out = parent / "earlier"
        out.mkdir()
        (out / "own.txt").write_text("an earlier output")
    elif how == "empty_folder":
        out = parent / "empty"
        out.mkdir()
    elif how == "link_to_input":
        out = world / "link"
        out.symlink_to(inp)
    elif how == "link_to_ancestor":
        out = world / "link"
        out.symlink_to(parent)
    else:  # input_via_link: the command is given a symlink to the input, the output is the input itself
        given_input = world / "inlink"
        given_input.symlink_to(inp)
        out = inp
    return given_input, out


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(how=st.sampled_from(ARRANGEMENTS), depth=st.integers(0, 3), input_is_file=st.booleans(),
       overwrite=st.booleans(), reuse=st.booleans())
def test_output_rule_never_touches_an_input(how, depth, input_is_file, overwrite, reuse):
    """`check_output` + the atomic writer: refused arrangements change nothing anywhere; accepted ones change
    nothing outside the output."""
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        world.mkdir()
        given_input, out = arrange(world, how, depth, input_is_file)
        before = snapshot(world)
        try:
            check_output(out, flag="--out", kind=OWN, inputs=[("the input --in", given_input)], overwrite=overwrite,
                         reuse=reuse)
            with atomic_dir(out, overwrite=True) as t:  # what a command then writes
                (t / "own.txt").write_text("new output")
            refused = None
        except OutputRefused as e:
            refused = str(e)
        after = snapshot(world)
        if how in REFUSED or (how == "sibling_own" and not (overwrite or reuse)):
            assert refused is not None and refused.startswith(f"--out {out}: "), (how, refused)
            assert after == before
        else:
            assert refused is None, (how, refused)
            rel = str(out.relative_to(world))
            changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
            assert all(k == rel or k.startswith(rel + "/") for k in changed), (how, changed)
            assert (out / "own.txt").read_text() == "new output"


@pytest.mark.parametrize("how", ["equal", "contains", "link_to_ancestor", "sibling_users"])
def test_negative_control_without_the_rule_inputs_are_lost(how, tmp_path):
    """The same write without `check_output` (what every command did with --overwrite before): the snapshot
    comparison above sees the input or the user's files destroyed."""
    world = tmp_path / "world"
    world.mkdir()
    given_input, out = arrange(world, how, 1, input_is_file=False)
    before = snapshot(world)
    with atomic_dir(out, overwrite=True) as t:
        (t / "own.txt").write_text("new output")
    after = snapshot(world)
    lost = {k for k in before if k not in after or (before[k] != after[k] and before[k] != "dir")}
    assert lost, how


@pytest.mark.parametrize("target", ["checkout", "checkout_parent", "home", "git"])
def test_output_rule_protects_the_checkout_and_home(target, tmp_path):
    path = {"checkout": REPO, "checkout_parent": REPO.parent, "home": Path.home(), "git": REPO / ".git" / "x"}[target]
    with pytest.raises(OutputRefused, match="checkout|home folder|filesystem root|current folder"):
        check_output(path, flag="--out", kind=OWN, overwrite=True, reuse=True)


# ---- every command, on random arrangements ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One of each input a command reads: an official checkpoint, a converted target, a drafter, a data file."""
    from convert import torch_to_flax as t2f
    from hdflash_jax.safetensors_io import write_safetensors
    from hdflash_jax.config import get_drafter_preset
    from hdflash_jax.families import family
    from hdflash_jax.drafter.model import init_drafter

    root = tmp_path_factory.mktemp("sources")
    cfg = tiny_cfg()
    src = root / "official"
    src.mkdir()
    write_safetensors(src / "model.safetensors", official_tensors(cfg))
    d = cfg.to_dict()
    d.update(dtype="fp8", scale_fmt="ue8m0", expert_dtype="fp4")
    (src / "config.json").write_text(json.dumps(d))
    t2f.convert(src, root / "target", dtype="fp32", progress=False, log=lambda *_: 0)
    dcfg = get_drafter_preset("tiny-hyperdflash")
    family("block").save(root / "drafter", init_drafter(dcfg), dcfg)
    (root / "data.jsonl").write_text("".join(json.dumps({"id": i, "prompt": "ab", "response": "xyz" * 3}) + "\n"
                                             for i in range(8)))
    return root


# command -> (which source is its input, whether the input is a file, argv given (input, output, overwrite))
def _convert(i, o, ow):
    return ["--src", str(i), "--dst", str(o), "--quiet"] + (["--overwrite"] if ow else [])


def _export(i, o, ow):
    return ["--to", "zlab", "--src", str(i), "--dst", str(o)] + (["--overwrite"] if ow else [])


def _eval(i, o, ow):
    return ["--target", str(i), "--tokenizer", "byte", "--suite", "gsm8k", "--limit", "1", "--method", "ar",
            "--max-new-tokens", "2", "--prompt-buckets", "512", "--quiet", "--out", str(o)] + \
        (["--overwrite"] if ow else [])


def _train(i, o, ow, target=None):
    cfg = {"out_dir": str(o), "target": {"preset": "tiny"}, "data": {"train": str(i), "max_len": 32,
                                                                      "num_anchors": 4},
           "drafter": {"kind": "block", "n_layers": 1, "block_size": 4}, "train": {"global_batch": 8, "steps": 1},
           "eval": {"every": 0, "at_start": False}, "log": {"progress": False, "tensorboard": False}}
    f = Path(tempfile.mkdtemp()) / "cfg.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return ["--config", str(f)] + (["--overwrite"] if ow else [])


def _regen(i, o, ow):
    return ["--target", "tiny", "--data", str(i), "--out", str(o), "--no-progress", "--max-new-tokens", "2"]


COMMANDS = {  # name: (module, argv builder, source name, cheap enough to run the accepted arrangements)
    "convert": ("convert.torch_to_flax", _convert, "official", True),
    "export": ("convert.drafter_export", _export, "drafter", True),
    "eval": ("eval.run", _eval, "target", False),
    "train": ("train.drafter", _train, "data.jsonl", False),
    "regenerate": ("train.regenerate", _regen, "data.jsonl", False),
}


def _run_main(module: str, argv: list[str], capsys) -> tuple[int, str]:
    import importlib

    rc = importlib.import_module(module).main(argv)
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cmd=st.sampled_from(sorted(COMMANDS)), how=st.sampled_from(sorted(REFUSED) + ["sibling_new"]),
       depth=st.integers(0, 2), overwrite=st.booleans())
def test_no_command_changes_an_input(cmd, how, depth, overwrite, sources, capsys):
    """Every writing command on random arrangements of its input and output: a refusal is one line, exit 2, and
    leaves the world byte-identical; a run leaves everything outside its output byte-identical (the accepted
    arrangements run for the cheap commands only; the others' runs are in the slow twin and their own tests)."""
    module, argv_of, source, cheap = COMMANDS[cmd]
    if how == "sibling_new" and not cheap:
        return
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        world.mkdir()
        src = sources / source
        file_input = src.is_file()
        given_input, out = arrange(world, how, depth, input_is_file=file_input)
        real_input = given_input.resolve()
        if file_input:
            shutil.copy2(src, real_input)
        else:
            shutil.rmtree(real_input)
            shutil.copytree(src, real_input)
        before = snapshot(world)
        rc, text = _run_main(module, argv_of(given_input, out, overwrite), capsys)
        after = snapshot(world)
        if how in REFUSED:
            errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
            assert rc == 2 and len(errors) == 1 and "Traceback" not in text, (cmd, how, text[-2000:])
            assert after == before, (cmd, how)
        else:
            assert rc == 0, (cmd, how, text[-2000:])
            rel = str(out.relative_to(world))
            changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
            assert changed and all(k == rel or k.startswith(rel + "/") for k in changed), (cmd, changed)


@pytest.mark.slow
@pytest.mark.parametrize("cmd", ["eval", "train", "regenerate"])
def test_expensive_commands_write_only_their_output(cmd, sources, capsys, tmp_path):
    module, argv_of, source, _ = COMMANDS[cmd]
    world = tmp_path / "world"
    given_input, out = arrange(world, "sibling_new", 2, input_is_file=(sources / source).is_file())
    shutil.copy2(sources / source, given_input) if given_input.is_file() else (
        shutil.rmtree(given_input), shutil.copytree(sources / source, given_input))
    before = snapshot(world)
    rc, text = _run_main(module, argv_of(given_input, out, False), capsys)
    assert rc == 0, text[-2000:]
    after = snapshot(world)
    rel = str(out.relative_to(world))
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert changed and all(k == rel or k.startswith(rel + "/") for k in changed), changed


# ---- commands that continue an earlier output ------------------------------------------------------------------

def _train_cfg(tmp_path: Path, sources: Path, **over) -> Path:
    cfg = {"out_dir": str(tmp_path / "run"), "target": {"checkpoint": str(sources / "target")},
           "data": {"train": str(sources / "data.jsonl"), "max_len": 32, "num_anchors": 4},
           "drafter": {"kind": "block", "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "head_dim": 16, "inter_dim": 32,
                       "block_size": 4},
           "train": {"global_batch": 8, "steps": 4}, "checkpoint": {"every": 2, "max_to_keep": 5},
           "optim": {"lr": 3e-3, "warmup_frac": 0.0, "end_lr_frac": 1.0},
           "eval": {"every": 0, "at_start": False}, "log": {"every": 1, "progress": False, "tensorboard": False},
           "export_drafter": False}
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    f = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*')))}.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return f


def _train_main(argv, capsys) -> tuple[int, str]:
    from train import drafter as td

    rc = td.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def test_train_resume_checks_the_config_and_a_corrupt_step(sources, tmp_path, capsys):
    """A resumed run with another config is refused naming the keys, before its records are touched; an
    unreadable newest step is refused naming it and the newest intact step, and --resume-intact continues from
    there to the same final parameters as an uninterrupted run."""
    from train.drafter import load_run_params

    rc, out = _train_main(["--config", str(_train_cfg(tmp_path, sources))], capsys)
    assert rc == 0, out
    run = tmp_path / "run"
    records = {f: (run / f).read_bytes() for f in ("config.yaml", "drafter_config.json")}
    _, final = load_run_params(run)
    # another config: refused, naming what differs, the run's records and checkpoints untouched
    before = snapshot(run)
    rc, out = _train_main(["--config", str(_train_cfg(tmp_path, sources, train={"steps": 6},
                                                      optim={"lr": 1e-3}))], capsys)
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(errors) == 1, out
    assert "train.steps: 4 -> 6" in errors[0] and "optim.lr: 0.003 -> 0.001" in errors[0], errors[0]
    assert snapshot(run) == before and all((run / f).read_bytes() == b for f, b in records.items())
    # what may change on a resume (logging, evaluation) is accepted: nothing left to train, the same params
    rc, out = _train_main(["--config", str(_train_cfg(tmp_path, sources, log={"every": 2}))], capsys)
    assert rc == 0, out
    # the newest step corrupt: refused naming it and the newest intact one; --resume-intact continues from it
    for f in (run / "checkpoints" / "4" / "state").rglob("d/*"):
        f.write_bytes(b"garbage")
    before = snapshot(run)
    rc, out = _train_main(["--config", str(_train_cfg(tmp_path, sources))], capsys)
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in out, out
    assert f"{run}/checkpoints/4: entry '" in errors[0] and "the newest intact step is 2" in errors[0]
    assert "--resume-intact" in errors[0] and snapshot(run) == before
    rc, out = _train_main(["--config", str(_train_cfg(tmp_path, sources)), "--resume-intact"], capsys)
    assert rc == 0 and "continuing from step 2" in out, out
    step, again = load_run_params(run)
    assert step == 4
    import jax

    # steps 3-4 retrained from step 2 (same data order, same carried state) reproduce the first run exactly
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)


def test_refused_training_run_leaves_nothing(sources, tmp_path, capsys):
    """A run refused after its folder checks (a data file with no supervised token) leaves no run folder."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("".join(json.dumps({"prompt": "q", "response": ""}) + "\n" for _ in range(3)))
    cfg = _train_cfg(tmp_path, sources, data={"train": str(empty)})
    rc, out = _train_main(["--config", str(cfg)], capsys)
    assert rc == 2 and f"{empty}: no supervised token in the 3 records" in out, out
    assert not (tmp_path / "run").exists()


def test_training_warns_when_many_records_supervise_nothing(capsys):
    from hdflash_jax.tokenizer import load_tokenizer
    from train.data import records_check

    class Rows(list):
        path = "rows.jsonl"

        def where(self, i):
            return f"rows.jsonl:{i + 1}"

    tok = load_tokenizer("byte")
    r = records_check(Rows([{"prompt": "q", "response": ""}] * 3 + [{"prompt": "q", "response": "abc"}]), tok, 32)
    assert r["records_without_supervision"] == 3
    assert "rows.jsonl: 3 of the 4 records (75%) have no supervised token" in capsys.readouterr().err
    with pytest.raises(ValueError, match="rows.jsonl: no supervised token in the 4 records"):
        records_check(Rows([{"prompt": "q", "response": ""}] * 4), tok, 32)
    # cut by max_len: a prompt that fills the row leaves no supervised position either
    with pytest.raises(ValueError, match="data.max_len 16"):
        records_check(Rows([{"prompt": "q" * 40, "response": "abc"}]), tok, 16)
    assert records_check(Rows([{"prompt": "q", "response": "ab"}]), tok, 32)["records_without_supervision"] == 0


# ---- the converter interrupted, and the exporter's message on what z-lab cannot load ---------------------------

def test_ctrl_c_during_a_conversion_leaves_nothing(sources, tmp_path):
    """SIGINT while shards are being converted: one line, exit 130, no DST and no DST.tmp-* left."""
    from convert.torch_to_flax import SLEEP_ENV

    dst = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(REPO / "convert" / "torch_to_flax.py"), "--src",
                             str(sources / "official"), "--dst", str(dst), "--quiet"],
                            env={**os.environ, "PYTHONPATH": str(REPO), SLEEP_ENV: "30"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = 120
    import time

    t0 = time.time()
    while not list(tmp_path.glob("out.tmp-*")) and time.time() - t0 < deadline:
        time.sleep(0.2)
    assert list(tmp_path.glob("out.tmp-*")), "the conversion never started writing"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        "error: interrupted; nothing half-written was left behind"] and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_zlab_export_says_what_zlab_cannot_load(sources, tmp_path, capsys):
    """The z-lab export of a multi-stream DFlash drafter (hc_mult > 1) and of HyperDFlash's gate: written, and the
    command says z-lab's class cannot load them (zlab_loadable false); a one-stream DFlash drafter is loadable."""
    from convert import drafter_export as de
    from hdflash_jax.config import get_drafter_preset
    from hdflash_jax.families import family
    from hdflash_jax.drafter.model import init_drafter

    for preset, loadable, note in [("tiny-dflash", False, "fc is [D, K·n·D]"),
                                   ("tiny-hyperdflash", False, "HyperDFlash gate")]:
        cfg = get_drafter_preset(preset)
        src = family("block").save(tmp_path / preset, init_drafter(cfg), cfg)
        rc = de.main(["--to", "zlab", "--src", str(src), "--dst", str(tmp_path / f"{preset}-zlab")])
        cap = capsys.readouterr()
        assert rc == 0, cap.err
        assert json.loads(cap.out.splitlines()[-1])["zlab_loadable"] is loadable
        assert "z-lab's DFlashDraftModel cannot load this export" in cap.err and note in cap.err, cap.err
    one = get_drafter_preset("tiny-dflash").replace(hc_mult=1)
    src = family("block").save(tmp_path / "one", init_drafter(one), one)
    rc = de.main(["--to", "zlab", "--src", str(src), "--dst", str(tmp_path / "one-zlab")])
    cap = capsys.readouterr()
    assert rc == 0 and json.loads(cap.out.splitlines()[-1])["zlab_loadable"] is True and "note:" not in cap.err
