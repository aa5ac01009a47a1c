"""Stage 3 of the built-in small model (issue 8): pretrain a small DeepSeek-V4 target with its MTP block.

    python -m train.pretrain_target --preset small --corpus runs/small/corpus --tokenizer runs/small/tokenizer \
        --out runs/small/target [--override steps=1200] [--override model.dim=160] [--max-minutes 50]
    python -m train.pretrain_target --config my_run.json [--override k=v ...]

`--config` is a JSON file {"preset": "small", "model": {TargetConfig overrides}, "train": {TrainConfig fields},
"corpus": ..., "tokenizer": ..., "out": ...}; command-line flags and `--override` win over it. An override key is a
TrainConfig field (`steps`, `lr`, ..., optionally `train.`-prefixed) or `model.<TargetConfig field>`; values parse
as JSON when they can (`model.compress_ratios=[0,4,16,4,0,0]`), else as strings.

The model (`small` preset, `SMALL_PRESET`): every DeepSeek-V4 feature at a size that trains on 2 CPU cores —
mHC with 4 streams and 20 Sinkhorn iterations, SWA / CSA (overlapping compressor + lightning indexer whose top-16
really selects among 64 entries at 256 tokens) / HCA (ratio 16), sinks, grouped low-rank output, a hash-routed MoE
layer then score-routed ones (8 experts, top-2, one shared, sqrt-softplus, route scale 1.5), and one MTP block.
`model.vocab_size` and the bos/eos ids always come from the tokenizer.

Objective (DeepSeek-V3 §2.2 / V4, spec §6): L = CE(main) + λ·CE(MTP), λ = `mtp_weight` (0.3, V3's early value).
For a window of S + 1 tokens t_0..t_S: the main model reads t_0..t_{S-1} and predicts t_{i+1} at i; the MTP block
at i takes the main model's final pre-collapse streams H[i] and the embedding of t_{i+1}, and predicts t_{i+2}
(i = 0..S−2). Gradients flow from the MTP loss into the trunk, as in DeepSeek's training.

Only `nnx.Param`s train (AdamW, linear warmup then cosine to `min_lr_ratio`, global-norm clipping, weight decay on
matrices only). The `Buffer`s never get gradients: the hash layers' token→expert table (`tid2eid`) is drawn once
at init (a fixed random k-subset of experts per token id, as a hash would give), and the routed layers'
score-correction bias follows DeepSeek-V3's auxiliary-loss-free balancing, b_e += γ·sign(mean load − load_e)
per step (γ = `bias_update_speed`; 0 freezes it), with the loads read from the gates' outputs (`nnx.capture`).

Data: `train.jsonl` / `heldout.jsonl` of the corpus, rendered (`train.tokenizer_train.render_document`: chat
documents in the chat format, text documents as <|bos|>text<|eos|>), tokenized once and cached as uint16 under
`<out>/data/`, concatenated; a step takes `batch_size` windows of S + 1 tokens at offsets drawn from
`np.random.default_rng([seed, step])`, so a resumed run sees exactly the batches it would have seen. Validation:
`eval_batches` fixed windows of the held-out split.

Output folder:
    run_config.json          the model and training configs (a resume must agree on the model)
    ckpt/step_XXXXXXX/       orbax training state (params, optimizer state, buffers, step), the last `keep_ckpts`
    metrics.jsonl            one line per `log_every` steps and per evaluation (loss, ce, mtp_ce, lr, grad norm,
                             tokens/s, expert-load imbalance, elapsed)
    model/                   the finished target: `hdflash_jax.checkpoint.load_params("<out>/model")` loads it
Resumable: rerunning the same command continues from the last checkpoint; `--max-minutes` stops cleanly (with a
checkpoint) so a long run can be done in pieces.

Measured (`small`, batch 8 × 256, real corpus of 2.37M tokens): 4,424,550 parameters; 1,133 tokens/s (1.8 s/step)
on 2 dedicated CPU cores (`taskset -c 0,1`, compile 21 s), so the default 1,200 steps (2.46M tokens, ~1 epoch)
take ≈ 36 min; held-out CE 4.35 / 3.94 / 3.62 / 3.45 at steps 200 / 400 / 800 / 1200 (MTP CE within 0.02 of it);
4,000 steps (≈ 2 h on 2 cores) reach 3.02. lr 4e-3 gives the same curve, 8e-3 a worse one. One H100: ~200k
tokens/s at batch 8 (the 1,200 steps in ~30 s after a 40 s compile).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from hdflash_jax.config import TargetConfig

SMALL_PRESET = TargetConfig(
    vocab_size=4096, dim=128, n_layers=5, n_heads=4, head_dim=64, rope_head_dim=16, q_lora_rank=64, o_groups=2,
    o_lora_rank=64, window_size=64, index_n_heads=4, index_head_dim=32, index_topk=16, n_routed_experts=8,
    n_activated_experts=2, n_shared_experts=1, moe_inter_dim=128, n_hash_layers=1, route_scale=1.5,
    hc_mult=4, hc_sinkhorn_iters=20, original_seq_len=256, compress_ratios=(0, 4, 16, 4, 0, 0), n_mtp_layers=1,
    max_seq_len=4096, bos_token_id=0, eos_token_id=1, dtype="float32", param_dtype="float32",
)
PRESETS = {"small": SMALL_PRESET}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 1200
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    mtp_weight: float = 0.3
    bias_update_speed: float = 1e-3
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    ckpt_every: int = 100
    keep_ckpts: int = 2
    moe_dispatch: str = "dense"

    def __post_init__(self):
        for f in ("seq_len", "batch_size", "steps", "log_every", "eval_every", "ckpt_every", "keep_ckpts",
                  "eval_batches"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"TrainConfig.{f}: must be >= 1, got {getattr(self, f)}")
        if self.seq_len < 3:
            raise ValueError("TrainConfig.seq_len: the MTP loss needs at least 3 tokens")
        if self.warmup_steps < 0 or self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("TrainConfig: lr > 0, warmup_steps >= 0, 0 <= min_lr_ratio <= 1")
        if self.moe_dispatch not in ("dense", "ragged"):
            raise ValueError(f"TrainConfig.moe_dispatch: 'dense' or 'ragged', got {self.moe_dispatch!r}")


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
    from hdflash_jax.deepseek_v4.cache import init_cache
    from hdflash_jax.deepseek_v4.model import forward_full

    x, y, nxt, y2 = split_window(tokens)
    out = forward_full(model, x)
    b, s = x.shape
    mtp_logits = None
    if model.cfg.n_mtp_layers:
        cache = init_cache(model.cfg, b, s - 1, max_block=1)
        mtp_logits, _, _ = model.mtp_step(out.streams[:, :s - 1], nxt, cache)
    return out.logits, y, mtp_logits, y2


def cross_entropy(logits, labels):
    import jax
    import jax.numpy as jnp

    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


def losses(model, tokens, mtp_weight: float):
    """(total, {"ce", "mtp_ce"}) for a window [B, S+1]."""
    import jax.numpy as jnp

    logits, y, mtp_logits, y2 = model_outputs(model, tokens)
    ce = jnp.mean(cross_entropy(logits, y))
    mtp_ce = jnp.mean(cross_entropy(mtp_logits, y2)) if mtp_logits is not None else jnp.zeros((), jnp.float32)
    return ce + mtp_weight * mtp_ce, {"ce": ce, "mtp_ce": mtp_ce}


# ---- model state ---------------------------------------------------------------------------------------------

def build_model(cfg: TargetConfig, seed: int, moe_dispatch: str = "dense"):
    """`init_target(cfg, seed)` with the initialisation compiled as one program (eager init dispatches, and on a
    busy CPU compiles, hundreds of small ops); the same values."""
    import jax
    from flax import nnx

    from hdflash_jax.deepseek_v4.model import init_target

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: init_target(cfg, seed, moe_dispatch=moe_dispatch)))
    state = jax.jit(lambda: nnx.state(init_target(cfg, seed, moe_dispatch=moe_dispatch)))()
    return nnx.merge(graphdef, state)


def init_hash_tables(model, seed: int) -> None:
    """Fill every hash layer's tid2eid with a fixed random set of k distinct experts per token id."""
    import jax.numpy as jnp

    cfg = model.cfg
    gates = [(i, layer.ffn.gate) for i, layer in enumerate(model.layers) if layer.ffn.gate.hashed]
    for i, gate in gates:
        rng = np.random.default_rng([seed, 7919, i])
        table = np.argsort(rng.random((cfg.vocab_size, cfg.n_routed_experts)), axis=1)[:, :cfg.n_activated_experts]
        gate.tid2eid.set_value(jnp.asarray(table, jnp.int32))


