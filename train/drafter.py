"""Distributed training of a block drafter (HyperDFlash / vanilla DFlash) against a frozen DeepSeek-V4 target.

    python -m train.drafter --config FILE [--override key=value ...] [--mesh data=2,fsdp=2,tensor=2]
        [--coordinator HOST:PORT --num-processes N --process-id I | --distributed auto] [--cpu-devices N]

Design
* Only the drafter's `nnx.Param`s train (its layers, final norm and the reducer — for HyperDFlash the gate
  inherited from the target's hc_head). The target's embedding and LM head are read from the target, frozen.
  Optimizer: optax chain(clip_by_global_norm, AdamW) over a pure tree of the drafter's params, warmup (fraction of
  the steps) then cosine decay.
* The train step is one pure jitted function `(state, target_params, batch) -> (state, metrics)` with
  in/out shardings from the mesh: the drafter's params, the optimizer moments and the frozen target's params are
  sharded by the logical-axis rules of `hdflash_jax.sharding`, the batch over the data axes (`data`, `fsdp`),
  metrics replicated. The state is donated.
* The target runs INSIDE the step (online features): `forward_full` over the padded sequences, then
  `features_from_target` (final pre-collapse streams, or the tapped layers) and the teacher logits of the KL
  slots, all under `stop_gradient` and outside `value_and_grad`, so nothing is ever differentiated through the
  target. Cost: one target forward per step (no feature cache on disk, whose size grows with K and S).
* Multi-host: `jax.distributed.initialize` (explicit `--coordinator/--num-processes/--process-id`, the env vars
  HDFLASH_COORDINATOR / HDFLASH_NUM_PROCESSES / HDFLASH_PROCESS_ID, or `--distributed auto` for TPU pods and
  SLURM auto-detection); on CPU the collectives are gloo. Every process reads only its rows of each global batch
  (the rows its devices hold under the batch sharding, contiguous or not) and builds the global arrays with
  `jax.make_array_from_callback`; the global batch is the same whatever the number of processes.
* Checkpoints (orbax, every `checkpoint.every` steps and at the end, `max_to_keep`): drafter params, optimizer
  state, step, RNG, and the grain iterator state; a run restarted on the same out_dir continues exactly.
* Metrics (loss, ce, kl, per-slot accuracy, lr, grad norm, tokens/s) go to `<out_dir>/metrics.jsonl`, to
  TensorBoard when `tensorboardX` (or torch's writer) is importable, and to a tqdm bar. Eval every
  `eval.every` steps: held-out τ through the real speculative decoder (`Generator` + `BlockDrafterAdapter`).
* The run folder keeps the resolved config (`config.yaml`) and the drafter config (`drafter_config.json`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

# ---- configuration ---------------------------------------------------------------------------------------------

DEFAULTS: dict[str, Any] = {
    "out_dir": "runs/drafter",
    "seed": 0,  # drafter init and the RNG carried in the train state
    "resume": True,  # continue from the latest checkpoint in out_dir/checkpoints when there is one
    "mesh": None,  # "data=2,fsdp=2,tensor=2" or {axis: size}; None: data = every device
    "compilation_cache": None,  # a folder for JAX's persistent compilation cache
    "target": {
        "preset": "tiny",  # a TargetConfig preset (random weights from `seed`) ...
        "seed": 0,
        "overrides": {},  # TargetConfig fields changed on the preset
        "head_scale": 1.0,  # preset only: multiply the random LM head (sharper, more learnable toy targets)
        "checkpoint": None,  # ... or a params checkpoint folder (hdflash_jax.checkpoint); wins over the preset
    },
    "drafter": {
        "preset": None,  # a drafter preset name, or None: DrafterConfig.for_target(target, **overrides)
        "overrides": {},  # DrafterConfig fields (n_layers, conditioning, reducer, mask_token_id, ...)
        "init_from_target": True,  # copy the target's hc_head into the gate and its final norm
    },
    "data": {
        "train": None,  # JSONL (see train/data.py)
        "eval": None,  # JSONL of held-out prompts for τ (prompt / messages / prompt_ids)
        "tokenizer": "byte",
        "max_len": 512,
        "num_anchors": 64,
        "shuffle_seed": 0,
        "prefetch": 2,
    },
    "train": {
        "global_batch": 8,
        "steps": None,  # None: epochs × (records // global_batch)
        "epochs": 1,
        "block_size": None,  # None: the drafter config's
    },
    "loss": {"gamma": None, "kl_alpha": 0.1, "kl_slots": 2, "kl_temperature": 1.0},
    "optim": {"lr": 6e-4, "warmup_frac": 0.04, "end_lr_frac": 0.0, "weight_decay": 0.0, "b1": 0.9, "b2": 0.999,
              "eps": 1e-8, "grad_clip": 1.0},
    "checkpoint": {"every": 500, "max_to_keep": 3},
    "eval": {"every": 0, "at_start": True, "num_prompts": 16, "batch_size": 16, "max_new_tokens": 64,
             "temperature": 0.0},
    "log": {"every": 10, "tensorboard": True, "progress": True},
    "export_drafter": True,  # write <out_dir>/drafter (a drafter checkpoint) at the end, when possible
    "debug": {"step_sleep": 0.0},  # seconds to sleep after each step (tests kill a run mid-way)
}


def _merge(base: dict, new: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for k, v in new.items():
        key = f"{where}{k}"
        if k not in base:
            raise ValueError(f"config: unknown key {key!r} (known: {sorted(base)})")
        if isinstance(base[k], dict) and k not in ("overrides",) and base[k] is not None:
            if not isinstance(v, dict):
                raise ValueError(f"config: {key!r} must be a mapping, got {v!r}")
            out[k] = _merge(base[k], v, key + ".")
        else:
            out[k] = copy.deepcopy(v)
    return out


def apply_override(cfg: dict, item: str) -> dict:
    """'a.b.c=value' (value parsed as YAML: 1e-3, true, null, [1,2], {x: 1}) → a new config."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--override: expected key=value, got {item!r}")
    value = yaml.safe_load(raw) if raw != "" else None
    parts = key.split(".")
    out = copy.deepcopy(cfg)
    node = out
    for i, p in enumerate(parts[:-1]):
        if p not in node or not isinstance(node[p], dict):
            raise ValueError(f"--override {item!r}: {'.'.join(parts[:i + 1])!r} is not a config section")
        node = node[p]
    last = parts[-1]
    if last not in node and not (len(parts) >= 2 and parts[-2] == "overrides"):
        raise ValueError(f"--override {item!r}: unknown key {key!r}")
    node[last] = value
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                data: dict | None = None) -> dict:
    """DEFAULTS ← the YAML/JSON file (or `data`) ← each 'key=value' override."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"--config {p}: file not found")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"--config {p}: not valid YAML/JSON ({e})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {p}: expected a mapping at the top level")
        cfg = _merge(cfg, loaded)
    if data is not None:
        cfg = _merge(cfg, data)
    for item in overrides or []:
        cfg = apply_override(cfg, item)
    return cfg


# ---- distributed setup (before anything touches a JAX backend) -------------------------------------------------

def init_distributed(coordinator=None, num_processes=None, process_id=None, mode: str = "off",
                     cpu_devices: int | None = None) -> None:
    import jax

    if cpu_devices:
        jax.config.update("jax_num_cpu_devices", int(cpu_devices))
    coordinator = coordinator or os.environ.get("HDFLASH_COORDINATOR")
    if num_processes is None and os.environ.get("HDFLASH_NUM_PROCESSES"):
        num_processes = int(os.environ["HDFLASH_NUM_PROCESSES"])
    if process_id is None and os.environ.get("HDFLASH_PROCESS_ID"):
        process_id = int(os.environ["HDFLASH_PROCESS_ID"])
    explicit = coordinator is not None or num_processes is not None or process_id is not None
    if not explicit and mode != "auto":
        return
    # gloo for cross-process collectives of the CPU client (no effect on TPU/GPU computations)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        if coordinator is None or num_processes is None or process_id is None:
            raise ValueError("multi-process training needs all of --coordinator, --num-processes and --process-id "
                             "(or HDFLASH_COORDINATOR / HDFLASH_NUM_PROCESSES / HDFLASH_PROCESS_ID)")
        if not 0 <= int(process_id) < int(num_processes):
            raise ValueError(f"--process-id {process_id} outside [0, {num_processes})")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=int(num_processes),
                                   process_id=int(process_id))
    else:  # TPU pods, SLURM, Open MPI, ...: JAX detects the cluster
        jax.distributed.initialize()


# ---- pure views of NNX modules ---------------------------------------------------------------------------------

class PureModule:
    """A module's variables as a nested dict of arrays keyed by dotted-path parts (strings), and back.

    `tree()` → {'layers': {'0': {'wq': {'weight': array}}}, ...}; `merge(tree)` rebuilds the module (inside or
    outside jit); `shardings(mesh)` → the same tree of NamedShardings by the logical-axis rules.
    With `params_only`, only `nnx.Param`s are in the tree (anything else is kept as a constant).
    """

    def __init__(self, module, params_only: bool = False):
        import jax
        from flax import nnx

        from hdflash_jax.checkpoint import dotted

        if params_only:
            self.graphdef, state, self.rest = nnx.split(module, nnx.Param, ...)
        else:
            self.graphdef, state = nnx.split(module)
            self.rest = None
        flat = list(nnx.to_flat_state(state))
        self._values = {dotted(p): v.get_value() for p, v in flat}
        # templates hold shapes only (no second reference to the arrays)
        self.template = [(p, v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype))) for p, v in flat]
        self.keys = [dotted(p) for p, _ in flat]
        self.names = {dotted(p): v.get_metadata().get("out_sharding") for p, v in flat}

    def tree(self) -> dict:
        from hdflash_jax.checkpoint import nest

        values, self._values = self._values, None
        if values is None:
            raise RuntimeError("PureModule.tree(): the values were already handed out")
        return nest(values)

    def shardings(self, mesh) -> dict:
        from jax.sharding import NamedSharding

        from hdflash_jax.checkpoint import nest
        from hdflash_jax.sharding import logical_to_spec

        shapes = {k: v.shape for k, (_, v) in zip(self.keys, self.template)}
        return nest({k: NamedSharding(mesh, logical_to_spec(self.names[k], shapes[k], mesh)) for k in self.keys})

    def merge(self, tree: dict):
        from flax import nnx

        from hdflash_jax.checkpoint import flatten

        flat = flatten(tree)
        state = nnx.from_flat_state([(p, v.replace(flat[k])) for k, (p, v) in zip(self.keys, self.template)])
        if self.rest is not None:
            return nnx.merge(self.graphdef, state, self.rest)
        return nnx.merge(self.graphdef, state)


# ---- the trainer -----------------------------------------------------------------------------------------------

def _log(msg: str) -> None:
    import jax

    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


def place(tree, shardings):
    """Put host/single-device arrays onto global shardings (multi-process safe); arrays already there stay."""
    import jax

    def one(x, sh):
        if isinstance(x, jax.Array) and x.sharding == sh:
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, sh)
        a = np.asarray(x)  # the same value on every process (same seed / same file)
        return jax.make_array_from_callback(a.shape, sh, lambda idx: a[idx])

    return jax.tree.map(one, tree, shardings)


def build_target(tcfg_section: dict, mesh):
    """(TargetConfig, DeepseekV4). A checkpoint is read straight into the mesh's shardings; a preset is built
    on the host (random weights from its seed, optionally a sharpened head) and placed by the caller."""
    from hdflash_jax.config import get_preset
    from hdflash_jax.deepseek_v4.model import init_target

    if tcfg_section.get("checkpoint"):
        from hdflash_jax.checkpoint import load_params

        return load_params(tcfg_section["checkpoint"], mesh=mesh,
                           cfg_overrides=tcfg_section.get("overrides") or None)
    cfg = get_preset(tcfg_section["preset"], **(tcfg_section.get("overrides") or {}))
    model = init_target(cfg, int(tcfg_section.get("seed", 0)))
    scale = float(tcfg_section.get("head_scale", 1.0))
    if scale != 1.0:
        model.head.weight[...] = model.head.weight[...] * scale
    return cfg, model


def build_drafter_config(cfg: dict, tcfg, tokenizer=None):
    from hdflash_jax.config import DrafterConfig, get_drafter_preset

    d = cfg["drafter"]
    over = dict(d.get("overrides") or {})
    if cfg["train"].get("block_size"):
        over["block_size"] = int(cfg["train"]["block_size"])
    if d.get("preset"):
        dcfg = get_drafter_preset(d["preset"], **over)
    else:
        dcfg = DrafterConfig.for_target(tcfg, **over)
    dcfg.check_target(tcfg, where="drafter config")
    if tokenizer is not None and getattr(tokenizer, "mask_id", dcfg.mask_token_id) != dcfg.mask_token_id:
        _log(f"note: tokenizer mask_id {tokenizer.mask_id} != drafter mask_token_id {dcfg.mask_token_id}; "
             f"the drafter's is used")
    return dcfg


def make_optimizer(opt: dict, total_steps: int):
    """optax chain(clip_by_global_norm, AdamW) with linear warmup then cosine decay; (tx, schedule)."""
    import optax

    warmup = int(round(float(opt["warmup_frac"]) * total_steps))
    warmup = min(warmup, max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=float(opt["lr"]), warmup_steps=warmup, decay_steps=max(total_steps, 1),
        end_value=float(opt["lr"]) * float(opt["end_lr_frac"]))
    parts = []
    if opt.get("grad_clip"):
        parts.append(optax.clip_by_global_norm(float(opt["grad_clip"])))
    parts.append(optax.adamw(schedule, b1=float(opt["b1"]), b2=float(opt["b2"]), eps=float(opt["eps"]),
                             weight_decay=float(opt["weight_decay"])))
    return optax.chain(*parts), schedule


def process_rows(mesh, global_batch: int) -> tuple[int, ...]:
    """The rows of the global batch that this process's devices hold under the batch sharding (sorted)."""
    import jax

    from hdflash_jax.sharding import batch_sharding

    sh = batch_sharding(mesh, 1)
    lead = sh.spec[0] if len(sh.spec) else None
    axes = lead if isinstance(lead, tuple) else ((lead,) if lead else ())
    dp = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if global_batch % dp:
        raise ValueError(f"train.global_batch={global_batch} must be divisible by the data-parallel size {dp} "
                         f"(mesh {dict(mesh.shape)})")
    mine = set()
    for dev, idx in sh.devices_indices_map((global_batch,)).items():
        if dev.process_index == jax.process_index():
            mine.update(range(*idx[0].indices(global_batch)))
    return tuple(sorted(mine))


