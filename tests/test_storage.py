"""Object storage (issue 15): inputs read from and results written to a real S3 API.

moto's S3 server runs on 127.0.0.1 (in this process, or as a child process where it must
refuse credentials); the command line finds it through ``AWS_ENDPOINT_URL`` and the standard
credential variables alone, as it would a MinIO or Ceph store, and runs against the sandbox.
Every test uses a bucket of its own, and an owner-only state folder under ``tmp_path``.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from click.testing import CliRunner, Result

from allo_batch import storage
from allo_batch.cli import cli
from allo_batch.errors import LockedError
from allo_batch.record import read_results
from allo_batch.sandbox import ApiKey, RunningSandbox, build_world
from allo_batch.storage import ObjectUri, RemoteLock, StorageOptions, Store

fsspec = pytest.importorskip("fsspec")
moto_server = pytest.importorskip("moto.server")

SandboxFactory = Callable[..., AbstractContextManager[RunningSandbox]]
KEY = "ak_storage_key_51c3e0"
ACCESS_KEY = "AKIAALLOBATCHTEST001"
SECRET = "moto-secret-Zq8v1Lw3XrT5"  # searched for in every output
TEMPLATES = ("MARKDOWN_CLASSIC", "MARKDOWN_SHORT_CALL")
RUN_TIMEOUT = 90.0


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@dataclass
class Bucket:
    name: str
    env: dict[str, str]  # what a child process needs to find the store
    fs: Any

    def uri(self, key: str) -> str:
        return f"s3://{self.name}/{key}"

    def put(self, local: Path, key: str) -> str:
        self.fs.put_file(str(local), f"{self.name}/{key}")
        return self.uri(key)

    def read(self, key: str) -> bytes:
        return bytes(self.fs.cat_file(f"{self.name}/{key}"))

    def exists(self, key: str) -> bool:
        self.fs.invalidate_cache()
        return bool(self.fs.exists(f"{self.name}/{key}"))

    def listing(self) -> list[str]:
        found = self.fs.find(self.name, refresh=True)
        return sorted(str(k).removeprefix(f"{self.name}/") for k in found)

    def results(self, key: str, tmp: Path) -> pl.DataFrame:
        local = tmp / f"fetched-{uuid.uuid4().hex[:6]}{Path(key).suffix}"
        local.write_bytes(self.read(key))
        return read_results(local)


def store_env(endpoint: str, tmp_path: Path, *, secret: str = SECRET) -> dict[str, str]:
    """The standard chain and nothing else: no profile or config file of the machine."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "XDG_STATE_HOME": str(tmp_path / "xdg-state"),
    }


