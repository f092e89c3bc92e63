"""`jobs/cron/allo-batch-cron`: two copies started at once against the sandbox (issue 6)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import SandboxFactory
from tests.test_jobs import KEY, check_landed_once, corrections, world_for

WRAPPER = Path(__file__).resolve().parent.parent / "jobs" / "cron" / "allo-batch-cron"
KEY_VARIABLE = "ALLO_CRON_TEST_KEY"

pytestmark = pytest.mark.skipif(shutil.which("flock") is None, reason="needs flock(1)")


def cron_env(tmp_path: Path, key: str) -> dict[str, str]:
    alert = tmp_path / "alert.sh"
    alert.write_text(f'#!/bin/sh\necho "$1|$2|$3|$4" >> {tmp_path / "alerts.txt"}\n')
    alert.chmod(0o755)
    return {
        **os.environ,
        KEY_VARIABLE: key,
        "ALLO_API_KEY": "",
        "ALLO_BATCH": str(Path(sys.executable).parent / "allo-batch"),
        "ALLO_BATCH_LOG_DIR": str(tmp_path / "logs"),
        "ALLO_BATCH_LOCK_DIR": str(tmp_path / "locks"),
        "ALLO_BATCH_ALERT": str(alert),
    }


def write_job(folder: Path, name: str, output: str, base_url: str, extra: str = "") -> Path:
    """A spec reading ``drop.csv`` beside it, with the key in ``KEY_VARIABLE``."""
    spec = folder / f"{name}.toml"
    spec.write_text(
        f'input = "drop.csv"\noutput = "{output}"\nbase_url = "{base_url}"\n'
        f'api_key_env = "{KEY_VARIABLE}"\n{extra}'
    )
    return spec


def alerts(tmp_path: Path) -> list[list[str]]:
    path = tmp_path / "alerts.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    return [line.split("|") for line in lines]


def test_two_at_once_one_runs_one_skips_then_a_rerun_sends_nothing(
    sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    frame = corrections(20)
    frame.write_csv(tmp_path / "drop.csv")
    with sandbox_factory(world_for(frame, write_rate=10), api_key=KEY) as sandbox:
        spec = write_job(
            tmp_path, "nightly", "results/{ds}.csv", sandbox.base_url, 'log_format = "json"\n'
        )
        env = cron_env(tmp_path, KEY)
        args = [str(WRAPPER), str(spec), "--ds", "2026-11-23"]
        both = [subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True) for _ in "ab"]
        errors = [p.communicate(timeout=60)[1] for p in both]
        assert sorted(p.returncode for p in both) == [0, 75]
        assert errors == ["", ""]  # the alert went to ALLO_BATCH_ALERT, the rest to the log
        check_landed_once(sandbox, frame)
        assert [a[:2] for a in alerts(tmp_path)] == [["75", "nightly"]]
        assert "still going" in alerts(tmp_path)[0][3]
        logs = sorted((tmp_path / "logs" / "nightly").glob("*.log"))
        texts = [log.read_text() for log in logs]
        assert len(logs) == 2
        (ran,) = [t for t in texts if "start:" in t]
        assert "skipped: the previous run of nightly is still going" in "".join(texts)
        assert ran.rstrip().endswith("exit 0")
        body = [line for line in ran.splitlines() if line.startswith("{")]
        kinds = [json.loads(line).get("event", "summary-json") for line in body]
        assert kinds[0] == "start"
        assert "summary" in kinds
        assert KEY not in "".join(texts)
        # The next tick of the same day resumes: nothing left to send, silent on success.
        again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0
        assert again.stderr == ""
        assert len(alerts(tmp_path)) == 1
        check_landed_once(sandbox, frame)
        assert sandbox.state()["counters"]["writes_applied"] == 20
    results = pl.read_csv(tmp_path / "results" / "2026-11-23.csv")
    assert results["status"].to_list() == ["skipped"] * 20


def test_exit_codes_become_alerts(sandbox_factory: SandboxFactory, tmp_path: Path) -> None:
    frame = corrections(3)
    bad = frame.with_columns(pl.Series("call_id", ["cll-000000", "msg-1", "cll-000002"]))
    bad.write_csv(tmp_path / "drop.csv")
    with sandbox_factory(world_for(frame, write_rate=20), api_key=KEY) as sandbox:
        spec = write_job(tmp_path, "job", "out.csv", sandbox.base_url)
        env = cron_env(tmp_path, KEY)
        partial = subprocess.run([str(WRAPPER), str(spec)], env=env, timeout=60)
        assert partial.returncode == 1
        revoked = cron_env(tmp_path, "ak_not_a_key")
        spec.write_text(spec.read_text().replace('"out.csv"', '"out2.csv"'))
        stopped = subprocess.run([str(WRAPPER), str(spec)], env=revoked, timeout=60)
        assert stopped.returncode == 3
    spec.write_text(spec.read_text().replace('"drop.csv"', '"missing.csv"'))
    unusable = subprocess.run([str(WRAPPER), str(spec)], env=env, timeout=60)
    assert unusable.returncode == 2
    codes = [(a[0], a[1]) for a in alerts(tmp_path)]
    assert codes == [("1", "job"), ("3", "job"), ("2", "job")]
    for code, _job, log, message in alerts(tmp_path):
        assert Path(log).is_file()
        assert Path(log).read_text().rstrip().endswith(f"exit {code}")
        assert message
