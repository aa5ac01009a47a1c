"""DeepSeek-V4's native MTP block against NVIDIA NeMo Automodel's `deepseek_v4/mtp.py`, one step and chained.

NeMo's MTP module is DeepSeek's `MTPBlock` (e = e_proj(enorm(emb(t_{i+1}))) broadcast over the streams;
x = h_proj(hnorm(H_i)) per stream; one mHC block with sliding-window attention and a bias-routed MoE; its own
hc_head and `norm`, the shared head). Depth d takes depth d-1's output streams and the token d+1 ahead; NeMo's
forward chains depths by rolling the token ids left, so a NeMo model whose depths all hold `mtp.0`'s weights is the
same module chained on its own streams, which is how hdflash_jax drafts k tokens. Both sides run the whole target
first (one set of official weights: ours through `convert/torch_to_flax.py`, NeMo through its adapter), fp32.

Negative controls, each a trap another port fell into, must be far off: the streams collapsed (hc_head) before
h_proj and repeated (SGLang's first V4 MTP), the trunk's final norm instead of `mtp.0.norm`, the next token one
position off, and step 2 chained on the target's streams instead of its own.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("nemo_automodel.components.models.deepseek_v4.mtp")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from hdflash_jax.config import get_preset  # noqa: E402
from hdflash_jax.deepseek_v4.cache import init_cache  # noqa: E402
from hdflash_jax.deepseek_v4.model import forward_full  # noqa: E402
from ref_nemo import convert_official, nemo_model, official_weights  # noqa: E402

# a hash-routed SWA layer and a bias-routed CSA layer feed the MTP layer (SWA, bias-routed); 20 positions > window 8
CFG = get_preset("tiny").replace(n_layers=2, compress_ratios=(0, 4, 0), n_hash_layers=1)
B, S, K = 2, 20, 3
TOL, FAIL = 1e-5, 1e-2


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def ours(model, tokens):
    """{name: logits} of the chain (steps 0..K-1) and of the negative controls.

    Every MTP call runs over the same S - 1 positions (tokens past the end padded with 0): the block is causal,
    so position i never sees the padding after it, and one compiled step serves every call."""
    cfg = model.cfg
    graph, state = nnx.split(model)
    t = S - 1

    @jax.jit
    def target(state, tokens):
        m = nnx.merge(graph, state)
        h = forward_full(m, tokens).streams
        return h, jnp.broadcast_to(m.collapse(h)[:, :, None, :], h.shape)

    @jax.jit
    def step(state, streams, ids):
        m = nnx.merge(graph, state)
        logits, out, _ = m.mtp_step(streams[:, :t], ids, init_cache(cfg, B, S, max_block=1))
        own = m.mtp[0].hc_head(out, norm_eps=cfg.norm_eps, hc_eps=cfg.hc_eps)
        return logits, out, m.head_logits(m.norm(own))  # the last: the trunk's norm instead of mtp.0.norm

    def ahead(d):  # ids[i] = token i + d + 1 (position i predicts i + d + 2)
        return jnp.asarray(np.pad(tokens[:, d + 1:], ((0, 0), (0, d)))[:, :t])

    with jax.default_matmul_precision("highest"):
        h, collapsed = target(state, jnp.asarray(tokens))
        out, streams = {}, h
        for d in range(K):
            out[f"step{d}"], streams, trunk_norm = step(state, streams, ahead(d))
            if d == 0:
                out["neg: trunk norm instead of mtp.0.norm"] = trunk_norm
        out["neg: streams collapsed before h_proj"] = step(state, collapsed, ahead(0))[0]
        out["neg: token i instead of i+1"] = step(state, h, jnp.asarray(tokens[:, :t]))[0]
        out["neg: step 2 on the target's streams"] = step(state, h, ahead(1))[0]
    return {k: np.asarray(v) for k, v in out.items()}


def reference(nemo, tokens):
    """NeMo's own chain: its backbone's pre-hc_head streams, then its MTP module (training-path call, as
    DeepseekV4ForCausalLM.forward makes it), each depth's prediction hidden through the shared head in fp32."""
    from nemo_automodel.components.models.deepseek_v4.layers import build_causal_padding_mask

    ids = torch.as_tensor(tokens)
    with torch.no_grad():
        _, hc = nemo.model(ids, return_hc_hidden=True)
        mask = build_causal_padding_mask(None, seq_len=S, dtype=hc.dtype, device=hc.device, batch_size=B,
                                         sliding_window=nemo.config.sliding_window)
        pos = torch.arange(S)[None].expand(B, S)
        per_depth = nemo.mtp(hidden_states=hc, position_ids=pos, attention_mask=mask, padding_mask=None,
                             input_ids=ids, embed_fn=nemo.model.embed_tokens)
        w = nemo.lm_head.weight.float()
        return [(h.float() @ w.T).numpy() for h in per_depth]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    off = official_weights(CFG, seed=5)
    assert not np.allclose(off["mtp.0.norm.weight"], off["norm.weight"])  # the norm control can fail
    chained = dict(off)  # NeMo's depths 1..K-1 hold the one MTP layer's weights: the same module, chained
    for d in range(1, K):
        chained.update({f"mtp.{d}." + k[len("mtp.0."):]: v for k, v in off.items() if k.startswith("mtp.0.")})
    nemo = nemo_model(CFG, chained, n_mtp=K)
    _, model = convert_official(off, CFG, tmp_path_factory.mktemp("nemo_mtp"))
    tokens = np.random.default_rng(2).integers(0, CFG.vocab_size, (B, S))
    return ours(model, tokens), reference(nemo, tokens)


def test_mtp_one_step_and_chain_match_nemo(case):
    got, ref = case
    valid = lambda d: slice(0, S - 1 - d)  # noqa: E731  (depth d predicts up to the last token)
    errs = {f"step {d + 1}": _rel(got[f"step{d}"][:, valid(d)], ref[d][:, valid(d)]) for d in range(K)}
    neg = {k[5:]: _rel(v[:, valid(d)], ref[d][:, valid(d)]) for k, v in got.items() if k.startswith("neg")
           for d in [1 if "step 2" in k else 0]}
    print("\nMTP vs NeMo, max rel err: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
          + "; negative controls: " + ", ".join(f"{k} {v:.2e}" for k, v in neg.items()))
    assert all(v <= TOL for v in errs.values()), errs
    assert all(v > FAIL for v in neg.values()), neg
