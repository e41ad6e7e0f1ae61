"""What every command shares: its parser, where results go, and exit statuses that tell the truth: 0 all finished,
2 bad input or an unreachable cluster/storage (one ``error: ...`` line, never a traceback, nothing written), 3 some
searches/evaluations failed (their count and errors' place are printed), 130 interrupted (the same command resumes).
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from typing import Callable, Iterable, NoReturn, Sequence

from pcdarts_core.runtime import SearchDiverged

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_FAILED = 3
EXIT_INTERRUPTED = 130

DEFAULT_STORAGE_ENV = "PCDARTS_STORAGE"
DEFAULT_STORAGE = "results"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,199}$")


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """Run ``main``; user errors (ValueError, FileNotFoundError, KeyError from configs) print one line, exit 2; a
    diverged search or evaluation prints its ``diverged at epoch E (loss nan)`` line and exits 3."""
    try:
        code = main(argv)
    except KeyboardInterrupt:
        fail("interrupted; run the same command again to resume", EXIT_INTERRUPTED)
    except SearchDiverged as err:  # the search ran and failed: not bad input
        fail(str(err), EXIT_FAILED)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    raise SystemExit(code or 0)


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one ``error:`` line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known key, or nothing."""
    hint = difflib.get_close_matches(str(key), [str(k) for k in known], n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


def resolve_storage(storage: str | None) -> str:
    """``--storage``, else ``$PCDARTS_STORAGE``, else ``./results``; local paths made absolute."""
    storage = storage or os.environ.get(DEFAULT_STORAGE_ENV) or DEFAULT_STORAGE
    return storage.rstrip("/") if "://" in storage else os.path.abspath(os.path.expanduser(storage))


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"--name {name!r} must be letters, digits and ._=+- (no slashes), at most 200 characters")
    return name


def split_experiment(experiment: str, storage: str | None) -> tuple[str, str]:
    """``EXPERIMENT`` as (storage, name): a name under ``--storage``, or a path/URI of the experiment folder."""
    if "/" not in experiment:
        return resolve_storage(storage), check_name(experiment)
    parent, _, name = resolve_storage(experiment).rpartition("/")
    return parent, check_name(name)
