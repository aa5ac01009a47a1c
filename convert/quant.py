"""DeepSeek-V4 checkpoint quantization formats: dequantization, and the inverse for tests.

* E8M0 scale: byte b → 2^(b − 127); 0xFF is NaN. Stored as `F8_E8M0` (ml_dtypes `float8_e8m0fnu`) or raw uint8.
  Base checkpoints may carry float32 (or bf16) scales instead; those multiply as they are.
* FP8 weight: `float8_e4m3fn` [O, I] with scales [⌈O/128⌉, ⌈I/128⌉]: W[o, i] = w[o, i] · s[o // 128, i // 128].
* FP4 weight: int8 [O, I/2], two e2m1 codes per byte (element 2j in the LOW nibble, 2j+1 in the high one), scales
  [O, ⌈I/32⌉]: W[o, i] = e2m1(code) · s[o, i // 32]. Codes 0–7 → 0, .5, 1, 1.5, 2, 3, 4, 6; 8–15 the negatives.

Dequantization is exact in float32 for power-of-two (e8m0) scales; the result is cast to the requested dtype
(round to nearest even), one row block at a time so no temporary is larger than 128 rows.
`quantize_fp8_block` / `quantize_fp4` write official-format tensors (synthetic checkpoints, tests).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

FP8_BLOCK = 128
FP4_BLOCK = 32
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP4_MAX = 6.0
E2M1_TABLE = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)

E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scale_to_float32(scale: np.ndarray) -> np.ndarray:
    """Block scales of any stored kind → float32: e8m0 (as `float8_e8m0fnu` or raw uint8) or a float dtype."""
    scale = np.asarray(scale)
    if scale.dtype == E8M0 or scale.dtype == np.uint8:
        b = scale.view(np.uint8).astype(np.int32)
        with np.errstate(over="ignore"):  # b = 0xFF overflows to inf and is then set to NaN
            out = np.ldexp(np.float32(1.0), b - 127).astype(np.float32)  # b = 0 → 2^-127 (subnormal): exact
        out[b == 0xFF] = np.nan
        return out
    if scale.dtype.kind == "f" or scale.dtype == np.dtype(ml_dtypes.bfloat16):
        return scale.astype(np.float32)
    raise TypeError(f"block scales must be e8m0, uint8 or float, got {scale.dtype}")


def fp8_scale_shape(shape: tuple[int, int], block: int = FP8_BLOCK) -> tuple[int, int]:
    return _cdiv(shape[0], block), _cdiv(shape[1], block)


def fp4_scale_shape(shape: tuple[int, int], block: int = FP4_BLOCK) -> tuple[int, int]:
    """Scale shape of an FP4 weight whose UNPACKED shape is `shape`."""
    return shape[0], _cdiv(shape[1], block)


def dequant_fp8(weight: np.ndarray, scale: np.ndarray, out_dtype=np.float32, block: int = FP8_BLOCK,
                out: np.ndarray | None = None) -> np.ndarray:
    """FP8 e4m3 [O, I] with 128×128 block scales → out_dtype [O, I] (written into `out` when given)."""
    w = np.asarray(weight)
    if w.dtype == np.uint8:
        w = w.view(E4M3)
    if w.dtype != E4M3 or w.ndim != 2:
        raise TypeError(f"FP8 weight must be 2-D float8_e4m3fn, got {w.dtype} {w.shape}")
    o, i = w.shape
    s = scale_to_float32(scale)
    if s.shape != fp8_scale_shape(w.shape, block):
        raise ValueError(f"FP8 scale shape {s.shape} does not fit weight {w.shape} in {block}x{block} blocks "
                         f"(expected {fp8_scale_shape(w.shape, block)})")
    if out is None:
        out = np.empty((o, i), out_dtype)
    for rb in range(s.shape[0]):
        r0, r1 = rb * block, min((rb + 1) * block, o)
        row_scale = np.repeat(s[rb], block)[:i]
        out[r0:r1] = w[r0:r1].astype(np.float32) * row_scale[None, :]
    return out


def _unpack_fp4_codes(packed: np.ndarray) -> np.ndarray:
    b = np.asarray(packed).view(np.uint8)
    codes = np.empty(b.shape[:-1] + (b.shape[-1] * 2,), np.uint8)
    codes[..., 0::2] = b & 0x0F
    codes[..., 1::2] = b >> 4
    return codes


def dequant_fp4(weight: np.ndarray, scale: np.ndarray, out_dtype=np.float32, block: int = FP4_BLOCK,
                out: np.ndarray | None = None) -> np.ndarray:
    """Packed FP4 e2m1 int8 [O, I/2] with [O, ⌈I/32⌉] scales → out_dtype [O, I]."""
    w = np.asarray(weight)
    if w.dtype not in (np.int8, np.uint8) or w.ndim != 2:
        raise TypeError(f"FP4 weight must be 2-D int8 (two e2m1 codes per byte), got {w.dtype} {w.shape}")
    o, i = w.shape[0], w.shape[1] * 2
    s = scale_to_float32(scale)
    if s.shape != fp4_scale_shape((o, i), block):
        raise ValueError(f"FP4 scale shape {s.shape} does not fit weight [{o}, {i}] (packed {w.shape}) in "
                         f"{block}-wide blocks (expected {fp4_scale_shape((o, i), block)})")
    if out is None:
        out = np.empty((o, i), out_dtype)
    step = 128
    for r0 in range(0, o, step):
        r1 = min(r0 + step, o)
        vals = E2M1_TABLE[_unpack_fp4_codes(w[r0:r1])]
        out[r0:r1] = vals * np.repeat(s[r0:r1], block, axis=1)[:, :i]
    return out


# ---- the inverse: official-format tensors from float weights --------------------------------------------------

def _pow2_scale_e8m0(amax: np.ndarray, qmax: float) -> np.ndarray:
    """Smallest power of two s with amax / s ≤ qmax, as e8m0 bytes (all-zero blocks get s = 1)."""
    amax = np.asarray(amax, np.float64)
    with np.errstate(divide="ignore"):
        e = np.where(amax > 0, np.ceil(np.log2(np.where(amax > 0, amax, 1.0) / qmax)), 0.0)
    return np.clip(e + 127, 0, 254).astype(np.uint8)


def quantize_fp8_block(w: np.ndarray, scale_fmt: str = "ue8m0", block: int = FP8_BLOCK):
    """float [O, I] → (float8_e4m3fn [O, I], scales [⌈O/128⌉, ⌈I/128⌉]).

    scale_fmt 'ue8m0' gives power-of-two scales as `float8_e8m0fnu` (the instruct checkpoints); 'fp32' gives
    float32 scales amax/448 (base checkpoints).
    """
    w = np.asarray(w, np.float32)
    o, i = w.shape
    so, si = fp8_scale_shape(w.shape, block)
    pad = np.zeros((so * block, si * block), np.float32)
    pad[:o, :i] = np.abs(w)
    amax = pad.reshape(so, block, si, block).max(axis=(1, 3))
    if scale_fmt == "ue8m0":
        scale = _pow2_scale_e8m0(amax, FP8_MAX).view(E8M0)
    elif scale_fmt == "fp32":
        scale = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
    else:
        raise ValueError(f"scale_fmt must be 'ue8m0' or 'fp32', got {scale_fmt!r}")
    sf = scale_to_float32(scale)
    full = np.repeat(np.repeat(sf, block, axis=0), block, axis=1)[:o, :i]
    q = np.clip(w / full, -FP8_MAX, FP8_MAX).astype(E4M3)
    return q, scale


def quantize_fp4(w: np.ndarray, block: int = FP4_BLOCK):
    """float [O, I] (I even) → (int8 [O, I/2] packed e2m1, low nibble = even element; e8m0 scales [O, ⌈I/32⌉])."""
    w = np.asarray(w, np.float32)
    o, i = w.shape
    if i % 2:
        raise ValueError(f"FP4 packing needs an even input dimension, got {w.shape}")
    nb = _cdiv(i, block)
    pad = np.zeros((o, nb * block), np.float32)
    pad[:, :i] = np.abs(w)
    amax = pad.reshape(o, nb, block).max(axis=2)
    scale = _pow2_scale_e8m0(amax, FP4_MAX).view(E8M0)
    full = np.repeat(scale_to_float32(scale), block, axis=1)[:, :i]
    q = np.clip(w / full, -FP4_MAX, FP4_MAX).astype(ml_dtypes.float4_e2m1fn)
    codes = q.view(np.uint8) & 0x0F  # ml_dtypes keeps one e2m1 code per byte: sign<<3 | exp<<1 | mantissa
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8).view(np.int8)
    return packed, scale
