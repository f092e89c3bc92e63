"""Looking before writing (DESIGN §8): what each target holds before a run changes it.

Reads are cheap (one batch read of up to 100 ids), writes are not (5/s per key), so every row
about to be written is first matched with its call's current ``summary``:

- a row whose target already holds exactly its content, **with certainty**, is ``unchanged``;
- every other row gets a **before-image** (the content it replaces) that the recorder makes
  durable before the row's PATCH is sent.

**When a read counts as certain for a row.** A read shows one ``summary`` per call, not per
template (allo-api.md §7). A row without ``template_key`` addresses the call's only completed
summary (the API refuses it otherwise), so the read is certain for it, unless the call is known
to have two (this input names a template for the same call, or an answer said
``SUMMARY_TEMPLATE_KEY_REQUIRED``). A row naming a template is certain only when the call is
known to have a single completed summary (an earlier PATCH of it without ``template_key``
landed). Anything else is uncertain: the row is written whatever the read showed, and its
before-image is marked uncertain (``undo`` leaves it alone unless told otherwise).

The batch reader is transport-agnostic: it gets a ``read`` callable (ids → an answer with
``items``) and survives every order, duplicates, omitted ids and a whole-request refusal for an
unknown id (it splits the batch in halves to find it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from allo_batch.constants import MAX_BATCH_IDS, Code
from allo_batch.models import NO_TEMPLATE, PlannedRequest, RowResult, content_sha256

Found = Literal["summary", "no_summary", "not_found"]
_SPLIT_CODES: Final = (Code.CONVERSATION_ITEM_NOT_FOUND, Code.INVALID_ITEM_ID)


class ReadAnswer(Protocol):
    """What the look stage needs of a batch read's answer (``client.Answer`` has it)."""

    @property
    def kind(self) -> str: ...

    @property
    def http_status(self) -> int | None: ...

    @property
    def error_code(self) -> str | None: ...

    @property
    def items(self) -> tuple[dict[str, Any], ...] | None: ...


Read = Callable[[Sequence[str]], Awaitable[ReadAnswer]]


class ReadStoppedError(Exception):
    """The run stopped while a read waited: its rows are left to the sender's stop."""


class ReadFailedError(Exception):
    """A batch read kept failing (not a 404 for an unknown id): the caller decides."""

    def __init__(self, answer: ReadAnswer) -> None:
        super().__init__(f"batch read failed: {answer.error_code} (HTTP {answer.http_status})")
        self.answer = answer


@dataclass(frozen=True, slots=True)
class Current:
    """What a read showed for one call."""

    found: Found
    content: str | None = None

    @property
    def sha256(self) -> str | None:
        """The hash of the content shown, in the result file's form."""
        return content_sha256(self.content) if self.content is not None else None


async def read_current(read: Read, call_ids: Iterable[str]) -> dict[str, Current]:
    """The current summary of each call, by batch reads of at most 100 ids.

    Ids the API leaves out are ``not_found``. A whole-request 404/400 (an API that refuses the
    batch for one unknown id) is narrowed down by halves, costing about log2(100) extra reads
    per unknown id; any other failure raises :class:`ReadFailedError`.
    """
    unique = list(dict.fromkeys(call_ids))
    found: dict[str, Current] = {}
    for start in range(0, len(unique), MAX_BATCH_IDS):
        await _read_into(read, unique[start : start + MAX_BATCH_IDS], found)
    return found


async def _read_into(read: Read, ids: list[str], found: dict[str, Current]) -> None:
    answer = await read(ids)
    if answer.kind == "ok" and answer.items is not None:
        shown: dict[str, dict[str, Any]] = {}
        for item in answer.items:
            shown.setdefault(item["id"], item)  # the first of any duplicates
        for call_id in ids:
            found[call_id] = _current(shown.get(call_id))
        return
    if answer.http_status in (400, 404) and answer.error_code in _SPLIT_CODES:
        if len(ids) == 1:
            found[ids[0]] = Current("not_found")
            return
        middle = len(ids) // 2
        await _read_into(read, ids[:middle], found)
        await _read_into(read, ids[middle:], found)
        return
    raise ReadFailedError(answer)


def _current(item: dict[str, Any] | None) -> Current:
    if item is None:
        return Current("not_found")
    summary = item.get("summary")
    if isinstance(summary, str):
        return Current("summary", summary)
    return Current("no_summary")