def _rows_str(rows) -> str:
    rows = list(rows)
    if rows == list(range(rows[0], rows[-1] + 1)):
        return f"{rows[0]}..{rows[-1]}"
    return ",".join(map(str, rows))


BATCH_KEYS = ("tokens", "loss_mask", "anchors", "keep")


class Trainer:
    """Everything but the loop: target, drafter, optimizer, shardings, the jitted step, checkpoints' layout.

    `Trainer(cfg, mesh)`; `setup_optimizer(total_steps)`; `state = init_state()`;
    `state, metrics = train_step(state, target_params, local_batch)` with `target_params = place_target()`.
    """

    def __init__(self, cfg: dict, mesh=None, *, target=None, tokenizer=None):
        import jax
        from jax.sharding import NamedSharding, PartitionSpec as P

        from hdflash_jax.drafter.model import init_drafter, init_drafter_from_target
        from hdflash_jax.sharding import batch_sharding, make_mesh, parse_mesh
        from hdflash_jax.tokenizer import load_tokenizer
        from train.losses import LossConfig

        self.cfg = cfg
        if mesh is None:
            spec = cfg.get("mesh")
            shape = parse_mesh(spec) if isinstance(spec, str) else (dict(spec) if spec else
                                                                   {"data": jax.device_count()})
            mesh = make_mesh(shape)
        self.mesh = mesh
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg["data"]["tokenizer"])
        if target is None:
            self.tcfg, target = build_target(cfg["target"], mesh)
        else:
            self.tcfg = target.cfg
        if self.tokenizer.vocab_size > self.tcfg.vocab_size:
            raise ValueError(f"tokenizer vocab {self.tokenizer.vocab_size} exceeds the target's "
                             f"{self.tcfg.vocab_size}")
        self.dcfg = build_drafter_config(cfg, self.tcfg, self.tokenizer)
        self.block_size = self.dcfg.block_size
        lc = cfg["loss"]
        self.loss_cfg = LossConfig(block_size=self.block_size, gamma=lc["gamma"], kl_alpha=float(lc["kl_alpha"]),
                                   kl_slots=int(lc["kl_slots"]), kl_temperature=float(lc["kl_temperature"]))
        self.seed = int(cfg["seed"])
        if cfg["drafter"].get("init_from_target", True):
            drafter = init_drafter_from_target(target, self.dcfg, self.seed)
        else:
            drafter = init_drafter(self.dcfg, self.seed)
        self.tpure = PureModule(target)
        self.dpure = PureModule(drafter, params_only=True)
        del target, drafter
        self.target_shardings = self.tpure.shardings(mesh)
        self.param_shardings = self.dpure.shardings(mesh)
        self._target_values = self.tpure.tree()
        self._param_values = self.dpure.tree()
        self.n_params = int(sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(self._param_values)))
        self.replicated = NamedSharding(mesh, P())
        self.global_batch = int(cfg["train"]["global_batch"])
        self.rows = process_rows(mesh, self.global_batch)
        self.batch_shardings = {k: batch_sharding(mesh, 2) for k in BATCH_KEYS}
        self.total_steps = None
        self.tx = self.schedule = None
        self._step_fn = None

    # -- optimizer / state ----------------------------------------------------------------------------------------
    def setup_optimizer(self, total_steps: int) -> None:
        import jax
        import optax

        self.total_steps = int(total_steps)
        self.tx, self.schedule = make_optimizer(self.cfg["optim"], self.total_steps)
        abstract_opt = jax.eval_shape(self.tx.init, self._param_values)
        opt_sh = optax.tree_map_params(self.tx, lambda _, s: s, abstract_opt, self.param_shardings,
                                       transform_non_params=lambda _: self.replicated)
        self.state_shardings = {"params": self.param_shardings, "opt_state": opt_sh, "step": self.replicated,
                                "rng": self.replicated}
        self._step_fn = None

    def init_state(self) -> dict:
        """The initial train state, placed: params (the drafter's initial Params), optimizer state, step 0, RNG."""
        import jax

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
        import jax

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
        import jax
        import jax.numpy as jnp
        import optax

        from hdflash_jax.drafter.model import block_token_ids, target_io, train_forward
        from hdflash_jax.drafter.reducer import features_from_target, target_return_layers
        from hdflash_jax.deepseek_v4.model import forward_full
        from train.losses import drafter_loss, teacher_logits_for_blocks

        dcfg, lcfg = self.dcfg, self.loss_cfg
        tokens, loss_mask = batch["tokens"], batch["loss_mask"]
        anchors, keep = batch["anchors"], batch["keep"]
        # the frozen target: a plain forward, outside value_and_grad and under stop_gradient
        target = self.tpure.merge(target_params)
        out = forward_full(target, tokens, return_layers=target_return_layers(dcfg))
        feats = jax.lax.stop_gradient(features_from_target(dcfg, out))
        teacher = None
        if lcfg.uses_teacher:
            teacher = jax.lax.stop_gradient(teacher_logits_for_blocks(out.logits, anchors, lcfg.kl_slots))
        embed, head = (jax.lax.stop_gradient(x) for x in target_io(target))
        block_tokens = block_token_ids(jnp.take_along_axis(tokens, anchors, axis=1), dcfg.block_size,
                                       dcfg.mask_token_id)

        def loss_fn(params):
            drafter = self.dpure.merge(params)
            logits = train_forward(drafter, embed, head, feats, anchors, block_tokens, keep)
            return drafter_loss(logits, tokens, loss_mask, anchors, keep, lcfg, teacher)

        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        key = jax.random.wrap_key_data(state["rng"])
        key, _ = jax.random.split(key)  # the carried RNG (nothing in the step samples yet: no dropout)
        metrics = dict(parts, grad_norm=optax.tree.norm(grads), lr=self.schedule(state["step"]))
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
                     "rng": jax.random.key_data(key)}
        return new_state, metrics

    @property
    def step_fn(self):
        """The jitted step: (state, target_params, global batch) -> (state, metrics); state donated."""
        import jax

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
        import jax

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
        from train import data as D

        dc = self.cfg["data"]
        if not dc.get("train"):
            raise ValueError("config: data.train (a JSONL file) is required")
        source = D.JsonlSource(dc["train"])
        D.records_check(source, self.tokenizer, int(dc["max_len"]))
        tc = self.cfg["train"]
        if tc.get("steps"):
            total = int(tc["steps"])
        else:
            total = int(tc["epochs"]) * D.batches_per_epoch(len(source), self.global_batch)
        batches = D.make_batches(source, self.tokenizer, max_len=int(dc["max_len"]),
                                 num_anchors=int(dc["num_anchors"]), global_batch=self.global_batch,
                                 num_batches=total, seed=int(dc["shuffle_seed"]), rows=self.rows)
        return source, batches, total

    # -- host copies (eval, export) ---------------------------------------------------------------------------------
    def host_tree(self, tree):
        """Numpy copies of (possibly multi-process) global arrays."""
        import jax

        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.process_allgather(tree, tiled=True)
        return jax.tree.map(np.asarray, tree)

    def drafter_module(self, params):
        """A `BlockDrafter` holding `params` (host copies when multi-process)."""
        import jax

        if jax.process_count() > 1:
            params = self.host_tree(params)
        return self.dpure.merge(params)


