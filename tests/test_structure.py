"""The shape of the code: stages depend on models, not on each other; the CLI only translates;
one table of options drives the command line, job specs and ``JobConfig``."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import click
import polars as pl
import pytest

import allo_batch
from allo_batch.cli import cli
from allo_batch.errors import UsageError
from allo_batch.jobspec import KEYS, RunRequest, configs_for
from allo_batch.options import RUN_OPTIONS
from allo_batch.pipeline import run_jobs
from tests.helpers import KEY, SandboxFactory, invoke, world_for

PACKAGE = Path(allo_batch.__file__).parent
STAGES = {"read", "validate", "look", "plan", "send", "record", "report"}


def imported_modules(path: Path) -> set[str]:
    """The ``allo_batch`` modules a file imports, anywhere in it (lazy imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("allo_"):
            found.add(node.module.split(".")[1] if "." in node.module else "")
            if node.module == "allo_batch":
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(
                a.name.split(".")[1] for a in node.names if a.name.startswith("allo_batch.")
            )
    return found


def test_only_the_pipeline_and_the_cli_import_more_than_one_stage() -> None:
    """A stage knows models, constants and its own library; composing stages is pipeline's."""
    for path in sorted(PACKAGE.glob("*.py")):
        stages = imported_modules(path) & STAGES - {path.stem}
        if path.stem in ("pipeline", "cli"):
            continue
        assert len(stages) <= 1, f"{path.name} imports stages {sorted(stages)}"


@pytest.mark.parametrize("name", ["__init__", "options", "running", "local", "sandbox"])
def test_the_cli_holds_no_orchestration(name: str) -> None:
    """The command line stays a translator: small modules that import no stage except report's
    console and formatting (printing is its job)."""
    source = PACKAGE / "cli" / f"{name}.py"
    assert len(source.read_text().splitlines()) < 300
    assert imported_modules(source) & STAGES <= {"report"}


def test_every_run_option_of_the_table_is_a_flag_and_a_spec_key() -> None:
    """One declaration: the click command and the job-spec keys are built from the table."""
    run = cli.get_command(click.Context(cli), "run")
    assert isinstance(run, click.Command)
    flags = {opt for param in run.params for opt in getattr(param, "opts", [])}
    for option in RUN_OPTIONS:
        assert option.flag in flags
        assert option.name in KEYS


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"rate": -1}, "JobConfig rate: expected a number >= 0.0001, not -1"),
        ({"concurrency": 0}, "JobConfig concurrency: expected an integer from 1 to 256, not 0"),
        ({"timeout": 0}, "JobConfig timeout: expected a number > 0, not 0"),
        ({"limit": -3}, "JobConfig limit: expected an integer >= 0, not -3"),
        ({"input_format": "xlsx"}, "JobConfig format: expected one of"),
        ({"rate": True}, "JobConfig rate: expected a number >= 0.0001, not True"),
    ],
)
def test_a_job_config_from_python_is_checked_like_the_command_line(
    keywords: dict[str, object], message: str
) -> None:
    """JobConfig(rate=-1) is a UsageError with a clear message, not a ValueError later."""
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        allo_batch.JobConfig(input=Path("in.csv"), **keywords)  # type: ignore[arg-type]


def test_a_two_file_job_gives_the_python_api_what_it_gives_the_cli(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """A glob spec through configs_for + run_jobs and through `allo-batch run --job` make the
    same result files and the same exit code."""
    drop = tmp_path / "drop"
    drop.mkdir()
    parts = []
    for part in (1, 2):
        frame = pl.DataFrame(
            {
                "call_id": [f"cll-{part}{i:03d}" for i in range(5)] + ["msg-1"],
                "content": [f"fix {part} {i}" for i in range(6)],
            }
        )
        frame.write_csv(drop / f"part-{part}.csv")
        parts.append(frame)

    def spec(out: str) -> Path:
        path = tmp_path / f"{out}.toml"
        path.write_text(f'input = "drop/part-*.csv"\noutput = "{out}/{{stem}}.results.csv"\n')
        return path

    results = {}
    for way in ("api", "cli"):
        with sandbox_factory(world_for(*parts, write_rate=100), api_key=KEY) as sandbox:
            if way == "api":
                request = RunRequest(job=spec(way), api_key=allo_batch.Secret(KEY))
                configs = [
                    dataclasses.replace(config, base_url=sandbox.base_url)
                    for config in configs_for(request).configs
                ]
                code = run_jobs(configs).exit_code
            else:
                args = ["run", "--job", str(spec(way)), "--base-url", sandbox.base_url]
                code = invoke(args).exit_code
        files = sorted((tmp_path / way).glob("*.results.csv"))
        results[way] = (
            code,
            [f.name for f in files],
            [pl.read_csv(f).select("row", "call_id", "status", "error_code") for f in files],
        )
    api, via_cli = results["api"], results["cli"]
    assert api[0] == via_cli[0] == 1  # the msg- rows are invalid
    assert api[1] == via_cli[1] == ["part-1.results.csv", "part-2.results.csv"]
    for left, right in zip(api[2], via_cli[2], strict=True):
        assert left.equals(right)


def test_the_command_list_shown_by_help_matches_each_command() -> None:
    """`allo-batch --help` lists the commands without importing them: its short help texts
    must say what the commands themselves say."""
    from allo_batch.cli import COMMANDS

    context = click.Context(cli)
    assert sorted(cli.list_commands(context)) == sorted(COMMANDS)
    for name, (_module, short) in COMMANDS.items():
        command = cli.get_command(context, name)
        assert command is not None
        assert command.get_short_help_str(limit=len(short)) == short, name