@pytest.fixture
def bucket(s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Bucket:
    env = store_env(s3_endpoint, tmp_path)
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    name = f"bkt-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    return Bucket(name, env, fs)


def corrections(rows: int, *, edit: int = 0, templates: bool = True) -> pl.DataFrame:
    """``rows`` corrections; without templates, the look stage's reads are certain (a row that
    already landed comes out ``unchanged``)."""
    frame = pl.DataFrame(
        {
            "call_id": [f"cll-{i:06d}" for i in range(rows)],
            "template_key": [TEMPLATES[i % 2] for i in range(rows)],
            "content": [
                f"## Summary {i}\nedit {edit}: {'fixed ' * (i % 5 + 1)}" for i in range(rows)
            ],
        }
    )
    return frame if templates else frame.drop("template_key")


def write_local(frame: pl.DataFrame, path: Path) -> Path:
    if path.suffix == ".parquet":
        frame.write_parquet(path)
    elif path.suffix == ".csv":
        frame.write_csv(path)
    else:
        frame.write_ndjson(path)
    return path


def world_for(frame: pl.DataFrame, write_rate: int = 200) -> Any:
    if "template_key" not in frame.columns:
        frame = frame.with_columns(template_key=pl.lit(None, pl.String))
    world = build_world(seed_pairs=list(frame.select("call_id", "template_key").iter_rows()))
    world.add_key(ApiKey(key=KEY, write_per_second=write_rate, read_per_second=200))
    return world


def run_here(args: list[str]) -> Result:
    """``allo-batch ARGS`` in this process (the store's variables are already set); a dry
    run without a key, so that it reads from no API."""
    key = None if "--dry-run" in args else KEY
    return CliRunner().invoke(
        cli, ["run", *args, "--no-progress", "--json"], env={"ALLO_API_KEY": key}
    )


def summary_of(result: Result) -> dict[str, Any]:
    return json.loads(result.stdout) if result.stdout.strip() else {}


def start_run(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    environment = {**os.environ, **env, "ALLO_API_KEY": KEY}
    if "--dry-run" in args:
        del environment["ALLO_API_KEY"]
    return subprocess.Popen(
        [sys.executable, "-m", "allo_batch", "run", *args, "--no-progress", "--json"],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, dict[str, Any], str]:
    out, err = process.communicate(timeout=RUN_TIMEOUT)
    return process.returncode, (json.loads(out) if out.strip() else {}), err


def no_secret_in(*texts: str | bytes) -> None:
    for text in texts:
        data = text.encode() if isinstance(text, str) else text
        assert SECRET.encode() not in data
        assert KEY.encode() not in data


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


# -- a whole run in and out of the bucket ----------------------------------------------------


@pytest.mark.parametrize(
    ("source", "result"),
    [("in.parquet", "out.parquet"), ("in.csv", "out.csv"), ("in.ndjson", "out.ndjson")],
)
def test_input_and_results_in_a_bucket_then_a_rerun_elsewhere_sends_nothing(
    bucket: Bucket, sandbox_factory: SandboxFactory, tmp_path: Path, source: str, result: str
) -> None:
    frame = corrections(40)
    uri = bucket.put(write_local(frame, tmp_path / source), f"fixes/2026-11-24/{source}")
    output = bucket.uri(f"results/{result}")
    state = tmp_path / "state-a"
    with sandbox_factory(world_for(frame), api_key=KEY) as sb:
        args = [uri, "-o", output, "--base-url", sb.base_url, "--state-dir", str(state)]
        first = run_here(args)
        assert first.exit_code == 0, first.output
        assert summary_of(first)["by_status"] == {"updated": 40}
        assert summary_of(first)["output"] == output
        # The result file, its sidecar and the before-images are in the bucket; no lock left.
        rows = bucket.results(f"results/{result}", tmp_path)
        assert rows["row"].to_list() == list(range(40))
        assert set(rows["status"]) == {"updated"}
        sidecar = json.loads(bucket.read(f"results/{result}.run.json"))
        assert sidecar["input"]["path"] == uri
        assert sidecar["summary"]["by_status"] == {"updated": 40}
        befores = [k for k in bucket.listing() if k.startswith(f"results/{result}.before/")]
        assert len(befores) == 1 and befores[0].endswith(".parquet")
        assert ".chunk." not in befores[0]
        assert not bucket.exists(f"results/{result}.lock")
        # The state folder: owner-only, no journal left, no spooled input left.
        folders = list((state / "outputs").iterdir())
        assert len(folders) == 1
        assert all(oct(p.stat().st_mode & 0o777) == "0o700" for p in (state, folders[0]))
        assert not list(folders[0].glob("*.journal"))
        assert not (folders[0] / "spool").exists()
        assert not list((folders[0] / f"{result}.before").iterdir())  # content: in the bucket
        assert (folders[0] / "output.txt").read_text().strip() == output
        # Another machine (an empty state folder) resumes from the bucket: nothing to send.
        again = run_here([*args[:-1], str(tmp_path / "state-b")])
        assert again.exit_code == 0, again.output
        assert summary_of(again)["requests"] == 0
        assert summary_of(again)["by_status"] == {"skipped": 40}
        assert sb.app.counters["writes_applied"] == 40
        # Another input into it is refused, naming the output as given, not its local copy.
        other = bucket.put(write_local(frame[:5], tmp_path / source), f"other/{source}")
        refused = run_here([other, *args[1:]])
        assert refused.exit_code == 2
        assert f"{output} holds results of another input" in refused.output
    no_secret_in(first.output, again.output, *(p.read_bytes() for p in files_under(tmp_path)))
    for key in bucket.listing():
        no_secret_in(bucket.read(key))


def test_a_local_result_file_from_an_input_in_a_bucket(
    bucket: Bucket, sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    frame = corrections(12)
    uri = bucket.put(write_local(frame, tmp_path / "in.csv"), "in.csv")
    output = tmp_path / "local" / "out.csv"
    with sandbox_factory(world_for(frame), api_key=KEY) as sb:
        done = run_here([uri, "-o", str(output), "--base-url", sb.base_url])
    assert done.exit_code == 0, done.output
    assert pl.read_csv(output)["status"].to_list() == ["updated"] * 12
    assert json.loads(output.with_name("out.csv.run.json").read_text())["input"]["path"] == uri
    # The copy of the input lived in the default state folder, and is gone.
    spool = tmp_path / "xdg-state" / "allo-batch" / "spool"
    assert spool.is_dir() and not list(spool.iterdir())


def test_an_input_in_a_bucket_needs_o_and_a_missing_object_is_named(
    bucket: Bucket, tmp_path: Path
) -> None:
    uri = bucket.uri("fixes/none.parquet")
    no_output = run_here([uri, "--dry-run"])
    assert no_output.exit_code == 2
    assert f"{uri} is in a store: name the result file with -o" in no_output.output
    missing = run_here([uri, "-o", str(tmp_path / "out.csv"), "--dry-run"])
    assert missing.exit_code == 2
    assert missing.output.strip().splitlines()[-1] == f"allo-batch: {uri}: no such object"
    assert "Traceback" not in missing.output
    gone = "s3://no-such-bucket-4f1a/fixes/in.csv"
    no_bucket = run_here([gone, "-o", str(tmp_path / "out.csv"), "--dry-run"])
    assert no_bucket.exit_code == 2
    assert f"allo-batch: {gone}: no such bucket" in no_bucket.output
    read_only = run_here([uri, "-o", "https://example.com/out.csv", "--dry-run"])
    assert read_only.exit_code == 2
    assert "https:// can only be read" in read_only.output


def test_validate_reads_an_input_in_a_bucket(bucket: Bucket, tmp_path: Path) -> None:
    frame = corrections(9).with_columns(
        pl.when(pl.int_range(pl.len()) == 4)
        .then(pl.lit("msg-1"))
        .otherwise("call_id")
        .alias("call_id")
    )
    uri = bucket.put(write_local(frame, tmp_path / "in.ndjson"), "v/in.ndjson")
    checked = CliRunner().invoke(cli, ["validate", uri])
    assert checked.exit_code == 1, checked.output
    assert checked.output.startswith(f"{uri}: 9 rows, 8 valid, 1 invalid")


# -- credentials -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def refusing_endpoint() -> Iterator[str]:
    """An S3 server that checks every request's signature: no key is known to it."""
    code = (
        "import sys, time\n"
        "from moto.server import ThreadedMotoServer\n"
        "s = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)\n"
        "s.start()\n"
        "print(s.get_host_and_port()[1], flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    process = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    port = int(process.stdout.readline())
    yield f"http://127.0.0.1:{port}"
    process.kill()
    process.communicate(timeout=10)


@pytest.mark.parametrize("where", ["input", "output"])
def test_refused_credentials_end_in_one_line_without_the_secret(
    refusing_endpoint: str, tmp_path: Path, where: str
) -> None:
    source = write_local(corrections(3), tmp_path / "in.csv")
    args = (
        ["s3://bkt/in.csv", "-o", str(tmp_path / "out.csv")]
        if where == "input"
        else [str(source), "-o", "s3://bkt/out.csv"]
    )
    env = store_env(refusing_endpoint, tmp_path)
    code, summary, err = finish(start_run([*args, "--dry-run"], env))
    assert code == 2, err
    assert summary == {}
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert lines[-1].startswith("allo-batch: s3://bkt/")
    assert "the store refused to let allo-batch" in lines[-1]
    assert "check the credentials" in lines[-1]
    no_secret_in(err)


def test_no_credentials_at_all_is_said_plainly(s3_endpoint: str, tmp_path: Path) -> None:
    env = store_env(s3_endpoint, tmp_path)
    source = write_local(corrections(3), tmp_path / "in.csv")
    env = {k: v for k, v in env.items() if not k.startswith("AWS_ACCESS")}
    process = subprocess.run(
        [sys.executable, "-m", "allo_batch", "run", str(source), "-o", "s3://bkt/out.csv"],
        env={
            k: v
            for k, v in {**os.environ, **env}.items()
            if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
        }
        | {"ALLO_API_KEY": KEY},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert process.returncode == 2, process.stderr
    assert "no credentials for the store" in process.stderr
    assert "Traceback" not in process.stderr


def test_storage_options_pass_through_and_never_take_a_credential(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    frame = corrections(5)
    uri = bucket.put(write_local(frame, tmp_path / "in.csv"), "in.csv")
    # The endpoint from an option instead of the environment.
    endpoint = bucket.env["AWS_ENDPOINT_URL"]
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    output = str(tmp_path / "out.csv")
    given = run_here(
        [uri, "-o", output, "--dry-run", "--storage-option", f"endpoint_url={endpoint}"]
    )
    assert given.exit_code == 0, given.output
    assert pl.read_csv(output).height == 5
    secret = f"secret={SECRET}"
    refused = run_here([uri, "-o", output, "--dry-run", "--storage-option", secret])
    assert refused.exit_code == 2
    assert "credentials never go on a command line or in a job file" in refused.output
    no_secret_in(refused.output)
    assert StorageOptions.parse(["client_kwargs.region_name=eu-west-1", "anon=false"]).kwargs() == {
        "client_kwargs": {"region_name": "eu-west-1"},
        "anon": False,
    }
    assert SECRET not in repr(StorageOptions.parse([f"endpoint_url={SECRET}"]))


def test_a_job_spec_names_objects_and_storage_options(
    bucket: Bucket, sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    frame = corrections(6)
    bucket.put(write_local(frame, tmp_path / "in.parquet"), "drop/2026-11-24.parquet")
    spec = tmp_path / "nightly.toml"
    spec.write_text(
        f'input = "s3://{bucket.name}/drop/{{ds}}.parquet"\n'
        f'output = "s3://{bucket.name}/results/{{ds}}.{{stem}}.csv"\n'
        f'state_dir = "{tmp_path / "spec-state"}"\n'
        "checkpoint_interval = 5\n"
        "[storage_options]\n"
        'client_kwargs.region_name = "us-east-1"\n'
    )
    with sandbox_factory(world_for(frame), api_key=KEY) as sb:
        done = run_here(["--job", str(spec), "--ds", "2026-11-24", "--base-url", sb.base_url])
    assert done.exit_code == 0, done.output
    assert bucket.exists("results/2026-11-24.2026-11-24.csv")
    assert (tmp_path / "spec-state" / "outputs").is_dir()
    spec.write_text(spec.read_text() + 'secret_access_key = "x"\n')
    refused = run_here(["--job", str(spec), "--ds", "2026-11-24"])
    assert refused.exit_code == 2
    assert "credentials never go on a command line" in refused.output


def test_a_job_spec_globs_objects_and_skips_a_night_without_any(
    bucket: Bucket, sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """A job's input in a bucket is a glob as a local one is: each matching object its own
    run, in name order. A night with no object is skipped with ``if_no_input = "skip"`` (exit
    0), as for a local drop; both used to fail with "no such object" (exit 2)."""
    frame = corrections(6)
    for part, rows in (("b", frame[3:]), ("a", frame[:3])):
        local = write_local(rows, tmp_path / f"part-{part}.csv")
        bucket.put(local, f"drop/2026-11-24/part-{part}.csv")
    bucket.put(write_local(frame[:1], tmp_path / "other.csv"), "drop/2026-11-24/other.csv")
    spec = tmp_path / "nightly.toml"
    spec.write_text(
        f'input = "s3://{bucket.name}/drop/{{ds}}/part-*.csv"\n'
        f'output = "s3://{bucket.name}/results/{{ds}}/{{stem}}.results.csv"\n'
        f'state_dir = "{tmp_path / "spec-state"}"\n'
        'if_no_input = "skip"\n'
    )
    with sandbox_factory(world_for(frame), api_key=KEY) as sb:
        done = run_here(["--job", str(spec), "--ds", "2026-11-24", "--base-url", sb.base_url])
        quiet = run_here(["--job", str(spec), "--ds", "2026-11-25", "--base-url", sb.base_url])
        applied = sb.app.counters["writes_applied"]
    assert done.exit_code == 0, done.output
    assert applied == 6
    for part in ("a", "b"):
        results = bucket.results(f"results/2026-11-24/part-{part}.results.csv", tmp_path)
        assert results["status"].to_list() == ["updated"] * 3
    assert not bucket.exists("results/2026-11-24/other.results.csv")
    assert quiet.exit_code == 0, quiet.output
    assert "nothing to do" in quiet.output


def test_an_https_input_is_read_and_its_query_never_shown(tmp_path: Path) -> None:
    served = tmp_path / "www"
    served.mkdir()
    write_local(corrections(7), served / "in.csv")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    handler = Quiet
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]
        uri = f"http://127.0.0.1:{port}/in.csv?X-Amz-Signature=sig{SECRET}"
        output = tmp_path / "out.csv"
        done = run_here([uri, "-o", str(output), "--dry-run"])
        missing = run_here([uri.replace("in.csv", "gone.csv"), "-o", str(output), "--dry-run"])
        server.shutdown()
    assert done.exit_code == 0, done.output
    assert pl.read_csv(output).height == 7
    sidecar = json.loads(output.with_name("out.csv.run.json").read_text())
    assert sidecar["input"]["path"] == f"http://127.0.0.1:{port}/in.csv?…"
    assert missing.exit_code == 2
    assert f"http://127.0.0.1:{port}/gone.csv?…: no such object" in missing.output
    no_secret_in(done.output, missing.output, output.with_name("out.csv.run.json").read_bytes())


# -- the lock --------------------------------------------------------------------------------


def test_a_second_run_on_a_bucket_output_is_refused_while_the_first_runs(
    bucket: Bucket, sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    frame = corrections(60)
    uri = bucket.put(write_local(frame, tmp_path / "in.csv"), "in.csv")
    output = bucket.uri("out.csv")
    with sandbox_factory(world_for(frame, write_rate=15), api_key=KEY) as sb:
        args = [uri, "-o", output, "--base-url", sb.base_url]
        first = start_run([*args, "--state-dir", str(tmp_path / "a")], bucket.env)
        deadline = time.monotonic() + 30
        while not bucket.exists("out.csv.lock") and first.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        holder = json.loads(bucket.read("out.csv.lock"))
        assert holder["pid"] == first.pid
        second = run_here([*args, "--state-dir", str(tmp_path / "b")])
        assert first.poll() is None  # still running: the refusal was not a leftover
        code, summary, err = finish(first)
    assert second.exit_code == 3, second.output
    assert f"another allo-batch run (pid {first.pid} on {socket.gethostname()}" in second.output
    assert output in second.output
    assert code == 0, err
    assert summary["by_status"] == {"updated": 60}
    assert not bucket.exists("out.csv.lock")


def test_a_lock_left_by_a_dead_run_or_a_silent_host_is_taken_over(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = bucket.put(write_local(corrections(4), tmp_path / "in.csv"), "in.csv")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(dead.stdout)
    lock = tmp_path / "lock.json"
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "x"}))
    bucket.put(lock, "out.csv.lock")
    taken = run_here([uri, "-o", bucket.uri("out.csv"), "--dry-run"])
    assert taken.exit_code == 0, taken.output
    assert f"took over the lock of {bucket.uri('out.csv')} left by pid {pid}" in taken.output
    assert not bucket.exists("out.csv.lock")
    # Another host's lock is honoured while it is renewed, taken over once it goes silent.
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "x"}))
    bucket.put(lock, "out.csv.lock")
    held = run_here([uri, "-o", bucket.uri("out.csv"), "--dry-run"])
    assert held.exit_code == 3
    assert "another allo-batch run (pid 1 on elsewhere" in held.output
    monkeypatch.setattr(storage, "LOCK_STALE", 0.0)
    later = run_here([uri, "-o", bucket.uri("out.csv"), "--dry-run"])
    assert later.exit_code == 0, later.output
    assert "left by pid 1 on elsewhere" in later.output


def test_a_sidecar_names_its_result_file_and_a_pair_that_does_not_match_is_said(
    bucket: Bucket, tmp_path: Path
) -> None:
    """The sidecar goes up first and names the result file by hash, so a run killed between
    the two uploads leaves a pair that says so; the next run tells which one it resumes."""
    uri = bucket.put(write_local(corrections(6), tmp_path / "in.csv"), "in.csv")
    first = run_here([uri, "-o", bucket.uri("out.csv"), "--dry-run"])
    assert first.exit_code == 0, first.output
    sidecar = json.loads(bucket.read("out.csv.run.json"))
    assert sidecar["result_sha256"] == hashlib.sha256(bucket.read("out.csv")).hexdigest()
    again = run_here([uri, "-o", bucket.uri("out.csv"), "--dry-run"])
    assert again.exit_code == 0, again.output
    assert "names a result file" not in again.output
    # As if killed after the sidecar of a later upload went up, before its result file did.
    sidecar["result_sha256"] = "0" * 64
    (tmp_path / "sidecar.json").write_text(json.dumps(sidecar))
    bucket.put(tmp_path / "sidecar.json", "out.csv.run.json")
    later = run_here([uri, "-o", bucket.uri("out.csv"), "--dry-run"])
    assert later.exit_code == 0, later.output
    said = [line for line in later.output.splitlines() if "names a result file" in line]
    assert len(said) == 1, later.output
    assert bucket.uri("out.csv.run.json") in said[0]


def test_two_locks_exclude_each_other_and_a_lost_lock_is_noticed(
    bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = ObjectUri(bucket.uri("x.parquet"))
    store = Store(output, StorageOptions())
    first = RemoteLock(store, output)
    first.acquire()
    with pytest.raises(LockedError, match="another allo-batch run"):
        RemoteLock(store, output).acquire()
    monkeypatch.setattr(storage, "LOCK_HEARTBEAT", 0.05)
    first.release()
    second = RemoteLock(store, output)
    second.acquire()  # heartbeats every 50 ms now
    time.sleep(0.2)
    assert second.lost is None
    bucket.fs.pipe_file(f"{bucket.name}/x.parquet.lock", b'{"pid": 1, "host": "thief"}')
    deadline = time.monotonic() + 5
    while second.lost is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert second.lost is not None and "another run took over the lock" in second.lost
    second.release()
    assert bucket.read("x.parquet.lock") == b'{"pid": 1, "host": "thief"}'  # not removed


# -- kill -9 and a rerun on another machine ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("result", ["out.csv", "out.parquet"])
def test_kill_9_then_a_rerun_from_an_empty_state_folder_lands_each_row_once(
    bucket: Bucket, sandbox_factory: SandboxFactory, tmp_path: Path, result: str
) -> None:
    frame = corrections(240, templates=False)
    uri = bucket.put(write_local(frame, tmp_path / "in.parquet"), "in.parquet")
    output = bucket.uri(result)
    with sandbox_factory(world_for(frame, write_rate=40), api_key=KEY, faults="latency=20ms") as sb:
        args = [uri, "-o", output, "--base-url", sb.base_url, "--checkpoint-interval", "0.5"]
        killed = start_run([*args, "--state-dir", str(tmp_path / "machine-a")], bucket.env)
        deadline = time.monotonic() + 60
        # Killed after a checkpoint reached the bucket and more rows landed since.
        while not bucket.exists(result) or sb.app.counters.get("writes_applied", 0) < 120:
            assert killed.poll() is None, killed.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        killed.send_signal(signal.SIGKILL)
        killed.communicate(timeout=RUN_TIMEOUT)
        landed = -1
        while landed != sb.app.counters["writes_applied"]:  # requests in flight may still land
            landed = sb.app.counters["writes_applied"]
            time.sleep(0.3)
        checkpoint = bucket.results(result, tmp_path)  # whole: it parses
        in_checkpoint = checkpoint.filter(pl.col("status") == "updated").height
        assert 0 < in_checkpoint <= landed < 240
        assert checkpoint["row"].is_sorted()
        # The sidecar is never behind the result object; where it names this very object (not
        # one whose upload the kill cut off), it counts the object's rows (a first run's
        # checkpoint holds only the rows it settled).
        facts = json.loads(bucket.read(f"{result}.run.json"))
        claim = facts["checkpoint"]
        assert claim["rows"] >= checkpoint.height >= in_checkpoint
        if facts["result_sha256"] == hashlib.sha256(bucket.read(result)).hexdigest():
            assert claim["rows"] == checkpoint.height
        else:  # killed between the two uploads: the sidecar names a later checkpoint
            assert claim["rows"] > checkpoint.height
        assert bucket.exists(f"{result}.lock")  # left by the killed run
        # Another machine: no journal; its lock taken over (same host, dead pid).
        resumed = start_run([*args, "--state-dir", str(tmp_path / "machine-b")], bucket.env)
        code, summary, err = finish(resumed)
        state = sb.state()
    assert code == 0, err
    assert "took over the lock" in err
    by_status = summary["by_status"]
    # Rows in the checkpoint are skipped; rows that landed after it are read, found right.
    assert by_status["skipped"] >= in_checkpoint
    assert by_status.get("skipped", 0) + by_status.get("unchanged", 0) == landed
    assert by_status["updated"] == 240 - landed
    assert summary["requests"] == 240 - landed
    # Each target written exactly once over both runs, with the row's content.
    contents = dict(zip(frame["call_id"], frame["content"], strict=True))
    for row in state["summaries"]:
        assert row["writes"] == 1, row
    assert len(state["summaries"]) == 240
    final = bucket.results(result, tmp_path)
    assert final["row"].to_list() == list(range(240))
    assert set(final["status"]) <= {"updated", "skipped", "unchanged"}
    assert len(contents) == 240
    assert not bucket.exists(f"{result}.lock")
    no_secret_in(err, *(bucket.read(k) for k in bucket.listing()))


def test_a_stop_uploads_the_whole_result_file(
    bucket: Bucket, sandbox_factory: SandboxFactory, tmp_path: Path
) -> None:
    """SIGTERM: the stopped run's result file (every row, the rest not_sent) is in the bucket,
    and the journal is gone from the state folder once it is."""
    frame = corrections(150)
    uri = bucket.put(write_local(frame, tmp_path / "in.csv"), "in.csv")
    state = tmp_path / "state"
    with sandbox_factory(world_for(frame, write_rate=30), api_key=KEY) as sb:
        args = [uri, "-o", bucket.uri("out.ndjson"), "--base-url", sb.base_url]
        process = start_run([*args, "--state-dir", str(state)], bucket.env)
        deadline = time.monotonic() + 30
        while sb.app.counters.get("writes_applied", 0) < 20:
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        code, summary, err = finish(process)
    assert code == 130, err
    stopped = bucket.results("out.ndjson", tmp_path)
    assert stopped.height == 150
    assert stopped.filter(pl.col("status") == "not_sent").height > 0
    assert not list(state.rglob("*.journal"))
    assert summary["output"] == bucket.uri("out.ndjson")


def test_a_run_whose_lock_is_taken_stops_with_3_and_writes_nothing_more(
    bucket: Bucket,
    sandbox_factory: SandboxFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    frame = corrections(60)
    uri = bucket.put(write_local(frame, tmp_path / "in.csv"), "in.csv")
    monkeypatch.setattr(storage, "LOCK_HEARTBEAT", 0.1)
    thief = b'{"pid": 1, "host": "elsewhere", "started": "x"}'

    def steal(sb: Any) -> None:
        # Once some rows have landed (the run holds its lock by then), however slow the start.
        deadline = time.monotonic() + 20
        while sb.app.counters["writes_applied"] < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        bucket.fs.pipe_file(f"{bucket.name}/out.csv.lock", thief)

    with sandbox_factory(world_for(frame, write_rate=15), api_key=KEY) as sb:
        threading.Thread(target=steal, args=(sb,), daemon=True).start()
        stopped = run_here([uri, "-o", bucket.uri("out.csv"), "--base-url", sb.base_url])
        landed = sb.app.counters["writes_applied"]
    assert stopped.exit_code == 3, stopped.output
    assert "another run took over the lock" in stopped.output
    assert "a rerun uploads it" in stopped.output
    assert 0 < landed < 60
    assert bucket.read("out.csv.lock") == thief  # the other run's lock is left alone
    assert not bucket.exists("out.csv")  # and so is its output


def test_a_failed_final_upload_keeps_the_journal_and_a_rerun_uploads(
    bucket: Bucket,
    sandbox_factory: SandboxFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    frame = corrections(20)
    uri = bucket.put(write_local(frame, tmp_path / "in.csv"), "in.csv")
    state = tmp_path / "state"
    upload = Store.upload

    def failing(self: Store, local: Path, target: ObjectUri) -> None:
        if target.name == "out.parquet":
            raise storage.StorageError(f"{target}: cannot write it (the store is down)")
        upload(self, local, target)

    with sandbox_factory(world_for(frame), api_key=KEY) as sb:
        args = [uri, "-o", bucket.uri("out.parquet"), "--base-url", sb.base_url]
        args += ["--state-dir", str(state)]
        monkeypatch.setattr(Store, "upload", failing)
        failed = run_here(args)
        assert failed.exit_code == 3, failed.output
        assert "the store is down" in failed.output
        # The summary (what a scheduler keeps) agrees: exit 3, why, and where the file is.
        said = summary_of(failed)
        assert said["exit_code"] == 3
        assert "the store is down" in said["stopped_reason"]
        assert said["output"].startswith(str(state))
        assert len(list(state.rglob("out.parquet.journal"))) == 1
        assert not bucket.exists("out.parquet")
        monkeypatch.setattr(Store, "upload", upload)
        again = run_here(args)
        assert sb.app.counters["writes_applied"] == 20
    assert again.exit_code == 0, again.output
    assert summary_of(again)["by_status"] == {"skipped": 20}
    assert bucket.results("out.parquet", tmp_path)["status"].to_list() == ["skipped"] * 20
    assert not list(state.rglob("*.journal"))


def test_run_sandbox_seeds_its_world_from_an_input_in_a_bucket(
    bucket: Bucket, tmp_path: Path
) -> None:
    uri = bucket.put(write_local(corrections(8), tmp_path / "in.parquet"), "in.parquet")
    done = run_here([uri, "-o", bucket.uri("out.csv"), "--sandbox", "--sandbox-rate", "100"])
    assert done.exit_code == 0, done.output
    assert summary_of(done)["by_status"] == {"updated": 8}


def test_a_scratch_folder_left_by_a_killed_process_is_removed_by_the_next(tmp_path: Path) -> None:
    """A run killed (kill -9) with an input in a bucket left the input's copy, customer
    content, in the spool for good. The next scratch folder removes those of processes gone,
    and leaves a running one's."""
    state = tmp_path / "state"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    spool = state / "spool"
    spool.mkdir(parents=True, mode=0o700)
    os.chmod(state, 0o700)
    left = spool / f"allo-batch-{gone.pid}-abc123"
    running = spool / f"allo-batch-{os.getppid()}-def456"
    for folder in (left, running):
        folder.mkdir()
        (folder / "0").write_text("call_id,content\ncll-1,customer text\n")
    with storage.scratch_folder(state) as mine:
        assert mine.parent == spool and mine.name.startswith(f"allo-batch-{os.getpid()}-")
        assert not left.exists()
        assert (running / "0").exists()
    assert not mine.exists()
