"""convert/torch_to_flax.py: transformers and official DeepSeek checkpoints → orbax params, strict and streaming.

Parity is against transformers' DeepseekV4ForCausalLM (not written here); dequantization is checked bit-exactly
against a decoder written in this file from the formats' bit layouts (not convert/quant.py).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch

from convert import torch_to_flax as t2f
from convert.quant import quantize_fp4, quantize_fp8_block  # writers of official-format tensors only
from hdflash_jax.safetensors_io import load_all, write_index, write_safetensors
from hdflash_jax.checkpoint import abstract_leaves, abstract_model, load_params
from hdflash_jax.config import get_preset
from hdflash_jax.keymap import (assemble_tree, detect_layout, hf_disk_to_official, hf_memory_state_to_official,
                                hf_memory_to_official, tree_to_official)
from hdflash_jax.deepseek_v4.cache import init_cache
from hdflash_jax.deepseek_v4.model import forward_full
from hf_reference import hf_logits, hf_state_numpy, make_hf_model

jax.config.update("jax_default_matmul_precision", "highest")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "convert" / "torch_to_flax.py"
TOL = 1e-4

FP8_RE = re.compile(r"(\.attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|\.attn\.indexer\.wq_b|\.shared_experts\.w[123]|"
                    r"^mtp\.\d+\.(e_proj|h_proj))\.weight$")
FP4_RE = re.compile(r"\.ffn\.experts\.\d+\.w[123]\.weight$")
FP32_RE = re.compile(r"(hc_(attn|ffn|head)_(fn|base|scale)|attn_sink|\.ape|gate\.bias)$")


# ---- an independent decoder of the official formats (their bit layouts) -----------------------------

def ref_e8m0(s: np.ndarray) -> np.ndarray:
    b = np.asarray(s).view(np.uint8).astype(np.float64)
    return np.where(b == 255, np.nan, 2.0 ** (b - 127))


def ref_e4m3(q: np.ndarray) -> np.ndarray:
    b = np.asarray(q).view(np.uint8).astype(np.int64)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp, man = (b >> 3) & 0xF, b & 0x7
    mag = np.where(exp == 0, man / 8.0 * 2.0 ** -6, (1.0 + man / 8.0) * 2.0 ** (exp - 7))
    return np.where((exp == 15) & (man == 7), np.nan, sign * mag)


def ref_scale(s: np.ndarray) -> np.ndarray:
    """FP8 block scales as float64: ue8m0 bytes decoded from their bit layout; fp32 / bf16 scales as they are."""
    s = np.asarray(s)
    return ref_e8m0(s) if s.dtype.itemsize == 1 else s.astype(np.float64)


def ref_fp8(q, s) -> np.ndarray:
    o, i = q.shape
    return (ref_e4m3(q) * np.kron(ref_scale(s), np.ones((128, 128)))[:o, :i]).astype(np.float32)


def ref_fp4(p, s) -> np.ndarray:
    b = np.asarray(p).view(np.uint8).astype(np.int64)
    o = b.shape[0]
    nib = np.stack([b & 0xF, b >> 4], axis=-1).reshape(o, -1)  # low nibble = even element
    sign = np.where(nib & 8, -1.0, 1.0)
    exp, man = (nib >> 1) & 3, nib & 1
    mag = np.where(exp == 0, man * 0.5, 2.0 ** (exp - 1) * (1.0 + man / 2.0))
    return (sign * mag * np.repeat(ref_e8m0(s), 32, axis=1)[:, : nib.shape[1]]).astype(np.float32)


# ---- building checkpoints -------------------------------------------------------------------------------

def quantize_official(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Official storage: FP8 (ue8m0 128×128) attention/shared/MTP projections, FP4 experts, bf16 rest, fp32 mHC."""
    out = {}
    for name, w in flat.items():
        w = np.asarray(w)
        if FP8_RE.search(name):
            out[name], out[name[: -len("weight")] + "scale"] = quantize_fp8_block(w)
        elif FP4_RE.search(name):
            out[name], out[name[: -len("weight")] + "scale"] = quantize_fp4(w)
        elif name.endswith("tid2eid"):
            out[name] = w.astype(np.int64)
        elif FP32_RE.search(name):
            out[name] = w.astype(np.float32)
        else:
            out[name] = w.astype(ml_dtypes.bfloat16)
    return out


