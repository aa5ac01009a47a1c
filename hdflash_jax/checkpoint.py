"""Orbax save/restore of the target's parameters plus its config.

A params checkpoint is a folder:
    config.json   TargetConfig.to_dict() (official field names; `TargetConfig.from_json_file` reads it)
    params/       an orbax (v1 layout) PyTree checkpoint: nested dicts keyed by the dotted tree path of the
                  unrolled `DeepseekV4`'s NNX state (`layers` → `0` → `attn` → `wq_a` → `weight`), see
                  `hdflash_jax.keymap`; layers that run under scan are stacked on load and unstacked on save
    report.json   (converter output only) what was read, dequantized and written

Everything is written under `<path>.tmp-<pid>` and renamed into place at the end, so an interrupted save leaves
nothing at `<path>` that loads. `ParamWriter` writes a tree in pieces (orbax partial saves, finalized once), which
is how the converter keeps its memory flat in the number of layers.

`load_params` restores into an abstract tree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`, so every array
is read straight into its final sharding (with a mesh and no explicit shardings: the logical-axis rules of
`hdflash_jax.sharding`). Every floating-point parameter restored is checked to be finite: NaN/Inf stop the load
with one error naming the folder and the parameter.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from hdflash_jax.config import TargetConfig
from hdflash_jax.fileio import atomic_dir

PARAMS_DIR = "params"
CONFIG_FILE = "config.json"
REPORT_FILE = "report.json"


def _ocp():
    from orbax.checkpoint import v1 as ocp

    quiet_closed_loop_noise()
    return ocp


def quiet_closed_loop_noise() -> None:
    """After a failed read, TensorStore's pending reads end in noise under the one real error: unraisable
    `RuntimeError('Event loop is closed')` tracebacks at exit (dozens), the abandoned sibling reads' "Encountered
    error while reading array index" and asyncio's "Future exception was never retrieved" for them. Those alone
    are dropped; every other unraisable exception and asyncio message still gets through."""
    import logging
    import sys

    previous = sys.unraisablehook
    if getattr(previous, "_hdflash_quiet", False):
        return

    def hook(unraisable):
        exc, text = unraisable.exc_value, str(unraisable.exc_value)
        if isinstance(exc, RuntimeError) and text == "Event loop is closed":
            return
        if "Encountered error while reading array index" in text or "OCDBT" in text:  # a sibling read's failure
            return
        previous(unraisable)

    def sibling_read(record) -> bool:
        exc = record.exc_info[1] if record.exc_info else record.__dict__.get("exception")
        text = str(record.msg) + " " + str(getattr(record, "args", "")) + " " + str(exc)
        return not ("never retrieved" in text and ("OCDBT" in text or "TensorStore" in text))

    hook._hdflash_quiet = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(sibling_read)


@contextlib.contextmanager
def orbax_log():
    """Collect (instead of printing) what orbax logs meanwhile: for a corrupt tree it logs the reason and returns
    None, and the reason names the parameter."""
    import logging

    logger, lines = logging.getLogger("absl"), []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler, propagate = Keep(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


_UNREADABLE = re.compile(r'Error reading "([^"/]+)/')


def unreadable(folder: Path | str, e: BaseException, what: str = "parameter") -> ValueError:
    """A failed orbax/TensorStore read as one line naming the folder and, when the error says it, the parameter
    (the reason is the failing read's last clause, e.g. "Requested byte range [0, 9) is not valid ...")."""
    chain, x = [], e
    while x is not None and len(chain) < 8:
        chain.append(str(x))
        x = x.__cause__ or x.__context__
    lines = [ln.strip() for msg in chain for ln in msg.splitlines() if ln.strip()]
    for ln in lines:
        m = _UNREADABLE.search(ln)
        if m:
            reason = ln.rsplit('": ', 1)[-1].split(" [tensorstore_spec=")[0]
            return ValueError(f"{folder}: {what} {m.group(1)!r} cannot be read (a corrupt or truncated file: "
                              f"{reason[:160]})")
    detail = next((ln.removeprefix("Error details:").strip() for ln in lines if ln.startswith("Error details:")),
                  lines[0] if lines else type(e).__name__)
    return ValueError(f"{folder}: cannot be read (a corrupt or truncated checkpoint: {detail[:160]})")


# ---- the model's tree ---------------------------------------------------------------------------------------

def abstract_model(cfg: TargetConfig, scanned: bool = False):
    """`DeepseekV4` with ShapeDtypeStruct leaves (no memory, no mesh needed). By default the unrolled (canonical)
    tree, the one every params folder holds whatever `cfg.scan_layers` says; `scanned`: the tree `cfg` builds."""
    from hdflash_jax.deepseek_v4.layers import KeyGen
    from hdflash_jax.deepseek_v4.model import DeepseekV4

    model_cfg = cfg if scanned else cfg.replace(scan_layers=False)
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: DeepseekV4(model_cfg, rngs=KeyGen(0)))


