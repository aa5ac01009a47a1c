"""Offline features: what the frozen target gives a drafter training step, computed once and read back from disk.

Online, each step runs the target over its batch (`hdflash_jax.training.step`). Offline, `python -m train.drafter
--capture-features` runs it once over the corpus and writes, per record and per position of the padded row
(`data.max_len`), the arrays the drafter's family names (`DrafterFamily.offline_layout`):

* `features`: the conditioning the step's drafter reads — HyperDFlash's final pre-collapse streams [n, D], DFlash's
  tapped layers [K, n, D] (`drafter.reducer.features_from_target`), DSpark's tapped layers [K, n, D] (pooled by the
  drafter itself: its gated pooling trains);
* `hidden`: the target's normed hidden state [D] (norm ∘ hc_head of the final streams; the teacher's logits are its
  head rows), when the family's loss has a teacher;
* `tokens`: the padded row itself [S] (checked against the row the data pipeline builds, record by record).

The teacher's positions depend on the anchors, which are drawn per record *and epoch* (train/data.py); so the
hidden states of every position are stored, and the pipeline gathers `teacher_hidden` [N, slots, D] at
`teacher_positions` after drawing the epoch's anchors — the same rule the online step applies on device.

On disk, a folder (written through `hdflash_jax.fileio.atomic_dir`: a temp folder, then one rename):

    index.json                       format, version, source (what the features were captured from), layout,
                                     records, max_len, shard_records, shards [{first, count, files}]
    <array>-<shard:05d>.npy          one array of `shard_records` records, [R, S, *shape]; 16-bit floats stored
                                     as uint16 (numpy has no bfloat16 header), the index holds the dtype

`FeatureReader` opens a folder strictly (every shard present with the size its header and the index say) and
`check_source` refuses a run whose target, drafter, corpus or max_len differ from the capture's, naming the key.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from hdflash_jax.errors import UsageError
from hdflash_jax.fileio import OutputKind, has_files, read_json

FORMAT, VERSION = "hdflash-offline-features", 1
INDEX = "index.json"
FEATURES_DIR = OutputKind("an offline-features folder (index.json)", has_files(INDEX))
TOKENS = "tokens"


# ---- the teacher's positions: one rule for the online step and the offline pipeline -----------------------------

def teacher_positions(anchors, slots: int, length: int):
    """Positions a + i, i = 0..slots−1, of each anchor a (clipped into the row): [..., N, slots]. The block
    drafters' KL slot j = 1..P reads the target at a + j − 1; DSpark's slot j = 0..B−1 at a + j. numpy or jax."""
    return (anchors[..., None] + np.arange(slots, dtype=np.int32)).clip(0, length - 1)


def normed_hidden(target, streams):
    """The target's normed hidden [.., D] of its final streams [.., n, D] (its head rows are the target's logits)."""
    return target.norm(target.collapse(streams))


def teacher_hidden_at_slots(target, streams, anchors, slots: int):
    """The target's normed hidden [b, N, slots, D] at `teacher_positions`: the streams are gathered first, so
    hc_head, the norm and the head never run over the whole row (the online step)."""
    import jax.numpy as jnp

    b, n = anchors.shape
    pos = teacher_positions(anchors, slots, streams.shape[1]).astype(jnp.int32)
    picked = jnp.take_along_axis(streams, pos.reshape(b, n * slots)[:, :, None, None], axis=1)
    return normed_hidden(target, picked).reshape(b, n, slots, -1)


# ---- the layout: which arrays, their shapes, what they cost ------------------------------------------------------

class Layout(NamedTuple):
    """Per-position arrays {name: (shape, dtype name)} (tokens included) and how many teacher positions the step
    reads per anchor (0: no teacher)."""
    arrays: dict[str, tuple[tuple[int, ...], str]]
    teacher_slots: int

    @classmethod
    def of(cls, family, dcfg, lcfg, tcfg) -> "Layout":
        arrays = {TOKENS: ((), "int32")}
        arrays.update({k: (tuple(int(d) for d in s), str(dt))
                       for k, (s, dt) in family.offline_layout(dcfg, lcfg, tcfg).items()})
        return cls(arrays, int(family.teacher_slots(dcfg, lcfg)))

    def bytes_per_token(self) -> dict[str, int]:
        """Bytes of each array per stored position (a position of the padded row)."""
        return {k: int(np.prod(s, dtype=np.int64)) * _np_dtype(dt).itemsize for k, (s, dt) in self.arrays.items()}

    def to_json(self) -> dict:
        return {"arrays": {k: {"shape": list(s), "dtype": dt} for k, (s, dt) in self.arrays.items()},
                "teacher_slots": self.teacher_slots}

    @classmethod
    def from_json(cls, d: dict) -> "Layout":
        return cls({k: (tuple(v["shape"]), v["dtype"]) for k, v in d["arrays"].items()}, int(d["teacher_slots"]))


def cost_line(layout: Layout, n_records: int, max_len: int) -> str:
    """What a capture will write, for the log before it starts: bytes per token by array and the total."""
    per = layout.bytes_per_token()
    total = sum(per.values()) * n_records * max_len
    parts = ", ".join(f"{k} {v:,}" for k, v in per.items())
    return (f"{sum(per.values()):,} bytes/token ({parts}) x {max_len} positions x {n_records:,} records = "
            f"{total:,} bytes ({total / 2**30:.3f} GiB)")


def offline_batch_spec(layout: Layout, batch: int, seq: int, anchors: int, sharding_for) -> dict:
    """ShapeDtypeStructs of what an offline batch adds to {tokens, loss_mask, anchors, keep}: `features`
    [b, S, ...] and `teacher_hidden` [b, N, slots, D] (with a teacher). `sharding_for(ndim)` gives each one's
    sharding. The one description of the offline step's inputs: the trainer and the AOT planner both use it."""
    import jax

    shape, dtype = layout.arrays["features"]
    out = {"features": jax.ShapeDtypeStruct((batch, seq) + shape, _np_dtype(dtype),
                                            sharding=sharding_for(2 + len(shape)))}
    if layout.teacher_slots:
        (dim,), hdt = layout.arrays["hidden"]
        out["teacher_hidden"] = jax.ShapeDtypeStruct((batch, anchors, layout.teacher_slots, dim), _np_dtype(hdt),
                                                     sharding=sharding_for(4))
    return out


