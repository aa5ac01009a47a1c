"""The import half of the z-lab format (`formats.zlab`): a z-lab DFlash folder → a `DrafterConfig` and this
project's parameter tree (`read_zlab`), which the block family saves as a drafter checkpoint.

Every check names the file and key and runs before anything is written: the architecture (DFlash2's convolutions
and candidate selector are not part of this project), the Qwen3 fields this drafter can represent (plain RoPE, no
biases, no sliding window, non-causal, neutral embedding / logit scales), `dflash_config` (block size present —
the reference would silently use 16 —, mask id inside the vocabulary, layer ids distinct and inside the target),
then the exact set of tensor names, their shapes and one dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hdflash_jax.checkpoint import count_nonfinite
from hdflash_jax.config import DTYPES, DrafterConfig, build_target_layer_ids
from hdflash_jax.formats.zlab import (CONFIG_FILE, EXT, FORMAT_VERSION, WEIGHTS_FILE, ExportError, _move, flat_params,
                                     name_map)
from hdflash_jax.safetensors_io import load_all

_NEUTRAL = (("input_embedding_scale", 1.0), ("output_multiplier", 1.0))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (a z-lab DFlash folder holds {CONFIG_FILE} and "
                                f"{WEIGHTS_FILE})")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ExportError(f"{path}: expected a JSON object")
    return d


def _int(path: Path, key: str, value, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ExportError(f"{path}: {key} must be an integer >= {low}, got {value!r}")
    return value


def _check_reference_fields(path: Path, c: dict) -> None:
    """Fields of the reference model this project's drafter has no counterpart for must be neutral."""
    arch = c.get("architectures") or ["DFlashDraftModel"]
    if "DFlash2DraftModel" in arch:
        raise ExportError(f"{path}: architectures={arch}: DFlash2 (dynamic convolutions, candidate selector) has no "
                          "counterpart here; only DFlashDraftModel imports")
    if arch != ["DFlashDraftModel"]:
        raise ExportError(f"{path}: architectures={arch}: expected ['DFlashDraftModel']")
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ExportError(f"{path}: rope_parameters.rope_type={rope.get('rope_type', rope.get('type'))!r}: only "
                          "plain RoPE (rope_type 'default') is representable")
    if float(rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ExportError(f"{path}: partial_rotary_factor: this drafter rotates the full head_dim")
    if c.get("attention_bias", False) or c.get("mlp_bias", False):
        raise ExportError(f"{path}: attention_bias/mlp_bias: this drafter's projections have no bias")
    if c.get("use_sliding_window", False) or any(t != "full_attention" for t in c.get("layer_types") or []):
        raise ExportError(f"{path}: layer_types/use_sliding_window: sliding-window draft layers are not supported")
    if c.get("hidden_act", "silu") != "silu":
        raise ExportError(f"{path}: hidden_act={c.get('hidden_act')!r}: the MLP is SwiGLU (silu)")
    dc = c.get("dflash_config") or {}
    if dc.get("is_causal", c.get("is_causal")):
        raise ExportError(f"{path}: is_causal: the block is drafted non-causally here")
    for key, neutral in _NEUTRAL:
        v = dc.get(key, c.get(key, neutral))
        if float(v) != neutral:
            raise ExportError(f"{path}: {key}={v}: only {neutral} is representable")
    cap = dc.get("final_logit_softcapping", c.get("final_logit_softcapping"))
    if cap is not None and float(cap) > 0:
        raise ExportError(f"{path}: final_logit_softcapping={cap}: not representable")


def _dflash_value(c: dict, name: str):
    """The reference's precedence: `dflash_config[name]`, then the top-level field."""
    dc = c.get("dflash_config") or {}
    return dc[name] if name in dc else c.get(name)


def _weights_dtype(wpath: Path, tensors: dict[str, np.ndarray]) -> str:
    """The draft layers' dtype (that of layer 0's q_proj): the drafter's param_dtype."""
    key = "layers.0.self_attn.q_proj.weight"
    if key not in tensors:
        raise ExportError(f"{wpath}: tensor {key!r} missing")
    kind = str(tensors[key].dtype)
    if kind not in DTYPES:
        raise ExportError(f"{wpath}: tensor {key!r} is {kind}; expected one of {DTYPES}")
    return kind


def _as_dtype(wpath: Path, key: str, a: np.ndarray, want: np.dtype) -> np.ndarray:
    """Same dtype, or an exact widening to float32 (reference files keep norms in the layers' dtype; this
    project's reducer and its norms are float32); anything else is refused."""
    if a.dtype == want:
        return a
    if want == np.float32 and str(a.dtype) in ("bfloat16", "float16"):
        return a.astype(np.float32)
    raise ExportError(f"{wpath}: tensor {key!r} is {a.dtype}, expected {want}")


def drafter_config_from_zlab(path: Path, c: dict, tensors: dict[str, np.ndarray], wpath: Path) -> DrafterConfig:
    """The `DrafterConfig` a reference config.json describes (hc_mult from `fc` when the file has no hdflash block)."""
    _check_reference_fields(path, c)
    need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
            "num_target_layers")
    for key in need:
        _int(path, key, c.get(key), 1)
    dim, n_layers, n_heads = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]
    block = _dflash_value(c, "block_size")
    if block is None:
        raise ExportError(f"{path}: dflash_config.block_size missing (the reference would silently use 16; write "
                          "the block size the drafter was trained with)")
    mask = _dflash_value(c, "mask_token_id")
    if mask is None:
        raise ExportError(f"{path}: dflash_config.mask_token_id missing")
    ids = _dflash_value(c, "target_layer_ids")
    if ids is None:  # the reference's own default rule, which config.build_target_layer_ids shares
        ids = list(build_target_layer_ids(c["num_target_layers"], n_layers))
    if not isinstance(ids, list) or not ids:
        raise ExportError(f"{path}: dflash_config.target_layer_ids must be a non-empty list, got {ids!r}")
    ids = [_int(path, "dflash_config.target_layer_ids[]", i) for i in ids]
    if max(ids) >= c["num_target_layers"] or len(set(ids)) != len(ids):
        raise ExportError(f"{path}: dflash_config.target_layer_ids={ids}: 0-based layers, distinct, below "
                          f"num_target_layers={c['num_target_layers']}")
    aux = c.get("eagle_aux_hidden_state_layer_ids")
    if aux is not None and list(aux) != [i + 1 for i in ids]:
        raise ExportError(f"{path}: eagle_aux_hidden_state_layer_ids={aux} (vLLM reads it first, capturing the input "
                          f"of each layer) disagrees with dflash_config.target_layer_ids={ids} (layer outputs): "
                          f"expected {[i + 1 for i in ids]}")
    rope = c.get("rope_parameters") or {}
    ext = c.get(EXT)
    fields = dict(
        n_layers=n_layers, n_heads=n_heads, n_kv_heads=_int(path, "num_key_value_heads",
                                                            c.get("num_key_value_heads", n_heads), 1),
        head_dim=_int(path, "head_dim", c.get("head_dim") or dim // n_heads, 2), inter_dim=c["intermediate_size"],
        rope_theta=float(rope.get("rope_theta", c.get("rope_theta", 10000.0))),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)), block_size=_int(path, "dflash_config.block_size", block, 2),
        mask_token_id=_int(path, "dflash_config.mask_token_id", mask), dim=dim, vocab_size=c["vocab_size"],
        target_n_layers=c["num_target_layers"])
    if ext is None:
        fields.update(_plain_dflash_fields(wpath, tensors, ids, dim), conditioning="layers", reducer="linear",
                      post_norm=False, target_layer_ids=tuple(ids), hc_norm_eps=fields["norm_eps"])
    else:
        fields.update(_ext_fields(path, ext, ids, c["num_target_layers"]))
    try:
        return DrafterConfig(**fields)
    except (TypeError, ValueError) as e:
        raise ExportError(f"{path}: {e}") from None


