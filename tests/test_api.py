"""The Python API: one public surface, complete, documented, running the real pipeline."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

import allo_batch
from allo_batch import config, errors, jobspec, models, options, pipeline
from tests.helpers import KEY, WRONG_KEY, SandboxFactory, world_for


def test_every_public_name_resolves_and_is_documented() -> None:
    """Every name of allo_batch.__all__ resolves and has a docstring."""
    for name in allo_batch.__all__:
        value = getattr(allo_batch, name)
        assert inspect.getdoc(value), f"{name} has no docstring"


def test_all_lists_every_public_name_of_the_api_modules() -> None:
    """A new error, config class or entry point cannot be left out of ``__all__``."""
    internal = {"PlannedRequest", "JobSpec", "PlannedFile", "Option"}  # hand-offs between parts
    public = {
        name
        for module in (config, errors, models, options, jobspec, pipeline)
        for name, value in vars(module).items()
        if inspect.isclass(value) and value.__module__ == module.__name__ and name[0] != "_"
    }
    entry_points = {"run_job", "run_job_async", "run_jobs", "check_input", "configs_for"}
    public = public - internal | entry_points
    assert public == set(allo_batch.__all__)
    assert set(allo_batch._WHERE) == set(allo_batch.__all__)
    assert pipeline.run_job is allo_batch.run_job


def test_importing_the_package_loads_no_heavy_library() -> None:
    """import allo_batch loads neither polars, httpx nor anyio."""
    code = "import sys, allo_batch; print(sorted({'polars','httpx','anyio'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_run_job_returns_the_summary_and_stops_raise_typed_errors(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """run_job returns the run's summary; a refused key raises AuthRefusedError (exit 3)
    carrying the summary of the rows it left unsent."""
    source = tmp_path / "in.csv"
    frame = pl.DataFrame(
        {"call_id": [f"cll-{i}" for i in range(6)], "content": [f"fix {i}" for i in range(6)]}
    )
    frame.write_csv(source)
    with sandbox_factory(world_for(frame), api_key=KEY) as sb:
        job = allo_batch.JobConfig(
            input=source,
            output=tmp_path / "out.parquet",
            base_url=sb.base_url,
            api_key=allo_batch.Secret(KEY),
        )
        summary = allo_batch.run_job(job)
        assert isinstance(summary, allo_batch.RunSummary)
        assert summary.exit_code == allo_batch.ExitCode.OK
        assert summary.by_status == {"updated": 6}
        wrong = allo_batch.JobConfig(
            input=source,
            output=tmp_path / "other.csv",
            base_url=sb.base_url,
            api_key=allo_batch.Secret(WRONG_KEY),
        )
        with pytest.raises(allo_batch.AuthRefusedError) as refused:
            allo_batch.run_job(wrong)
    assert refused.value.exit_code == 3
    assert refused.value.summary is not None
    assert refused.value.summary.by_status == {"not_sent": 6}
