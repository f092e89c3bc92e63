"""`jobs/airflow/allo_batch_dag.py` run for real by `airflow dags test` against the sandbox.

Apache Airflow is installed in its own virtual environment, `.venv-airflow/` (kept between
runs, so only the first run pays for the download), so the main one stays light. Skip these
tests with `ALLO_BATCH_SKIP_AIRFLOW=1`; CI runs them. The checks of a trigger conf live in
`jobs/airflow/allo_batch_command.py`, which imports no Airflow: the first tests load it here and
always run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import click
import polars as pl
import pytest

from allo_batch.cli import cli
from allo_batch.constants import Code
from allo_batch.sandbox.app import _Refusal
from tests.helpers import KEY, SandboxFactory, check_landed_once, corrections, world_for

AIRFLOW_VERSION = "3.3.2"
REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv-airflow"
DAG_ID = "allo_batch_corrections"
DS = "2026-11-23"

COMMAND_MODULE = REPO / "jobs" / "airflow" / "allo_batch_command.py"
ATTACKER = "http://attacker.example:8443"


def run_command() -> click.Command:
    """The `run` command as click parses it (commands load lazily)."""
    command = cli.get_command(click.Context(cli), "run")
    assert command is not None
    return command


def on_airflow(test: Callable[..., None]) -> Callable[..., None]:
    """Marks of a test that runs Airflow itself."""
    marks = (
        pytest.mark.airflow,
        # The first such test also installs Airflow (a download of about 300 MB).
        pytest.mark.timeout(1200),
        pytest.mark.skipif(
            os.environ.get("ALLO_BATCH_SKIP_AIRFLOW") == "1", reason="ALLO_BATCH_SKIP_AIRFLOW=1"
        ),
    )
    for mark in marks:
        test = mark(test)
    return test


# -- The checks of a trigger conf, without Airflow ----------------------------------------------


@pytest.fixture(scope="module")
def command_module() -> Iterator[ModuleType]:
    """``allo_batch_command.py`` loaded as the DAG loads it, by its own name."""
    spec = importlib.util.spec_from_file_location("allo_batch_command", COMMAND_MODULE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.fixture
def jobs_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "jobs"
    folder.mkdir()
    (folder / "nightly.toml").write_text('input = "drop.csv"\n')
    (folder / "own-key.toml").write_text('input = "drop.csv"\napi_key_env = "NIGHTLY_KEY"\n')
    return folder


def checked(module: ModuleType, conf: dict[str, Any], jobs: Path) -> Any:
    """Check ``conf`` as the task does: the params are the DAG's defaults with the conf merged."""
    params = {"job": "nightly.toml", "input": None, "output": None, **conf}
    return module.checked_request(conf, params, jobs)


@pytest.mark.parametrize(
    ("conf", "key", "problem"),
    [
        # What a trigger would use to send the key elsewhere.
        ({"input": f"--base-url={ATTACKER}"}, "input", "must not start with '-'"),
        ({"output": f"--base-url={ATTACKER}"}, "output", "must not start with '-'"),
        ({"input": "-o/tmp/stolen.csv"}, "input", "must not start with '-'"),
        ({"base_url": ATTACKER}, "base_url", "the base URL comes only from the Airflow connection"),
        ({"ALLO_BASE_URL": ATTACKER}, "ALLO_BASE_URL", "the base URL comes only from"),
        ({"--base-url": ATTACKER}, "--base-url", "the base URL comes only from"),
        ({"host": "attacker.example"}, "host", "the base URL comes only from"),
        ({"limit": 5}, "limit", "unknown; a trigger may set job, input, output"),
        # Paths: absolute or an object store, one line, nothing hidden.
        ({"input": "drops/corrections.csv"}, "input", "must be an absolute path or an s3://"),
        ({"output": "~/results.parquet"}, "output", "must be an absolute path"),
        ({"input": "/srv/drop.csv\n--base-url=x"}, "input", "control or invisible characters"),
        ({"output": "/srv/out\u202egpj.parquet"}, "output", "control or invisible characters"),
        ({"input": "/srv/drop\x00.csv"}, "input", "control or invisible characters"),
        ({"input": "s3://"}, "input", "names no bucket"),
        ({"input": ["/srv/drop.csv"]}, "input", "must be a string, not a value of type list"),
        # Specs: the plain name of a file in the jobs folder.
        ({"job": "../nightly.toml"}, "job", "must be the file name of a .toml spec"),
        ({"job": "/tmp/evil.toml"}, "job", "must be the file name of a .toml spec"),
        ({"job": "sub/nightly.toml"}, "job", "must be the file name of a .toml spec"),
        ({"job": "..\\nightly.toml"}, "job", "must be the file name of a .toml spec"),
        ({"job": "nightly.toml.bak"}, "job", "must be the file name of a .toml spec"),
        ({"job": "backfill.toml"}, "job", "no spec 'backfill.toml' in the jobs folder"),
        ({"job": ""}, "job", "must be a spec file name"),
    ],
)
def test_a_trigger_conf_is_refused_naming_its_key(
    command_module: ModuleType, jobs_folder: Path, conf: dict[str, Any], key: str, problem: str
) -> None:
    with pytest.raises(command_module.ConfError) as refused:
        checked(command_module, conf, jobs_folder)
    message = str(refused.value)
    assert message.startswith(f"trigger conf key {key!r}: ")
    assert problem in message
    assert ATTACKER not in message  # a short prefix at most
    assert "\n" not in message and "\x00" not in message and "\u202e" not in message


