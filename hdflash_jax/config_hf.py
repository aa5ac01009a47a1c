"""TargetConfig's transformers `config.json` reader.

`hf_to_target_kwargs` maps a transformers `DeepseekV4Config` dict (`model_type: deepseek_v4`) to `TargetConfig`
field values; a value of the wrong type is refused naming the transformers key (`typed`).
"""

from __future__ import annotations

from typing import Any

_KINDS = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict,
          "tuple[int, ...]": tuple[int, ...]}


def typed(name: str, v, kind: str):
    """`v` if it has the config kind ('int', 'float', 'str', 'bool', 'list', 'dict', 'tuple[int, ...]', any of
    them '| None'), else a ValueError naming the field: a JSON config value of the wrong type is refused, never
    coerced or crashed on later. The check is the one engine's (`hdflash_jax.typed_config.coerce`)."""
    from hdflash_jax.typed_config import coerce

    optional = kind.endswith(" | None")
    tp = _KINDS[kind.removesuffix(" | None")]
    coerce(v, tp | None if optional else tp, f"field {name!r}")
    return v


def hf_to_target_kwargs(d: dict[str, Any]) -> dict[str, Any]:
    """`TargetConfig` keyword arguments from a transformers config dict (defaults: V4-Flash's)."""
    def g(key, default, kind="int", src=d):
        return typed(key, src.get(key, default), kind)

    if d.get("model_type") not in (None, "deepseek_v4"):
        raise ValueError(f"field 'model_type': expected 'deepseek_v4', got {d.get('model_type')!r}")
    n_layers = g("num_hidden_layers", 43)
    rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
    rates.update(typed("compress_rates", d.get("compress_rates") or {}, "dict"))
    for k, v in rates.items():
        typed(f"compress_rates.{k}", v, "int")
    if d.get("layer_types") is not None:
        kind_to_ratio = {"sliding_attention": 0, **rates}
        bad = [t for t in g("layer_types", None, "list") if not isinstance(t, str) or t not in kind_to_ratio]
        if bad:
            raise ValueError(f"field 'layer_types': unknown layer type {bad[0]!r}")
        ratios = [kind_to_ratio[t] for t in d["layer_types"]]
    elif d.get("compress_ratios") is not None:
        legacy = {0: 0, 4: rates["compressed_sparse_attention"], 128: rates["heavily_compressed_attention"]}
        bad = [r for r in g("compress_ratios", None, "tuple[int, ...]") if r not in legacy]
        if bad:
            raise ValueError(f"field 'compress_ratios': unknown ratio {bad[0]!r} (0, 4 or 128)")
        ratios = [legacy[r] for r in d["compress_ratios"][:n_layers]]
    else:  # transformers' default schedule: 2 HCA, then CSA/HCA interleaved
        hca, csa = rates["heavily_compressed_attention"], rates["compressed_sparse_attention"]
        ratios = [hca] * min(n_layers, 2) + [csa if i % 2 else hca for i in range(max(n_layers - 2, 0))]
    n_mtp = g("num_nextn_predict_layers", 1)
    if d.get("mlp_layer_types") is not None:
        n_hash = sum(t == "hash_moe" for t in g("mlp_layer_types", None, "list"))
    else:
        n_hash = g("num_hash_layers", 3)
    rp = typed("rope_parameters", d.get("rope_parameters") or d.get("rope_scaling") or {}, "dict")
    main = typed("rope_parameters.main", rp.get("main") or {}, "dict")
    yarn = rp["compress"] if isinstance(rp.get("compress"), dict) else rp
    head_dim = g("head_dim", 512)
    if "qk_rope_head_dim" in d:
        rope_head_dim = g("qk_rope_head_dim", None)
    else:
        prf = d.get("partial_rotary_factor") or main.get("partial_rotary_factor") or 64 / 512
        rope_head_dim = int(head_dim * typed("partial_rotary_factor", prf, "float"))
    eos = d.get("eos_token_id", 1)
    eos = typed("eos_token_id", eos[0] if isinstance(eos, list) and eos else (1 if eos is None else eos), "int")
    is_yarn = yarn.get("rope_type", yarn.get("type")) == "yarn"
    kw = dict(
        vocab_size=g("vocab_size", 129280), dim=g("hidden_size", 4096), n_layers=n_layers,
        n_heads=g("num_attention_heads", 64), head_dim=head_dim, rope_head_dim=rope_head_dim,
        q_lora_rank=g("q_lora_rank", 1024), o_groups=g("o_groups", 8),
        o_lora_rank=g("o_lora_rank", 1024), window_size=g("sliding_window", 128),
        index_n_heads=g("index_n_heads", 64), index_head_dim=g("index_head_dim", 128),
        index_topk=g("index_topk", 512), n_routed_experts=g("n_routed_experts", 256),
        n_activated_experts=g("num_experts_per_tok", 6), n_shared_experts=g("n_shared_experts", 1),
        moe_inter_dim=g("moe_intermediate_size", 2048), n_hash_layers=n_hash,
        score_func=g("scoring_func", "sqrtsoftplus", "str"), route_scale=g("routed_scaling_factor", 1.5, "float"),
        swiglu_limit=g("swiglu_limit", 10.0, "float"), norm_eps=g("rms_norm_eps", 1e-6, "float"),
        hc_mult=g("hc_mult", 4), hc_sinkhorn_iters=g("hc_sinkhorn_iters", 20),
        hc_eps=g("hc_eps", 1e-6, "float"),
        rope_theta=g("rope_theta", main.get("rope_theta", 1e4), "float"),
        compress_rope_theta=g("compress_rope_theta", 160000.0, "float"),
        rope_factor=g("factor", 16.0, "float", yarn) if is_yarn else 1.0,
        original_seq_len=g("original_max_position_embeddings", 65536, src=yarn),
        beta_fast=g("beta_fast", 32.0, "float", yarn), beta_slow=g("beta_slow", 1.0, "float", yarn),
        n_mtp_layers=n_mtp, compress_ratios=tuple(ratios) + (0,) * n_mtp,
        max_seq_len=g("max_position_embeddings", 1048576), bos_token_id=g("bos_token_id", None) or 0,
        eos_token_id=eos,
    )
    return kw
