"""Pretrain a small DeepSeek-V4 target with its MTP block (stage 3 of the built-in small model).

    python -m train.pretrain_target --preset small --corpus runs/small/corpus --tokenizer runs/small/tokenizer \
        --out runs/small/target [--override train.steps=1200] [--override model.dim=160] [--max-minutes 50]
    python -m train.pretrain_target --config my_run.yaml [--override k=v ...]

The config (`PretrainConfig`, a YAML or JSON file) has the sections `model` (TargetConfig fields over the
preset), `data` (corpus, tokenizer), `train`, `optim`, `checkpoint`, `log`; `--preset`, `--corpus`,
`--tokenizer`, `--out` and `--max-minutes` set `preset`, `data.corpus`, `data.tokenizer`, `out_dir` and
`train.max_minutes`, and `--override a.b=c` (a YAML value) wins over all of them. A bad value or key stops with
one line naming its path (exit 2). `model.vocab_size` and the bos/eos ids always come from the tokenizer.

The model: the `small` preset of `hdflash_jax.config` — every DeepSeek-V4 feature at a size that trains on CPU.

Objective: L = CE(main) + λ·CE(MTP), λ = `train.mtp_weight` (0.3, DeepSeek-V3's early value). For a window of
S + 1 tokens t_0..t_S: the main model reads t_0..t_{S-1} and predicts t_{i+1} at i; the MTP block at i takes the
main model's final pre-collapse streams H[i] and the embedding of t_{i+1}, and predicts t_{i+2} (i = 0..S−2).
Gradients flow from the MTP loss into the trunk, as in DeepSeek's training.

Only `nnx.Param`s train (`hdflash_jax.training.optim`: AdamW, linear warmup then cosine, global-norm clipping,
weight decay on matrices only). The `Buffer`s never get gradients: the hash layers' token→expert table
(`tid2eid`) is drawn once at init (a fixed random k-subset of experts per token id, as a hash would give), and the
routed layers' score-correction bias follows DeepSeek-V3's auxiliary-loss-free balancing,
b_e += γ·sign(mean load − load_e) per step (γ = `train.bias_update_speed`; 0 freezes it), with the loads read from the gates' outputs.

Data (`train.pretrain_data`): the corpus rendered, tokenized once and cached as uint16 under `<out>/data/`; a
step takes `batch_size` windows at offsets drawn from `np.random.default_rng([seed, step])`, so a resumed run sees
exactly the batches it would have seen. Validation: `eval_batches` fixed windows of the held-out split.

Output folder:
    run_config.json     the model and run configs (a resume must agree on the model)
    checkpoints/<step>/ the training state (`train.checkpointing`), the last `checkpoint.max_to_keep`
    metrics.jsonl       one line per `log.every` steps and per evaluation (`train.metrics`)
    model/              the finished target: `hdflash_jax.checkpoint.load_params("<out>/model")` loads it
Resumable: rerunning the same command continues from the last checkpoint; `--max-minutes` stops cleanly (with a
checkpoint) so a long run can be done in pieces.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tokenizers import Tokenizer
from tqdm import tqdm

from hdflash_jax.checkpoint import nest, save_params
from hdflash_jax.cli import run_command
from hdflash_jax.config import PRESETS, TargetConfig, get_preset
from hdflash_jax.deepseek_v4.cache import init_cache
from hdflash_jax.deepseek_v4.model import forward_full, init_target
from hdflash_jax.errors import UsageError
from hdflash_jax.fileio import OutputKind, check_output, has_files, read_json
from hdflash_jax.train_config import CheckpointConfig, LogConfig, OptimConfig
from hdflash_jax.training.optim import make_optimizer
from hdflash_jax.typed_config import ConfigError, check, check_fields_of, load, to_dict
from train.checkpointing import Checkpointer
from train.metrics import MetricsWriter
from train.pretrain_data import eval_windows, tokenize_corpus, train_batch
from train.tokenizer_train import BOS, EOS

# ---- configuration -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PretrainData:
    corpus: str | None = None  # a corpus folder (python -m train.corpus)
    tokenizer: str | None = None  # a tokenizer folder or tokenizer.json (python -m train.tokenizer_train)


@dataclasses.dataclass(frozen=True)
class PretrainTrain:
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 1200
    mtp_weight: float = 0.3
    bias_update_speed: float = 1e-3
    seed: int = 0
    eval_every: int = 200
    eval_batches: int = 8
    moe_dispatch: str = "dense"
    max_minutes: float | None = None  # stop (with a checkpoint) after this long; rerun resumes

    def __post_init__(self):
        for f in ("batch_size", "steps", "eval_every", "eval_batches"):
            check(getattr(self, f) >= 1, f, f"must be >= 1, got {getattr(self, f)}")
        check(self.seq_len >= 3, "seq_len", f"the MTP loss needs at least 3 tokens, got {self.seq_len}")
        check(self.mtp_weight >= 0, "mtp_weight", f"must be >= 0, got {self.mtp_weight}")
        check(self.moe_dispatch in ("dense", "ragged"), "moe_dispatch",
              f"'dense' or 'ragged', got {self.moe_dispatch!r}")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    out_dir: str | None = None
    preset: str = "small"
    model: dict = dataclasses.field(default_factory=dict)  # TargetConfig fields over the preset
    data: PretrainData = PretrainData()
    train: PretrainTrain = PretrainTrain()
    optim: OptimConfig = OptimConfig(lr=2e-3, warmup_steps=100, end_lr_frac=0.1, weight_decay=0.1,
                                     decay_matrices_only=True, b2=0.95)
    checkpoint: CheckpointConfig = CheckpointConfig(every=100, max_to_keep=2)
    log: LogConfig = LogConfig(every=10, tensorboard=False, progress=True)

    def __post_init__(self):
        check(self.preset in PRESETS, "preset", f"unknown preset {self.preset!r}; one of {sorted(PRESETS)}")
        model = check_fields_of(self.model, TargetConfig, "model")
        object.__setattr__(self, "model", model)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                data: dict | None = None) -> PretrainConfig:
    return load(PretrainConfig, path, overrides, data)


def build_model_config(pcfg: PretrainConfig, vocab_size: int | None = None, bos: int = 0,
                       eos: int = 1) -> TargetConfig:
    """The preset with `model` and the tokenizer's vocabulary size and bos/eos ids."""
    model_kw = dict(pcfg.model)
    if vocab_size is not None:
        model_kw.update(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos)
    try:
        cfg = get_preset(pcfg.preset, **model_kw)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    if pcfg.train.seq_len > cfg.max_seq_len:
        raise ConfigError(f"train.seq_len: {pcfg.train.seq_len} exceeds model.max_seq_len {cfg.max_seq_len}")
    return cfg


