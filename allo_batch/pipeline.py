"""The one module that knows every stage: read → validate → plan → send → record → report."""

from __future__ import annotations

import logging
import signal
import statistics
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from allo_batch.config import JobConfig, Secret, check_base_url
from allo_batch.errors import (
    AlloBatchError,
    AuthRefusedError,
    InterruptedRunError,
    OutputConflictError,
    UsageError,
)
from allo_batch.lock import OutputLock
from allo_batch.models import KEY_FIELDS, PlannedRequest, RowResult, RunSummary
from allo_batch.plan import Planned, attach_done, plan_batch
from allo_batch.read import (
    Fingerprinter,
    InputFingerprint,
    InputSource,
    iter_batches,
    key_batches,
    open_input,
    shaped_batches,
)
from allo_batch.record import (
    Journal,
    OrderedResults,
    journal_path,
    load_earlier,
    output_format,
    write_sidecar,
)
from allo_batch.report import NullReporter, Reporter, exit_code_for
from allo_batch.validate import (
    Duplicates,
    find_duplicates,
    repeated_hashes,
    target_hashes,
    validate_batch,
)

if TYPE_CHECKING:
    import polars as pl

    from allo_batch.send import Sender

log = logging.getLogger("allo_batch")

_GRACE_SECONDS = 5.0
_TICK_SECONDS = 0.5
_FALLBACK_RATE = 5.0


@dataclass(slots=True)
class _Prepared:
    source: InputSource
    identity: InputFingerprint
    duplicates: Duplicates
    done: pl.DataFrame
    in_doubt: int

    @property
    def total(self) -> int:
        return self.identity.rows

    def planned_batches(self, config: JobConfig) -> Iterator[list[Planned]]:
        for batch in iter_batches(self.source, config.batch_size):
            checked = attach_done(validate_batch(batch, self.duplicates), self.done)
            yield list(plan_batch(checked, dry_run=config.dry_run, limit=config.limit))


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
    if not config.dry_run and config.sandbox is None:
        check_base_url(config.base_url)
        if config.api_key is None:
            msg = "no API key: set ALLO_API_KEY or pass --api-key-file (or use --sandbox)"
            raise UsageError(msg)
    with OutputLock(output):
        prepared = await anyio.to_thread.run_sync(_prepare, config, output)
        reporter = reporter or NullReporter()
        reporter.start(prepared.total)
        if config.dry_run:
            return await _execute(config, prepared, reporter, None, None, transport)
        if config.sandbox is not None:
            async with _embedded_sandbox(config, prepared.source) as (base_url, key):
                return await _execute(config, prepared, reporter, base_url, key, transport)
        return await _execute(
            config, prepared, reporter, config.base_url, config.api_key, transport
        )


def _prepare(config: JobConfig, output: Path) -> _Prepared:

    source = open_input(config.input, config.format, config.columns)
    identity, duplicates = survey(source, config.batch_size, config.limit)
    earlier = load_earlier(output)
    _check_same_input(output, identity, earlier.inputs, force=config.force)
    return _Prepared(source, identity, duplicates, earlier.done, earlier.in_doubt)


def survey(
    source: InputSource, batch_size: int, limit: int | None = None
) -> tuple[InputFingerprint, Duplicates]:
    """The input's fingerprint and its duplicate rows (of the first ``limit`` rows).

    One key-only pass gives the fingerprint and every row's target hash; a second pass, only
    when some hash repeats, reads the rows involved and compares them on the real strings.
    """
    prints = Fingerprinter(source.path)
    hashes = []
    for frame in key_batches(source, batch_size):
        prints.add(frame)
        hashes.append(target_hashes(frame))
    candidates = repeated_hashes(hashes)
    del hashes
    return prints.result(), find_duplicates(iter_batches(source, batch_size, limit), candidates)


def _check_same_input(
    output: Path, current: InputFingerprint, earlier: list[dict[str, Any]], *, force: bool
) -> None:
    """Refuse to merge results of a different input into ``output`` (unless ``--force``)."""
    for seen in earlier:
        if seen.get("keys_sha256") == current.keys_sha256:
            continue
        what = f"{seen.get('path', '?')} ({seen.get('rows', '?')} rows)"
        if force:
            log.warning(
                "--force: merging results for %s into %s, made from %s", current.path, output, what
            )
            return
        msg = (
            f"{output} holds results of another input: {what}; this input, {current.path} "
            f"({current.rows} rows), has different rows (call_id and template_key, in order). "
            "Use a new --output, or --force to merge into it (rows of the other input then "
            "drop out of the result file; what landed is still never resent)"
        )
        raise OutputConflictError(msg)


