"""Helpers for parity tests against transformers' DeepseekV4ForCausalLM (something this project did not write)."""

from __future__ import annotations

import numpy as np
import torch

from hdflash_jax.config import TargetConfig
from hdflash_jax.keymap import assemble_tree, hf_memory_state_to_official, load_into


def make_hf_model(cfg: TargetConfig, seed: int = 0):
    """A transformers model with every parameter random (including those transformers initialises to 0/1)."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    hf_cfg = DeepseekV4Config(**cfg.to_hf_dict())
    model = DeepseekV4ForCausalLM(hf_cfg).eval().to(torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("sinks", "position_bias", ".base", "hc_base")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif name.endswith((".scale", "hc_scale")):
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.2)
            elif "norm" in name:
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
            elif name.endswith("tid2eid"):  # distinct experts per row: a hash table with repeated experts hides a wrong gather
                rows = torch.stack([torch.randperm(cfg.n_routed_experts, generator=gen)[: cfg.n_activated_experts]
                                    for _ in range(b.shape[0])])
                b.copy_(rows)
    return model


def hf_state_numpy(model) -> dict[str, np.ndarray]:
    keep = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()
                                                      if n.endswith(("e_score_correction_bias", "tid2eid"))}
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items() if k in keep}


def load_hf_into(model_jax, hf_model) -> None:
    """Copy transformers weights into a Flax DeepseekV4 through the shared name map."""
    from flax import nnx

    official = hf_memory_state_to_official(hf_state_numpy(hf_model))
    tree = assemble_tree(official, nnx.state(model_jax), allow_unused=False, source="transformers state dict")
    load_into(model_jax, tree)


def hf_logits(hf_model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.as_tensor(tokens)).logits.float().numpy()
