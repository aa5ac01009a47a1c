"""z-lab's DFlash format, the block drafters' serving format: the names, the export half (`export`) and the
format object the block family lists (`ZLAB`); the import half is `zlab_read`.

    python -m convert.drafter_export --to zlab --src DRAFTER_CKPT --dst OUT_DIR [--overwrite]
    python -m convert.drafter_export --to here --src ZLAB_DIR --dst DRAFTER_CKPT [--target CKPT|PRESET] [--overwrite]

z-lab's format (`dflash.DFlashDraftModel`, what vLLM / SGLang / speculators load) is a folder with `config.json`
(a Qwen3 config plus `num_target_layers` and `dflash_config` = {block_size, mask_token_id, target_layer_ids}) and
`model.safetensors` holding the model's `state_dict()` (every matrix [out, in], as here). The differences:
* RoPE: this project rotates interleaved pairs (2i, 2i+1); the reference uses rotate_half, pairs (i, i + d/2).
  q_proj / k_proj rows and the q_norm / k_norm weights are permuted within each head ([0, 2, 4, …, 1, 3, …]);
  q·k is unchanged because queries and keys get the same permutation (v is not rotated and stays as it is).
* names: wq/wk/wv/wo → self_attn.{q,k,v,o}_proj, w1/w3/w2 → mlp.{gate,up,down}_proj, input_norm / post_attn_norm →
  input_layernorm / post_attention_layernorm; the linear compressor and its RMSNorm are `fc` / `hidden_norm`.
* block size: the reference defaults to 16 when `block_size` is absent, so it is always written.
* DeepSeek-V4 features: a tapped layer carries hc_mult streams [n, D]; they enter `fc` flattened stream-major
  (vec(H) = [H_0; …; H_{n−1}]) and the K layers are concatenated in `target_layer_ids` order, so `fc` is
  [D, K·n·D] (z-lab's class, like speculators' `DFlashDraftModel`, builds `fc` as [D, K·D] and loads such a
  drafter only with hc_mult = 1; `export` says so in its notes). Layer ids are 0-based decoder layers; layer l is
  transformers'
  `hidden_states[l + 1]` (entry 0 is the embedding), except the last layer, whose entry transformers replaces by
  the collapsed, normed output.
* HyperDFlash's gated reducer has no counterpart in the reference: it is written as the extra tensors
  `hc_head_fn` [n, n·D], `hc_head_base` [n], `hc_head_scale` [1] (+ `hidden_norm.weight`, its post RMSNorm) in
  place of `fc`, the streams of the last layer (before the target's hc_head) as `target_layer_ids` = [L − 1], and
  config `hdflash.reducer = "gated"`. Engines' DFlash loaders do not know these tensors (see `GATE_NOTE`).
`config.json` also carries an `hdflash` block (conditioning, reducer, hc_mult, eps, dtypes) so that an export
imports back bit-identical; a file without it (written by the reference or another trainer) imports as vanilla
DFlash ('layers' + 'linear'), hc_mult read from the shape of `fc`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from hdflash_jax.config import DrafterConfig
from hdflash_jax.fileio import OutputKind, atomic_dir, read_json
from hdflash_jax.safetensors_io import write_safetensors

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EXT = "hdflash"
FORMAT_VERSION = 1
MAX_POSITIONS = 1 << 20  # the reference's RoPE is plain (no scaling): this only bounds what a loader pre-computes

GATE_NOTE = ("HyperDFlash gate (hc_head_fn / hc_head_base / hc_head_scale in place of fc): no engine's DFlash "
             "loader runs it. z-lab's DFlashDraftModel, vLLM's and SGLang's DFlash drafters and speculators' "
             "DFlashDraftModel expect fc + hidden_norm and reject or ignore the gate tensors. What they lack: a "
             "reducer hook c = RMSNorm(sum_j w_j H_j), w_j = sigmoid(scale * (fn vec H)_j / rms(vec H) + base_j) + "
             "hc_eps (the target's hc_head, own weights), fed by the last layer's streams before the target's "
             "hc_head (vLLM keeps them for MTP).")
MULTI_STREAM_NOTE = ("fc is [D, K·n·D] for n = {n} streams per tapped layer (vec of each tapped layer's streams); "
                     "z-lab's DFlashDraftModel builds fc as [D, K·D] and loads such a drafter only with hc_mult = 1")

# (this project's name inside layers.{i}, the reference's, how the rows move: 'heads' = q/k RoPE permutation
# within each head, 'head_vec' = the same on a per-head norm vector, None = as is)
_LAYER_NAMES = (
    ("wq.weight", "self_attn.q_proj.weight", "heads"),
    ("wk.weight", "self_attn.k_proj.weight", "heads"),
    ("wv.weight", "self_attn.v_proj.weight", None),
    ("wo.weight", "self_attn.o_proj.weight", None),
    ("q_norm.weight", "self_attn.q_norm.weight", "head_vec"),
    ("k_norm.weight", "self_attn.k_norm.weight", "head_vec"),
    ("w1.weight", "mlp.gate_proj.weight", None),
    ("w3.weight", "mlp.up_proj.weight", None),
    ("w2.weight", "mlp.down_proj.weight", None),
    ("input_norm.weight", "input_layernorm.weight", None),
    ("post_attn_norm.weight", "post_attention_layernorm.weight", None),
)


class ExportError(ValueError):
    """Bad input for a conversion; the message names the file and key."""


@dataclasses.dataclass(frozen=True)
class NameMap:
    here: str
    there: str
    move: str | None


def name_map(cfg: DrafterConfig) -> list[NameMap]:
    """Every parameter of a `BlockDrafter` of `cfg` with its reference name."""
    out = [NameMap(f"layers.{i}.{a}", f"layers.{i}.{b}", m) for i in range(cfg.n_layers) for a, b, m in _LAYER_NAMES]
    out.append(NameMap("norm.weight", "norm.weight", None))
    if cfg.reducer == "linear":
        out += [NameMap("reducer.fc.weight", "fc.weight", None), NameMap("reducer.norm.weight", "hidden_norm.weight",
                                                                          None)]
    elif cfg.conditioning == "final_streams":
        out += [NameMap(f"reducer.{p}", f"hc_head_{p}", None) for p in ("fn", "base", "scale")]
    else:
        out += [NameMap(f"reducer.gates.{k}.{p}", f"hc_head.{k}.{p}", None)
                for k in range(cfg.n_feature_layers) for p in ("fn", "base", "scale")]
    if cfg.reducer == "gated" and cfg.post_norm:
        out.append(NameMap("reducer.norm.weight", "hidden_norm.weight", None))
    return out


def rope_permutation(head_dim: int) -> np.ndarray:
    """Reference slot j ← this project's slot perm[j]: interleaved pair (2i, 2i+1) → rotate_half pair (i, i+d/2)."""
    return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])