def _plain_dflash_fields(wpath: Path, tensors: dict, ids: list[int], dim: int) -> dict:
    fc = tensors.get("fc.weight")
    if fc is None:
        raise ExportError(f"{wpath}: tensor 'fc.weight' missing (a DFlash drafter's compressor)")
    k = len(ids) * dim
    if fc.ndim != 2 or fc.shape[0] != dim or fc.shape[1] % k:
        raise ExportError(f"{wpath}: 'fc.weight' has shape {tuple(fc.shape)}; expected [{dim}, K·n·{dim}] with "
                          f"K={len(ids)} tapped layers and n streams per layer")
    dtype = _weights_dtype(wpath, tensors)
    return dict(hc_mult=fc.shape[1] // k, dtype=dtype, param_dtype=dtype)


def _ext_fields(path: Path, ext: dict, ids: list[int], n_target: int) -> dict:
    if ext.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path}: {EXT}.format_version={ext.get('format_version')!r}; this reader knows "
                          f"{FORMAT_VERSION}")
    if ext.get("rope") != "rotate_half":
        raise ExportError(f"{path}: {EXT}.rope={ext.get('rope')!r}: the reference format stores rotate_half rows")
    try:
        out = {k: ext[k] for k in ("conditioning", "reducer", "post_norm", "hc_mult", "hc_eps", "hc_norm_eps",
                                   "dtype", "param_dtype")}
    except KeyError as e:
        raise ExportError(f"{path}: {EXT}.{e.args[0]} missing") from None
    if out["conditioning"] == "final_streams":
        if ids != [n_target - 1]:
            raise ExportError(f"{path}: dflash_config.target_layer_ids={ids}: conditioning on the final streams "
                              f"taps exactly [{n_target - 1}]")
        out["target_layer_ids"] = None
    else:
        out["target_layer_ids"] = tuple(ids)
    return out