def dequantize_reference(stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Official names → float32 (int for tid2eid), with this file's decoder."""
    out = {}
    for name, v in stored.items():
        if name.endswith(".scale"):
            continue
        scale = stored.get(name[: -len("weight")] + "scale") if name.endswith(".weight") else None
        if scale is not None and v.dtype == np.int8:
            out[name] = ref_fp4(v, scale)
        elif scale is not None:
            out[name] = ref_fp8(v, scale)
        elif v.dtype.kind in "iu":
            out[name] = v
        else:
            out[name] = v.astype(np.float32)
    return out


def random_tree(cfg, seed: int, prefix: str = "") -> dict[str, np.ndarray]:
    """Random values for every tree leaf under `prefix` (distinct tid2eid rows), float32/int32."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, var in abstract_leaves(cfg).items():
        if not path.startswith(prefix):
            continue
        shape = tuple(var.shape)
        if path.endswith("tid2eid"):
            out[path] = np.argsort(rng.random((shape[0], cfg.n_routed_experts)), axis=1)[:, : shape[1]].astype(np.int32)
        elif path.endswith("norm.weight"):
            out[path] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif path.endswith("scale"):
            out[path] = (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[path] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return out


def tree_to_official_flat(tree: dict[str, np.ndarray], cfg) -> dict[str, np.ndarray]:
    out = {}
    for path, v in tree.items():
        names = tree_to_official(path, cfg.n_routed_experts)
        if len(names) == 1 and not path.endswith(("experts.w1", "experts.w2", "experts.w3")):
            out[names[0]] = v
        else:
            for e, n in enumerate(names):
                out[n] = v[e]
    return out


def write_sharded(folder: Path, tensors: dict[str, np.ndarray], shard_of, index: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    shards: dict[str, dict] = {}
    for k, v in tensors.items():
        shards.setdefault(shard_of(k), {})[k] = v
    names = sorted(shards)
    weight_map = {}
    for i, s in enumerate(names):
        fname = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        write_safetensors(folder / fname, shards[s])
        weight_map.update({k: fname for k in shards[s]})
    if index:
        write_index(folder, weight_map)


def official_config(cfg) -> dict:
    d = cfg.to_dict()
    d.update(dtype="fp8", scale_fmt="ue8m0", expert_dtype="fp4")  # as DeepSeek's inference/config.json says
    return d


def run_main(args, capsys) -> tuple[int, str]:
    rc = t2f.main([str(a) for a in args] + ["--quiet"])
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def load_official_into_hf(hf_model, official: dict[str, np.ndarray], to_official=hf_memory_to_official) -> None:
    """Set a transformers module's weights from official-named arrays (experts restacked); `to_official` names
    each of the module's state-dict keys in the official layout."""
    sd = {}
    for name, cur in hf_model.state_dict().items():
        off = to_official(name)
        if off.endswith(".ffn.experts.gate_up_proj"):
            p = off[: -len(".gate_up_proj")]
            v = np.stack([np.concatenate([official[f"{p}.{e}.w1.weight"], official[f"{p}.{e}.w3.weight"]])
                          for e in range(cur.shape[0])])
        elif off.endswith(".ffn.experts.down_proj"):
            p = off[: -len(".down_proj")]
            v = np.stack([official[f"{p}.{e}.w2.weight"] for e in range(cur.shape[0])])
        else:
            v = official[off]
        sd[name] = torch.from_numpy(np.ascontiguousarray(v)).to(cur.dtype)
    hf_model.load_state_dict(sd, strict=True)


def model_leaves(model) -> dict[str, np.ndarray]:
    from flax import nnx

    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def main_model(model):
    """The same weights without the MTP block: every converted model then shares one compiled forward."""
    from flax import nnx

    c = model.cfg.replace(n_mtp_layers=0, compress_ratios=model.cfg.compress_ratios[: model.cfg.n_layers])
    graphdef, _ = nnx.split(abstract_model(c, scanned=True))  # the tree load_params builds (layers scanned)
    flat = [(p, v) for p, v in nnx.to_flat_state(nnx.state(model)) if p[0] != "mtp"]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


_JIT = {}


def forward(model, tokens):
    """(logits, final streams) of the main model, jitted once per model structure (eager costs ~3x more)."""
    from flax import nnx

    if "fwd" not in _JIT:
        _JIT["fwd"] = nnx.jit(lambda m, t: tuple(forward_full(m, t)[:2]))
    logits, streams = _JIT["fwd"](main_model(model), tokens)
    return np.asarray(logits), streams


# ---- fixtures -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cfg():
    return get_preset("tiny")


@pytest.fixture(scope="module")
def hf_model(cfg):
    return make_hf_model(cfg, seed=0)


@pytest.fixture(scope="module")
def tokens(cfg):
    return np.random.default_rng(7).integers(0, cfg.vocab_size, (2, 56))


@pytest.fixture(scope="module")
def official_quantized(cfg, hf_model, tmp_path_factory):
    """The transformers weights + random MTP weights in the official layout, quantized, 3 shards + index,
    config in inference/config.json. One scale sits in a different shard from its weight."""
    folder = tmp_path_factory.mktemp("official") / "ckpt"
    main = hf_memory_state_to_official(hf_state_numpy(hf_model))
    mtp = tree_to_official_flat(random_tree(cfg, 11, prefix="mtp."), cfg)
    stored = quantize_official({**main, **mtp})

    def shard_of(k):
        if k == "layers.1.attn.wq_a.scale":
            return "c"
        m = re.match(r"layers\.(\d+)\.", k)
        return "a" if m and int(m.group(1)) < 3 else ("b" if m else "c")

    write_sharded(folder, stored, shard_of)
    (folder / "inference").mkdir()
    (folder / "inference" / "config.json").write_text(json.dumps(official_config(cfg)))
    return folder, stored


@pytest.fixture(scope="module")
def converted_official(official_quantized, tmp_path_factory):
    folder, stored = official_quantized
    dst = tmp_path_factory.mktemp("out") / "official"
    report = t2f.convert(folder, dst, dtype="fp32", progress=False, log=lambda *_: None)
    c, model = load_params(dst)
    return dst, report, c, model, dequantize_reference(stored)


# ---- formats and helpers --------------------------------------------------------------------------------

def test_reference_decoder_agrees_with_ml_dtypes():
    """Guards the test's own decoder: every e4m3 and e2m1 code."""
    codes = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(ref_e4m3(codes), codes.view(ml_dtypes.float8_e4m3fn).astype(np.float64))
    packed = np.arange(16, dtype=np.uint8).view(np.int8)[None, :]  # high nibbles 0, low nibbles 0..15
    vals = ref_fp4(packed, np.full((1, 1), 127, np.uint8))
    lo = (codes[:16] & 15).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    np.testing.assert_array_equal(vals[0, 0::2], lo)


def test_quant_roundtrip_partial_blocks():
    from convert.quant import dequant_fp4, dequant_fp8

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((300, 260)) * np.exp(rng.standard_normal((300, 1)))).astype(np.float32)
    q, s = quantize_fp8_block(w)
    assert q.dtype == ml_dtypes.float8_e4m3fn and s.shape == (3, 3) and s.dtype == ml_dtypes.float8_e8m0fnu
    np.testing.assert_array_equal(dequant_fp8(q, s), ref_fp8(q, s))
    assert np.abs(dequant_fp8(q, s) - w).max() <= 0.0625 * np.abs(w).max()
    q32, s32 = quantize_fp8_block(w, scale_fmt="fp32")
    assert s32.dtype == np.float32
    np.testing.assert_array_equal(dequant_fp8(q32, s32),
                                  (ref_e4m3(q32).astype(np.float32)
                                   * np.kron(s32, np.ones((128, 128), np.float32))[:300, :260]))
    p, s4 = quantize_fp4(w)
    assert p.shape == (300, 130) and p.dtype == np.int8 and s4.shape == (300, 9)
    np.testing.assert_array_equal(dequant_fp4(p, s4), ref_fp4(p, s4))
    bf = dequant_fp4(p, s4, out_dtype=ml_dtypes.bfloat16)
    np.testing.assert_array_equal(bf.astype(np.float32), ref_fp4(p, s4))  # e2m1 × 2^k is exact in bf16