def dotted(path) -> str:
    return ".".join(str(k) for k in path)


def flat_values(state) -> dict[str, Any]:
    from flax import nnx

    return {dotted(p): v.get_value() for p, v in nnx.to_flat_state(state)}


def set_flat_values(state, values: dict[str, Any]):
    """A copy of NNX `state` with its leaves replaced by `values` ({dotted path: array})."""
    from flax import nnx

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


# ---- the training program -------------------------------------------------------------------------------------

class Trainer:
    """Holds the split model (graphdef, params, buffers), the optimizer and the jitted step/eval."""

    def __init__(self, cfg: TargetConfig, tcfg: TrainConfig, seed: int | None = None):
        import jax
        import jax.numpy as jnp
        import optax
        from flax import nnx

        self.cfg, self.tcfg = cfg, tcfg
        model = build_model(cfg, tcfg.seed if seed is None else seed, tcfg.moe_dispatch)
        init_hash_tables(model, tcfg.seed)
        self.gate_paths = routed_gate_paths(model)
        self.graphdef, params, buffers = nnx.split(model, nnx.Param, ...)
        self.params_template, self.buffers_template = params, buffers
        self.params = flat_values(params)
        self.buffers = flat_values(buffers)
        if tcfg.warmup_steps:
            self.schedule = optax.warmup_cosine_decay_schedule(
                0.0, tcfg.lr, tcfg.warmup_steps, max(tcfg.steps, tcfg.warmup_steps + 1),
                end_value=tcfg.lr * tcfg.min_lr_ratio)
        else:
            self.schedule = optax.cosine_decay_schedule(tcfg.lr, max(tcfg.steps, 1), alpha=tcfg.min_lr_ratio)
        decay_mask = {k: v.ndim >= 2 for k, v in self.params.items()}
        self.tx = optax.chain(
            optax.clip_by_global_norm(tcfg.grad_clip),
            optax.adamw(self.schedule, b1=tcfg.b1, b2=tcfg.b2, weight_decay=tcfg.weight_decay, mask=decay_mask))
        self.opt_state = self.tx.init(self.params)
        self.step = 0
        graphdef, ptmpl, btmpl = self.graphdef, params, buffers
        gate_paths, mtp_w, gamma = self.gate_paths, tcfg.mtp_weight, tcfg.bias_update_speed
        n_exp = cfg.n_routed_experts

        def merge(p, b):
            return nnx.merge(graphdef, set_flat_values(ptmpl, p), set_flat_values(btmpl, b))

        def loss_fn(p, b, tokens):
            model = merge(p, b)
            (loss, parts), inter = nnx.capture(lambda m, t: losses(m, t, mtp_w), nnx.Intermediate,
                                               method_outputs=nnx.Intermediate)(model, tokens)
            got = flat_values(inter)
            loads = []
            for g in gate_paths:
                idx = got[f"{g}.__call__"][0][0]  # Gate.__call__ → (expert ids [N, k], weights [N, k])
                loads.append(jnp.bincount(idx.reshape(-1), length=n_exp).astype(jnp.float32))
            return loss, (parts, jnp.stack(loads) if loads else jnp.zeros((0, n_exp)))

        def train_step(p, b, opt_state, tokens):
            (loss, (parts, loads)), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, b, tokens)
            updates, opt_state = self.tx.update(grads, opt_state, p)
            p = optax.apply_updates(p, updates)
            b = dict(b)
            for g, load in zip(gate_paths, loads):
                err = jnp.sign(jnp.mean(load) - load)  # raise the bias of under-loaded experts
                b[f"{g}.bias"] = b[f"{g}.bias"] + gamma * err
            imbalance = jnp.max(loads, axis=-1) / jnp.maximum(jnp.mean(loads, axis=-1), 1e-9) if gate_paths else \
                jnp.ones((1,))
            metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads),
                       "max_load_ratio": jnp.max(imbalance)}
            return p, b, opt_state, metrics

        def eval_step(p, b, tokens):
            loss, parts = losses(merge(p, b), tokens, mtp_w)
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

    # -- checkpoints ---------------------------------------------------------------------------------------
    def state_tree(self) -> dict:
        import jax
        import jax.numpy as jnp

        from hdflash_jax.checkpoint import nest

        opt_leaves = jax.tree.leaves(self.opt_state)
        return {"params": nest(self.params), "buffers": nest(self.buffers),
                "opt": {f"{i:05d}": x for i, x in enumerate(opt_leaves)}, "step": jnp.asarray(self.step, jnp.int32)}

    def save(self, path: Path) -> None:
        from hdflash_jax.checkpoint import _ocp, tmp_path_for

        path = Path(path).resolve()  # orbax refuses relative paths
        tmp = tmp_path_for(path)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        _ocp().save(tmp, self.state_tree())
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)

    def restore(self, path: Path) -> None:
        import jax

        from hdflash_jax.checkpoint import _ocp, flatten

        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                self.state_tree())
        got = _ocp().load(Path(path).resolve(), abstract)
        self.params = flatten(got["params"])
        self.buffers = flatten(got["buffers"])
        treedef = jax.tree.structure(self.opt_state)
        self.opt_state = jax.tree.unflatten(treedef, [got["opt"][f"{i:05d}"] for i in range(treedef.num_leaves)])
        self.step = int(got["step"])


