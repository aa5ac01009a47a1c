"""Fuzzing the safetensors header parser (hdflash_jax.safetensors_io.SafetensorsFile) with hypothesis.

Whatever the bytes: the file parses (and then every tensor reads back with its declared shape) or it raises the
one clear error, CheckpointError, naming the file. Parsing never allocates in proportion to a size the file
declares (tracemalloc peak bounded by a constant), and no example may take longer than the deadline.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hdflash_jax.safetensors_io import CheckpointError, SafetensorsFile, write_safetensors

FUZZ = settings(max_examples=120, deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
PEAK_BYTES = 2 << 20  # the files are < 20 KB; a parser that allocates by declared size blows far past this


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> tuple[Path, bytes, dict, bytes]:
    """A real small file: (folder for fuzzed copies, its bytes, its header, its data section)."""
    folder = tmp_path_factory.mktemp("fuzz")
    f = folder / "real.safetensors"
    write_safetensors(f, {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.int8),
                          "c": np.zeros((2, 0), np.float16)}, metadata={"format": "pt"})
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return folder, raw, json.loads(raw[8: 8 + n]), raw[8 + n:]


def _parse_and_read(path: Path) -> None:
    try:
        f = SafetensorsFile(path)
    except CheckpointError as e:
        assert str(path) in str(e)
        return
    try:
        for key, info in f.infos.items():
            arr = f.get(key)
            assert arr.shape == info.shape and arr.dtype == info.dtype
            del arr
    finally:
        f.close()


def parse(folder: Path, data: bytes) -> None:
    """Write `data`, parse it under tracemalloc; read every tensor if it parsed. Only CheckpointError may escape."""
    path = folder / "x.safetensors"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        _parse_and_read(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES, peak


def with_header(header: dict | bytes, body: bytes, declared: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + body


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
                    | st.text(max_size=8) | st.sampled_from(["F32", "I8", "F4", "F8_E4M3", "BF16", "Q7"]),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                max_size=4), max_leaves=6)
HUGE = st.integers(0, 2**64 - 1) | st.sampled_from([2**31, 2**32 - 1, 2**40, 2**62, 2**63 - 1, 2**64 - 1])


@FUZZ
@given(data=st.binary(max_size=600))
def test_random_bytes(real, data):
    parse(real[0], data)


@FUZZ
@given(length=HUGE, body=st.binary(max_size=64))
def test_huge_declared_header_length(real, length, body):
    parse(real[0], struct.pack("<Q", length) + body)


@settings(FUZZ, max_examples=60)  # its recursive JSON values are the slowest to draw
@given(key=st.sampled_from(["a", "b", "c", "__metadata__"]),
       field=st.sampled_from(["dtype", "shape", "data_offsets", None]), value=JSON)
def test_mutated_header_fields(real, key, field, value):
    _, _, header, body = real
    h = json.loads(json.dumps(header))
    if field is None or key == "__metadata__":
        h[key] = value
    else:
        h[key][field] = value
    parse(real[0], with_header(h, body))


@FUZZ
@given(dims=st.lists(HUGE, min_size=1, max_size=4), start=HUGE, span=HUGE,
       dtype=st.sampled_from(["F32", "F4", "I8", "F8_E8M0", "F64"]))
def test_huge_declared_shapes_and_offsets(real, dims, start, span, dtype):
    _, _, header, body = real
    h = json.loads(json.dumps(header))
    h["a"] = {"dtype": dtype, "shape": dims, "data_offsets": [start, start + span]}
    parse(real[0], with_header(h, body))


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.none() | st.integers(0, 10**6))
def test_byte_flips_and_truncation(real, flips, cut):
    raw = bytearray(real[1])
    for pos, byte in flips:
        raw[pos % len(raw)] = byte
    if cut is not None:
        raw = raw[: cut % (len(raw) + 1)]
    parse(real[0], bytes(raw))


def test_deeply_nested_header(real):
    deep = b"[" * 100_000 + b"]" * 100_000
    parse(real[0], with_header(deep, b""))
    with pytest.raises(CheckpointError, match="nested too deeply|not valid JSON"):
        path = real[0] / "deep.safetensors"
        path.write_bytes(with_header(b'{"a": ' + deep + b"}", b""))
        SafetensorsFile(path)