class Evaluator:
    """Held-out τ through the real decoder: Generator(target, BlockDrafterAdapter) with the drafter params of the moment.

    One `Generator` is built once; each call swaps its drafter state (same tree: no recompilation). Prompts run in
    fixed-size batches (the last one padded with repeats that are left out of τ). With several processes each one
    decodes a host-local copy (small models; a real-size target goes through the eval application).
    """

    def __init__(self, trainer: Trainer, target_params, params, prompts: list[list[int]], *, batch_size: int,
                 max_new_tokens: int, temperature: float = 0.0):
        import jax
        from flax import nnx

        from hdflash_jax.decode.drafters import BlockDrafterAdapter
        from hdflash_jax.decode.generate import DecodeSettings, Generator

        self.trainer, self.prompts = trainer, prompts
        self.batch_size = max(1, min(batch_size, len(prompts)))
        if jax.process_count() > 1:
            target_params = trainer.host_tree(target_params)
        target = trainer.tpure.merge(target_params)
        self.gen = Generator(target, BlockDrafterAdapter(trainer.dcfg, trainer.dcfg.block_size - 1),
                             trainer.drafter_module(params),
                             settings=DecodeSettings(max_new_tokens=max_new_tokens, temperature=temperature,
                                                     eos_token_id=trainer.tokenizer.eos_id))
        self._split = nnx.split

    def __call__(self, params, seed: int = 0) -> dict:
        self.gen.dstate = self._split(self.trainer.drafter_module(params))[1]
        accepted = []
        for i in range(0, len(self.prompts), self.batch_size):
            chunk = self.prompts[i:i + self.batch_size]
            n = len(chunk)
            chunk = chunk + [chunk[0]] * (self.batch_size - n)
            res = self.gen.generate(chunk, seed=seed + i)
            accepted.append(np.asarray(res.accepted)[:, :n])
        acc = np.concatenate(accepted, axis=1)
        a = acc[acc >= 0]
        k = self.trainer.dcfg.block_size - 1
        return {"eval_tau": float((a + 1).mean()) if a.size else float("nan"),
                "eval_accept_rate": [float((a >= j).mean()) for j in range(1, k + 1)] if a.size else [],
                "eval_steps": int(a.size)}


