"""Checkpoint key names ↔ the Flax parameter tree. One table per layout; the converter and the tests share them.

Three names for one tensor:
* official — DeepSeek's released layout (`layers.3.attn.wq_a.weight`, `hc_head_fn`, `ffn.experts.7.w1.weight`,
  `mtp.0.*`). Every other layout is first renamed to this one.
* transformers in-memory — `DeepseekV4ForCausalLM.state_dict()` (`model.layers.3.self_attn.q_a_proj.weight`,
  `attn_hc.fn`, stacked `mlp.experts.gate_up_proj`).
* tree — the path of the leaf in `DeepseekV4`'s NNX state, written with dots (`layers.3.attn.wq_a.weight`).
  Official names map 1:1 except: `embed.weight` → `embed`, `hc_X_fn` → `hc_X.fn`, the MTP block's own layer
  keys gain `block.`, and routed experts are stacked: `ffn.experts.E.w1.weight` → row E of `ffn.experts.w1`.
* canonical tree — the tree of the unrolled model (`layers.<i>.…` for every decoder layer). A model whose layers
  run under scan stores unit position j of every unit in one leaf `scan.<j>.…` with a leading unit axis and the
  layers after the last unit in `tail.<k>.…`; `canonical_names` / `stack_canonical` / `unstack_tree` convert.
  Names on disk (official, transformers, our orbax) are always the canonical ones.
"""

from __future__ import annotations

import re
import numpy as np

