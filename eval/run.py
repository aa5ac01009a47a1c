"""The evaluation CLI: AR, MTP, DFlash and HyperDFlash on the same prompts (argparse and `main` only).

    python -m eval.run --suite gsm8k,mt_bench --method ar,mtp,dflash,hyperdflash --target tiny-random --limit 2
    python -m eval.run --suite all --method ar,hyperdflash --target /ckpt/v4-flash \\
        --drafter hyperdflash=/ckpt/hyperdflash-v4-flash --max-new-tokens 2048 --score --out runs/eval/flash

The jobs live apart: eval.config checks every argument, checkpoint and selection before any weights are loaded
(`make_plan`); eval.targets resolves targets and drafter checkpoints; eval.methods names the methods and builds
one `Generator` each; eval.runner batches, compiles apart from timing, generates, checks greedy outputs against
AR and scores (eval.scoring); eval.results holds the typed records; eval.report writes results.json, results.md
and the two plots, and this module adds outputs.jsonl (every generated text).

AR always runs: it is the baseline of the speedups (added if not asked for). Greedy runs (--temperature 0):
every speculative output must equal AR's token for token; a difference is reported loudly (stderr,
`greedy_match_ar: false`, `greedy_mismatches` in results.json) and the exit status is 3 unless --allow-mismatch.
Exit status: 0 ok, 1 a run error (e.g. a second MT-Bench turn longer than the largest bucket), 2 bad arguments /
checkpoints / selection (all checked before any weights are loaded) or a target whose first logits are not
finite, 3 greedy mismatch.

Targets (`--target`): a name of `eval.targets.TARGETS` (`small`: the built-in pretrained small DeepSeek-V4 of
models/small with its tokenizer and trained `hyperdflash`, `dflash`, `dspark`, `dspark-gated` drafters, built by
`python -m train.small_pipeline`; `tiny-random`: the random tiny DeepSeek-V4 with untrained drafters and a byte
tokenizer, for checking the pipeline end to end — its τ and speedups mean nothing) or a converted checkpoint
folder (`config.json` + `params/`, hdflash_jax.checkpoint). Drafters (`--drafter NAME=CKPT`): a drafter
checkpoint folder of any drafter family (`hdflash_jax.families`); NAME becomes the method
name, so `--drafter hyperdflash=... --drafter hd-b16=...` can be compared in one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from eval.config import RunConfig, make_plan
from eval.errors import EXIT_MISMATCH, EXIT_OK, UsageError, log
from eval.runner import execute
from eval.targets import TARGETS
from hdflash_jax.cli import run_command
from hdflash_jax.fileio import atomic_write_text
from hdflash_jax.suites import SUITES

DEFAULT_MAX_NEW_TOKENS = 1024


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m eval.run",
        description="Speculative-decoding benchmarks (tau, acceptance by draft position, speedup over AR, "
                    "greedy losslessness, optional scores) for AR / MTP / DFlash / HyperDFlash.")
    ap.add_argument("--suite", default="all", help=f"comma list of {', '.join(SUITES)}, or all (default: all)")
    ap.add_argument("--method", default="all",
                    help="comma list of ar, mtp, the target's drafters (tiny-random: dflash, hyperdflash), "
                         "--drafter names, or all (= ar, mtp if the target has an MTP layer, every drafter); "
                         "ar (the baseline) always runs (default: all)")
    ap.add_argument("--target", default="tiny-random",
                    help=f"a registered target ({', '.join(sorted(TARGETS))}) or a converted checkpoint folder "
                         "(default: %(default)s)")
    ap.add_argument("--drafter", action="append", metavar="NAME=CKPT",
                    help="a drafter checkpoint (any family: block, dspark) for method NAME; repeatable")
    ap.add_argument("--tokenizer", default=None,
                    help="byte[:N], deepseek-v4, a tokenizer.json or a folder holding one "
                         "(default: the target's; checkpoints: their tokenizer.json, else deepseek-v4)")
    ap.add_argument("--thinking", action="store_true",
                    help="DeepSeek-V4 thinking mode (prompts end in <think>); default: chat mode (</think>)")
    ap.add_argument("--limit", type=int, default=None, help="first N samples of each suite (default: all)")
    ap.add_argument("--first-turn-only", action="store_true",
                    help="run only each sample's first user turn (MT-Bench's second turns left out: DeepSpec's "
                         "protocol)")
    ap.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="(default: %(default)s)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0 = greedy, outputs checked against AR (default: 0)")
    ap.add_argument("--top-p", type=float, default=1.0, help="(default: 1.0)")
    ap.add_argument("--verify", default="token",
                    help="token or block: the acceptance rule at --temperature > 0, token-level rejection sampling or "
                         "Sun et al.'s "
                         "block verification (lossless, accepts at least as much); greedy runs are the same either "
                         "way (default: token)")
    ap.add_argument("--confidence-schedule", default="off", metavar="off|auto|C1,...,CK+1",
                    help="DSpark's confidence-scheduled verification: the drafter's confidence head picks how many "
                         "drafts each step verifies, maximising expected committed tokens per step cost; auto "
                         "measures the step's cost at each verify width 1..K+1 once per compiled shape, or give "
                         "the K+1 costs; only for methods with a confidence head (default: off)")
    ap.add_argument("--block-size", type=int, default=None,
                    help="block size B of the block drafters (anchor + B-1 drafts); default: each drafter's "
                         "training block size")
    ap.add_argument("--mtp-k", type=int, default=1,
                    help="drafts per step of MTP, its one layer chained k times (default: 1)")
    ap.add_argument("--batch-size", type=int, default=1, help="rows decoded together (default: 1)")
    ap.add_argument("--refill", action=argparse.BooleanOptionalAction, default=True,
                    help="continuous refill: a row that finishes takes the next prompt of its length bucket at the "
                         "next step (default); --no-refill: batches of --batch-size prompts, each running until its "
                         "slowest row")
    ap.add_argument("--prompt-buckets", default=None,
                    help="comma list of padded prompt lengths (one compile per bucket used); default: "
                         "16,32,...,4096")
    ap.add_argument("--prefill-chunk", type=int, default=None,
                    help="prompt tokens per prefill call: a longer prompt bucket prefills through the cache in "
                         "chunks of this many tokens (same outputs, memory of one chunk); default: 4096")
    ap.add_argument("--seed", type=int, default=0, help="random init (tiny-random) and sampling seed (default: 0)")
    ap.add_argument("--out", default=None, help="output folder (default: runs/eval/<suites>-<time>)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    ap.add_argument("--score", action="store_true",
                    help="score answers: GSM8K/MATH-500 final answer, HumanEval/MBPP tests in the sandbox")
    ap.add_argument("--score-timeout", type=float, default=10.0, help="seconds per sandboxed program (default: 10)")
    ap.add_argument("--allow-unisolated", action="store_true",
                    help="with --score, run HumanEval/MBPP programs even where no sandbox isolation (bwrap, unshare) "
                         "works: they then can read, write and delete this user's files and use the network")
    ap.add_argument("--allow-mismatch", action="store_true",
                    help="exit 0 even if a greedy speculative output differs from AR's")
    ap.add_argument("--compilation-cache", default=None, help="a persistent JAX compilation cache folder")
    ap.add_argument("--mesh", default=None,
                    help="run over a device mesh, e.g. data=2,expert=8,tensor=4 (axes data, fsdp, expert, tensor; "
                         "the product is the number of devices, of all processes): the target restored into its "
                         "shardings, batch rows over data/fsdp (default: one device)")
    ap.add_argument("--distributed", choices=("off", "auto"), default="off",
                    help="auto: jax.distributed.initialize() with cluster auto-detection (TPU pods, SLURM, "
                         "Open MPI); each host runs the same command")
    ap.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (multi-process runs)")
    ap.add_argument("--num-processes", type=int, default=None)
    ap.add_argument("--process-id", type=int, default=None)
    ap.add_argument("--cpu-devices", type=int, default=None,
                    help="simulated CPU devices per process (testing a mesh on one machine)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def _report_mismatches(results, allow: bool) -> None:
    n = sum(len(x.mismatched) for x in results.greedy_mismatches)
    print(f"*** GREEDY MISMATCH: {n} speculative output(s) differ from AR: "
          + "; ".join(f"{x.method} on {x.suite}: {len(x.mismatched)}/{x.n_samples}" for x in results.greedy_mismatches)
          + (" (--allow-mismatch: exit 0)" if allow else "") + " ***", file=sys.stderr)


def _init_processes(cfg: RunConfig) -> bool:
    """`jax.distributed` setup (before any backend use); True on the process that writes."""
    from hdflash_jax.distributed import init_distributed

    try:
        init_distributed(cfg.coordinator, cfg.num_processes, cfg.process_id, cfg.distributed, cfg.cpu_devices)
    except ValueError as e:
        raise UsageError(str(e)) from None
    import jax

    return jax.process_index() == 0


def _main(argv: list[str]) -> int:
    """Parse, check, run and write; returns the exit status (see the module docstring)."""
    cfg = RunConfig.from_args(build_parser().parse_args(argv))
    lead = _init_processes(cfg)
    if not lead:
        cfg = dataclasses.replace(cfg, quiet=True)  # one progress bar
    plan = make_plan(cfg)
    plan.argv = argv
    if cfg.score:  # model-written code runs isolated, or unisolated only when the user says so
        from eval.sandbox import UnisolatedError, require_isolation
        try:
            isolation = require_isolation(cfg.allow_unisolated).to_json(cfg.allow_unisolated)
        except UnisolatedError as e:
            raise UsageError(str(e)) from None
    log(f"suites: {', '.join(f'{s} ({len(v)})' for s, v in plan.samples.items())}; methods: "
        f"{', '.join(plan.methods)}{' (ar added as the baseline)' if plan.ar_added else ''}; out: {plan.out}")
    t0 = time.perf_counter()
    results, records = execute(plan)
    results.config["total_s"] = time.perf_counter() - t0
    if plan.mesh is not None:
        import jax

        results.config["mesh"] = dict(plan.mesh.shape)
        results.config["processes"] = jax.process_count()
    if cfg.score:
        results.config["isolation"] = isolation
    if not lead:  # every process computed the same results; process 0 writes them
        return EXIT_MISMATCH if results.greedy_mismatches and not cfg.allow_mismatch else EXIT_OK

    from eval.report import summary_table, write_results

    out = write_results(plan.out, results, overwrite=cfg.overwrite)
    atomic_write_text(out / "outputs.jsonl", "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n"
                                                     for r in records))
    print(summary_table(results))
    log(f"wrote {out}/results.json, results.md, acceptance_by_position.png, accepted_length_hist.png, "
        f"outputs.jsonl ({results.config['total_s']:.1f}s)")
    if results.greedy_mismatches:
        _report_mismatches(results, cfg.allow_mismatch)
        if not cfg.allow_mismatch:
            return EXIT_MISMATCH
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
