#!/usr/bin/env python
"""Convert a DeepSeek-V4 PyTorch checkpoint to a Flax/orbax params checkpoint, streaming and strict.

    python convert/torch_to_flax.py --src SRC --dst DST [--format auto|official|hf_disk|hf_memory]
        [--dtype bf16|fp32] [--no-mtp] [--allow-unused] [--allow-nonfinite] [--overwrite] [--config FILE]
        [--flush-mb MB]

SRC: a folder (config.json or inference/config.json, plus *.safetensors shards with or without
model.safetensors.index.json, or *.bin/*.pt files), one .safetensors file, or one .pt/.bin state dict (its
config.json beside it, or --config). Layouts: DeepSeek's official names (FP8 weights with 128x128 block scales and
packed FP4 experts with 1x32 scales, each with a `.scale` partner, are dequantized by convert.quant),
transformers' `save_pretrained` files (hf_disk), or a transformers in-memory state dict (hf_memory, stacked
experts).

Before anything is read: DST may not be SRC, lie inside it or contain it (symlinks resolved), an existing DST
needs --overwrite, and DST must be creatable. Then every key, shape and dtype is checked against the config from
the headers alone (convert.tensor_map: one error naming the file and key, before any data is read). Tensors are read
one at a time from memory-mapped shards, renamed, dequantized with their scale partner, checked to be finite
(NaN/Inf stop the run naming file and key unless --allow-nonfinite; counts go to report.json) and written into
their tree leaf (experts into a preallocated stacked leaf, one row per expert). Completed leaves are flushed to
orbax (partial saves) whenever they reach --flush-mb, so the resident set is about one layer plus the flush size,
whatever the depth. Output goes to DST.tmp-<pid> and is renamed to DST at the very end: an interrupted or refused
run leaves no checkpoint at DST. Every bad input and every OSError is one `error:` line and exit status 1; a
refused DST (`hdflash_jax.fileio.check_output`) exits 2 before anything is read.

DST then holds config.json (TargetConfig, official names), params/ (orbax) and report.json; load it with
`hdflash_jax.checkpoint.load_params(DST)`. A DSpark checkpoint (`dspark_*` config keys, DSpark `mtp.*` tensors)
also gets DST/dspark/ (`hdflash_jax.families.family("dspark").load(DST / "dspark", cfg)`); the target's config
then has no MTP block. `--moe-dispatch` / `--attention-impl` set those fields of the converted config.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np

from convert.dspark_layout import mtp_layout
from convert.quant import dequant_fp4, dequant_fp8
from convert.tensor_map import Job, Target, TensorMap, map_tensors, source_label
from hdflash_jax.cli import run_command
from hdflash_jax.config import ATTENTION_IMPLS, MOE_DISPATCHES
from hdflash_jax.errors import UsageError
from hdflash_jax.safetensors_io import CheckpointError, open_checkpoint

LAYOUTS = ("official", "hf_disk", "hf_memory")
OUT_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
SLEEP_ENV = "HDFLASH_CONVERT_SLEEP_AFTER_FIRST_SHARD"  # tests: pause after the first shard (to be killed)


# ---- config ---------------------------------------------------------------------------------------------

def find_config(src: Path, explicit: str | Path | None) -> Path:
    if explicit is not None:
        p = Path(explicit)
        if not p.is_file():
            raise CheckpointError(f"{p}: missing config (file not found)")
        return p
    base = src if src.is_dir() else src.parent
    candidates = [base / "config.json", base / "inference" / "config.json"]
    for p in candidates:
        if p.is_file():
            return p
    raise CheckpointError(f"{src}: missing config (looked for {', '.join(str(c) for c in candidates)}; "
                          f"pass --config FILE)")


def target_config(config_path: Path, dtype: str, no_mtp: bool, compute: dict | None = None):
    from hdflash_jax.config import TargetConfig

    # the output dtype overrides the file's (DeepSeek's inference/config.json says "dtype": "fp8"); `compute`:
    # how-to-compute fields (moe_dispatch, attention_impl) written into the converted config
    cfg = TargetConfig.from_json_file(config_path, dtype=OUT_DTYPES[dtype], param_dtype=OUT_DTYPES[dtype],
                                      **(compute or {}))
    if no_mtp:  # no MTP block in the tree, and a config that says so
        cfg = cfg.replace(n_mtp_layers=0, compress_ratios=cfg.compress_ratios[: cfg.n_layers])
    return cfg


# ---- paths: refuse what would destroy the source or cannot be written --------------------------------------

def check_paths(src: Path, dst: str | Path, *, overwrite: bool, config: str | Path | None = None) -> None:
    """Before anything is read or written: `hdflash_jax.fileio.check_output`'s rule for --dst (never SRC or
    --config, the checkout, home or the current folder; an existing DST only if it is a converted checkpoint,
    with --overwrite)."""
    from hdflash_jax import checkpoint as ck
    from hdflash_jax.fileio import OutputKind, check_output

    kind = OutputKind("a converted checkpoint (config.json + params/)", ck.is_checkpoint)
    check_output(dst, flag="--dst", kind=kind, inputs=[("the source --src", src), ("the source --config", config)],
                 overwrite=overwrite)


# ---- streaming ----------------------------------------------------------------------------------------------

def _fill_plain(dest: np.ndarray, arr: np.ndarray, job: Job, cfg) -> None:
    if dest.dtype.kind in "iu":
        if job.official.endswith("tid2eid") and arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= cfg.n_routed_experts:
                raise CheckpointError(f"{job.info.file}: tensor {job.info.key!r} holds expert ids in [{lo}, {hi}], "
                                      f"outside [0, {cfg.n_routed_experts})")
        info = np.iinfo(dest.dtype)
        if arr.size and (int(arr.min()) < info.min or int(arr.max()) > info.max):
            raise CheckpointError(f"{job.info.file}: tensor {job.info.key!r} does not fit {dest.dtype}")
    dest[...] = arr


def _fill(dest: np.ndarray, arr: np.ndarray, scale, job: Job, t: Target, cfg) -> None:
    if job.kind == "fp8":
        dequant_fp8(arr, scale, out=dest)
    elif job.kind == "fp4":
        dequant_fp4(arr, scale, out=dest)
    elif t.cols is not None:
        dest[...] = arr[:, t.cols[0]: t.cols[1]]
    else:
        _fill_plain(dest, arr, job, cfg)


def _nonfinite_error(job: Job, n: int, size: int) -> CheckpointError:
    how = f" after dequantization with its scale {job.scale.key!r}" if job.scale is not None else ""
    return CheckpointError(f"{job.info.file}: tensor {job.info.key!r} holds {n} non-finite values (NaN or Inf) "
                           f"out of {size}{how}; pass --allow-nonfinite to convert it anyway")


def _dspark_plan(source, layout, detected, raw: dict, cfg, config_path: Path, allow_unused: bool, names: dict):
    """The DSpark drafter's own plan over the `mtp.*` tensors → (DSparkConfig, its leaves, TensorMap)."""
    from flax import nnx

    from hdflash_jax.checkpoint import dotted
    from hdflash_jax.dspark.config import DSparkConfig
    from hdflash_jax.dspark.keymap import from_trunk_name, to_trunk_name
    from hdflash_jax.dspark.model import abstract_dspark

    try:
        dcfg = DSparkConfig.from_checkpoint_dict(raw, where=str(config_path))
        dcfg.check_target(cfg, where=str(config_path))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    leaves = {dotted(p): v for p, v in nnx.to_flat_state(nnx.state(abstract_dspark(dcfg, cfg)))}
    nb = dcfg.num_blocks
    plan = map_tensors(source, layout, leaves, dcfg.block_config(cfg), no_mtp=False, allow_unused=allow_unused,
                     config_path=config_path, detected=detected,
                     keys={k for k, o in names.items() if o.startswith("mtp.")},
                     rename=lambda o: to_trunk_name(o, nb), names_back=lambda n: from_trunk_name(n, nb))
    return dcfg, leaves, plan


