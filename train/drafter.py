"""Distributed training of a drafter (HyperDFlash / vanilla DFlash, or DSpark with `drafter.kind: dspark`) against a
frozen DeepSeek-V4 target.

    python -m train.drafter --config FILE [--override key=value ...] [--mesh data=2,fsdp=2,tensor=2]
        [--coordinator HOST:PORT --num-processes N --process-id I | --distributed auto] [--cpu-devices N]
    python -m train.drafter --config FILE --capture-features [--overwrite]   # offline features (train.features)

The config (`hdflash_jax.train_config.DrafterRunConfig`, YAML or JSON; examples in train/configs/) is checked when
it is read: a bad value or key stops with one line naming its path (exit 2). The pieces:
* `train.trainer.Trainer`: target, drafter, optimizer (`hdflash_jax.training.optim`), shardings and the jitted step;
* `hdflash_jax.distributed`: `jax.distributed.initialize` (explicit `--coordinator/--num-processes/--process-id`, the
  env vars HDFLASH_COORDINATOR / HDFLASH_NUM_PROCESSES / HDFLASH_PROCESS_ID, or `--distributed auto` for TPU
  pods and SLURM auto-detection; on CPU the collectives are gloo) and the per-process rows of a global batch;
* `train.checkpointing.Checkpointer`: every `checkpoint.every` steps and at the end, the drafter params,
  optimizer state, step, RNG and the grain iterator state; a run restarted on the same out_dir continues exactly;
* `train.metrics.MetricsWriter`: loss, ce, kl, per-slot accuracy, lr, grad norm, tokens/s to
  `<out_dir>/metrics.jsonl` (and TensorBoard); `train.evaluator.Evaluator`: held-out τ every `eval.every` steps.
The run folder keeps the resolved config (`config.yaml`) and the drafter's config (its family's config file).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml
from tqdm import tqdm

from hdflash_jax.cli import run_command
from hdflash_jax.distributed import init_distributed, log, rows_str
from hdflash_jax.errors import CommandError, UsageError
from hdflash_jax.fileio import OutputKind, atomic_write_text, check_output, has_files
from hdflash_jax.train_config import DrafterRunConfig, load_config
from hdflash_jax.typed_config import to_dict
from train.checkpointing import Checkpointer
from train.data import make_iterator
from train.evaluator import Evaluator, eval_prompts
from train.metrics import MetricsWriter, peak_flops, throughput, to_py
from train.trainer import Trainer, build_target  # noqa: F401 — build_target: part of this module's interface

__all__ = ["DrafterRunConfig", "Trainer", "build_target", "load_config", "load_run_params", "main", "run"]


def load_run_params(out_dir: str | os.PathLike, step: int | None = None) -> tuple[int, dict]:
    """(step, drafter params as numpy) of a run's checkpoint (the latest by default), on any topology, without
    building a model."""
    ck = Checkpointer(Path(out_dir) / "checkpoints", read_only=True)
    try:
        step, state = ck.restore_numpy(step)
    finally:
        ck.close()
    return step, state["params"]


RUN_FOLDER = OutputKind("a train.drafter run folder (config.yaml)", has_files("config.yaml"))
# what a resumed run may change: where and how it runs, logs and evaluates; everything else (target, drafter, data,
# steps, loss, optimizer, seeds) is what the checkpoints were trained with
RESUMABLE = ("out_dir", "resume", "mesh", "compilation_cache", "log", "debug", "eval", "export_drafter", "checkpoint")


def run_inputs(cfg: DrafterRunConfig) -> list[tuple[str, str | None]]:
    """What a run reads (an output may not be, hold or lie inside any of them)."""
    tok = cfg.data.tokenizer if Path(cfg.data.tokenizer).exists() else None  # 'byte', 'deepseek-v4': not paths
    return [("the target target.checkpoint", cfg.target.checkpoint), ("the data data.train", cfg.data.train),
            ("the data data.eval", cfg.data.eval), ("the tokenizer data.tokenizer", tok),
            ("the compilation cache", cfg.compilation_cache), ("the features features.dir", cfg.features.dir)]


def config_changes(old, new, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs, as 'key: old -> new'."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in list(old) + [k for k in new if k not in old]:
            out += config_changes(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def check_run_folder(cfg: DrafterRunConfig, overwrite: bool = False) -> bool:
    """Before any compute: out_dir by the one output rule (`fileio.check_output`), and a resume against the run
    it continues. Returns whether an earlier run's checkpoints will be resumed.

    A run folder is continued when `resume` is true; its config.yaml must then equal this run's but for the
    `RESUMABLE` sections (the differing keys are named); `overwrite` replaces it instead."""
    out = Path(cfg.out_dir)
    check_output(out, flag="out_dir", kind=RUN_FOLDER, inputs=run_inputs(cfg), overwrite=overwrite,
                 reuse=cfg.resume)
    if overwrite or not (out / "config.yaml").is_file():
        return False
    has_steps = any(p.name.isdigit() for p in (out / "checkpoints").iterdir()) if (out / "checkpoints").is_dir() \
        else False
    if not has_steps:
        return False
    try:
        old = yaml.safe_load((out / "config.yaml").read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"{out / 'config.yaml'}: not valid YAML ({e}); the run folder no longer describes its "
                         f"checkpoints") from None
    new = to_dict(cfg)
    changed = [c for c in config_changes(old, new) if c.split(":")[0].split(".")[0] not in RESUMABLE]
    if changed:
        raise UsageError(f"out_dir {cfg.out_dir}: resuming a run trained with another config ({'; '.join(changed)}); "
                         f"use a new out_dir, pass --overwrite to replace the run, or resume with its "
                         f"{out / 'config.yaml'}")
    return True


def _write_run_files(cfg: DrafterRunConfig, trainer: Trainer, out_dir: Path) -> None:
    """The run's records, written once the run is accepted (after a resume has been checked against them)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    atomic_write_text(out_dir / trainer.family.config_file, json.dumps(trainer.dcfg.to_dict(), indent=1))


