"""Plan a mesh before renting it: AOT-compile a target program on simulated devices with abstract shapes and print
what one device needs (argument, output, temp and alias bytes), its FLOPs and bytes accessed, and, for a chosen
accelerator, whether it fits and the bandwidth floor (bytes accessed / HBM bandwidth).

    python -m hdflash_jax.aot_plan --preset v4-flash --layers 4 --mesh expert=8,tensor=8 --program prefill \
        --batch 1 --seq 32768 [--context L] [--json FILE] [--fits v5p|h100|h200]

Nothing is allocated: parameters, caches and inputs are `jax.ShapeDtypeStruct`s with their `NamedSharding`s, the
program is `jax.jit(...).lower(...).compile()`d, and the figures come from `memory_analysis()` and
`cost_analysis()` of that XLA:CPU compile; each printed figure says whether it is the compile's or an estimate
(`--accelerator-temp`, the bandwidth floor). The CPU backend upcasts bf16 in some ops, so temp bytes here overstate a
TPU/GPU somewhat. Programs (built in `target.py`, `draft.py`, `train.py` of this package): `prefill` (a prompt of
--seq tokens into an empty cache of --context slots; with --chunk C through the cache C tokens at a time), `verify`
(a block of --seq tokens onto a cache holding --context tokens), `generate` (the program eval.run compiles, with the
autoregressive drafter: a --seq prompt prefilled in chunks of --chunk (default the decoder's), then the while_loop
for --context - --seq new tokens). `--layers N` keeps the first N layers of the preset; the target programs take
the MTP layer too, as does `train` online (held by the process, so counted in argument bytes though they do
not read it).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import sys
import time

from hdflash_jax.errors import UsageError
from hdflash_jax.mesh_spec import mesh_size

# accelerator: (HBM bytes per chip, HBM bytes/s per chip)
ACCELERATORS = {
    "v5p": (95 * 2**30, 2.765e12),
    "h100": (80 * 2**30, 3.35e12),
    "h200": (141 * 2**30, 4.8e12),
}
PROGRAMS = ("prefill", "verify", "generate", "draft", "train")


@dataclasses.dataclass(frozen=True)
class PlanResult:
    program: str
    preset: str
    layers: int
    mesh: dict
    batch: int
    seq: int
    context: int
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    flops: float
    bytes_accessed: float
    compile_s: float
    hlo_chars: int
    loop_dot_flops: float  # matmul FLOPs with loop bodies counted per iteration (cost_analysis counts them once)
    active_flops: float  # 2 · active parameters · tokens / devices: what a perfectly split matmul program costs
    chunk: int = 0  # prefill chunk (0: one call over the whole prompt)
    # temp of the same program compiled with fp32 target weights (`--accelerator-temp`; 0: not measured). XLA:CPU
    # has no bf16 dot, so it keeps an fp32 copy of every bf16 weight it multiplies, most of them live from the
    # start: with weights already fp32 there is nothing to copy, and that program's temp is what a chip with bf16
    # matmuls (TPU, GPU) would need on top of the bf16 arguments
    temp_fp32_weights_bytes: int = 0
    mtp_layers: int = 0  # MTP layers among the target's parameters (target programs)
    mtp_param_bytes: int = 0  # per device: their parameters, counted in argument_bytes (not read by the program)

    @property
    def flops_ratio(self) -> float:
        return self.loop_dot_flops / self.active_flops if self.active_flops else float("nan")

    def sources(self) -> dict:
        """Where each figure comes from: the XLA:CPU compile itself, or an estimate (and how it was made)."""
        cpu = "XLA:CPU compile (memory_analysis)"
        out = {k: cpu for k in ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes")}
        out.update(flops="XLA:CPU compile (cost_analysis)", bytes_accessed="XLA:CPU compile (cost_analysis)",
                   loop_dot_flops="XLA:CPU compile (its HLO, loop bodies x trip count)",
                   compile_s="XLA:CPU compile (wall clock on this machine)",
                   active_flops="formula: 2 x active parameters x tokens / devices",
                   bandwidth_floor="estimate: bytes_accessed / the chip's HBM bandwidth",
                   mtp_param_bytes="abstract parameter shapes and shardings (part of argument_bytes)")
        if self.temp_fp32_weights_bytes:
            out["temp_fp32_weights_bytes"] = ("estimate for a chip with bf16 matmuls: a second XLA:CPU compile with "
                                              "fp32 target weights (no bf16->fp32 weight copies)")
        return out

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "sources": self.sources()}


def _parse(argv):
    ap = argparse.ArgumentParser(prog="python -m hdflash_jax.aot_plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="v4-flash", help="a preset name (v4-flash, v4-pro, tiny, small) or a "
                                                         "config.json file")
    ap.add_argument("--layers", type=int, default=None, help="keep the first N layers (default: all)")
    ap.add_argument("--mesh", default="expert=8,tensor=8", help="data=..,fsdp=..,expert=..,tensor=..")
    ap.add_argument("--program", default="prefill", help=f"comma-separated, of {PROGRAMS}")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=32768, help="tokens of the call (prompt, or verify block)")
    ap.add_argument("--context", type=int, default=None, help="cache slots (prefill/generate) or tokens already "
                                                              "cached (verify); default --seq (+ seq for verify)")
    ap.add_argument("--chunk", type=int, default=None, help="prefill/generate: run the prompt through the cache "
                    "in chunks of this many tokens (decode/prefill.py; generate's default: DecodeSettings')")
    ap.add_argument("--anchors", type=int, default=512, help="train: anchors (blocks) per sequence")
    ap.add_argument("--drafter", default=None, help="draft/train: a drafter preset (e.g. v4-flash-hyperdflash) "
                                                    "or a drafter_config.json; default: the builder's")
    ap.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                    help="TargetConfig field override, e.g. attention_impl=dense (repeatable)")
    ap.add_argument("--json", help="write one object per program to this file")
    ap.add_argument("--fits", choices=sorted(ACCELERATORS), help="check the per-device bytes against this chip")
    ap.add_argument("--hlo", help="write the compiled HLO text of the (last) program here")
    ap.add_argument("--train-override", action="append", default=[], metavar="KEY=VALUE",
                    help="train: a training-config override (train.drafter's syntax), e.g. train.attention=dense or "
                         "drafter.loss.vocab_chunk=0 (repeatable)")
    ap.add_argument("--drafter-only", action="store_true",
                    help="train: the target's features and KL-slot hidden states are inputs of the step (the drafter "
                         "half alone, what offline features would train)")
    ap.add_argument("--accelerator-temp", action="store_true",
                    help="prefill/verify/generate: compile again with fp32 target weights and report that temp "
                         "(the CPU's bf16->fp32 weight copies removed) beside the CPU's, with the fit it gives")
    return ap.parse_args(argv)


def _config(args):
    from hdflash_jax.config import PRESETS, TargetConfig

    if args.preset in PRESETS:
        cfg = PRESETS[args.preset]
    elif os.path.isfile(args.preset):
        cfg = TargetConfig.from_json_file(args.preset)
    else:
        raise UsageError(f"--preset: {args.preset!r} is neither a preset ({sorted(PRESETS)}) nor a file")
    n = cfg.n_layers if args.layers is None else args.layers
    if not 1 <= n <= cfg.n_layers:
        raise UsageError(f"--layers: must be in [1, {cfg.n_layers}], got {n}")
    # the MTP layers stay (the process holds them); their compress ratios are the list's last entries
    changes = dict(n_layers=n, compress_ratios=cfg.compress_ratios[:n] + cfg.compress_ratios[cfg.n_layers:],
                   n_hash_layers=min(cfg.n_hash_layers, n))
    fields = {f.name: f.type for f in dataclasses.fields(TargetConfig)}
    for item in args.override:
        name, _, value = item.partition("=")
        if name not in fields:
            raise UsageError(f"--override: unknown TargetConfig field {name!r}")
        current = getattr(cfg, name)
        if isinstance(current, bool):  # bool("False") is True: read the word
            if value.lower() not in ("true", "false", "1", "0"):
                raise UsageError(f"--override {name}: expected true or false, got {value!r}")
            changes[name] = value.lower() in ("true", "1")
        else:
            changes[name] = type(current)(value) if not isinstance(current, tuple) else current
    try:
        return cfg.replace(**changes)
    except ValueError as e:
        raise UsageError(f"--override: {e}") from None


_COMP = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"^\w+\[([0-9,]*)\]")
_CALLS = re.compile(r"(?:calls|body|to_apply|branch_computations)=\{?%?([\w.\-, %]+)\}?")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def loop_dot_flops(hlo: str) -> tuple[float, int]:
    """Matmul FLOPs of a compiled HLO module with every while-loop body counted once per iteration (XLA's
    cost_analysis counts a loop body once). Returns (flops, loops whose trip count XLA did not know: counted once).
    Each dot costs 2 · |output| · |contracted lhs dims|."""
    comps: dict[str, tuple[float, list]] = {}
    shapes: dict[str, list[int]] = {}
    name, dots, calls, unknown = None, 0.0, [], 0
    entry = None
    for line in hlo.splitlines():
        m = _COMP.match(line)
        if m:
            name, dots, calls = m.group(1), 0.0, []
            if line.startswith("ENTRY"):
                entry = name
            continue
        if line.startswith("}") and name:
            comps[name] = (dots, calls)
            name = None
            continue
        m = _INSTR.match(line)
        if not m or name is None:
            continue
        var, typ, op, rest = m.groups()
        arr = _ARRAY.match(typ)
        shapes[var] = [int(d) for d in arr.group(1).split(",") if d] if arr else []
        if op == "dot":
            lhs = re.match(r"%([\w.\-]+)", rest).group(1)
            contract = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", rest).group(1)
            k = 1
            for i in (int(c) for c in contract.split(",") if c):
                k *= shapes.get(lhs, [1] * (i + 1))[i]
            out = 1
            for d in shapes[var]:
                out *= d
            dots += 2.0 * out * k
        trips = 1
        if op == "while":
            t = _TRIP.search(rest)
            trips = int(t.group(1)) if t else 1
            unknown += t is None
        for group in _CALLS.findall(rest):
            for callee in group.replace("%", "").split(","):
                if callee.strip():
                    calls.append((callee.strip(), trips))

    memo: dict[str, float] = {}

    def total(c: str) -> float:
        if c not in memo:
            d, cs = comps.get(c, (0.0, []))
            memo[c] = d + sum(n * total(callee) for callee, n in cs)
        return memo[c]

    return (total(entry) if entry else 0.0), unknown



def _builder(name: str):
    """The module that builds program `name` (one module per kind of program)."""
    if name in ("prefill", "verify", "generate"):
        from hdflash_jax.aot_plan import target as m
    elif name == "draft":
        from hdflash_jax.aot_plan import draft as m
    else:
        from hdflash_jax.aot_plan import train as m
    return m.build


def _compile(name: str, cfg, args, mesh):
    import jax

    if name == "draft":  # the draft step's arguments are the drafter's: the target's MTP layer is not among them
        cfg = cfg.replace(n_mtp_layers=0, compress_ratios=cfg.compress_ratios[:cfg.n_layers])
    prog = _builder(name)(name, cfg, args, mesh)
    jit = prog.jit if prog.jit is not None else functools.partial(jax.jit, donate_argnums=prog.donate)
    with jax.set_mesh(mesh):
        return prog, jit(prog.fn).lower(*prog.args).compile()


def temp_with_fp32_weights(name: str, cfg, args, mesh) -> int:
    """Temp bytes of program `name` with the target's weights in fp32 (see `PlanResult.temp_fp32_weights_bytes`)."""
    return int(_compile(name, cfg.replace(param_dtype="float32"), args, mesh)[1].memory_analysis().temp_size_in_bytes)