# ---- data ----------------------------------------------------------------------------------------------------

def tokenize_corpus(corpus_dir: Path, tokenizer_json: Path, out_dir: Path, log=print) -> dict[str, np.ndarray]:
    """Render and tokenize train/heldout once; cached under out_dir as uint16 .npy keyed by the inputs' hashes."""
    from tokenizers import Tokenizer

    from train.tokenizer_train import MASK, TOKENIZER_VERSION, render_document

    key = hashlib.sha256((corpus_dir / "manifest.json").read_bytes() + tokenizer_json.read_bytes()
                         + f"render-v{TOKENIZER_VERSION}".encode()).hexdigest()[:16]
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(tokenizer_json))
    mask_id = tok.token_to_id(MASK)
    arrays = {}
    for split in ("train", "heldout"):
        f = out_dir / f"{split}-{key}.npy"
        if f.is_file():
            arrays[split] = np.load(f, mmap_mode="r")
            continue
        with open(corpus_dir / f"{split}.jsonl", encoding="utf-8") as fh:
            texts = [render_document(json.loads(line)) for line in fh]
        enc = tok.encode_batch(texts, add_special_tokens=False)
        ids = np.concatenate([np.asarray(e.ids, np.uint16) for e in enc])
        if tok.get_vocab_size(with_added_tokens=True) > 65535:
            raise ValueError("vocabulary too large for uint16 token files")
        if mask_id is not None and np.any(ids == mask_id):
            raise ValueError(f"{split}: the mask token occurs in the corpus")
        np.save(f, ids)
        log(f"data: {split}: {len(texts)} documents → {len(ids):,} tokens ({f.name})")
        arrays[split] = ids
    return arrays


