"""Object storage: inputs, result files, sidecars and before-images in a bucket (DESIGN §9).

Every store goes through fsspec's filesystems (s3fs for ``s3://``, its HTTP filesystem for
``https://`` inputs, gcsfs for ``gs://`` and adlfs for ``az://`` where installed): no request to
a store is written by hand. Credentials and the endpoint come from each store's own chain
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``,
``AWS_PROFILE`` and the config files, instance roles), so an S3-compatible store needs no flag;
``--storage-option KEY=VALUE`` passes anything else to the filesystem. No credential is ever
written to a message, a log line or a file of ours: only the store's error code and a short
reason, scrubbed of every secret the environment or the options hold.

- **Inputs** are copied to a local spool file first (streamed, 8 MB at a time), then read by the
  same readers as a local file. A run reads its input three times (fingerprint, duplicates,
  send); the copy makes that one download, and makes the rows sent exactly the rows that were
  fingerprinted even if the object is replaced meanwhile. It costs local disk the size of the
  input, in the state folder, removed when the run ends.
- **Outputs** cannot be appended to, so the journal, and the result file as it grows, stay in a
  local state folder (:func:`state_root`: ``--state-dir``, else ``$XDG_STATE_HOME/allo-batch``,
  else ``~/.local/state/allo-batch``; one owner-only subfolder per output URI). The result file
  and its sidecar are uploaded whole (one PUT, or a multipart upload that appears at its
  completion: a reader never sees half of one) at checkpoints and at the end; before-images
  within a second of being written (record.py, :class:`~allo_batch.record.Recorder`).
- **The lock** is an object, ``<output>.lock``, created only if absent (``If-None-Match: *``),
  renewed every 15 s by compare-and-swap (``If-Match`` on its ETag) and taken over, again by
  compare-and-swap, once its holder is gone: dead on this host, or silent for 90 s. On stores
  other than S3 the same rules are kept as far as fsspec's ``mode="create"`` goes (best effort).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

from allo_batch.errors import AlloBatchError, InputError, LockedError, RunStoppedError, UsageError

log = logging.getLogger("allo_batch")

# The scheme, and the package whose fsspec filesystem serves it (None: fsspec's own, or s3fs's
# dependencies).
SCHEMES: Final[dict[str, str | None]] = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
    "http": None,
    "https": None,
}
_READ_ONLY: Final = ("http", "https")
_CONDITIONAL: Final = ("s3", "s3a")  # If-None-Match and If-Match on writes, proven with moto
_URI: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_COPY_BLOCK: Final = 8 << 20
LOCK_HEARTBEAT: Final = 15.0
LOCK_STALE: Final = 90.0
# Option names that hold a credential: refused, since a command line shows in `ps` and a job
# file ends up in a repository; the stores' own chains are the place for them.
_SECRET_OPTION: Final = re.compile(
    r"secret|password|passwd|token|credential|account_key|sas|connection_string|^key$", re.I
)
_SECRET_ENV: Final = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_CLIENT_SECRET",
)
_REASON_CHARS: Final = 160


class StorageError(UsageError):
    """The store refused or failed a request before anything was sent (exit 2)."""


class UploadError(RunStoppedError):
    """The run ended but its result file could not be uploaded (exit 3; a rerun uploads)."""


# -- locations ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ObjectUri:
    """An object in a store, ``scheme://bucket/key``. ``str()`` shows it without what may be
    secret (user info, a query string such as a presigned URL's signature)."""

    uri: str

    def __post_init__(self) -> None:
        parts = urlsplit(self.uri)
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            msg = (
                f"{self}: unsupported scheme {scheme}://; use s3://, gs://, az://, or https:// "
                "for an input"
            )
            raise UsageError(msg)
        if not parts.hostname or not parts.path.strip("/") or parts.path.endswith("/"):
            msg = f"{self}: name an object, as {scheme}://BUCKET/KEY"
            raise UsageError(msg)

    @property
    def scheme(self) -> str:
        """``s3``, ``gs``, ``az``, ``https``..."""
        return urlsplit(self.uri).scheme.lower()

    @property
    def read_only(self) -> bool:
        """Whether the store can only be read (plain https)."""
        return self.scheme in _READ_ONLY

    @property
    def _key(self) -> PurePosixPath:
        return PurePosixPath(urlsplit(self.uri).path)

    @property
    def name(self) -> str:
        """The object's name, after the last ``/``."""
        return self._key.name

    @property
    def suffix(self) -> str:
        """The name's extension, as ``Path.suffix``."""
        return self._key.suffix

    @property
    def stem(self) -> str:
        """The name without its extension, as ``Path.stem``."""
        return self._key.stem

    def with_name(self, name: str) -> ObjectUri:
        """Another object in the same folder (``name`` may hold ``/``: a subfolder)."""
        parts = urlsplit(self.uri)
        folder = parts.path[: parts.path.rfind("/") + 1]
        return ObjectUri(urlunsplit((parts.scheme, parts.netloc, folder + name, "", "")))

    def __str__(self) -> str:
        parts = urlsplit(self.uri)
        host = parts.hostname or ""
        if parts.port is not None:
            host += f":{parts.port}"
        shown = urlunsplit((parts.scheme, host, parts.path, "", ""))
        return shown + ("?…" if parts.query else "")

    def __repr__(self) -> str:
        return f"ObjectUri({str(self)!r})"


Location = Path | ObjectUri


def location(value: str | os.PathLike[str] | ObjectUri) -> Location:
    """A local path, or an object when ``value`` starts with a scheme (``s3://...``)."""
    if isinstance(value, ObjectUri):
        return value
    text = value if isinstance(value, str) else os.fspath(value)
    found = _URI.match(text)
    if found is None:
        return Path(text)
    if found.group(1).lower() == "file":
        return Path(urlsplit(text).path)
    return ObjectUri(text)


def is_remote(value: object) -> bool:
    """Whether ``value`` is an object in a store."""
    return isinstance(value, ObjectUri)


# -- options -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StorageOptions:
    """``--storage-option KEY=VALUE`` pairs (a dotted key is a nested one:
    ``client_kwargs.region_name``). ``repr`` shows the keys only."""

    items: tuple[tuple[str, str | bool | int | float], ...] = ()

    def __repr__(self) -> str:
        return f"StorageOptions({', '.join(key for key, _ in self.items)})"

    def __bool__(self) -> bool:
        return bool(self.items)

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of the filesystem."""
        found: dict[str, Any] = {}
        for key, value in self.items:
            *outer, last = key.split(".")
            place = found
            for part in outer:
                place = place.setdefault(part, {})
            place[last] = value
        return found

    def over(self, fallback: StorageOptions) -> StorageOptions:
        """These options, with ``fallback``'s keys that these do not give."""
        mine = {key for key, _ in self.items}
        return StorageOptions(
            tuple(item for item in fallback.items if item[0] not in mine) + self.items
        )

    @classmethod
    def parse(cls, pairs: Iterable[str], where: str = "--storage-option") -> StorageOptions:
        """From ``KEY=VALUE`` strings: ``true``/``false`` become booleans and whole numbers
        integers; everything else stays text."""
        items: list[tuple[str, str | bool | int | float]] = []
        for pair in pairs:
            key, sep, text = pair.partition("=")
            key = key.strip()
            if not sep or not re.fullmatch(
                r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key
            ):
                msg = f"{where} {key or pair[:40]!r}: use KEY=VALUE, e.g. endpoint_url=https://..."
                raise UsageError(msg)
            _refuse_secret(key, where)
            value: str | bool | int | float = text
            if text.lower() in ("true", "false"):
                value = text.lower() == "true"
            elif re.fullmatch(r"-?\d{1,18}", text):
                value = int(text)
            items.append((key, value))
        return cls(tuple(items))

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], where: str) -> StorageOptions:
        """From a job spec's ``storage_options`` table (nested tables are dotted keys)."""
        items: list[tuple[str, str | bool | int | float]] = []

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, Mapping):
                for key, inner in value.items():
                    walk(f"{prefix}.{key}" if prefix else str(key), inner)
                return
            _refuse_secret(prefix, where)
            if not isinstance(value, str | bool | int | float):
                msg = f"{where}.{prefix}: expected a string, a boolean or a number"
                raise UsageError(msg)
            items.append((prefix, value))

        walk("", table)
        return cls(tuple(items))


