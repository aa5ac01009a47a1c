"""The built-in small model, end to end: one command, resumable, every stage cached.

    python -m train.small_pipeline [--size full|ci] [--out runs/small] [--ship models/small] [--stages all]

Stages (each is the command it prints, run as a subprocess; a stage whose output exists is skipped, and an
interrupted stage resumes where its own command resumes):

  corpus      python -m train.corpus                 offline corpus, eval-overlap check
  tokenizer   python -m train.tokenizer_train        byte-level BPE, chat format "role_tags", mask = last id
  target      python -m train.pretrain_target        small DeepSeek-V4 + MTP block, joint MTP loss
  regen       python -m train.regenerate             the target's own greedy answers to training prompts
  drafters    python -m train.drafter  (per variant) HyperDFlash, vanilla DFlash and the ablations, one budget
  ship        copy target + tokenizer + hyperdflash + dflash into --ship (what `--target small` loads)
  eval        python -m eval.run  (greedy, T = 1, ablations) on the five suites
  report      merge the eval runs into <out>/results/results.json, results.md and the plots

Sizes: `full` is the shipped model (hours on 2 CPU cores); `ci` is the same pipeline at toy sizes (minutes), used
by the slow test
`tests/test_small_pipeline.py::test_pipeline_ci_size`.

Same budget for every drafter variant: the same regenerated data, steps, global batch, anchors per sequence,
sequence length, optimizer and draft-layer shapes; only the named difference changes (see `VARIANTS`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from eval.methods import is_builtin
from eval.report import summary_table
from eval.results import SEED_SUFFIX
from hdflash_jax.cli import run_command
from hdflash_jax.families import family
from hdflash_jax.fileio import OutputKind, atomic_dir, atomic_write_text, check_output, has_files, read_json
from hdflash_jax.train_config import load_config as load_drafter_config

REPO = Path(__file__).resolve().parents[1]
STAGES = ("corpus", "tokenizer", "target", "regen", "drafters", "ship", "eval", "report")

@dataclasses.dataclass(frozen=True)
class Variant:
    """One drafter of the comparison: what differs from the shared budget (everything else is `SIZES[...]`)."""
    overrides: dict  # fields of its family's config (DrafterConfig for "block", DSparkConfig for "dspark")
    loss: dict = dataclasses.field(default_factory=dict)  # its family's loss config, over the family's base
    block: int = 8  # the training block (a DSpark block of B slots drafts B tokens: B = 7 is the others' budget)
    kind: str = "block"  # the drafter family (hdflash_jax.families)
    regen: str = "greedy"  # the regenerated responses it trains on: "greedy" or "t1" (sampled at T = 1)
    budget: int = 1  # training steps = budget × the size's steps (same batch, lr schedule stretched)

    def design(self) -> str:
        """What the drafter is, as its family describes it (from the fields this variant sets)."""
        fam = family(self.kind)
        n = self.overrides.get("n_kv_heads")
        kv = "" if n is None else f" ({n} KV head{'s' if n != 1 else ''})"
        return fam.describe(fam.section_cls(**self.overrides)) + kv

    def loss_text(self) -> str:
        fam = family(self.kind)
        return fam.describe_loss(fam.loss_cls(**{**BASE_LOSS[self.kind], **self.loss}))


# 'hyperdflash' and 'dflash' are the two methods of the paper; the ablations each differ from one of them in one
# thing; 'dspark' / 'dspark-gated' are DeepSeek's block drafter (mean pooling / the inherited hc_head gate) at the
# same draft budget (7 drafts a step) and depth (2 blocks); the '-t1' drafters train on responses sampled at T = 1.
DSPARK_SHAPE = {"n_blocks": 2, "markov_rank": 32}
DFLASH2_PARTS = {"conv_kernel_size": 2, "conv_group_size": 16, "selector_rank": 32, "selector_top_k": 16}
VARIANTS: dict[str, Variant] = {
    "hyperdflash": Variant({"conditioning": "final_streams", "reducer": "gated"}),
    "dflash": Variant({"conditioning": "layers", "reducer": "linear", "post_norm": False}),
    "hd-linear": Variant({"conditioning": "final_streams", "reducer": "linear", "post_norm": False}),  # vs gated
    "hd-layers": Variant({"conditioning": "layers", "reducer": "gated"}),  # final streams vs several layers
    "hd-nokl": Variant({"conditioning": "final_streams", "reducer": "gated"}, {"kl_alpha": 0.0}),  # without KL
    "hd-b16": Variant({"conditioning": "final_streams", "reducer": "gated"}, block=16),  # block 16 vs 8
    "dspark": Variant({**DSPARK_SHAPE, "pooling": "mean"}, block=7, kind="dspark"),
    "dspark-gated": Variant({**DSPARK_SHAPE, "pooling": "gated"}, block=7, kind="dspark"),
    # why the gate loses here: a learnt RMSNorm per stream before the gate; the gate plus a rank-32 residual
    "hd-pathnorm": Variant({"conditioning": "final_streams", "reducer": "gated", "gate_path_norm": True}),
    "hd-lowrank": Variant({"conditioning": "final_streams", "reducer": "gated", "gate_residual_rank": 32}),
    "hyperdflash-t1": Variant({"conditioning": "final_streams", "reducer": "gated"}, regen="t1"),
    "dflash-t1": Variant({"conditioning": "layers", "reducer": "linear", "post_norm": False}, regen="t1"),
    # two and four times the training budget: is the gate's deficit one of convergence speed?
    "hyperdflash-x2": Variant({"conditioning": "final_streams", "reducer": "gated"}, budget=2),
    "dflash-x2": Variant({"conditioning": "layers", "reducer": "linear", "post_norm": False}, budget=2),
    "hyperdflash-x4": Variant({"conditioning": "final_streams", "reducer": "gated"}, budget=4),
    "dflash-x4": Variant({"conditioning": "layers", "reducer": "linear", "post_norm": False}, budget=4),
    # the other two corners of the 2 x 2 at four times the budget: which half is the 4x residual?
    "hd-linear-x4": Variant({"conditioning": "final_streams", "reducer": "linear", "post_norm": False}, budget=4),
    "hd-layers-x4": Variant({"conditioning": "layers", "reducer": "gated"}, budget=4),
    # the KL term on every draft slot (the paper: 2) for sampling, where acceptance is 1 − TV(target, draft) per slot
    "hyperdflash-t1-kl7": Variant({"conditioning": "final_streams", "reducer": "gated"}, {"kl_slots": 7}, regen="t1"),
    "hyperdflash-t1-kl7a1": Variant({"conditioning": "final_streams", "reducer": "gated"},
                                    {"kl_slots": 7, "kl_alpha": 1.0}, regen="t1"),
    # the V4-Flash presets' KV-head cut (8 -> 2 of 32 query heads) at this size: the same 4 heads x 32 with 4 KV
    # heads (one per query head) or 1 (4x fewer), so only the KV projections' width differs (shipped: 2)
    "hd-kv4": Variant({"conditioning": "final_streams", "reducer": "gated", "n_kv_heads": 4}),
    "hd-kv1": Variant({"conditioning": "final_streams", "reducer": "gated", "n_kv_heads": 1}),
    # DFlash 2 on both conditionings: the block drafters plus the convolution and the selector, the selector's rank
    # that of DSpark's Markov head (32: both ≈ 2·V·32 parameters), so "does the selector beat the Markov head" is
    # asked at equal parameters
    "dflash2": Variant({"conditioning": "layers", "reducer": "linear", "post_norm": False, **DFLASH2_PARTS},
                       kind="dflash2"),
    "hyperdflash2": Variant({"conditioning": "final_streams", "reducer": "gated", **DFLASH2_PARTS}, kind="dflash2"),
    # the convolution alone: one candidate leaves the selector nothing to choose (greedy: DFlash + convolutions)
    "dflash2-conv": Variant({"conditioning": "layers", "reducer": "linear", "post_norm": False, **DFLASH2_PARTS,
                             "selector_top_k": 1}, kind="dflash2"),
}
SHIPPED = ("hyperdflash", "dflash", "dspark", "dspark-gated", "dflash2", "hyperdflash2")
MAIN_METHODS = ("ar", "mtp3", "mtp7", "dflash", "hyperdflash", "dspark", "dspark-gated", "dflash2", "hyperdflash2")
GATE_VARIANTS = ("hd-pathnorm", "hd-lowrank")  # evaluated beside hyperdflash and dflash in their own run
REGEN_DIRS = {"greedy": "regen", "t1": "regen-t1"}
# per family: the loss a Variant's `loss` overrides (DSpark: DeepSpec's recipe, its loss config's defaults)
BASE_LOSS = {"block": {"gamma": None, "kl_alpha": 0.1, "kl_slots": 2, "kl_temperature": 1.0}, "dspark": {}}
BASE_LOSS["dflash2"] = {**BASE_LOSS["block"], "selector_alpha": 1.0}  # speculators' selector_loss_alpha

SIZES: dict[str, dict] = {
    "full": {
        "vocab_size": 4096,
        "pretrain": [],  # the `small` preset and PretrainConfig defaults: 1,200 steps of 8 × 256 tokens
        "regen": {"prompts": 1536, "eval_prompts": 32, "max_new_tokens": 160, "batch_size": 32},
        # the draft layers' shape, per family (a variant's fields go on top)
        "drafter": {"shape": {kind: dict(n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, inter_dim=384)
                              for kind in ("block", "dflash2")},
                    "max_len": 256, "num_anchors": 32, "global_batch": 8, "steps": 400, "lr": 3e-3,
                    "eval_prompts": 16, "eval_max_new_tokens": 96},
        "variants": tuple(VARIANTS),
        "eval": {"limit": 6, "max_new_tokens": 128, "batch_size": 1, "buckets": "128,512"},
    },
    "ci": {
        "vocab_size": 512,
        "pretrain": ["train.steps=30", "train.seq_len=64", "train.batch_size=4", "optim.warmup_steps=5",
                     "train.eval_every=15", "checkpoint.every=15", "train.eval_batches=1", "optim.lr=3e-3",
                     "model.dim=32", "model.n_layers=3", "model.n_heads=2",
                     "model.head_dim=32", "model.rope_head_dim=8", "model.q_lora_rank=16", "model.o_lora_rank=8",
                     "model.window_size=16", "model.index_n_heads=2", "model.index_head_dim=16", "model.index_topk=2",
                     "model.n_routed_experts=4", "model.moe_inter_dim=32", "model.hc_sinkhorn_iters=4",
                     "model.compress_ratios=[0,4,8,0]", "model.original_seq_len=64", "model.max_seq_len=1024"],
        "regen": {"prompts": 48, "eval_prompts": 8, "max_new_tokens": 24, "batch_size": 16},
        "drafter": {"shape": {"block": {"n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "head_dim": 16, "inter_dim": 64}},
                    "max_len": 96, "num_anchors": 8, "global_batch": 8, "steps": 40, "lr": 5e-3,
                    "eval_prompts": 8, "eval_max_new_tokens": 24},
        "variants": ("hyperdflash", "dflash"),
        "eval": {"limit": 1, "max_new_tokens": 16, "batch_size": 1, "buckets": "512"},
    },
}


def _rel(path: Path) -> Path:
    """`path` relative to the repository when it lies inside it (so recorded commands are portable), else absolute."""
    path = path.resolve()
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def _log(msg: str) -> None:
    print(f"[small_pipeline] {msg}", file=sys.stderr, flush=True)


def run_cmd(cmd: list[str], log_file: Path, env: dict | None = None) -> None:
    """Run one stage's command, its output appended to `log_file` (and shown when it fails)."""
    _log("$ " + " ".join(cmd))
    log_file.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_file, "a", encoding="utf-8") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        r = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        tail = log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-40:]
        raise RuntimeError(f"stage command failed (exit {r.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))
    _log(f"  done in {time.time() - t0:.0f}s (log: {log_file})")


# ---- stage 4: prompts ----------------------------------------------------------------------------------------

def _user_prompts(path: Path) -> list[dict]:
    """The first user turn of the chat documents of a corpus split, in file order (deterministic)."""
    with open(path, encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    return [{"id": d["id"], "messages": [d["messages"][0]]} for d in docs if d.get("kind") == "chat"]


def _interleaved(rows: list[dict], limit: int) -> list[dict]:
    """Up to `limit` rows taking the sources round-robin (GSM8K and MBPP both represented)."""
    by_src: dict[str, list[dict]] = {}
    for r in rows:
        by_src.setdefault(r["id"].split("/")[0], []).append(r)
    out, queues = [], [list(v) for v in by_src.values()]
    while len(out) < limit and any(queues):
        for q in queues:
            if q and len(out) < limit:
                out.append(q.pop(0))
    return out


def write_prompts(corpus: Path, dst: Path, split: str, n: int) -> Path:
    rows = _interleaved(_user_prompts(corpus / f"{split}.jsonl"), n)
    return atomic_write_text(dst, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ---- stage 5: drafter configs ----------------------------------------------------------------------------------

def seeded_name(variant: str, seed: int | None) -> str:
    """The drafter folder / eval method of a variant: `<variant>` (the shipped seed 0), `<variant>-s<seed>` for the
    seed study (eval.report groups `-s<seed>` methods of one variant into its training-seed intervals)."""
    return variant if seed is None else f"{variant}-s{seed}"


def drafter_config(name: str, size: dict, out: Path, seed: int | None = None) -> dict:
    """The training config of variant `name`; `seed` (None: the shipped run, seed 0) seeds the drafter's init, the
    RNG and the data order, and names the run `<name>-s<seed>`."""
    v, d = VARIANTS[name], size["drafter"]
    regen = out / REGEN_DIRS[v.regen]
    drafter = {"kind": v.kind, **d["shape"].get(v.kind, {}), **v.overrides, "block_size": v.block,
               "init_from_target": True, "loss": {**BASE_LOSS[v.kind], **v.loss}}
    return {
        "out_dir": str(out / "drafters" / seeded_name(name, seed)),
        "seed": 0 if seed is None else seed,
        "target": {"checkpoint": str(out / "target" / "model")},
        "drafter": drafter,
        "data": {"train": str(regen / "train.jsonl"), "eval": str(out / "regen" / "eval_prompts.jsonl"),
                 "tokenizer": str(out / "tokenizer"), "max_len": d["max_len"], "num_anchors": d["num_anchors"],
                 "shuffle_seed": 0 if seed is None else seed},
        "train": {"global_batch": d["global_batch"], "steps": d["steps"] * v.budget},
        "optim": {"lr": d["lr"], "warmup_frac": 0.04, "grad_clip": 1.0},
        "checkpoint": {"every": 100, "max_to_keep": 1},
        # τ of the untrained drafter, then of the trained one (T = 1 drafters: sampled τ)
        "eval": {"every": d["steps"] * v.budget, "at_start": True, "num_prompts": d["eval_prompts"],
                 "batch_size": d["eval_prompts"], "max_new_tokens": d["eval_max_new_tokens"],
                 "temperature": 1.0 if v.regen == "t1" else 0.0},
        "log": {"every": 10, "tensorboard": False, "progress": False},
        "compilation_cache": os.environ.get("HDFLASH_JAX_CACHE", ".jax_cache"),
    }


# ---- stage 6: evaluation runs ----------------------------------------------------------------------------------

def eval_runs(size: dict, out: Path, variants: tuple[str, ...], seeds: tuple[int, ...] = ()) -> dict[str, list[str]]:
    """name -> eval.run arguments. Main comparison greedy and at T = 1 (there with the '-t1' drafters too);
    ablations greedy; with `seeds`, a greedy run of every variant's `-s<seed>` drafters (the training-seed
    intervals)."""
    e = size["eval"]
    common = ["--target", str(out / "target" / "model"), "--tokenizer", str(out / "tokenizer"), "--suite", "all",
              "--limit", str(e["limit"]), "--max-new-tokens", str(e["max_new_tokens"]),
              "--batch-size", str(e["batch_size"]), "--prompt-buckets", e["buckets"], "--overwrite"]
    drafter = lambda n: ["--drafter", f"{n}=" + str(out / "drafters" / n / "drafter")]  # noqa: E731

    def methods(names):  # the --method list and a --drafter for every name that is not a built-in method
        return ["--method", ",".join(names)] + [a for n in names if not is_builtin(n) for a in drafter(n)]

    main = [m for m in MAIN_METHODS if m not in VARIANTS or m in variants or m in ("dflash", "hyperdflash")]
    t1 = main + [v for v in variants if VARIANTS[v].regen == "t1"]
    runs = {"greedy": common + methods(main), "t1": common + methods(t1) + ["--temperature", "1.0"]}
    ablations = [v for v in variants if v not in MAIN_METHODS + GATE_VARIANTS and VARIANTS[v].regen == "greedy"]
    if ablations:
        runs["ablations"] = common + methods(["hyperdflash", *ablations])
    gates = [v for v in GATE_VARIANTS if v in variants]
    if gates:
        runs["gates"] = common + methods(["hyperdflash", "dflash", *gates])
    if seeds:
        runs["seeds"] = common + methods([seeded_name(v, s) for v in variants for s in seeds])
    return runs


# ---- report ----------------------------------------------------------------------------------------------------

def merge_results(out: Path, runs: dict[str, list[str]], size_name: str) -> dict:
    """One results.json over the eval runs: {"runs": {name: eval.run results}, "summary": ..., "commands": ...}."""
    merged = {"size": size_name, "commands": {}, "runs": {}, "drafter_training": {}}
    for name in runs:
        r = json.loads((out / "eval" / name / "results.json").read_text())
        merged["runs"][name] = r
        merged["commands"][name] = "python -m eval.run " + " ".join(r["config"]["argv"])
    for d in sorted((out / "drafters").glob("*/summary.json")):
        s = json.loads(d.read_text())
        merged["drafter_training"][d.parent.name] = {
            "steps": s.get("steps"), "n_params": s.get("n_params"),
            "tau_start": (s.get("eval_start") or {}).get("eval_tau"), "tau_end": (s.get("eval_end") or {}).get("eval_tau"),
            "train_s": s.get("train_s"), "steps_per_s": s.get("steps_per_s")}
    return merged


def render_report(merged: dict) -> str:
    lines = []
    for run, r in merged["runs"].items():
        lines += [f"### {run}\n", summary_table(r), ""]
    lines.append("Cells: speedup over AR (wall clock, same prompts, same run) / τ; avg = mean over the suites.\n")
    if merged.get("drafter_training"):
        lines.append("### drafter variants: held-out τ before / after training (same budget)\n")
        lines.append("| variant | design | loss | B | params | τ untrained | τ trained | train s |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for name, t in merged["drafter_training"].items():
            seeded = SEED_SUFFIX.match(name)
            v = VARIANTS.get(name) or (VARIANTS.get(seeded.group("variant")) if seeded else None)
            f = lambda x, spec: format(x, spec) if x is not None else "–"  # noqa: E731
            design, kl, block = (v.design(), v.loss_text(), v.block) if v is not None else ("–", "–", "–")
            design += " (T=1 data)" if v is not None and v.regen == "t1" else ""
            design += f" ({v.budget}× steps)" if v is not None and v.budget > 1 else ""
            lines.append(f"| {name} | {design} | {kl} | {block} | "
                         f"{f(t['n_params'], ',')} | {f(t['tau_start'], '.3f')} | {f(t['tau_end'], '.3f')} | "
                         f"{f(t['train_s'], '.0f')} |")
        lines.append("\nHeld-out τ: the real speculative decoder (greedy; T = 1 for the T=1-data drafters) on held-out "
                     "corpus prompts (train.drafter eval), block = the variant's B; loss: the decayed CE with "
                     "KL α × slots (or none), TV+CE: DeepSpec's.\n")
    for name, cmd in merged["commands"].items():
        lines.append(f"- {name}: `{cmd}`")
    return "\n".join(lines) + "\n"


def plot_acceptance(merged: dict, path: Path) -> None:
    """Per-position acceptance (pooled over suites) of every method of every run, one panel per run."""
    import matplotlib  # here: only the report stage draws, and the backend must be chosen before pyplot's import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = merged["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), squeeze=False)
    for ax, (name, r) in zip(axes[0], runs.items()):
        pooled: dict[str, list] = {}
        for methods in r["suites"].values():
            for m, st in methods.items():
                acc, n = st.get("accept_rate_by_pos"), st.get("steps") or 0
                if m == "ar" or not acc:
                    continue
                pooled.setdefault(m, []).append((acc, n))
        for m, lst in pooled.items():
            k = max(len(a) for a, _ in lst)
            num = [sum(a[i] * n for a, n in lst if i < len(a) and a[i] is not None) for i in range(k)]
            den = [sum(n for a, n in lst if i < len(a) and a[i] is not None) for i in range(k)]
            ax.plot(range(1, k + 1), [x / d if d else float("nan") for x, d in zip(num, den)], marker="o", label=m)
        ax.set_title(name)
        ax.set_xlabel("draft position")
        ax.set_ylabel("acceptance rate")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the pipeline ----------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.small_pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--out", default=None, help="run folder (default: runs/small, or runs/small-ci for --size ci)")
    p.add_argument("--ship", default=None,
                   help="folder for the finished model (default: models/small for --size full; none for ci)")
    p.add_argument("--results", default=None,
                   help="also copy the report here (default: results/small for --size full; none for ci)")
    p.add_argument("--stages", default="all", help=f"comma list of {', '.join(STAGES)} (default: all)")
    p.add_argument("--variants", default=None, help="drafter variants to train (default: the size's)")
    p.add_argument("--seeds", default=None,
                   help="comma list of training seeds: also train every variant once per seed (<variant>-s<seed>) "
                        "and evaluate them together (the seed study; default: none)")
    p.add_argument("--max-pretrain-minutes", type=float, default=None,
                   help="stop pretraining (with a checkpoint) after this long; rerun to resume")
    args = p.parse_args(argv)
    args.stages = STAGES if args.stages == "all" else tuple(s.strip() for s in args.stages.split(","))
    bad = [s for s in args.stages if s not in STAGES]
    if bad:
        p.error(f"unknown stage(s) {bad}; one of {STAGES}")
    args.variants = tuple(args.variants.split(",")) if args.variants else SIZES[args.size]["variants"]
    args.seeds = tuple(int(x) for x in args.seeds.split(",")) if args.seeds else ()
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; one of {tuple(VARIANTS)}")
    return args


def pretrain_command(py: str, size: dict, out: Path, max_minutes: float | None) -> list[str]:
    cmd = [py, "-m", "train.pretrain_target", "--preset", "small", "--corpus", str(out / "corpus"),
           "--tokenizer", str(out / "tokenizer"), "--out", str(out / "target")]
    for o in size["pretrain"]:
        cmd += ["--override", o]
    if max_minutes:
        cmd += ["--max-minutes", str(max_minutes)]
    return cmd


def stage_regen(py: str, size: dict, out: Path, logs: Path, kind: str = "greedy") -> None:
    """The target's own answers to the training prompts: greedy (`regen/`) or sampled at T = 1 (`regen-t1/`)."""
    r, regen = size["regen"], out / REGEN_DIRS[kind]
    done = regen / "done.json"
    if done.is_file():
        _log(f"regen {kind}: cached at {regen}")
        return
    write_prompts(out / "corpus", regen / "prompts.jsonl", "train", r["prompts"])
    write_prompts(out / "corpus", regen / "eval_prompts.jsonl", "heldout", r["eval_prompts"])
    sampling = ["--temperature", "1.0", "--seed", "0"] if kind == "t1" else []
    run_cmd([py, "-m", "train.regenerate", "--target", str(out / "target" / "model"),
             "--data", str(regen / "prompts.jsonl"), "--out", str(regen / "train.jsonl"),
             "--tokenizer", str(out / "tokenizer"), "--max-new-tokens", str(r["max_new_tokens"]),
             "--batch-size", str(r["batch_size"]), "--no-progress", *sampling], logs / f"regen-{kind}.log")
    n = sum(1 for _ in open(regen / "train.jsonl", encoding="utf-8"))
    done.write_text(json.dumps({"records": n}))


def stage_drafters(py: str, size: dict, out: Path, logs: Path, variants: tuple[str, ...],
                   seeds: tuple[int, ...] = ()) -> None:
    for v, seed in [(v, None) for v in variants] + [(v, s) for s in seeds for v in variants]:
        name = seeded_name(v, seed)
        d = out / "drafters" / name
        if (d / "drafter").is_dir() and (d / "summary.json").is_file():
            _log(f"drafter {name}: cached at {d}")
            continue
        d.mkdir(parents=True, exist_ok=True)
        cfg = drafter_config(v, size, out, seed)
        load_drafter_config(data=cfg)  # a bad generated config stops here, before the subprocess
        cfg_file = out / "drafter_configs" / f"{name}.yaml"
        cfg_file.parent.mkdir(parents=True, exist_ok=True)
        cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
        t0 = time.time()
        run_cmd([py, "-m", "train.drafter", "--config", str(cfg_file)], logs / f"drafter-{name}.log")
        s = json.loads((d / "summary.json").read_text())
        s["train_s"] = time.time() - t0
        (d / "summary.json").write_text(json.dumps(s, indent=1))


def stage_report(out: Path, runs: dict[str, list[str]], size_name: str, results: str | None) -> None:
    merged = merge_results(out, runs, size_name)
    rdir = out / "results"
    rdir.mkdir(parents=True, exist_ok=True)
    merged["pipeline_command"] = f"python -m train.small_pipeline --size {size_name}"  # stages: all, cached
    (rdir / "results.json").write_text(json.dumps(merged, indent=1))
    (rdir / "results.md").write_text(render_report(merged))
    plot_acceptance(merged, rdir / "acceptance_by_position.png")
    print(render_report(merged))
    _log(f"wrote {rdir}/results.json, results.md, acceptance_by_position.png")
    publish = Path(results) if results else None
    if publish is not None:
        publish.mkdir(parents=True, exist_ok=True)
        for f in ("results.json", "results.md", "acceptance_by_position.png"):
            shutil.copy2(rdir / f, publish / f)
        _log(f"copied the report to {publish}")


PIPELINE_RUN = OutputKind("a small-pipeline run folder (logs/ or corpus/manifest.json)",
                          lambda p: (p / "logs").is_dir() or (p / "corpus" / "manifest.json").is_file())
SHIPPED_MODEL = OutputKind("a shipped small model (manifest.json written by train.small_pipeline)",
                           lambda p: "train.small_pipeline" in str(read_json(p / "manifest.json").get("built_by", ""))
                           if (p / "manifest.json").is_file() else False)
PUBLISHED = OutputKind("a published report folder (results.json)", has_files("results.json"))


def check_outputs(out: Path, ship: Path | None, results: str | None) -> None:
    """The pipeline's three outputs by the one output rule, before any stage runs: the run folder (continued),
    the shipped model (replaced, only if it is one) and the published report (its files replaced)."""
    check_output(out, flag="--out", kind=PIPELINE_RUN, reuse=True)
    if ship is not None:
        check_output(ship, flag="--ship", kind=SHIPPED_MODEL, overwrite=True, inputs=[("the run folder --out", out)])
    if results is not None:
        check_output(results, flag="--results", kind=PUBLISHED, reuse=True,
                     inputs=[("the run folder --out", out)] + ([("the model --ship", ship)] if ship else []))


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    size, stages = SIZES[args.size], args.stages
    out = _rel(Path(args.out or ("runs/small" if args.size == "full" else "runs/small-ci")))
    ship = _rel(Path(args.ship)) if args.ship else (Path("models/small") if args.size == "full" else None)
    results = str(_rel(Path(args.results))) if args.results else ("results/small" if args.size == "full" else None)
    os.chdir(REPO)  # every path below is relative to the repository (or absolute), as in the printed commands
    check_outputs(out, ship, results)
    py = sys.executable
    logs = out / "logs"
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    if "corpus" in stages:
        run_cmd([py, "-m", "train.corpus", "--out", str(out / "corpus")], logs / "corpus.log")
    if "tokenizer" in stages:
        run_cmd([py, "-m", "train.tokenizer_train", "--corpus", str(out / "corpus"), "--out", str(out / "tokenizer"),
                 "--vocab-size", str(size["vocab_size"])], logs / "tokenizer.log")
    if "target" in stages:
        if (out / "target" / "model" / "config.json").is_file():
            _log(f"target: cached at {out / 'target' / 'model'}")
        else:
            run_cmd(pretrain_command(py, size, out, args.max_pretrain_minutes), logs / "pretrain.log")
            if not (out / "target" / "model" / "config.json").is_file():
                _log("pretraining stopped before the end (--max-pretrain-minutes); rerun to resume")
                return 0
    if "regen" in stages:
        for kind in sorted({"greedy"} | {VARIANTS[v].regen for v in args.variants}):
            stage_regen(py, size, out, logs, kind)
    if "drafters" in stages:
        stage_drafters(py, size, out, logs, args.variants, args.seeds)
    if "ship" in stages and ship is not None:
        ship_model(out, ship)
    runs = eval_runs(size, out, args.variants, args.seeds)
    if "eval" in stages:
        for name, a in runs.items():
            if (out / "eval" / name / "results.json").is_file():
                _log(f"eval {name}: cached at {out / 'eval' / name}")
                continue
            run_cmd([py, "-m", "eval.run", *a, "--out", str(out / "eval" / name), "--quiet"],
                    logs / f"eval-{name}.log")
    if "report" in stages:
        stage_report(out, runs, args.size, results)
    _log(f"pipeline finished in {time.time() - t_all:.0f}s")
    return 0


def ship_model(out: Path, ship: Path) -> None:
    """models/small: target/ (params checkpoint), tokenizer/, drafters/{hyperdflash,dflash}/, manifest.json."""
    with atomic_dir(ship, overwrite=True) as tmp:
        shutil.copytree(out / "target" / "model", tmp / "target")
        (tmp / "tokenizer").mkdir(parents=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(out / "tokenizer" / f, tmp / "tokenizer" / f)
        for v in SHIPPED:
            shutil.copytree(out / "drafters" / v / "drafter", tmp / "drafters" / v)
        n_bytes = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
        (tmp / "manifest.json").write_text(json.dumps({
            "built_by": "python -m train.small_pipeline --size full",
            "bytes": n_bytes,
            "target_run_config": json.loads((out / "target" / "run_config.json").read_text()),
            "drafters": {v: json.loads((out / "drafters" / v / "summary.json").read_text()) for v in SHIPPED},
        }, indent=1))
    _log(f"shipped the small model to {ship} ({n_bytes / 2 ** 20:.1f} MiB)")


def main(argv=None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