def read_zlab(src: str | Path, *, target_cfg=None, stream_pooling: str = "flatten"
              ) -> tuple[DrafterConfig, dict[str, np.ndarray]]:
    """A z-lab DFlash folder → (DrafterConfig, {this project's dotted path: array}), every check applied.

    stream_pooling: how the drafter was fed a DeepSeek-V4 layer's hc_mult streams. 'flatten' (this project's
    layout): `fc` is [D, K·n·D]. 'mean' (the per-layer stream mean that vLLM's and ATOM's
    DeepSeek-V4 auxiliary hidden states carry): `fc` is [D, K·D] and is imported as the equivalent flattened
    compressor, each stream's block fc_k / n (needs `target_cfg` for n).
    """
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: not a folder (a z-lab DFlash folder holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    cpath = src / CONFIG_FILE
    c = _read_json(cpath)
    wpath = src / WEIGHTS_FILE
    if not wpath.is_file() and not list(src.glob("*.safetensors")):
        raise FileNotFoundError(f"{wpath}: not found")
    tensors = load_all(wpath if wpath.is_file() else src)
    wpath = wpath if wpath.is_file() else src
    neox = c.get("is_neox_style", True)
    if neox is not True and (neox is not False or EXT in c):  # this project's exports always hold rotate_half rows
        raise ExportError(f"{cpath}: is_neox_style={neox!r}: expected true (rotate_half rows) or, for a file "
                          "not written here, false (interleaved rows, as vLLM reads them)")
    return from_reference(cpath, c, tensors, wpath, target_cfg=target_cfg, stream_pooling=stream_pooling,
                          permute=neox)


def from_reference(cpath: Path, c: dict, tensors: dict, wpath: Path, *, target_cfg, stream_pooling: str,
                   permute: bool = True) -> tuple[DrafterConfig, dict[str, np.ndarray]]:
    """A reference DFlash config (z-lab's keys) and its tensors → (DrafterConfig, this project's tree): the checks
    both reference formats share (z-lab's folder, speculators' folder mapped onto z-lab's keys)."""
    if stream_pooling == "mean":
        _expand_mean_pooled(cpath, c, tensors, wpath, target_cfg)
    elif stream_pooling != "flatten":
        raise ExportError(f"--stream-pooling {stream_pooling!r}: one of flatten, mean")
    cfg = drafter_config_from_zlab(cpath, c, tensors, wpath)
    ths = c.get("target_hidden_size")
    if ths is not None and stream_pooling == "flatten" and ths != cfg.hc_mult * cfg.dim:
        raise ExportError(f"{cpath}: target_hidden_size={ths} disagrees with fc.weight (per tapped layer "
                          f"{cfg.hc_mult}·{cfg.dim} = {cfg.hc_mult * cfg.dim} inputs)")
    if target_cfg is not None and EXT not in c and cfg.hc_mult == 1 and target_cfg.hc_mult > 1:
        raise ExportError(f"{wpath}: 'fc.weight' takes {cfg.dim} inputs per tapped layer but the target has "
                          f"hc_mult={target_cfg.hc_mult} streams: a drafter trained on the stream mean (vLLM's "
                          "DeepSeek-V4 auxiliary hidden states) imports with --stream-pooling mean; one trained on "
                          f"flattened streams has {target_cfg.hc_mult * cfg.dim} inputs per layer")
    return cfg, _tensors_here(cfg, tensors, wpath, permute=permute)


def _expand_mean_pooled(cpath: Path, c: dict, tensors: dict, wpath: Path, target_cfg) -> None:
    """fc [D, K·D] on stream means → the same map on flattened streams: [D, K, n, D] with fc_k / n per stream."""
    if target_cfg is None:
        raise ExportError(f"{cpath}: --stream-pooling mean needs --target (the number of streams)")
    if EXT in c:
        raise ExportError(f"{cpath}: written by this project (flattened streams); --stream-pooling mean does not apply")
    fc = tensors.get("fc.weight")
    d = c.get("hidden_size")
    if fc is None or fc.ndim != 2 or fc.shape[0] != d or fc.shape[1] % d:
        raise ExportError(f"{wpath}: 'fc.weight' missing or not [hidden_size, K·hidden_size]")
    n, k = target_cfg.hc_mult, fc.shape[1] // d
    per_stream = fc.astype(np.float32).reshape(d, k, 1, d) / np.float32(n)
    tensors["fc.weight"] = np.broadcast_to(per_stream, (d, k, n, d)).reshape(d, k * n * d).astype(fc.dtype)


def _tensors_here(cfg: DrafterConfig, tensors: dict[str, np.ndarray], wpath: Path, *, permute: bool = True
                  ) -> dict[str, np.ndarray]:
    from hdflash_jax.drafter.model import abstract_drafter

    want = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flat_params(abstract_drafter(cfg)).items()}
    maps = name_map(cfg)
    names = {m.there for m in maps}
    for key in sorted(tensors):
        if key not in names:
            why = (" (a draft-vocabulary or embedding/head copy: this drafter uses the target's, whole)"
                   if key.split(".")[0] in ("t2d", "d2t", "embed_tokens", "lm_head") else "")
            raise ExportError(f"{wpath}: unexpected tensor {key!r} for a {cfg.conditioning}/{cfg.reducer} drafter"
                              f"{why}")
    out = {}
    for m in maps:
        if m.there not in tensors:
            raise ExportError(f"{wpath}: tensor {m.there!r} missing")
        a = tensors[m.there]
        if count_nonfinite(a):  # in chunks: no full fp32 copy of a large tensor
            raise ExportError(f"{wpath}: tensor {m.there!r} holds NaN or Inf")
        shape, dtype = want[m.here]
        if tuple(a.shape) != shape:
            raise ExportError(f"{wpath}: tensor {m.there!r} has shape {tuple(a.shape)}, expected "
                              f"{list(shape)} for {CONFIG_FILE}")
        out[m.here] = _move(_as_dtype(wpath, m.there, a, dtype), m.move if permute else None, cfg.head_dim,
                            inverse=True)
    return out


__all__ = ["read_zlab", "from_reference", "drafter_config_from_zlab"]
