"""The target against NVIDIA NeMo Automodel's DeepseekV4ForCausalLM: a second reference beside transformers.

One set of random weights under DeepSeek's official names goes to both sides through each side's own loader (ours:
`convert/torch_to_flax.py`; NeMo: its `DeepSeekV4StateDictAdapter.from_hf`), fp32. Configurations: the tiny preset
(hc_mult 4, SWA / CSA / HCA 8, two hash layers, sinks, YaRN) and `hc2` (hc_mult 2, CSA first, HCA 16, SWA last,
one hash layer). Negative controls (a wrong mapping each) run in the same compiled forward and must fail.

The two references agree with each other and with us to ~1e-6, except on one rule (`test_top1_routing_...`):
with one routed expert per token NeMo does not normalise the routing weight (its `Gate` only normalises when
top-k > 1); DeepSeek's inference/model.py (`Gate.forward`: `if score_func != "softmax": weights /= sum`),
transformers and hdflash_jax do.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("nemo_automodel.components.models.deepseek_v4.model")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from hdflash_jax.deepseek_v4.model import forward_full  # noqa: E402
from test_target import CONFIGS  # noqa: E402
from ref_nemo import convert_official, nemo_model, official_weights  # noqa: E402

# hc2 alone reaches every path (hc_mult 2, SWA / CSA with the indexer / HCA 16, hash and routed MoE, sinks, YaRN);
# tiny (hc_mult 4) and hash3 (three hash layers, HCA first, wider window) run with -m slow
DEFAULT = ("hc2",)
TOL = 1e-5
FAIL = 1e-2  # a negative control must be at least this far off
B, S = 2, 48


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _logits_fn(model):
    graph, state = nnx.split(model)

    @jax.jit
    def run(state, tokens):
        return forward_full(nnx.merge(graph, state), tokens).logits

    def call(state_, tokens):
        with jax.default_matmul_precision("highest"):
            return np.asarray(run(state_, jnp.asarray(tokens)))
    return state, call


def _edited(state, edits):
    """A copy of the flat state with some leaves replaced: {dotted path: fn(old array) -> new array}."""
    flat = dict(nnx.to_flat_state(state))
    out = []
    for path, var in flat.items():
        key = ".".join(map(str, path))
        if key in edits:
            var = var.replace(edits[key](var.get_value()))
        out.append((path, var))
    return nnx.from_flat_state(out)


def _case(name, tmp_path_factory):
    cfg = CONFIGS[name]
    off = official_weights(cfg, seed=7)
    nemo = nemo_model(cfg, off)
    _, model = convert_official(off, cfg, tmp_path_factory.mktemp(f"nemo_target_{name}"))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, S))
    with torch.no_grad():
        ref = nemo(torch.as_tensor(tokens)).logits.float().numpy()
    return cfg, model, tokens, ref


@pytest.mark.parametrize("name", [n if n in DEFAULT else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(CONFIGS)])
def test_target_logits_match_nemo(name, tmp_path_factory):
    cfg, model, tokens, ref = _case(name, tmp_path_factory)
    state, logits = _logits_fn(model)
    err = _rel(logits(state, tokens), ref)
    # negative controls: a routed-expert gate/up swap (w1 <-> w3) and the mHC parameters of the attention and
    # FFN sites exchanged in one layer -- mapping errors a name table can make and a shape check cannot see
    flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}
    w1 = [k for k in flat if k.endswith("ffn.experts.w1")][0]
    w3 = w1[:-2] + "w3"
    swapped_experts = _edited(state, {w1: lambda _: flat[w3], w3: lambda _: flat[w1]})
    hc_a = [k for k in flat if k.endswith("hc_attn.base")][0]
    hc_f = hc_a.replace("hc_attn", "hc_ffn")
    swapped_hc = _edited(state, {hc_a: lambda _: flat[hc_f], hc_f: lambda _: flat[hc_a]})
    neg = {"experts w1<->w3": _rel(logits(swapped_experts, tokens), ref),
           "hc_attn<->hc_ffn base": _rel(logits(swapped_hc, tokens), ref)}
    print(f"\ntarget[{name}] vs NeMo: max rel err {err:.2e}; negative controls "
          + ", ".join(f"{k} {v:.2e}" for k, v in neg.items()))
    assert err <= TOL, err
    assert all(v > FAIL for v in neg.values()), neg


@pytest.mark.slow
def test_top1_routing_references_disagree_and_deepseek_normalises(tmp_path_factory):
    """With one routed expert per token: transformers and hdflash_jax follow DeepSeek's Gate (the weight is
    normalised, w = route_scale); NeMo returns route_scale · score. Patching NeMo's Gate to normalise (the one
    rule) makes it agree with us again, so this is the whole disagreement."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    from nemo_automodel.components.moe import layers as nemo_moe
    from test_convert import load_official_into_hf

    cfg = CONFIGS["tiny"].replace(n_activated_experts=1, n_layers=3, compress_ratios=(0, 4, 8), n_hash_layers=1)
    off = official_weights(cfg, seed=3)
    _, model = convert_official(off, cfg, tmp_path_factory.mktemp("nemo_top1"))
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (B, S))
    state, logits = _logits_fn(model)
    ours = logits(state, tokens)
    hf = DeepseekV4ForCausalLM(DeepseekV4Config(**cfg.to_hf_dict())).eval().to(torch.float32)
    load_official_into_hf(hf, off)
    nemo = nemo_model(cfg, off)
    with torch.no_grad():
        tr = hf(torch.as_tensor(tokens)).logits.float().numpy()
        ne = nemo(torch.as_tensor(tokens)).logits.float().numpy()
    route = nemo_moe.Gate._route_scores

    def normalised(self, scores):  # the official rule, whatever top-k is
        w, idx, orig = route(self, scores)
        return w / (w.sum(-1, keepdim=True) / self.route_scale), idx, orig

    nemo_moe.Gate._route_scores = normalised
    try:
        with torch.no_grad():
            ne_fixed = nemo(torch.as_tensor(tokens)).logits.float().numpy()
    finally:
        nemo_moe.Gate._route_scores = route
    errs = {"ours-transformers": _rel(ours, tr), "ours-NeMo": _rel(ours, ne), "ours-NeMo(normalised)":
            _rel(ours, ne_fixed)}
    print("\ntop-1 routing: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert errs["ours-transformers"] <= TOL and errs["ours-NeMo(normalised)"] <= TOL
    assert errs["ours-NeMo"] > FAIL


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_nemo_and_transformers_agree(name, tmp_path_factory):
    """The two references against each other on the same official weights (the table's reference row)."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    from test_convert import load_official_into_hf

    cfg = CONFIGS[name]
    off = official_weights(cfg, seed=7)
    hf = DeepseekV4ForCausalLM(DeepseekV4Config(**cfg.to_hf_dict())).eval().to(torch.float32)
    load_official_into_hf(hf, off)
    nemo = nemo_model(cfg, off)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, S))
    with torch.no_grad():
        err = _rel(hf(torch.as_tensor(tokens)).logits.float().numpy(),
                   nemo(torch.as_tensor(tokens)).logits.float().numpy())
    print(f"\n{name}: transformers vs NeMo max rel err {err:.2e}")
    assert err <= TOL, err
