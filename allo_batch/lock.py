"""One run per output at a time: an advisory ``flock`` on ``<output>.lock``.

The kernel drops a ``flock`` when its holder dies, ``kill -9`` included, so a lock file left by a
dead run is simply taken over: there is no stale pid to guess about. The file's text (pid, host,
start time) only serves the message a refused run prints. After taking the lock the path is
checked to still name the locked file, so a run that unlinks it on release cannot let two others
in at once. Local filesystems only: ``flock`` on NFS is not reliable.

Other commands' outputs (previews, pages) are kept off an output and its state here too
(:func:`refuse_to_overwrite`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from allo_batch.errors import LockedError, UsageError
from allo_batch.record import journal_path, sidecar_path

log = logging.getLogger("allo_batch")

_ATTEMPTS = 5


def lock_path(output: Path) -> Path:
    """Where the lock of ``output`` lives."""
    return output.with_name(output.name + ".lock")


class OutputLock:
    """Hold ``<output>.lock`` for the duration of a run (a context manager)."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.path = lock_path(output)
        self._fd: int | None = None
        self.took_over: dict[str, object] | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`LockedError` naming the run that holds it."""
        for _ in range(_ATTEMPTS):
            fd = _open_lock_file(self.path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise LockedError(_refusal(self.output, holder)) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # released and unlinked by its holder meanwhile: try the new one
        else:
            msg = f"{self.path}: the lock file keeps changing; is another run starting?"
            raise LockedError(msg)
        previous = _read_holder(fd)
        if previous.get("pid"):
            self.took_over = previous
            log.warning(
                "took over the lock of %s left by pid %s on %s (that run is gone)",
                self.output,
                previous.get("pid"),
                previous.get("host", "?"),
            )
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode() + b"\n", 0)
        os.fchmod(fd, 0o600)
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file and drop the lock (in that order; see the module doc)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if _same_file(self._fd, self.path):
                self.path.unlink()
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _read_holder(fd: int) -> dict[str, object]:
    try:
        raw = os.pread(fd, 4096, 0)
        value = json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _refusal(output: Path, holder: dict[str, object]) -> str:
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
    since = f", started {holder['started']}" if holder.get("started") else ""
    return (
        f"another allo-batch run ({who}{since}) is writing {output}; "
        "wait for it to finish or stop it, then run again"
    )


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _open_lock_file(path: Path) -> int:
    """Open (or create) the lock file owner-only and never through a symbolic link, whose
    target would otherwise be truncated."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if path.is_symlink():
            msg = f"{path}: is a symbolic link; allo-batch does not write through links"
        else:
            msg = f"{path}: cannot open the lock file ({exc.strerror})"
        raise UsageError(msg) from None


def refuse_to_overwrite(option: str, dest: Path, keep: Mapping[str, Path | None]) -> None:
    """Exit 2, before anything is written, when ``dest`` would replace a file that must be
    kept: one of ``keep`` (what it is → its path: an input, a result file), the run facts or
    journal of a result file among them, or any run's result file (its run facts or journal
    beside it): each holds what landed, or what a rerun needs."""
    kept: dict[str, Path] = {}
    for what, path in keep.items():
        if path is not None:
            kept[what] = path
            kept[f"{what}'s run facts"] = sidecar_path(path)
            kept[f"{what}'s journal"] = journal_path(path)
    for what, path in kept.items():
        if _same_path(dest, path):
            raise UsageError(f"{option} {dest}: that is {what}; name a new file")
    for state in (sidecar_path(dest), journal_path(dest)):
        if state.exists():
            msg = f"{option} {dest}: that is a run's result file ({state.name} is beside it)"
            raise UsageError(f"{msg}; name a new file")
    for state_of, what in ((sidecar_path, "run facts"), (journal_path, "journal")):
        suffix = state_of(Path("_")).name[1:]
        base = dest.with_name(dest.name.removesuffix(suffix))
        if base != dest and dest.exists() and base.exists():
            raise UsageError(f"{option} {dest}: that is the {what} of {base}; name a new file")


def _same_path(one: Path, other: Path) -> bool:
    if one.resolve() == other.resolve():
        return True
    try:
        return one.exists() and other.exists() and one.samefile(other)
    except OSError:
        return False