# ---- losses (pure functions of a model and a token window) --------------------------------------------------

def split_window(tokens):
    """[B, S+1] window → (main inputs [B,S], main labels [B,S], MTP next tokens [B,S-1], MTP labels [B,S-1]).

    Main position i reads t_0..t_i and predicts t_{i+1}; MTP position i (i <= S-2) reads H[i] and t_{i+1} and
    predicts t_{i+2}.
    """
    s = tokens.shape[1] - 1
    return tokens[:, :s], tokens[:, 1:s + 1], tokens[:, 1:s], tokens[:, 2:s + 1]


def model_outputs(model, tokens):
    """Main logits [B,S,V], MTP logits [B,S-1,V] and the labels of both, for a window [B, S+1]."""
    x, y, nxt, y2 = split_window(tokens)
    out = forward_full(model, x)
    b, s = x.shape
    mtp_logits = None
    if model.cfg.n_mtp_layers:
        cache = init_cache(model.cfg, b, s - 1, max_block=1)
        mtp_logits, _, _ = model.mtp_step(out.streams[:, :s - 1], nxt, cache)
    return out.logits, y, mtp_logits, y2


def cross_entropy(logits, labels):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


def losses(model, tokens, mtp_weight: float):
    """(total, {"ce", "mtp_ce"}) for a window [B, S+1]."""
    logits, y, mtp_logits, y2 = model_outputs(model, tokens)
    ce = jnp.mean(cross_entropy(logits, y))
    mtp_ce = jnp.mean(cross_entropy(mtp_logits, y2)) if mtp_logits is not None else jnp.zeros((), jnp.float32)
    return ce + mtp_weight * mtp_ce, {"ce": ce, "mtp_ce": mtp_ce}


