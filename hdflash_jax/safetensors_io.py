"""Streaming readers for PyTorch checkpoints: safetensors (own header parser, memory-mapped) and `.pt/.bin`.

safetensors layout: 8-byte little-endian header length N, N bytes of JSON {key: {dtype, shape, data_offsets}}
(+ optional `__metadata__`), then the data; offsets are relative to the end of the header. The header is
validated before any data is touched (truncated file, bad JSON, unknown dtype, offsets past the end: one
`CheckpointError` naming the file and key). Tensors come out as numpy views of a read-only memory map, one at a
time, in file order; `release` drops a consumed tensor's pages so the resident set stays at about one tensor.
safetensors' own numpy backend cannot read FP8, which is why the header is parsed here. `F4` (float4 e2m1,
two per byte) is returned packed as int8 [..., n/2], the same form as DeepSeek's int8 FP4 expert weights.

`.pt/.bin` files go through `torch.load(weights_only=True, mmap=True)` and are converted tensor by tensor
(bf16 and float8 through a uint view, so nothing is rounded). A file torch cannot read that way is reported as not
a PyTorch state dict; unsafe (pickle) loading is never attempted nor suggested.

Folders: `model.safetensors.index.json` (or `pytorch_model.bin.index.json`) when present, else every
`*.safetensors` (else every `*.bin`/`*.pt`) file at the top level, sorted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import struct
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from hdflash_jax.errors import CommandError


class CheckpointError(CommandError):
    """Bad input checkpoint; the message names the file (and key). Exit status 1."""


DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8), "I16": np.dtype(np.int16),
    "U16": np.dtype(np.uint16), "I32": np.dtype(np.int32), "U32": np.dtype(np.uint32), "I64": np.dtype(np.int64),
    "U64": np.dtype(np.uint64), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32), "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "F4": np.dtype(np.int8),  # float4_e2m1fn_x2: packed, returned as int8 with the last dim halved
}
NAME_OF_DTYPE = {v: k for k, v in DTYPES.items() if k != "F4"}

MAX_HEADER = 100_000_000  # bytes of header JSON, the limit of the reference safetensors reader
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SUFFIXES = (".pt", ".bin", ".pth")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    key: str
    file: Path
    dtype_name: str  # safetensors dtype string (torch tensors are named the same way)
    shape: tuple[int, ...]  # as returned (F4: packed, last dim halved)

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.dtype_name]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _stored_nbytes(dtype_name: str, shape) -> int:
    n = math.prod(shape)
    return (n + 1) // 2 if dtype_name == "F4" else n * DTYPES[dtype_name].itemsize


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# ---- one safetensors file ---------------------------------------------------------------------------------

class SafetensorsFile:
    """A validated safetensors header plus a lazily opened read-only memory map of the data."""

    def __init__(self, path: str | Path):
        self.path = path = Path(path)
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > MAX_HEADER:
                    raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header length {n} > the "
                                          f"{size - 8} bytes that follow)")
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON: {e})") from None
        except RecursionError:
            raise CheckpointError(f"{path}: corrupt safetensors header (JSON nested too deeply)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (a JSON object expected)")
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
        self.data_start = 8 + n
        data_len = size - self.data_start
        self.infos: dict[str, TensorInfo] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        for key, e in header.items():
            if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
                raise CheckpointError(f"{path}: corrupt header entry for tensor {key!r}: {e!r}")
            dt, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
            if not isinstance(dt, str) or dt not in DTYPES:
                raise CheckpointError(f"{path}: tensor {key!r} has unknown dtype {dt!r} "
                                      f"(known: {', '.join(sorted(DTYPES))})")
            if (not isinstance(shape, list) or not all(_is_count(d) for d in shape)
                    or not isinstance(offs, list) or len(offs) != 2
                    or not all(_is_count(o) for o in offs) or offs[0] > offs[1]):
                raise CheckpointError(f"{path}: corrupt header entry for tensor {key!r}: shape {shape!r}, "
                                      f"data_offsets {offs!r}")
            if dt == "F4" and (not shape or shape[-1] % 2):
                raise CheckpointError(f"{path}: F4 tensor {key!r} needs an even last dimension, got {shape}")
            want = _stored_nbytes(dt, shape)
            if offs[1] - offs[0] != want:
                raise CheckpointError(f"{path}: corrupt header: tensor {key!r} ({dt} {shape}) needs {want} bytes, "
                                      f"data_offsets {offs} span {offs[1] - offs[0]}")
            if offs[1] > data_len:
                raise CheckpointError(f"{path}: truncated file: tensor {key!r} ends at data byte {offs[1]}, past the "
                                      f"end of the file ({data_len} data bytes)")
            out_shape = tuple(shape[:-1]) + (shape[-1] // 2,) if dt == "F4" else tuple(shape)
            self.infos[key] = TensorInfo(key, path, dt, out_shape)
            self._offsets[key] = (offs[0], offs[1])
        # every tensor owns its bytes: overlapping ranges would let one tensor silently read another's data
        ranges = sorted((b, e, k) for k, (b, e) in self._offsets.items() if e > b)
        for (b0, e0, k0), (b1, e1, k1) in zip(ranges, ranges[1:]):
            if b1 < e0:
                raise CheckpointError(f"{path}: corrupt header: tensors {k0!r} (data bytes [{b0}, {e0})) and "
                                      f"{k1!r} ([{b1}, {e1})) overlap; each tensor needs bytes of its own")
        self._mm: mmap.mmap | None = None
        self._fh = None

    def keys_in_file_order(self) -> list[str]:
        return sorted(self.infos, key=lambda k: self._offsets[k][0])

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            self._fh = open(self.path, "rb")
            self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def get(self, key: str) -> np.ndarray:
        """A read-only numpy view of the tensor (valid until `close`; copy what you keep)."""
        info = self.infos[key]
        b, _ = self._offsets[key]
        count = math.prod(info.shape)
        if count == 0:
            return np.zeros(info.shape, info.dtype)
        arr = np.frombuffer(self._map(), dtype=info.dtype, count=count, offset=self.data_start + b)
        return arr.reshape(info.shape)

    def release(self, key: str) -> None:
        """Drop the pages of a consumed tensor from this process (they are re-read from the file if needed)."""
        if self._mm is None or not hasattr(self._mm, "madvise"):
            return
        b, e = self._offsets[key]
        start = (self.data_start + b) // mmap.PAGESIZE * mmap.PAGESIZE
        end = self.data_start + e
        if end > start:
            try:
                self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a caller still holds a view; the map goes when that view does
                pass
            self._mm = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# ---- torch files --------------------------------------------------------------------------------------------

def _torch_dtype_table():
    import torch

    return {
        torch.float32: ("F32", None), torch.float64: ("F64", None), torch.float16: ("F16", None),
        torch.bfloat16: ("BF16", torch.int16), torch.int8: ("I8", None), torch.uint8: ("U8", None),
        torch.int16: ("I16", None), torch.int32: ("I32", None), torch.int64: ("I64", None),
        torch.bool: ("BOOL", None), torch.float8_e4m3fn: ("F8_E4M3", torch.uint8),
        torch.float8_e5m2: ("F8_E5M2", torch.uint8), torch.float8_e8m0fnu: ("F8_E8M0", torch.uint8),
        torch.float4_e2m1fn_x2: ("I8", torch.int8),  # DeepSeek's packed FP4 viewed as float4 pairs
    }


def torch_to_numpy(t, where: str = "tensor") -> np.ndarray:
    """A CPU torch tensor → numpy, bit-exact (bf16 / float8 through an integer view)."""
    table = _torch_dtype_table()
    if t.dtype not in table:
        raise CheckpointError(f"{where}: unknown dtype {t.dtype}")
    name, view = table[t.dtype]
    t = t.detach().cpu().contiguous()
    arr = (t.view(view) if view is not None else t).numpy()
    return arr.view(DTYPES[name]) if view is not None else arr


def _load_failure(e: Exception) -> str:
    """torch.load's reason in one line, without its advice to retry with unsafe (pickle) loading."""
    msg = str(e)
    if "WeightsUnpickler error:" in msg:
        msg = msg.split("WeightsUnpickler error:", 1)[1]
    firsts = [ln.strip().split(". ")[0].rstrip(".") for ln in msg.splitlines() if ln.strip()]
    firsts = [ln for ln in firsts if "weights_only" not in ln and "safe_globals" not in ln]
    detail = firsts[0] if firsts else ""
    return f"{type(e).__name__}: {detail}" if detail else type(e).__name__


