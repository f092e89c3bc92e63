"""The one module that composes the stages: read → validate → plan → send → record → report.

Every other stage module depends on ``models`` (and its own outside library) only; this one
wires them for a run (:func:`run_job`) and for a local check (:func:`check_input`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from allo_batch.config import JobConfig, check_base_url
from allo_batch.constants import (
    DEFAULT_WRITE_PER_SECOND,
    MAX_BATCH_IDS,
    ME_PATH,
    READ_SCOPE,
    WRITE_SCOPE,
)
from allo_batch.corrections import line_numbers
from allo_batch.errors import (
    AlloBatchError,
    ApiUnavailableError,
    AuthRefusedError,
    DeadlineError,
    ExitCode,
    InterruptedRunError,
    OutputConflictError,
    TooManyErrorsError,
    UsageError,
)
from allo_batch.lock import OutputLock, refuse_to_overwrite
from allo_batch.look import (
    CallFacts,
    Looked,
    Looker,
    ReadFailedError,
    ReadStoppedError,
    dry_run_result,
)
from allo_batch.models import (
    CODE,
    MESSAGE,
    REPEAT_OF,
    InputCheck,
    PlannedRequest,
    RowResult,
    RunSummary,
)
from allo_batch.plan import (
    Planned,
    PlannedBatch,
    attach_done,
    plan_batch,
    plan_frame,
    with_content_hashes,
)
from allo_batch.preview import PAGE_ROWS, Change, Preview, preview_schema, similarity
from allo_batch.read import (
    Fingerprinter,
    InputFingerprint,
    InputSource,
    iter_batches,
    key_batches,
    open_input,
    read_ahead,
)
from allo_batch.record import (
    BeforeImages,
    Mirror,
    OrderedResults,
    Recorder,
    load_earlier,
    output_format,
    read_sidecar,
)
from allo_batch.report import NullReporter, Reporter, exit_code_for
from allo_batch.storage import ObjectUri, output_place, scratch_folder
from allo_batch.validate import (
    Duplicates,
    Targets,
    calls_in_conflict,
    find_duplicates,
    no_duplicates,
    validate_batch,
)

if TYPE_CHECKING:
    import polars as pl

    from allo_batch.client import AlloClient
    from allo_batch.send import Sender

log = logging.getLogger("allo_batch")

_TICK_SECONDS = 0.5


@dataclass(slots=True)
class _Prepared:
    source: InputSource
    identity: InputFingerprint
    duplicates: Duplicates
    done: pl.DataFrame
    in_doubt: int
    two_templates: set[str] = field(default_factory=set)  # earlier: KEY_REQUIRED answers
    output: Path | None = None  # the result file built here (for an object: its local copy)
    mirror: Mirror | None = None  # for an output in a store: its uploads

    @property
    def total(self) -> int:
        return self.identity.rows

    def planned_batches(
        self, config: JobConfig, *, dry_run: bool = False
    ) -> Iterator[PlannedBatch]:
        """Each input batch, validated and planned as frames (``dry_run``: what would be
        sent is settled too, as when a dry run reads nothing)."""
        read: Iterator[pl.DataFrame] = iter_batches(self.source, config.batch_size)
        if dry_run:
            # Nothing waits for the API: the next batch is read, and its content hashed, in a
            # thread ahead of planning. (A run waits for its writes: reading ahead would only
            # hold one more batch in memory.)
            read = read_ahead(map(with_content_hashes, read))
        for batch in read:
            checked = attach_done(validate_batch(batch, self.duplicates), self.done)
            yield plan_frame(checked, limit=config.limit, dry_run=dry_run)

    def planned_rows(self, config: JobConfig) -> Iterator[list[Planned]]:
        """The same, one value per row (for ``diff``, which looks at each)."""
        for batch in iter_batches(self.source, config.batch_size):
            checked = attach_done(validate_batch(batch, self.duplicates), self.done)
            yield list(plan_batch(checked, limit=config.limit))


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """How one run of a job ended: its summary, or the error that stopped it (whose
    ``summary`` holds the figures when the run had started)."""

    config: JobConfig
    summary: RunSummary | None
    error: AlloBatchError | None = None

    @property
    def exit_code(self) -> int:
        """The run's exit code."""
        if self.error is not None:
            return int(self.error.exit_code)
        return self.summary.exit_code if self.summary is not None else 0


@dataclass(frozen=True, slots=True)
class JobsOutcome:
    """How a job of several runs ended; its exit code is the highest of theirs."""

    outcomes: list[JobOutcome]
    not_started: list[JobConfig]  # left for the rerun after a stop
    why_not_started: str = "after the stop above"

    @property
    def exit_code(self) -> int:
        """The highest exit code of the runs (0 when none ran)."""
        return max((o.exit_code for o in self.outcomes), default=0)