def _make_evaluator(cfg: DrafterRunConfig, trainer: Trainer, target_params, state) -> Evaluator | None:
    ev = cfg.eval
    if not (ev.every or ev.at_start) or not cfg.data.eval:
        return None
    prompts = eval_prompts(cfg.data.eval, trainer.tokenizer, ev.num_prompts)
    return Evaluator(trainer, target_params, state["params"], prompts, batch_size=ev.batch_size,
                     max_new_tokens=ev.max_new_tokens, temperature=ev.temperature)


class _Throughput:
    """Steps, tokens and model FLOPs per second (MFU where the chip's peak is known) over the steps since the last
    log line (the first, compiling step apart)."""

    def __init__(self, seq_tokens: int, flops_per_step: float):
        self.seq_tokens, self.flops_per_step = seq_tokens, flops_per_step
        self.peak, self.n_devices = peak_flops(), jax.device_count()
        self.t0, self.n = time.time(), 0
        self.timed_steps, self.timed_s = 0, 0.0

    def restart(self) -> None:
        self.t0, self.n = time.time(), 0

    def rates(self, supervised_tokens: float) -> dict:
        dt = max(time.time() - self.t0, 1e-9)
        out = {}
        if self.n:
            out = throughput(self.n, dt, self.seq_tokens, self.flops_per_step, self.n_devices, self.peak)
            out["supervised_tokens_per_s"] = self.n * supervised_tokens / dt
            self.timed_steps, self.timed_s = self.timed_steps + self.n, self.timed_s + dt
        self.restart()
        return out


def _train_loop(cfg: DrafterRunConfig, trainer: Trainer, state, target_params, it, ck: Checkpointer,
                writer: MetricsWriter, evaluate, summary: dict, start: int, total: int):
    """Steps start..total: log, checkpoint and evaluate on their schedules; returns (state, last log record)."""
    ck_every, ev_every = cfg.checkpoint.every, cfg.eval.every
    bar = tqdm(total=total, initial=start, disable=not (jax.process_index() == 0 and cfg.log.progress),
               desc="train", dynamic_ncols=True)
    speed = _Throughput(trainer.global_batch * cfg.data.max_len, trainer.step_flops())
    step, last = start, None
    try:
        while step < total:
            local = next(it)
            t0 = time.time()
            state, metrics = trainer.train_step(state, target_params, local)
            step += 1
            if "first_step_s" not in summary:  # compile + one step
                jax.block_until_ready(metrics["loss"])
                summary["first_step_s"] = time.time() - t0
                speed.restart()
            else:
                speed.n += 1
            bar.update(1)
            if step % cfg.log.every == 0 or step == total:
                m = to_py(metrics)
                last = {"step": step, **m, **speed.rates(m["n_tokens"])}
                writer.write(last)
                bar.set_postfix(loss=f"{m['loss']:.4f}", acc1=f"{m['acc'][0]:.3f}")
            if (ck_every and step % ck_every == 0) or step == total:
                ck.save(step, state, it.get_state())
            if evaluate is not None and ev_every and (step % ev_every == 0 or step == total):
                summary["eval_end"] = evaluate(state, step)
            if cfg.debug.step_sleep:
                time.sleep(cfg.debug.step_sleep)
    finally:
        bar.close()
        ck.wait()
    summary["steps_per_s"] = speed.timed_steps / speed.timed_s if speed.timed_s else None
    return state, step, last


