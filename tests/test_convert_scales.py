"""FP8 checkpoints whose block scales are float32 or bf16 (DeepSeek's base checkpoints), converted end to end by
the CLI: every converted parameter equals tests/test_convert.py's reference dequantization of the stored bytes
(`dequantize_reference`: e4m3 decoded from its bit layout, times the float scale), bit for bit, after a strict
restore."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from convert.quant import quantize_fp4, quantize_fp8_block
from hdflash_jax.safetensors_io import write_safetensors
from hdflash_jax.checkpoint import load_params
from hdflash_jax.config import get_preset
from hdflash_jax.keymap import official_to_tree
from test_convert import (FP4_RE, FP8_RE, dequantize_reference, model_leaves, random_tree, ref_e4m3, run_main,
                          tree_to_official_flat)

CFG = get_preset("tiny", n_layers=2, n_hash_layers=1, compress_ratios=(0, 4, 0))


def _stored(scale_dtype) -> dict[str, np.ndarray]:
    """Official tensors: FP8 projections with float scales of `scale_dtype`, FP4 experts (e8m0), fp32 rest."""
    out = {}
    for name, w in tree_to_official_flat(random_tree(CFG, 21), CFG).items():
        if FP8_RE.search(name):
            q, s = quantize_fp8_block(w, scale_fmt="fp32")
            out[name], out[name[: -len("weight")] + "scale"] = q, s.astype(scale_dtype)
        elif FP4_RE.search(name):
            out[name], out[name[: -len("weight")] + "scale"] = quantize_fp4(w)
        else:
            out[name] = w
    return out


@pytest.mark.parametrize("scale_dtype", [np.float32, ml_dtypes.bfloat16], ids=["fp32", "bf16"])
def test_fp8_with_float_scales_converts_end_to_end(scale_dtype, tmp_path, capsys):
    stored = _stored(scale_dtype)
    n_fp8 = sum(1 for k in stored if FP8_RE.search(k))
    assert n_fp8 >= 10 and all(stored[k[:-6] + "scale"].dtype == np.dtype(scale_dtype)
                               for k in stored if FP8_RE.search(k))
    src = tmp_path / "src"
    src.mkdir()
    write_safetensors(src / "model.safetensors", stored)
    d = CFG.to_dict()
    d.update(dtype="fp8", scale_fmt=None, expert_dtype="fp4")  # base checkpoints: float scales, no ue8m0
    (src / "config.json").write_text(json.dumps(d))
    rc, out = run_main(["--src", src, "--dst", tmp_path / "dst", "--dtype", "fp32"], capsys)
    assert rc == 0, out
    report = json.loads((tmp_path / "dst" / "report.json").read_text())
    assert report["dequantized"]["fp8"] == n_fp8
    _, model = load_params(tmp_path / "dst")
    got = model_leaves(model)
    for name, want in dequantize_reference(stored).items():
        path, row = official_to_tree(name)
        leaf = got[path] if row is None else got[path][row]
        np.testing.assert_array_equal(leaf, want, err_msg=name)
    # the scales really mattered: without them the weights would be the raw e4m3 values
    name = next(k for k in stored if FP8_RE.search(k))
    assert not np.allclose(ref_e4m3(stored[name]), dequantize_reference(stored)[name])
