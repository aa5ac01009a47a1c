"""Offline feature capture: the frozen target run once over the training corpus, its features written to disk.

    python -m train.drafter --config FILE --capture-features [--overwrite] [--mesh ...]

reads the same config as training (target, drafter, data) and writes `features.dir` (the format:
`hdflash_jax.training.features`); a run with `features.mode: offline` then trains from it without building the
target's layers. Rows go in record order, `features.capture_batch` at a time, through one jitted call of the
family's `capture` on the mesh (the target's params sharded as in training, the rows over the data axes). The disk
cost is logged before anything is written; the folder appears in one rename when every shard is written (a
failed or interrupted capture leaves nothing). With several processes every process computes its rows and
process 0 gathers and writes.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from hdflash_jax.deepseek_v4.scan import stacks_as_words
from hdflash_jax.distributed import host_tree, log, place
from hdflash_jax.errors import UsageError
from hdflash_jax.fileio import atomic_dir, check_output, clean_stale_tmp
from hdflash_jax.sharding import batch_sharding, mesh_from_spec
from hdflash_jax.tokenizer import load_tokenizer
from hdflash_jax.train_config import DrafterRunConfig
from hdflash_jax.training.features import FEATURES_DIR, TOKENS, FeatureWriter, Layout, cost_line, feature_source
from hdflash_jax.training.pure import PureModule
from train import data as D
from train.trainer import build_target, drafter_for


def capture_inputs(cfg: DrafterRunConfig) -> list[tuple[str, str | None]]:
    """What a capture reads (its output may not be, hold or lie inside any of them)."""
    tok = cfg.data.tokenizer if Path(cfg.data.tokenizer).exists() else None
    return [("the target target.checkpoint", cfg.target.checkpoint), ("the data data.train", cfg.data.train),
            ("the tokenizer data.tokenizer", tok), ("the run folder out_dir", cfg.out_dir)]


def capture(cfg: DrafterRunConfig, mesh=None, *, target=None, overwrite: bool = False, progress: bool = True) -> dict:
    """Write the offline features of `cfg` (its target, drafter family and data) to `cfg.features.dir`; returns
    a summary (records, bytes per token, total bytes, seconds)."""
    fc, dc = cfg.features, cfg.data
    if not fc.dir:
        raise UsageError("features.dir: required with --capture-features (the folder the features go to)")
    if not dc.train:
        raise UsageError("data.train: required (a JSONL file)")
    out = Path(fc.dir)
    check_output(out, flag="features.dir", kind=FEATURES_DIR, inputs=capture_inputs(cfg), overwrite=overwrite)
    clean_stale_tmp(out.resolve())
    mesh = mesh if mesh is not None else mesh_from_spec(cfg.mesh)
    tokenizer = load_tokenizer(dc.tokenizer)
    source = D.JsonlSource(dc.train)
    D.records_check(source, tokenizer, dc.max_len)
    if target is None:
        tcfg, target = build_target(cfg.target, mesh)
    else:
        tcfg = target.cfg
    fam, dcfg, lcfg = drafter_for(cfg, tcfg, tokenizer)
    layout = Layout.of(fam, dcfg, lcfg, tcfg)
    n, length, rows = len(source), dc.max_len, fc.capture_batch
    row_sharding = batch_sharding(mesh, 2)
    ways = math.prod(mesh.shape[a] for a in _row_axes(row_sharding))
    if rows % ways:
        raise UsageError(f"features.capture_batch: {rows} rows must divide over the mesh's data axes ({ways})")
    log(f"offline features ({fam.name}: {fam.describe(dcfg)}) -> {out}: "
        f"{cost_line(layout, n, length)}")

    tpure = PureModule(target)
    del target
    shardings = tpure.shardings(mesh)
    params = place(stacks_as_words(tpure.tree()), shardings)

    def run(p, tokens):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # as the training step is traced
            return fam.capture(dcfg, lcfg, tpure.merge(p), tokens)

    fn = jax.jit(run, in_shardings=(shardings, row_sharding))
    pad = D.pad_id_of(tokenizer)
    writes = jax.process_index() == 0
    t0 = time.time()
    with (atomic_dir(out, overwrite=overwrite) if writes else contextlib.nullcontext()) as tmp:
        writer = FeatureWriter(tmp, layout, feature_source(cfg, fam, dcfg), n, length, fc.shard_records) \
            if writes else None
        for first in tqdm(range(0, n, rows), disable=not (writes and progress), desc="capture", dynamic_ncols=True):
            ids = range(first, min(n, first + rows))
            tokens = np.full((rows, length), pad, np.int32)  # a short last batch: pad rows, computed and dropped
            for j, i in enumerate(ids):
                p, r = D.encode_record(tokenizer, source[i], source.where(i))
                tokens[j] = D.build_example(p, r, length, pad)["tokens"]
            arrays = host_tree(fn(params, jax.make_array_from_callback(tokens.shape, row_sharding,
                                                                       lambda idx: tokens[idx])))
            if writer is not None:
                writer.add({TOKENS: tokens[:len(ids)], **{k: v[:len(ids)] for k, v in arrays.items()}})
        if writer is not None:
            writer.finish()
    seconds = time.time() - t0
    per = layout.bytes_per_token()
    summary = {"dir": str(out), "records": n, "max_len": length, "bytes_per_token": sum(per.values()),
               "bytes_per_token_by_array": per, "total_bytes": sum(per.values()) * n * length,
               "seconds": round(seconds, 2), "tokens_per_s": round(n * length / max(seconds, 1e-9), 1)}
    log(f"wrote {n} records ({summary['total_bytes']:,} bytes) to {out} in {seconds:.1f} s")
    return summary


def _row_axes(sharding) -> tuple[str, ...]:
    lead = sharding.spec[0] if len(sharding.spec) else None
    return lead if isinstance(lead, tuple) else ((lead,) if lead else ())