def test_hf_disk_names_and_layout_detection(cfg, hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    disk = load_all(tmp_path)
    mem = hf_memory_state_to_official(hf_state_numpy(hf_model))
    renamed = {hf_disk_to_official(k): v for k, v in disk.items()}
    assert set(renamed) == set(mem)
    for k, v in mem.items():
        np.testing.assert_array_equal(renamed[k], v, err_msg=k)
    assert detect_layout(disk) == "hf_disk"
    assert detect_layout(hf_model.state_dict()) == "hf_memory"
    assert detect_layout(mem) == "official"


# ---- (a) transformers checkpoints -----------------------------------------------------------------------

def test_hf_save_pretrained_converts_to_matching_logits(cfg, hf_model, tokens, tmp_path, capsys):
    src = tmp_path / "hf"
    hf_model.save_pretrained(src)
    dst = tmp_path / "flax"
    rc, out = run_main(["--src", src, "--dst", dst, "--dtype", "fp32", "--no-mtp"], capsys)
    assert rc == 0, out
    assert "MB/s" in out
    report = json.loads((dst / "report.json").read_text())
    assert report["layout"] == "hf_disk" and report["tensors_read"] == len(load_all(src))
    c, model = load_params(dst)
    assert c.n_mtp_layers == 0 and len(model.mtp) == 0 and c.param_dtype == "float32"
    assert report["param_count"] == sum(v.size for v in model_leaves(model).values())
    ref = hf_logits(hf_model, tokens)
    got, _ = forward(model, tokens)
    assert np.abs(got - ref).max() <= TOL * max(1.0, np.abs(ref).max())

    # the same weights as a transformers in-memory state dict in a .pt file (stacked experts, bf16 → exact)
    pt_dir = tmp_path / "pt"
    pt_dir.mkdir()
    shutil.copy(src / "config.json", pt_dir / "config.json")
    torch.save(hf_model.state_dict(), pt_dir / "state.pt")
    rc, out = run_main(["--src", pt_dir / "state.pt", "--dst", tmp_path / "flax_pt", "--dtype", "fp32",
                        "--no-mtp"], capsys)
    assert rc == 0, out
    assert json.loads((tmp_path / "flax_pt" / "report.json").read_text())["layout"] == "hf_memory"
    _, model_pt = load_params(tmp_path / "flax_pt")
    a, b = model_leaves(model), model_leaves(model_pt)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---- (b) official layout, FP8/FP4 ------------------------------------------------------------------------

def test_official_quantized_dequantizes_bit_exact(converted_official, official_quantized):
    dst, report, c, model, expected = converted_official
    _, stored = official_quantized
    n_fp8 = sum(1 for k in stored if k.endswith(".scale") and stored[k[:-5] + "weight"].dtype != np.int8)
    n_fp4 = sum(1 for k in stored if k.endswith(".scale")) - n_fp8
    assert report["dequantized"] == {"fp8": n_fp8, "fp4": n_fp4} and n_fp8 > 0 and n_fp4 > 0
    assert report["layout"] == "official" and report["files"] == 3
    from flax import nnx

    want = assemble_tree(expected, nnx.state(model), source="reference")
    got = model_leaves(model)
    assert set(want) == set(got)
    for k in want:
        assert got[k].dtype == np.dtype(want[k].dtype) or got[k].dtype.kind == want[k].dtype.kind, k
        np.testing.assert_array_equal(got[k], want[k].astype(got[k].dtype), err_msg=k)


def test_official_quantized_logits_match_transformers(converted_official, hf_model, tokens):
    dst, report, c, model, expected = converted_official
    hf_deq = copy.deepcopy(hf_model)
    load_official_into_hf(hf_deq, {k: v for k, v in expected.items() if not k.startswith("mtp.")})
    ref = hf_logits(hf_deq, tokens)
    got, _ = forward(model, tokens)
    assert np.abs(got - ref).max() <= TOL * max(1.0, np.abs(ref).max())


def test_official_bf16_output(official_quantized, converted_official, tmp_path, capsys):
    folder, _ = official_quantized
    rc, out = run_main(["--src", folder, "--dst", tmp_path / "bf16"], capsys)  # default --dtype bf16
    assert rc == 0, out
    c, model = load_params(tmp_path / "bf16")
    assert c.param_dtype == "bfloat16"
    f32 = model_leaves(converted_official[3])
    from flax import nnx

    abstract = {".".join(map(str, p)): v for p, v in  # the tree load_params builds (layers scanned)
                nnx.to_flat_state(nnx.state(abstract_model(c, scanned=True)))}
    n_bf16 = 0
    for k, v in model_leaves(model).items():
        assert v.dtype == np.dtype(abstract[k].dtype), k
        n_bf16 += v.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(v, f32[k].astype(v.dtype), err_msg=k)  # one rounding of the exact value
    assert n_bf16 > 100


# ---- (c) MTP --------------------------------------------------------------------------------------------

def test_official_mtp_weights_land_and_run(converted_official, cfg, tokens):
    dst, report, c, model, expected = converted_official
    assert c.n_mtp_layers == 1 and len(model.mtp) == 1
    got = model_leaves(model)
    mtp_official = {k: v for k, v in expected.items() if k.startswith("mtp.")}
    assert len(mtp_official) > 30
    from hdflash_jax.keymap import official_to_tree

    for name, v in mtp_official.items():
        path, row = official_to_tree(name)
        assert path.startswith("mtp.0."), (name, path)
        np.testing.assert_array_equal(got[path] if row is None else got[path][row], v, err_msg=name)
    from flax import nnx

    b, t = tokens.shape
    _, main_streams = forward(model, tokens)
    # position i: target streams at i + token i+1 (the last next-token is a stand-in)
    cache = init_cache(c, b, t, max_block=1)
    next_tokens = np.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
    logits, streams, cache = nnx.jit(lambda m, s, n, k: m.mtp_step(s, n, k))(model, main_streams, next_tokens, cache)
    logits = np.asarray(logits)
    assert logits.shape == (b, t, cfg.vocab_size) and np.isfinite(logits).all() and np.abs(logits).max() > 0
    assert np.asarray(streams).shape == (b, t, c.hc_mult, c.dim)
    assert np.asarray(cache["mtp"]["length"]).tolist() == [t] * b


# ---- (d) small official checkpoints (bad inputs: tests/test_bad_inputs.py) ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_official(tmp_path_factory):
    """A 2-layer official checkpoint (plain fp32 tensors, one FP8 pair), single file + inference config."""
    c = get_preset("tiny", n_layers=2, n_hash_layers=1, compress_ratios=(0, 4, 0))
    folder = tmp_path_factory.mktemp("small") / "ckpt"
    folder.mkdir()
    tensors = tree_to_official_flat(random_tree(c, 3), c)
    q, s = quantize_fp8_block(tensors["layers.0.attn.wq_a.weight"])
    tensors["layers.0.attn.wq_a.weight"], tensors["layers.0.attn.wq_a.scale"] = q, s
    write_safetensors(folder / "model.safetensors", tensors)
    (folder / "config.json").write_text(json.dumps(official_config(c)))
    return folder, tensors


def _variant(small_official, tmp_path, edit=None):
    folder, tensors = small_official
    dst = tmp_path / "src"
    shutil.copytree(folder, dst)
    if edit is not None:
        t = dict(tensors)
        edit(t)
        write_safetensors(dst / "model.safetensors", t)
    return dst


def test_small_official_converts(small_official, tmp_path, capsys):
    folder, tensors = small_official
    rc, out = run_main(["--src", folder, "--dst", tmp_path / "ok", "--dtype", "fp32"], capsys)
    assert rc == 0, out
    c, model = load_params(tmp_path / "ok")
    got = model_leaves(model)
    np.testing.assert_array_equal(got["layers.0.attn.wq_a.weight"],
                                  ref_fp8(tensors["layers.0.attn.wq_a.weight"], tensors["layers.0.attn.wq_a.scale"]))
    np.testing.assert_array_equal(got["layers.1.ffn.experts.w2"][5], tensors["layers.1.ffn.experts.5.w2.weight"])
    # --no-mtp: the mtp.* tensors are skipped and the config says n_mtp_layers = 0
    rc, out = run_main(["--src", folder, "--dst", tmp_path / "nomtp", "--dtype", "fp32", "--no-mtp"], capsys)
    assert rc == 0, out
    report = json.loads((tmp_path / "nomtp" / "report.json").read_text())
    assert report["skipped_mtp"] == sum(k.startswith("mtp.") for k in tensors) > 0
    c2, model2 = load_params(tmp_path / "nomtp")
    assert c2.n_mtp_layers == 0 and c2.compress_ratios == c.compress_ratios[: c.n_layers] and len(model2.mtp) == 0


def test_allow_unused_skips_and_reports(small_official, tmp_path, capsys):
    src = _variant(small_official, tmp_path, lambda t: t.update({"layers.1.attn.bogus.weight": np.zeros(3)}))
    rc, out = run_main(["--src", src, "--dst", tmp_path / "out", "--allow-unused", "--dtype", "fp32"], capsys)
    assert rc == 0, out
    assert json.loads((tmp_path / "out" / "report.json").read_text())["unused"] == ["layers.1.attn.bogus.weight"]


def test_config_flag_and_overwrite_of_a_folder(small_official, tmp_path, capsys):
    """--config stands in for a missing config.json; --overwrite replaces an earlier conversion once the new one is
    complete (the refusals, a folder of the user's own among them, are rows of tests/test_bad_inputs.py)."""
    src = _variant(small_official, tmp_path)
    (src / "config.json").unlink()
    cfg_file = small_official[0] / "config.json"
    dst = tmp_path / "exists"
    (dst / "params").mkdir(parents=True)  # an earlier converted checkpoint: the converter's own kind of output
    (dst / "config.json").write_text("{}")
    (dst / "keep.txt").write_text("x")
    rc, out = run_main(["--src", src, "--dst", dst, "--config", cfg_file, "--overwrite"], capsys)
    assert rc == 0, out
    assert not (dst / "keep.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["exists", "src"]
    load_params(dst)


def test_sigkill_leaves_no_checkpoint(small_official, tmp_path):
    folder, tensors = small_official
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # two shards; the converter pauses after the first one (its finished leaves already on disk) and is killed
    src = tmp_path / "sharded"
    write_sharded(src, tensors, lambda k: "a" if k.startswith(("layers.0.", "embed")) else "b")
    shutil.copy(folder / "config.json", src / "config.json")
    dst = tmp_path / "dst"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--src", str(src), "--dst", str(dst), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env, t2f.SLEEP_ENV: "120"})
    try:
        line = proc.stdout.readline()
        assert "first shard done" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        tmp = list(tmp_path.glob("dst.tmp-*"))
        assert tmp and any(tmp[0].rglob("*")), "a partial save should exist while it sleeps"
    finally:
        proc.kill()  # SIGKILL: no cleanup runs
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not dst.exists()
    with pytest.raises(FileNotFoundError):
        load_params(dst)
    for leftover in tmp_path.glob("dst.tmp-*"):
        with pytest.raises((FileNotFoundError, ValueError)):
            load_params(leftover)
    # a rerun cleans the dead run's temp folder and finishes
    t2f.convert(src, dst, progress=False, log=lambda *_: None)
    assert not list(tmp_path.glob("dst.tmp-*"))
    load_params(dst)


# ---- memory: peak RSS does not grow with depth (slow) --------------------------------------------------

def write_synthetic_official(folder: Path, cfg, seed: int = 0) -> None:
    """Random official-format bytes (FP8/FP4 + e8m0 scales, bf16, fp32), one shard per layer."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    groups: dict[str, dict] = {}
    for path, var in abstract_leaves(cfg).items():
        shape = tuple(var.shape)
        m = re.match(r"^(layers|mtp)\.(\d+)\.", path)
        group = f"{m.group(1)}{int(m.group(2)):04d}" if m else "top"
        stacked = path.endswith(("experts.w1", "experts.w2", "experts.w3"))
        names = tree_to_official(path, cfg.n_routed_experts)
        sub = shape[1:] if stacked else shape
        for name in names if stacked else names[:1]:
            t = groups.setdefault(group, {})
            if FP4_RE.search(name):
                t[name] = rng.integers(-128, 128, (sub[0], sub[1] // 2), dtype=np.int8)
                t[name[:-6] + "scale"] = rng.integers(118, 128, (sub[0], -(-sub[1] // 32)), dtype=np.uint8).view(
                    ml_dtypes.float8_e8m0fnu)
            elif FP8_RE.search(name):
                b = rng.integers(0, 256, sub, dtype=np.uint8)
                b[(b & 0x7F) == 0x7F] = 0x38
                t[name] = b.view(ml_dtypes.float8_e4m3fn)
                t[name[:-6] + "scale"] = rng.integers(118, 128, (-(-sub[0] // 128), -(-sub[1] // 128)),
                                                      dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu)
            elif name.endswith("tid2eid"):
                t[name] = np.argsort(rng.random((sub[0], cfg.n_routed_experts)), 1)[:, : sub[1]].astype(np.int64)
            elif FP32_RE.search(name):
                t[name] = rng.standard_normal(sub, dtype=np.float32)
            else:
                t[name] = (rng.standard_normal(sub, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    weight_map = {}
    for i, g in enumerate(sorted(groups)):
        fname = f"model-{i:05d}.safetensors"
        write_safetensors(folder / fname, groups[g])
        weight_map.update({k: fname for k in groups[g]})
        groups[g] = None
    write_index(folder, weight_map)
    (folder / "inference").mkdir()
    (folder / "inference" / "config.json").write_text(json.dumps(official_config(cfg)))


def rss_config(n_layers: int):
    ratios = tuple([0, 0] + [4 if i % 2 == 0 else 128 for i in range(n_layers - 2)]) + (0,)
    return get_preset("tiny", vocab_size=4096, dim=512, n_layers=n_layers, n_heads=8, head_dim=128,
                      rope_head_dim=64, q_lora_rank=256, o_groups=4, o_lora_rank=128, window_size=128,
                      index_n_heads=8, index_head_dim=64, index_topk=16, n_routed_experts=32, n_activated_experts=4,
                      moe_inter_dim=512, n_hash_layers=2, compress_ratios=ratios)


def measure_peak_rss_kb(args: list[str]) -> tuple[int, float, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    if Path("/usr/bin/time").exists():
        r = subprocess.run(["/usr/bin/time", "-v", sys.executable, str(SCRIPT), *args], capture_output=True,
                           text=True, env=env)
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
        peak = int(m.group(1)) if m else -1
    else:  # ru_maxrss of the only child of a fresh wrapper process
        code = ("import resource,subprocess,sys; r=subprocess.run(sys.argv[1:]); "
                "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
                "sys.exit(r.returncode)")
        r = subprocess.run([sys.executable, "-c", code, sys.executable, str(SCRIPT), *args], capture_output=True,
                           text=True, env=env)
        peak = int(re.search(r"MAXRSS (\d+)", r.stderr).group(1))
    assert r.returncode == 0, r.stderr[-3000:]
    return peak, time.perf_counter() - t0, r.stdout


@pytest.mark.slow
def test_peak_rss_flat_in_depth(tmp_path):
    peaks = {}
    for n in (8, 32):
        c = rss_config(n)
        src = tmp_path / f"src{n}"
        write_synthetic_official(src, c, seed=n)
        peak, secs, out = measure_peak_rss_kb(["--src", str(src), "--dst", str(tmp_path / f"dst{n}"), "--quiet"])
        report = json.loads((tmp_path / f"dst{n}" / "report.json").read_text())
        peaks[n] = peak
        print(f"\n{n} layers: peak RSS {peak / 1024:.0f} MiB, {report['bytes_read'] / 1e6:.0f} MB read, "
              f"{report['bytes_written'] / 1e6:.0f} MB written, {secs:.1f} s wall; {out.strip()}")
        shutil.rmtree(src)
        if n == 8:
            load_params(tmp_path / "dst8")  # it is a real checkpoint
        shutil.rmtree(tmp_path / f"dst{n}")
    assert peaks[32] <= 1.3 * peaks[8], peaks


# ---- checkpoint loading ---------------------------------------------------------------------------------

def test_load_params_shardings_and_strictness(small_official, tmp_path, capsys):
    from jax.sharding import NamedSharding, PartitionSpec as P

    rc, out = run_main(["--src", small_official[0], "--dst", tmp_path / "ck", "--dtype", "fp32"], capsys)
    assert rc == 0, out
    mesh = jax.make_mesh((1,), ("tensor",), axis_types=(jax.sharding.AxisType.Auto,))
    want = NamedSharding(mesh, P())
    seen = []
    c, state = load_params(tmp_path / "ck", shardings=lambda path, shape, names: seen.append(path) or want,
                           as_model=False)
    assert len(seen) == len(abstract_leaves(c)) and state["embed"].get_value().sharding == want
    # a config that disagrees with the saved tree is refused, naming the parameter
    d = json.loads((tmp_path / "ck" / "config.json").read_text())
    (tmp_path / "ck" / "config.json").write_text(json.dumps({**d, "moe_inter_dim": 16}))
    with pytest.raises(ValueError, match=r"'layers\.0\.ffn\.experts\.w1' has shape"):
        load_params(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text(json.dumps({**d, "n_mtp_layers": 0, "compress_ratios": [0, 4]}))
    with pytest.raises(ValueError, match=r"unexpected parameter 'mtp\.0\."):
        load_params(tmp_path / "ck")


def test_load_params_into_mesh_shardings(small_official, tmp_path, capsys):
    """Restored straight into the logical-axis shardings of a mesh (8 simulated devices, tests/conftest.py)."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices")
    from flax import nnx

    from hdflash_jax.sharding import make_mesh

    rc, out = run_main(["--src", small_official[0], "--dst", tmp_path / "ck", "--dtype", "fp32"], capsys)
    assert rc == 0, out
    mesh = make_mesh({"fsdp": 2, "expert": 2, "tensor": 2}, devices=jax.devices()[:8])
    _, sharded = load_params(tmp_path / "ck", mesh=mesh)
    _, plain = load_params(tmp_path / "ck")
    a = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(sharded))}
    b = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(plain))}
    for k in b:
        np.testing.assert_array_equal(np.asarray(a[k]), b[k], err_msg=str(k))
    w1 = a[("layers", 1, "ffn", "experts", "w1")]
    assert len(w1.addressable_shards) == 8 and w1.sharding.mesh == mesh
    assert w1.addressable_shards[0].data.shape[0] == w1.shape[0] // 2  # experts split over the expert axis