# ---- model state ---------------------------------------------------------------------------------------------

def build_model(cfg: TargetConfig, seed: int, moe_dispatch: str = "dense"):
    """`init_target(cfg, seed)` with the initialisation compiled as one program (eager init dispatches, and on a
    busy CPU compiles, hundreds of small ops); the same values."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: init_target(cfg, seed, moe_dispatch=moe_dispatch)))
    state = jax.jit(lambda: nnx.state(init_target(cfg, seed, moe_dispatch=moe_dispatch)))()
    return nnx.merge(graphdef, state)


def init_hash_tables(model, seed: int) -> None:
    """Fill every hash layer's tid2eid with a fixed random set of k distinct experts per token id."""
    cfg = model.cfg
    gates = [(i, layer.ffn.gate) for i, layer in enumerate(model.layers) if layer.ffn.gate.hashed]
    for i, gate in gates:
        rng = np.random.default_rng([seed, 7919, i])
        table = np.argsort(rng.random((cfg.vocab_size, cfg.n_routed_experts)), axis=1)[:, :cfg.n_activated_experts]
        gate.tid2eid.set_value(jnp.asarray(table, jnp.int32))


def dotted(path) -> str:
    return ".".join(str(k) for k in path)


def flat_values(state) -> dict:
    return {dotted(p): v.get_value() for p, v in nnx.to_flat_state(state)}


def set_flat_values(state, values: dict):
    """A copy of NNX `state` with its leaves replaced by `values` ({dotted path: array})."""
    flat = nnx.to_flat_state(state)
    missing = [dotted(p) for p, _ in flat if dotted(p) not in values]
    if missing:
        raise KeyError(f"state value missing for {missing[0]!r}")
    return nnx.from_flat_state([(p, v.replace(values[dotted(p)])) for p, v in flat])


def routed_gate_paths(model) -> list[str]:
    """Dotted paths of the score-routed gates (those with a `bias` Buffer), main layers then MTP."""
    out = [f"layers.{i}.ffn.gate" for i, layer in enumerate(model.layers) if not layer.ffn.gate.hashed]
    out += [f"mtp.{d}.block.ffn.gate" for d in range(len(model.mtp))]
    return out


def _expert_loads(inter, gate_paths, n_exp):
    """Per routed gate, the count of tokens sent to each expert ([G, E]), from the captured gate outputs."""
    got = flat_values(inter)
    loads = []
    for g in gate_paths:
        idx = got[f"{g}.__call__"][0][0]  # Gate.__call__ → (expert ids [N, k], weights [N, k])
        loads.append(jnp.bincount(idx.reshape(-1), length=n_exp).astype(jnp.float32))
    return jnp.stack(loads) if loads else jnp.zeros((0, n_exp))


# ---- the training program -------------------------------------------------------------------------------------