def run_jobs(
    configs: Sequence[JobConfig],
    *,
    reporter_for: Callable[[JobConfig], Reporter] | None = None,
    on_outcome: Callable[[JobOutcome], None] | None = None,
) -> JobsOutcome:
    """Run each configuration in turn, as ``allo-batch run --job`` does.

    A stop (exit 3 or more: key refused, API down, interrupted) would stop the next run too,
    so the later ones are not started; a rerun picks them up. Several files are first opened
    (:func:`_refused_inputs`): one refused, none is run.
    """
    refused = _refused_inputs(configs) if len(configs) > 1 else []
    if refused:
        for outcome in refused:
            if on_outcome is not None:
                on_outcome(outcome)
        left = [config for config in configs if all(o.config is not config for o in refused)]
        return JobsOutcome(refused, left, "as an input above is refused (nothing was sent)")
    outcomes: list[JobOutcome] = []
    for index, config in enumerate(configs):
        reporter = reporter_for(config) if reporter_for is not None else None
        try:
            outcome = JobOutcome(config, run_job(config, reporter=reporter))
        except AlloBatchError as error:
            outcome = JobOutcome(config, error.summary, error)
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
        if outcome.exit_code >= ExitCode.STOPPED:
            return JobsOutcome(outcomes, list(configs[index + 1 :]))
    return JobsOutcome(outcomes, [])


def _refused_inputs(configs: Sequence[JobConfig]) -> list[JobOutcome]:
    """The runs of a job of several files whose local input cannot be opened (no such file, a
    format or header refused), each with its error: checked before any file is sent, so that
    exit 2 still means that nothing was sent. (An object in a store is checked by its own run:
    opening it means downloading it.)"""
    refused = []
    for config in configs:
        if isinstance(config.input, Path):
            try:
                open_input(config.input, config.format, config.columns)
            except AlloBatchError as error:
                refused.append(JobOutcome(config, None, error))
    return refused


def run_job(
    config: JobConfig, *, reporter: Reporter | None = None, transport: Any = None
) -> RunSummary:
    """Run one job to the end and return its summary.

    Returns normally when every row was tried (exit code 0 or 1 in ``summary.exit_code``);
    raises a :class:`~allo_batch.errors.RunStoppedError` or
    :class:`~allo_batch.errors.InterruptedRunError` (with ``.summary``) when the run stopped
    early, and :class:`~allo_batch.errors.UsageError` before anything was sent.
    """
    return anyio.run(partial(run_job_async, config, reporter=reporter, transport=transport))


async def run_job_async(
    config: JobConfig, *, reporter: Reporter | None = None, transport: Any = None
) -> RunSummary:
    """The async form of :func:`run_job`."""
    output = config.output_path
    output_format(output)
    if isinstance(output, Path) and output.is_dir():
        raise UsageError(f"--output {output} is a folder; name a result file in it")
    _check_not_the_input(config)
    if isinstance(output, Path):
        _make_folder(output.parent)
    if config.api_key is not None or not config.dry_run:
        check_base_url(config.base_url)  # the key goes there, even for a dry run's reads
    if not config.dry_run and config.api_key is None:
        msg = "no API key: set ALLO_API_KEY or pass --api-key-file"
        raise UsageError(msg)
    remote_input = isinstance(config.input, ObjectUri)
    with (
        output_place(
            output, config.storage_options, config.state_dir, remote_input=remote_input
        ) as place,
        OutputLock(place.local),
    ):
        prepared = await anyio.to_thread.run_sync(_prepare, config, place.local, place.spool)
        prepared.mirror = place.remote
        reporter = reporter or NullReporter()
        reporter.start(prepared.total)
        return await _execute(config, prepared, reporter, transport)


def _check_not_the_input(config: JobConfig) -> None:
    output = config.output_path
    if not isinstance(output, Path) or not isinstance(config.input, Path):
        if output == config.input:
            msg = f"--output {output} is the input itself; name another result file"
            raise UsageError(msg)
        return
    same = output.resolve() == config.input.resolve()
    if same or (output.exists() and config.input.exists() and output.samefile(config.input)):
        msg = f"--output {output} is the input file itself; name another result file"
        raise UsageError(msg)


