"""Regenerate the responses of a prompt set with the target itself (drafters learn the target's own
distribution, so their training responses are the target's).

    python -m train.regenerate --target CKPT_OR_PRESET --data IN.jsonl --out OUT.jsonl
        [--tokenizer byte] [--max-new-tokens 256] [--temperature 0] [--top-p 1] [--batch-size 8] [--seed 0]
        [--target-seed 0] [--target-override field=value ...] [--head-scale 1.0] [--limit N]

Input rows: {"prompt": ...} or {"messages": [...]} (a final assistant turn is dropped: it is what we replace) or
{"prompt_ids": [...]}; an "id" field names the row (default: its 0-based index among the non-blank lines).
Output rows: the input's fields (minus any old response) plus "id", "prompt_ids", "response_ids" (the generated
ids, EOS dropped), "response" (their decoded text) and "stop" ("eos", or "length" when --max-new-tokens cut the
row). `train.data` trains on the exact ids when present, with the EOS put back only after rows that ended in one.

Decoding is autoregressive through the project's on-device generator (greedy at T = 0, sampled at T > 0, EOS
stops a row). Rows go in fixed chunks of --batch-size (the last padded with repeats that are not written) with the
chunk's own seed (seed + chunk index), and a chunk's rows are appended together; a rerun skips the ids already in
OUT (a torn last line from a killed run is dropped first) and regenerates a partly written chunk whole, so a
resumed run writes exactly what an uninterrupted one would, at any temperature.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax
import yaml
from tqdm import tqdm

from hdflash_jax.checkpoint import is_checkpoint
from hdflash_jax.cli import run_command
from hdflash_jax.decode.generate import DecodeSettings, Generator
from hdflash_jax.errors import CommandError, UsageError
from hdflash_jax.fileio import OutputKind, check_output
from hdflash_jax.tokenizer import load_tokenizer
from hdflash_jax.train_config import TargetSection
from hdflash_jax.typed_config import build
from train.data import JsonlSource, prompt_ids, prompt_messages
from train.trainer import build_target


def read_done(out: Path) -> set:
    """Ids already written to `out`; a torn (unparseable) tail is cut off the file."""
    done: set = set()
    if not out.exists():
        return done
    raw = out.read_bytes()
    good_end = 0
    pos = 0
    for line in raw.split(b"\n"):
        end = pos + len(line) + 1
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            if end > len(raw):  # no newline after it: written partially
                break
            done.add(_key(rec["id"]))
        good_end = min(end, len(raw))
        pos = end
    if good_end < len(raw):
        with open(out, "r+b") as f:
            f.truncate(good_end)
    return done


def _key(v):
    return json.dumps(v, sort_keys=True)


def load_rows(path: str, tokenizer, limit: int | None = None) -> list[tuple[object, dict, list[int]]]:
    """[(id, record, prompt ids)] for the input JSONL."""
    src = JsonlSource(path)
    rows, seen = [], set()
    n = len(src) if limit is None else min(limit, len(src))
    for i in range(n):
        rec = src[i]
        rid = rec.get("id", i)
        if _key(rid) in seen:
            raise ValueError(f"{src.where(i)}: duplicate id {rid!r}")
        seen.add(_key(rid))
        if "prompt_ids" in rec:
            ids = [int(t) for t in rec["prompt_ids"]]
        else:
            ids = prompt_ids(tokenizer, prompt_messages(rec, src.where(i)))
        if not ids:
            raise ValueError(f"{src.where(i)}: empty prompt")
        rows.append((rid, rec, ids))
    return rows


def output_record(rid, rec: dict, prompt: list[int], response: list[int], tokenizer, stop: str = "eos") -> dict:
    out = {k: v for k, v in rec.items() if k not in ("response", "response_ids", "prompt_ids", "id", "stop")}
    if isinstance(out.get("messages"), list) and out["messages"] and out["messages"][-1].get("role") == "assistant":
        out["messages"] = out["messages"][:-1]
    out.update(id=rid, prompt_ids=[int(t) for t in prompt], response_ids=[int(t) for t in response],
               response=tokenizer.decode(response), stop=stop)
    return out


def regenerate(target, tokenizer, rows, out: Path, *, batch_size: int, max_new_tokens: int,
               temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, progress: bool = True) -> dict:
    """Generate the missing rows of `rows` into `out` (appending). Returns counts."""
    done = read_done(out)
    todo = sum(_key(r[0]) not in done for r in rows)
    gen = Generator(target, settings=DecodeSettings(max_new_tokens=max_new_tokens, temperature=temperature,
                                                    top_p=top_p, eos_token_id=tokenizer.eos_id))
    out.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with tqdm(total=len(rows), initial=len(rows) - todo, disable=not progress, desc="regenerate",
              dynamic_ncols=True) as bar, open(out, "a") as f:
        for c, start in enumerate(range(0, len(rows), batch_size)):
            chunk = rows[start:start + batch_size]
            missing = [i for i, r in enumerate(chunk) if _key(r[0]) not in done]
            if not missing:
                continue
            prompts = [r[2] for r in chunk]
            prompts = prompts + [prompts[0]] * (batch_size - len(prompts))  # fixed shape: compiled once
            res = gen.generate(prompts, seed=seed + c)
            lines = []
            for i in missing:
                rid, rec, p = chunk[i]
                ids = res.row_tokens(i)
                stop = "length"
                if ids and tokenizer.eos_id is not None and ids[-1] == tokenizer.eos_id:
                    ids, stop = ids[:-1], "eos"
                lines.append(json.dumps(output_record(rid, rec, p, ids, tokenizer, stop)) + "\n")
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
            written += len(lines)
            bar.update(len(lines))
    return {"rows": len(rows), "skipped": len(rows) - todo, "written": written}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.regenerate", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="a params checkpoint folder or a TargetConfig preset name")
    p.add_argument("--target-seed", type=int, default=0, help="preset only: the random weights' seed")
    p.add_argument("--target-override", action="append", default=[], metavar="FIELD=VALUE",
                   help="preset only: a TargetConfig field (YAML value), repeatable")
    p.add_argument("--head-scale", type=float, default=1.0, help="preset only: multiply the LM head (toy targets)")
    p.add_argument("--data", required=True, help="input JSONL (prompt / messages / prompt_ids)")
    p.add_argument("--out", required=True, help="output JSONL (appended; rerun to resume)")
    p.add_argument("--tokenizer", default="byte", help="byte[:N], deepseek-v4, or a tokenizer.json path")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="only the first N input rows")
    p.add_argument("--cpu-devices", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _is_regenerated(path: Path) -> bool:
    """A JSONL this command wrote: its first record has an id and response_ids (empty files count as free)."""
    try:
        with open(path, "rb") as f:
            first = f.readline()
        rec = json.loads(first) if first.strip() else {}
    except (OSError, ValueError):
        return False
    return not first.strip() or (isinstance(rec, dict) and "id" in rec and "response_ids" in rec)


REGENERATED = OutputKind("a JSONL written by train.regenerate (records with id and response_ids)", _is_regenerated,
                         folder=False)


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    tok_path = args.tokenizer if Path(args.tokenizer).exists() else None
    check_output(args.out, flag="--out", kind=REGENERATED, reuse=True,  # appended: a rerun resumes it
                 inputs=[("the input --data", args.data), ("the --target", args.target if Path(args.target).exists()
                                                           else None), ("the --tokenizer", tok_path)])
    try:
        overrides = {}
        for item in args.target_override:
            k, sep, v = item.partition("=")
            if not sep:
                raise ValueError(f"--target-override: expected FIELD=VALUE, got {item!r}")
            overrides[k] = yaml.safe_load(v)
        if args.batch_size < 1 or args.max_new_tokens < 1:
            raise ValueError("--batch-size and --max-new-tokens must be >= 1")
        if args.cpu_devices:  # before the first backend use (the imports above do not touch one)
            jax.config.update("jax_num_cpu_devices", args.cpu_devices)
        if is_checkpoint(args.target):
            section = TargetSection(checkpoint=args.target)
        elif Path(args.target).exists():
            raise ValueError(f"--target {args.target}: a folder that is not a params checkpoint "
                             f"(no config.json + params/)")
        else:
            section = build(TargetSection, {"preset": args.target, "seed": args.target_seed, "overrides": overrides,
                                            "head_scale": args.head_scale}, "target")
        tokenizer = load_tokenizer(args.tokenizer)
        tcfg, target = build_target(section, mesh=None)
        if tokenizer.vocab_size > tcfg.vocab_size:
            raise ValueError(f"--tokenizer {args.tokenizer}: vocab {tokenizer.vocab_size} exceeds the target's "
                             f"{tcfg.vocab_size}")
        rows = load_rows(args.data, tokenizer, args.limit)
        for rid, _, p in rows:
            if max(p) >= tcfg.vocab_size:
                raise ValueError(f"{args.data}: row {rid!r} has token ids outside the target's vocabulary")
    except (FileNotFoundError, ValueError) as e:
        if isinstance(e, CommandError):
            raise
        raise UsageError(str(e)) from None
    stats = regenerate(target, tokenizer, rows, Path(args.out), batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                       seed=args.seed, progress=not args.no_progress)
    print(json.dumps(stats))
    return 0


def main(argv=None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
