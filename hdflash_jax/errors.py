"""The errors a command reports as one line, and the exit statuses they map to: one hierarchy for every CLI.

A command stops on a `CommandError` with `error: <message>` on stderr (the message names the flag, key or file)
and exits with the error's `exit_code`; `hdflash_jax.cli.run_command` is the one place that does this.

    0  ok
    1  a problem found while running (a source file that is corrupt, a prompt too long for the buckets, ...)
    2  refused before any work: a bad flag, config, checkpoint, selection or output path; nothing was written
    3  eval.run: a greedy speculative output differs from AR's (unless --allow-mismatch)
  130  interrupted (Ctrl-C); whatever was being written was removed
"""

from __future__ import annotations

EXIT_OK, EXIT_RUN, EXIT_USAGE, EXIT_MISMATCH, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class CommandError(Exception):
    """A problem a command reports in one line (`str(e)`) and exits on with `exit_code`."""
    exit_code = EXIT_RUN


class UsageError(CommandError, ValueError):
    """A bad flag, config, checkpoint or selection, found before any compute (exit status 2)."""
    exit_code = EXIT_USAGE


class OutputRefused(UsageError):
    """An output path the command may not write or replace (hdflash_jax.fileio.check_output); nothing written."""


class RunError(CommandError):
    """A problem found during the run that needs other arguments or inputs (exit status 1)."""
