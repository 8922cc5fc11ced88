"""What counts as a user's mistake, and how the command-line tools report one.

A mistake in what the user gave (a flag, a config, a data file, a checkpoint, an export) raises one
of the errors below, whose message names the input and says what is wrong. ``train.py`` and
``eval.py`` print it as one line, ``prog: error: ...``, and exit with status 2 (``HELM_TRACEBACK=1``
shows the traceback instead); so does a write that fails for want of room (`WriteError`, or any
``OSError`` of a full disk or a file too large). Ctrl-C prints ``prog: interrupted`` and exits 130.
This module imports nothing heavy, so the tools can report a mistake before torch is loaded.
"""

from __future__ import annotations

import errno
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


class WriteError(UserError, OSError):
    """A file that could not be written (a full disk, a file-size limit, no permission): names the
    path and the cause; the previous file is unchanged (``helm.fileio``)."""


# ValueError and FileNotFoundError: library checks of arguments (``build_loss``, the model configs).
USER_ERRORS = (UserError, ValueError, FileNotFoundError)
# Writes that fail for want of room: one line wherever they happen (logs, TensorBoard included).
DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EFBIG: "file too large",
             errno.EDQUOT: "disk quota exceeded"}  # fmt: skip


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
    except OSError as exc:
        if exc.errno not in DISK_FULL or os.environ.get("HELM_TRACEBACK"):
            raise
        print(f"{prog}: error: cannot write {exc.filename or 'a file'}: {DISK_FULL[exc.errno]}",
              file=sys.stderr)  # fmt: skip
        return 2