def dotted(path: tuple) -> str:
    return ".".join(str(k) for k in path)


def abstract_leaves(cfg: TargetConfig) -> dict[str, nnx.Variable]:
    """{dotted tree path: abstract variable} (`.shape`, `.dtype`, `.get_metadata()['out_sharding']`)."""
    return {dotted(p): v for p, v in nnx.to_flat_state(nnx.state(abstract_model(cfg)))}


def nest(flat: dict[str, Any]) -> dict:
    """{'a.b.c': x} → {'a': {'b': {'c': x}}} (string keys throughout)."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _flat_arrays(state) -> dict[str, Any]:
    """{canonical dotted path: array}: scanned layers are written per layer, as the unrolled model names them."""
    from hdflash_jax.keymap import unstack_tree

    if isinstance(state, nnx.Module):
        state = nnx.state(state)
    if isinstance(state, nnx.State):
        return unstack_tree({dotted(p): v.get_value() for p, v in nnx.to_flat_state(state)})
    if isinstance(state, dict):
        return unstack_tree(flatten(state))
    raise TypeError(f"save_params: expected an NNX module/state or a dict, got {type(state).__name__}")


# ---- writing ------------------------------------------------------------------------------------------------

class ParamWriter:
    """Writes a params tree into `<folder>/params` in pieces: `add({dotted path: array})` any number of times
    (disjoint keys), then `finalize()`. Arrays are written and dropped at each `add`."""

    def __init__(self, folder: str | Path, compression: bool = False):
        self.path = Path(folder).resolve() / PARAMS_DIR  # orbax wants absolute paths
        self.n_adds = 0
        self.keys: set[str] = set()
        self.compression = compression  # zstd halves the write speed and saves ~5% on weights

    def _context(self):
        ctx = _ocp().Context()
        ctx.array.saving.use_compression = self.compression
        ctx.memory.deepcopy_host_arrays = False  # the arrays are ours and the save is synchronous: no extra copy
        return ctx

    def add(self, flat: dict[str, Any]) -> None:
        if not flat:
            return
        dup = self.keys.intersection(flat)
        if dup:
            raise ValueError(f"ParamWriter: {sorted(dup)[0]!r} written twice")
        before = set(threading.enumerate())
        try:
            with self._context():
                _ocp().partial.save(self.path, nest(flat))
        finally:  # also when Ctrl-C lands inside the save: its threads go on writing otherwise
            join_writer_threads(before)
        self.keys.update(flat)
        self.n_adds += 1

    def finalize(self) -> None:
        with self._context():
            _ocp().partial.finalize(self.path)


def join_writer_threads(before: set, timeout_s: float = 10.0) -> None:
    """Wait for the threads a save started and left running (orbax's asyncio loop and metadata writer): they
    still write into the folder, so a caller that removes it on an error (Ctrl-C during a conversion) would
    otherwise find it recreated behind its back. Threads that were there before (`before`, a set of
    `threading.enumerate()`) are not ours to wait for."""
    for t in set(threading.enumerate()) - before:
        if t.name.startswith(("asyncio_", "metadata_store")):
            t.join(timeout_s)


def write_config(folder: Path, cfg: TargetConfig) -> None:
    (Path(folder) / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=1))


def save_params(path: str | Path, state, cfg: TargetConfig, *, overwrite: bool = False) -> Path:
    """Save a model / NNX state / {dotted path: array} with its config; atomic (temp folder + rename)."""
    return save_atomically(path, state, lambda folder: write_config(folder, cfg), overwrite=overwrite)


def save_atomically(path: str | Path, state, write_meta, *, overwrite: bool = False) -> Path:
    """Params under `params/` plus whatever `write_meta(folder)` writes, in a temp folder renamed at the end."""
    path = Path(path).resolve()  # orbax wants absolute paths
    flat = _flat_arrays(state)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        _ocp().save(tmp / PARAMS_DIR, nest(flat))
        write_meta(tmp)
    return path


# ---- reading ------------------------------------------------------------------------------------------------

def read_typed_config(path: str | Path, file_name: str, cls, what: str):
    """`cls.from_dict` of the JSON object `path/file_name` (a drafter checkpoint's config), every field's value
    checked against its annotation first, so a bad one is refused by name here, not crashed on in a later trace.
    Errors name the folder or file; `what` names the kind of checkpoint ("drafter", "DSpark drafter")."""
    import dataclasses

    from hdflash_jax.config_hf import typed

    path = Path(path)
    f = path / file_name
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} checkpoint not found")
    if not f.is_file():
        raise FileNotFoundError(f"{path}: not a {what} checkpoint (no {file_name})")
    try:
        d = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{f}: expected a JSON object of {cls.__name__} fields, got a {type(d).__name__}")
    try:
        for field in dataclasses.fields(cls):
            if field.name in d:
                typed(field.name, d[field.name], field.type)
        return cls.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{f}: {e}") from None


def is_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def load_config(path: str | Path) -> TargetConfig:
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a params checkpoint (no {CONFIG_FILE})")
    return TargetConfig.from_json_file(path / CONFIG_FILE)


ShardingSpec = Any  # None | Sharding | {dotted path: Sharding} | callable(path, shape, logical_axes) -> Sharding


def _sharding_for(key: str, var, mesh, shardings: ShardingSpec):
    from jax.sharding import NamedSharding, PartitionSpec as P, Sharding, SingleDeviceSharding

    names = var.get_metadata().get("out_sharding")
    if shardings is not None:
        if isinstance(shardings, Sharding):
            return shardings
        if isinstance(shardings, dict):
            if key not in shardings:
                raise KeyError(f"load_params: shardings has no entry for parameter {key!r}")
            return shardings[key]
        if callable(shardings):
            return shardings(key, tuple(var.shape), names)
        raise TypeError(f"load_params: unsupported shardings {type(shardings).__name__}")
    if mesh is not None:
        try:
            from hdflash_jax.sharding import logical_to_spec
        except ImportError:  # no rule table: replicate
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, logical_to_spec(names, tuple(var.shape), mesh))
    return SingleDeviceSharding(jax.devices()[0])


def load_params(path: str | Path, mesh=None, shardings: ShardingSpec = None, *, as_model: bool = True,
                cfg_overrides: dict | None = None, only: tuple[str, ...] | None = None):
    """Restore a params checkpoint → (cfg, DeepseekV4) (or (cfg, nnx.State) with as_model=False).

    Each array is restored directly into its sharding: `shardings` (one Sharding, {dotted path: Sharding}, or
    callable(path, shape, logical_axes)), else the logical-axis rules on `mesh`, else the first device.
    Raises FileNotFoundError / ValueError naming the path and parameter when the folder is not a finished
    checkpoint or its tree disagrees with the config. `only`: read just these (unscanned, top-level) parameters;
    the others stay shapes (ShapeDtypeStruct), nothing of them read or allocated.
    """
    path = Path(path).resolve()  # orbax reads no metadata through a relative path
    cfg = load_config(path)
    if cfg_overrides:
        cfg = cfg.replace(**cfg_overrides)
    params = path / PARAMS_DIR
    if not params.is_dir():
        raise FileNotFoundError(f"{path}: not a params checkpoint (no {PARAMS_DIR}/)")
    graphdef, state = restore_strict(params, abstract_model(cfg, scanned=only is not None), "a model",
                                     lambda key, var: _sharding_for(key, var, mesh, shardings), only=only)
    from hdflash_jax.deepseek_v4.scan import layer_plan

    if layer_plan(cfg).n_units and only is None:
        graphdef, state = stack_layers(state, abstract_model(cfg, scanned=True))
    if not as_model:
        return cfg, state
    return cfg, nnx.merge(graphdef, state)


def restore_strict(params: Path, abstract_module, what: str, sharding_for, only: tuple[str, ...] | None = None):
    """Restore an orbax params folder into the tree of `abstract_module`, strictly → (graphdef, state).

    Every leaf must be on disk with the config's shape, and nothing else; each array lands directly in
    `sharding_for(dotted_path, abstract_variable)`. Errors name the folder and the parameter. `only`: restore just
    these leaves (checked like all); the others keep their abstract values and are not read.
    """
    ocp = _ocp()
    params = Path(params).resolve()  # orbax reads no metadata through a relative path
    try:
        with orbax_log() as logged:
            meta = ocp.metadata(params).metadata
    except Exception as e:  # noqa: BLE001 — orbax raises several kinds for an unfinished folder
        raise ValueError(f"{params}: not a finished orbax checkpoint ({type(e).__name__}: {e})") from None
    if meta is None:  # orbax logs the reason and returns None for a tree whose metadata it cannot read
        raise unreadable(params, ValueError("\n".join(logged) or "its tree metadata cannot be read"))
    on_disk = flatten(meta)
    graphdef, state = nnx.split(abstract_module)
    flat = everything = list(nnx.to_flat_state(state))
    want = {dotted(p): v for p, v in flat}
    if only is not None:
        flat = [(p, v) for p, v in flat if dotted(p) in only]
        unknown = sorted(set(only) - set(want))
        if unknown:
            raise ValueError(f"{params}: no parameter {unknown[0]!r} in {what} with this config")
        # the scanned stacks are not on disk under their own names; only top-level leaves are read this way
        want = {k: v for k, v in want.items() if k in only}
    missing = [k for k in want if k not in on_disk]
    if missing:
        raise ValueError(f"{params}: missing parameter {missing[0]!r} (the config expects {len(want)} leaves)")
    extra = [k for k in on_disk if k not in want] if only is None else []
    if extra:
        raise ValueError(f"{params}: unexpected parameter {extra[0]!r} (not in {what} with this config)")
    abstract = {}
    for key, var in want.items():
        shape = tuple(getattr(on_disk[key], "shape", ()))
        if shape != tuple(var.shape):
            raise ValueError(f"{params}: parameter {key!r} has shape {shape}, the config expects {tuple(var.shape)}")
        abstract[key] = jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding_for(key, var))
    if only is not None:  # orbax reads a subtree when every other leaf is a placeholder
        abstract = {**{k: ocp.PLACEHOLDER for k in on_disk}, **abstract}
    try:
        restored = flatten(ocp.load(params, nest(abstract)))
    except Exception as e:  # noqa: BLE001 — TensorStore's errors for a corrupt file come as several kinds
        raise unreadable(params, e) from None
    if only is not None:
        restored = {k: restored[k] for k in want}
    check_finite(restored, params)
    for p, var in flat:
        var.set_value(restored[dotted(p)])
    return graphdef, nnx.from_flat_state(everything)


def stack_layers(canonical_state, abstract_scanned):
    """A restored canonical (unrolled) state → (graphdef, state) of the scanned model, one leaf at a time (the
    per-layer arrays of a leaf are freed once stacked). Stacked leaves keep the per-layer sharding, unsharded
    along the unit axis."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from hdflash_jax.keymap import canonical_names, stacking_of

    canonical = {dotted(p): v.get_value() for p, v in nnx.to_flat_state(canonical_state)}
    graphdef, state = nnx.split(abstract_scanned)
    flat = list(nnx.to_flat_state(state))
    stacking = stacking_of({dotted(p): tuple(v.shape) for p, v in flat})
    for p, var in flat:
        key = dotted(p)
        parts = [canonical.pop(n) for n in canonical_names(key, stacking)]
        if not key.startswith("scan."):
            var.set_value(parts[0])
            continue
        sh = parts[0].sharding
        if isinstance(sh, NamedSharding):
            sh = NamedSharding(sh.mesh, P(None, *sh.spec))
        var.set_value(jax.device_put(jnp.stack(parts), sh))
        del parts
    return graphdef, nnx.from_flat_state(flat)


# ---- finiteness ---------------------------------------------------------------------------------------------

def _is_float(dtype) -> bool:
    return np.dtype(dtype).kind == "f" or np.dtype(dtype).name == "bfloat16"


def count_nonfinite(a: np.ndarray, chunk: int = 1 << 22) -> int:
    """NaN + Inf entries of a numpy array, in chunks so the temporary stays small whatever the array's size."""
    flat = np.asarray(a).reshape(-1)
    return sum(int(c.size - np.count_nonzero(np.isfinite(c))) for c in
               (flat[i: i + chunk] for i in range(0, flat.size, chunk)))


def _device_counts(arrays: dict[str, jax.Array]) -> dict[str, int]:
    """Non-finite counts of device arrays in one jitted program (one scalar per array comes back to the host)."""
    import jax.numpy as jnp

    counts = jax.jit(lambda xs: {k: jnp.sum(~jnp.isfinite(x), dtype=jnp.int32) for k, x in xs.items()})(arrays)
    return {k: int(v) for k, v in counts.items()}


def nonfinite_counts(arrays: dict[str, Any], *, on_device: bool | None = None) -> dict[str, int]:
    """{key: number of NaN/Inf entries} of the floating-point arrays (numpy or jax) that hold any.

    CPU arrays are scanned in place with numpy (no compilation); arrays on accelerators with one jitted reduction
    so nothing is copied to the host. `on_device` forces one path (tests)."""
    floats = {k: v for k, v in arrays.items() if _is_float(v.dtype)}
    if on_device is None:
        on_device = any(isinstance(v, jax.Array) and any(d.platform != "cpu" for d in v.devices())
                        for v in floats.values())
    if on_device:
        counts = _device_counts({k: jax.numpy.asarray(v) for k, v in floats.items()})
    else:
        counts = {}
        for k, v in floats.items():
            shards = v.addressable_shards if isinstance(v, jax.Array) else None
            if shards is not None and not v.is_fully_replicated:
                counts[k] = sum(count_nonfinite(np.asarray(s.data)) for s in shards if s.replica_id == 0)
            else:
                counts[k] = count_nonfinite(np.asarray(v.addressable_shards[0].data) if shards is not None else v)
    return {k: n for k, n in counts.items() if n}


def check_finite(arrays: dict[str, Any], where: Path | str) -> None:
    """Raise ValueError naming `where` and the first parameter holding NaN/Inf."""
    bad = nonfinite_counts(arrays)
    if bad:
        key = sorted(bad)[0]
        more = f" ({len(bad) - 1} more parameters too)" if len(bad) > 1 else ""
        size = int(np.prod(arrays[key].shape))
        raise ValueError(f"{where}: parameter {key!r} holds {bad[key]} non-finite values (NaN or Inf) out of "
                         f"{size}{more}")
