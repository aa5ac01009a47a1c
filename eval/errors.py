"""Errors and exit statuses of `python -m eval.run`, and its one stderr log."""

from __future__ import annotations

import sys

EXIT_OK, EXIT_RUN, EXIT_USAGE, EXIT_MISMATCH = 0, 1, 2, 3


class UsageError(Exception):
    """A bad argument, checkpoint or selection, found before any compute (exit status 2)."""


class RunError(Exception):
    """A problem found during the run that needs other arguments, e.g. a second MT-Bench turn too long for the
    buckets (exit status 1)."""


class BadCheckpointError(Exception):
    """The loaded target cannot be evaluated, e.g. its first logits are not finite (exit status 2)."""


def log(msg: str) -> None:
    print(f"[eval.run] {msg}", file=sys.stderr, flush=True)