def run(cfg: DrafterRunConfig, mesh=None, *, target=None, overwrite: bool = False,
        resume_intact: bool = False) -> dict:
    """Train as configured; returns a summary (steps, last metrics, τ at start/end when eval is on, timings).

    Checked before any compute: the output folder and a resume (`check_run_folder`). A run refused later, before
    its first step (bad data, an unreadable checkpoint), leaves nothing it created behind. `resume_intact`: when
    the newest checkpoint cannot be read, continue from the newest one that can (the unreadable ones are
    deleted); without it such a run stops and names that step."""
    out_dir = Path(cfg.out_dir)
    resuming = check_run_folder(cfg, overwrite)
    created = [p for p in (out_dir, out_dir / "checkpoints") if not p.exists()]
    if overwrite and out_dir.exists() and any(out_dir.iterdir()):
        shutil.rmtree(out_dir)  # an earlier run folder of this command (check_output checked its kind)
        created = [out_dir]
    accepted: list[bool] = []  # set by _run once the run's records are written: from then on a failure keeps them
    try:
        if cfg.compilation_cache:
            jax.config.update("jax_compilation_cache_dir", str(cfg.compilation_cache))
        return _run(cfg, mesh, target, resuming, resume_intact, accepted)
    except BaseException:
        if not accepted and jax.process_index() == 0:
            for p in created:  # a refused run leaves nothing behind (only what this run created goes)
                shutil.rmtree(p, ignore_errors=True)
        raise


def _restore(ck: Checkpointer, trainer: Trainer, resume_intact: bool):
    """(state, data state) of the newest checkpoint, or of the newest intact one with `resume_intact`."""
    abstract = trainer.abstract_state()
    latest = ck.latest_step()
    try:
        return ck.restore(latest, abstract)
    except ValueError as e:
        intact = ck.newest_intact(abstract, below=latest)
        if intact is None:
            raise UsageError(f"{e}; no earlier step restores either: start a new out_dir") from None
        if not resume_intact:
            raise UsageError(f"{e}; the newest intact step is {intact[0]}: pass --resume-intact to continue from "
                             f"it (the unreadable steps after it are deleted)") from None
        for step in ck.all_steps():
            if step > intact[0]:
                ck.delete(step)
        log(f"note: continuing from step {intact[0]}, the newest intact checkpoint ({e})")
        return intact[1], intact[2]


