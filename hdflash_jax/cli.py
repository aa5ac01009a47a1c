"""The one `main` wrapper of every command: errors become one `error:` line and an exit status, never a traceback.

    def main(argv=None) -> int:
        return run_command(_main, argv)

`_main(argv) -> int` does the work and raises `hdflash_jax.errors.CommandError` (or its subclasses) for what the
user can fix. Here a `CommandError` prints its message and exits with its code; an `OSError` (a file that cannot
be read or written) prints the operating system's message, which names the file, exit 1; Ctrl-C and SIGTERM
unwind normally first, so the atomic writers (hdflash_jax.fileio) remove their temp folders, then exit 130 / 143.
A bug is still a traceback: only these kinds are the user's to fix.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Sequence

from hdflash_jax.errors import EXIT_INTERRUPTED, EXIT_RUN, CommandError

EXIT_TERMINATED = 143


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so `finally` blocks and the atomic writers' cleanup run."""


def _raise_terminated(signum, frame):
    raise _Terminated()


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def run_command(main: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
    """`main(argv)` with the errors a user can fix turned into one line and an exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return main(argv)
    except CommandError as e:
        fail(str(e))
        return e.exit_code
    except OSError as e:
        fail(str(e) or type(e).__name__)
        return EXIT_RUN
    except KeyboardInterrupt:
        fail("interrupted; nothing half-written was left behind")
        return EXIT_INTERRUPTED
    except _Terminated:
        fail("terminated (SIGTERM); nothing half-written was left behind")
        return EXIT_TERMINATED
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
