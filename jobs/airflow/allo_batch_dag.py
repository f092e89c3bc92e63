"""Airflow 3 DAG: run an allo-batch job spec (jobs/*.toml) as one task.

Install allo-batch where the workers can run it (its own virtual environment is best) and copy
this file into the DAGs folder. Settings, from the worker's environment:

- ``ALLO_BATCH``: the ``allo-batch`` command [default: ``allo-batch`` on PATH];
- ``ALLO_BATCH_JOBS``: the folder of job specs [default: this file's ``../``, i.e. ``jobs/``];
- ``ALLO_BATCH_RETRY_DELAY``: seconds before the first retry, doubling after [default: 120].

The key comes from the Airflow connection ``allo_api`` (its password; its host, port and schema,
when set, give the base URL, e.g. host ``api.withallo.com``, schema ``https``), else from the
Airflow variable ``allo_api_key``. It reaches allo-batch in the environment variable the spec
names (``api_key_env``, default ``ALLO_API_KEY``), never on a command line, and Airflow masks
both in task logs.

Exit codes become task states:

- 0: success; the summary is the task's return value (XCom);
- 1 (rows invalid or failed) and 2 (bad spec or input): the task fails without retries, with
  the summary in the log; fix the file and clear the task, and only rows not yet landed go out;
- 3 (stopped early: API unavailable, output locked, ...) and 130 (killed): the task fails and
  Airflow retries it; a retry is a rerun with the same output, so it resumes instead of
  resending.

Trigger with a config to run another spec or file: ``{"job": "backfill.toml"}``,
``{"input": "/path/file.csv", "output": "/path/file.results.parquet"}``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, Connection, Param, Variable, get_current_context, task
from airflow.sdk.exceptions import AirflowException, AirflowFailException

ALLO_BATCH = os.environ.get("ALLO_BATCH", "allo-batch")
JOBS = Path(os.environ.get("ALLO_BATCH_JOBS", Path(__file__).resolve().parent.parent))
CONNECTION_ID = "allo_api"
KEY_VARIABLE = "allo_api_key"
RETRY_DELAY = timedelta(seconds=float(os.environ.get("ALLO_BATCH_RETRY_DELAY", "120")))
log = logging.getLogger("airflow.task")

FAILED_FOR_GOOD = {
    1: "some rows are invalid or failed",
    2: "did not start: bad job spec, input or usage (nothing sent)",
}


def credentials() -> tuple[str, str | None]:
    """The API key and, when the connection gives a host, the base URL."""
    try:
        connection = Connection.get(CONNECTION_ID)
    except Exception:  # no such connection: the variable
        connection = None
    if connection is None or not connection.password:
        try:
            return str(Variable.get(KEY_VARIABLE)), None
        except Exception as exc:
            msg = f"no API key: set the connection {CONNECTION_ID} or the variable {KEY_VARIABLE}"
            raise AirflowFailException(msg) from exc
    base_url = None
    if connection.host:
        port = f":{connection.port}" if connection.port else ""
        base_url = f"{connection.schema or 'https'}://{connection.host}{port}"
    return str(connection.password), base_url


def key_variable(spec: Path) -> str:
    """The environment variable the spec reads the key from."""
    try:
        with spec.open("rb") as handle:
            return str(tomllib.load(handle).get("api_key_env", "ALLO_API_KEY"))
    except (OSError, tomllib.TOMLDecodeError):
        return "ALLO_API_KEY"  # allo-batch itself reports what is wrong with the spec


def run_allo_batch(command: list[str], env: dict[str, str]) -> tuple[int, list[dict[str, Any]]]:
    """Run allo-batch, copy its output into the task log, collect its --json summaries.

    SIGTERM (a task killed or timed out) is passed on, so allo-batch stops cleanly with 130.
    """
    summaries = []
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as child:
        previous = signal.signal(signal.SIGTERM, lambda signum, _: child.send_signal(signum))
        try:
            assert child.stdout is not None
            for line in child.stdout:
                log.info("%s", line.rstrip("\n"))
                try:
                    value = json.loads(line)
                except ValueError:
                    continue
                if isinstance(value, dict) and "event" not in value and "exit_code" in value:
                    summaries.append(value)
            code = child.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
    return code, summaries


with DAG(
    dag_id="allo_batch_corrections",
    description="Apply corrected Allo call summaries from a job spec (resumable)",
    schedule="30 2 * * *",
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["allo", "allo-batch"],
    params={
        "job": Param("nightly.toml", type="string", description="Spec in jobs/, or a path"),
        "input": Param(None, type=["null", "string"], description="Overrides the spec's input"),
        "output": Param(None, type=["null", "string"], description="Overrides its output"),
    },
):

    @task(
        retries=3,
        retry_delay=RETRY_DELAY,
        retry_exponential_backoff=True,
        max_active_tis_per_dag=1,
    )
    def run_corrections() -> dict[str, Any]:
        """One allo-batch run; a retry resumes it."""
        context = get_current_context()
        params = context["params"]
        spec = JOBS / params["job"]
        key, base_url = credentials()
        ds = context.get("ds") or pendulum.now("UTC").to_date_string()
        command = [ALLO_BATCH, "run", "--job", str(spec), "--ds", ds]
        command += ["--json", "--log-format", "json", "--no-progress"]
        if params.get("input"):
            command.append(params["input"])
        if params.get("output"):
            command += ["-o", params["output"]]
        if base_url:
            command += ["--base-url", base_url]
        env = {**os.environ, key_variable(spec): key}
        code, summaries = run_allo_batch(command, env)
        if code == 0:
            return {"runs": summaries}
        detail = "; ".join(
            f"{s.get('output')}: {s.get('by_status')} {s.get('by_error_code') or ''}".rstrip()
            for s in summaries
        )
        if code in FAILED_FOR_GOOD:
            msg = f"allo-batch exit {code}: {FAILED_FOR_GOOD[code]}. {detail}".rstrip()
            raise AirflowFailException(msg)
        msg = f"allo-batch exit {code}: stopped early; a retry resumes. {detail}".rstrip()
        raise AirflowException(msg)

    run_corrections()
