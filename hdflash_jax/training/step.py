"""The drafter training step, pure: `(state, target_params, batch) -> (state, metrics)` for each trainable family.

* Only the drafter's `nnx.Param`s train (its layers, final norm and the reducer — for HyperDFlash the gate
  inherited from the target's hc_head). The target's embedding and LM head are read from the target, frozen.
* The target runs inside the step (online features): `forward_full` over the padded sequences, then the
  features and the teacher of the KL slots, under `stop_gradient` and outside `value_and_grad`, so nothing is
  differentiated through the target. A batch that carries `features` (and `teacher_hidden`) skips it (offline
  features, `hdflash_jax.training.features`): the same function, whose `target_params` then need hold only the
  embedding and the LM head (`drafter.model.target_io_tree`).
* The drafter computes in its config's dtypes from the master params in the state; gradients and Adam run on the
  master copy (`master_params`).

`train.trainer.Trainer` jits these with the mesh's shardings; the AOT planner compiles the same functions.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hdflash_jax.deepseek_v4.model import forward_full
from hdflash_jax.drafter.model import block_token_ids, target_io_arrays
from hdflash_jax.drafter.reducer import features_from_target, target_return_layers
from hdflash_jax.drafter.training import TrainAttention, train_hidden
from hdflash_jax.training.dflash2_loss import selector_loss
from hdflash_jax.training.dspark_loss import dspark_batch_loss, dspark_offline_inputs, dspark_target_inputs
from hdflash_jax.training.features import teacher_hidden_at_slots  # noqa: F401 — also this module's interface
from hdflash_jax.training.losses import loss_function
from hdflash_jax.training.pure import PureModule


class StepParts(NamedTuple):
    """Everything the pure step needs besides its arguments (static: closed over by the jitted function)."""
    tpure: PureModule  # the frozen target (all its variables)
    dpure: PureModule  # the drafter (its Params); the train state holds them as `master_dtype`
    dcfg: Any  # the family's config
    lcfg: Any  # the family's loss config, resolved (`DrafterFamily.loss_for`)
    tx: optax.GradientTransformation
    schedule: Any
    attention: TrainAttention


def master_params(values, master_dtype: str):
    """The optimizer's copy of the drafter's floating-point params, in `master_dtype` (a no-op when equal)."""
    dt = jnp.dtype(master_dtype)

    def one(x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dt:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dt, sharding=x.sharding)
        return x.astype(dt)
    return jax.tree.map(one, values)


def block_train_step(parts: StepParts, state, target_params, batch, *, selector: bool = False):
    """One step of a block drafter (HyperDFlash / DFlash: `DrafterConfig`, `LossConfig`); with `selector`, DFlash
    2's (`DFlash2Config`, `DFlash2LossConfig`): the selector's objective added (`training.dflash2_loss`)."""
    dcfg, lcfg = parts.dcfg, parts.lcfg
    tokens, loss_mask = batch["tokens"], batch["loss_mask"]
    anchors, keep = batch["anchors"], batch["keep"]
    if "features" in batch:  # offline: the target's features and KL-slot hidden states, read from disk
        feats, teacher = batch["features"], batch.get("teacher_hidden")
    else:
        # the frozen target: a plain forward, outside value_and_grad and under stop_gradient (its full-vocabulary
        # logits are unused and so never computed)
        target = parts.tpure.merge(target_params)
        out = forward_full(target, tokens, return_layers=target_return_layers(dcfg))
        feats = jax.lax.stop_gradient(features_from_target(dcfg, out))
        teacher = None
        if lcfg.uses_teacher:
            teacher = jax.lax.stop_gradient(teacher_hidden_at_slots(target, out.streams, anchors, lcfg.kl_slots))
    embed, head = (jax.lax.stop_gradient(x) for x in target_io_arrays(target_params))
    block_tokens = block_token_ids(jnp.take_along_axis(tokens, anchors, axis=1), dcfg.block_size,
                                   dcfg.mask_token_id)
    loss_of = loss_function(lcfg)

    def loss_fn(params):
        drafter = parts.dpure.merge(parts.dpure.in_own_dtypes(params))
        hidden = train_hidden(drafter, embed, feats, anchors, block_tokens, keep, parts.attention)
        loss, metrics = loss_of(hidden, head, tokens, loss_mask, anchors, keep, lcfg, teacher)
        if selector:
            sel, sel_metrics = selector_loss(drafter.selector, hidden, head, tokens, loss_mask, anchors, keep, lcfg,
                                             dcfg.selector_top_k)
            loss = loss + lcfg.selector_alpha * sel
            metrics = {**metrics, **sel_metrics, "loss": loss}
        return loss, metrics

    return apply_gradients(parts, state, loss_fn)


def dspark_train_step(parts: StepParts, state, target_params, batch):
    """One step of a DSpark drafter (`DSparkConfig`, `DSparkLossConfig`): the frozen target's tapped streams and
    the teacher's hidden states at each block's positions (outside value_and_grad, or read from disk: a batch with
    `features`), DeepSpec's loss on the batch's anchors."""
    if "features" in batch:
        inputs = dspark_offline_inputs(batch, *target_io_arrays(target_params))
    else:
        inputs = dspark_target_inputs(parts.tpure.merge(target_params), batch["tokens"], batch["anchors"],
                                      parts.dcfg.target_layer_ids, parts.dcfg.block_size)

    def loss_fn(params):
        drafter = parts.dpure.merge(parts.dpure.in_own_dtypes(params))
        return dspark_batch_loss(drafter, inputs, batch, parts.lcfg)

    return apply_gradients(parts, state, loss_fn)


def apply_gradients(parts: StepParts, state, loss_fn):
    """value_and_grad of `loss_fn(master params) -> (loss, metrics)`, then one optimizer update of the state."""
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = parts.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    key = jax.random.wrap_key_data(state["rng"])
    key, _ = jax.random.split(key)  # the carried RNG (nothing in the step samples yet: no dropout)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=parts.schedule(state["step"]))
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                 "rng": jax.random.key_data(key)}
    return new_state, metrics
