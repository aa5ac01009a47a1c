"""The drafter trainer's pieces: the frozen target, the drafter, the optimizer, shardings and the jitted step.

* Only the drafter's `nnx.Param`s train (its layers, final norm and the reducer — for HyperDFlash the gate
  inherited from the target's hc_head). The target's embedding and LM head are read from the target, frozen.
* The step is one pure jitted function `(state, target_params, batch) -> (state, metrics)` with in/out shardings
  from the mesh: the drafter's params, the optimizer moments and the frozen target's params are sharded by the
  logical-axis rules of `hdflash_jax.sharding`, the batch over the data axes (`data`, `fsdp`), metrics
  replicated. The state is donated.
* The target runs inside the step (online features): `forward_full` over the padded sequences, then
  `features_from_target` and the teacher logits of the KL slots, under `stop_gradient` and outside
  `value_and_grad`, so nothing is differentiated through the target (no feature cache on disk, whose size grows
  with K and S).
* Every process reads only its rows of each global batch and builds the global arrays with
  `jax.make_array_from_callback`; the global batch is the same whatever the number of processes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from hdflash_jax.checkpoint import load_params
from hdflash_jax.config import DrafterConfig, get_drafter_preset, get_preset
from hdflash_jax.deepseek_v4.model import forward_full, init_target
from hdflash_jax.decode.drafters import drafter_adapter
from hdflash_jax.drafter.model import block_token_ids, init_drafter, init_drafter_from_target, target_io
from hdflash_jax.drafter.training import TrainAttention, train_hidden
from hdflash_jax.drafter.reducer import features_from_target, target_return_layers
from hdflash_jax.dspark.config import DSparkConfig
from hdflash_jax.dspark.model import init_dspark, init_dspark_from_target
from hdflash_jax.sharding import batch_sharding, make_mesh, parse_mesh
from hdflash_jax.tokenizer import load_tokenizer
from train import data as D
from train.distributed import host_tree, log, place, process_rows
from train.dspark_loss import dspark_batch_loss, dspark_target_inputs
from train.drafter_config import DrafterRunConfig, TargetSection
from train.losses import LossConfig, loss_function
from train.metrics import DraftShape, drafter_step_flops
from train.optim import make_optimizer
from train.pure import PureModule

BATCH_KEYS = ("tokens", "loss_mask", "anchors", "keep")


class StepParts(NamedTuple):
    """Everything the pure step needs besides its arguments (static: closed over by the jitted function)."""
    tpure: PureModule  # the frozen target (all its variables)
    dpure: PureModule  # the drafter (its Params); the train state holds them as `master_dtype`
    dcfg: DrafterConfig
    lcfg: LossConfig
    tx: optax.GradientTransformation
    schedule: Any
    attention: TrainAttention


def train_options(cfg: DrafterRunConfig, block_size: int) -> tuple[LossConfig, TrainAttention]:
    lc, tc = cfg.loss, cfg.train
    loss = LossConfig(block_size=block_size, gamma=lc.gamma, kl_alpha=lc.kl_alpha, kl_slots=lc.kl_slots,
                      kl_temperature=lc.kl_temperature, vocab_chunk=lc.vocab_chunk, kind=lc.kind)
    attention = TrainAttention(impl=tc.attention, q_blocks=tc.attention_q_blocks, k_chunk=tc.attention_k_chunk,
                               remat=tc.remat)
    attention.check()
    loss_function(loss)
    return loss, attention


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


def teacher_hidden_at_slots(target, streams, anchors, kl_slots: int):
    """The target's normed hidden [b, N, P, D] at positions a_n + j − 1, j = 1..P (their head rows are the teacher
    logits of slots 1..P): the streams are gathered first, so hc_head, the norm and the head never run over S."""
    b, n = anchors.shape
    pos = jnp.clip(anchors[:, :, None] + jnp.arange(kl_slots, dtype=jnp.int32), 0, streams.shape[1] - 1)
    picked = jnp.take_along_axis(streams, pos.reshape(b, n * kl_slots)[:, :, None, None], axis=1)
    hidden = target.norm(target.collapse(picked))
    return hidden.reshape(b, n, kl_slots, -1)


def _active_params(tcfg, target) -> int:
    from flax import nnx

    from eval.mesh_plan import active_params

    return active_params(tcfg, nnx.state(target, nnx.Param))


def drafter_train_step(parts: StepParts, state, target_params, batch):
    """One optimizer step, pure: (state, target_params, batch) -> (state, metrics). The drafter computes in its
    config's dtypes from the master params in the state; gradients and Adam run on the master copy."""
    dcfg, lcfg = parts.dcfg, parts.lcfg
    tokens, loss_mask = batch["tokens"], batch["loss_mask"]
    anchors, keep = batch["anchors"], batch["keep"]
    # the frozen target: a plain forward, outside value_and_grad and under stop_gradient (its full-vocabulary
    # logits are unused and so never computed)
    target = parts.tpure.merge(target_params)
    if "features" in batch:  # precomputed: the target's features and KL-slot hidden states (offline features)
        feats, teacher = batch["features"], batch.get("teacher_hidden")
    else:
        out = forward_full(target, tokens, return_layers=target_return_layers(dcfg))
        feats = jax.lax.stop_gradient(features_from_target(dcfg, out))
        teacher = None
        if lcfg.uses_teacher:
            teacher = jax.lax.stop_gradient(teacher_hidden_at_slots(target, out.streams, anchors, lcfg.kl_slots))
    embed, head = (jax.lax.stop_gradient(x) for x in target_io(target))
    block_tokens = block_token_ids(jnp.take_along_axis(tokens, anchors, axis=1), dcfg.block_size,
                                   dcfg.mask_token_id)
    loss_of = loss_function(lcfg)

    def loss_fn(params):
        drafter = parts.dpure.merge(parts.dpure.in_own_dtypes(params))
        hidden = train_hidden(drafter, embed, feats, anchors, block_tokens, keep, parts.attention)
        return loss_of(hidden, head, tokens, loss_mask, anchors, keep, lcfg, teacher)

    return apply_gradients(parts, state, loss_fn)