def _run(cfg: DrafterRunConfig, mesh, target, resuming: bool, resume_intact: bool, accepted: list) -> dict:
    out_dir = Path(cfg.out_dir)
    t_setup = time.time()
    trainer = Trainer(cfg, mesh, target=target)
    source, batches, total = trainer.dataset()
    trainer.setup_optimizer(total)
    log(f"drafter {trainer.family.describe(trainer.dcfg)}, B={trainer.block_size}, "
        f"{trainer.n_params:,} trainable params; {len(source)} records, {total} steps of global batch "
        f"{trainer.global_batch}; mesh {dict(trainer.mesh.shape)}, {jax.process_count()} process(es), "
        f"rows {rows_str(trainer.rows)} here")
    target_params = trainer.place_target()
    it = make_iterator(batches, prefetch=cfg.data.prefetch)
    ck = Checkpointer(out_dir / "checkpoints", cfg.checkpoint.max_to_keep)
    if resuming and ck.latest_step() is not None:
        state, data_state = _restore(ck, trainer, resume_intact)
        it.set_state(data_state)
        log(f"resumed from {ck.directory} at step {int(np.asarray(state['step']))}")
    else:
        state = trainer.init_state()
    if jax.process_index() == 0:  # the run is accepted: its records describe what its checkpoints hold
        _write_run_files(cfg, trainer, out_dir)
    accepted.append(True)
    start = int(np.asarray(state["step"]))
    writer = MetricsWriter(out_dir, start, cfg.log.tensorboard)
    evaluator = _make_evaluator(cfg, trainer, target_params, state)
    summary: dict[str, Any] = {"start_step": start, "total_steps": total, "n_params": trainer.n_params}

    def evaluate(st, at_step: int) -> dict:
        t0 = time.time()
        r = evaluator(st["params"])
        r["eval_time_s"] = time.time() - t0
        writer.write({"step": at_step, **r})
        log(f"step {at_step}: held-out tau {r['eval_tau']:.3f} (acceptance by position "
            f"{[round(x, 3) for x in r['eval_accept_rate']]})")
        return r

    if evaluator is not None and cfg.eval.at_start and start == 0:
        summary["eval_start"] = evaluate(state, 0)
    summary["setup_s"] = time.time() - t_setup
    try:
        state, step, last = _train_loop(cfg, trainer, state, target_params, it, ck, writer,
                                        evaluate if evaluator is not None else None, summary, start, total)
    finally:
        writer.close()
    summary.update(final=last, steps=step)
    if cfg.export_drafter:
        _export(trainer, state["params"], out_dir)
    if jax.process_index() == 0:
        atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=1))
    ck.close()
    return summary


def _export(trainer: Trainer, params, out_dir: Path) -> None:
    """A checkpoint of the drafter's family at <out_dir>/drafter."""
    if jax.process_count() > 1:  # save_drafter is a single-process writer; the orbax checkpoints have the params
        log("note: export_drafter skipped with several processes (train.drafter.load_run_params reads the "
            "latest checkpoint's params)")
        return
    trainer.family.save(out_dir / "drafter", trainer.drafter_module(params), trainer.dcfg, overwrite=True)


# ---- CLI -------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.drafter", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML/JSON config (hdflash_jax.train_config.DrafterRunConfig)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted key = YAML value, e.g. optim.lr=3e-4 (repeatable)")
    p.add_argument("--mesh", default=None, help="mesh axes, e.g. data=2,fsdp=2,tensor=2 (default: data=all devices)")
    p.add_argument("--out", default=None, help="out_dir (same as --override out_dir=...)")
    p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (multi-process)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--distributed", choices=("off", "auto"), default="off",
                   help="auto: jax.distributed.initialize() with cluster auto-detection (TPU pods, SLURM)")
    p.add_argument("--cpu-devices", type=int, default=None, help="simulated CPU devices in this process")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run in out_dir (default: resume it when the config agrees)")
    p.add_argument("--resume-intact", action="store_true",
                   help="when the newest checkpoint cannot be read, continue from the newest one that can")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--capture-features", action="store_true",
                   help="run the frozen target once over data.train and write features.dir (offline features for a "
                        "run with features.mode: offline), then exit; --overwrite replaces an earlier capture")
    return p.parse_args(argv)


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    flags = {k: v for k, v in (("out_dir", args.out), ("mesh", args.mesh)) if v is not None}
    cfg = load_config(args.config, args.override, data=flags)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    try:
        init_distributed(args.coordinator, args.num_processes, args.process_id, args.distributed, args.cpu_devices)
        if args.capture_features:
            from train.features import capture

            summary = capture(cfg, overwrite=args.overwrite, progress=cfg.log.progress)
            if jax.process_index() == 0:
                print(json.dumps(summary))
            return 0
        summary = run(cfg, overwrite=args.overwrite, resume_intact=args.resume_intact)
    except (FileNotFoundError, ValueError) as e:  # a bad checkpoint, data file or tokenizer, named in the message
        if isinstance(e, CommandError):
            raise
        raise UsageError(str(e)) from None
    if jax.process_index() == 0:
        print(json.dumps({k: summary.get(k) for k in ("steps", "final", "eval_start", "eval_end", "first_step_s")}))
    return 0


def main(argv=None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
