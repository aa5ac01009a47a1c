"""Conditioning reducers: target streams of one context position → the drafter's conditioning vector c [D].

* `GatedReducer` (HyperDFlash): exactly the target's `hc_head` function
  (`hdflash_jax.deepseek_v4.mhc.hc_head`: weightless RMS over vec(H), independent sigmoid gates, Σ_j g_j H_j) with its
  own trainable `fn` [n, nD], `base` [n], `scale` [1], initialised by copying the target's hc_head; then an
  optional RMSNorm (`post_norm`, initialised from the target's final norm). All in fp32.
* `LayerGatedReducer` (ablation 'layers' + 'gated'): one such gate per tapped layer; the K collapsed vectors are
  averaged (not concatenated: a K·D → D linear would bring back the dense compressor this design removes), then
  the optional RMSNorm.
* `LinearCompressor` (vanilla DFlash `fc` + `hidden_norm`): vec each tapped layer's streams (n·D), concatenate
  the K of them → Linear(K·n·D → D, no bias) → RMSNorm. With 'final_streams' K = 1 (ablation).

Feature layouts (what `ctx_feats` holds per position): 'final_streams' → [.., n, D]; 'layers' → [.., K, n, D]
(the K tapped layers in `DrafterConfig.layer_ids` order). `make_reducer(cfg)` picks the module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hdflash_jax.config import DrafterConfig
from hdflash_jax.deepseek_v4.layers import Linear, RMSNorm, param, rms_norm
from hdflash_jax.deepseek_v4.mhc import hc_head


def _gate_params(rngs: nnx.Rngs, n: int, dim: int):
    """hc_head-shaped params (the target's `HyperHead` init: fn normal 0.02, base 0, scale 1), fp32."""
    fn = param(rngs, (n, n * dim), ("hc", "hc_in"), jnp.float32)
    base = param(rngs, (n,), ("hc",), jnp.float32, init="zeros")
    scale = param(rngs, (1,), (None,), jnp.float32, init="ones")
    return fn, base, scale


class GatedReducer(nnx.Module):
    """HyperDFlash's gated residual reducer: c = [RMSNorm](hc_head(H; fn, base, scale)), fp32 throughout.

    Variants (ablations, off by default): `gate_path_norm` normalises each stream H_j by its own learnt RMSNorm
    before the gate; `gate_residual_rank` r > 0 adds U V vec(H) (V [r, nD], U [D, r] zero at init) to the gate."""

    def __init__(self, cfg: DrafterConfig, *, rngs: nnx.Rngs):
        self.hc_mult, self.dim = cfg.hc_mult, cfg.dim
        self.hc_norm_eps, self.hc_eps, self.norm_eps = cfg.hc_norm_eps, cfg.hc_eps, cfg.norm_eps
        self.fn, self.base, self.scale = _gate_params(rngs, cfg.hc_mult, cfg.dim)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype=jnp.float32) if cfg.post_norm else None
        self.path_norm = (param(rngs, (cfg.hc_mult, cfg.dim), ("hc", None), jnp.float32, init="ones")
                          if cfg.gate_path_norm else None)
        r = cfg.gate_residual_rank
        self.res_down = param(rngs, (r, cfg.hc_mult * cfg.dim), (None, "hc_in"), jnp.float32) if r else None
        self.res_up = param(rngs, (cfg.dim, r), ("embed", None), jnp.float32, init="zeros") if r else None

    def collapse(self, streams: jax.Array) -> jax.Array:
        """The gate alone: [.., n, D] → [.., D] fp32 (equals the target's `collapse` at init)."""
        h = streams.astype(jnp.float32)
        if self.path_norm is not None:
            h = rms_norm(h, self.path_norm[...], self.norm_eps)
        y = hc_head(h, self.fn[...], self.base[...], self.scale[...], norm_eps=self.hc_norm_eps, hc_eps=self.hc_eps)
        if self.res_down is not None:
            z = jnp.einsum("...i,ri->...r", h.reshape(*h.shape[:-2], -1), self.res_down[...])
            y = y + jnp.einsum("...r,dr->...d", z, self.res_up[...])
        return y

    def __call__(self, feats: jax.Array) -> jax.Array:
        y = self.collapse(feats)
        return self.norm(y) if self.norm is not None else y

    def load_from_target(self, target) -> None:
        """Copy the target's hc_head (fn, base, scale) and, with post_norm, its final norm weight."""
        _copy_into(self.fn, target.hc_head.fn[...])
        _copy_into(self.base, target.hc_head.base[...])
        _copy_into(self.scale, target.hc_head.scale[...])
        if self.norm is not None:
            _copy_into(self.norm.weight, target.norm.weight[...])


class _Gate(nnx.Module):
    def __init__(self, n: int, dim: int, *, rngs: nnx.Rngs):
        self.fn, self.base, self.scale = _gate_params(rngs, n, dim)