def dspark_train_step(parts: StepParts, state, target_params, batch):
    """`drafter_train_step` for a DSpark drafter (`parts.dcfg` a DSparkConfig, `parts.lcfg` a DSparkLossConfig):
    the frozen target's tapped streams and logits outside value_and_grad, DeepSpec's loss on the batch's anchors."""
    target = parts.tpure.merge(target_params)
    inputs = dspark_target_inputs(target, batch["tokens"], parts.dcfg.target_layer_ids)

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


def build_target(section: TargetSection, mesh=None):
    """(TargetConfig, DeepseekV4). A checkpoint is read straight into the mesh's shardings; a preset is built on
    the host (random weights from its seed, optionally a sharpened head) and placed by the caller."""
    if section.checkpoint:
        return load_params(section.checkpoint, mesh=mesh, cfg_overrides=section.overrides or None)
    cfg = get_preset(section.preset, **section.overrides)
    model = init_target(cfg, section.seed)
    if section.head_scale != 1.0:
        model.head.weight[...] = model.head.weight[...] * section.head_scale
    return cfg, model


def build_drafter_config(cfg: DrafterRunConfig, tcfg, tokenizer=None) -> DrafterConfig | DSparkConfig:
    over = dict(cfg.drafter.overrides)
    if cfg.train.block_size:
        over["block_size"] = cfg.train.block_size
    if cfg.drafter.kind == "dspark":
        mask = getattr(tokenizer, "mask_id", None)
        dcfg = DSparkConfig.for_target(tcfg, mask, **over)
        dcfg.check_target(tcfg, where="drafter config")
        return dcfg
    if cfg.drafter.preset:
        dcfg = get_drafter_preset(cfg.drafter.preset, **over)
    else:
        dcfg = DrafterConfig.for_target(tcfg, **over)
    dcfg.check_target(tcfg, where="drafter config")
    if tokenizer is not None and getattr(tokenizer, "mask_id", dcfg.mask_token_id) != dcfg.mask_token_id:
        log(f"note: tokenizer mask_id {tokenizer.mask_id} != drafter mask_token_id {dcfg.mask_token_id}; "
            f"the drafter's is used")
    return dcfg