def eval_prompts(path, tokenizer, limit: int) -> list[list[int]]:
    """The first `limit` prompts of a JSONL (prompt_ids, prompt or messages) as ids."""
    from train import data as D

    src = D.JsonlSource(path)
    out = []
    for i in range(min(limit, len(src))):
        rec = src[i]
        if "prompt_ids" in rec:
            out.append([int(t) for t in rec["prompt_ids"]])
        else:
            out.append(D.prompt_ids(tokenizer, D.prompt_messages(rec, src.where(i))))
    return out


# ---- metrics ---------------------------------------------------------------------------------------------------

class MetricsWriter:
    def __init__(self, out_dir: Path, resume_step: int, use_tb: bool):
        import jax

        self.active = jax.process_index() == 0
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if not self.active:
            return
        if self.path.exists():  # drop lines past the step we resume from (a killed run logged them)
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        keep.append(line)
                except json.JSONDecodeError:
                    pass
            self.path.write_text("".join(x + "\n" for x in keep))
        if use_tb:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except Exception:  # noqa: BLE001 — no tensorboard writer installed: skip silently
                    SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(str(out_dir / "tb"))

    def write(self, record: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k == "step":
                    continue
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
                elif isinstance(v, list):
                    for j, x in enumerate(v):
                        self.tb.add_scalar(f"{k}/{j + 1}", x, step)

    def close(self):
        if self.tb is not None:
            self.tb.close()


def _to_py(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        a = np.asarray(v)
        out[k] = a.tolist() if a.ndim else float(a)
    return out


# ---- checkpoints -----------------------------------------------------------------------------------------------

def checkpoint_manager(out_dir: Path, max_to_keep: int):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager((Path(out_dir) / "checkpoints").resolve(),  # orbax wants absolute paths
                                 options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def save_checkpoint(mngr, step: int, state, data_state: dict) -> None:
    import orbax.checkpoint as ocp

    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=ocp.args.JsonSave(data_state)), force=True)


def restore_checkpoint(mngr, step: int, abstract_state):
    import orbax.checkpoint as ocp

    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                     data=ocp.args.JsonRestore()))
    return out["state"], out["data"]