# ==== DSpark: the drafter inside the V4 DSpark checkpoints (mtp.* = DSpark blocks, not the native MTP block) ====

DSPARK_KEYS = {"dspark_block_size": 5, "dspark_noise_token_id": 511, "dspark_target_layer_ids": [3, 4, 5],
               "dspark_markov_rank": 16, "dspark_n_routed_experts": 4, "dspark_num_experts_per_tok": 2}


@pytest.fixture(scope="module")
def dspark_official(cfg, tmp_path_factory):
    """A synthetic official-layout DSpark release: trunk + 3 DSpark blocks under mtp.0-2 (FP8 projections,
    main_proj included; FP4 experts; fp32 mHC), config with the dspark_* keys (and an MTP entry, as released)."""
    from hdflash_jax.dspark.config import DSparkConfig
    from test_dspark_reference import dspark_official_weights

    dcfg = DSparkConfig.from_checkpoint_dict(DSPARK_KEYS)
    trunk = tree_to_official_flat(random_tree(cfg, 13), cfg)
    trunk = {k: v for k, v in trunk.items() if not k.startswith("mtp.")}
    drafter = {k: v for k, v in dspark_official_weights(dcfg, cfg, seed=17).items() if k.startswith("mtp.")}
    stored = quantize_official({**trunk, **drafter})
    w = stored.pop("mtp.0.main_proj.weight").astype(np.float32)
    stored["mtp.0.main_proj.weight"], stored["mtp.0.main_proj.scale"] = quantize_fp8_block(w)
    folder = tmp_path_factory.mktemp("dspark_official") / "ckpt"
    write_sharded(folder, stored, lambda k: "b" if k.startswith("mtp.") else "a")
    (folder / "config.json").write_text(json.dumps({**official_config(cfg), **DSPARK_KEYS}))
    return folder, stored, dcfg


