"""One budget per key: every allo-batch process on this machine that uses a key shares its pacing
(DESIGN §5, "one key, one budget").

The pacer's whole state (:class:`~allo_batch.ratelimit.BudgetState`: the next evenly spaced
slot, the permits counted per window, the pause, the slow-down, what the answers taught about the
server's windows and clock) lives in one small file per key. Every acquire and every answer is
a transaction on it under ``flock``, so N processes together send at the key's limit, not N
times it, and each learns at once what the others learned (a 429's pause, windows proved fixed).
Processes that cannot see the file (on other machines) still meet through the rate-limit
headers: the pacer counts what they use from ``Remaining`` and leaves it to them.

Where: ``$XDG_RUNTIME_DIR/allo-batch/`` (a per-user tmpfs on systemd machines), else
``<tmp>/allo-batch-<uid>/``. The directory is 0700 and the files 0600, both must belong to
this user, and neither may be a symlink (``O_NOFOLLOW``; the file is opened relative to the
directory's descriptor), so another local user can neither read a key's use nor steer it. A file
is named by a hash of the API base URL and key: never the key itself, and a sandbox on another
port with the same key gets a budget of its own. When the state cannot be opened safely, the
run goes on with a budget of its own and says so once in the log.

The state is a fixed-size binary record, read and written whole with ``pread``/``pwrite``
(about 10 KB, microseconds per transaction). No fsync: on a crash the state is lost, which
only means relearning the windows for a second.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import math
import os
import re
import stat
import struct
import tempfile
import time
import weakref
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import anyio

from allo_batch.ratelimit import (
    HISTOGRAM_BUCKETS,
    KEPT_WINDOWS,
    RECENT_GRANTS,
    BudgetState,
    Histogram,
    Pacer,
    RecentGrants,
    Sleep,
    Store,
    WindowCount,
)

T = TypeVar("T")
log = logging.getLogger(__name__)

_KEY_ID = re.compile(r"[0-9a-f]{16,64}")
_MAGIC = b"allobgt5"
_CORE = struct.Struct("<8sddddBdiiddddddddd qi")
_WINDOW = struct.Struct("<qiiiiB")
_HISTOGRAM = array("I").itemsize * HISTOGRAM_BUCKETS  # the counts, in this machine's byte order
_RECENT = array("d").itemsize * RECENT_GRANTS  # the last permit times, padded with zeros
_SIZE = _CORE.size + KEPT_WINDOWS * _WINDOW.size + _HISTOGRAM + _RECENT
_HISTOGRAM_AT = _CORE.size + KEPT_WINDOWS * _WINDOW.size
_RECENT_AT = _HISTOGRAM_AT + _HISTOGRAM
_LOCK_WAIT = 0.5  # a holder keeps the lock for microseconds; this long means it is stopped
_WEDGED_FOR = 5.0  # ... and the lock is not waited for again this long, unless it comes free


class BudgetStateError(OSError):
    """The shared state cannot be used safely (wrong owner, permissions, a symlink)."""


def budget_key_id(base_url: str, api_key: str) -> str:
    """The name of a key's shared budget: a hash of the API's base URL and the key."""
    material = f"allo-batch budget\0{base_url.rstrip('/')}\0{api_key}".encode()
    return hashlib.sha256(material).hexdigest()[:32]


def budget_file_name(key_id: str) -> str:
    """The state file's name. The record's format is in it: a run of an older allo-batch on
    the same key keeps a file of its own (and meets this one through the headers, as runs on
    two machines do) rather than each taking the other's record for garbage and starting
    afresh, over and over."""
    return f"{key_id}.{_MAGIC[-2:].decode()}.budget"


def state_directory() -> Path:
    """Where budgets are shared: the user's runtime directory, else a private temp folder."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_absolute():
        return Path(runtime) / "allo-batch"
    return Path(tempfile.gettempdir()) / f"allo-batch-{os.getuid()}"