class TorchFile:
    def __init__(self, path: str | Path):
        import torch

        self.path = path = Path(path)
        try:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # legacy (non-zip) format cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 — torch raises many kinds for a bad file
            raise CheckpointError(f"{path}: not a PyTorch state dict ({_load_failure(e)}); only files of tensors "
                                  f"saved with torch.save are read") from None
        for wrapper in ("state_dict", "model"):
            if isinstance(obj, dict) and len(obj) == 1 and isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: not a PyTorch state dict (it holds a {type(obj).__name__}, not a "
                                  f"mapping of names to tensors)")
        table = _torch_dtype_table()
        self._tensors = {}
        self.infos: dict[str, TensorInfo] = {}
        for key, t in obj.items():
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(f"{path}: entry {key!r} is not a tensor ({type(t).__name__})")
            if t.dtype not in table:
                raise CheckpointError(f"{path}: tensor {key!r} has unknown dtype {t.dtype}")
            name = table[t.dtype][0]
            self._tensors[key] = t
            self.infos[str(key)] = TensorInfo(str(key), path, name, tuple(t.shape))

    def keys_in_file_order(self) -> list[str]:
        return list(self.infos)

    def get(self, key: str) -> np.ndarray:
        return torch_to_numpy(self._tensors[key], f"{self.path}: tensor {key!r}")

    def release(self, key: str) -> None:
        pass

    def close(self) -> None:
        pass