async def _execute(
    config: JobConfig,
    prepared: _Prepared,
    reporter: Reporter,
    base_url: str | None,
    api_key: Secret | None,
    transport: Any,
) -> RunSummary:
    started = time.monotonic()
    output = config.output_path
    counts: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    deferred = Counter[str]()  # not_sent by design (dry run, --limit), not by a failure
    writer = OrderedResults(output)
    journal = None if config.dry_run else Journal(journal_path(output))
    if journal is not None:
        journal.start(prepared.identity.as_dict())

    def emit(result: RowResult, *, planned: bool = False) -> None:
        if planned and result.status == "not_sent":
            deferred["rows"] += 1
        counts[result.status] += 1
        if result.error_code:
            codes[result.error_code] += 1
        if journal is not None and result.status in ("updated", "failed"):
            journal.result(result)
        writer.add(result)

    sender: Sender | None = None
    rate: float | None = None
    try:
        if config.dry_run or base_url is None or api_key is None:
            await _produce(prepared.planned_batches(config), emit, None, None)
        else:
            assert journal is not None
            sender, rate = await _send_all(
                config, prepared, emit, journal, (base_url, api_key), transport, reporter, counts
            )
    except BaseException:
        writer.abandon()
        if journal is not None:
            journal.close()
        raise
    finally:
        reporter.close()
    writer.finish()
    summary = _summarize(config, prepared, counts, codes, deferred["rows"], sender, rate, started)
    write_sidecar(output, {"input": prepared.identity.as_dict(), "summary": summary.as_dict()})
    if journal is not None:
        journal.close()
        # The result file and its sidecar now hold everything the journal had.
        journal_path(output).unlink(missing_ok=True)
    if sender is not None and sender.stop_error is not None:
        error = sender.stop_error
        error.summary = summary  # type: ignore[attr-defined]
        raise error
    return summary


async def _send_all(
    config: JobConfig,
    prepared: _Prepared,
    emit: Callable[[RowResult], None],
    journal: Journal,
    target: tuple[str, Secret],
    transport: Any,
    reporter: Reporter,
    counts: Counter[str],
) -> tuple[Sender, float]:
    from allo_batch.client import AlloClient, http_lanes, make_http_client
    from allo_batch.ratelimit import Pacer, WindowWatch
    from allo_batch.send import Sender

    # The worker count (one client each) comes from the rate, which /me tells: ask it first.
    async with make_http_client(timeout=config.timeout, transport=transport) as http:
        rate, refusal = await _preflight(AlloClient(http, *target), config)
    workers = config.workers(rate)
    async with http_lanes(workers=workers, timeout=config.timeout, transport=transport) as lanes:
        client = AlloClient(lanes, *target)
        pacer = Pacer(rate / (1.0 + config.jitter_margin))
        sender = Sender(
            client,
            pacer,
            WindowWatch(pacer),
            policy=config.retry,
            journal=journal,
            emit=emit,
            max_errors=config.max_errors,
            clock=time.monotonic,
        )
        if refusal is not None:
            sender.stop(refusal, grace=0)
        send, receive = anyio.create_memory_object_stream[PlannedRequest](workers * 4)
        async with anyio.create_task_group() as outer:
            outer.start_soon(_enforce_grace, sender)
            outer.start_soon(_tick, reporter, counts, sender, journal)
            if threading.current_thread() is threading.main_thread():
                outer.start_soon(_watch_signals, sender)
            async with anyio.create_task_group() as inner:
                inner.start_soon(sender.run, receive, workers)
                async with send:
                    await _produce(prepared.planned_batches(config), emit, send, sender)
            outer.cancel_scope.cancel()
        _tick_once(reporter, counts, sender)
    return sender, rate


async def _preflight(client: Any, config: JobConfig) -> tuple[float, AlloBatchError | None]:
    """Ask ``/me`` for the key's write limit and scopes before sending anything."""
    from allo_batch.constants import WRITE_SCOPE

    answer = await client.me()
    if answer.http_status in (401, 403):
        return config.rate or _FALLBACK_RATE, AuthRefusedError(
            f"the API refused the key: {answer.error_code} (HTTP {answer.http_status})"
        )
    data = answer.data if answer.kind == "ok" else None
    if data is None:
        return config.rate or _FALLBACK_RATE, None
    scopes = data.get("scopes")
    if isinstance(scopes, list) and WRITE_SCOPE not in scopes:
        return config.rate or _FALLBACK_RATE, AuthRefusedError(
            f"the key lacks the {WRITE_SCOPE} scope (it has: {', '.join(map(str, scopes))})"
        )
    limits = data.get("rate_limits")
    limit = limits.get("write_per_second") if isinstance(limits, dict) else None
    if config.rate:
        return config.rate, None
    if isinstance(limit, int | float) and limit > 0:
        return float(limit), None
    return _FALLBACK_RATE, None