def _make_folder(folder: Path) -> None:
    """Create the output's folder, as a job spec's runs always did."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        msg = f"{folder}: cannot make the output folder ({exc.strerror})"
        raise UsageError(msg) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        msg = f"{folder}: the output folder is not writable"
        raise UsageError(msg)


def survey(source: InputSource, batch_size: int) -> tuple[InputFingerprint, Duplicates]:
    """The input's fingerprint and its duplicate rows, over the whole input: a ``--limit``
    canary must not write a row that the full run refuses as conflicting with a later one.

    One key-only pass gives the fingerprint and every row's target hash; a second pass, only
    when some hash repeats (or some call comes both with and without a template), reads the
    rows involved and compares them on the real strings.
    """
    prints = Fingerprinter(source.path, source.origin)
    targets = Targets()
    for frame in read_ahead(key_batches(source, batch_size)):
        prints.add(frame)
        targets.add(frame)
    return prints.result(), _duplicates(source, batch_size, targets)


def _duplicates(source: InputSource, batch_size: int, targets: Targets) -> Duplicates:
    """The duplicates among the rows, once a pass has taken in every row's target. An input
    that gives calls both with and without a template_key is read again, keys only, for the
    calls given both ways, and whole rows of those calls for their contents
    (:func:`~allo_batch.validate.calls_in_conflict`)."""
    candidates = targets.repeated()
    rows = partial(iter_batches, source, batch_size)
    calls = calls_in_conflict(key_batches(source, batch_size), rows) if targets.mixed else None
    return find_duplicates(rows, candidates, calls)


def _prepare(config: JobConfig, output: Path, spool: Path | None = None) -> _Prepared:
    source = open_input(
        config.input, config.format, config.columns, storage=config.storage_options, spool=spool
    )
    if config.blind and source.columns.get("expected_sha256") is not None:
        msg = (
            f"{source.path}: column expected_sha256 needs a read of each target before its "
            "write, and --blind reads nothing; drop --blind or the column"
        )
        raise UsageError(msg)
    _check_not_undone(output)
    identity, duplicates = survey(source, config.batch_size)
    earlier = load_earlier(output)
    # Named as the user gave it: an output in a store is read from a local copy.
    _check_same_input(config.output_path, identity, earlier.inputs, force=config.force)
    return _Prepared(
        source,
        identity,
        duplicates,
        earlier.done,
        earlier.in_doubt,
        earlier.two_templates,
        output=output,
    )


def _check_not_undone(output: Path) -> None:
    """Refuse a result file an undo began to put back: the rows it records as landed may not
    hold their content any more, and a run would skip them as done."""
    undone = read_sidecar(output).get("undone_by")
    if undone:
        msg = (
            f"{output}: an undo of its writes began ({undone}), so the rows it records as "
            "landed may not hold their content any more; run into a new --output (the run "
            "reads every target first and writes only what differs)"
        )
        raise UsageError(msg)


def _check_same_input(
    output: Path | ObjectUri,
    current: InputFingerprint,
    earlier: list[dict[str, Any]],
    *,
    force: bool,
) -> None:
    """Refuse to merge results of a different input into ``output`` (unless ``--force``)."""
    for seen in earlier:
        if seen.get("keys_sha256") == current.keys_sha256:
            continue
        what = f"{seen.get('path', '?')} ({seen.get('rows', '?')} rows)"
        merged = (current.path, output, what)
        if force:
            log.warning("merging the results of %s into %s, which holds those of %s", *merged)
            return
        msg = (
            f"{output} holds results of another input: {what}; this input, {current.path} "
            f"({current.rows} rows), has different rows (call_id and template_key, in order). "
            "Use a new --output, or --force to merge into it (rows of the other input then "
            "drop out of the result file; what landed is still never resent)"
        )
        raise OutputConflictError(msg)


@dataclass(slots=True)
class _Sending:
    """What the connected phase leaves for the summary."""

    sender: Sender | None = None
    looker: Looker | None = None
    rate: float | None = None
    auth_form: str | None = None
    verify: dict[str, Any] | None = None


async def _execute(
    config: JobConfig, prepared: _Prepared, reporter: Reporter, transport: Any
) -> RunSummary:
    started = time.monotonic()
    assert prepared.output is not None
    recorder = Recorder(
        prepared.output,
        prepared.identity.as_dict(),
        journaled=not config.dry_run,
        mirror=prepared.mirror,
        checkpoint_every=config.checkpoint_interval,
    )
    sending = _Sending()
    try:
        if config.api_key is None:  # a dry run without a key plans, reading nothing
            await _produce(prepared.planned_batches(config, dry_run=True), recorder, None)
        else:
            await _connected(config, prepared, recorder, reporter, transport, sending)
    except BaseException:
        recorder.abandon()
        raise
    finally:
        reporter.close()
    summary = _summarize(config, prepared, recorder, sending, started)
    sender = sending.sender
    recorder.close(
        summary,
        timeline=sender.stats.timeline.as_dict() if sender is not None else None,
        auth_form=sending.auth_form,
        verify=sending.verify,
    )
    stop = sender.stop_error if sender is not None and not config.dry_run else None
    if stop is not None:
        stop.summary = summary
        raise stop
    return summary


class _Reported:
    """What the sender reports goes to the recorder, teaches the look stage about calls, and
    (with ``--verify``) lists the rows that landed, to read them back at the end."""

    def __init__(self, recorder: Recorder, facts: CallFacts | None, *, verify: bool) -> None:
        self._recorder = recorder
        self._facts = facts
        self.landed: list[PlannedRequest] | None = [] if verify else None

    def sending(self, request: PlannedRequest, request_id: str) -> None:
        self._recorder.sending(request, request_id)

    def finished(self, result: RowResult) -> None:
        if self._facts is not None:
            self._facts.learn(result)
        if self.landed is not None and result.status == "updated" and result.call_id:
            self.landed.append(
                PlannedRequest(
                    result.row, result.call_id, result.template_key, result.content_sha256, b""
                )
            )
        self._recorder.finished(result)


async def _connected(
    config: JobConfig,
    prepared: _Prepared,
    recorder: Recorder,
    reporter: Reporter,
    transport: Any,
    sending: _Sending,
) -> None:
    """Everything that talks to the API: /me, the look stage's reads, the writes."""
    from allo_batch.budget import SharedBudget, budget_key_id
    from allo_batch.client import AlloClient, http_lanes, make_http_client
    from allo_batch.ratelimit import WindowWatch
    from allo_batch.send import Sender

    assert config.api_key is not None
    # The worker count (one client each) comes from the rate, which /me tells: ask it first.
    async with make_http_client(timeout=config.timeout, transport=transport) as http:
        probe = AlloClient(http, config.base_url, config.api_key, auth=config.auth)
        checked = await _preflight(probe, config)
        sending.auth_form = probe.auth_form
    sending.rate = checked.rate
    if not config.dry_run:
        _warn_if_late(config, prepared, checked.rate)
    workers = 1 if config.dry_run else config.workers(checked.rate)
    reading = not config.blind and checked.refusal is None
    lanes_needed = workers + 1  # the last lane is the look stage's
    async with http_lanes(
        workers=lanes_needed, timeout=config.timeout, transport=transport
    ) as lanes:
        auth = probe.auth_form or config.auth
        client = AlloClient(lanes, config.base_url, config.api_key, auth=auth)
        # One budget per key: every run on this machine using the key shares it (DESIGN §5).
        key_id = budget_key_id(config.base_url, config.api_key.reveal())
        pacer = SharedBudget(key_id, checked.rate, jitter=config.jitter_margin)
        facts = CallFacts(set(prepared.two_templates), set())
        reported = _Reported(recorder, facts, verify=config.verify and reading)
        sender = Sender(
            client,
            pacer,
            reported,
            policy=config.retry,
            max_errors=config.max_errors,
            watch=WindowWatch(pacer),
        )
        sending.sender = sender
        if checked.refusal is not None:
            if not config.dry_run:
                sender.stop(checked.refusal, grace=0)
            else:
                log.warning("dry run without reads: %s", checked.refusal.message)
        looker = None
        if reading:
            before = None if config.dry_run else recorder.before_images(_run_id())
            looker = Looker(
                lambda ids: sender.read_items(ids, lane=workers),
                facts,
                settle=recorder.planned,
                keep=_keeper(before),
                write_always=config.write_always,
                dry_run=config.dry_run,
                stopping=lambda: sender.stopping,
                failed=lambda why: sender.stop(ApiUnavailableError(why)),
            )
            sending.looker = looker
        try:
            await _flow(config, prepared, recorder, reporter, sender, looker, workers)
            if looker is not None and reported.landed and not sender.stopping:
                sending.verify = await _verify(looker, reported.landed)
        finally:
            pacer.close()
        if looker is not None and before is not None:
            before.compact()


