"""Helpers for parity tests against NVIDIA NeMo Automodel's DeepSeek-V4 (code this project did not write).

One set of random weights under DeepSeek's official names (`layers.L.attn.wq_a.weight`, `mtp.0.e_proj.weight`,
`ffn.experts.E.w1.weight`, ...) feeds both sides: hdflash_jax through its converter (`convert/torch_to_flax.py`,
safetensors + official config.json → orbax params → `load_params`), NeMo through its own loader
(`DeepSeekV4StateDictAdapter.from_hf`, the path NeMo reads the released checkpoint with), then a strict
`load_state_dict`. fp32 everywhere. NeMo runs on CPU with its pure-torch backends (`BackendConfig(attn="sdpa",
linear="torch", experts="torch", dispatcher="torch")`: eager attention with sinks, the torch Sinkhorn, a per-expert
loop); nothing is patched.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from hdflash_jax.checkpoint import abstract_leaves
from hdflash_jax.config import TargetConfig
from hdflash_jax.keymap import tree_to_official


def official_weights(cfg: TargetConfig, seed: int) -> dict[str, np.ndarray]:
    """Random fp32 tensors under every official name of `cfg` (MTP included). Values chosen so that no piece is
    at a symmetric point that would hide a wrong mapping: norm weights 1 ± 0.1, hc scales 1 ± 0.2, hc bases,
    sinks, compressor position biases and router biases random, distinct experts per hash-table row."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, var in abstract_leaves(cfg).items():
        shape = tuple(var.shape)
        last = path.split(".")[-1]
        if path.endswith("gate.tid2eid"):
            v = np.stack([rng.permutation(cfg.n_routed_experts)[: cfg.n_activated_experts]
                          for _ in range(shape[0])]).astype(np.int32)
        elif path.endswith("norm.weight"):
            v = 1.0 + 0.1 * rng.standard_normal(shape)
        elif last == "scale" or path.endswith("hc_head.scale"):
            v = 1.0 + 0.2 * rng.standard_normal(shape)
        elif last in ("base", "attn_sink", "ape") or path.endswith("gate.bias"):
            v = 0.5 * rng.standard_normal(shape)
        elif path == "embed":
            v = rng.standard_normal(shape)
        else:  # linear weights: ~ unit gain, so activations stay O(1) through the layers
            v = rng.standard_normal(shape) / np.sqrt(shape[-1])
        if v.dtype != np.int32:
            v = v.astype(np.float32)
        names = tree_to_official(path, cfg.n_routed_experts)
        if path.endswith(("experts.w1", "experts.w2", "experts.w3")):
            out.update({n: np.ascontiguousarray(v[e]) for e, n in enumerate(names)})
        else:
            out[names[0]] = v
    return out


def convert_official(off: dict[str, np.ndarray], cfg: TargetConfig, root: Path):
    """The official tensors through the project's converter: (TargetConfig, DeepseekV4) as `load_params` gives."""
    from convert import torch_to_flax as t2f
    from hdflash_jax.safetensors_io import write_safetensors
    from hdflash_jax.checkpoint import load_params

    src, dst = root / "official", root / "flax"
    src.mkdir(parents=True)
    write_safetensors(src / "model.safetensors", off)
    d = cfg.to_dict()
    d.update(dtype="fp8", scale_fmt="ue8m0", expert_dtype="fp4")  # as DeepSeek's inference/config.json says
    (src / "config.json").write_text(json.dumps(d))
    t2f.convert(src, dst, dtype="fp32", progress=False, log=lambda *_: None)
    return load_params(dst)


def nemo_config(cfg: TargetConfig, n_mtp: int | None = None):
    from nemo_automodel.components.models.deepseek_v4.config import DeepseekV4Config

    return DeepseekV4Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, moe_intermediate_size=cfg.moe_inter_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=1,
        head_dim=cfg.head_dim, qk_rope_head_dim=cfg.rope_head_dim, q_lora_rank=cfg.q_lora_rank,
        o_lora_rank=cfg.o_lora_rank, o_groups=cfg.o_groups, n_routed_experts=cfg.n_routed_experts,
        n_shared_experts=cfg.n_shared_experts, num_experts_per_tok=cfg.n_activated_experts,
        routed_scaling_factor=cfg.route_scale, scoring_func=cfg.score_func, swiglu_limit=cfg.swiglu_limit,
        max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta,
        rope_scaling={"type": "yarn", "factor": cfg.rope_factor, "original_max_position_embeddings":
                      cfg.original_seq_len, "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow},
        compress_rope_theta=cfg.compress_rope_theta, compress_ratios=list(cfg.compress_ratios),
        sliding_window=cfg.window_size, num_hash_layers=cfg.n_hash_layers, hc_eps=cfg.hc_eps,
        hc_mult=cfg.hc_mult, hc_sinkhorn_iters=cfg.hc_sinkhorn_iters, index_head_dim=cfg.index_head_dim,
        index_n_heads=cfg.index_n_heads, index_topk=cfg.index_topk,
        num_nextn_predict_layers=cfg.n_mtp_layers if n_mtp is None else n_mtp,
        rms_norm_eps=cfg.norm_eps, torch_dtype="float32")


def nemo_backend():
    from nemo_automodel.components.models.common import BackendConfig

    return BackendConfig(attn="sdpa", linear="torch", rms_norm="torch_fp32", experts="torch", dispatcher="torch",
                         rope_fusion=False, enable_hf_state_dict_adapter=True)


def eager_nemo() -> None:
    """NeMo wraps two small functions in `torch.compile`: the routed experts' clamped SwiGLU (`fullgraph`,
    `max_autotune`) and the fp32 RMSNorm. On CPU that is an inductor C++ build (2-20 s) for a few elementwise ops.
    Put back the functions they compile (the same code, run eagerly) before a model is built or run. The one
    patch these tests make to NeMo."""
    import nemo_automodel.components.models.common.utils as cu
    import nemo_automodel.components.moe.experts as ex

    for mod, name in ((ex, "swiglu_clamped_deepep"), (cu, "_float32_rms_norm_fwd")):
        f = getattr(mod, name)
        setattr(mod, name, getattr(f, "_torchdynamo_orig_callable", f))


def nemo_model(cfg: TargetConfig, off: dict[str, np.ndarray], n_mtp: int | None = None):
    """NeMo's DeepseekV4ForCausalLM (MTP included when cfg has it; `n_mtp` depths if given, each needing its own
    `mtp.<d>.*` tensors), weights loaded through NeMo's own adapter from the official names, strictly (every
    parameter and buffer set, no tensor left over)."""
    from nemo_automodel.components.models.deepseek_v4.model import DeepseekV4ForCausalLM

    eager_nemo()
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(nemo_config(cfg, n_mtp), backend=nemo_backend()).to(torch.float32).eval()
    hf = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in off.items()}
    sd = model.state_dict_adapter.from_hf(hf)
    own = model.state_dict()
    for k, v in sd.items():  # tid2eid: the official int32 table into NeMo's int64 buffer
        if k in own and v.dtype != own[k].dtype:
            sd[k] = v.to(own[k].dtype)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # NeMo keeps RoPE tables as non-persistent buffers; everything else must come from the checkpoint
    if missing or unexpected:
        raise AssertionError(f"NeMo load not strict: missing {missing}, unexpected {unexpected}")
    return model