def plan(name: str, cfg, args, mesh, preset: str) -> PlanResult:
    fp32_weights = getattr(args, "accelerator_temp", False)
    if fp32_weights and name not in ("prefill", "verify", "generate"):
        raise UsageError(f"--accelerator-temp: only for the target's programs, not {name!r}")
    t0 = time.perf_counter()
    prog, compiled = _compile(name, cfg, args, mesh)
    compile_s = time.perf_counter() - t0
    hlo = compiled.as_text()
    if args.hlo:
        from hdflash_jax.fileio import OutputKind, atomic_write_text, check_output

        dump = OutputKind("an HLO dump (a file starting with HloModule)",
                          lambda p: p.read_bytes()[:9] == b"HloModule", folder=False)
        check_output(args.hlo, flag="--hlo", kind=dump, overwrite=True)
        atomic_write_text(args.hlo, hlo)
    loop_flops, unknown_trips = loop_dot_flops(hlo)
    if unknown_trips:
        print(f"  note: {unknown_trips} loop(s) without a known trip count, counted once", file=sys.stderr)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return PlanResult(
        program=name, preset=preset, layers=cfg.n_layers, mesh=dict(mesh.shape), batch=args.batch, seq=args.seq,
        context=args.context or 0, argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes), flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)), compile_s=round(compile_s, 2),
        hlo_chars=len(hlo), loop_dot_flops=loop_flops,
        active_flops=prog.active_flops, chunk=prog.chunk or ((args.chunk or 0) if name == "prefill" else 0),
        temp_fp32_weights_bytes=(temp_with_fp32_weights(name, cfg, args, mesh)
                                 if fp32_weights and cfg.param_dtype != "float32" else 0),
        mtp_layers=cfg.n_mtp_layers if prog.mtp_bytes else 0,
        mtp_param_bytes=prog.mtp_bytes)