async def _verify(looker: Looker, landed: list[PlannedRequest]) -> dict[str, Any]:
    """``--verify``: read back every target written in this run (certain reads only, so a
    two-template call is not compared with its other summary) and list those that differ."""
    differs: list[dict[str, Any]] = []
    checked = 0
    for start in range(0, len(landed), MAX_BATCH_IDS):
        for item in await looker.looked(landed[start : start + MAX_BATCH_IDS]):
            if not item.certain:
                continue
            checked += 1
            if item.current.sha256 != item.request.content_sha256:
                differs.append(
                    {
                        "row": item.request.row,
                        "call_id": item.request.call_id,
                        "template_key": item.request.template_key,
                        "found": item.current.found,
                    }
                )
    if differs:
        log.warning(
            "--verify: %d of %d targets read back differently from what was sent (rows %s%s): "
            "the API normalised them, or its reads lag behind writes",
            len(differs),
            checked,
            ", ".join(str(d["row"]) for d in differs[:10]),
            ", ..." if len(differs) > 10 else "",
        )
    return {"checked": checked, "differs": len(differs), "rows": differs[:1000]}


def _keeper(before: BeforeImages | None) -> Callable[[list[Looked]], None]:
    """Where the look stage's before-images go: durably to disk (a dry run keeps none)."""
    if before is None:
        return lambda items: None
    return lambda items: before.write([item.before_image() for item in items])