@dataclass(slots=True)
class CallFacts:
    """What the run knows of calls' completed templates, beyond what reads show."""

    two_templates: set[str]  # calls known to have two completed summaries
    one_template: set[str]  # calls known to have exactly one

    def certain(self, request: PlannedRequest) -> bool:
        """Whether a read of the call shows this row's target (see the module doc)."""
        if request.template_key is None:
            return request.call_id not in self.two_templates
        return request.call_id in self.one_template

    def learn(self, result: RowResult) -> None:
        """Take in an answer: a landed PATCH without template proves a single summary; a
        refusal for want of a template proves two."""
        if result.call_id is None:
            return
        if result.error_code == Code.SUMMARY_TEMPLATE_KEY_REQUIRED:
            self.two_templates.add(result.call_id)
            self.one_template.discard(result.call_id)
        elif result.status == "updated" and result.template_key is None:
            self.one_template.add(result.call_id)


@dataclass(frozen=True, slots=True)
class Looked:
    """One planned request after the look: to send (with its before-image) or unchanged."""

    request: PlannedRequest
    current: Current
    certain: bool

    @property
    def change(self) -> str:
        """What writing the row would do: unchanged, changed, not_found or no_summary."""
        if self.current.found != "summary":
            return self.current.found
        return "unchanged" if self.current.sha256 == self.request.content_sha256 else "changed"

    @property
    def already_right(self) -> bool:
        """The target holds exactly this content, and the read surely shows the target."""
        return self.certain and self.current.sha256 == self.request.content_sha256

    def before_image(self) -> dict[str, Any]:
        """The row's before-image, as the recorder keeps it."""
        request = self.request
        return {
            "row": request.row,
            "call_id": request.call_id,
            "template_key": request.template_key,
            "found": self.current.found,
            "content": self.current.content,
            "content_sha256": self.current.sha256,
            "written_sha256": request.content_sha256,
            "certain": self.certain,
        }

    def unchanged(self) -> RowResult:
        """The row's result when nothing needs writing."""
        request = self.request
        return request.result(
            "unchanged",
            message="the target already holds this content; not written",
            reason="already_right",
        )

    def unverifiable(self) -> RowResult:
        """A row with an expectation whose read cannot be tied to its template."""
        return self.request.result(
            "conflict",
            message=(
                "expected_sha256 cannot be checked: a read shows one summary of a call with "
                "two, maybe not this template's; left alone (undo --force, or the row without "
                "expected_sha256, writes it)"
            ),
            reason="uncertain",
        )

    def conflict(self, expected: str) -> RowResult:
        """The target no longer holds what it was expected to (an undo after an edit)."""
        request = self.request
        return request.result(
            "conflict",
            message=(
                "the target no longer holds the expected content "
                f"({'now ' + (self.current.sha256 or 'empty')[:12]} vs {expected[:12]}); "
                "left alone (undo --force, or the row without expected_sha256, writes it)"
            ),
            reason="changed_since",
        )


def look(
    requests: Sequence[PlannedRequest], current: dict[str, Current], facts: CallFacts
) -> list[Looked]:
    """Pair each request with what its call holds now, and whether that read is certain."""
    return [
        Looked(request, current.get(request.call_id, Current("not_found")), facts.certain(request))
        for request in requests
    ]


def target_key(call_id: str, template_key: str | None) -> tuple[str, str]:
    """A row's target, as the done index and the before-images key it."""
    return call_id, template_key or NO_TEMPLATE


