"""`jobs/cron/allo-batch-cron`: two copies started at once against the sandbox (issue 6), and
what each exit code's alert tells the person who reads it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from tests.helpers import KEY, SandboxFactory, check_landed_once, corrections, world_for

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
        assert "nothing to do unless this repeats" in alerts(tmp_path)[0][3]
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
    # Each says what to do, read from what allo-batch itself said.
    partial_alert, stopped_alert, unusable_alert = (a[3] for a in alerts(tmp_path))
    assert f"fix the rows listed by `allo-batch report {tmp_path / 'out.csv'} --failed`" in (
        partial_alert
    )
    assert "then rerun" in partial_alert
    assert "the API refused the key" in stopped_alert
    assert "a person must fix the key" in stopped_alert
    assert "until then every run stops the same way" in stopped_alert
    assert "nothing was sent" in unusable_alert
    assert "missing.csv" in unusable_alert
    assert "fix it and rerun" in unusable_alert


def fake_allo_batch(
    tmp_path: Path, code: int, stdout: str = "", stderr: str = ""
) -> dict[str, str]:
    """The wrapper's environment with an `allo-batch` that says ``stdout`` and ``stderr`` and
    exits ``code``: exits the sandbox cannot cause on demand (a bug, a signal, an outage)."""
    (tmp_path / "stdout.txt").write_text(stdout)
    (tmp_path / "stderr.txt").write_text(stderr)
    fake = tmp_path / "allo-batch"
    fake.write_text(
        f"#!/bin/sh\ncat {tmp_path / 'stdout.txt'}\ncat {tmp_path / 'stderr.txt'} >&2\n"
        f"exit {code}\n"
    )
    fake.chmod(0o755)
    return {**cron_env(tmp_path, KEY), "ALLO_BATCH": str(fake)}


def stop_event(reason: str) -> str:
    """A `stop` line as `--log-format json` writes it."""
    event = {"ts": "2026-11-24T02:31:00.000Z", "event": "stop", "job": "job", "exit_code": 3}
    return json.dumps({**event, "reason": reason}) + "\n"


KEY_ADVICE = "a person must fix the key"
RESUMES = "the next run resumes"


@pytest.mark.parametrize(
    ("code", "stdout", "stderr", "wanted", "unwanted"),
    [
        pytest.param(
            1,
            json.dumps({"exit_code": 1, "output": "/srv/results/a.parquet", "rows": 3}) + "\n",
            "",
            ["fix the rows listed by `allo-batch report /srv/results/a.parquet --failed`", "rerun"],
            [],
            id="1-one-result-file",
        ),
        pytest.param(
            1,
            json.dumps({"exit_code": 1, "output": "/r/a.parquet"})
            + "\n"
            + json.dumps({"exit_code": 0, "output": "/r/b.parquet"})
            + "\n"
            + json.dumps({"exit_code": 1, "output": "/r/c.parquet"})
            + "\n",
            "",
            ["`allo-batch report RESULTS --failed` for each RESULTS of /r/a.parquet, /r/c.parquet"],
            ["b.parquet"],
            id="1-two-of-three-files",
        ),
        pytest.param(
            1,
            "",
            "",
            ["fix the rows listed by `allo-batch report RESULTS --failed`", "then rerun"],
            [],
            id="1-no-summary",
        ),
        pytest.param(
            2,
            "",
            "allo-batch: job.toml: unknown key 'inptu'\n",
            ["nothing was sent", "unknown key 'inptu'", "fix it and rerun"],
            [RESUMES],
            id="2",
        ),
        pytest.param(
            2,
            "",
            "Usage: allo-batch run [OPTIONS] [INPUT]\nTry 'allo-batch run --help' for help.\n\n"
            "Error: Invalid value for '--ds': '25/11/2026' is not a date\n",
            ["nothing was sent", "Invalid value for '--ds'", "fix it and rerun"],
            ["Error: "],
            id="2-usage",
        ),
        pytest.param(
            3,
            "",
            stop_event("the API refused the key: UNAUTHORIZED (HTTP 401)"),
            ["the API refused the key: UNAUTHORIZED", KEY_ADVICE],
            ["--max-errors"],
            id="3-key-json",
        ),
        pytest.param(
            3,
            "",
            "allo-batch: the key lacks the summaries:write scope (it has: summaries:read)\n",
            ["lacks the summaries:write scope", KEY_ADVICE],
            [],
            id="3-scope-text",
        ),
        pytest.param(
            3,
            json.dumps({"exit_code": 3, "output": "/srv/results/a.parquet"}) + "\n",
            stop_event("200 rows failed (--max-errors 200)")
            + '{"event": "skip", "exit_code": 3, "reason": "not started after the stop"}\n',
            [
                "200 rows failed (--max-errors 200)",
                RESUMES,
                "`allo-batch report /srv/results/a.parquet --failed`",
            ],
            [KEY_ADVICE],
            id="3-max-errors",
        ),
        pytest.param(
            3,
            "",
            "allo-batch: WARNING: retrying\n"
            "allo-batch: the API has been unreachable for 600 s (--max-outage 600); last: 503\n"
            "allo-batch: not started after the stop above: /srv/drops/b.csv\n",
            ["unreachable for 600 s", "the API was unavailable: " + RESUMES],
            [KEY_ADVICE, "WARNING", "b.csv"],
            id="3-api-unavailable",
        ),
        pytest.param(
            3,
            "",
            "allo-batch: another allo-batch run (pid 7 on vm) is writing /r/a.parquet; wait\n",
            ["another run holds the output: " + RESUMES],
            [KEY_ADVICE],
            id="3-output-locked",
        ),
        pytest.param(
            3,
            "",
            stop_event("the --finish-by deadline 2026-11-24T06:00 passed; stopped"),
            ["--finish-by deadline", "the next window's run resumes"],
            [KEY_ADVICE],
            id="3-deadline",
        ),
        pytest.param(
            3,
            "",
            "allo-batch: No space left on device; the machine refused it (not a bug, not your "
            "data). What landed is kept; a rerun resumes once it is fixed\n",
            ["No space left on device", "a person must fix that, then " + RESUMES],
            [KEY_ADVICE],
            id="3-machine-refused",
        ),
        pytest.param(
            3,
            "",
            "Killed\n",
            [KEY_ADVICE, "--max-errors", RESUMES],
            [],
            id="3-reason-unknown",
        ),
        pytest.param(
            4,
            "",
            "allo-batch: internal error: KeyError: 'x' (traceback saved in /tmp/tb.txt)\n",
            ["report a bug with the saved traceback", "/tmp/tb.txt", RESUMES],
            [KEY_ADVICE],
            id="4",
        ),
        pytest.param(
            70,
            "",
            stop_event("internal error: KeyError: 'x' (traceback saved in /tmp/tb.txt)"),
            ["report a bug with the saved traceback", "/tmp/tb.txt", RESUMES],
            [KEY_ADVICE],
            id="70",
        ),
        pytest.param(
            130, "", stop_event("interrupted by SIGTERM"), ["interrupted", RESUMES], [], id="130"
        ),
    ],
)
def test_each_exit_code_alert_says_what_to_do(
    tmp_path: Path, code: int, stdout: str, stderr: str, wanted: list[str], unwanted: list[str]
) -> None:
    env = fake_allo_batch(tmp_path, code, stdout, stderr)
    spec = write_job(tmp_path, "job", "out.csv", "http://127.0.0.1:9")
    done = subprocess.run([str(WRAPPER), str(spec)], env=env, capture_output=True, timeout=60)
    assert done.returncode == code
    ((alerted, job, log, message),) = alerts(tmp_path)
    assert (alerted, job) == (str(code), "job")
    assert Path(log).read_text().rstrip().endswith(f"exit {code}")
    for text in wanted:
        assert text in message
    for text in unwanted:
        assert text not in message


def test_an_alert_is_one_short_line_whatever_allo_batch_said(tmp_path: Path) -> None:
    """The reason is passed on, but as one line without control characters and cut short: it is
    an argument of the alert command and a line of cron's mail."""
    reason = "the API refused the key\tthen \x1b[31mred\x1b[0m " + "x" * 2000
    env = {**fake_allo_batch(tmp_path, 3, "", f"allo-batch: {reason}\n")}
    env.pop("ALLO_BATCH_ALERT")  # the message goes to stderr, for MAILTO
    spec = write_job(tmp_path, "job", "out.csv", "http://127.0.0.1:9")
    done = subprocess.run([str(WRAPPER), str(spec)], env=env, capture_output=True, timeout=60)
    assert done.returncode == 3
    mail = done.stderr.decode()
    assert mail.count("\n") == 1
    assert "\x1b" not in mail and "\t" not in mail
    assert "the API refused the keythen [31mred[0m x" in mail
    assert KEY_ADVICE in mail
    assert len(mail) < 1000
