#!/usr/bin/env python
"""Convert a DeepSeek-V4 PyTorch checkpoint to a Flax/orbax params checkpoint, streaming and strict.

    python convert/torch_to_flax.py --src SRC --dst DST [--format auto|official|hf_disk|hf_memory]
        [--dtype bf16|fp32] [--no-mtp] [--allow-unused] [--overwrite] [--config FILE] [--flush-mb MB]

SRC: a folder (config.json or inference/config.json, plus *.safetensors shards with or without
model.safetensors.index.json, or *.bin/*.pt files), one .safetensors file, or one .pt/.bin state dict (its
config.json beside it, or --config). Layouts (spec §7): DeepSeek's official names (FP8/FP4 weights with `.scale`
partners are dequantized per §7.2), transformers' `save_pretrained` files (hf_disk), or a transformers in-memory
state dict (hf_memory, stacked experts).

How it stays memory-bounded: every key, shape and dtype is checked against the config from the headers alone
(missing / unexpected / misshaped / unknown dtype → one error naming the file and key, before any data is read).
Then tensors are read one at a time from memory-mapped shards, renamed, dequantized with their scale partner and
written into their tree leaf (experts into a preallocated stacked leaf, one row per expert). A leaf is dropped as
soon as it is complete and has been written: completed leaves are flushed to orbax (partial saves) whenever they
reach --flush-mb, so the resident set is about one layer plus the flush size, whatever the depth. Output goes to
DST.tmp-<pid> and is renamed to DST at the very end: an interrupted run leaves no checkpoint at DST.

DST then holds config.json (TargetConfig, official names), params/ (orbax) and report.json; load it with
`hdflash_jax.checkpoint.load_params(DST)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np

from convert.quant import dequant_fp4, dequant_fp8, fp4_scale_shape, fp8_scale_shape
from convert.safetensors_io import CheckpointError, TensorInfo, open_checkpoint

LAYOUTS = ("official", "hf_disk", "hf_memory")
OUT_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
FLOAT_SRC = {"F16", "BF16", "F32", "F64"}
INT_SRC = {"I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64"}
FP4_SRC = {"I8", "U8", "F4"}
SCALE_SRC = {"F8_E8M0", "U8", "F32", "BF16", "F16"}
SLEEP_ENV = "HDFLASH_CONVERT_SLEEP_AFTER_FIRST_SHARD"  # tests: pause after the first shard (to be killed)


@dataclasses.dataclass
class Target:
    path: str  # tree leaf
    row: int | None = None  # expert row of a stacked leaf
    cols: tuple[int, int] | None = None  # slice of axis 1 of the source (transformers' stacked gate_up_proj)


@dataclasses.dataclass
class Job:
    info: TensorInfo
    official: str
    kind: str  # plain | fp8 | fp4
    targets: list[Target]
    scale: TensorInfo | None = None


@dataclasses.dataclass
class Plan:
    jobs: dict[str, Job]  # source key → job, for every tensor that is read
    contributions: dict[str, int]  # leaf path → number of jobs that fill it
    skipped_mtp: list[str]
    unused: list[str]


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


def target_config(config_path: Path, dtype: str, no_mtp: bool):
    from hdflash_jax.config import TargetConfig

    # the output dtype overrides the file's (DeepSeek's inference/config.json says "dtype": "fp8")
    cfg = TargetConfig.from_json_file(config_path, dtype=OUT_DTYPES[dtype], param_dtype=OUT_DTYPES[dtype])
    if no_mtp:  # no MTP block in the tree, and a config that says so
        cfg = cfg.replace(n_mtp_layers=0, compress_ratios=cfg.compress_ratios[: cfg.n_layers])
    return cfg


# ---- planning: every check that needs no tensor data ---------------------------------------------------------

def _is_float_leaf(dtype) -> bool:
    return np.dtype(dtype).kind == "f" or np.dtype(dtype).name == "bfloat16"


def make_plan(source, layout: str, leaves: dict, cfg, *, no_mtp: bool, allow_unused: bool, config_path: Path,
              detected: str) -> Plan:
    from hdflash_jax.keymap import official_to_tree, to_official, tree_to_official

    n_exp = cfg.n_routed_experts
    official: dict[str, str] = {}
    by_official: dict[str, str] = {}
    for key, info in source.infos.items():
        off = to_official(key, layout)
        if off in by_official:
            other = by_official[off]
            raise CheckpointError(f"{info.file}: tensors {other!r} and {key!r} both map to {off!r} (duplicate)")
        official[key], by_official[off] = off, key

    hint = f"; the names look like layout {detected!r}, not {layout!r}" if detected != layout else ""

    def unexpected(info: TensorInfo, why: str):
        off = official[info.key]
        alias = f" (official name {off!r})" if off != info.key else ""
        raise CheckpointError(f"{info.file}: unexpected tensor {info.key!r}{alias}: {why} in a model with the config "
                              f"{config_path}; pass --allow-unused to skip it{hint}")

    def bad_shape(info: TensorInfo, want, path, note=""):
        raise CheckpointError(f"{info.file}: tensor {info.key!r} has shape {list(info.shape)}, the config "
                              f"{config_path} expects {list(want)} for parameter {path!r}{note}")

    jobs: dict[str, Job] = {}
    cover: dict[str, set] = {}
    skipped_mtp, unused, used_scales = [], [], set()
    for key, info in source.infos.items():
        off = official[key]
        if off.endswith(".scale"):
            continue  # consumed with its weight below
        if no_mtp and off.startswith("mtp."):
            skipped_mtp.append(key)
            continue
        # where it goes
        stacked = layout == "hf_memory" and off.endswith((".ffn.experts.gate_up_proj", ".ffn.experts.down_proj"))
        if stacked:
            prefix = off.rsplit(".", 1)[0]
            if off.endswith("gate_up_proj"):
                inter = cfg.moe_inter_dim
                targets = [Target(f"{prefix}.w1", None, (0, inter)), Target(f"{prefix}.w3", None, (inter, 2 * inter))]
                want = (n_exp, 2 * inter, cfg.dim)
            else:
                targets = [Target(f"{prefix}.w2")]
                want = (n_exp, cfg.dim, cfg.moe_inter_dim)
            if targets[0].path not in leaves:
                if allow_unused:
                    unused.append(key)
                    continue
                unexpected(info, f"no parameter {targets[0].path!r}")
        else:
            path, row = official_to_tree(off)
            if path not in leaves:
                if allow_unused:
                    unused.append(key)
                    continue
                unexpected(info, f"no parameter {path!r}")
            leaf_shape = tuple(leaves[path].shape)
            if row is not None and not 0 <= row < leaf_shape[0]:
                if allow_unused:
                    unused.append(key)
                    continue
                unexpected(info, f"expert {row} is out of range (n_routed_experts = {leaf_shape[0]})")
            targets = [Target(path, row)]
            want = leaf_shape[1:] if row is not None else leaf_shape
        leaf = leaves[targets[0].path]
        float_leaf = _is_float_leaf(leaf.dtype)
        # how it is stored
        scale_off = off[: -len(".weight")] + ".scale" if off.endswith(".weight") else None
        scale_key = by_official.get(scale_off) if scale_off else None
        scale = source.infos[scale_key] if scale_key else None
        dt = info.dtype_name
        if scale is not None:
            used_scales.add(scale_key)
            if stacked or not float_leaf:
                raise CheckpointError(f"{info.file}: tensor {key!r} has a scale {scale_key!r}, but quantized "
                                      f"{'stacked experts' if stacked else 'integer parameters'} are not supported")
            if scale.dtype_name not in SCALE_SRC:
                raise CheckpointError(f"{scale.file}: scale {scale_key!r} has dtype {scale.dtype_name}; expected one "
                                      f"of {sorted(SCALE_SRC)}")
            if dt == "F8_E4M3":
                kind = "fp8"
                if tuple(info.shape) != tuple(want):
                    bad_shape(info, want, targets[0].path)
                want_s = fp8_scale_shape(tuple(want))
            elif dt in FP4_SRC:
                kind = "fp4"
                packed = (want[0], want[1] // 2) if len(want) == 2 and want[1] % 2 == 0 else None
                if packed is None or tuple(info.shape) != packed:
                    bad_shape(info, packed or want, targets[0].path, " (packed FP4: two values per byte)")
                want_s = fp4_scale_shape(tuple(want))
            else:
                raise CheckpointError(f"{info.file}: tensor {key!r} has a scale {scale_key!r} but dtype {dt}, "
                                      f"neither F8_E4M3 (FP8) nor I8 (packed FP4)")
            if tuple(scale.shape) != tuple(want_s):
                raise CheckpointError(f"{scale.file}: scale {scale_key!r} has shape {list(scale.shape)}, expected "
                                      f"{list(want_s)} for {kind.upper()} weight {key!r} of shape {list(want)}")
        else:
            kind = "plain"
            if dt.startswith("F8_"):
                raise CheckpointError(f"{info.file}: FP8 tensor {key!r} has no scale tensor "
                                      f"(expected {scale_off or key + '.scale'!r})")
            if float_leaf and dt not in FLOAT_SRC:
                why = " (packed FP4 without its .scale?)" if dt in FP4_SRC else ""
                raise CheckpointError(f"{info.file}: tensor {key!r} has dtype {dt}, parameter {targets[0].path!r} "
                                      f"needs a float tensor{why}")
            if not float_leaf and dt not in INT_SRC:
                raise CheckpointError(f"{info.file}: tensor {key!r} has dtype {dt}, parameter {targets[0].path!r} "
                                      f"needs an integer tensor")
            if tuple(info.shape) != tuple(want):
                bad_shape(info, want, targets[0].path)
        for t in targets:
            slot = t.row
            seen = cover.setdefault(t.path, set())
            if slot in seen or (slot is None and seen) or (None in seen):
                raise CheckpointError(f"{info.file}: tensor {key!r} fills parameter {t.path!r}"
                                      f"{'' if slot is None else f' row {slot}'} a second time (duplicate)")
            seen.add(slot)
        jobs[key] = Job(info, off, kind, targets, scale)

    for key, info in source.infos.items():
        off = official[key]
        if off.endswith(".scale") and key not in used_scales:
            weight = by_official.get(off[: -len(".scale")] + ".weight")
            if weight is not None and (weight in skipped_mtp or weight in unused):
                continue
            if allow_unused:
                unused.append(key)
                continue
            raise CheckpointError(f"{info.file}: unexpected tensor {key!r}: a scale without a quantized weight "
                                  f"{off[: -len('.scale')] + '.weight'!r}; pass --allow-unused to skip it{hint}")

    has_mtp = any(o.startswith("mtp.") for o in official.values())
    for path, leaf in leaves.items():
        shape = tuple(leaf.shape)
        seen = cover.get(path, set())
        stacked_leaf = path.endswith(("ffn.experts.w1", "ffn.experts.w2", "ffn.experts.w3"))
        if None in seen:
            continue
        if stacked_leaf:
            rows = [e for e in range(shape[0]) if e not in seen]
            if not rows:
                continue
            name = tree_to_official(path, shape[0])[rows[0]]
        else:
            name = tree_to_official(path)[0]
        note = ""
        if path.startswith("mtp.") and not has_mtp:
            note = "; the checkpoint has no MTP weights (transformers does not save them): pass --no-mtp"
        raise CheckpointError(f"{source_label(source)}: missing tensor {name!r} (official name) for parameter "
                              f"{path!r} of the config {config_path}{note}")
    return Plan(jobs, {p: len(s) for p, s in cover.items()}, skipped_mtp, unused)


def source_label(source) -> str:
    if source.index is not None:
        return str(source.index)
    return str(source.files[0]) if len(source.files) == 1 else str(source.files[0].parent)


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


def convert(src, dst, *, fmt: str = "auto", dtype: str = "bf16", no_mtp: bool = False, allow_unused: bool = False,
            overwrite: bool = False, config: str | Path | None = None, flush_mb: float = 256.0,
            progress: bool = True, log=print) -> dict:
    """Convert SRC to a params checkpoint at DST; returns the report (also written to DST/report.json)."""
    from tqdm import tqdm

    from hdflash_jax import checkpoint as ck, fileio
    from hdflash_jax.keymap import detect_layout

    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if fmt not in ("auto",) + LAYOUTS:
        raise CheckpointError(f"--format: unknown layout {fmt!r}; one of auto, {', '.join(LAYOUTS)}")
    if dtype not in OUT_DTYPES:
        raise CheckpointError(f"--dtype: unknown {dtype!r}; one of {', '.join(OUT_DTYPES)}")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst}: destination exists (pass --overwrite to replace it)")
    source = open_checkpoint(src)
    try:
        config_path = find_config(src, config)
        try:
            cfg = target_config(config_path, dtype, no_mtp)
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
        leaves = ck.abstract_leaves(cfg)
        plan = make_plan(source, layout, leaves, cfg, no_mtp=no_mtp, allow_unused=allow_unused,
                         config_path=config_path, detected=detected)

        fileio.clean_stale_tmp(dst)
        tmp = fileio.tmp_path_for(dst)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            stats = _stream(source, plan, leaves, cfg, tmp, flush_bytes=int(flush_mb * 2**20), progress=progress,
                            tqdm=tqdm)
            ck.write_config(tmp, cfg)
            seconds = time.perf_counter() - t0
            report = {
                "src": str(src), "dst": str(dst), "config": str(config_path), "layout": layout,
                "source_kind": source.kind, "files": len(source.files), "dtype": cfg.param_dtype,
                "no_mtp": no_mtp, **stats,
                "skipped_mtp": len(plan.skipped_mtp), "unused": plan.unused,
                "param_count": int(sum(math.prod(v.shape) for v in leaves.values())), "leaves": len(leaves),
                "seconds": round(seconds, 3),
                "read_mb_per_s": round(stats["bytes_read"] / 1e6 / max(seconds, 1e-9), 2),
                "write_mb_per_s": round(stats["bytes_written"] / 1e6 / max(seconds, 1e-9), 2),
            }
            (tmp / ck.REPORT_FILE).write_text(json.dumps(report, indent=1))
            fileio.commit(tmp, dst, overwrite=overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        source.close()
    log(f"wrote {dst}: {report['tensors_read']} tensors ({stats['dequantized']['fp8']} FP8 and "
        f"{stats['dequantized']['fp4']} FP4 dequantized), {report['param_count'] / 1e6:.3f}M params, "
        f"{stats['bytes_read'] / 1e6:.1f} MB read, {stats['bytes_written'] / 1e6:.1f} MB written in "
        f"{report['seconds']:.1f} s: {report['read_mb_per_s']:.1f} MB/s read, {report['write_mb_per_s']:.1f} MB/s "
        f"written")
    return report


def _stream(source, plan: Plan, leaves: dict, cfg, tmp: Path, *, flush_bytes: int, progress: bool, tqdm) -> dict:
    from hdflash_jax.checkpoint import ParamWriter

    writer = ParamWriter(tmp)
    remaining = dict(plan.contributions)
    buffers: dict[str, np.ndarray] = {}
    ready: dict[str, np.ndarray] = {}
    ready_bytes = 0
    stats = {"tensors_read": 0, "scales_read": 0, "dequantized": {"fp8": 0, "fp4": 0}, "bytes_read": 0,
             "bytes_written": 0}
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
                for t in job.targets:
                    leaf = leaves[t.path]
                    buf = buffers.get(t.path)
                    if buf is None:
                        buf = buffers[t.path] = np.empty(tuple(leaf.shape), np.dtype(leaf.dtype))
                    dest = buf if t.row is None else buf[t.row]
                    if job.kind == "fp8":
                        dequant_fp8(arr, scale, out=dest)
                    elif job.kind == "fp4":
                        dequant_fp4(arr, scale, out=dest)
                    elif t.cols is not None:
                        dest[...] = arr[:, t.cols[0]: t.cols[1]]
                    else:
                        _fill_plain(dest, arr, job, cfg)
                    remaining[t.path] -= 1
                    if remaining[t.path] == 0:
                        ready[t.path] = buffers.pop(t.path)
                        ready_bytes += ready[t.path].nbytes
                del arr, scale
                source.release(key)
                if job.scale is not None:
                    source.release(job.scale.key)
                if ready_bytes >= flush_bytes:
                    stats["bytes_written"] += ready_bytes
                    writer.add(ready)
                    ready, ready_bytes = {}, 0
                bar.update(1)
            source.done_with_file(f)
            if shard_no == 0 and sleep_after_first > 0:
                stats["bytes_written"] += ready_bytes
                writer.add(ready)
                ready, ready_bytes = {}, 0
                print(f"first shard done, sleeping {sleep_after_first} s", flush=True)
                time.sleep(sleep_after_first)
        stats["bytes_written"] += ready_bytes
        writer.add(ready)
        ready = {}
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
    p.add_argument("--dst", required=True, help="output folder (must not exist unless --overwrite)")
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
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST (only once the new one is "
                   "complete)")
    p.add_argument("--config", default=None, help="config file to use instead of SRC's config.json / "
                   "inference/config.json (either format)")
    p.add_argument("--flush-mb", type=float, default=256.0,
                   help="write completed parameters to disk whenever they reach this many MiB (default 256); "
                        "peak memory is about this plus the leaves still being filled (about one layer)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.flush_mb < 0:
        print("error: --flush-mb must be >= 0", file=sys.stderr)
        return 2
    try:
        convert(args.src, args.dst, fmt=args.format, dtype=args.dtype, no_mtp=args.no_mtp,
                allow_unused=args.allow_unused, overwrite=args.overwrite, config=args.config,
                flush_mb=args.flush_mb, progress=not args.quiet)
    except (CheckpointError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup of the temp folder
    sys.exit(main())
