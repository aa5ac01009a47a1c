"""speculators' DFlash format (vllm-project/speculators 0.9.0: the checkpoint vLLM's speculative decoding loads), for
block drafters: `export` and `read_speculators`.

    python -m convert.drafter_export --to speculators --src DRAFTER_CKPT --dst OUT_DIR [--overwrite]
    python -m convert.drafter_export --to here --src SPECULATORS_DIR --dst DRAFTER_CKPT --target T

The folder holds `config.json` (`speculators_model_type: "dflash"`, `architectures: ["DFlashDraftModel"]`, a Qwen3
`transformer_layer_config`, `block_size`, `mask_token_id`, `aux_hidden_state_layer_ids`, `sample_from_anchor:
false`, `speculators_config` with one greedy proposal of B − 1 tokens) and `model.safetensors` with the tensor names
and RoPE rows of z-lab's format (`formats.zlab`: the two share them). The embedding and LM head are the
verifier's and are not written. Conventions that differ from this project's, made explicit here:

* layer ids: speculators' `aux_hidden_state_layer_ids` index transformers' `hidden_states` (entry 0 is the
  embedding), so they are this project's 0-based decoder-layer ids + 1;
* slots: `sample_from_anchor: false` — slot 0 is the anchor and carries no loss, slot j drafts token a + j
  (DFlash's and this project's block drafters'); a folder with `true` (DSpark-style numbering) is refused;
* features: `fc` reads one D-vector per tapped layer ([D, K·D]). For a DeepSeek-V4 verifier (hc_mult n streams)
  vLLM feeds the per-layer stream mean; this project's drafters read the n streams flattened ([D, K·n·D]). The two
  are the same map exactly when each tapped layer's n blocks of `fc` are equal: `fc_mean = n · block`. `export`
  writes that and refuses any other multi-stream drafter; import expands a mean-pooled `fc` back (block / n).

What the format cannot hold, and is refused in one line: HyperDFlash's gated reducer (no `fc`: use the z-lab export,
which carries the gate tensors), DSpark on V4 blocks (speculators' DSpark is Qwen3 layers), V4's native MTP
(speculators' MTP takes Qwen3-family verifiers only), reduced draft vocabularies. DFlash 2 (`dflash2`) is the
DFlash 2 family's: `formats.speculators_dflash2`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hdflash_jax.config import DrafterConfig
from hdflash_jax.fileio import OutputKind, atomic_dir, read_json
from hdflash_jax.formats.zlab import (EXT, FORMAT_VERSION, MAX_POSITIONS, ExportError, export_tensors, flat_params,
                                      tapped_layers)
from hdflash_jax.safetensors_io import load_all, write_safetensors

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SPECULATORS_VERSION = "0.9.0"


def _mean_pooled_fc(cfg: DrafterConfig, fc: np.ndarray) -> np.ndarray:
    """[D, K·n·D] with equal stream blocks per tapped layer → the stream-mean map [D, K·D] (n · block)."""
    d, k, n = cfg.dim, cfg.n_feature_layers, cfg.hc_mult
    blocks = fc.reshape(d, k, n, d)
    if not all(np.array_equal(blocks[:, :, j], blocks[:, :, 0]) for j in range(1, n)):
        raise ExportError(f"fc reads each of the {n} streams of a tapped layer with its own weights; speculators' fc "
                          f"reads one {d}-vector per tapped layer (vLLM feeds DeepSeek-V4's per-layer stream mean), "
                          "which cannot express it: export to the z-lab format instead")
    return (blocks[:, :, 0] * np.asarray(n, fc.dtype)).reshape(d, k * d)


def speculators_config(cfg: DrafterConfig) -> dict:
    """config.json of a vanilla DFlash drafter in speculators' format (+ this project's block for round trips)."""
    tl = {"model_type": "qwen3", "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
          "intermediate_size": cfg.inter_dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
          "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
          "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": MAX_POSITIONS, "attention_bias": False,
          "attention_dropout": 0.0, "use_sliding_window": False, "tie_word_embeddings": False,
          "layer_types": ["full_attention"] * cfg.n_layers,
          "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}
    return {
        "speculators_model_type": "dflash", "architectures": ["DFlashDraftModel"],
        "speculators_version": SPECULATORS_VERSION, "dtype": cfg.param_dtype, "tie_word_embeddings": False,
        "transformer_layer_config": tl, "draft_vocab_size": cfg.vocab_size, "block_size": cfg.block_size,
        "aux_hidden_state_layer_ids": [i + 1 for i in tapped_layers(cfg)], "mask_token_id": cfg.mask_token_id,
        "sample_from_anchor": False, "sliding_window_non_causal": False, "target_hidden_size": None,
        "speculators_config": {
            "algorithm": "dflash", "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": cfg.block_size - 1,
                                  "accept_tolerance": 0.0, "verifier_accept_k": 1}],
            "verifier": {"name_or_path": None, "architectures": ["DeepseekV4ForCausalLM"]}},
        EXT: {"format_version": FORMAT_VERSION, "conditioning": cfg.conditioning, "reducer": cfg.reducer,
              "post_norm": cfg.post_norm, "hc_mult": cfg.hc_mult, "hc_eps": cfg.hc_eps, "hc_norm_eps": cfg.hc_norm_eps,
              "dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "rope": "rotate_half",
              "target_n_layers": cfg.target_n_layers,
              "stream_pooling": "mean" if cfg.hc_mult > 1 else "flatten"},
    }


def export(cfg: DrafterConfig, drafter, dst, *, target_cfg=None, overwrite: bool = False) -> dict:
    """A vanilla DFlash drafter as a speculators folder at `dst`, atomically → a summary."""
    tensors = dflash_tensors(cfg, {k: np.asarray(v) for k, v in flat_params(drafter).items()})
    return write_folder(dst, speculators_config(cfg), tensors, cfg, overwrite=overwrite)


def dflash_tensors(cfg: DrafterConfig, flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{this project's dotted path: array} of a vanilla DFlash drafter → speculators' tensors (fc mean-pooled
    for a multi-stream target); a drafter the format cannot hold is refused."""
    if (cfg.conditioning, cfg.reducer) != ("layers", "linear"):
        raise ExportError(f"speculators' DFlashDraftModel conditions on tapped layers through a linear fc; this "
                          f"drafter is {cfg.conditioning}/{cfg.reducer} (HyperDFlash's gate has no place there: export "
                          "it to the z-lab format, which carries the gate tensors)")
    tensors = export_tensors(cfg, flat)
    if cfg.hc_mult > 1:
        tensors["fc.weight"] = _mean_pooled_fc(cfg, tensors["fc.weight"])
    return tensors


