"""What the drafter's conditioning vector carries about the tokens it must draft: a linear probe.

    python -m eval.probes.conditioning --data runs/h7/regen/train.jsonl [--rows 96] [--json out.json]

For every response position p of the target's own generations (train.regenerate output), the target's forward
gives its final streams H_p [n, D] and the streams after DFlash's tapped layers; the shipped drafters' reducers
turn them into their conditioning vectors. A ridge-regularised least-squares probe (one-hot targets, closed
form, fit on 80% of the rows, accuracy of the argmax on the other 20%) reads token p + j, j = 1..4, from:

  gate         HyperDFlash's trained gate on H_p (D = 128): what its drafter conditions on
  gate@init    the target's own hc_head collapse of H_p (the gate before training; D)
  streams      vec(H_p) (n·D = 512): all a compressor of the final streams can use
  dflash       DFlash's trained linear compressor on the tapped layers (D)
  layers       vec of the tapped layers' streams (K·n·D)
  anchor       the target's embedding of token p + 1 alone (D): the drafter is given that token (the block's
               anchor), so what a conditioning vector adds is read from `<name>+anchor` (both concatenated) on
               p + 2.. against `anchor` alone

If `streams` reads p + 2.. much better than `gate` while `dflash` (also D wide) keeps up with its inputs, the
bottleneck is the gate's mixing, not the final streams or the width D.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from hdflash_jax.cli import run_command
from hdflash_jax.fileio import write_json_report

OFFSETS = (1, 2, 3, 4)


def _rows(path: str, n: int, max_len: int) -> list[tuple[list[int], int]]:
    """(prompt + response ids, prompt length) of the first `n` rows, cut to `max_len` tokens."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if len(out) >= n:
                break
            r = json.loads(line)
            ids = list(r["prompt_ids"]) + list(r["response_ids"])
            out.append((ids[:max_len], len(r["prompt_ids"])))
    return out


def features(rows, max_len: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Per response position with 4 known successors: {name: [N, d]} features, token ids [N, 4] of p+1..p+4,
    and the row of each position (for the row-wise train/test split)."""
    from eval.targets import TARGETS
    from hdflash_jax.deepseek_v4.model import forward_full
    from hdflash_jax.drafter.reducer import features_from_target, target_return_layers

    spec = TARGETS["small"](None, None)
    target = spec.load(0)
    hd = spec.drafters["hyperdflash"].load(target, 0)
    df = spec.drafters["dflash"].load(target, 0)
    dcfg = spec.drafters["dflash"].config
    layers = target_return_layers(dcfg)

    @jax.jit
    def forward(tokens):
        out = forward_full(target, tokens, return_layers=layers)
        h = out.streams
        lay = features_from_target(dcfg, out)
        b, t = tokens.shape
        emb = target.embed_tokens(tokens)
        return {"anchor": jnp.concatenate([emb[:, 1:], emb[:, -1:]], axis=1), "gate": hd.reducer(h), "gate@init": target.collapse(h),
                "streams": h.reshape(b, t, -1), "dflash": df.reducer(lay), "layers": lay.reshape(b, t, -1)}

    feats: dict[str, list] = {}
    ys, owner = [], []
    for i, (ids, plen) in enumerate(rows):
        tok = np.zeros((1, max_len), np.int32)
        tok[0, : len(ids)] = ids
        out = jax.device_get(forward(jnp.asarray(tok)))
        pos = np.arange(max(plen - 1, 0), len(ids) - OFFSETS[-1])  # from the last prompt token on
        if pos.size == 0:
            continue
        for k, v in out.items():
            feats.setdefault(k, []).append(np.asarray(v[0, pos], np.float64))
        ids_a = np.asarray(ids)
        ys.append(np.stack([ids_a[pos + j] for j in OFFSETS], 1))
        owner.append(np.full(pos.size, i))
    return {k: np.concatenate(v) for k, v in feats.items()}, np.concatenate(ys), np.concatenate(owner)


def probe_accuracy(x_tr, y_tr, x_te, y_te, vocab: int, lam: float = 1e-2) -> float:
    """Top-1 accuracy of the one-hot least-squares probe (standardised features, ridge lam·N, bias)."""
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    a, b = (x_tr - mu) / sd, (x_te - mu) / sd
    a = np.concatenate([a, np.ones((a.shape[0], 1))], 1)
    b = np.concatenate([b, np.ones((b.shape[0], 1))], 1)
    xty = np.zeros((a.shape[1], vocab))
    np.add.at(xty.T, y_tr, a)  # Xᵀ onehot(y) without the [N, V] one-hot
    w = np.linalg.solve(a.T @ a + lam * a.shape[0] * np.eye(a.shape[1]), xty)
    return float(np.mean(np.argmax(b @ w, 1) == y_te))


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.probes.conditioning", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="train.regenerate output (prompt_ids, response_ids)")
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--lam", type=float, default=1e-2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = _rows(args.data, args.rows, args.max_len)
    feats, y, owner = features(rows, args.max_len)
    test = owner >= int(0.8 * len(rows))
    vocab = int(y.max()) + 1
    result = {"positions_train": int((~test).sum()), "positions_test": int(test.sum()), "rows": len(rows),
              "accuracy": {}}
    for name in ("gate", "streams", "dflash", "layers"):
        feats[f"{name}+anchor"] = np.concatenate([feats[name], feats["anchor"]], 1)
    print(f"{(~test).sum()} train / {test.sum()} test positions from {len(rows)} rows")
    print(f"{'features':10s} {'dim':>5s} " + " ".join(f"{'p+' + str(j):>7s}" for j in OFFSETS))
    for name, x in feats.items():
        acc = [probe_accuracy(x[~test], y[~test, i], x[test], y[test, i], vocab, args.lam)
               for i in range(len(OFFSETS))]
        result["accuracy"][name] = {"dim": int(x.shape[1]), "by_offset": acc}
        print(f"{name:10s} {x.shape[1]:5d} " + " ".join(f"{a:7.3f}" for a in acc), flush=True)
    if args.json:
        write_json_report(args.json, result, indent=1)
    return 0


def main(argv=None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