def _write_dspark(tmp: Path, source, dspark, cfg, flush_mb: float, progress: bool, allow_nonfinite: bool) -> dict:
    """Stream the DSpark drafter into tmp/dspark (a DSpark family checkpoint: params/ + its config file) → its
    stats."""
    from hdflash_jax.families import family

    dcfg, leaves, plan = dspark
    folder = tmp / "dspark"
    folder.mkdir()
    stats = _stream(source, plan, leaves, dcfg.block_config(cfg), folder, flush_bytes=int(flush_mb * 2**20),
                    progress=progress, allow_nonfinite=allow_nonfinite)
    (folder / family("dspark").config_file).write_text(json.dumps(dcfg.to_dict(), indent=1))
    return {"tensors_read": stats["tensors_read"], "dequantized": stats["dequantized"],
            "param_count": int(sum(math.prod(v.shape) for v in leaves.values())), "unused": plan.unused,
            "nonfinite_values": stats["nonfinite_values"]}


def convert(src, dst, *, fmt: str = "auto", dtype: str = "bf16", no_mtp: bool = False, allow_unused: bool = False,
            overwrite: bool = False, config: str | Path | None = None, flush_mb: float = 256.0,
            allow_nonfinite: bool = False, progress: bool = True, log=print, moe_dispatch: str | None = None,
            attention_impl: str | None = None) -> dict:
    """Convert SRC to a params checkpoint at DST; returns the report (also written to DST/report.json).

    The `mtp.*` tensors are a native MTP block (converted with the target) or a DSpark drafter (told apart by
    config and keys, `convert.dspark_layout`), converted to DST/dspark (a DSpark family checkpoint)."""
    from hdflash_jax import checkpoint as ck
    from hdflash_jax import fileio
    from hdflash_jax.keymap import detect_layout, to_official

    t0 = time.perf_counter()
    check_paths(Path(src), dst, overwrite=overwrite, config=config)  # before Path('') becomes '.'
    src, dst = Path(src), Path(dst)
    if fmt not in ("auto",) + LAYOUTS:
        raise CheckpointError(f"--format: unknown layout {fmt!r}; one of auto, {', '.join(LAYOUTS)}")
    if dtype not in OUT_DTYPES:
        raise CheckpointError(f"--dtype: unknown {dtype!r}; one of {', '.join(OUT_DTYPES)}")
    source = open_checkpoint(src)
    try:
        config_path = find_config(src, config)
        compute = {k: v for k, v in (("moe_dispatch", moe_dispatch), ("attention_impl", attention_impl)) if v}
        try:
            cfg = target_config(config_path, dtype, no_mtp, compute)
        except (ValueError, TypeError) as e:
            msg = str(e)
            raise CheckpointError(msg if str(config_path) in msg else f"{config_path}: bad config ({msg})") from None
        if not source.infos:
            raise CheckpointError(f"{source_label(source)}: the checkpoint holds no tensors")
        try:
            detected = detect_layout(source.infos)
        except ValueError as e:
            raise CheckpointError(f"{source_label(source)}: {e}") from None
        layout = detected if fmt == "auto" else fmt
        names = {k: to_official(k, layout) for k in source.infos}
        raw = json.loads(config_path.read_text(encoding="utf-8"))
        mtp_kind = "skipped" if no_mtp else mtp_layout(raw, names.values(), source_label(source))
        dspark, trunk_keys = None, None
        if mtp_kind == "dspark":  # the trunk without an MTP block; the drafter planned on its own
            cfg = cfg.replace(n_mtp_layers=0, compress_ratios=cfg.compress_ratios[: cfg.n_layers])
            dspark = _dspark_plan(source, layout, detected, raw, cfg, config_path, allow_unused, names)
            trunk_keys = {k for k, o in names.items() if not o.startswith("mtp.")}
        leaves = ck.abstract_leaves(cfg)
        plan = map_tensors(source, layout, leaves, cfg, no_mtp=no_mtp, allow_unused=allow_unused,
                         config_path=config_path, detected=detected, keys=trunk_keys)
        fileio.clean_stale_tmp(dst)
        tmp = fileio.tmp_path_for(dst)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
        except OSError as e:
            raise CheckpointError(f"--dst {dst}: cannot be created ({e.strerror or e}: {e.filename or tmp})") from None
        threads_before = set(threading.enumerate())
        try:
            stats = _stream(source, plan, leaves, cfg, tmp, flush_bytes=int(flush_mb * 2**20), progress=progress,
                            allow_nonfinite=allow_nonfinite)
            ck.write_config(tmp, cfg)
            dstats = _write_dspark(tmp, source, dspark, cfg, flush_mb, progress, allow_nonfinite) if dspark else None
            report = _report(src, dst, config_path, layout, source, cfg, no_mtp, stats, plan, leaves,
                             time.perf_counter() - t0)
            report.update(mtp_layout=mtp_kind, dspark=dstats)
            (tmp / ck.REPORT_FILE).write_text(json.dumps(report, indent=1))
            fileio.commit(tmp, dst, overwrite=overwrite)
        except BaseException:
            ck.join_writer_threads(threads_before)  # a save interrupted mid-way leaves writers running: wait first
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        source.close()
    log(f"wrote {dst}: {report['tensors_read']} tensors ({stats['dequantized']['fp8']} FP8 and "
        f"{stats['dequantized']['fp4']} FP4 dequantized), {report['param_count'] / 1e6:.3f}M params, "
        f"{stats['bytes_read'] / 1e6:.1f} MB read, {stats['bytes_written'] / 1e6:.1f} MB written in "
        f"{report['seconds']:.1f} s: {report['read_mb_per_s']:.1f} MB/s read, {report['write_mb_per_s']:.1f} MB/s "
        f"written" + (f"; {stats['nonfinite_values']} non-finite values kept (--allow-nonfinite)"
                      if stats["nonfinite_values"] else ""))
    return report


