"""The drafter trainer's pieces: the frozen target, the drafter, the optimizer, shardings and the jitted step.

What a drafter is, how it starts and what one step computes belong to its family (`hdflash_jax.families`: config,
init, loss, the pure step of `hdflash_jax.training.step`); this module places them on a mesh and jits them:

* The step is one pure jitted function `(state, target_params, batch) -> (state, metrics)` with in/out shardings
  from the mesh: the drafter's params, the optimizer moments and the frozen target's params are sharded by the
  logical-axis rules of `hdflash_jax.sharding`, the batch over the data axes (`data`, `fsdp`), metrics
  replicated. The state is donated.
* Every process reads only its rows of each global batch and builds the global arrays with
  `jax.make_array_from_callback`; the global batch is the same whatever the number of processes.
* With offline features (`features.mode: offline`) the target's layers are never built: only the arrays the step
  and the drafter's init read (`TARGET_HEAD_KEYS`) come from the checkpoint, the step's target params are its
  embedding and head (`target_io_tree`), and each batch carries `features` and `teacher_hidden` read from
  `features.dir` (`hdflash_jax.training.features`).
"""

from __future__ import annotations

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hdflash_jax.checkpoint import load_config as read_target_config
from hdflash_jax.checkpoint import load_params
from hdflash_jax.config import get_preset
from hdflash_jax.deepseek_v4.model import init_target
from hdflash_jax.deepseek_v4.scan import stacks_as_words
from hdflash_jax.distributed import host_tree, place, process_rows
from hdflash_jax.drafter.model import target_io_tree
from hdflash_jax.families import family
from hdflash_jax.params import active_params
from hdflash_jax.sharding import batch_sharding, mesh_from_spec
from hdflash_jax.tokenizer import load_tokenizer
from hdflash_jax.train_config import DrafterRunConfig, TargetSection
from hdflash_jax.training.features import FeatureReader, Layout, feature_source, offline_batch_spec
from hdflash_jax.training.flops import drafter_step_flops
from hdflash_jax.training.optim import make_optimizer
from hdflash_jax.training.pure import PureModule
from hdflash_jax.training.step import StepParts, master_params
from train import data as D

BATCH_KEYS = ("tokens", "loss_mask", "anchors", "keep")
# what an offline run reads of the target: the step's embedding and head, and what a drafter inherits (its gate
# from hc_head, its final norm)
TARGET_HEAD_KEYS = ("embed", "head.weight", "norm.weight", "hc_head.fn", "hc_head.base", "hc_head.scale")


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


def target_config(section: TargetSection):
    """The target's TargetConfig alone (a checkpoint's config.json, or the preset), nothing read or built."""
    if section.checkpoint:
        cfg = read_target_config(section.checkpoint)
        return cfg.replace(**section.overrides) if section.overrides else cfg
    return get_preset(section.preset, **section.overrides)


def build_target_io(section: TargetSection, mesh=None):
    """(TargetConfig, DeepseekV4 whose only arrays are `TARGET_HEAD_KEYS`; its layers are shapes, never read or
    allocated). A checkpoint is read for those keys alone; a preset (toy sizes: random weights from its seed) is
    built whole on the host, then all but those keys dropped."""
    if section.checkpoint:
        return load_params(section.checkpoint, mesh=mesh, cfg_overrides=section.overrides or None,
                           only=TARGET_HEAD_KEYS)
    cfg, model = build_target(section, mesh)
    graphdef, state = nnx.split(model)
    flat = list(nnx.to_flat_state(state))
    for path, var in flat:
        if ".".join(map(str, path)) not in TARGET_HEAD_KEYS:
            var.set_value(jax.ShapeDtypeStruct(var.shape, var.dtype))
    return cfg, nnx.merge(graphdef, nnx.from_flat_state(flat))


def drafter_for(cfg: DrafterRunConfig, tcfg, tokenizer):
    """(family, drafter config, loss config resolved against it) of a run config for its target."""
    fam = family(cfg.drafter.kind)
    dcfg = fam.config_for(tcfg, cfg.drafter, getattr(tokenizer, "mask_id", None))
    return fam, dcfg, fam.loss_for(cfg.drafter.loss, dcfg)