def _gib(x) -> str:
    return f"{x / 2**30:.3f} GiB"


def report(r: PlanResult, fits: str | None) -> str:
    mtp = f" + {r.mtp_layers} MTP" if r.mtp_layers else ""
    lines = [f"{r.program}: {r.preset}, {r.layers} layers{mtp}, mesh {r.mesh}, batch {r.batch}, seq {r.seq}"
             + (f", context {r.context}" if r.context else "") + (f", chunks of {r.chunk}" if r.chunk else ""),
             f"  per device (XLA:CPU compile): argument {_gib(r.argument_bytes)}"
             + (f" (the MTP layer's {_gib(r.mtp_param_bytes)} of it, held, not read)" if r.mtp_param_bytes else "")
             + f", output {_gib(r.output_bytes)}, temp {_gib(r.temp_bytes)}, alias {_gib(r.alias_bytes)}",
             f"  flops {r.flops:.4g}, bytes accessed {r.bytes_accessed:.4g} (XLA:CPU compile), compile "
             f"{r.compile_s:.1f} s, HLO {r.hlo_chars:,} chars"]
    lines.append(f"  matmul flops with loop bodies x trip count {r.loop_dot_flops:.4g} (XLA:CPU compile's HLO; "
                 f"cost_analysis counts a loop body once)")
    if r.active_flops:
        lines.append(f"  2 x active params x tokens / devices = {r.active_flops:.4g} flops (formula; matmul flops / "
                     f"that = {r.flops_ratio:.2f}x)")
    if fits:
        hbm, bw = ACCELERATORS[fits]
        need = r.argument_bytes + r.output_bytes + r.temp_bytes - r.alias_bytes
        verdict = "fits" if need <= hbm else "does NOT fit"
        lines.append(f"  {fits}: needs {_gib(need)} of {_gib(hbm)} -> {verdict} (XLA:CPU compile); bandwidth floor "
                     f"{r.bytes_accessed / bw * 1e3:.3f} ms (estimate: bytes accessed / HBM bandwidth)")
        if r.temp_fp32_weights_bytes:
            need = r.argument_bytes + r.output_bytes + r.temp_fp32_weights_bytes - r.alias_bytes
            verdict = "fits" if need <= hbm else "does NOT fit"
            lines.append(f"  without the CPU's fp32 weight copies (estimate: temp {_gib(r.temp_fp32_weights_bytes)} "
                         f"from a second compile with fp32 weights): needs {_gib(need)} -> {verdict}")
    elif r.temp_fp32_weights_bytes:
        lines.append(f"  temp without the CPU's fp32 weight copies {_gib(r.temp_fp32_weights_bytes)} (estimate: a "
                     f"second compile with fp32 weights)")
    return "\n".join(lines)