class FileStore:
    """A budget's state in a file that every process using the key opens; see the module."""

    def __init__(self, directory: Path, key_id: str) -> None:
        if not _KEY_ID.fullmatch(key_id):
            msg = "a budget's key_id is a hex hash of the key (budget_key_id), never the key"
            raise ValueError(msg)
        self.path = directory / budget_file_name(key_id)
        folder = _open_private_directory(directory)
        try:
            self._fd = _open_private_file(folder, self.path.name)
        finally:
            os.close(folder)
        self.contended = 0
        self._wedged_until = 0.0
        self._state: BudgetState | None = None
        self._written = b""
        self._finalizer = weakref.finalize(self, os.close, self._fd)

    def update(self, change: Callable[[BudgetState], T]) -> T:
        """Read the state, apply ``change``, write it back: all under the file's lock."""
        if not self._finalizer.alive:  # closed: never touch a descriptor number reused since
            self._state = self._state or BudgetState()
            return change(self._state)
        locked = self._lock()
        try:
            data = os.pread(self._fd, _SIZE, 0)
            # Nobody wrote since we did (the usual case): what we hold is what the file says.
            if data != self._written or self._state is None:
                self._state = decode(data) or BudgetState()
            try:
                result = change(self._state)
            except BaseException:
                self._state = None  # half changed: read the file again next time
                raise
            self._written = encode(self._state)
            os.pwrite(self._fd, self._written, 0)
            return result
        finally:
            if locked:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close the file (the state stays for the other processes)."""
        self._finalizer()

    def _lock(self) -> bool:
        """Take the lock. A holder keeps it for microseconds, but one that the OS or its own
        interpreter deschedules keeps it for tens of milliseconds on a loaded machine, and a
        transaction that went on without the lock then would undo the holder's (two permits
        allotted one slot: a 429). So wait up to half a second. Only a holder stopped by a
        debugger or SIGSTOP keeps it longer; it must not stop every run on the key, so past
        that this transaction goes on unlocked, and so do the next ones without waiting, until
        the lock is free again."""
        now = time.monotonic()
        deadline = now + (0.0 if now < self._wedged_until else _LOCK_WAIT)
        pause = 0.0001
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                now = time.monotonic()
                if now >= deadline:
                    self.contended += 1
                    self._wedged_until = max(self._wedged_until, now + _WEDGED_FOR)
                    return False
                time.sleep(pause)
                pause = min(pause * 2, 0.005)
            else:
                self._wedged_until = 0.0
                return True


def _open_private_directory(directory: Path) -> int:
    """Open (making it if needed) a directory only this user can use; refuse anything else."""
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700, parents=True)
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(directory, flags)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            msg = f"{directory} is a symlink or not a directory"
            raise BudgetStateError(msg) from exc
        raise
    try:
        _check_private(fd, directory, 0o700)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_private_file(folder: int, name: str) -> int:
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, 0o600, dir_fd=folder)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            msg = f"the budget file {name} is a symlink"
            raise BudgetStateError(msg) from exc
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            msg = f"the budget file {name} is not a regular file"
            raise BudgetStateError(msg)
        _check_private(fd, Path(name), 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_private(fd: int, where: Path, mode: int) -> None:
    """Ours, and closed to others (tightened if we own it: a umask may have widened it)."""
    info = os.fstat(fd)
    if info.st_uid != os.getuid():
        msg = f"{where} belongs to another user (uid {info.st_uid})"
        raise BudgetStateError(msg)
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.fchmod(fd, mode)


def encode(state: BudgetState) -> bytes:
    """The state as the file's fixed-size record."""
    core = _CORE.pack(
        _MAGIC,
        state.factor,
        state.adjusted,
        state.paused_until,
        state.tat,
        state.fixed,
        state.violated_at,
        state.limit,
        state.size,
        state.lo_date,
        state.lo_reset,
        state.hi,
        state.delay,
        state.counted_since,
        state.others_rate,
        state.others_at,
        state.spread,
        state.seen,
        state.histogram.head,
        len(state.recent.times),
    )
    kept = sorted(state.windows.items())[-KEPT_WINDOWS:]
    slots = [
        (w, c.used, c.answered, -1 if c.low is None else c.low, c.foreign, c.complete)
        for w, c in kept
    ]
    slots += [(0, 0, 0, 0, 0, False)] * (KEPT_WINDOWS - len(slots))
    windows = b"".join(_WINDOW.pack(*slot) for slot in slots)
    recent = state.recent.times.tobytes().ljust(_RECENT, b"\0")
    return core + windows + state.histogram.counts.tobytes() + recent


