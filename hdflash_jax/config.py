"""Model configurations: the DeepSeek-V4 target and the block drafters.

`TargetConfig` carries every field of DeepSeek's `inference/config.json` (official names) and loads both that
file and a transformers `config.json` (`model_type: deepseek_v4`). Presets: `tiny` (every feature, seconds on
CPU), `small` (the built-in small model), `v4-flash`, `v4-pro` (the released sizes).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from hdflash_jax.config_hf import hf_to_target_kwargs, typed

SCORE_FUNCS = ("sqrtsoftplus", "softmax", "sigmoid")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("chunked", "dense")
MOE_DISPATCHES = ("auto", "dense", "ragged", "expert_parallel")

@dataclasses.dataclass(frozen=True)
class TargetConfig:
    vocab_size: int = 129280
    dim: int = 4096
    n_layers: int = 43
    n_heads: int = 64
    head_dim: int = 512
    rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    window_size: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    n_routed_experts: int = 256
    n_activated_experts: int = 6
    n_shared_experts: int = 1
    moe_inter_dim: int = 2048
    n_hash_layers: int = 3
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.5
    swiglu_limit: float = 10.0
    norm_eps: float = 1e-6
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0  # YaRN on compressed layers
    original_seq_len: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    n_mtp_layers: int = 1
    # n_layers + n_mtp_layers entries; the MTP layers' entries come last (always 0: sliding window only).
    compress_ratios: tuple[int, ...] = (0, 0) + (4, 128) * 20 + (4, 0)
    max_seq_len: int = 1048576
    bos_token_id: int = 0
    eos_token_id: int = 1
    dtype: str = "bfloat16"  # activations and matmul weights; mHC, gates and norms compute in fp32
    param_dtype: str = "bfloat16"
    # -- how to compute (not part of the checkpoint's math: every choice gives the same function) ----------------
    attention_impl: str = "chunked"  # "chunked": query chunks, online softmax; "dense": one score matrix (reference)
    attention_chunk: int = 256  # queries per chunk (and compressed entries per HCA block)
    moe_dispatch: str = "auto"  # "dense" | "ragged" | "expert_parallel"; "auto": dense up to 16 experts, else EP
    moe_capacity: float = 0.0  # expert_parallel: slots per expert = ceil(capacity·tokens·k/E); 0 = never drop
    scan_layers: bool = True  # repeating units of compress_ratios run under one scan (False: unrolled reference)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            typed(f.name, getattr(self, f.name), f.type)
        object.__setattr__(self, "compress_ratios", tuple(self.compress_ratios))
        self.validate()

    # ---- derived -------------------------------------------------------------------------------------------
    @property
    def layer_ratios(self) -> tuple[int, ...]:
        return self.compress_ratios[: self.n_layers]

    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.n_hash_layers

    def replace(self, **changes) -> "TargetConfig":
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        def bad(field, why):
            raise ValueError(f"TargetConfig.{field}: {why}")

        for f in ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "q_lora_rank", "o_groups", "o_lora_rank",
                  "window_size", "n_routed_experts", "n_activated_experts", "moe_inter_dim", "hc_sinkhorn_iters",
                  "max_seq_len"):
            if int(getattr(self, f)) < 1:
                bad(f, f"must be >= 1, got {getattr(self, f)}")
        if self.hc_mult < 1:
            bad("hc_mult", f"must be >= 1, got {self.hc_mult}")
        if self.n_mtp_layers < 0 or self.n_hash_layers < 0 or self.n_shared_experts < 0:
            bad("n_mtp_layers/n_hash_layers/n_shared_experts", "must be >= 0")
        if self.n_hash_layers > self.n_layers:
            bad("n_hash_layers", f"{self.n_hash_layers} exceeds n_layers={self.n_layers}")
        if len(self.compress_ratios) != self.n_layers + self.n_mtp_layers:
            bad("compress_ratios", f"needs n_layers + n_mtp_layers = {self.n_layers + self.n_mtp_layers} entries "
                                   f"(the MTP layers' last), got {len(self.compress_ratios)}")
        if any(r < 0 for r in self.compress_ratios):
            bad("compress_ratios", f"entries must be >= 0, got {self.compress_ratios}")
        if any(r != 0 for r in self.compress_ratios[self.n_layers:]):
            bad("compress_ratios", "the MTP layers' entries must be 0 (sliding window only)")
        if not 0 < self.rope_head_dim <= self.head_dim or self.rope_head_dim % 2:
            bad("rope_head_dim", f"must be even and in (0, head_dim={self.head_dim}], got {self.rope_head_dim}")
        if (self.n_heads * self.head_dim) % self.o_groups:
            bad("o_groups", f"must divide n_heads*head_dim = {self.n_heads * self.head_dim}")
        if self.score_func not in SCORE_FUNCS:
            bad("score_func", f"unknown {self.score_func!r}; one of {SCORE_FUNCS}")
        if not 1 <= self.n_activated_experts <= self.n_routed_experts:
            bad("n_activated_experts", f"must be in [1, n_routed_experts={self.n_routed_experts}]")
        if any(r == 4 for r in self.layer_ratios):
            if self.index_n_heads < 1 or self.index_head_dim < 1 or self.index_topk < 1:
                bad("index_n_heads/index_head_dim/index_topk", "CSA layers (ratio 4) need a positive indexer")
            if not 0 < self.rope_head_dim <= self.index_head_dim:
                bad("index_head_dim", f"must be >= rope_head_dim={self.rope_head_dim}")
        if self.dtype not in DTYPES or self.param_dtype not in DTYPES:
            bad("dtype", f"dtype/param_dtype must be one of {DTYPES}")
        if self.hc_eps < 0 or self.norm_eps <= 0:
            bad("hc_eps/norm_eps", "must be non-negative / positive")
        if self.attention_impl not in ATTENTION_IMPLS:
            bad("attention_impl", f"unknown {self.attention_impl!r}; one of {ATTENTION_IMPLS}")
        if self.attention_chunk < 1:
            bad("attention_chunk", f"must be >= 1, got {self.attention_chunk}")
        if self.moe_dispatch not in MOE_DISPATCHES:
            bad("moe_dispatch", f"unknown {self.moe_dispatch!r}; one of {MOE_DISPATCHES}")
        if self.moe_capacity < 0:
            bad("moe_capacity", f"must be >= 0 (0 = no drops), got {self.moe_capacity}")

    # ---- file formats --------------------------------------------------------------------------------------
    @classmethod
    def from_official_dict(cls, d: dict[str, Any], **overrides) -> "TargetConfig":
        """DeepSeek's `inference/config.json` (official field names; other keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "max_position_embeddings" in d and "max_seq_len" not in d:
            kw["max_seq_len"] = d["max_position_embeddings"]
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides) -> "TargetConfig":
        """A transformers `config.json` with `model_type: deepseek_v4` (hdflash_jax.config_hf). Values of the
        wrong type are refused naming the transformers key."""
        kw = hf_to_target_kwargs(d)
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_json_file(cls, path: str | Path, **overrides) -> "TargetConfig":
        """Either format, detected: transformers files carry `model_type`/`hidden_size`, DeepSeek's `dim`."""
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: config file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object of config fields, got a {type(d).__name__}")
        try:
            if "model_type" in d or "hidden_size" in d:
                return cls.from_hf_dict(d, **overrides)
            return cls.from_official_dict(d, **overrides)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["compress_ratios"] = list(self.compress_ratios)
        return d

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers `DeepseekV4Config` kwargs of this config (parity tests, exports)."""
        hca = sorted({r for r in self.layer_ratios if r not in (0, 4)})
        if len(hca) > 1:
            raise ValueError(f"compress_ratios: transformers supports one HCA ratio, got {hca}")
        kind = {0: "sliding_attention", 4: "compressed_sparse_attention"}
        kind.update({r: "heavily_compressed_attention" for r in hca})
        return dict(
            vocab_size=self.vocab_size, hidden_size=self.dim, num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads, num_key_value_heads=1, head_dim=self.head_dim,
            qk_rope_head_dim=self.rope_head_dim, q_lora_rank=self.q_lora_rank, o_groups=self.o_groups,
            o_lora_rank=self.o_lora_rank, sliding_window=self.window_size, index_n_heads=self.index_n_heads,
            index_head_dim=self.index_head_dim, index_topk=self.index_topk, n_routed_experts=self.n_routed_experts,
            num_experts_per_tok=self.n_activated_experts, n_shared_experts=self.n_shared_experts,
            moe_intermediate_size=self.moe_inter_dim,
            mlp_layer_types=["hash_moe"] * self.n_hash_layers + ["moe"] * (self.n_layers - self.n_hash_layers),
            scoring_func=self.score_func, routed_scaling_factor=self.route_scale, swiglu_limit=self.swiglu_limit,
            rms_norm_eps=self.norm_eps, hc_mult=self.hc_mult, hc_sinkhorn_iters=self.hc_sinkhorn_iters,
            hc_eps=self.hc_eps, rope_theta=self.rope_theta, compress_rope_theta=self.compress_rope_theta,
            rope_parameters=dict(rope_type="yarn", factor=self.rope_factor,
                                 original_max_position_embeddings=self.original_seq_len,
                                 beta_fast=self.beta_fast, beta_slow=self.beta_slow),
            layer_types=[kind[r] for r in self.layer_ratios],
            compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": hca[0] if hca else 128},
            num_nextn_predict_layers=self.n_mtp_layers, max_position_embeddings=self.max_seq_len,
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id, tie_word_embeddings=False,
        )


def rope_inv_freq(dim: int, theta: float, dtype=None):
    """Plain RoPE inverse frequencies θ^(-2i/dim) for the dim/2 interleaved pairs, computed in float64 and rounded
    once to `dtype` (float32 by default). The one definition: the target's `yarn_inv_freq` and the drafter's
    full-width RoPE both build on it."""
    import numpy as np

    inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    return inv.astype(np.float32 if dtype is None else dtype)


def yarn_inv_freq(cfg: TargetConfig, compressed: bool):
    """Per-pair RoPE frequencies θ_i (i < rope_head_dim/2). SWA and MTP layers: base rope_theta, no YaRN;
    CSA/HCA layers: base compress_rope_theta, YaRN-blended (no mscale: the softmax scale stays head_dim^-1/2)."""
    import numpy as np

    dim = cfg.rope_head_dim
    base = cfg.compress_rope_theta if compressed else cfg.rope_theta
    inv = rope_inv_freq(dim, base, np.float64)
    if not compressed or cfg.rope_factor <= 1.0:
        return inv.astype(np.float32)

    def correction_dim(beta):
        return dim * math.log(cfg.original_seq_len / (beta * 2 * math.pi)) / (2 * math.log(base))

    lo = max(math.floor(correction_dim(cfg.beta_fast)), 0)
    hi = min(math.ceil(correction_dim(cfg.beta_slow)), dim - 1)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - lo) / max(hi - lo, 1e-3), 0.0, 1.0)
    keep = 1.0 - ramp  # s_i: 1 keeps the original frequency (extrapolation), 0 interpolates by the factor
    return (inv / cfg.rope_factor * (1.0 - keep) + inv * keep).astype(np.float32)


PRESETS: dict[str, TargetConfig] = {
    # every feature (SWA, CSA with indexer top-k that really selects, HCA, hash + routed MoE, MTP).
    "tiny": TargetConfig(
        vocab_size=512, dim=64, n_layers=6, n_heads=4, head_dim=64, rope_head_dim=16, q_lora_rank=32,
        o_groups=2, o_lora_rank=16, window_size=8, index_n_heads=8, index_head_dim=32, index_topk=4,
        n_routed_experts=8, n_activated_experts=2, n_shared_experts=1, moe_inter_dim=32, n_hash_layers=2,
        route_scale=1.5, original_seq_len=64, compress_ratios=(0, 4, 8, 4, 8, 4, 0), max_seq_len=4096,
        dtype="float32", param_dtype="float32",
    ),
    # the built-in small model (models/small): every feature at a size that pretrains on 2 CPU cores: SWA / CSA
    # whose indexer top-16 really selects among 64 entries at 256 tokens / HCA (ratio 16), mHC with 4 streams,
    # a hash-routed MoE layer then score-routed ones, one MTP block. vocab_size and bos/eos come from its tokenizer.
    "small": TargetConfig(
        vocab_size=4096, dim=128, n_layers=5, n_heads=4, head_dim=64, rope_head_dim=16, q_lora_rank=64, o_groups=2,
        o_lora_rank=64, window_size=64, index_n_heads=4, index_head_dim=32, index_topk=16, n_routed_experts=8,
        n_activated_experts=2, n_shared_experts=1, moe_inter_dim=128, n_hash_layers=1, route_scale=1.5,
        hc_mult=4, hc_sinkhorn_iters=20, original_seq_len=256, compress_ratios=(0, 4, 16, 4, 0, 0), n_mtp_layers=1,
        max_seq_len=4096, bos_token_id=0, eos_token_id=1, dtype="float32", param_dtype="float32",
    ),
    "v4-flash": TargetConfig(),
    "v4-pro": TargetConfig(
        dim=7168, n_layers=61, n_heads=128, q_lora_rank=1536, o_groups=16, index_topk=1024,
        n_routed_experts=384, moe_inter_dim=3072, route_scale=2.5,
        compress_ratios=(128, 128) + (4, 128) * 29 + (4, 0),
    ),
}


def get_preset(name: str, **overrides) -> TargetConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


# ==== block drafters (vanilla DFlash, HyperDFlash) ==========================================================

CONDITIONINGS = ("final_streams", "layers")
REDUCERS = ("gated", "linear")
DRAFT_CACHES = ("cond", "kv", "cond_fp8")


def build_target_layer_ids(n_target_layers: int, k: int) -> tuple[int, ...]:
    """DFlash's default target layers: id_i = round(1 + i·(L−4)/(K−1)), K = 1 → L // 2 (z-lab `dflash/model.py`).

    Python's `round` (half to even) as in the reference, so V4-Flash (L = 43, K = 5) gives (1, 11, 20, 30, 40).
    Ids are 0-based decoder layers whose OUTPUT is taken: id i = HF `output_hidden_states[i + 1]`
    (= `forward_full(..., return_layers=(i,))`), never the embedding.
    """
    if k < 1:
        raise ValueError(f"build_target_layer_ids: need k >= 1 target layers, got {k}")
    if k == 1:
        return (n_target_layers // 2,)
    start, end = 1, n_target_layers - 3
    return tuple(int(round(start + i * (end - start) / (k - 1))) for i in range(k))


@dataclasses.dataclass(frozen=True)
class DrafterConfig:
    """A block drafter: a few pre-norm decoder layers at the target's width, KV injection of a
    conditioning vector c per committed context position, the target's embedding and LM head frozen.

    `conditioning` × `reducer`:
      * 'final_streams' + 'gated'  — HyperDFlash: c = [post RMSNorm](hc_head'(H_final)), gate inherited from the
        target's hc_head (65,541 params at V4-Flash dims);
      * 'layers' + 'linear'        — vanilla DFlash: c = RMSNorm(W_c [vec H^(l1); …; vec H^(lK)]);
      * 'final_streams' + 'linear' — ablation: the dense compressor on the final pre-collapse streams (67.1M);
      * 'layers' + 'gated'         — ablation: one inherited gate per tapped layer, the K reductions averaged,
        then the post RMSNorm.
    The target-derived fields (dim, hc_mult, vocab_size, target_n_layers, hc_eps, hc_norm_eps) are normally filled
    by `DrafterConfig.for_target(target_cfg, ...)`; the bare defaults are the V4-Flash HyperDFlash drafter.
    """

    # -- the draft layers ---------------------------------------------------------------------------------
    n_layers: int = 5  # DFlash's default (its depth ablation: 5 is fastest); HyperDFlash does not report depth
    n_heads: int = 32
    # eight KV heads of 128, as DFlash's Qwen3 drafters keep their target's 8 (HyperDFlash does not report its
    # drafter's attention). Cutting them 4x costs tau on the small model: 4 -> 1 KV heads -0.40 [-0.61, -0.22] over
    # 3 seeds (docs/results.md#kv-heads); 8 also divide tensor=8, so the `kv` cache shards over heads
    n_kv_heads: int = 8
    head_dim: int = 128
    inter_dim: int = 12288
    rope_theta: float = 10000.0  # the target's θ (DFlash uses the target's); full-width RoPE over head_dim
    norm_eps: float = 1e-6
    # -- blocks -------------------------------------------------------------------------------------------
    block_size: int = 8  # B = anchor + (B−1) masks. Train at 8; `draft(..., block_size=7)` gives the paper's 6
    mask_token_id: int = 129279  # an otherwise unused embedding row (last row of the padded V4 vocab) [U]
    # -- conditioning -------------------------------------------------------------------------------------
    conditioning: str = "final_streams"
    target_layer_ids: tuple[int, ...] | None = None  # 'layers' only; None → build_target_layer_ids(L, n_layers)
    reducer: str = "gated"
    post_norm: bool = True  # RMSNorm after the gated reducer, initialised from the target's final norm
    # gate variants (final_streams + gated; the comparison's ablations): a learnt RMSNorm per stream before the
    # gate (weights [n, D], ones), and a low-rank residual c += U V vec(H) (U zero-initialised: c starts as hc_head)
    gate_path_norm: bool = False
    gate_residual_rank: int = 0
    # -- inference draft cache ----------------------------------------------------------------------------
    # what the cache keeps per context position: 'cond' (c [D] once, K/V recomputed per step; exact), 'kv' (every
    # layer's K/V; exact, no recompute; at V4-Flash width 5,120 B against cond's 8,192 and the target's 6,880, so
    # the V4-Flash presets use it), 'cond_fp8' (c in fp8 + a per-position scale; lossy, half of 'cond')
    draft_cache: str = "cond"
    draft_chunk: int = 256  # context positions per step of the draft step's online-softmax loop
    # -- from the target (for_target fills these) --------------------------------------------------------
    dim: int = 4096
    hc_mult: int = 4
    vocab_size: int = 129280
    target_n_layers: int = 43
    hc_eps: float = 1e-6
    hc_norm_eps: float = 1e-6  # the weightless RMS inside hc_head (the target's norm_eps)
    dtype: str = "bfloat16"  # activations / matmul weights; the reducer and all norms compute in fp32
    param_dtype: str = "bfloat16"

    def __post_init__(self):
        if self.target_layer_ids is not None:
            object.__setattr__(self, "target_layer_ids", tuple(int(i) for i in self.target_layer_ids))
        self.validate()

    # ---- derived -------------------------------------------------------------------------------------------
    @property
    def layer_ids(self) -> tuple[int, ...]:
        """The 0-based target layers whose outputs condition the drafter ('layers'); () for 'final_streams'."""
        if self.conditioning != "layers":
            return ()
        if self.target_layer_ids is not None:
            return self.target_layer_ids
        return build_target_layer_ids(self.target_n_layers, self.n_layers)

    @property
    def n_feature_layers(self) -> int:
        """K: how many [n, D] stream sets one context position carries."""
        return len(self.layer_ids) if self.conditioning == "layers" else 1

    @property
    def n_drafts(self) -> int:
        return self.block_size - 1

    def replace(self, **changes) -> "DrafterConfig":
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        def bad(field, why):
            raise ValueError(f"DrafterConfig.{field}: {why}")

        for f in ("n_layers", "n_heads", "n_kv_heads", "head_dim", "inter_dim", "dim", "hc_mult", "vocab_size",
                  "target_n_layers"):
            if int(getattr(self, f)) < 1:
                bad(f, f"must be >= 1, got {getattr(self, f)}")
        if self.n_heads % self.n_kv_heads:
            bad("n_kv_heads", f"must divide n_heads={self.n_heads} (GQA), got {self.n_kv_heads}")
        if self.head_dim % 2:
            bad("head_dim", f"must be even (RoPE pairs), got {self.head_dim}")
        if self.block_size < 2:
            bad("block_size", f"needs the anchor plus at least one mask (>= 2), got {self.block_size}")
        if not 0 <= self.mask_token_id < self.vocab_size:
            bad("mask_token_id", f"must be a row of the target embedding, in [0, {self.vocab_size}), "
                                 f"got {self.mask_token_id}")
        if self.conditioning not in CONDITIONINGS:
            bad("conditioning", f"unknown {self.conditioning!r}; one of {CONDITIONINGS}")
        if self.reducer not in REDUCERS:
            bad("reducer", f"unknown {self.reducer!r}; one of {REDUCERS}")
        if self.conditioning == "final_streams" and self.target_layer_ids is not None:
            bad("target_layer_ids", "only used with conditioning='layers' (final_streams conditions on the last "
                                    "layer's pre-collapse streams)")
        if self.conditioning == "layers":
            ids = self.layer_ids
            if not ids:
                bad("target_layer_ids", "needs at least one layer")
            if any(not 0 <= i < self.target_n_layers for i in ids):
                bad("target_layer_ids", f"0-based decoder-layer outputs must lie in [0, {self.target_n_layers}), "
                                        f"got {ids}")
            if len(set(ids)) != len(ids):
                bad("target_layer_ids", f"repeated layer in {ids}")
        if self.draft_cache not in DRAFT_CACHES:
            bad("draft_cache", f"unknown {self.draft_cache!r}; one of {DRAFT_CACHES}")
        if self.draft_chunk < 1:
            bad("draft_chunk", f"must be >= 1, got {self.draft_chunk}")
        if self.gate_residual_rank < 0:
            bad("gate_residual_rank", f"must be >= 0, got {self.gate_residual_rank}")
        if (self.gate_path_norm or self.gate_residual_rank) and (self.reducer, self.conditioning) != (
                "gated", "final_streams"):
            bad("gate_path_norm" if self.gate_path_norm else "gate_residual_rank",
                "applies to the gated reducer on final_streams only")
        if self.post_norm and self.reducer != "gated":
            bad("post_norm", "applies to the gated reducer only (the linear compressor always ends in its RMSNorm)")
        if self.rope_theta <= 0 or self.norm_eps <= 0 or self.hc_norm_eps <= 0 or self.hc_eps < 0:
            bad("rope_theta/norm_eps/hc_norm_eps/hc_eps", "must be positive (hc_eps non-negative)")
        if self.dtype not in DTYPES or self.param_dtype not in DTYPES:
            bad("dtype", f"dtype/param_dtype must be one of {DTYPES}")

    def check_target(self, target: TargetConfig, where: str = "drafter") -> None:
        """The one compatibility rule: raise ValueError when this drafter cannot run on `target` (it shares the
        target's embedding, LM head and streams, and taps its layers)."""
        for field, mine, theirs in (("dim", self.dim, target.dim), ("hc_mult", self.hc_mult, target.hc_mult),
                                    ("vocab_size", self.vocab_size, target.vocab_size),
                                    ("target_n_layers", self.target_n_layers, target.n_layers)):
            if mine != theirs:
                raise ValueError(f"{where} was built for another target: {field}={mine}, the target has {theirs} "
                                 f"(DrafterConfig.for_target derives a matching drafter)")
        if self.conditioning == "layers" and max(self.layer_ids) >= target.n_layers:
            raise ValueError(f"{where}: target_layer_ids {self.layer_ids} out of range for a "
                             f"{target.n_layers}-layer target")

    @classmethod
    def for_target(cls, target: TargetConfig, **kw) -> "DrafterConfig":
        """A drafter for `target`: width, streams, vocab, depth, eps, θ and dtypes from it; `kw` overrides."""
        base = dict(dim=target.dim, hc_mult=target.hc_mult, vocab_size=target.vocab_size,
                    target_n_layers=target.n_layers, hc_eps=target.hc_eps, hc_norm_eps=target.norm_eps,
                    norm_eps=target.norm_eps, rope_theta=target.rope_theta, dtype=target.dtype,
                    param_dtype=target.param_dtype, mask_token_id=target.vocab_size - 1)
        if kw.get("reducer", "gated") != "gated":
            base["post_norm"] = False
        base.update(kw)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["target_layer_ids"] is not None:
            d["target_layer_ids"] = list(d["target_layer_ids"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides) -> "DrafterConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"DrafterConfig: unknown fields {unknown}")
        return cls(**{**d, **overrides})


def _tiny_drafter(**kw) -> DrafterConfig:
    return DrafterConfig.for_target(PRESETS["tiny"], n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                                    inter_dim=128, block_size=4, **kw)


# HyperDFlash = final streams + inherited gate; DFlash = K tapped layers + dense compressor (K = n_layers).
DRAFTER_PRESETS: dict[str, Any] = {
    "tiny-hyperdflash": lambda: _tiny_drafter(),
    "tiny-dflash": lambda: _tiny_drafter(conditioning="layers", reducer="linear"),
    "v4-flash-hyperdflash": lambda: DrafterConfig.for_target(PRESETS["v4-flash"], draft_cache="kv"),
    "v4-flash-dflash": lambda: DrafterConfig.for_target(PRESETS["v4-flash"], conditioning="layers",
                                                        reducer="linear", draft_cache="kv"),
}


def get_drafter_preset(name: str, **overrides) -> DrafterConfig:
    if name not in DRAFTER_PRESETS:
        raise ValueError(f"unknown drafter preset {name!r}; one of {sorted(DRAFTER_PRESETS)}")
    cfg = DRAFTER_PRESETS[name]()
    return cfg.replace(**overrides) if overrides else cfg
