"""Errors that stop a run, and the exit codes they map to (DESIGN §2).

::

    AlloBatchError                   exit_code
    ├── UsageError                   2   bad options, nothing was sent
    │   ├── InputError               2   missing/unreadable input, missing column
    │   └── OutputConflictError      2   output belongs to another input (see --force)
    ├── RunStoppedError              3   the run stopped early; unsent rows are not_sent
    │   ├── AuthRefusedError         3   401/403: the key was refused
    │   ├── TooManyErrorsError       3   --max-errors reached
    │   ├── ApiUnavailableError      3   the API kept failing
    │   ├── DeadlineError            3   --finish-by passed: the next window resumes
    │   └── LockedError              3   another run holds this output
    └── InterruptedRunError          130 SIGINT/SIGTERM; all that landed is recorded

Row failures are never exceptions: they are data in the result file. Any other exception is a
bug: the command line exits 70 (``ExitCode.INTERNAL``) with one line and a saved traceback.
"""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from allo_batch.models import RunSummary


class ExitCode(IntEnum):
    """Process exit codes, a contract for cron and Airflow."""

    OK = 0
    ROWS_NOT_UPDATED = 1
    USAGE = 2
    STOPPED = 3
    INTERNAL = 70  # sysexits' EX_SOFTWARE: a bug, not a data problem; a rerun resumes
    INTERRUPTED = 130


class AlloBatchError(Exception):
    """Base of every error allo-batch raises; carries the exit code it maps to."""

    exit_code: ExitCode = ExitCode.USAGE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        #: The figures of a run that had started (stops and interruptions), else None.
        self.summary: RunSummary | None = None

    def restate(self, message: str) -> None:
        """Replace the message once more is known (the final count of a stop)."""
        self.message = message
        self.args = (message,)


class UsageError(AlloBatchError):
    """Bad options or configuration; nothing was sent."""


class InputError(UsageError):
    """The input file is missing, unreadable, or lacks a required column."""


class OutputConflictError(UsageError):
    """The output already holds results of a different input."""


class RunStoppedError(AlloBatchError):
    """The run stopped before every row was tried."""

    exit_code = ExitCode.STOPPED


class AuthRefusedError(RunStoppedError):
    """The API refused the key (401) or its permissions (403)."""


class TooManyErrorsError(RunStoppedError):
    """More rows failed than ``--max-errors`` allows."""


class ApiUnavailableError(RunStoppedError):
    """The API kept failing with transient errors."""


class DeadlineError(RunStoppedError):
    """The ``--finish-by`` deadline passed; what is left is for the next window's run."""


class LockedError(RunStoppedError):
    """Another live run is writing the same output."""


class InterruptedRunError(AlloBatchError):
    """SIGINT or SIGTERM stopped the run; what landed is recorded."""

    exit_code = ExitCode.INTERRUPTED