def offline_example(record: dict, anchors: np.ndarray, teacher_slots: int) -> dict:
    """What one row of an offline batch adds, from its record's arrays and the epoch's anchors [N]."""
    out = {"features": record["features"]}
    if teacher_slots:
        hidden = record["hidden"]
        out["teacher_hidden"] = hidden[teacher_positions(np.asarray(anchors), teacher_slots, hidden.shape[0])]
    return out


def _np_dtype(name: str) -> np.dtype:
    import jax.numpy as jnp

    return np.dtype(jnp.dtype(name))  # bfloat16 through ml_dtypes


def _stored(dtype: np.dtype) -> np.dtype:
    """How an array of `dtype` goes into a .npy: floats numpy cannot describe as unsigned ints of their width."""
    return dtype if dtype.kind in "iub" or dtype in (np.float32, np.float64, np.float16) else \
        np.dtype(f"uint{8 * dtype.itemsize}")


# ---- provenance --------------------------------------------------------------------------------------------------

def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def feature_source(run_cfg, family, dcfg) -> dict[str, Any]:
    """What the features of run config `run_cfg` are computed from, as {config key: value}: the target (its
    checkpoint, or its preset and seed), the drafter family and its config fields that select the features,
    the corpus (its path and contents), the tokenizer and max_len. A capture records it; a run checks it."""
    t, d = run_cfg.target, run_cfg.data
    src: dict[str, Any] = {}
    if t.checkpoint:
        src["target.checkpoint"] = str(Path(t.checkpoint).resolve())
    else:
        src.update({"target.preset": t.preset, "target.seed": t.seed, "target.head_scale": t.head_scale})
    src["target.overrides"] = dict(t.overrides)
    src["drafter.kind"] = run_cfg.drafter.kind
    src.update({f"drafter.{k}": _jsonable(v) for k, v in family.feature_fields(dcfg).items()})
    train = str(Path(d.train).resolve()) if d.train else None
    src.update({"data.train": train, "data.train sha256": file_sha256(train) if train else None,
                "data.tokenizer": d.tokenizer, "data.max_len": d.max_len})
    return src


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


def check_source(recorded: dict, wanted: dict, where: str) -> None:
    """UsageError naming the first key whose value differs between a capture's source and this run's."""
    for key in list(wanted) + [k for k in recorded if k not in wanted]:
        old, new = recorded.get(key, "<absent>"), wanted.get(key, "<absent>")
        if json.dumps(old, sort_keys=True) != json.dumps(new, sort_keys=True):
            raise UsageError(f"features.dir {where}: captured with {key} {old!r}, this run has {new!r}; capture "
                             f"again (python -m train.drafter --capture-features) or use a matching features.dir")