async def _produce(
    batches: Iterator[list[Planned]],
    emit: Callable[..., None],
    send: Any,
    sender: Sender | None,
) -> None:
    """Walk the planned batches in order; results go to ``emit``, requests to the workers."""
    from allo_batch.send import not_sent

    while True:
        items = await anyio.to_thread.run_sync(next, batches, None)
        if items is None:
            return
        for item in items:
            if isinstance(item, RowResult):
                emit(item, planned=True)
            elif sender is None or sender.stopping:
                emit(not_sent(item, sender))
            else:
                try:
                    send.send_nowait(item)
                except anyio.WouldBlock:
                    await send.send(item)


async def _enforce_grace(sender: Sender) -> None:
    await sender.wait_stopping()
    await anyio.sleep(_GRACE_SECONDS)
    sender.cancel_in_flight()


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
                    sender.stop(InterruptedRunError(f"interrupted by {name}"), grace=_GRACE_SECONDS)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


async def _tick(reporter: Reporter, counts: Counter[str], sender: Sender, journal: Journal) -> None:
    """Progress, and the journal's fsync even when no answer arrives for a while."""
    while True:
        await anyio.sleep(_TICK_SECONDS)
        _tick_once(reporter, counts, sender)
        journal.sync()


def _tick_once(reporter: Reporter, counts: Counter[str], sender: Sender) -> None:
    reporter.update(sum(counts.values()), counts, sender.stats.achieved_rate())


@asynccontextmanager
async def _embedded_sandbox(
    config: JobConfig, source: InputSource
) -> AsyncIterator[tuple[str, Secret]]:
    """``run --sandbox``: a simulator on a free loopback port, seeded from the input."""
    try:
        import uvicorn  # noqa: F401

        from allo_batch import sandbox as sb
    except ImportError as exc:
        msg = "--sandbox needs the sandbox extra: pip install 'allo-batch[sandbox]'"
        raise UsageError(msg) from exc
    options = config.sandbox
    assert options is not None
    pairs = None
    if options.world_file is None and source.found:
        batches = await anyio.to_thread.run_sync(
            lambda: list(shaped_batches(source, config.batch_size, KEY_FIELDS))
        )
        pairs = [(c, t) for batch in batches for _, c, t in batch.iter_rows() if c is not None]
    try:
        world = sb.build_world(
            world_file=options.world_file,
            seed_pairs=pairs,
            api_key=sb.DEFAULT_SANDBOX_KEY,
            write_rate=options.write_rate,
        )
    except sb.WorldError as exc:
        raise UsageError(str(exc)) from exc
    async with sb.serve_sandbox(world, faults=options.faults, seed=options.seed) as running:
        yield running.base_url, Secret(running.api_key)


def _summarize(
    config: JobConfig,
    prepared: _Prepared,
    counts: Counter[str],
    codes: Counter[str],
    deferred: int,
    sender: Sender | None,
    rate: float | None,
    started: float,
) -> RunSummary:
    stopped = sender.stop_error if sender is not None else None
    summary = RunSummary(
        rows=sum(counts.values()),
        by_status=dict(counts),
        by_error_code=dict(codes),
        rate_limit=rate,
        elapsed_seconds=round(time.monotonic() - started, 3),
        stopped_reason=stopped.message if stopped else None,
        output=str(config.output_path),
        dry_run=config.dry_run,
        in_doubt_resent=prepared.in_doubt if sender is not None else 0,
    )
    if sender is not None:
        stats = sender.stats
        summary.requests = stats.requests
        summary.rate_limited = stats.rate_limited
        achieved = stats.achieved_rate()
        summary.achieved_rate = round(achieved, 3) if achieved else None
        if stats.latencies:
            ordered = sorted(stats.latencies)
            summary.latency_p50_ms = round(statistics.median(ordered) * 1000, 1)
            summary.latency_p95_ms = round(ordered[int(0.95 * (len(ordered) - 1))] * 1000, 1)
    if stopped is not None:
        summary.exit_code = int(stopped.exit_code)
    else:
        summary.exit_code = exit_code_for(summary.by_status, deferred=deferred)
    return summary