class Trainer:
    """Holds the split model (graphdef, params, buffers), the optimizer and the jitted step/eval."""

    def __init__(self, cfg: TargetConfig, pcfg: PretrainConfig, seed: int | None = None):
        tc = pcfg.train
        self.cfg, self.pcfg = cfg, pcfg
        model = build_model(cfg, tc.seed if seed is None else seed, tc.moe_dispatch)
        init_hash_tables(model, tc.seed)
        self.gate_paths = routed_gate_paths(model)
        self.graphdef, ptmpl, btmpl = nnx.split(model, nnx.Param, ...)
        self.params = flat_values(ptmpl)
        self.buffers = flat_values(btmpl)
        self.tx, self.schedule, _ = make_optimizer(pcfg.optim, tc.steps, self.params)
        self.opt_state = self.tx.init(self.params)
        self.step = 0
        graphdef, gate_paths, n_exp = self.graphdef, self.gate_paths, cfg.n_routed_experts

        def merge(p, b):
            return nnx.merge(graphdef, set_flat_values(ptmpl, p), set_flat_values(btmpl, b))

        def loss_fn(p, b, tokens):
            (loss, parts), inter = nnx.capture(lambda m, t: losses(m, t, tc.mtp_weight), nnx.Intermediate,
                                               method_outputs=nnx.Intermediate)(merge(p, b), tokens)
            return loss, (parts, _expert_loads(inter, gate_paths, n_exp))

        def train_step(p, b, opt_state, tokens):
            (loss, (parts, loads)), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, b, tokens)
            updates, opt_state = self.tx.update(grads, opt_state, p)
            p = optax.apply_updates(p, updates)
            b = dict(b)
            for g, gate_load in zip(gate_paths, loads):
                err = jnp.sign(jnp.mean(gate_load) - gate_load)  # raise the bias of under-loaded experts
                b[f"{g}.bias"] = b[f"{g}.bias"] + tc.bias_update_speed * err
            imbalance = jnp.max(loads, axis=-1) / jnp.maximum(jnp.mean(loads, axis=-1), 1e-9) if gate_paths else \
                jnp.ones((1,))
            metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads),
                       "max_load_ratio": jnp.max(imbalance)}
            return p, b, opt_state, metrics

        def eval_step(p, b, tokens):
            loss, parts = losses(merge(p, b), tokens, tc.mtp_weight)
            return {"loss": loss, **parts}

        self._train_step = jax.jit(train_step, donate_argnums=(0, 1, 2))
        self._eval_step = jax.jit(eval_step)
        self._merge = merge

    def n_params(self) -> int:
        return int(sum(int(np.prod(v.shape)) for v in self.params.values()))

    def train_step(self, tokens) -> dict:
        self.params, self.buffers, self.opt_state, m = self._train_step(self.params, self.buffers, self.opt_state,
                                                                        tokens)
        self.step += 1
        return m

    def eval_step(self, tokens) -> dict:
        return self._eval_step(self.params, self.buffers, tokens)

    def model(self):
        return self._merge(self.params, self.buffers)

    # -- checkpoints (train.checkpointing) ----------------------------------------------------------------
    def state_tree(self) -> dict:
        """Params and buffers nested by their dotted names, the optimizer state's leaves by index, the step."""
        opt_leaves = jax.tree.leaves(self.opt_state)
        return {"params": nest(self.params), "buffers": nest(self.buffers),
                "opt": {f"{i:05d}": x for i, x in enumerate(opt_leaves)}, "step": jnp.asarray(self.step, jnp.int32)}

    def save(self, ck: Checkpointer) -> None:
        ck.save(self.step, self.state_tree())

    def restore(self, ck: Checkpointer, step: int | None = None) -> None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                self.state_tree())
        got, _ = ck.restore(step, abstract)
        self.params = {dotted(p): v for p, v in _flat_items(got["params"])}
        self.buffers = {dotted(p): v for p, v in _flat_items(got["buffers"])}
        treedef = jax.tree.structure(self.opt_state)
        self.opt_state = jax.tree.unflatten(treedef, [got["opt"][f"{i:05d}"] for i in range(treedef.num_leaves)])
        self.step = int(got["step"])