def write_folder(dst, config: dict, tensors: dict, cfg: DrafterConfig, *, overwrite: bool) -> dict:
    """config.json and model.safetensors at `dst`, atomically → the export's summary."""
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        write_safetensors(tmp / WEIGHTS_FILE, tensors, {"format": "pt"})
    notes = ["features: the per-layer stream mean (vLLM's DeepSeek-V4 aux hidden states); fc = n · each stream's "
             "block"] if cfg.hc_mult > 1 else []
    return {"dst": str(Path(dst).resolve()), "tensors": len(tensors), "block_size": cfg.block_size,
            "aux_hidden_state_layer_ids": [i + 1 for i in tapped_layers(cfg)], "notes": notes}


def is_speculators_folder(path) -> bool:
    f = Path(path) / CONFIG_FILE
    try:
        return f.is_file() and "speculators_model_type" in read_json(f)
    except (ValueError, TypeError):
        return False


def model_type_is(kind: str):
    """A predicate: the speculators folder's `speculators_model_type` is `kind`."""
    def takes(path) -> bool:
        try:
            return read_json(Path(path) / CONFIG_FILE).get("speculators_model_type") == kind
        except (ValueError, TypeError, OSError):
            return False
    return takes


SPECULATORS_FOLDER = OutputKind("a speculators folder (config.json with speculators_model_type)",
                                is_speculators_folder)