def decode(data: bytes) -> BudgetState | None:
    """The state in a record, or None for an empty, short or foreign file."""
    if len(data) != _SIZE or not data.startswith(_MAGIC):
        return None
    values = _CORE.unpack_from(data)
    state = BudgetState(
        factor=values[1],
        adjusted=values[2],
        paused_until=values[3],
        tat=values[4],
        fixed=bool(values[5]),
        violated_at=values[6],
        limit=values[7],
        size=values[8],
        lo_date=values[9],
        lo_reset=values[10],
        hi=values[11],
        delay=values[12],
        counted_since=values[13],
        others_rate=values[14],
        others_at=values[15],
        spread=values[16],
        seen=values[17],
        histogram=Histogram(values[18], array("I", data[_HISTOGRAM_AT:_RECENT_AT])),
        recent=_recent(data, values[19]),
    )
    for slot in range(KEPT_WINDOWS):
        window, used, answered, low, foreign, complete = _WINDOW.unpack_from(
            data, _CORE.size + slot * _WINDOW.size
        )
        if window:
            low_or_none = None if low < 0 else low
            state.windows[window] = WindowCount(
                used, answered, low_or_none, foreign, bool(complete)
            )
    if not all(math.isfinite(x) for x in (state.factor, state.tat, state.paused_until)):
        return None
    return state


def _recent(data: bytes, kept: int) -> RecentGrants:
    times = array("d", data[_RECENT_AT:])
    del times[min(max(kept, 0), RECENT_GRANTS) :]
    # In order and finite: another process's write makes every transaction decode, so this is
    # one sort in C (about 20 µs for 1024 times, where a Python loop took 60). A NaN makes the
    # arrays differ, and an ordered array is finite if its ends are.
    in_order = times == array("d", sorted(times))
    finite = not times or (math.isfinite(times[0]) and math.isfinite(times[-1]))
    if not (in_order and finite):
        return RecentGrants()  # a damaged record: forget the permits rather than misread them
    return RecentGrants(times)


class SharedBudget(Pacer):
    """A :class:`~allo_batch.ratelimit.Pacer` whose state every process using the key shares.

    ``key_id`` comes from :func:`budget_key_id`. ``rate`` is the key's whole write budget per
    second and ``jitter`` the margin for evenly spaced permits (rule 11). ``share=False`` (or a
    state that cannot be opened safely) gives a budget of this process alone.
    """

    def __init__(
        self,
        key_id: str,
        rate: float,
        *,
        jitter: float = 0.02,
        state_dir: Path | None = None,
        share: bool = True,
        clock: Callable[[], float] = time.time,
        sleep: Sleep = anyio.sleep,
    ) -> None:
        if not _KEY_ID.fullmatch(key_id):
            msg = "a budget's key_id is a hex hash of the key (budget_key_id), never the key"
            raise ValueError(msg)
        store: Store | None = None
        self.state_path: Path | None = None
        if share:
            directory = state_dir or state_directory()
            try:
                opened = FileStore(directory, key_id)
            except OSError as exc:
                log.warning("the key's budget is not shared with other runs: %s", exc)
            else:
                store, self.state_path = opened, opened.path
        super().__init__(rate, jitter=jitter, clock=clock, sleep=sleep, store=store)

    @property
    def shared(self) -> bool:
        """Whether other processes on this machine share this budget."""
        return self.state_path is not None