async def _flow(
    config: JobConfig,
    prepared: _Prepared,
    recorder: Recorder,
    reporter: Reporter,
    sender: Sender,
    looker: Looker | None,
    workers: int,
) -> None:
    """produce → (look) → send, each a task joined by bounded streams, in input order."""
    send, receive = anyio.create_memory_object_stream[PlannedRequest](workers * 4)
    async with anyio.create_task_group() as outer:
        outer.start_soon(sender.enforce_grace)
        if config.finish_by is not None and not config.dry_run:
            outer.start_soon(_stop_at_deadline, sender, config.finish_by)
        outer.start_soon(_tick, reporter, recorder, sender)
        if threading.current_thread() is threading.main_thread():
            outer.start_soon(_watch_signals, sender)
        async with anyio.create_task_group() as inner:
            if config.dry_run:
                inner.start_soon(_record_dry, receive, recorder)
            else:
                inner.start_soon(sender.run, receive, workers)
            if looker is not None:
                into_look, look_from = anyio.create_memory_object_stream[PlannedRequest](
                    MAX_BATCH_IDS * 2
                )
                inner.start_soon(looker.run, look_from, send)
                send = into_look
            dry_without_reads = config.dry_run and looker is None
            async with send:
                await _produce(
                    prepared.planned_batches(config, dry_run=dry_without_reads),
                    recorder,
                    None if dry_without_reads else send,
                    sender,
                )
            if dry_without_reads:
                send.close()
        outer.cancel_scope.cancel()
    _tick_once(reporter, recorder, sender)


async def _stop_at_deadline(sender: Sender, deadline: datetime) -> None:
    """``--finish-by``: at the deadline no new row starts; requests in flight may finish."""
    await anyio.sleep(max(0.0, (deadline - datetime.now(UTC)).total_seconds()))
    sender.stop(
        DeadlineError(
            f"the --finish-by deadline {deadline.isoformat(timespec='minutes')} passed; "
            "the next window's run resumes from here"
        )
    )


def _warn_if_late(config: JobConfig, prepared: _Prepared, rate: float) -> None:
    """Say at the start when the rows left cannot all be written before ``--finish-by``."""
    if config.finish_by is None:
        return
    left = (config.finish_by - datetime.now(UTC)).total_seconds()
    rows = max(prepared.total - prepared.done.height, 0)
    need = rows / rate
    if need > left:
        deadline = config.finish_by
        shown = deadline.isoformat(timespec="seconds" if deadline.second else "minutes")
        when = f"is {_duration(left)} away" if left > 0 else f"passed {_duration(-left)} ago"
        log.warning(
            "about %d rows left need about %s at %g writes/s, but --finish-by %s %s: the run "
            "will stop then, and the next window's run resumes",
            rows,
            _duration(need),
            rate,
            shown,
            when,
        )


def _duration(seconds: float) -> str:
    whole = int(seconds)
    if whole >= 3600:
        return f"{whole // 3600} h {whole % 3600 // 60:02d} min"
    return f"{whole // 60} min {whole % 60:02d} s" if whole >= 60 else f"{whole} s"


async def _record_dry(
    receive: MemoryObjectReceiveStream[PlannedRequest], recorder: Recorder
) -> None:
    """A dry run's end of the line: what would be sent is recorded as such."""
    async with receive:
        async for request in receive:
            recorder.planned(dry_run_result(request))


_last_run_micros = 0


def _run_id() -> str:
    """``<UTC time to the microsecond>Z-<pid>``: run ids sort in time, and two runs never share
    one, also two in one process within a second (a canary and the full run from one script:
    with ids to the second, the second run's before-images were taken for copies of the first's
    and deleted). No dot: a chunk's file name is ``<run id>.<n>.chunk.parquet``."""
    global _last_run_micros  # one counter per process: that is the point
    _last_run_micros = max(time.time_ns() // 1000, _last_run_micros + 1)
    seconds, micros = divmod(_last_run_micros, 1_000_000)
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(seconds))}{micros:06d}Z-{os.getpid()}"


@dataclass(frozen=True, slots=True)
class _Preflight:
    rate: float
    refusal: AlloBatchError | None = None