class Trainer:
    """Everything but the loop. `Trainer(cfg, mesh)`; `setup_optimizer(total_steps)`; `state = init_state()`;
    `state, metrics = train_step(state, target_params, local_batch)` with `target_params = place_target()`."""

    def __init__(self, cfg: DrafterRunConfig, mesh=None, *, target=None, tokenizer=None):
        self.cfg = cfg
        self.mesh = mesh = mesh if mesh is not None else mesh_from_spec(cfg.mesh)
        self.offline = cfg.features.mode == "offline"
        # opened first: a missing or corrupt features folder is refused before anything is built
        self.features = FeatureReader(cfg.features.dir) if self.offline else None
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.data.tokenizer)
        self.tcfg = target.cfg if target is not None else target_config(cfg.target)
        if self.tokenizer.vocab_size > self.tcfg.vocab_size:
            raise ValueError(f"tokenizer vocab {self.tokenizer.vocab_size} exceeds the target's "
                             f"{self.tcfg.vocab_size}")
        self.family, self.dcfg, self.loss_cfg = drafter_for(cfg, self.tcfg, self.tokenizer)
        self.block_size = self.dcfg.block_size
        self.layout = Layout.of(self.family, self.dcfg, self.loss_cfg, self.tcfg) if self.offline else None
        if self.offline:  # before the target is read: features of another target or corpus are refused first
            self.features.check(feature_source(cfg, self.family, self.dcfg), self.layout)
        if target is None:
            _, target = (build_target_io if self.offline else build_target)(cfg.target, mesh)
        self.attention = cfg.train.attention_options()
        self.seed = cfg.seed
        drafter = self.family.init(self.dcfg, target, self.seed, inherit=cfg.drafter.init_from_target)
        self.n_target_active = active_params(self.tcfg, nnx.state(target, nnx.Param))
        self.tpure = PureModule(target)
        self.dpure = PureModule(drafter, params_only=True)
        del target, drafter
        self.param_shardings = self.dpure.shardings(mesh)
        if self.offline:  # the step reads the target's embedding and head only
            self.target_shardings = target_io_tree(self.tpure.shardings(mesh))
            self._target_values = target_io_tree(self.tpure.tree())
        else:
            self.target_shardings = self.tpure.shardings(mesh)
            # the scanned stacks as 16-bit words (`scan.stacks_as_words`): the step's target forward then never
            # holds an fp32 copy of them on XLA:CPU
            self._target_values = stacks_as_words(self.tpure.tree())
        self._param_values = master_params(self.dpure.tree(), cfg.train.master_dtype)
        self.n_params = int(sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(self._param_values)))
        self.replicated = NamedSharding(mesh, P())
        self.global_batch = cfg.train.global_batch
        self.rows = process_rows(mesh, self.global_batch)
        self.batch_shardings = {k: batch_sharding(mesh, 2) for k in BATCH_KEYS}
        if self.offline:
            spec = offline_batch_spec(self.layout, self.global_batch, cfg.data.max_len, cfg.data.num_anchors,
                                      lambda ndim: batch_sharding(mesh, ndim))
            self.batch_shardings.update({k: v.sharding for k, v in spec.items()})
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
        """Model FLOPs of one step (`hdflash_jax.training.flops.drafter_step_flops` of the family's draft shape)."""
        return drafter_step_flops(self.n_target_active, self.n_params, self.family.draft_shape(self.dcfg, self.tcfg),
                                  self.global_batch, self.cfg.data.max_len, self.cfg.data.num_anchors,
                                  online=not self.offline)

    def drafter_adapter(self, temperature: float = 0.0):
        """The decoder's `Drafter` for this drafter at its training block."""
        return self.family.adapter(self.dcfg, self.family.num_drafts(self.dcfg, None), temperature)

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
        step = self.family.train_step
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
        for k in self.batch_shardings:
            x = np.asarray(local[k])
            if k in BATCH_KEYS:  # the offline arrays come in their own dtypes
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
        if self.offline and self.features.n_records != len(source):
            raise ValueError(f"features.dir {self.features.folder}: holds {self.features.n_records} records, "
                             f"data.train {dc.train} has {len(source)}")
        batches = D.make_batches(source, self.tokenizer, max_len=dc.max_len, num_anchors=dc.num_anchors,
                                 global_batch=self.global_batch, num_batches=total, seed=dc.shuffle_seed,
                                 rows=self.rows, features=self.features,
                                 teacher_slots=self.layout.teacher_slots if self.offline else 0)
        return source, batches, total

    # -- host copies (eval, export) ---------------------------------------------------------------------------------
    def drafter_module(self, params):
        """The drafter module holding `params` (host copies when multi-process)."""
        if jax.process_count() > 1:
            params = host_tree(params)
        return self.dpure.merge(self.dpure.in_own_dtypes(params))