def mesh_of(cfg: DrafterRunConfig):
    spec = cfg.mesh
    shape = parse_mesh(spec) if isinstance(spec, str) else (dict(spec) if spec else {"data": jax.device_count()})
    return make_mesh(shape)


class Trainer:
    """Everything but the loop. `Trainer(cfg, mesh)`; `setup_optimizer(total_steps)`; `state = init_state()`;
    `state, metrics = train_step(state, target_params, local_batch)` with `target_params = place_target()`."""

    def __init__(self, cfg: DrafterRunConfig, mesh=None, *, target=None, tokenizer=None):
        self.cfg = cfg
        self.mesh = mesh = mesh if mesh is not None else mesh_of(cfg)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.data.tokenizer)
        if target is None:
            self.tcfg, target = build_target(cfg.target, mesh)
        else:
            self.tcfg = target.cfg
        if self.tokenizer.vocab_size > self.tcfg.vocab_size:
            raise ValueError(f"tokenizer vocab {self.tokenizer.vocab_size} exceeds the target's "
                             f"{self.tcfg.vocab_size}")
        self.dcfg = build_drafter_config(cfg, self.tcfg, self.tokenizer)
        self.is_dspark = isinstance(self.dcfg, DSparkConfig)
        self.block_size = self.dcfg.block_size
        self.loss_cfg, self.attention = train_options(cfg, self.block_size)
        self.seed = cfg.seed
        inherit = cfg.drafter.init_from_target
        if self.is_dspark:
            self.loss_cfg = cfg.dspark_loss
            drafter = (init_dspark_from_target(target, self.dcfg, self.seed) if inherit
                       else init_dspark(self.dcfg, self.tcfg, self.seed))
        else:
            drafter = (init_drafter_from_target(target, self.dcfg, self.seed) if inherit
                       else init_drafter(self.dcfg, self.seed))
        self.n_target_active = _active_params(self.tcfg, target)
        self.tpure = PureModule(target)
        self.dpure = PureModule(drafter, params_only=True)
        del target, drafter
        self.target_shardings = self.tpure.shardings(mesh)
        self.param_shardings = self.dpure.shardings(mesh)
        self._target_values = self.tpure.tree()
        self._param_values = master_params(self.dpure.tree(), cfg.train.master_dtype)
        self.n_params = int(sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(self._param_values)))
        self.replicated = NamedSharding(mesh, P())
        self.global_batch = cfg.train.global_batch
        self.rows = process_rows(mesh, self.global_batch)
        self.batch_shardings = {k: batch_sharding(mesh, 2) for k in BATCH_KEYS}
        self.total_steps = None
        self.tx = self.schedule = None
        self._step_fn = None

    # -- optimizer / state ----------------------------------------------------------------------------------------
    def setup_optimizer(self, total_steps: int) -> None:
        self.total_steps = int(total_steps)
        self.tx, self.schedule, _ = make_optimizer(self.cfg.optim, self.total_steps, self._param_values)
        self.parts = StepParts(self.tpure, self.dpure, self.dcfg, self.loss_cfg, self.tx, self.schedule,
                               self.attention)
        abstract_opt = jax.eval_shape(self.tx.init, self._param_values)
        opt_sh = optax.tree_map_params(self.tx, lambda _, s: s, abstract_opt, self.param_shardings,
                                       transform_non_params=lambda _: self.replicated)
        self.state_shardings = {"params": self.param_shardings, "opt_state": opt_sh, "step": self.replicated,
                                "rng": self.replicated}
        self._step_fn = None

    def step_flops(self) -> float:
        """Model FLOPs of one step (`train.metrics.drafter_step_flops`; a DSpark block counts as a draft layer of
        the target's attention shape)."""
        shape = self.dcfg
        if self.is_dspark:
            shape = DraftShape(self.dcfg.num_blocks, self.tcfg.n_heads, self.tcfg.head_dim, self.block_size)
        return drafter_step_flops(self.n_target_active, self.n_params, shape, self.global_batch,
                                  self.cfg.data.max_len, self.cfg.data.num_anchors)

    def drafter_adapter(self, temperature: float = 0.0):
        """The decoder's `Drafter` for this drafter at its training block (`decode.drafters.drafter_adapter`)."""
        return drafter_adapter(self.dcfg, temperature=temperature)

    def init_state(self) -> dict:
        """The initial train state, placed: params (the drafter's initial Params), optimizer state, step 0, RNG."""
        if self.tx is None:
            raise RuntimeError("Trainer.setup_optimizer(total_steps) first")
        params = place(self._param_values, self.param_shardings)
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])(params)
        rng = np.asarray(jax.random.key_data(jax.random.key(self.seed + 1)))
        return {"params": params, "opt_state": opt_state,
                "step": place(np.zeros((), np.int32), self.replicated),
                "rng": place(rng, self.replicated)}

    def abstract_state(self) -> dict:
        """ShapeDtypeStructs with shardings (the restore target of a checkpoint)."""
        params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), self._param_values)
        shapes = {"params": params, "opt_state": jax.eval_shape(self.tx.init, params),
                  "step": jax.ShapeDtypeStruct((), np.int32), "rng": jax.ShapeDtypeStruct((2,), np.uint32)}
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                            self.state_shardings)

    def place_target(self):
        """The frozen target's params on the mesh (by the logical-axis rules)."""
        return place(self._target_values, self.target_shardings)

    # -- the step ---------------------------------------------------------------------------------------------
    def _step(self, state, target_params, batch):
        step = dspark_train_step if self.is_dspark else drafter_train_step
        # traced under the mesh's axes: without them the activation constraints (`sharding.constrain_tokens`, the
        # drafter's grouped attention) are no-ops and every expert shard computes a full copy of its rows
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
            return step(self.parts, state, target_params, batch)

    @property
    def step_fn(self):
        """The jitted step: (state, target_params, global batch) -> (state, metrics); state donated."""
        if self._step_fn is None:
            if self.tx is None:
                raise RuntimeError("Trainer.setup_optimizer(total_steps) first")
            self._step_fn = jax.jit(
                self._step,
                in_shardings=(self.state_shardings, self.target_shardings, self.batch_shardings),
                out_shardings=(self.state_shardings, self.replicated),
                donate_argnums=(0,))
        return self._step_fn

    def global_batch_arrays(self, local: dict) -> dict:
        """This process's rows (numpy) → global arrays sharded over the data axes."""
        pos = {r: i for i, r in enumerate(self.rows)}  # global row → row of the local batch
        out = {}
        for k in BATCH_KEYS:
            x = np.asarray(local[k])
            x = x.astype(bool) if k in ("loss_mask", "keep") else x.astype(np.int32)
            if x.shape[0] != len(self.rows):
                raise ValueError(f"batch[{k!r}] has {x.shape[0]} rows, this process holds {len(self.rows)}")

            def shard(index, x=x):
                rows = range(*index[0].indices(self.global_batch))
                return x[[pos[r] for r in rows]][(slice(None),) + tuple(index[1:])]

            out[k] = jax.make_array_from_callback((self.global_batch,) + x.shape[1:], self.batch_shardings[k], shard)
        return out

    def train_step(self, state, target_params, local_batch):
        return self.step_fn(state, target_params, self.global_batch_arrays(local_batch))

    # -- data ------------------------------------------------------------------------------------------------------
    def dataset(self):
        """(source, grain MapDataset of this process's batches, total steps)."""
        dc, tc = self.cfg.data, self.cfg.train
        if not dc.train:
            raise ValueError("data.train: required (a JSONL file)")
        source = D.JsonlSource(dc.train)
        D.records_check(source, self.tokenizer, dc.max_len)
        total = tc.steps if tc.steps else tc.epochs * D.batches_per_epoch(len(source), self.global_batch)
        batches = D.make_batches(source, self.tokenizer, max_len=dc.max_len, num_anchors=dc.num_anchors,
                                 global_batch=self.global_batch, num_batches=total, seed=dc.shuffle_seed,
                                 rows=self.rows)
        return source, batches, total

    # -- host copies (eval, export) ---------------------------------------------------------------------------------
    def drafter_module(self, params):
        """A `BlockDrafter` holding `params` (host copies when multi-process)."""
        if jax.process_count() > 1:
            params = host_tree(params)
        return self.dpure.merge(self.dpure.in_own_dtypes(params))
