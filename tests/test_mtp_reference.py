"""The MTP block against an independent torch transcription of DeepSeek-V4's reference `MTPBlock`.

The reference forward (DeepSeek's inference/model.py, transcribed here, not copied):
    e = enorm(embed(t_{i+1}));  x = e_proj(e)[:, :, None] + h_proj(hnorm(H_i))  (per stream)
    x = Block(x)                                     (a full mHC block: SWA attention, MoE with bias routing)
    logits = head(norm_mtp(hc_head_mtp(x)))          (the MTP layer's own hc_head AND its own final norm)
The inner block is transformers' `DeepseekV4DecoderLayer` (written by neither DeepSeek nor this project; the
target's parity tests check hdflash_jax's block against it). The weights are an official-layout checkpoint,
written as safetensors and converted by convert/torch_to_flax.py, then restored with `load_params`; the torch
side reads the same official tensors by name. fp32 throughout.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import jax
from flax import nnx

from convert import torch_to_flax as t2f
from convert.safetensors_io import write_safetensors
from hdflash_jax.checkpoint import abstract_leaves, load_params
from hdflash_jax.config import get_preset
from hdflash_jax.deepseek_v4.cache import init_cache
from hdflash_jax.keymap import hf_memory_to_official, tree_to_official
from test_convert import load_official_into_hf

# one SWA + MoE main layer (its weights only have to exist) and the MTP layer; 12 positions > window 8
CFG = get_preset("tiny").replace(n_layers=1, compress_ratios=(0, 0), n_hash_layers=0)
B, S = 2, 12
TOL = 1e-5


def _official_weights(seed: int) -> dict[str, np.ndarray]:
    """Random fp32 values under every official name (norm weights near 1, the rest small)."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, var in abstract_leaves(CFG).items():
        shape = tuple(var.shape)
        if path.endswith("norm.weight") or path.endswith("scale"):
            v = 1.0 + 0.2 * rng.standard_normal(shape)
        else:
            v = 0.2 * rng.standard_normal(shape)
        names = tree_to_official(path, CFG.n_routed_experts)
        if path.endswith(("experts.w1", "experts.w2", "experts.w3")):
            out.update({n: v[e].astype(np.float32) for e, n in enumerate(names)})
        else:
            out[names[0]] = v.astype(np.float32)
    return out


# ---- the reference, in torch ------------------------------------------------------------------------------

def _rms(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w


def _hc_head(x: torch.Tensor, fn, base, scale, norm_eps: float, hc_eps: float) -> torch.Tensor:
    """Collapse [B, S, n, D] streams: sigmoid weights from the RMS-normalised flattened streams, plus eps."""
    flat = x.flatten(2)
    mixes = (flat @ fn.T) * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + norm_eps)
    weights = torch.sigmoid(mixes * scale[0] + base) + hc_eps
    return (weights[..., None] * x).sum(dim=2)


def _hf_block(off: dict[str, np.ndarray]):
    """transformers' decoder layer 0 (SWA + bias-routed MoE) with the MTP block's official weights."""
    from transformers import DeepseekV4Config, DeepseekV4Model

    hf = DeepseekV4Model(DeepseekV4Config(**CFG.to_hf_dict())).eval().to(torch.float32)
    load_official_into_hf(
        hf.layers[0], off,
        to_official=lambda name: "mtp.0." + hf_memory_to_official("model.layers.0." + name)[len("layers.0."):])
    return hf


def reference_mtp(off: dict[str, np.ndarray], streams: np.ndarray, next_ids: np.ndarray):
    """(logits [B, S, V], output streams [B, S, n, D]) of the reference MTP block at positions 0..S-1."""
    from transformers.masking_utils import create_sliding_window_causal_mask

    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in off.items()}
    eps = CFG.norm_eps
    hf = _hf_block(off)
    ids = torch.as_tensor(next_ids)
    h = torch.as_tensor(streams)
    with torch.no_grad():
        e = _rms(t["embed.weight"][ids], t["mtp.0.enorm.weight"], eps)
        x = (e @ t["mtp.0.e_proj.weight"].T)[:, :, None, :] + _rms(h, t["mtp.0.hnorm.weight"], eps) @ t[
            "mtp.0.h_proj.weight"].T
        pos = torch.arange(S)[None, :].expand(B, S)
        dummy = torch.zeros(B, S, CFG.dim)
        mask = create_sliding_window_causal_mask(config=hf.config, inputs_embeds=dummy, attention_mask=None,
                                                 past_key_values=None, position_ids=pos)
        rope = {"main": hf.rotary_emb(dummy, position_ids=pos, layer_type="main"),
                "compress": hf.rotary_emb(dummy, position_ids=pos, layer_type="compress")}
        out = hf.layers[0](x, position_embeddings=rope, position_ids=pos, attention_mask=mask, input_ids=ids,
                           past_key_values=None)
        y = _hc_head(out, t["mtp.0.hc_head_fn"], t["mtp.0.hc_head_base"], t["mtp.0.hc_head_scale"], eps,
                     CFG.hc_eps)
        logits = _rms(y, t["mtp.0.norm.weight"], eps) @ t["head.weight"].T
    return logits.numpy(), out.numpy()


# ---- hdflash_jax on the converted checkpoint ----------------------------------------------------------------

@pytest.fixture(scope="module")
def case(tmp_path_factory):
    off = _official_weights(seed=5)
    # the MTP norm differs clearly from the target's: a port that uses the wrong one cannot pass
    assert not np.allclose(off["mtp.0.norm.weight"], off["norm.weight"])
    src = tmp_path_factory.mktemp("mtp_official") / "ckpt"
    src.mkdir()
    write_safetensors(src / "model.safetensors", off)
    d = CFG.to_dict()
    d.update(dtype="fp8", scale_fmt="ue8m0", expert_dtype="fp4")  # what DeepSeek's inference/config.json says
    (src / "config.json").write_text(json.dumps(d))
    dst = tmp_path_factory.mktemp("mtp_flax") / "ckpt"
    t2f.convert(src, dst, dtype="fp32", progress=False, log=lambda *_: None)
    cfg, model = load_params(dst)
    assert cfg.n_mtp_layers == 1 and cfg.param_dtype == "float32"
    rng = np.random.default_rng(9)
    streams = rng.standard_normal((B, S, CFG.hc_mult, CFG.dim)).astype(np.float32)
    next_ids = rng.integers(0, CFG.vocab_size, (B, S))
    cache = init_cache(cfg, B, S, max_block=1)
    with jax.default_matmul_precision("highest"):
        logits, out, _ = nnx.jit(lambda m, s, n, c: m.mtp_step(s, n, c))(model, streams, next_ids, cache)
    ref_logits, ref_out = reference_mtp(off, streams, next_ids)
    return np.asarray(logits), np.asarray(out), ref_logits, ref_out


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_mtp_block_streams_match_reference(case):
    """Everything before the head: embedding + enorm/hnorm + e_proj/h_proj + the mHC block."""
    _, out, _, ref_out = case
    err = _rel(out, ref_out)
    print(f"\nMTP output streams vs reference: relative error {err:.2e}")
    assert err <= TOL, err


def test_mtp_logits_match_reference(case):
    logits, _, ref_logits, _ = case
    err = _rel(logits, ref_logits)
    print(f"\nMTP logits vs reference: relative error {err:.2e}")
    assert err <= TOL, err
