"""Helpers for parity tests against Red Hat's speculators (the DFlash / DSpark checkpoint format vLLM loads).

speculators' `DFlashDraftModel` (and `DSparkDraftModel`, the same backbone plus a Markov and a confidence head) is a
stack of Qwen3 decoder layers with KV injection, trained on N anchored blocks per sequence in one pass
(`_backbone_forward`). Weights reach it from a project drafter through the block family's z-lab export
(`family("block").export("zlab", ...)`; z-lab's
names are speculators' names; the exporter permutes q/k rows from our interleaved RoPE to rotate_half). On CPU:
eager attention with a dense float mask (`_attn_implementation="eager"`; flex attention is the GPU default), no
torch.compile (speculators compiles only when CUDA is present). Anchors are random in speculators; the tests fix
them by replacing `select_anchors` for the duration of a call.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch


def speculators_config(folder: Path, cls_name: str = "dflash", **fields):
    """A DFlash/DSpark speculators config for the z-lab-format export in `folder` (its config.json is a
    Qwen3Config with `dflash_config`)."""
    from transformers import Qwen3Config

    from speculators.config import SpeculatorsConfig, VerifierConfig
    from speculators.models.dflash import DFlashSpeculatorConfig
    from speculators.models.dspark import DSparkSpeculatorConfig
    from speculators.proposals.greedy import GreedyTokenProposalConfig

    raw = json.loads((folder / "config.json").read_text())
    dflash = raw.pop("dflash_config")
    tl = Qwen3Config.from_json_file(str(folder / "config.json"))
    tl._attn_implementation = "eager"
    sample_from_anchor = fields.pop("sample_from_anchor", cls_name == "dspark")
    bs = dflash["block_size"]
    spec = SpeculatorsConfig(
        algorithm=cls_name, default_proposal_method="greedy",
        proposal_methods=[GreedyTokenProposalConfig(speculative_tokens=bs if sample_from_anchor else bs - 1)],
        verifier=VerifierConfig(name_or_path=None, architectures=[]))
    kw = dict(transformer_layer_config=tl, draft_vocab_size=tl.vocab_size, block_size=bs,
              aux_hidden_state_layer_ids=dflash["target_layer_ids"], mask_token_id=dflash["mask_token_id"],
              sample_from_anchor=sample_from_anchor, speculators_config=spec, **fields)
    return (DSparkSpeculatorConfig if cls_name == "dspark" else DFlashSpeculatorConfig)(**kw)


def speculators_model(folder: Path, embed: np.ndarray, head: np.ndarray, verifier_norm: np.ndarray,
                      cls_name: str = "dflash", extra: dict | None = None, **fields):
    """speculators' DFlashDraftModel / DSparkDraftModel holding the exported weights. Every tensor of the export
    must be taken, and the only ones left for the verifier are the frozen embedding / heads / verifier norm
    (which a real checkpoint leaves out too); `extra` sets further tensors (the DSpark heads)."""
    from safetensors.torch import load_file

    from speculators.models.dflash import DFlashDraftModel
    from speculators.models.dspark import DSparkDraftModel

    cfg = speculators_config(folder, cls_name, **fields)
    model = (DSparkDraftModel if cls_name == "dspark" else DFlashDraftModel)(cfg).eval().to(torch.float32)
    sd = load_file(str(folder / "model.safetensors"))
    sd.update({k: torch.as_tensor(v) for k, v in (extra or {}).items()})
    return load_weights(model, sd, embed, head, verifier_norm)


def load_weights(model, state_dict: dict, embed, head, verifier_norm):
    """`model` (a speculators draft model in fp32) holding `state_dict`, which must fill every tensor but the
    verifier's own (embedding, heads, verifier norm: a real checkpoint leaves them out too), and those set."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    verifier_owned = {"embed_tokens.weight", "lm_head.weight", "verifier_lm_head.weight", "verifier_norm.weight"}
    assert not unexpected and set(missing) == verifier_owned, (missing, unexpected)
    with torch.no_grad():
        model.embed_tokens.weight.copy_(torch.as_tensor(embed))
        model.lm_head.weight.copy_(torch.as_tensor(head))
        model.verifier_lm_head.weight.copy_(torch.as_tensor(head))
        model.verifier_norm.weight.copy_(torch.as_tensor(verifier_norm))
    return model


@contextlib.contextmanager
def fixed_anchors(module, anchors: np.ndarray):
    """Make `module.select_anchors` (speculators.models.dflash.core's) return these anchors, all valid."""
    orig = module.select_anchors

    def pick(loss_mask, num_anchors, block_size):
        a = torch.as_tensor(anchors, dtype=torch.long)
        assert a.numel() == num_anchors
        return a, torch.ones(num_anchors, dtype=torch.bool)

    module.select_anchors = pick
    try:
        yield
    finally:
        module.select_anchors = orig