def load_run_params(out_dir: str | os.PathLike, step: int | None = None) -> tuple[int, dict]:
    """(step, drafter params as numpy) of a run's checkpoint (the latest by default), on any topology, without
    building a model."""
    import jax
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(Path(out_dir) / "checkpoints", options=ocp.CheckpointManagerOptions(read_only=True),
                                 item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                "data": ocp.JsonCheckpointHandler()})
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{out_dir}: no checkpoint")
    meta = mngr.item_metadata(step)["state"]
    sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sh), meta)
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    mngr.close()
    return step, jax.tree.map(np.asarray, out["state"]["params"])


# ---- the loop --------------------------------------------------------------------------------------------------

def run(cfg: dict, mesh=None, *, target=None) -> dict:
    """Train as configured; returns a summary (steps, last metrics, τ at start/end when eval is on, timings)."""
    import jax
    from tqdm import tqdm

    from train.data import make_iterator

    if cfg.get("compilation_cache"):
        jax.config.update("jax_compilation_cache_dir", str(cfg["compilation_cache"]))
    out_dir = Path(cfg["out_dir"])
    is_main = jax.process_index() == 0
    t_setup = time.time()
    trainer = Trainer(cfg, mesh, target=target)
    source, batches, total = trainer.dataset()
    trainer.setup_optimizer(total)
    _log(f"drafter {trainer.dcfg.conditioning}/{trainer.dcfg.reducer}, B={trainer.block_size}, "
         f"{trainer.n_params:,} trainable params; {len(source)} records, {total} steps of global batch "
         f"{trainer.global_batch}; mesh {dict(trainer.mesh.shape)}, {jax.process_count()} process(es), "
         f"rows {_rows_str(trainer.rows)} here")

    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg_file = out_dir / "config.yaml"
        if cfg_file.exists() and yaml.safe_load(cfg_file.read_text()) != cfg:
            _log(f"note: {cfg_file} differs from this run's config and is replaced")
        tmp = cfg_file.with_name("config.yaml.tmp")
        tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
        tmp.rename(cfg_file)
        (out_dir / "drafter_config.json").write_text(json.dumps(trainer.dcfg.to_dict(), indent=1))
    ck = cfg["checkpoint"]
    mngr = checkpoint_manager(out_dir, int(ck["max_to_keep"]))
    target_params = trainer.place_target()
    it = make_iterator(batches, prefetch=int(cfg["data"]["prefetch"]))
    latest = mngr.latest_step() if cfg.get("resume", True) else None
    if latest is not None:
        state, data_state = restore_checkpoint(mngr, latest, trainer.abstract_state())
        it.set_state(data_state)
        _log(f"resumed from {out_dir / 'checkpoints'} at step {int(np.asarray(state['step']))}")
    else:
        state = trainer.init_state()
    start = int(np.asarray(state["step"]))

    writer = MetricsWriter(out_dir, start, bool(cfg["log"]["tensorboard"]))
    ev = cfg["eval"]
    evaluator = None
    summary: dict[str, Any] = {"start_step": start, "total_steps": total, "n_params": trainer.n_params}
    if ev.get("every") or ev.get("at_start"):
        if cfg["data"].get("eval"):
            prompts = eval_prompts(cfg["data"]["eval"], trainer.tokenizer, int(ev["num_prompts"]))
            evaluator = Evaluator(trainer, target_params, state["params"], prompts,
                                  batch_size=int(ev["batch_size"]), max_new_tokens=int(ev["max_new_tokens"]),
                                  temperature=float(ev["temperature"]))
        elif ev.get("every"):
            raise ValueError("config: eval.every > 0 needs data.eval (a JSONL of held-out prompts)")

    def do_eval(at_step):
        t0 = time.time()
        r = evaluator(state["params"])
        r["eval_time_s"] = time.time() - t0
        writer.write({"step": at_step, **r})
        _log(f"step {at_step}: held-out tau {r['eval_tau']:.3f} (acceptance by position "
             f"{[round(x, 3) for x in r['eval_accept_rate']]})")
        return r

    if evaluator is not None and ev.get("at_start") and start == 0:
        summary["eval_start"] = do_eval(0)

    log_every = max(int(cfg["log"]["every"]), 1)
    ck_every = int(ck["every"] or 0)
    ev_every = int(ev.get("every") or 0)
    sleep = float(cfg["debug"]["step_sleep"])
    bar = tqdm(total=total, initial=start, disable=not (is_main and cfg["log"]["progress"]), desc="train",
               dynamic_ncols=True)
    seq_tokens = trainer.global_batch * int(cfg["data"]["max_len"])
    summary["setup_s"] = time.time() - t_setup
    t_window, n_window = time.time(), 0
    timed_steps, timed_s = 0, 0.0
    step = start
    last = None
    try:
        while step < total:
            local = next(it)
            t0 = time.time()
            state, metrics = trainer.train_step(state, target_params, local)
            step += 1
            if "first_step_s" not in summary:  # compile + one step
                jax.block_until_ready(metrics["loss"])
                summary["first_step_s"] = time.time() - t0
                t_window, n_window = time.time(), 0
            else:
                n_window += 1
            bar.update(1)
            if step % log_every == 0 or step == total:
                m = _to_py(metrics)
                dt = max(time.time() - t_window, 1e-9)
                rec = {"step": step, **m}
                if n_window:
                    rec.update(steps_per_s=n_window / dt, tokens_per_s=n_window * seq_tokens / dt,
                               supervised_tokens_per_s=n_window * m["n_tokens"] / dt)
                    timed_steps, timed_s = timed_steps + n_window, timed_s + dt
                writer.write(rec)
                bar.set_postfix(loss=f"{m['loss']:.4f}", acc1=f"{m['acc'][0]:.3f}")
                last = rec
                t_window, n_window = time.time(), 0
            if (ck_every and step % ck_every == 0) or step == total:
                save_checkpoint(mngr, step, state, it.get_state())
            if evaluator is not None and ev_every and (step % ev_every == 0 or step == total):
                summary["eval_end"] = do_eval(step)
            if sleep:
                time.sleep(sleep)
    finally:
        bar.close()
        mngr.wait_until_finished()
        writer.close()
    summary.update(final=last, steps=step, steps_per_s=timed_steps / timed_s if timed_s else None)
    if cfg.get("export_drafter"):
        _export(trainer, state["params"], out_dir)
    if is_main:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    mngr.close()
    return summary