def _report(src, dst, config_path, layout, source, cfg, no_mtp, stats, plan, leaves, seconds) -> dict:
    return {
        "src": str(src), "dst": str(dst), "config": str(config_path), "layout": layout,
        "source_kind": source.kind, "files": len(source.files), "dtype": cfg.param_dtype,
        "no_mtp": no_mtp, **stats,
        "skipped_mtp": len(plan.skipped_mtp), "unused": plan.unused,
        "param_count": int(sum(math.prod(v.shape) for v in leaves.values())), "leaves": len(leaves),
        "seconds": round(seconds, 3),
        "read_mb_per_s": round(stats["bytes_read"] / 1e6 / max(seconds, 1e-9), 2),
        "write_mb_per_s": round(stats["bytes_written"] / 1e6 / max(seconds, 1e-9), 2),
    }


def _stream(source, plan: TensorMap, leaves: dict, cfg, tmp: Path, *, flush_bytes: int, progress: bool,
            allow_nonfinite: bool = False) -> dict:
    """Read every planned tensor once, in file order, fill its leaves, flush completed leaves to orbax."""
    from tqdm import tqdm

    from hdflash_jax.checkpoint import ParamWriter, count_nonfinite

    writer = ParamWriter(tmp)
    remaining = dict(plan.contributions)
    buffers: dict[str, np.ndarray] = {}
    ready: dict[str, np.ndarray] = {}
    stats = {"tensors_read": 0, "scales_read": 0, "dequantized": {"fp8": 0, "fp4": 0}, "bytes_read": 0,
             "bytes_written": 0, "nonfinite_values": 0, "nonfinite_tensors": {}}

    def flush():
        nonlocal ready
        stats["bytes_written"] += sum(a.nbytes for a in ready.values())
        writer.add(ready)
        ready = {}

    sleep_after_first = float(os.environ.get(SLEEP_ENV, "0") or 0)
    bar = tqdm(total=len(plan.jobs), unit="tensor", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for shard_no, f in enumerate(source.files):
            bar.set_postfix_str(f.name, refresh=False)
            for key in source.keys_by_file[f]:
                job = plan.jobs.get(key)
                if job is None:
                    continue
                arr = source.get(key)
                stats["tensors_read"] += 1
                stats["bytes_read"] += job.info.nbytes
                scale = None
                if job.scale is not None:
                    scale = source.get(job.scale.key)
                    stats["scales_read"] += 1
                    stats["bytes_read"] += job.scale.nbytes
                    stats["dequantized"][job.kind] += 1
                bad = 0
                for t in job.targets:
                    leaf = leaves[t.path]
                    buf = buffers.get(t.path)
                    if buf is None:
                        buf = buffers[t.path] = np.empty(tuple(leaf.shape), np.dtype(leaf.dtype))
                    dest = buf if t.row is None else buf[t.row]
                    _fill(dest, arr, scale, job, t, cfg)
                    if dest.dtype.kind == "f" or dest.dtype.name == "bfloat16":
                        bad += count_nonfinite(dest)
                    remaining[t.path] -= 1
                    if remaining[t.path] == 0:
                        ready[t.path] = buffers.pop(t.path)
                if bad:
                    if not allow_nonfinite:
                        raise _nonfinite_error(job, bad, math.prod(job.info.shape))
                    stats["nonfinite_values"] += bad
                    stats["nonfinite_tensors"][key] = bad
                del arr, scale
                source.release(key)
                if job.scale is not None:
                    source.release(job.scale.key)
                if sum(a.nbytes for a in ready.values()) >= flush_bytes:
                    flush()
                bar.update(1)
            source.done_with_file(f)
            if shard_no == 0 and sleep_after_first > 0:
                flush()
                print(f"first shard done, sleeping {sleep_after_first} s", flush=True)
                time.sleep(sleep_after_first)
        flush()
    finally:
        bar.close()
    if buffers:  # the plan guarantees coverage; this would be a bug in it
        raise RuntimeError(f"internal: parameters left incomplete: {sorted(buffers)[:3]}")
    writer.finalize()
    stats["flushes"] = writer.n_adds
    return stats


# ---- CLI ----------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python convert/torch_to_flax.py",
        description="Convert a DeepSeek-V4 PyTorch checkpoint (official DeepSeek layout with FP8/FP4 weights, "
                    "transformers save_pretrained files, or a transformers state dict) to an orbax params "
                    "checkpoint for hdflash_jax. Streams tensor by tensor; strict about names, shapes and dtypes.")
    p.add_argument("--src", required=True, help="folder (config.json or inference/config.json + shards, with or "
                   "without an index), a .safetensors file, or a .pt/.bin state dict")
    p.add_argument("--dst", required=True, help="output folder (must not exist unless --overwrite; never SRC, "
                   "inside SRC or a folder containing SRC)")
    p.add_argument("--format", default="auto", choices=("auto",) + LAYOUTS,
                   help="tensor naming of SRC (default: detected from the names)")
    p.add_argument("--dtype", default="bf16", choices=tuple(OUT_DTYPES),
                   help="dtype of the matmul weights, norms and embeddings written (mHC, sinks, ape, router bias "
                        "stay fp32, tid2eid int32); default bf16")
    p.add_argument("--no-mtp", action="store_true",
                   help="skip mtp.* tensors and write a config with n_mtp_layers=0 (needed for transformers "
                        "checkpoints, which carry no MTP weights)")
    p.add_argument("--allow-unused", action="store_true", help="skip tensors the model has no parameter for "
                   "(listed in report.json) instead of failing")
    p.add_argument("--allow-nonfinite", action="store_true", help="convert tensors holding NaN/Inf instead of "
                   "failing (their counts go to report.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST (only once the new one is "
                   "complete)")
    p.add_argument("--config", default=None, help="config file to use instead of SRC's config.json / "
                   "inference/config.json (either format)")
    p.add_argument("--flush-mb", type=float, default=256.0,
                   help="write completed parameters to disk whenever they reach this many MiB (default 256); "
                        "peak memory is about this plus the leaves still being filled (about one layer)")
    p.add_argument("--moe-dispatch", default=None, choices=MOE_DISPATCHES,
                   help="MoE dispatch written into the converted config.json (default: the source config's, else auto)")
    p.add_argument("--attention-impl", default=None, choices=ATTENTION_IMPLS,
                   help="attention implementation written into the converted config.json (default: chunked)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not args.flush_mb >= 0:
        raise UsageError("--flush-mb must be >= 0")
    convert(args.src, args.dst, fmt=args.format, dtype=args.dtype, no_mtp=args.no_mtp,
            allow_unused=args.allow_unused, overwrite=args.overwrite, config=args.config,
            flush_mb=args.flush_mb, allow_nonfinite=args.allow_nonfinite, progress=not args.quiet,
            moe_dispatch=args.moe_dispatch, attention_impl=args.attention_impl)
    return 0


def main(argv=None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