# ---- writing -----------------------------------------------------------------------------------------------------

def shard_file(name: str, shard: int) -> str:
    return f"{name}-{shard:05d}.npy"


class FeatureWriter:
    """Fills a temp folder shard by shard (`add` rows in record order), then `finish` writes index.json; the
    caller renames the folder into place (`fileio.atomic_dir`)."""

    def __init__(self, folder: Path, layout: Layout, source: dict, n_records: int, max_len: int,
                 shard_records: int):
        self.folder, self.layout, self.source = Path(folder), layout, source
        self.n, self.max_len, self.per_shard = n_records, max_len, shard_records
        self.buffer: dict[str, list[np.ndarray]] = {k: [] for k in layout.arrays}
        self.shards: list[dict] = []
        self.written = 0

    def add(self, rows: dict[str, np.ndarray]) -> None:
        """Rows [r, S, ...] of every array of the layout, the next records in order."""
        count = {k: len(v) for k, v in rows.items()}
        if set(rows) != set(self.layout.arrays) or len(set(count.values())) != 1:
            raise ValueError(f"FeatureWriter.add: expected rows of {sorted(self.layout.arrays)}, got {count}")
        for k, v in rows.items():
            shape, dtype = self.layout.arrays[k]
            v = np.asarray(v)
            if v.shape[1:] != (self.max_len,) + shape or v.dtype != _np_dtype(dtype):
                raise ValueError(f"FeatureWriter.add: {k} {v.shape} {v.dtype}, the layout says "
                                 f"[r, {self.max_len}, {shape}] {dtype}")
            self.buffer[k].append(v)
        while self._buffered() >= self.per_shard or (self._buffered() and
                                                     self.written + self._buffered() >= self.n):
            self._flush()

    def _buffered(self) -> int:
        return sum(len(v) for v in self.buffer[TOKENS])

    def _flush(self) -> None:
        take = min(self.per_shard, self._buffered(), self.n - self.written)
        k = len(self.shards)
        files = {}
        for name, parts in self.buffer.items():
            rows = np.concatenate(parts) if len(parts) > 1 else parts[0]
            files[name] = shard_file(name, k)
            np.save(self.folder / files[name], np.ascontiguousarray(rows[:take]).view(_stored(rows.dtype)))
            self.buffer[name] = [rows[take:]] if len(rows) > take else []
        self.shards.append({"first": self.written, "count": take, "files": files})
        self.written += take

    def finish(self) -> dict:
        if self.written != self.n:
            raise ValueError(f"FeatureWriter: {self.written} of {self.n} records written")
        index = {"format": FORMAT, "version": VERSION, "source": self.source, "layout": self.layout.to_json(),
                 "records": self.n, "max_len": self.max_len, "shard_records": self.per_shard, "shards": self.shards}
        (self.folder / INDEX).write_text(json.dumps(index, indent=1))
        return index


# ---- reading -----------------------------------------------------------------------------------------------------

def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of a .npy file; ValueError naming the file when it is not one."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read:
                raise ValueError(f"npy version {version}")
            shape, fortran, dtype = read[version](f)
            offset = f.tell()
    except (ValueError, OSError, SyntaxError, EOFError) as e:
        raise ValueError(f"{path}: not a .npy array file ({e})") from None
    if fortran:
        raise ValueError(f"{path}: a Fortran-ordered array; not written by a feature capture")
    return tuple(shape), dtype, offset


