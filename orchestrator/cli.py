"""What every command shares: bad input becomes one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import sys
from typing import Callable, NoReturn, Sequence


class UsageError(ValueError):
    """A problem with what the user asked for (config, names, paths): reported in one line."""


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """Run ``main``; user errors (ValueError, FileNotFoundError, KeyError from configs) print one line, exit 2."""
    try:
        code = main(argv)
    except KeyboardInterrupt:
        fail("interrupted; run the same command again to resume", 130)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    raise SystemExit(code or 0)
