"""What counts as a user's mistake, and how the command-line tools report one.

A mistake in what the user gave (a flag, a config, a data file, a checkpoint, an export) raises one
of the errors below, whose message names the input and says what is wrong. ``train.py`` and
``eval.py`` print it as one line, ``prog: error: ...``, and exit with status 2 (``HELM_TRACEBACK=1``
shows the traceback instead); Ctrl-C prints ``prog: interrupted`` and exits 130. This module imports
nothing heavy, so the tools can report a mistake before torch is loaded.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class UserError(Exception):
    """A mistake in the user's input; the message says which and why."""


class ConfigError(UserError, ValueError):
    """A flag or YAML value that cannot apply."""


class DataError(UserError, ValueError):
    """A data file that cannot be read as asked (names the file and line)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, refused, corrupted or does not fit."""


class ExportError(UserError, ValueError):
    """A model or folder that an export format cannot hold exactly (names the option)."""


# ValueError and FileNotFoundError: library checks of arguments (``build_loss``, the model configs).
USER_ERRORS = (UserError, ValueError, FileNotFoundError)


def run_reporting_errors(prog: str, run: Callable[[], int]) -> int:
    """``run()``'s exit status, with a user's mistake reported as one line (status 2) and Ctrl-C as
    ``interrupted`` (status 130)."""
    try:
        return run()
    except USER_ERRORS as exc:
        if os.environ.get("HELM_TRACEBACK"):
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