class FeatureReader:
    """A captured folder, opened strictly: index.json valid, every shard file present, with the shape, dtype and
    byte size the index implies. `record(i)` → {array: [S, ...]} in its logical dtype, read from its shards."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index_path = self.folder / INDEX
        if not self.folder.is_dir():
            raise UsageError(f"features.dir {self.folder}: not found (capture it first: python -m train.drafter "
                             f"--config FILE --capture-features)")
        if not index_path.is_file():
            raise UsageError(f"features.dir {self.folder}: no {INDEX}; not an offline-features folder (or an "
                             f"unfinished capture)")
        try:
            index = read_json(index_path)
            if index.get("format") != FORMAT or index.get("version") != VERSION:
                raise ValueError(f"format {index.get('format')!r} version {index.get('version')!r}, expected "
                                 f"{FORMAT!r} version {VERSION}")
            self.source, self.layout = dict(index["source"]), Layout.from_json(index["layout"])
            self.n_records, self.max_len = int(index["records"]), int(index["max_len"])
            shards = [(int(s["first"]), int(s["count"]), dict(s["files"])) for s in index["shards"]]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            msg = str(e) if isinstance(e, ValueError) else f"missing or malformed key {e}"
            raise UsageError(f"{index_path}: not a valid features index ({msg.removeprefix(f'{index_path}: ')})") \
                from None
        self.shards, expect = [], 0
        for first, count, files in shards:
            if first != expect or count < 1:
                raise UsageError(f"{index_path}: shards do not cover records 0..{self.n_records - 1} in order")
            self.shards.append((first, count, {k: self._open(files.get(k), k, count) for k in self.layout.arrays}))
            expect += count
        if expect != self.n_records:
            raise UsageError(f"{index_path}: its shards hold {expect} records, the index says {self.n_records}")
        self._firsts = np.asarray([s[0] for s in self.shards], np.int64)

    def _open(self, name: str | None, key: str, count: int) -> tuple[Path, int]:
        shape, dtype = self.layout.arrays[key]
        if name is None:
            raise UsageError(f"{self.folder / INDEX}: a shard lists no file for {key!r}")
        path = self.folder / name
        if not path.is_file():
            raise UsageError(f"features.dir {self.folder}: shard file {name} is missing")
        want_shape = (count, self.max_len) + tuple(shape)
        want_dtype = _stored(_np_dtype(dtype))
        try:
            got_shape, got_dtype, offset = _npy_header(path)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if got_shape != want_shape or got_dtype != want_dtype:
            raise UsageError(f"{path}: holds {got_dtype} {list(got_shape)}, the index says {want_dtype} "
                             f"{list(want_shape)}")
        size = offset + int(np.prod(want_shape, dtype=np.int64)) * want_dtype.itemsize
        if path.stat().st_size != size:
            raise UsageError(f"{path}: {path.stat().st_size:,} bytes, expected {size:,} (a truncated or corrupt "
                             f"shard)")
        return path, offset  # read a record at a time (`record`): no file held open per shard

    def record(self, i: int, tokens: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Record `i`'s arrays. `tokens`: the row the data pipeline built for it, which must be the captured one.
        Non-finite values are refused naming the shard file (the capture wrote none: a corrupt file)."""
        k = int(np.searchsorted(self._firsts, i, side="right")) - 1
        first, _, files = self.shards[k]
        out = {}
        for name, (shape, dtype) in self.layout.arrays.items():
            path, offset = files[name]
            stored = _stored(_np_dtype(dtype))
            row = (self.max_len,) + tuple(shape)
            size = int(np.prod(row, dtype=np.int64)) * stored.itemsize
            with open(path, "rb") as f:
                f.seek(offset + (i - first) * size)
                raw = f.read(size)
            if len(raw) != size:
                raise ValueError(f"{path}: record {i} is cut short (a shard changed since it was opened)")
            x = np.frombuffer(raw, stored).reshape(row).view(_np_dtype(dtype)).copy()
            if name != TOKENS and not np.isfinite(x.astype(np.float32)).all():
                raise ValueError(f"{path}: record {i} holds non-finite values (a corrupt shard)")
            out[name] = x
        if tokens is not None and not np.array_equal(out[TOKENS], tokens):
            raise ValueError(f"{files[TOKENS][0]}: record {i}'s tokens differ from the row data.train gives now "
                             f"(the corpus or tokenizer changed since the capture)")
        return out

    def check(self, wanted_source: dict, layout: Layout) -> None:
        """Refuse (one line naming the key) features captured from another source, or lacking an array the step
        reads with the shape and dtype it reads."""
        check_source(self.source, wanted_source, str(self.folder))
        for name, spec in layout.arrays.items():
            have = self.layout.arrays.get(name)
            if have is None:
                why = " (captured for a loss without a teacher: drafter.loss.kl_alpha 0)" if name == "hidden" else ""
                raise UsageError(f"features.dir {self.folder}: holds no {name!r} array{why}; capture again")
            if tuple(have) != tuple(spec):
                raise UsageError(f"features.dir {self.folder}: {name!r} is {have[1]} {list(have[0])} per position, "
                                 f"this run reads {spec[1]} {list(spec[0])}")