async def _preflight(
    client: AlloClient,
    config: JobConfig,
    needs: tuple[str, ...] | None = None,
    *,
    interactive: bool = False,
) -> _Preflight:
    """Ask ``/me`` for the key's write limit and scopes (``needs``: by default the write
    scope, and the read scope unless blind) before sending anything."""
    answer = await client.me()
    fallback = config.rate or float(DEFAULT_WRITE_PER_SECOND)
    if answer.kind == "transport" and (config.dry_run or interactive):
        # A dry run reads only to count changes, and a person waits for `diff`: an unreachable
        # API is no reason to wait out --max-outage.
        reason = f"cannot reach {config.base_url} ({answer.error_code})"
        return _Preflight(fallback, ApiUnavailableError(reason))
    if answer.http_status in (401, 403):
        return _Preflight(
            fallback,
            AuthRefusedError(
                f"the API refused the key: {answer.error_code} (HTTP {answer.http_status})"
            ),
        )
    if answer.http_status == 404:
        # /me is documented for every key: a 404 means the URL is not the API's (a path after
        # the host, another service), and every request would be refused the same way.
        msg = (
            f"--base-url {config.base_url}: GET {ME_PATH} answered 404 ({answer.error_code}); "
            "that is not the Allo API (give the scheme and host only)"
        )
        return _Preflight(fallback, UsageError(msg))
    data = answer.data if answer.kind == "ok" else None
    if data is None:
        return _Preflight(fallback)
    scopes = data.get("scopes")
    if isinstance(scopes, list):
        needed = list(needs or [WRITE_SCOPE] + ([] if config.blind else [READ_SCOPE]))
        missing = [scope for scope in needed if scope not in scopes]
        if missing:
            return _Preflight(fallback, AuthRefusedError(_scope_message(missing, scopes)))
    limits = data.get("rate_limits")
    limit = limits.get("write_per_second") if isinstance(limits, dict) else None
    if config.rate:
        return _Preflight(config.rate)
    if isinstance(limit, int | float) and not isinstance(limit, bool) and limit > 0:
        return _Preflight(float(limit))
    return _Preflight(fallback)


def _scope_message(missing: list[str], scopes: list[Any]) -> str:
    has = ", ".join(map(str, scopes)) or "none"
    text = f"the key lacks the {' and '.join(missing)} scope (it has: {has})"
    if READ_SCOPE in missing and WRITE_SCOPE not in missing:
        text += (
            "; allo-batch reads each target before writing it (before-images for undo, rows "
            "already right skipped): grant CONVERSATIONS_READ, or pass --blind to write "
            "without reading"
        )
    return text


async def _produce(
    batches: Iterator[PlannedBatch],
    recorder: Recorder,
    send: MemoryObjectSendStream[PlannedRequest] | None,
    sender: Sender | None = None,
) -> None:
    """Walk the planned batches in order: each batch's settled rows go to the recorder as one
    frame, its requests down the stream (once the run stops, to the recorder as not sent).

    Without a stream (a dry run that reads nothing), the next batch is planned in a thread of
    its own while this one is recorded: both are mostly polars and pyarrow, which let go of the
    GIL, so the two cores are kept busy. (With one, the writes set the pace: planning ahead
    would only hold memory.)
    """
    from allo_batch.send import not_sent

    if send is None:
        batches = read_ahead(batches)
    while (planned := await anyio.to_thread.run_sync(next, batches, None)) is not None:
        recorder.batch(planned.first_row, planned.end_row, planned.settled, len(planned.requests))
        for item in planned.requests:
            if send is None:
                recorder.planned(dry_run_result(item))
            elif sender is not None and sender.stopping:
                recorder.planned(not_sent(item, sender.stop_message()))
            else:
                try:
                    send.send_nowait(item)
                except anyio.WouldBlock:
                    await send.send(item)


async def _watch_signals(sender: Sender) -> None:
    """SIGINT/SIGTERM: stop with a grace period; a second one cancels what is in flight."""
    # The event loop resets the handlers to the defaults when it lets go of them; give back
    # what was there before (the command line's, or an embedding program's).
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with anyio.open_signal_receiver(*previous) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if sender.stopping:
                    sender.cancel_in_flight()
                else:
                    sender.stop(InterruptedRunError(f"interrupted by {name}"))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


async def _tick(reporter: Reporter, recorder: Recorder, sender: Sender) -> None:
    """Progress, and the journal's fsync even when no answer arrives for a while."""
    while True:
        await anyio.sleep(_TICK_SECONDS)
        _tick_once(reporter, recorder, sender)
        recorder.sync()
        problem = recorder.problem()  # the output's lock in a store was lost
        if problem is not None and not sender.stopping:
            sender.stop(problem)


def _tick_once(reporter: Reporter, recorder: Recorder, sender: Sender) -> None:
    reporter.update(
        recorder.rows,
        recorder.counts,
        sender.stats.achieved_rate(),
        unreachable_for=sender.unreachable_for(),
    )


def _unchanged(sending: _Sending) -> int:
    """Rows a dry run's reads found already right (they would not be written)."""
    return sending.looker.changes.get("unchanged", 0) if sending.looker is not None else 0


