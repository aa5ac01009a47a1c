"""Processes and placement for training: `jax.distributed` setup, global arrays from host copies, the rows of a
global batch that this process holds, and host copies of global arrays.

`init_distributed` must run before anything touches a JAX backend (it sets the CPU device count and the
collectives implementation).
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from hdflash_jax.sharding import batch_sharding


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, mode: str = "off", cpu_devices: int | None = None) -> None:
    """Explicit arguments, else HDFLASH_COORDINATOR / HDFLASH_NUM_PROCESSES / HDFLASH_PROCESS_ID, else (mode
    'auto') the cluster auto-detection of `jax.distributed.initialize` (TPU pods, SLURM, Open MPI)."""
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
    else:
        jax.distributed.initialize()


def place(tree, shardings):
    """Put host/single-device arrays onto global shardings (multi-process safe); arrays already there stay."""
    def one(x, sh):
        if isinstance(x, jax.Array) and x.sharding == sh:
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, sh)
        a = np.asarray(x)  # the same value on every process (same seed / same file)
        return jax.make_array_from_callback(a.shape, sh, lambda idx: a[idx])

    return jax.tree.map(one, tree, shardings)


def process_rows(mesh, global_batch: int) -> tuple[int, ...]:
    """The rows of the global batch that this process's devices hold under the batch sharding (sorted)."""
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


def rows_str(rows) -> str:
    rows = list(rows)
    if rows == list(range(rows[0], rows[-1] + 1)):
        return f"{rows[0]}..{rows[-1]}"
    return ",".join(map(str, rows))


def host_tree(tree):
    """Numpy copies of (possibly multi-process) global arrays."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, tree)


def log(msg: str) -> None:
    """A progress line on stderr, from process 0 only."""
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)
