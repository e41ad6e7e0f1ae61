"""What every command shares: bad input becomes one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import sys
from typing import Callable, NoReturn, Sequence

from pcdarts_core.runtime import SearchDiverged

#: Exit statuses of every command (docs/failures.md): a requested search or evaluation failed (it diverged or
#: crashed); bad input (settings, names, unreadable files such as a corrupted checkpoint); interrupted (Ctrl-C:
#: the same command resumes).
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class UsageError(ValueError):
    """A problem with what the user asked for (config, names, paths): reported in one line."""


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """Run ``main``; user errors (ValueError, FileNotFoundError, KeyError from configs) print one line, exit 2; a
    diverged search or evaluation prints its ``diverged at epoch E (loss nan)`` line and exits 1."""
    try:
        code = main(argv)
    except KeyboardInterrupt:
        fail("interrupted; run the same command again to resume", EXIT_INTERRUPTED)
    except SearchDiverged as err:
        fail(str(err), EXIT_FAILED)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    raise SystemExit(code or 0)