def plan_programs(argv: list[str]) -> list[PlanResult]:
    """Parse the flags, compile every --program and print its report; the results (what --json writes)."""
    args = _parse(argv)
    names = [p.strip() for p in args.program.split(",") if p.strip()]
    for name in names:
        if name not in PROGRAMS:
            raise UsageError(f"--program: unknown {name!r}; one of {PROGRAMS}")
    if args.chunk is not None and args.chunk < 1:
        raise UsageError(f"--chunk: must be >= 1, got {args.chunk}")
    try:
        n_dev = mesh_size(args.mesh)
    except ValueError as e:
        raise UsageError(f"--mesh {args.mesh}: {e}") from None
    if "jax" in sys.modules:
        import jax
        if len(jax.devices()) < n_dev:
            raise UsageError(f"--mesh needs {n_dev} devices; jax was imported with {len(jax.devices())}")
    else:  # simulated devices: the flag must be set before jax is imported
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={n_dev}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from hdflash_jax.sharding import mesh_from_spec

    cfg = _config(args)
    try:
        mesh = mesh_from_spec(args.mesh, jax.devices()[:n_dev])
    except ValueError as e:
        raise UsageError(f"--mesh {args.mesh}: {e}") from None
    results = []
    for name in names:
        r = plan(name, cfg, args, mesh, args.preset)
        print(report(r, args.fits), flush=True)
        results.append(r)
    if args.json:
        from hdflash_jax.fileio import write_json_report

        write_json_report(args.json, [r.to_json() for r in results])
    return results


def main(argv=None) -> int:
    from hdflash_jax.cli import run_command

    return run_command(lambda a: (plan_programs(a), 0)[1], argv)