def _summarize(
    config: JobConfig,
    prepared: _Prepared,
    recorder: Recorder,
    sending: _Sending,
    started: float,
) -> RunSummary:
    sender = sending.sender
    stopped = sender.stop_error if sender is not None else None
    if isinstance(stopped, TooManyErrorsError):
        # Rows in flight at the stop may fail too: say how many failed in the end.
        stopped.restate(
            f"{recorder.counts['failed']} rows failed (--max-errors {config.max_errors})"
        )
    summary = RunSummary(
        rows=recorder.rows,
        by_status=dict(recorder.counts),
        by_error_code=dict(recorder.codes),
        rate_limit=sending.rate,
        elapsed_seconds=round(time.monotonic() - started, 3),
        stopped_reason=stopped.message if stopped else None,
        output=str(config.output_path),
        dry_run=config.dry_run,
        in_doubt_resent=prepared.in_doubt if sender is not None else 0,
        auth_form=sending.auth_form,
    )
    if sending.looker is not None:
        summary.changes = dict(sending.looker.changes)
    if config.dry_run:
        skipped = 0 if config.write_always else _unchanged(sending)
        would_write = recorder.reasons["dry_run"] - skipped
        rate = sending.rate or config.rate or float(DEFAULT_WRITE_PER_SECOND)
        summary.rate_limit = rate
        summary.expected_write_seconds = round(max(would_write, 0) / rate, 1)
    if sending.verify is not None:
        summary.verified = sending.verify["checked"]
        summary.verify_differs = sending.verify["differs"]
    if sender is not None:
        stats = sender.stats
        summary.reads = stats.reads
        summary.requests = stats.requests
        summary.rate_limited = stats.rate_limited
        achieved = stats.achieved_rate()
        summary.achieved_rate = round(achieved, 3) if achieved else None
        if stats.latencies:
            from allo_batch.send import percentile_ms

            ordered = sorted(stats.latencies)
            summary.latency_p50_ms = percentile_ms(ordered, 0.5)
            summary.latency_p95_ms = percentile_ms(ordered, 0.95)
    if stopped is not None:
        summary.exit_code = int(stopped.exit_code)
    else:
        summary.exit_code = exit_code_for(summary.by_status, deferred=recorder.deferred)
    return summary


def check_input(config: JobConfig, *, show: int = 5) -> InputCheck:
    """Read and validate ``config.input`` as a run would, sending nothing."""
    if not isinstance(config.input, ObjectUri):
        return _check_input(config, show, None)
    with scratch_folder(config.state_dir) as spool:
        return _check_input(config, show, spool)


def _check_input(config: JobConfig, show: int, spool: Path | None) -> InputCheck:
    """One pass when no target repeats (most inputs): each row is checked as it is read, and
    its target hashed. Only when a hash repeats are the rows involved compared, and the input
    checked again with its duplicates known."""
    source = open_input(
        config.input, config.format, config.columns, storage=config.storage_options, spool=spool
    )
    found, wanted, targets = _check_rows(config, source, show, no_duplicates())
    duplicates = _duplicates(source, config.batch_size, targets)
    if duplicates.frame.height:
        found, wanted, _ = _check_rows(config, source, show, duplicates)
    # People look for a line in the file, not a record number: where each shown row starts.
    found.lines = line_numbers(source, wanted)
    return found


def _check_rows(
    config: JobConfig, source: InputSource, show: int, duplicates: Duplicates
) -> tuple[InputCheck, dict[int, str | None], Targets]:
    """Every row checked: the counts, the rows to show (with their ids) and the targets."""
    found = InputCheck(cast(Path, config.input))  # an object shows its URI
    wanted: dict[int, str | None] = {}
    targets = Targets()
    for batch in read_ahead(iter_batches(source, config.batch_size)):
        checked = validate_batch(batch, duplicates)
        targets.add(checked, checked=True)
        found.rows += checked.height
        found.repeats += int(checked[REPEAT_OF].is_not_null().sum())
        invalid = checked.filter(checked[CODE].is_not_null()).select(
            "row", "call_id", CODE, MESSAGE
        )
        for row, call_id, code, message in invalid.iter_rows():
            found.codes[code] = found.codes.get(code, 0) + 1
            shown = found.examples.setdefault(code, [])
            if len(shown) < show:
                shown.append((row, message))
                wanted[row] = call_id
    found.invalid = sum(found.codes.values())
    return found, wanted, targets