class LayerGatedReducer(nnx.Module):
    """Ablation 'layers' + 'gated': c = [RMSNorm](mean_k hc_head_k(H^(l_k))), one inherited gate per layer."""

    def __init__(self, cfg: DrafterConfig, *, rngs: nnx.Rngs):
        self.hc_norm_eps, self.hc_eps = cfg.hc_norm_eps, cfg.hc_eps
        self.n_feature_layers = cfg.n_feature_layers
        self.gates = nnx.List([_Gate(cfg.hc_mult, cfg.dim, rngs=rngs) for _ in range(cfg.n_feature_layers)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype=jnp.float32) if cfg.post_norm else None

    def __call__(self, feats: jax.Array) -> jax.Array:  # [.., K, n, D]
        x = feats.astype(jnp.float32)
        ys = [hc_head(x[..., k, :, :], g.fn[...], g.base[...], g.scale[...], norm_eps=self.hc_norm_eps,
                      hc_eps=self.hc_eps) for k, g in enumerate(self.gates)]
        y = sum(ys) / len(ys)
        return self.norm(y) if self.norm is not None else y

    def load_from_target(self, target) -> None:
        for g in self.gates:
            _copy_into(g.fn, target.hc_head.fn[...])
            _copy_into(g.base, target.hc_head.base[...])
            _copy_into(g.scale, target.hc_head.scale[...])
        if self.norm is not None:
            _copy_into(self.norm.weight, target.norm.weight[...])


class LinearCompressor(nnx.Module):
    """Vanilla DFlash: c = RMSNorm(W_c [vec H^(l1); …; vec H^(lK)]), W_c [D, K·n·D] without bias.

    The flattening is stream-major (vec(H) = [H_0; H_1; …], as hc_head's), layer-major across the K layers.
    """

    def __init__(self, cfg: DrafterConfig, *, rngs: nnx.Rngs):
        self.in_dim = cfg.n_feature_layers * cfg.hc_mult * cfg.dim
        self.fc = Linear(self.in_dim, cfg.dim, ("embed", "hc_in"), dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, dtype=jnp.float32)  # DFlash's `hidden_norm`
        self.n_trailing = 3 if cfg.conditioning == "layers" else 2

    def __call__(self, feats: jax.Array) -> jax.Array:
        flat = feats.reshape(*feats.shape[: feats.ndim - self.n_trailing], self.in_dim)
        w = self.fc.weight[...]
        y = jnp.einsum("...i,oi->...o", flat.astype(w.dtype), w, preferred_element_type=jnp.float32)
        return rms_norm(y, self.norm.weight[...], self.norm.eps)

    def load_from_target(self, target) -> None:  # nothing to inherit: W_c is new, hidden_norm starts at ones
        return None


def make_reducer(cfg: DrafterConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    if cfg.reducer == "linear":
        return LinearCompressor(cfg, rngs=rngs)
    if cfg.conditioning == "layers":
        return LayerGatedReducer(cfg, rngs=rngs)
    return GatedReducer(cfg, rngs=rngs)


def feature_shape(cfg: DrafterConfig) -> tuple[int, ...]:
    """The trailing shape of one context position's features: (n, D) or (K, n, D)."""
    if cfg.conditioning == "layers":
        return (cfg.n_feature_layers, cfg.hc_mult, cfg.dim)
    return (cfg.hc_mult, cfg.dim)


def features_from_target(cfg: DrafterConfig, out) -> jax.Array:
    """The drafter's context features from a target forward (`TargetOutput`).

    'final_streams' → `out.streams` [B, T, n, D]; 'layers' → the streams after the layers in `cfg.layer_ids`,
    stacked [B, T, K, n, D]. The target must have been called with `return_layers=target_return_layers(cfg)`
    (it returns the requested layers in increasing order; this reorders them to `cfg.layer_ids`).
    """
    if cfg.conditioning == "final_streams":
        return out.streams
    want = target_return_layers(cfg)
    if len(out.layer_streams) != len(want):
        raise ValueError(f"features_from_target: the target returned {len(out.layer_streams)} layer outputs; "
                         f"call it with return_layers={want}")
    by_id = dict(zip(want, out.layer_streams))
    return jnp.stack([by_id[i] for i in cfg.layer_ids], axis=2)


def target_return_layers(cfg: DrafterConfig) -> tuple[int, ...]:
    """`return_layers` to pass to the target (sorted 0-based ids; () when conditioning on the final streams)."""
    return tuple(sorted(cfg.layer_ids))


def _copy_into(var: nnx.Variable, value: jax.Array) -> None:
    if var[...].shape != value.shape:
        raise ValueError(f"cannot inherit a target parameter of shape {value.shape} into {var[...].shape}: the "
                         "drafter's dim/hc_mult must match the target's")
    # a real copy: a donated drafter buffer must never alias the (frozen) target's
    var[...] = jnp.array(value, dtype=var[...].dtype, copy=True)