class Looker:
    """The look stage as a task: takes planned requests, reads their calls (100 ids a read),
    settles rows that need no write, makes the others' before-images durable, then hands
    them on to the sender, in chunks, so reads run ahead of the writes in bounded memory."""

    def __init__(
        self,
        read: Read,
        facts: CallFacts,
        *,
        settle: Callable[[RowResult], None],
        keep: Callable[[list[Looked]], None],
        write_always: bool = False,
        dry_run: bool = False,
        stopping: Callable[[], bool] = lambda: False,
        failed: Callable[[str], None] | None = None,
    ) -> None:
        self._read = read
        self.facts = facts
        self._settle = settle
        self._keep = keep
        self._write_always = write_always
        self._dry_run = dry_run
        self._stopping = stopping
        self._failed = failed
        self.reads = 0
        self.changes: dict[str, int] = {}

    async def counted_read(self, ids: Sequence[str]) -> ReadAnswer:
        """One batch read, counted."""
        self.reads += 1
        return await self._read(ids)

    async def run(
        self,
        incoming: MemoryObjectReceiveStream[PlannedRequest],
        outgoing: MemoryObjectSendStream[PlannedRequest],
    ) -> None:
        """Until ``incoming`` ends: a chunk of up to 100 calls at a time."""
        async with incoming, outgoing:
            while True:
                chunk = await _next_chunk(incoming)
                if not chunk:
                    return
                # Once the run stops the sender turns every row into not_sent: no reads.
                ready = chunk if self._stopping() else await self.look_at(chunk)
                for request in ready:
                    await outgoing.send(request)

    async def looked(self, chunk: list[PlannedRequest]) -> list[Looked]:
        """Read ``chunk``'s calls and pair each row with what its call holds (no decision)."""
        current = await read_current(self.counted_read, (r.call_id for r in chunk))
        _learn_from_chunk(self.facts, chunk)
        return look(chunk, current, self.facts)

    async def look_at(self, chunk: list[PlannedRequest]) -> list[PlannedRequest]:
        """Read ``chunk``'s calls; settle what needs no write; return what must be sent,
        its before-images already kept."""
        try:
            current = await read_current(self.counted_read, (r.call_id for r in chunk))
        except ReadStoppedError:
            return chunk
        except ReadFailedError as error:
            if self._failed is None:
                raise
            self._failed(str(error))  # the run stops: these rows go on to become not_sent
            return chunk
        _learn_from_chunk(self.facts, chunk)
        looked = look(chunk, current, self.facts)
        to_send: list[Looked] = []
        for item in looked:
            change = item.change
            self.changes[change] = self.changes.get(change, 0) + 1
            expected = item.request.expected_sha256  # normalized by validation
            # A target that already holds this row's content is no conflict: an undo resumed
            # after its restore landed in flight finds exactly that.
            holds_it = item.current.sha256 == item.request.content_sha256
            if expected is not None and not item.certain:
                # The read may show another template's summary: it can neither prove nor
                # disprove the expectation, and a guess either way is a lost update.
                self._settle(item.unverifiable())
            elif expected is not None and item.current.sha256 != expected and not holds_it:
                self._settle(item.conflict(expected))
            elif self._dry_run:
                self._settle(dry_run_result(item.request, change))
            elif item.already_right and not self._write_always and expected is None:
                # A compare-and-set row (an undo) is written even when the read shows its
                # content: a lagging read may show the before-image while the target still
                # holds the run's write, and a repeated PATCH costs one write, nothing more.
                self._settle(item.unchanged())
            else:
                to_send.append(item)
        self._keep(to_send)
        return [item.request for item in to_send]


def _learn_from_chunk(facts: CallFacts, chunk: list[PlannedRequest]) -> None:
    """Rows of one call naming a template say the call has templates: a row of the same call
    without one can no longer count its read as certain."""
    templated = {r.call_id for r in chunk if r.template_key is not None}
    facts.two_templates.update(
        r.call_id for r in chunk if r.template_key is None and r.call_id in templated
    )


async def _next_chunk(incoming: MemoryObjectReceiveStream[PlannedRequest]) -> list[PlannedRequest]:
    """The next requests waiting (at least one, unless the stream ended), up to 100 calls."""
    import anyio

    try:
        chunk = [await incoming.receive()]
    except anyio.EndOfStream:
        return []
    calls = {chunk[0].call_id}
    while True:
        try:
            request = incoming.receive_nowait()
        except (anyio.WouldBlock, anyio.EndOfStream):
            return chunk
        chunk.append(request)
        calls.add(request.call_id)
        if len(calls) >= MAX_BATCH_IDS:
            return chunk


_DRY_MESSAGES: Final = {
    "changed": "dry run: would change the summary",
    "unchanged": "dry run: the target already holds this content",
    "no_summary": "dry run: the call has no summary yet",
    "not_found": "dry run: the call was not found",
}


def dry_run_result(request: PlannedRequest, change: str | None = None) -> RowResult:
    """What a dry run records for a row it would send (``change``: what a read showed)."""
    return request.result(
        "not_sent",
        retryable=True,
        message=_DRY_MESSAGES.get(change or "", "dry run: would be sent"),
        reason="dry_run",
    )