def preview_input(
    config: JobConfig,
    output: Path,
    *,
    show: int = 5,
    html: Path | None = None,
    transport: Any = None,
) -> Preview:
    """``allo-batch diff``: read every valid row's target and say what a run would change.

    Writes the preview file (``preview.preview_schema``), sends nothing, keeps the first
    ``show`` changed rows for their diffs (with ``html``, the first ``PAGE_ROWS`` at least).
    ``html``, the page the caller writes after, is only checked here, with the preview file,
    before anything is read: neither may replace the input or a run's result file.
    """
    if isinstance(config.input, Path):
        refuse_to_overwrite("--output", output, {"the input": config.input})
        if html is not None:
            keep = {"the input": config.input, "the preview file": output}
            refuse_to_overwrite("--html", html, keep)
    kept = show if html is None else max(show, PAGE_ROWS)
    return anyio.run(partial(_preview, config, output, kept, transport))


async def _preview(config: JobConfig, output: Path, show: int, transport: Any) -> Preview:
    from allo_batch.budget import SharedBudget, budget_key_id
    from allo_batch.client import AlloClient, make_http_client
    from allo_batch.send import Sender

    output_format(output)
    _check_not_the_input(dataclasses.replace(config, output=output))
    _make_folder(output.parent)
    check_base_url(config.base_url)
    if config.api_key is None:
        msg = "diff reads the current summaries: set ALLO_API_KEY or pass --api-key-file"
        raise UsageError(msg)
    source = open_input(config.input, config.format, config.columns)
    _identity, duplicates = await anyio.to_thread.run_sync(survey, source, config.batch_size)
    prepared = _Prepared(source, _identity, duplicates, _no_done(), 0)
    found = Preview(str(output))
    writer = OrderedResults(output, preview_schema())
    async with make_http_client(timeout=config.timeout, transport=transport) as http:
        client = AlloClient(http, config.base_url, config.api_key, auth=config.auth)
        checked = await _preflight(client, config, needs=(READ_SCOPE,), interactive=True)
        if checked.refusal is not None:
            raise checked.refusal
        budget = SharedBudget(
            budget_key_id(config.base_url, config.api_key.reveal()),
            checked.rate,
            jitter=config.jitter_margin,
        )
        sender = Sender(
            client,
            budget,
            _NoOutcomes(),
            policy=config.retry,
        )
        looker = Looker(
            lambda ids: sender.read_items(ids, lane=0),
            CallFacts(set(), set()),
            settle=lambda result: None,
            keep=lambda items: None,
            dry_run=True,
        )
        try:
            async for item in _preview_items(prepared, config, looker):
                _preview_row(item, found, writer, show)
        except ReadStoppedError:
            pass  # the sender's stop error says why, below
        except ReadFailedError as error:
            sender.stop(ApiUnavailableError(str(error)))
        except BaseException:
            writer.abandon()
            raise
        finally:
            budget.close()
        if sender.stop_error is not None:
            writer.abandon()
            raise sender.stop_error
    writer.finish()
    found.reads = looker.reads
    return found


class _NoOutcomes:
    """A preview sends nothing, so nothing is reported."""

    def sending(self, request: PlannedRequest, request_id: str) -> None:
        """Never called."""

    def finished(self, result: RowResult) -> None:
        """Never called."""


def _no_done() -> pl.DataFrame:
    import polars as pl

    return pl.DataFrame(
        schema={
            "call_id": pl.String,
            "template_key": pl.String,
            "content_sha256": pl.String,
            "version": pl.Int64,
            "updated_at": pl.String,
            "request_id": pl.String,
        }
    )


async def _preview_items(
    prepared: _Prepared, config: JobConfig, looker: Looker
) -> AsyncIterator[RowResult | Looked]:
    """Planned rows in input order: settled ones as they are, requests after their read."""
    batches = prepared.planned_rows(config)
    while True:
        items = await anyio.to_thread.run_sync(next, batches, None)
        if items is None:
            return
        pending: list[PlannedRequest] = []
        for item in items:
            if isinstance(item, RowResult):
                yield item
            else:
                pending.append(item)
        for start in range(0, len(pending), MAX_BATCH_IDS):
            for looked in await looker.looked(pending[start : start + MAX_BATCH_IDS]):
                yield looked


def _preview_row(
    item: RowResult | Looked, found: Preview, writer: OrderedResults, show: int
) -> None:
    if isinstance(item, RowResult):
        change = "repeat" if item.reason == "repeat" else "invalid"
        found.count(change)
        writer.add_row(
            item.row, (item.row, item.call_id, item.template_key, change, None, None, None, None)
        )
        return
    request = item.request
    after = str(json.loads(request.body)["content"])
    before = item.current.content
    change = item.change
    found.count(change)
    writer.add_row(
        request.row,
        (
            request.row,
            request.call_id,
            request.template_key,
            change,
            len(before) if before is not None else None,
            len(after),
            similarity(before, after),
            item.certain,
        ),
    )
    if change == "changed" and before is not None and len(found.shown) < show:
        found.shown.append(
            Change(request.row, request.call_id, request.template_key, before, after)
        )