def _flat_items(tree: dict, prefix: tuple = ()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat_items(v, prefix + (k,))
        else:
            yield prefix + (k,), v


# ---- main loop -----------------------------------------------------------------------------------------------

PRETRAIN_RUN = OutputKind("a train.pretrain_target run folder (run_config.json)", has_files("run_config.json"))


def _prepare(pcfg: PretrainConfig, log) -> tuple[TargetConfig, Path, Path, Path]:
    """(model config, corpus, tokenizer.json, out) with run_config.json written (a resume must keep the model)."""
    if not (pcfg.data.corpus and pcfg.data.tokenizer and pcfg.out_dir):
        raise ConfigError("data.corpus, data.tokenizer and out_dir are required (--corpus, --tokenizer, --out)")
    corpus, tokenizer, out = Path(pcfg.data.corpus), Path(pcfg.data.tokenizer), Path(pcfg.out_dir)
    tok_json = tokenizer / "tokenizer.json" if tokenizer.is_dir() else tokenizer
    check_output(out, flag="--out", kind=PRETRAIN_RUN, reuse=True,  # a rerun resumes the run
                 inputs=[("the --corpus", corpus), ("the --tokenizer", tokenizer)])
    if not tok_json.is_file():
        raise UsageError(f"--tokenizer {tokenizer}: no tokenizer.json")
    tk = Tokenizer.from_file(str(tok_json))
    cfg = build_model_config(pcfg, tk.get_vocab_size(with_added_tokens=True), tk.token_to_id(BOS),
                             tk.token_to_id(EOS))
    out.mkdir(parents=True, exist_ok=True)
    run_cfg = {"model": cfg.to_dict(), "run": to_dict(pcfg), "corpus": str(corpus), "tokenizer": str(tok_json)}
    rc = out / "run_config.json"
    if rc.is_file():
        old = read_json(rc)
        if old["model"] != run_cfg["model"]:
            raise UsageError(f"{out}: holds a run with another model config; use a new --out")
        old_run, new_run = old.get("run", {}), run_cfg["run"]

        def settings(run: dict) -> tuple:  # what changes the trajectory (steps and the time limit do not)
            train = {k: v for k, v in run.get("train", {}).items() if k not in ("steps", "max_minutes")}
            return train, run.get("optim")

        if settings(old_run) != settings(new_run):
            log("warning: resuming with changed training settings (train / optim)")
    rc.write_text(json.dumps(run_cfg, indent=1))
    return cfg, corpus, tok_json, out


def _evaluate(trainer: Trainer, windows) -> dict:
    acc: dict = {}
    for w in windows:
        for k, v in trainer.eval_step(w).items():
            acc[k] = acc.get(k, 0.0) + float(v) / len(windows)
    return acc


def _loop(trainer: Trainer, pcfg: PretrainConfig, train_tokens, evals, ck: Checkpointer, writer: MetricsWriter,
          t_start: float) -> tuple[dict, bool]:
    """Train to `train.steps` (or `train.max_minutes`); (last metrics, stopped early)."""
    tc = pcfg.train
    last: dict = {}
    tokens_per_step = tc.batch_size * tc.seq_len
    bar = tqdm(total=tc.steps, initial=trainer.step, desc="pretrain", dynamic_ncols=True, file=sys.stdout,
               disable=not pcfg.log.progress)
    t_window, n_window = time.time(), 0
    stopped_early = False
    while trainer.step < tc.steps:
        m = trainer.train_step(train_batch(train_tokens, tc, trainer.step))
        n_window += 1
        step = trainer.step
        if step % pcfg.log.every == 0 or step == tc.steps or step == 1:
            m = {k: float(v) for k, v in m.items()}
            tps = n_window * tokens_per_step / (time.time() - t_window)
            t_window, n_window = time.time(), 0
            last = {"step": step, **m, "lr": float(trainer.schedule(step - 1)), "tokens_per_s": round(tps, 1),
                    "tokens": step * tokens_per_step, "elapsed_s": round(time.time() - t_start, 1)}
            writer.write(last)
            bar.set_postfix(loss=f"{m['loss']:.3f}", ce=f"{m['ce']:.3f}", mtp=f"{m['mtp_ce']:.3f}",
                            tok_s=f"{tps:.0f}")
        bar.update(1)
        if step % tc.eval_every == 0 or step == tc.steps:
            ev = {f"val_{k}": v for k, v in _evaluate(trainer, evals).items()}
            writer.write({"step": step, **ev, "elapsed_s": round(time.time() - t_start, 1)})
            bar.write(f"step {step}: val ce {ev['val_ce']:.4f} (ppl {math.exp(ev['val_ce']):.1f}), val mtp ce "
                      f"{ev['val_mtp_ce']:.4f}")
            last.update(ev)
        timeout = tc.max_minutes is not None and time.time() - t_start > tc.max_minutes * 60
        if (pcfg.checkpoint.every and step % pcfg.checkpoint.every == 0) or step == tc.steps or timeout:
            trainer.save(ck)
        if timeout and step < tc.steps:
            bar.write(f"stopping at step {step}: train.max_minutes {tc.max_minutes} reached (rerun to resume)")
            stopped_early = True
            break
    bar.close()
    return last, stopped_early


def run(pcfg: PretrainConfig, log=print) -> dict:
    t_start = time.time()
    cfg, corpus, tok_json, out = _prepare(pcfg, log)
    data = tokenize_corpus(corpus, tok_json, out / "data", log=log)
    train_tokens, held_tokens = data["train"], data["heldout"]
    tc = pcfg.train
    trainer = Trainer(cfg, pcfg)
    log(f"model: {trainer.n_params():,} parameters; {len(train_tokens):,} train tokens, {len(held_tokens):,} "
        f"held-out; {tc.batch_size}×{tc.seq_len} tokens/step, {tc.steps} steps "
        f"({tc.steps * tc.batch_size * tc.seq_len / len(train_tokens):.2f} epochs)")
    with Checkpointer(out / "checkpoints", pcfg.checkpoint.max_to_keep) as ck:
        if ck.latest_step() is not None:
            trainer.restore(ck)
            log(f"resumed from {ck.directory} (step {trainer.step})")
        writer = MetricsWriter(out, trainer.step, pcfg.log.tensorboard)
        try:
            last, stopped_early = _loop(trainer, pcfg, train_tokens, eval_windows(held_tokens, tc), ck, writer,
                                        t_start)
        finally:
            writer.close()
    if not stopped_early and trainer.step >= tc.steps and not (out / "model").exists():
        save_params(out / "model", trainer.model(), cfg)
        log(f"saved the target to {out / 'model'} (hdflash_jax.checkpoint.load_params)")
    jax.effects_barrier()
    return {"step": trainer.step, "finished": trainer.step >= tc.steps, **last}


def _setup_jax_cache() -> None:
    """JAX's persistent compilation cache (the repository's .jax_cache, or $HDFLASH_JAX_CACHE): a resumed run
    skips the compile."""
    cache = os.environ.get("HDFLASH_JAX_CACHE", str(Path(__file__).resolve().parents[1] / ".jax_cache"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _given(d: dict) -> dict:
    """`d` without its None values (and without sections left empty)."""
    out = {}
    for k, v in d.items():
        v = _given(v) if isinstance(v, dict) else v
        if v is not None and v != {}:
            out[k] = v
    return out


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.pretrain_target", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), help="the model preset (default: small)")
    ap.add_argument("--config", help="YAML/JSON run file (PretrainConfig)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted key = YAML value, e.g. train.steps=30 or model.dim=96 (repeatable)")
    ap.add_argument("--corpus", help="corpus folder (python -m train.corpus)")
    ap.add_argument("--tokenizer", help="tokenizer folder or tokenizer.json (python -m train.tokenizer_train)")
    ap.add_argument("--out", help="run folder")
    ap.add_argument("--max-minutes", type=float, help="stop (with a checkpoint) after this long; rerun resumes")
    args = ap.parse_args(argv)
    flags = {"preset": args.preset, "out_dir": args.out, "data": {"corpus": args.corpus, "tokenizer": args.tokenizer},
             "train": {"max_minutes": args.max_minutes}}
    pcfg = load_config(args.config, args.override, data=_given(flags))
    _setup_jax_cache()
    print(json.dumps(run(pcfg)))
    return 0


def main(argv=None) -> int:
    return run_command(_main, argv)




if __name__ == "__main__":
    sys.exit(main())