# transformers in-memory name → official name; applied in order, each at most once, after stripping `model.`.
_HF_MEMORY_RULES: list[tuple[str, str]] = [
    (r"^lm_head\.", "head."),
    (r"^embed_tokens\.", "embed."),
    (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
    (r"\.self_attn\.compressor\.indexer\.scorer\.weights_proj\.", ".attn.indexer.weights_proj."),
    (r"\.self_attn\.compressor\.indexer\.q_b_proj\.", ".attn.indexer.wq_b."),
    (r"\.self_attn\.compressor\.indexer\.", ".attn.indexer.compressor."),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.", ".ffn."),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.attn_hc\.(fn|base|scale)$", r".hc_attn_\1"),
    (r"\.ffn_hc\.(fn|base|scale)$", r".hc_ffn_\1"),
    (r"\.attn\.sinks$", ".attn.attn_sink"),
    (r"\.attn\.q_a_proj\.", ".attn.wq_a."),
    (r"\.attn\.q_a_norm\.", ".attn.q_norm."),
    (r"\.attn\.q_b_proj\.", ".attn.wq_b."),
    (r"\.attn\.o_a_proj\.", ".attn.wo_a."),
    (r"\.attn\.o_b_proj\.", ".attn.wo_b."),
    (r"compressor\.kv_proj\.", "compressor.wkv."),
    (r"compressor\.gate_proj\.", "compressor.wgate."),
    (r"compressor\.kv_norm\.", "compressor.norm."),
    (r"compressor\.position_bias$", "compressor.ape"),
    (r"\.attn\.kv_proj\.", ".attn.wkv."),
    (r"\.ffn\.gate\.e_score_correction_bias$", ".ffn.gate.bias"),
    (r"\.shared_experts\.gate_proj\.", ".shared_experts.w1."),
    (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."),
    (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
]

_MTP_OWN = ("e_proj", "h_proj", "enorm", "hnorm", "norm", "hc_head")
_EXPERT = re.compile(r"^(.*\.ffn\.experts)\.(\d+)\.(w[123])\.weight$")


def hf_memory_to_official(name: str) -> str:
    """One transformers in-memory key → official. Stacked experts are split by `hf_memory_state_to_official`."""
    out = name[len("model."):] if name.startswith("model.") else name
    for pat, rep in _HF_MEMORY_RULES:
        out = re.sub(pat, rep, out, count=1)
    return out


def hf_memory_state_to_official(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A whole transformers state dict → official names, with `gate_up_proj`/`down_proj` unstacked per expert."""
    out: dict[str, np.ndarray] = {}
    for name, value in state.items():
        official = hf_memory_to_official(name)
        if official.endswith(".ffn.experts.gate_up_proj"):
            prefix = official[: -len(".gate_up_proj")]
            inter = value.shape[1] // 2
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.w1.weight"] = value[e, :inter]
                out[f"{prefix}.{e}.w3.weight"] = value[e, inter:]
        elif official.endswith(".ffn.experts.down_proj"):
            prefix = official[: -len(".down_proj")]
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.w2.weight"] = value[e]
        else:
            out[official] = value
    return out


def official_to_tree(name: str) -> tuple[str, int | None]:
    """Official key → (tree path, expert row or None)."""
    if name == "embed.weight":
        return "embed", None
    m = _EXPERT.match(name)
    if m:
        name, expert = f"{m.group(1)}.{m.group(3)}", int(m.group(2))
    else:
        expert = None
    name = re.sub(r"(^|\.)hc_(attn|ffn|head)_(fn|base|scale)$", r"\1hc_\2.\3", name)
    mtp = re.match(r"^mtp\.(\d+)\.(.*)$", name)
    if mtp and not mtp.group(2).split(".")[0] in _MTP_OWN:
        name = f"mtp.{mtp.group(1)}.block.{mtp.group(2)}"
    return name, expert


def tree_to_official(path: str, n_experts: int | None = None) -> list[str]:
    """Inverse of `official_to_tree`: the official key(s) a tree leaf is made of (one per expert if stacked)."""
    if path == "embed":
        return ["embed.weight"]
    name = re.sub(r"^mtp\.(\d+)\.block\.", r"mtp.\1.", path)
    name = re.sub(r"(^|\.)hc_(attn|ffn|head)\.(fn|base|scale)$", r"\1hc_\2_\3", name)
    m = re.match(r"^(.*\.ffn\.experts)\.(w[123])$", name)
    if m:
        return [f"{m.group(1)}.{e}.{m.group(2)}.weight" for e in range(n_experts)]
    return [name]


def tree_paths(state) -> dict[str, tuple]:
    """Dotted path → NNX state path for every leaf of a model's state."""
    from flax import nnx

    return {".".join(str(k) for k in path): path for path, _ in nnx.to_flat_state(state)}


# ---- stacked (scanned) layers ↔ canonical per-layer paths --------------------------------------------------
_LAYER = re.compile(r"^layers\.(\d+)\.")
_STACKED = re.compile(r"^(scan|tail)\.(\d+)\.(.*)$")


def stacking_of(shapes: dict[str, tuple]) -> tuple[int, int, int]:
    """(prefix layers, unit period, units) of a tree, read off its leaf paths and the scanned leaves' lead axis."""
    prefix = len({m.group(1) for m in map(_LAYER.match, shapes) if m})
    scanned = {k: v for k, v in shapes.items() if k.startswith("scan.")}
    period = len({_STACKED.match(k).group(2) for k in scanned})
    n_units = next(iter(scanned.values()))[0] if scanned else 0
    return prefix, period, n_units


def canonical_names(path: str, stacking: tuple[int, int, int]) -> list[str]:
    """The canonical path(s) of one tree leaf: one per unit (in unit order) for a scanned leaf, else [path]."""
    m = _STACKED.match(path)
    if not m:
        return [path]
    prefix, period, n_units = stacking
    kind, k, rest = m.group(1), int(m.group(2)), m.group(3)
    if kind == "tail":
        return [f"layers.{prefix + period * n_units + k}.{rest}"]
    return [f"layers.{prefix + u * period + k}.{rest}" for u in range(n_units)]


def canonical_shapes(shapes: dict[str, tuple]) -> dict[str, tuple]:
    """{tree path: shape} → {canonical path: shape} (a scanned leaf's shape loses its unit axis)."""
    st = stacking_of(shapes)
    out = {}
    for path, shape in shapes.items():
        names = canonical_names(path, st)
        for name in names:
            out[name] = tuple(shape[1:]) if path.startswith("scan.") else tuple(shape)
    return out


def stack_canonical(canonical: dict, shapes: dict[str, tuple], stack=np.stack) -> dict:
    """{canonical path: array} → {tree path: array} for the tree with leaf shapes `shapes` (scanned leaves stacked)."""
    st = stacking_of(shapes)
    out = {}
    for path in shapes:
        names = canonical_names(path, st)
        out[path] = stack([canonical[n] for n in names]) if path.startswith("scan.") else canonical[names[0]]
    return out


def unstack_tree(flat: dict) -> dict:
    """{tree path: array} of any tree → {canonical path: array} (scanned leaves sliced per unit)."""
    st = stacking_of({k: tuple(v.shape) for k, v in flat.items()})
    out = {}
    for path, value in flat.items():
        names = canonical_names(path, st)
        if path.startswith("scan."):
            out.update((n, value[u]) for u, n in enumerate(names))
        else:
            out[names[0]] = value
    return out


def assemble_tree(flat_official: dict[str, np.ndarray], abstract_state, *, allow_unused: bool = False,
                  source: str = "checkpoint") -> dict[str, np.ndarray]:
    """Official-named tensors → {tree path: array} for every leaf of `abstract_state`, strictly (scanned layers
    stacked from their per-layer tensors).

    Raises KeyError/ValueError naming the key for a missing tensor, an unexpected one (unless allow_unused) or a
    shape that disagrees with the model.
    """
    from flax import nnx

    shapes = {".".join(str(k) for k in path): tuple(v.shape) for path, v in nnx.to_flat_state(abstract_state)}
    out = _assemble_canonical(flat_official, canonical_shapes(shapes), allow_unused, source)
    return stack_canonical(out, shapes)


def _assemble_canonical(flat_official, leaves: dict[str, tuple], allow_unused: bool, source: str):
    """Official tensors → {canonical path: array} for the canonical leaves {path: shape}."""
    grouped: dict[str, dict[int | None, np.ndarray]] = {}
    for name, value in flat_official.items():
        path, expert = official_to_tree(name)
        if path not in leaves:
            if allow_unused:
                continue
            raise KeyError(f"{source}: unexpected tensor {name!r} (no parameter {path!r} in this model)")
        grouped.setdefault(path, {})[expert] = value
    out = {}
    for path, shape in leaves.items():
        parts = grouped.get(path)
        if parts is None:
            raise KeyError(f"{source}: missing tensor {tree_to_official(path, shape[0] if 'experts' in path else None)[0]!r}"
                           f" for parameter {path!r}")
        if None in parts:
            value = np.asarray(parts[None])
        else:
            missing = [e for e in range(shape[0]) if e not in parts]
            if missing:
                raise KeyError(f"{source}: missing tensor {tree_to_official(path, shape[0])[missing[0]]!r}")
            value = np.stack([np.asarray(parts[e]) for e in range(shape[0])])
        if tuple(value.shape) != shape:
            raise ValueError(f"{source}: tensor for {path!r} has shape {tuple(value.shape)}, the config expects {shape}")
        out[path] = value
    return out


def load_into(model, tree_arrays: dict[str, np.ndarray]) -> None:
    """Write {tree path: array} into an NNX model in place, casting to each parameter's dtype."""
    import jax.numpy as jnp
    from flax import nnx

    state = nnx.state(model)
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        key = ".".join(str(k) for k in path)
        var.set_value(jnp.asarray(tree_arrays[key], dtype=var.get_value().dtype))
    nnx.update(model, nnx.from_flat_state(flat))


# ---- transformers on-disk layout (`save_pretrained`) and layout detection -----------------------------------
# transformers 5.x writes DeepSeek-V4 through the *reverse* of its conversion mapping, so the files carry
# near-official names: `model.` prefix, `model.embed_tokens`, `model.hc_head.hc_{fn,base,scale}`, `head.weight`
# (no prefix), unstacked experts `ffn.experts.E.w1.weight`, `ffn.gate.{bias,tid2eid}`. One quirk: the forward
# rule `.norm.` → `.kv_norm.` is not invertible, so the attention's own `kv_norm` is written as `attn.norm`
# (compressor norms keep `compressor.norm`, which is their official name). Checked by saving a random tiny model
# (transformers 5.23.0). Quantized transformers checkpoints name scales `weight_scale_inv`.
_HF_DISK_RULES: list[tuple[str, str]] = [
    (r"^lm_head\.", "head."),
    (r"^embed_tokens\.", "embed."),
    (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
    (r"^((?:layers|mtp)\.\d+\.)attn\.norm\.", r"\1attn.kv_norm."),
    (r"\.weight_scale_inv$", ".scale"),
]


def hf_disk_to_official(name: str) -> str:
    """One key of a transformers `save_pretrained` checkpoint → official."""
    out = name[len("model."):] if name.startswith("model.") else name
    for pat, rep in _HF_DISK_RULES:
        out = re.sub(pat, rep, out, count=1)
    return out


_HF_MEMORY_MARKERS = re.compile(
    r"(^|\.)(self_attn|mlp|attn_hc|ffn_hc|input_layernorm|post_attention_layernorm)\.|^lm_head\.|"
    r"\.experts\.(gate_up_proj|down_proj)$")
_OFFICIAL_TOP = re.compile(r"^(embed\.|head\.|norm\.|hc_head_|layers\.\d+\.|mtp\.\d+\.)")


def detect_layout(names) -> str:
    """'hf_memory' (transformers state_dict names), 'hf_disk' (save_pretrained files) or 'official' (DeepSeek).

    Decided by markers only a layout has: in-memory module names (`self_attn.`, `mlp.`, `attn_hc.`, `lm_head.`,
    stacked `experts.gate_up_proj`) → hf_memory; otherwise a `model.` prefix → hf_disk; otherwise official.
    Raises ValueError for an empty name list or names of none of the three layouts.
    """
    names = list(names)
    if not names:
        raise ValueError("detect_layout: no tensor names")
    if any(_HF_MEMORY_MARKERS.search(n) for n in names):
        return "hf_memory"
    if any(n.startswith("model.") for n in names):
        return "hf_disk"
    if any(_OFFICIAL_TOP.match(n) for n in names):
        return "official"
    raise ValueError(f"detect_layout: names match no known DeepSeek-V4 layout (first: {sorted(names)[0]!r})")


def to_official(name: str, layout: str) -> str:
    """Rename one key of `layout` to official (stacked in-memory experts keep their stacked name)."""
    if layout == "official":
        return re.sub(r"\.weight_scale_inv$", ".scale", name)
    if layout == "hf_disk":
        return hf_disk_to_official(name)
    if layout == "hf_memory":
        return re.sub(r"\.weight_scale_inv$", ".scale", hf_memory_to_official(name))
    raise ValueError(f"unknown checkpoint layout {layout!r}; one of official, hf_disk, hf_memory")