def sample_windows(tokens: np.ndarray, batch: int, length: int, rng: np.random.Generator) -> np.ndarray:
    starts = rng.integers(0, len(tokens) - length, size=batch)
    return np.stack([np.asarray(tokens[s:s + length], np.int32) for s in starts])


def train_batch(tokens: np.ndarray, tcfg: TrainConfig, step: int) -> np.ndarray:
    return sample_windows(tokens, tcfg.batch_size, tcfg.seq_len + 1, np.random.default_rng([tcfg.seed, step]))


def eval_windows(tokens: np.ndarray, tcfg: TrainConfig) -> list[np.ndarray]:
    rng = np.random.default_rng([tcfg.seed, 10 ** 9])
    return [sample_windows(tokens, tcfg.batch_size, tcfg.seq_len + 1, rng) for _ in range(tcfg.eval_batches)]


# ---- configuration -------------------------------------------------------------------------------------------

def parse_value(s: str):
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return s


def resolve_config(preset: str | None, config_file: str | None, overrides: list[str]) -> dict:
    """{"model": TargetConfig kwargs-overrides, "train": TrainConfig kwargs, "preset", "corpus", "tokenizer",
    "out"} from a preset, a JSON file and `k=v` overrides (in that order)."""
    spec: dict = {"preset": None, "model": {}, "train": {}}
    if config_file:
        d = json.loads(Path(config_file).read_text())
        unknown = set(d) - {"preset", "model", "train", "corpus", "tokenizer", "out"}
        if unknown:
            raise ValueError(f"{config_file}: unknown keys {sorted(unknown)}")
        spec.update({k: v for k, v in d.items() if k not in ("model", "train")})
        spec["model"].update(d.get("model", {}))
        spec["train"].update(d.get("train", {}))
    if preset:
        spec["preset"] = preset
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model_fields = {f.name for f in dataclasses.fields(TargetConfig)}
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"--override {o!r}: expected key=value")
        k, v = o.split("=", 1)
        k = k.strip()
        if k.startswith("model."):
            if k[6:] not in model_fields:
                raise ValueError(f"--override {k}: not a TargetConfig field")
            spec["model"][k[6:]] = parse_value(v)
        else:
            k = k[6:] if k.startswith("train.") else k
            if k not in train_fields:
                raise ValueError(f"--override {k}: not a TrainConfig field (model fields take a 'model.' prefix)")
            spec["train"][k] = parse_value(v)
    if not spec.get("preset"):
        spec["preset"] = "small"
    if spec["preset"] not in PRESETS:
        raise ValueError(f"unknown preset {spec['preset']!r}; one of {sorted(PRESETS)}")
    return spec