def _move(w: np.ndarray, move: str | None, head_dim: int, inverse: bool) -> np.ndarray:
    if move is None:
        return w
    perm = rope_permutation(head_dim)
    if inverse:
        perm = np.argsort(perm)
    if move == "head_vec":
        return np.ascontiguousarray(w[perm])
    heads = w.reshape(w.shape[0] // head_dim, head_dim, *w.shape[1:])
    return np.ascontiguousarray(heads[:, perm].reshape(w.shape))


def flat_params(module) -> dict:
    """{dotted tree path: value} of an NNX module's state (arrays, or ShapeDtypeStructs for an abstract one)."""
    from flax import nnx

    from hdflash_jax.checkpoint import dotted

    return {dotted(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(module))}


def tapped_layers(cfg: DrafterConfig) -> list[int]:
    """`target_layer_ids` as written: the tapped layers, or [L − 1] (the final pre-collapse streams)."""
    return list(cfg.layer_ids) if cfg.conditioning == "layers" else [cfg.target_n_layers - 1]


def zlab_config(cfg: DrafterConfig) -> dict:
    """The reference's config.json for a drafter of `cfg` (Qwen3 fields + dflash_config + this project's block)."""
    return {
        "architectures": ["DFlashDraftModel"], "model_type": "qwen3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.inter_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": MAX_POSITIONS, "attention_bias": False, "attention_dropout": 0.0,
        "use_sliding_window": False, "tie_word_embeddings": False, "dtype": cfg.param_dtype,
        "is_neox_style": True, "target_hidden_size": cfg.hc_mult * cfg.dim,
        "num_target_layers": cfg.target_n_layers,
        "dflash_config": {"block_size": cfg.block_size, "mask_token_id": cfg.mask_token_id,
                          "target_layer_ids": tapped_layers(cfg)},
        EXT: {"format_version": FORMAT_VERSION, "conditioning": cfg.conditioning, "reducer": cfg.reducer,
              "post_norm": cfg.post_norm, "hc_mult": cfg.hc_mult, "hc_eps": cfg.hc_eps,
              "hc_norm_eps": cfg.hc_norm_eps, "dtype": cfg.dtype, "param_dtype": cfg.param_dtype,
              "rope": "rotate_half", "features": "per tapped layer vec(streams) stream-major, layers concatenated"},
    }


# ---- here -> there ---------------------------------------------------------------------------------------------

def export_tensors(cfg: DrafterConfig, flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{this project's dotted path: array} → {reference name: array} (RoPE rows permuted)."""
    out = {}
    for m in name_map(cfg):
        if m.here not in flat:
            raise ExportError(f"drafter parameters: {m.here!r} missing")
        out[m.there] = _move(np.asarray(flat[m.here]), m.move, cfg.head_dim, inverse=False)
    extra = sorted(set(flat) - {m.here for m in name_map(cfg)})
    if extra:
        raise ExportError(f"drafter parameters: {extra[0]!r} has no place in the reference format")
    return out


def export(cfg: DrafterConfig, drafter, dst: str | Path, *, target_cfg=None, overwrite: bool = False) -> dict:
    """A block drafter (its config and module) as a z-lab folder at `dst`, atomically → a summary: the tensors
    written, the gate tensors (HyperDFlash), whether z-lab's class loads it and, when not, why (`notes`)."""
    flat = {k: np.asarray(v) for k, v in flat_params(drafter).items()}
    tensors = export_tensors(cfg, flat)
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(zlab_config(cfg), indent=1))
        write_safetensors(tmp / WEIGHTS_FILE, tensors, {"format": "pt"})
    gate = sorted(k for k in tensors if k.startswith("hc_head"))
    notes = [GATE_NOTE] if gate else [MULTI_STREAM_NOTE.format(n=cfg.hc_mult)] if cfg.hc_mult > 1 else []
    return {"dst": str(Path(dst).resolve()), "tensors": len(tensors), "conditioning": cfg.conditioning,
            "reducer": cfg.reducer, "block_size": cfg.block_size, "target_layer_ids": tapped_layers(cfg),
            "gate_tensors": gate, "zlab_loadable": not notes,
            "notes": [f"z-lab's DFlashDraftModel cannot load this export: {n}" for n in notes]}


def is_zlab_folder(path: Path) -> bool:
    f = Path(path) / CONFIG_FILE
    try:
        return f.is_file() and "dflash_config" in read_json(f) and (Path(path) / WEIGHTS_FILE).is_file()
    except (ValueError, TypeError):
        return False


ZLAB_FOLDER = OutputKind("a z-lab DFlash folder (config.json with dflash_config + model.safetensors)", is_zlab_folder)