def test_a_refused_value_is_shown_only_as_a_short_escaped_prefix(
    command_module: ModuleType, jobs_folder: Path
) -> None:
    value = "relative\tpath/to/the/file/ak_live_0123456789abcdef.csv"
    with pytest.raises(command_module.ConfError) as refused:
        checked(command_module, {"input": value}, jobs_folder)
    message = str(refused.value)
    assert "'relative\\tpath/to/the'..." in message  # 20 characters, the tab escaped
    assert "ak_live" not in message


def test_a_spec_linked_from_outside_the_jobs_folder_is_refused(
    command_module: ModuleType, jobs_folder: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "evil.toml"
    outside.write_text(f'input = "/srv/drop.csv"\nbase_url = "{ATTACKER}"\n')
    (jobs_folder / "linked.toml").symlink_to(outside)
    with pytest.raises(
        command_module.ConfError, match=r"no spec 'linked\.toml' in the jobs folder"
    ):
        checked(command_module, {"job": "linked.toml"}, jobs_folder)


@pytest.mark.parametrize(
    "conf",
    [
        {},
        {"job": "own-key.toml"},
        {"input": "/srv/drops/a.csv", "output": "/srv/results/a.parquet"},
        {"input": "s3://drops/a.csv", "output": "gs://results/a.parquet"},
        {"input": "az://drops/a.csv", "output": None},
        {"input": "", "output": ""},  # a trigger form's empty fields: the spec's own
    ],
)
def test_an_accepted_conf_reaches_allo_batch_as_its_values_and_nothing_else(
    command_module: ModuleType,
    jobs_folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    conf: dict[str, Any],
) -> None:
    """The command, parsed by allo-batch's own click command, says what the conf said; the base
    URL is the connection's even with another in the worker's environment."""
    request = checked(command_module, conf, jobs_folder)
    args = command_module.command("allo-batch", request, ds="2026-11-23", base_url="http://api")
    assert args[:2] == ["allo-batch", "run"]
    given_input = conf.get("input") or None
    given_output = conf.get("output") or None
    # Only the input follows "--"; every option carries its value after "=".
    assert args[args.index("--") + 1 :] == ([given_input] if given_input else [])
    assert all(arg.startswith("--") for arg in args[2 : args.index("--")])
    monkeypatch.setenv("ALLO_BASE_URL", ATTACKER)
    parsed = run_command().make_context("run", args[2:]).params
    assert parsed["base_url"] == "http://api"
    assert parsed["job_file"] == jobs_folder.resolve() / (conf.get("job") or "nightly.toml")
    # A local path comes back as a Path, an object-store URI as itself: compare as text.
    assert (str(parsed["input_path"]) if given_input else None) == given_input
    assert (str(parsed["output"]) if given_output else None) == given_output


def test_after_the_double_dash_even_an_option_like_input_stays_the_input(
    command_module: ModuleType, jobs_folder: Path
) -> None:
    """The second wall: were a value starting with '-' ever let through, click still reads it
    as INPUT, not as --base-url."""
    request = command_module.Request(
        spec=jobs_folder / "nightly.toml", input_path=f"--base-url={ATTACKER}", output=None
    )
    args = command_module.command("allo-batch", request, ds="2026-11-23", base_url=None)
    parsed = run_command().make_context("run", args[2:]).params
    assert parsed["input_path"] == Path(f"--base-url={ATTACKER}")
    assert parsed["base_url"] != ATTACKER


def test_the_base_url_comes_from_the_connection_else_the_worker(
    command_module: ModuleType,
) -> None:
    worker = {"ALLO_BASE_URL": "http://worker"}
    assert command_module.base_url("http://connection", worker) == "http://connection"
    assert command_module.base_url(None, worker) == "http://worker"
    assert command_module.base_url(None, {}) is None


@pytest.mark.parametrize(
    ("line", "variable"),
    [
        ("", "ALLO_API_KEY"),
        ('api_key_env = "NIGHTLY_KEY"', "NIGHTLY_KEY"),
        ('api_key_env = "ALLO_BASE_URL"', None),
        ('api_key_env = "PATH"', None),
        ('api_key_env = "PYTHONSTARTUP"', None),
        ('api_key_env = "LD_PRELOAD"', None),
        ('api_key_env = "A=B"', None),
    ],
)
def test_the_key_never_goes_into_a_variable_that_steers_the_run(
    command_module: ModuleType, tmp_path: Path, line: str, variable: str | None
) -> None:
    spec = tmp_path / "job.toml"
    spec.write_text(f'input = "drop.csv"\n{line}\n')
    if variable is not None:
        assert command_module.key_variable(spec) == variable
    else:
        with pytest.raises(command_module.ConfError, match=r"job spec job\.toml: api_key_env"):
            command_module.key_variable(spec)


# -- The DAG run by Airflow ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An Airflow installation of its own and a fresh metadata database."""
    stamp = VENV / f".installed-{AIRFLOW_VERSION}"
    if not stamp.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        for what in (["--upgrade", "pip"], [f"apache-airflow=={AIRFLOW_VERSION}"]):
            done = subprocess.run([*pip, *what], capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        stamp.touch()
    home = tmp_path_factory.mktemp("airflow")
    subprocess.run(
        [str(VENV / "bin" / "airflow"), "db", "migrate"],
        env=base_env(home),
        check=True,
        capture_output=True,
        timeout=300,
    )
    yield home


def base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALLO_", "AIRFLOW"))}
    env.pop("VIRTUAL_ENV", None)
    return {
        **env,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "jobs" / "airflow"),
        "ALLO_BATCH": str(Path(sys.executable).parent / "allo-batch"),
        "ALLO_BATCH_RETRY_DELAY": "3",
    }


def connection(base_url: str, key: str) -> str:
    host_port = base_url.removeprefix("http://")
    host, port = host_port.split(":")
    fields = {"conn_type": "http", "host": host, "port": int(port), "schema": "http"}
    return json.dumps({**fields, "password": key})


def dags_test(env: dict[str, str], conf: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(VENV / "bin" / "airflow"), "dags", "test", DAG_ID, DS, "-c", json.dumps(conf)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def nightly_drop(path: Path, frame: pl.DataFrame) -> Path:
    frame.rename({"call_id": "conversation_id", "content": "corrected_summary"}).write_csv(path)
    return path


def wait_for(condition: Any, process: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if condition():
            return
        time.sleep(0.02)
    pytest.fail(f"never saw {what} (airflow exit {process.poll()})")


@on_airflow
def test_the_dag_lands_every_row_once_and_a_retry_resumes_after_a_stop(
    airflow_home: Path,
    sandbox_factory: SandboxFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Attempt 1 is stopped by a refused key (exit 3) after some rows landed; Airflow retries the
    task, and attempt 2 sends only the rest. The key comes from the Airflow connection."""
    frame = corrections(12)
    drop = nightly_drop(tmp_path / "corrections-1.csv", frame)
    output = tmp_path / "corrections-1.results.parquet"
    with sandbox_factory(world_for(frame, write_rate=20), api_key=KEY) as sandbox:
        env = {**base_env(airflow_home), "AIRFLOW_CONN_ALLO_API": connection(sandbox.base_url, KEY)}
        counters = sandbox.app.counters
        patch = sandbox.app._patch_summary

        def revoked_at_the_fifth_write(*args: Any) -> Any:
            # In the sandbox, so that attempt 1 cannot finish before a test thread revokes.
            if counters["writes_applied"] >= 4:
                sandbox.app.world.revoked.add(KEY)
                raise _Refusal(401, Code.API_KEY_REVOKED, "This API key was revoked.")
            return patch(*args)

        monkeypatch.setattr(sandbox.app, "_patch_summary", revoked_at_the_fifth_write)
        process = dags_test(env, {"input": str(drop), "output": str(output)})
        wait_for(lambda: counters["status_401"] >= 1, process, "the key refused")
        time.sleep(0.5)
        monkeypatch.undo()
        sandbox.app.world.revoked.discard(KEY)
        log, _ = process.communicate(timeout=120)
        assert process.returncode == 0, log[-3000:]
        check_landed_once(sandbox, frame)
        assert counters["writes_applied"] == 12
    assert "allo-batch exit 3: stopped early; a retry resumes" in log
    assert "try_number=2" in log
    assert "state=success" in log
    results = pl.read_parquet(output)  # attempt 2's: what attempt 1 landed is carried over
    statuses = results["status"].to_list()
    assert set(statuses) == {"skipped", "updated"}
    assert statuses.count("skipped") == 4  # the writes before the refusal
    assert results["version"].to_list() == [2] * 12
    assert KEY not in log


@on_airflow
def test_exit_1_fails_the_task_without_retrying_and_logs_the_summary(
    airflow_home: Path, sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """A row the API would refuse: the task fails for good with the summary; the key comes
    from the Airflow variable, the base URL from the worker's ALLO_BASE_URL."""
    frame = corrections(3)
    bad = frame.with_columns(pl.Series("call_id", ["cll-000000", "msg-000001", "cll-000002"]))
    drop = nightly_drop(tmp_path / "corrections-2.csv", bad)
    output = tmp_path / "corrections-2.results.parquet"
    with sandbox_factory(world_for(frame, write_rate=20), api_key=KEY) as sandbox:
        env = {
            **base_env(airflow_home),
            "AIRFLOW_VAR_ALLO_API_KEY": KEY,
            "ALLO_BASE_URL": sandbox.base_url,
        }
        process = dags_test(env, {"input": str(drop), "output": str(output)})
        log, _ = process.communicate(timeout=120)
        assert process.returncode != 0
        check_landed_once(sandbox, bad.filter(pl.col("call_id") != "msg-000001"))
    assert "allo-batch exit 1: some rows are invalid or failed" in log
    assert "AirflowFailException" in log
    assert "'INVALID_ITEM_ID': 1" in log
    assert '"event": "summary"' in log
    assert "try_number=2" not in log
    assert "state=failed" in log
    assert KEY not in log


@on_airflow
@pytest.mark.parametrize(
    ("hostile", "key", "base_url_from"),
    [
        # The attack this guards against: a value read as `allo-batch run --base-url=...`, which
        # beats the worker's ALLO_BASE_URL (the connection's --base-url used to come after it).
        ({"input": "--base-url={attacker}"}, "input", "worker"),
        ({"input": "--base-url={attacker}"}, "input", "connection"),
        ({"output": "--base-url={attacker}"}, "output", "worker"),
        ({"base_url": "{attacker}"}, "base_url", "connection"),
        # A spec of the trigger's own, naming the attacker as its base URL: used when neither
        # the connection nor the worker gives one.
        ({"job": "{evil_spec}"}, "job", "spec"),
    ],
)
def test_a_hostile_trigger_conf_fails_the_task_for_good_and_sends_nothing(
    airflow_home: Path,
    sandbox_factory: SandboxFactory,
    tmp_path: Path,
    hostile: dict[str, str],
    key: str,
    base_url_from: str,
) -> None:
    """The conf's one hostile value fails the task at once, named by its key, without retries,
    and neither the API nor the attacker's host sees a request. The spec (in a jobs folder of
    the test's own) reads a real drop, so a value that got through would send it."""
    frame = corrections(3)
    drop = nightly_drop(tmp_path / "corrections-3.csv", frame)
    output = tmp_path / "corrections-3.results.parquet"
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    spec = f'input = "{drop}"\noutput = "{output}"\n[columns]\n'
    spec += 'call_id = "conversation_id"\ncontent = "corrected_summary"\n'
    (jobs / "drop.toml").write_text(spec)
    with (
        sandbox_factory(world_for(frame), api_key=KEY) as sandbox,
        sandbox_factory(world_for(frame), api_key=KEY) as attacker,
    ):
        evil_spec = tmp_path / "evil.toml"
        evil_spec.write_text(f'base_url = "{attacker.base_url}"\n{spec}')
        values = {"attacker": attacker.base_url, "evil_spec": str(evil_spec)}
        conf = {"job": "drop.toml"} | {
            name: value.format(**values) for name, value in hostile.items()
        }
        env = {**base_env(airflow_home), "ALLO_BATCH_JOBS": str(jobs)}
        if base_url_from == "connection":
            env["AIRFLOW_CONN_ALLO_API"] = connection(sandbox.base_url, KEY)
        elif base_url_from == "worker":
            env |= {"AIRFLOW_VAR_ALLO_API_KEY": KEY, "ALLO_BASE_URL": sandbox.base_url}
        else:
            env["AIRFLOW_VAR_ALLO_API_KEY"] = KEY
        process = dags_test(env, conf)
        log, _ = process.communicate(timeout=120)
        assert process.returncode != 0
        assert attacker.app.counters["requests"] == 0
        assert sandbox.app.counters["requests"] == 0
    assert f"AirflowFailException: trigger conf key '{key}': " in log, log[-3000:]
    assert "try_number=2" not in log
    assert "state=failed" in log
    assert "allo-batch exit" not in log  # refused before allo-batch was started
    assert attacker.base_url not in log  # at most a short prefix of a refused value
    assert KEY not in log
    assert not output.exists()