def build_configs(spec: dict, vocab_size: int | None = None, bos: int = 0, eos: int = 1):
    model_kw = dict(spec["model"])
    if "compress_ratios" in model_kw:
        model_kw["compress_ratios"] = tuple(model_kw["compress_ratios"])
    if vocab_size is not None:
        model_kw.update(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos)
    cfg = PRESETS[spec["preset"]].replace(**model_kw)
    tcfg = TrainConfig(**spec["train"])
    if tcfg.seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len {tcfg.seq_len} exceeds model.max_seq_len {cfg.max_seq_len}")
    return cfg, tcfg


# ---- main loop -----------------------------------------------------------------------------------------------

def _ckpts(out: Path) -> list[Path]:
    d = out / "ckpt"
    return sorted(p for p in d.glob("step_*") if p.is_dir() and ".tmp-" not in p.name) if d.is_dir() else []


def run(spec: dict, corpus: Path, tokenizer: Path, out: Path, max_minutes: float | None = None,
        log=print) -> dict:
    import jax
    from tqdm import tqdm

    from hdflash_jax.checkpoint import save_params
    from tokenizers import Tokenizer

    from train.tokenizer_train import BOS, EOS

    t_start = time.time()
    tok_json = tokenizer / "tokenizer.json" if tokenizer.is_dir() else tokenizer
    tk = Tokenizer.from_file(str(tok_json))
    cfg, tcfg = build_configs(spec, tk.get_vocab_size(with_added_tokens=True), tk.token_to_id(BOS),
                              tk.token_to_id(EOS))
    out.mkdir(parents=True, exist_ok=True)
    run_cfg = {"model": cfg.to_dict(), "train": dataclasses.asdict(tcfg), "corpus": str(corpus),
               "tokenizer": str(tok_json)}
    rc = out / "run_config.json"
    if rc.is_file():
        old = json.loads(rc.read_text())
        if old["model"] != run_cfg["model"]:
            raise ValueError(f"{out}: holds a run with another model config; use a new --out")
        changed = {k for k in run_cfg["train"] if old["train"].get(k) != run_cfg["train"][k]}
        if changed - {"steps", "log_every", "eval_every", "ckpt_every", "keep_ckpts"}:
            log(f"warning: resuming with changed training settings {sorted(changed)}")
    rc.write_text(json.dumps(run_cfg, indent=1))

    data = tokenize_corpus(corpus, tok_json, out / "data", log=log)
    train_tokens, held_tokens = data["train"], data["heldout"]
    trainer = Trainer(cfg, tcfg)
    log(f"model: {trainer.n_params():,} parameters; {len(train_tokens):,} train tokens, {len(held_tokens):,} "
        f"held-out; {tcfg.batch_size}×{tcfg.seq_len} tokens/step, {tcfg.steps} steps "
        f"({tcfg.steps * tcfg.batch_size * tcfg.seq_len / len(train_tokens):.2f} epochs)")
    ck = _ckpts(out)
    if ck:
        trainer.restore(ck[-1])
        log(f"resumed from {ck[-1]} (step {trainer.step})")
    evals = eval_windows(held_tokens, tcfg)
    metrics_f = open(out / "metrics.jsonl", "a")
    tokens_per_step = tcfg.batch_size * tcfg.seq_len

    def write(rec):
        metrics_f.write(json.dumps(rec) + "\n")
        metrics_f.flush()

    def evaluate():
        acc = {}
        for w in evals:
            for k, v in trainer.eval_step(w).items():
                acc[k] = acc.get(k, 0.0) + float(v) / len(evals)
        return acc

    last = {}
    stopped_early = False
    bar = tqdm(total=tcfg.steps, initial=trainer.step, desc="pretrain", dynamic_ncols=True, file=sys.stdout)
    t_window, n_window = time.time(), 0
    while trainer.step < tcfg.steps:
        m = trainer.train_step(train_batch(train_tokens, tcfg, trainer.step))
        n_window += 1
        step = trainer.step
        if step % tcfg.log_every == 0 or step == tcfg.steps or step == 1:
            m = {k: float(v) for k, v in m.items()}
            dt = time.time() - t_window
            tps = n_window * tokens_per_step / dt
            t_window, n_window = time.time(), 0
            rec = {"step": step, **m, "lr": float(trainer.schedule(step - 1)), "tokens_per_s": round(tps, 1),
                   "tokens": step * tokens_per_step, "elapsed_s": round(time.time() - t_start, 1)}
            write(rec)
            last = rec
            bar.set_postfix(loss=f"{m['loss']:.3f}", ce=f"{m['ce']:.3f}", mtp=f"{m['mtp_ce']:.3f}",
                            tok_s=f"{tps:.0f}")
        bar.update(1)
        if step % tcfg.eval_every == 0 or step == tcfg.steps:
            ev = evaluate()
            write({"step": step, **{f"val_{k}": v for k, v in ev.items()},
                   "elapsed_s": round(time.time() - t_start, 1)})
            bar.write(f"step {step}: val ce {ev['ce']:.4f} (ppl {math.exp(ev['ce']):.1f}), val mtp ce "
                      f"{ev['mtp_ce']:.4f}")
            last.update({f"val_{k}": v for k, v in ev.items()})
        timeout = max_minutes is not None and time.time() - t_start > max_minutes * 60
        if step % tcfg.ckpt_every == 0 or step == tcfg.steps or timeout:
            trainer.save(out / "ckpt" / f"step_{step:07d}")
            for old in _ckpts(out)[:-tcfg.keep_ckpts]:
                shutil.rmtree(old, ignore_errors=True)
        if timeout and step < tcfg.steps:
            bar.write(f"stopping at step {step}: --max-minutes {max_minutes} reached (rerun to resume)")
            stopped_early = True
            break
    bar.close()
    metrics_f.close()
    if not stopped_early and trainer.step >= tcfg.steps and not (out / "model").exists():
        save_params(out / "model", trainer.model(), cfg)
        log(f"saved the target to {out / 'model'} (hdflash_jax.checkpoint.load_params)")
    jax.effects_barrier()
    return {"step": trainer.step, "finished": trainer.step >= tcfg.steps, **last}


