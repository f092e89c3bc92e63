"""allo-batch: apply corrected Allo call summaries in bulk, safely and at the key's pace.

The Python API runs the same pipeline as ``allo-batch run``::

    from pathlib import Path
    from allo_batch import JobConfig, Secret, run_job

    summary = run_job(JobConfig(input=Path("fixes.parquet"), api_key=Secret(key)))
    summary.exit_code, summary.by_status      # the same numbers as ``run --json``

A run that stops early raises a :class:`RunStoppedError` or :class:`InterruptedRunError` whose
``exit_code`` is the command line's and whose ``summary`` holds the figures; bad options raise
:class:`UsageError` before anything is sent.

Names resolve lazily, so importing the package (and ``allo-batch --help``) stays fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from allo_batch.config import JobConfig, RetryPolicy, Secret
    from allo_batch.errors import (
        AlloBatchError,
        ApiUnavailableError,
        AuthRefusedError,
        DeadlineError,
        ExitCode,
        InputError,
        InterruptedRunError,
        LockedError,
        OutputConflictError,
        RunStoppedError,
        TooManyErrorsError,
        UsageError,
    )
    from allo_batch.jobspec import JobPlan, RunRequest, configs_for
    from allo_batch.models import InputCheck, RowResult, RunSummary
    from allo_batch.options import RunOptions
    from allo_batch.pipeline import (
        JobOutcome,
        JobsOutcome,
        check_input,
        run_job,
        run_job_async,
        run_jobs,
    )

_WHERE = {
    "run_job": "allo_batch.pipeline",
    "run_job_async": "allo_batch.pipeline",
    "run_jobs": "allo_batch.pipeline",
    "check_input": "allo_batch.pipeline",
    "JobOutcome": "allo_batch.pipeline",
    "JobsOutcome": "allo_batch.pipeline",
    "RunRequest": "allo_batch.jobspec",
    "JobPlan": "allo_batch.jobspec",
    "configs_for": "allo_batch.jobspec",
    "RunOptions": "allo_batch.options",
    "InputCheck": "allo_batch.models",
    "JobConfig": "allo_batch.config",
    "RetryPolicy": "allo_batch.config",
    "Secret": "allo_batch.config",
    "RunSummary": "allo_batch.models",
    "RowResult": "allo_batch.models",
    "ExitCode": "allo_batch.errors",
    "AlloBatchError": "allo_batch.errors",
    "UsageError": "allo_batch.errors",
    "InputError": "allo_batch.errors",
    "OutputConflictError": "allo_batch.errors",
    "RunStoppedError": "allo_batch.errors",
    "AuthRefusedError": "allo_batch.errors",
    "DeadlineError": "allo_batch.errors",
    "TooManyErrorsError": "allo_batch.errors",
    "ApiUnavailableError": "allo_batch.errors",
    "LockedError": "allo_batch.errors",
    "InterruptedRunError": "allo_batch.errors",
}

__all__ = [
    "AlloBatchError",
    "ApiUnavailableError",
    "AuthRefusedError",
    "DeadlineError",
    "ExitCode",
    "InputCheck",
    "InputError",
    "InterruptedRunError",
    "JobConfig",
    "JobOutcome",
    "JobPlan",
    "JobsOutcome",
    "LockedError",
    "OutputConflictError",
    "RetryPolicy",
    "RowResult",
    "RunOptions",
    "RunRequest",
    "RunStoppedError",
    "RunSummary",
    "Secret",
    "TooManyErrorsError",
    "UsageError",
    "check_input",
    "configs_for",
    "run_job",
    "run_job_async",
    "run_jobs",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    msg = f"module 'allo_batch' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