def _export(trainer: Trainer, params, out_dir: Path) -> None:
    """A drafter checkpoint (hdflash_jax.drafter.checkpoint) at <out_dir>/drafter, when that module exists."""
    import jax

    try:
        from hdflash_jax.drafter.checkpoint import save_drafter
    except ImportError:
        return
    if jax.process_count() > 1:  # save_drafter is a single-process writer; the orbax checkpoints have the params
        _log("note: export_drafter skipped with several processes (train.drafter.load_run_params reads the "
             "latest checkpoint's params)")
        return
    drafter = trainer.drafter_module(params)
    if jax.process_index() == 0:
        save_drafter(out_dir / "drafter", drafter, trainer.dcfg, overwrite=True)


# ---- CLI -------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.drafter", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML/JSON config (keys: see train.drafter.DEFAULTS)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted key = YAML value, e.g. optim.lr=3e-4 (repeatable)")
    p.add_argument("--mesh", default=None, help="mesh axes, e.g. data=2,fsdp=2,tensor=2 (default: data=all devices)")
    p.add_argument("--out", default=None, help="out_dir (same as --override out_dir=...)")
    p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (multi-process)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--distributed", choices=("off", "auto"), default="off",
                   help="auto: jax.distributed.initialize() with cluster auto-detection (TPU pods, SLURM)")
    p.add_argument("--cpu-devices", type=int, default=None, help="simulated CPU devices in this process")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        overrides = list(args.override)
        if args.out:
            overrides.append(f"out_dir={args.out}")
        if args.mesh:
            overrides.append(f"mesh={args.mesh}")
        cfg = load_config(args.config, overrides)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(cfg, sort_keys=False))
        return 0
    try:
        init_distributed(args.coordinator, args.num_processes, args.process_id, args.distributed, args.cpu_devices)
        summary = run(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import jax

    if jax.process_index() == 0:
        print(json.dumps({k: summary.get(k) for k in ("steps", "final", "eval_start", "eval_end", "first_step_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