# ---- a whole checkpoint (file or folder) ----------------------------------------------------------------

class TensorSource:
    """Every tensor of a checkpoint: `infos` (key → TensorInfo, in file order), `files`, `get`, `release`."""

    def __init__(self, files: list[Path], kind: str, index: Path | None = None,
                 weight_map: dict[str, str] | None = None):
        self.files, self.kind, self.index = files, kind, index
        self._open: dict[Path, SafetensorsFile | TorchFile] = {}
        self.infos: dict[str, TensorInfo] = {}
        self.keys_by_file: dict[Path, list[str]] = {}
        for f in files:
            h = self._handle(f)
            keys = h.keys_in_file_order()
            if kind == "torch":  # torch files are read whole; keep one open at a time
                self._close_file(f)
            self.keys_by_file[f] = keys
            for k in keys:
                if k in self.infos:
                    raise CheckpointError(f"{f}: tensor {k!r} is also in {self.infos[k].file} (duplicate key)")
                self.infos[k] = h.infos[k]
        if weight_map is not None:
            for k, fname in weight_map.items():
                if k not in self.infos or self.infos[k].file.name != Path(fname).name:
                    raise CheckpointError(f"{index}: lists tensor {k!r} in {fname}, which does not contain it")
            extra = [k for k in self.infos if k not in weight_map]
            if extra:
                raise CheckpointError(f"{self.infos[extra[0]].file}: tensor {extra[0]!r} is not listed in {index}")

    def _handle(self, f: Path):
        if f not in self._open:
            if self.kind == "torch":
                for other in list(self._open):
                    self._close_file(other)
            self._open[f] = SafetensorsFile(f) if self.kind == "safetensors" else TorchFile(f)
        return self._open[f]

    def _close_file(self, f: Path) -> None:
        h = self._open.pop(f, None)
        if h is not None:
            h.close()

    def get(self, key: str) -> np.ndarray:
        info = self.infos[key]
        return self._handle(info.file).get(key)

    def release(self, key: str) -> None:
        h = self._open.get(self.infos[key].file)
        if h is not None:
            h.release(key)

    def done_with_file(self, f: Path) -> None:
        self._close_file(f)

    def iter_tensors(self) -> Iterator[tuple[TensorInfo, np.ndarray]]:
        """(info, array view) one at a time, file by file in data order; each view is released after use."""
        for f in self.files:
            for k in self.keys_by_file[f]:
                yield self.infos[k], self.get(k)
                self.release(k)
            self.done_with_file(f)

    def close(self) -> None:
        for f in list(self._open):
            self._close_file(f)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _read_index(index: Path, folder: Path) -> tuple[list[Path], dict[str, str]]:
    try:
        d = json.loads(index.read_text())
        weight_map = d["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: corrupt index ({type(e).__name__}: {e})") from None
    files: list[Path] = []
    for fname in weight_map.values():
        p = folder / fname
        if p not in files:
            if not p.is_file():
                raise CheckpointError(f"{index}: shard {fname} is missing from {folder}")
            files.append(p)
    return files, weight_map