def test_dspark_checkpoint_converts_to_target_and_drafter(cfg, dspark_official, tmp_path):
    from hdflash_jax.checkpoint import load_config
    from hdflash_jax.families import family
    from hdflash_jax.dspark.keymap import tree_to_dspark_names

    folder, stored, dcfg = dspark_official
    dst = tmp_path / "out"
    report = t2f.convert(folder, dst, dtype="fp32", progress=False, log=lambda *_: None, moe_dispatch="ragged",
                         attention_impl="dense")
    assert report["mtp_layout"] == "dspark"
    # per block: 4 experts x w1/w2/w3 in FP4; wq_a, wq_b, wkv, wo_a, wo_b and the shared expert's 3 in FP8; main_proj
    assert report["dspark"]["dequantized"] == {"fp4": 3 * 4 * 3, "fp8": 3 * 8 + 1}
    tcfg = load_config(dst)
    assert tcfg.n_mtp_layers == 0 and (tcfg.moe_dispatch, tcfg.attention_impl) == ("ragged", "dense")
    got_cfg, drafter = family("dspark").load(dst / "dspark", tcfg)
    assert got_cfg == dcfg
    ref = dequantize_reference(stored)
    n_checked = 0
    for path, v in model_leaves(drafter).items():
        names = tree_to_dspark_names(path, dcfg.num_blocks, v.shape[0] if ".experts." in path else None)
        want = np.stack([ref[n] for n in names]) if ".experts.w" in path else ref[names[0]]
        np.testing.assert_array_equal(v, want, err_msg=path)  # dequantized bit-exact, every leaf
        n_checked += 1
    assert n_checked == len(model_leaves(drafter))