def _refuse_secret(key: str, where: str) -> None:
    if _SECRET_OPTION.search(key.rsplit(".", 1)[-1]):
        msg = (
            f"{where} {key}: credentials never go on a command line or in a job file; they "
            "come from the store's own chain (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, an instance role; GOOGLE_APPLICATION_CREDENTIALS; AZURE_STORAGE_*)"
        )
        raise UsageError(msg)


# -- the state folder --------------------------------------------------------------------------


def state_root(given: Path | None = None) -> Path:
    """Where allo-batch keeps the local state of outputs in a store: ``given`` (``--state-dir``),
    else ``$XDG_STATE_HOME/allo-batch``, else ``~/.local/state/allo-batch``."""
    if given is not None:
        return given.expanduser()
    xdg = os.environ.get("XDG_STATE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "state"
    return base / "allo-batch"


def work_folder(root: Path, output: ObjectUri) -> Path:
    """The owner-only folder of ``output``'s local state: ``<root>/outputs/<hash of the URI>``,
    with an ``output.txt`` that names the URI for a person looking."""
    folder = root / "outputs" / hashlib.sha256(output.uri.encode()).hexdigest()[:24]
    _private_folder(folder, root)
    with contextlib.suppress(OSError):
        fd = os.open(folder / "output.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as note:
            note.write(f"{output}\n")
    return folder


def _private_folder(folder: Path, root: Path) -> None:
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for part in (root, *reversed(folder.relative_to(root).parents), folder):
            path = part if part.is_absolute() else root / part
            if path.is_symlink():
                msg = f"{path}: is a symbolic link; allo-batch does not write through links"
                raise UsageError(msg)
            os.chmod(path, 0o700)
    except OSError as exc:
        msg = f"{folder}: cannot make the state folder ({exc.strerror}); use --state-dir"
        raise UsageError(msg) from None


# -- the store ---------------------------------------------------------------------------------


class Store:
    """One store's fsspec filesystem, opened with the standard chain and the given options."""

    def __init__(self, uri: ObjectUri, options: StorageOptions) -> None:
        self.uri = uri
        self.options = options
        self.conditional = uri.scheme in _CONDITIONAL
        try:
            from fsspec.core import url_to_fs
        except ImportError:
            msg = (
                f"{uri}: object storage needs the storage extra: pip install 'allo-batch[storage]'"
            )
            raise UsageError(msg) from None
        try:
            # A fresh filesystem: fsspec's cache would keep credentials read before a change.
            self.fs, _ = url_to_fs(uri.uri, skip_instance_cache=True, **options.kwargs())
        except ImportError:
            package = SCHEMES.get(uri.scheme) or "aiohttp"
            msg = f"{uri}: {uri.scheme}:// needs {package}: pip install {package}"
            raise UsageError(msg) from None
        except (TypeError, ValueError) as exc:
            msg = f"{uri}: the {uri.scheme} filesystem refused the storage options: {_reason(exc)}"
            raise UsageError(msg) from None

    def path(self, uri: ObjectUri) -> str:
        """The filesystem's own name of ``uri``."""
        return str(self.fs._strip_protocol(uri.uri))

    def exists(self, uri: ObjectUri) -> bool:
        """Whether the object exists (a missing bucket is an error, not a no)."""
        try:
            self.fs.info(self.path(uri))
        except FileNotFoundError as exc:
            if _bucket_missing(exc):
                raise failure(exc, uri, "read it") from None
            return False
        except Exception as exc:
            raise failure(exc, uri, "read it") from None
        return True

    def download(self, uri: ObjectUri, dest: Path) -> None:
        """Copy the object to ``dest`` (owner-only, whole or not at all), 8 MB at a time."""
        temp = dest.with_name(f".{dest.name}.download")
        try:
            with self.fs.open(self.path(uri), "rb", block_size=_COPY_BLOCK) as source:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as sink:
                    while block := source.read(_COPY_BLOCK):
                        sink.write(block)
            os.replace(temp, dest)
        except Exception as exc:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise failure(exc, uri, "read it") from None

    def upload(self, local: Path, uri: ObjectUri) -> None:
        """Write ``local`` to the object whole: one PUT, or a multipart upload that appears
        only at its completion."""
        # S3: one PUT up to 32 MB, else 16 MB parts two at a time (s3fs' defaults hold 100 MB).
        sizes = {"chunksize": 16 << 20, "max_concurrency": 2} if self.conditional else {}
        try:
            self.fs.put_file(str(local), self.path(uri), **sizes)
        except Exception as exc:
            raise failure(exc, uri, "write it") from None

    def delete(self, uri: ObjectUri) -> None:
        """Remove the object; a missing one is no error."""
        try:
            self.fs.rm_file(self.path(uri))
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise failure(exc, uri, "delete it") from None

    def names(self, folder: ObjectUri) -> list[str]:
        """The names of the objects under ``folder/``."""
        try:
            listed = self.fs.ls(self.path(folder), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise failure(exc, folder, "list it") from None
        return [PurePosixPath(str(name)).name for name in listed]

    def read(self, uri: ObjectUri) -> tuple[bytes, str | None, float | None] | None:
        """A small object's bytes, ETag and age in seconds (by the store's clock of its last
        write), or None when it does not exist."""
        path = self.path(uri)
        try:
            info = self.fs.info(path, refresh=True)
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise failure(exc, uri, "read it") from None
        modified = info.get("LastModified") or info.get("last_modified") or info.get("mtime")
        stamp = getattr(modified, "timestamp", None)
        age = time.time() - stamp() if callable(stamp) else None
        return bytes(data), info.get("ETag") or info.get("etag"), age

    def create(self, uri: ObjectUri, data: bytes) -> str | None:
        """Write the object only if it does not exist (``FileExistsError`` if it does); its
        ETag when the store says it."""
        try:
            answer = self.fs.pipe_file(self.path(uri), data, mode="create")
        except FileExistsError:
            raise
        except Exception as exc:
            raise failure(exc, uri, "create it") from None
        return _etag(answer)

    def replace(self, uri: ObjectUri, data: bytes, etag: str | None) -> str | None:
        """Overwrite the object only if it still has ``etag`` (:class:`_ChangedError` if
        not); its new ETag. Without conditional writes: an unconditional overwrite."""
        extra = {"IfMatch": etag} if self.conditional and etag else {}
        try:
            answer = self.fs.pipe_file(self.path(uri), data, **extra)
        except OSError as exc:
            if _precondition_failed(exc):
                raise _ChangedError from None
            raise failure(exc, uri, "write it") from None
        except Exception as exc:
            raise failure(exc, uri, "write it") from None
        return _etag(answer)


class _ChangedError(Exception):
    """A compare-and-swap found the object changed."""


def _etag(answer: object) -> str | None:
    if isinstance(answer, dict):
        value = answer.get("ETag")
        return str(value) if value else None
    return None


def _precondition_failed(exc: OSError) -> bool:
    return exc.errno == 22 or "pre-condition" in str(exc).lower() or "412" in str(exc)


def _bucket_missing(exc: BaseException) -> bool:
    text = str(exc)
    return "specified bucket does not exist" in text or "NoSuchBucket" in text


def failure(exc: BaseException, uri: ObjectUri, doing: str) -> AlloBatchError:
    """One line for a store's error: what failed and a scrubbed reason, never a credential."""
    name = type(exc).__name__
    if isinstance(exc, FileNotFoundError):
        what = "no such bucket" if _bucket_missing(exc) else "no such object"
        return InputError(f"{uri}: {what}")
    if isinstance(exc, PermissionError) or "AccessDenied" in name:
        return StorageError(
            f"{uri}: the store refused to let allo-batch {doing} ({_reason(exc)}); check the "
            "credentials it was given (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, an instance role) and the bucket's permissions"
        )
    if "NoCredentials" in name or "PartialCredentials" in name:
        return StorageError(
            f"{uri}: no credentials for the store: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY or AWS_PROFILE, or run where an instance role applies"
        )
    if "Connect" in name or "Endpoint" in name or isinstance(exc, ConnectionError | TimeoutError):
        return StorageError(f"{uri}: cannot reach the store ({_reason(exc)})")
    return StorageError(f"{uri}: cannot {doing} ({_reason(exc)})")


def _reason(exc: BaseException) -> str:
    """The library's message in one short line, every known secret value replaced."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"(https?://[^\s?'\"]*)\?[^\s'\"]*", r"\1?…", text)  # presigned signatures
    for name in _SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return "".join(ch if ch.isprintable() else " " for ch in text[:_REASON_CHARS])


# -- inputs ------------------------------------------------------------------------------------


def matching_objects(pattern: ObjectUri, options: StorageOptions) -> list[ObjectUri]:
    """The objects a job's ``input`` names, as a local path's glob would: those whose key
    matches ``*``, ``?`` or ``[...]``, in name order, or the object itself; none when nothing
    matches (the job's ``if_no_input`` then decides). A plain https:// input is taken as
    named: it can be neither listed nor, reliably, asked whether it exists."""
    import glob

    if pattern.read_only:
        return [pattern]
    store = Store(pattern, options)
    if not glob.has_magic(pattern.uri):
        return [pattern] if store.exists(pattern) else []
    try:
        found = store.fs.glob(store.path(pattern))
    except FileNotFoundError as exc:
        if _bucket_missing(exc):
            raise failure(exc, pattern, "list it") from None
        return []
    except Exception as exc:
        raise failure(exc, pattern, "list it") from None
    return sorted(
        (ObjectUri(f"{pattern.scheme}://{name}") for name in found if not str(name).endswith("/")),
        key=lambda uri: uri.uri,
    )


def download_input(uri: ObjectUri, options: StorageOptions, folder: Path) -> Path:
    """The input copied into ``folder`` (see the module doc: one download, a stable copy)."""
    store = Store(uri, options)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    dest = folder / (uri.name or "input")
    store.download(uri, dest)
    return dest


@contextlib.contextmanager
def scratch_folder(root: Path | None = None) -> Iterator[Path]:
    """An owner-only temporary folder under the state folder (removed on the way out), named
    after this process: those of processes gone (``kill -9``) are removed first, since they
    hold copies of inputs, customer content."""
    base = state_root(root) / "spool"
    try:
        _private_folder(base, state_root(root))
    except UsageError:
        base = Path(tempfile.gettempdir())
    _remove_abandoned_scratch(base)
    with tempfile.TemporaryDirectory(prefix=f"allo-batch-{os.getpid()}-", dir=base) as name:
        yield Path(name)


_SCRATCH: Final = re.compile(r"allo-batch-(\d+)-\w+")


def _remove_abandoned_scratch(base: Path) -> None:
    """Remove the scratch folders in ``base`` of processes no longer running."""
    for folder in base.glob("allo-batch-*-*"):
        found = _SCRATCH.fullmatch(folder.name)
        if found is None or not folder.is_dir() or folder.is_symlink():
            continue
        try:
            os.kill(int(found.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (PermissionError, OverflowError):
            continue  # alive as another user's, or no pid at all: not ours to judge


@contextlib.contextmanager
def local_copies(
    locations: list[Location], options: StorageOptions, root: Path | None = None
) -> Iterator[list[Path]]:
    """Local files for ``locations`` (``run --sandbox`` seeds its world from them): paths as
    they are, objects downloaded to a scratch folder; one that cannot be read is left out (the
    run itself says why)."""
    if not any(isinstance(found, ObjectUri) for found in locations):
        yield [found for found in locations if isinstance(found, Path)]
        return
    with scratch_folder(root) as folder:
        paths = []
        for index, found in enumerate(locations):
            if isinstance(found, Path):
                paths.append(found)
                continue
            with contextlib.suppress(AlloBatchError):
                paths.append(download_input(found, options, folder / str(index)))
        yield paths


# -- the output lock ---------------------------------------------------------------------------


class RemoteLock:
    """``<output>.lock`` in the store, held for a run (see the module doc for the rules)."""

    def __init__(self, store: Store, output: ObjectUri) -> None:
        self.store = store
        self.output = output
        self.uri = output.with_name(output.name + ".lock")
        self.took_over: dict[str, Any] | None = None
        self.lost: str | None = None
        self._etag: str | None = None
        self._token = secrets.token_hex(8)
        self._started = _now()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": self._started,
            "heartbeat": _now(),
            "token": self._token,
        }
        return json.dumps(me).encode() + b"\n"

    def acquire(self) -> None:
        """Take the lock or raise :class:`LockedError` naming the run that holds it."""
        for _ in range(5):
            try:
                self._etag = self.store.create(self.uri, self._body())
            except FileExistsError:
                pass
            else:
                if self._confirmed():
                    self._start_heartbeat()
                    return
                continue
            found = self.store.read(self.uri)
            if found is None:
                continue  # released meanwhile: try again
            data, etag, age = found
            holder = _holder(data)
            if not _abandoned(holder, age):
                raise LockedError(_refusal(self.output, holder, age))
            try:
                self._etag = self.store.replace(self.uri, self._body(), etag)
            except _ChangedError:
                continue  # another run took it over first: look again
            if not self._confirmed():
                continue
            self.took_over = holder
            log.warning(
                "took over the lock of %s left by pid %s on %s (that run is gone)",
                self.output,
                holder.get("pid", "?"),
                holder.get("host", "?"),
            )
            self._start_heartbeat()
            return
        msg = f"{self.uri}: the lock keeps changing; is another run starting?"
        raise LockedError(msg)

    def _confirmed(self) -> bool:
        """With conditional writes the store already decided; without, read it back."""
        if self.store.conditional:
            return True
        found = self.store.read(self.uri)
        return found is not None and _holder(found[0]).get("token") == self._token

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="allo-batch-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        renewed = time.monotonic()
        warned = False
        while not self._stop.wait(LOCK_HEARTBEAT):
            try:
                if not self.store.conditional and not self._confirmed():
                    raise _ChangedError
                self._etag = self.store.replace(self.uri, self._body(), self._etag)
                renewed = time.monotonic()
            except _ChangedError:
                self.lost = f"another run took over the lock {self.uri} of {self.output}"
                return
            except AlloBatchError as error:
                if time.monotonic() - renewed > LOCK_STALE:
                    self.lost = f"could not renew the lock {self.uri} for {LOCK_STALE:.0f} s"
                    return
                if not warned:
                    log.warning("cannot renew the lock (will retry): %s", error)
                    warned = True

    def release(self) -> None:
        """Stop renewing and remove the lock object, unless another run holds it now."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self.lost is not None:
            return
        with contextlib.suppress(AlloBatchError):
            found = self.store.read(self.uri)
            if found is not None and _holder(found[0]).get("token") == self._token:
                self.store.delete(self.uri)


def _holder(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _abandoned(holder: dict[str, Any], age: float | None) -> bool:
    """Dead on this host, or silent past the staleness limit."""
    if age is not None and age > LOCK_STALE:
        return True
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int) and pid > 0:
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
    return not holder  # an unreadable lock object: nobody can renew it


def _refusal(output: ObjectUri, holder: dict[str, Any], age: float | None) -> str:
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
    since = f", started {holder['started']}" if holder.get("started") else ""
    beat = f", renewed {age:.0f} s ago" if age is not None else ""
    return (
        f"another allo-batch run ({who}{since}{beat}) is writing {output}; wait for it to "
        f"finish or stop it, then run again (a lock not renewed for {LOCK_STALE:.0f} s is "
        "taken over)"
    )


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# -- outputs -----------------------------------------------------------------------------------


class RemoteOutput:
    """A result file in a store, worked on in its local state folder: the lock, the download
    of what earlier runs left, and the uploads (the :class:`~allo_batch.record.Mirror` that
    the recorder checkpoints through)."""

    def __init__(self, output: ObjectUri, options: StorageOptions, root: Path | None) -> None:
        if output.read_only:
            msg = (
                f"--output {output}: {output.scheme}:// can only be read; write the results to "
                "s3://, gs://, az:// or a local file"
            )
            raise UsageError(msg)
        self.output = output
        self.store = Store(output, options)
        self.folder = work_folder(state_root(root), output)
        self.local = self.folder / output.name
        self.spool = self.folder / "spool"
        self.lock = RemoteLock(self.store, output)

    def remote(self, local: Path) -> ObjectUri:
        """The object that mirrors ``local``, a file in the state folder."""
        return self.output.with_name(local.relative_to(self.folder).as_posix())

    def open(self) -> None:
        """Take the lock and bring in the result file and sidecar earlier runs left."""
        self.lock.acquire()
        try:
            shutil.rmtree(self.spool, ignore_errors=True)
            self._pull()
        except BaseException:
            self.lock.release()
            raise

    def _pull(self) -> None:
        """The bucket's result file and sidecar replace the local ones (another machine may
        have run since). Without a result file in the bucket, the local ones stay only beside a
        journal (a run here that never uploaded); else they are gone from the bucket, so
        from here too."""
        sidecar = self.local.with_name(self.local.name + ".run.json")
        if not self.store.exists(self.output):
            if not self.local.with_name(self.local.name + ".journal").exists():
                self.local.unlink(missing_ok=True)
                sidecar.unlink(missing_ok=True)
            return
        self.store.download(self.output, self.local)
        if self.store.exists(self.remote(sidecar)):
            self.store.download(self.remote(sidecar), sidecar)
            self._check_pair(sidecar)
        else:
            sidecar.unlink(missing_ok=True)

    def _check_pair(self, sidecar: Path) -> None:
        """Say so when the sidecar names another result file than the one in the store: a run
        was killed between the sidecar's upload and its result file's (see record.py)."""
        try:
            named = json.loads(sidecar.read_text()).get("result_sha256")
        except (OSError, ValueError, AttributeError):
            return
        if isinstance(named, str) and named != file_sha256(self.local):
            log.warning(
                "%s names a result file that is not the one in the store: a run stopped between "
                "the two uploads. Resuming from the result file there; rows that landed after "
                "it are read (or written) again",
                self.remote(sidecar),
            )

    def put(self, local: Path, target: Path | None = None) -> None:
        """Upload ``local`` whole to the object that mirrors ``target`` (default: itself)."""
        self.store.upload(local, self.remote(target or local))

    def delete(self, local: Path) -> None:
        """Remove the object that mirrored ``local``."""
        self.store.delete(self.remote(local))

    def names(self, local_folder: Path) -> list[str]:
        """The objects in the folder that mirrors ``local_folder``."""
        return self.store.names(self.remote(local_folder))

    def problem(self) -> AlloBatchError | None:
        """Why the run must stop: the lock was lost."""
        if self.lock.lost is None:
            return None
        return LockedError(f"{self.lock.lost}; stopping so that two runs never write at once")

    def close(self) -> None:
        """Release the lock and drop the spooled input."""
        self.lock.release()
        shutil.rmtree(self.spool, ignore_errors=True)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read a block at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_COPY_BLOCK):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Place:
    """Where a run writes: the local result file it builds (the output itself, or its copy in
    the state folder), for an output in a store the store's side, and where an input in a
    store is copied to."""

    local: Path
    remote: RemoteOutput | None = None
    spool: Path | None = None


@contextlib.contextmanager
def output_place(
    output: Location,
    options: StorageOptions,
    root: Path | None,
    *,
    remote_input: bool = False,
) -> Iterator[Place]:
    """Hold the output for a run: for an object, the lock and the local state folder (see
    :class:`RemoteOutput`); for a local file nothing, but a scratch folder for an input in a
    store."""
    if isinstance(output, Path):
        if not remote_input:
            yield Place(output)
            return
        with scratch_folder(root) as spool:
            yield Place(output, spool=spool)
        return
    remote = RemoteOutput(output, options, root)
    remote.open()
    try:
        yield Place(remote.local, remote, remote.spool)
    finally:
        remote.close()
