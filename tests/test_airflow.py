"""`jobs/airflow/allo_batch_dag.py` run for real by `airflow dags test` against the sandbox.

Apache Airflow is installed in its own virtual environment, `.venv-airflow/` (kept between
runs, so only the first run pays for the download), so the main one stays light. Skip these
tests with `ALLO_BATCH_SKIP_AIRFLOW=1`; CI runs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from tests.conftest import SandboxFactory
from tests.test_jobs import KEY, check_landed_once, corrections, world_for

AIRFLOW_VERSION = "3.3.2"
REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv-airflow"
DAG_ID = "allo_batch_corrections"
DS = "2026-11-23"

pytestmark = [
    pytest.mark.airflow,
    # The first test also installs Airflow (a download of about 300 MB on a fresh machine).
    pytest.mark.timeout(1200),
    pytest.mark.skipif(
        os.environ.get("ALLO_BATCH_SKIP_AIRFLOW") == "1", reason="ALLO_BATCH_SKIP_AIRFLOW=1"
    ),
]


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


def test_the_dag_lands_every_row_once_and_a_retry_resumes_after_a_stop(
    airflow_home: Path, sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """Attempt 1 is stopped by a refused key (exit 3) after some rows landed; Airflow retries the
    task, and attempt 2 sends only the rest. The key comes from the Airflow connection."""
    frame = corrections(12)
    drop = nightly_drop(tmp_path / "corrections-1.csv", frame)
    output = tmp_path / "corrections-1.results.parquet"
    with sandbox_factory(world_for(frame, write_rate=20), api_key=KEY) as sandbox:
        env = {**base_env(airflow_home), "AIRFLOW_CONN_ALLO_API": connection(sandbox.base_url, KEY)}
        counters = sandbox.app.counters
        process = dags_test(env, {"input": str(drop), "output": str(output)})
        wait_for(lambda: counters["writes_applied"] >= 4, process, "4 rows land")
        sandbox.app.world.revoked.add(KEY)
        wait_for(lambda: counters["status_401"] >= 1, process, "the key refused")
        time.sleep(0.5)
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
    assert statuses.count("skipped") >= 4
    assert results["version"].to_list() == [2] * 12
    assert KEY not in log


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