def open_checkpoint(src: str | Path) -> TensorSource:
    """A file (.safetensors / .pt / .bin / .pth) or a folder of shards (with or without an index)."""
    src = Path(src)
    if src.is_file():
        if src.suffix == ".safetensors":
            return TensorSource([src], "safetensors")
        if src.suffix in TORCH_SUFFIXES:
            return TensorSource([src], "torch")
        raise CheckpointError(f"{src}: not a checkpoint file (.safetensors, .pt, .bin or .pth expected)")
    if not src.is_dir():
        raise CheckpointError(f"{src}: no such file or folder")
    for index_name, kind in ((SAFETENSORS_INDEX, "safetensors"), (TORCH_INDEX, "torch")):
        index = src / index_name
        if index.is_file():
            files, weight_map = _read_index(index, src)
            return TensorSource(files, kind, index, weight_map)
    shards = sorted(src.glob("*.safetensors"))
    if shards:
        return TensorSource(shards, "safetensors")
    shards = sorted(p for p in src.iterdir() if p.suffix in TORCH_SUFFIXES and p.is_file())
    if shards:
        return TensorSource(shards, "torch")
    raise CheckpointError(f"{src}: no checkpoint files (*.safetensors, *.bin, *.pt) in this folder")


def load_all(src: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint as owned numpy arrays (small checkpoints and tests)."""
    with open_checkpoint(src) as source:
        return {info.key: np.array(arr) for info, arr in source.iter_tensors()}


# ---- writing (tests, synthetic official checkpoints) -------------------------------------------------------

def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
    """Write numpy arrays (incl. ml_dtypes bf16 / float8) as a safetensors file, via a temp file + rename."""
    path = Path(path)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for key, a in tensors.items():
        a = np.ascontiguousarray(a)
        if a.dtype not in NAME_OF_DTYPE:
            raise ValueError(f"write_safetensors: tensor {key!r} has unsupported dtype {a.dtype}")
        header[key] = {"dtype": NAME_OF_DTYPE[a.dtype], "shape": list(a.shape),
                       "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays:
            f.write(a.tobytes())
    tmp.replace(path)


def write_index(folder: str | Path, weight_map: dict[str, str], total_size: int | None = None) -> None:
    meta = {"total_size": total_size} if total_size is not None else {}
    Path(folder, SAFETENSORS_INDEX).write_text(json.dumps({"metadata": meta, "weight_map": weight_map}, indent=1))