def _setup_jax_cache() -> None:
    """JAX's persistent compilation cache (the repository's .jax_cache, or $HDFLASH_JAX_CACHE): a resumed run
    skips the compile."""
    import jax

    cache = os.environ.get("HDFLASH_JAX_CACHE", str(Path(__file__).resolve().parents[1] / ".jax_cache"))
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS))
    ap.add_argument("--config", help="JSON run file (module docstring)")
    ap.add_argument("--override", action="append", default=[], metavar="K=V")
    ap.add_argument("--corpus", help="corpus folder (python -m train.corpus)")
    ap.add_argument("--tokenizer", help="tokenizer folder or tokenizer.json (python -m train.tokenizer_train)")
    ap.add_argument("--out", help="run folder")
    ap.add_argument("--max-minutes", type=float, help="stop (with a checkpoint) after this long; rerun resumes")
    args = ap.parse_args(argv)
    spec = resolve_config(args.preset, args.config, args.override)
    corpus = args.corpus or spec.get("corpus")
    tokenizer = args.tokenizer or spec.get("tokenizer")
    out = args.out or spec.get("out")
    if not (corpus and tokenizer and out):
        ap.error("--corpus, --tokenizer and --out are required (flags or config file)")
    _setup_jax_cache()
    res = run(spec, Path(corpus), Path(tokenizer), Path(out), max_minutes=args.max_minutes)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
