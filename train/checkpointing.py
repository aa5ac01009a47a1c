"""Training checkpoints of both trainers: one orbax `CheckpointManager` layout.

`<dir>/<step>/` holds two items: `state` (a pytree of arrays: params, optimizer state, step, ...; restored into
the shardings of an abstract tree, so a resumed run continues on the same mesh) and `data` (JSON: the input
pipeline's position). Saves are asynchronous; `close()` waits for them. Orbax wants absolute paths: relative ones
are resolved here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from hdflash_jax.checkpoint import orbax_log, quiet_closed_loop_noise, unreadable

quiet_closed_loop_noise()


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = None, *, read_only: bool = False):
        self.directory = Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(read_only=True) if read_only else \
            ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                           item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                          "data": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def delete(self, step: int) -> None:
        self._mngr.delete(int(step))

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def save(self, step: int, state: Any, data: dict | None = None) -> None:
        """Save `state` (and the JSON `data`) as step `step`, replacing a checkpoint of that step."""
        self._mngr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                           data=ocp.args.JsonSave(data or {})), force=True)

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict]:
        """(state, data) of step `step` (None: the latest), placed as `abstract_state`'s ShapeDtypeStructs say.
        A corrupt or truncated step is a ValueError naming its folder and the unreadable entry."""
        self._mngr.wait_until_finished()  # a save of this step may still be in flight
        step = self._step(step)
        try:
            with orbax_log():
                out = self._mngr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 — TensorStore's and orbax's errors for a corrupt step vary
            raise unreadable(self.directory / str(step), e, what="entry") from None
        return out["state"], dict(out["data"] or {})

    def newest_intact(self, abstract_state: Any, below: int | None = None) -> tuple[int, Any, dict] | None:
        """(step, state, data) of the newest step (below `below`) that restores completely, or None."""
        for step in reversed(self.all_steps()):
            if below is not None and step >= below:
                continue
            try:
                return (step, *self.restore(step, abstract_state))
            except ValueError:
                continue
        return None

    def restore_numpy(self, step: int | None = None) -> tuple[int, Any]:
        """(step, state as numpy arrays) on any topology, without knowing the tree in advance."""
        step = self._step(step)
        meta = self._mngr.item_metadata(step)["state"]
        sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sh), meta)
        out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return step, jax.tree.map(np.asarray, out["state"])

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint")
        return step

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
