"""eval.run's errors (the library's hierarchy, `hdflash_jax.errors`) and its one stderr log."""

from __future__ import annotations

import sys

from hdflash_jax.errors import EXIT_MISMATCH, EXIT_OK, EXIT_RUN, EXIT_USAGE, RunError, UsageError  # noqa: F401


class BadCheckpointError(UsageError):
    """The loaded target cannot be evaluated, e.g. its first logits are not finite (exit status 2)."""


def log(msg: str) -> None:
    print(f"[eval.run] {msg}", file=sys.stderr, flush=True)
