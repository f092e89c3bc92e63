"""Airflow 3 DAG: run an allo-batch job spec (jobs/*.toml) as one task.

Install allo-batch where the workers can run it (its own virtual environment is best) and copy
this file and ``allo_batch_command.py`` (the command line and its checks, imported from here)
into the DAGs folder. Settings, from the worker's environment:

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
- 3 (stopped early: API unavailable, output locked, ...), 130 (killed) and 70 (an internal
  error; report it with the saved traceback): the task fails and Airflow retries it; a retry is
  a rerun with the same output, so it resumes instead of resending.

Trigger with a config to run another spec or file: ``{"job": "backfill.toml"}``,
``{"input": "/path/file.csv", "output": "/path/file.results.parquet"}``. A trigger may set only
these three: ``job`` is a spec's file name in the jobs folder, ``input`` and ``output`` are
absolute paths or s3://, gs:// or az:// URIs. The base URL is never taken from a trigger (see
``allo_batch_command.py``). Anything else fails the task at once, without retries, before the
key is read. A spec that names ``api_key_file`` (``backfill.toml`` does) reads the key from
that file on the worker, not from the connection.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, Connection, Param, Variable, get_current_context, task
from airflow.sdk.exceptions import AirflowException, AirflowFailException

# allo_batch_command.py sits beside this file. Airflow 3 puts the DAGs folder on sys.path when
# it parses DAGs and runs tasks; a plain DagBag (as in a DAG import test) does not.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))
from allo_batch_command import (
    ConfError,
    base_url,
    checked_request,
    command,
    key_variable,
)

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
# Retried like a stop (a retry resumes), but said apart: a bug needs a report, not patience.
INTERNAL = {4, 70}


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
        # Checked by the task (allo_batch_command.py), which names the key it refuses.
        "job": Param("nightly.toml", type="string", description="A spec's file name in jobs/"),
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
        dag_run = context.get("dag_run")
        conf = (dag_run.conf if dag_run is not None else None) or {}
        # Checked before the key is read: a refused trigger fails for good and touches nothing.
        try:
            request = checked_request(conf, context["params"], JOBS)
            key_env = key_variable(request.spec)
        except ConfError as exc:
            # from None: the message says it all; a chained traceback would only repeat it.
            raise AirflowFailException(str(exc)) from None
        key, connection_url = credentials()
        ds = context.get("ds") or pendulum.now("UTC").to_date_string()
        args = command(ALLO_BATCH, request, ds=ds, base_url=base_url(connection_url, os.environ))
        env = {**os.environ, key_env: key}
        code, summaries = run_allo_batch(args, env)
        if code == 0:
            return {"runs": summaries}
        detail = "; ".join(
            f"{s.get('output')}: {s.get('by_status')} {s.get('by_error_code') or ''}".rstrip()
            for s in summaries
        )
        if code in FAILED_FOR_GOOD:
            msg = f"allo-batch exit {code}: {FAILED_FOR_GOOD[code]}. {detail}".rstrip()
            raise AirflowFailException(msg)
        if code in INTERNAL:
            what = "internal error, report a bug with the saved traceback (see the log)"
        else:
            what = "stopped early"
        msg = f"allo-batch exit {code}: {what}; a retry resumes. {detail}".rstrip()
        raise AirflowException(msg)

    run_corrections()