def test_native_mtp_still_converts_to_mtp(converted_official):
    _, report, c, model, _ = converted_official
    assert report["mtp_layout"] == "native" and report["dspark"] is None and c.n_mtp_layers == 1


@pytest.mark.parametrize("case", ["mix", "dspark_config_native_keys", "dspark_keys_native_config"])
def test_half_matching_mtp_layouts_are_refused(cfg, dspark_official, official_quantized, tmp_path, case):
    folder, stored, _ = dspark_official
    if case == "mix":  # a DSpark release with one native MTP tensor added
        src = tmp_path / "mix"
        write_sharded(src, {**stored, "mtp.0.enorm.weight": np.ones(cfg.dim, np.float32)},
                      lambda k: "b" if k.startswith("mtp.") else "a", index=False)
        (src / "config.json").write_text((folder / "config.json").read_text())
        want = ("mix a native MTP block ('mtp.0.enorm.weight') and a DSpark drafter ('mtp.0.main_norm.weight', "
                "'mtp.0.main_proj.weight', 'mtp.2.confidence_head.proj.weight', 'mtp.2.markov_head.markov_w1.weight' "
                "and 1 more)")
        conf = None
    elif case == "dspark_config_native_keys":  # the native-MTP release under a config that declares DSpark
        src = official_quantized[0]
        conf = tmp_path / "config.json"
        conf.write_text(json.dumps({**official_config(cfg), **DSPARK_KEYS}))
        want = "the config declares a DSpark drafter (dspark_* keys) but the mtp.* tensors are a native MTP block"
    else:  # the DSpark tensors under a config without dspark_* keys (what a prefix remap would half-load)
        src = folder
        conf = tmp_path / "config.json"
        conf.write_text(json.dumps(official_config(cfg)))
        want = "the mtp.* tensors are a DSpark drafter ('mtp.0.main_norm.weight'"
    with pytest.raises(t2f.CheckpointError) as e:
        t2f.convert(src, tmp_path / "dst", dtype="fp32", progress=False, log=lambda *_: None, config=conf)
    assert want in str(e.value), str(e.value)
    assert not (tmp_path / "dst").exists()