def read_speculators(src, *, target_cfg) -> tuple[DrafterConfig, dict[str, np.ndarray]]:
    """A speculators DFlash folder → (DrafterConfig, {this project's dotted path: array}), strictly checked (the
    z-lab reader's checks, on speculators' keys mapped to z-lab's). The target says how many layers and streams."""
    cpath, wpath, raw = _open(src, target_cfg, "dflash")
    if not wpath.is_file():
        raise FileNotFoundError(f"{wpath}: not found")
    return dflash_from_speculators(cpath, wpath, raw, load_all(wpath), target_cfg)


def _open(src, target_cfg, want: str) -> tuple[Path, Path, dict]:
    """(config path, weights path, config) of a speculators folder of model type `want`."""
    src = Path(src)
    cpath, wpath = src / CONFIG_FILE, src / WEIGHTS_FILE
    if target_cfg is None:
        raise ExportError(f"{cpath}: --target: a speculators folder does not say its target's depth or streams")
    raw = read_json(cpath)
    kind = raw.get("speculators_model_type")
    if kind != want:
        raise ExportError(f"{cpath}: speculators_model_type={kind!r}: this reader takes {want!r} (the DFlash family "
                          "reads 'dflash', the DFlash 2 family 'dflash2'; DSpark on Qwen3 layers, EAGLE and MTP "
                          "drafters are other models)")
    return cpath, wpath, raw


def dflash_from_speculators(cpath: Path, wpath: Path, raw: dict, tensors: dict, target_cfg
                            ) -> tuple[DrafterConfig, dict[str, np.ndarray]]:
    """The DFlash part of a speculators config and its tensors → (DrafterConfig, this project's tree)."""
    from hdflash_jax.formats.zlab_read import from_reference

    if raw.get("sample_from_anchor", False):
        raise ExportError(f"{cpath}: sample_from_anchor=true: slot j drafts token a + j + 1 (DSpark's numbering); "
                          "this project's block drafters draft a + j at slot j")
    tl = raw.get("transformer_layer_config")
    if not isinstance(tl, dict):
        raise ExportError(f"{cpath}: transformer_layer_config missing")
    if raw.get("draft_vocab_size", tl.get("vocab_size")) != tl.get("vocab_size"):
        raise ExportError(f"{cpath}: draft_vocab_size={raw.get('draft_vocab_size')} (a reduced draft vocabulary with "
                          "d2t/t2d maps): this project's drafters use the target's whole vocabulary")
    aux = raw.get("aux_hidden_state_layer_ids")
    if not isinstance(aux, list) or not aux or any(not isinstance(i, int) or i < 1 for i in aux):
        raise ExportError(f"{cpath}: aux_hidden_state_layer_ids={aux!r}: expected hidden-state indices >= 1 "
                          "(entry 0 is the embedding, not a layer's output)")
    ext = raw.get(EXT)
    c = {**tl, "architectures": ["DFlashDraftModel"], "num_target_layers": target_cfg.n_layers,
         "dflash_config": {"block_size": raw.get("block_size"), "mask_token_id": raw.get("mask_token_id"),
                           "target_layer_ids": [i - 1 for i in aux]}}
    if isinstance(ext, dict):
        c[EXT] = {k: v for k, v in ext.items() if k not in ("target_n_layers", "stream_pooling")}
    fc = tensors.get("fc.weight")
    pooled = fc is not None and fc.ndim == 2 and fc.shape[1] == len(aux) * tl.get("hidden_size", -1)
    mean = target_cfg.hc_mult > 1 and pooled  # one D-vector per layer for a multi-stream verifier: the stream mean
    if mean and isinstance(ext, dict):  # an export of ours: expanded back to the flattened map it came from
        c = {k: v for k, v in c.items() if k != EXT}
    cfg, tree = from_reference(cpath, c, tensors, wpath, target_cfg=target_cfg,
                               stream_pooling="mean" if mean else "flatten")
    if mean and isinstance(ext, dict):
        cfg = cfg.replace(**{k: ext[k] for k in ("post_norm", "hc_eps", "hc_norm_eps", "dtype", "param_dtype")})
        cfg = cfg.replace(conditioning=ext["conditioning"], reducer=ext["reducer"])
    return cfg, tree
