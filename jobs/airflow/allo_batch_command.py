"""The ``allo-batch run`` command line of one task of ``allo_batch_dag.py``, and its checks.

A trigger conf is written by whoever may trigger the DAG, not by whoever owns the API key, so
nothing in it may become an option of ``allo-batch run``: an ``input`` of
``--base-url=http://elsewhere`` would otherwise send the key to that host. Hence:

- the conf may hold only ``job``, ``input`` and ``output``, and never a base URL;
- ``job`` is the plain name of a ``.toml`` file in the jobs folder (a spec names where the key
  is read from and may name a base URL, so only the folder's owner chooses specs);
- ``input`` and ``output`` are absolute paths or object-store URIs, never starting with ``-``
  and without control characters; ``output`` goes in as ``--output=VALUE`` and ``input`` after
  ``--``, where click reads only positional arguments;
- the base URL is decided here, from the Airflow connection or else the worker's
  ``ALLO_BASE_URL``, and passed as ``--base-url=URL``, which nothing later can override.

No Airflow import here: the project's tests load this file on its own, without Airflow
installed. Copy it into the DAGs folder beside ``allo_batch_dag.py``, which imports it.
"""

from __future__ import annotations

import re
import tomllib
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

CONF_KEYS = ("job", "input", "output")
OBJECT_STORES = ("s3://", "gs://", "az://")
DEFAULT_KEY_VARIABLE = "ALLO_API_KEY"

# Characters of a refused value shown in its error: enough to recognise a spec's name or a typo,
# too few to copy a long hostile value (or a secret pasted by mistake) into the task log.
_SHOWN = 20
# Words that mark a conf key as an attempt to choose the API host ("base_url", "ALLO_BASE_URL",
# "--base-url", "host", ...): refused with a message that says where the base URL comes from.
_BASE_URL_WORDS = ("url", "host", "endpoint")
# Unicode categories that can break or disguise a line in a log: C0/C1 controls, format
# characters (bidirectional overrides, zero-width), line and paragraph separators.
_HIDDEN = frozenset({"Cc", "Cf", "Zl", "Zp"})
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Variables a spec's api_key_env may not name: putting the key in them would change where
# requests go or how allo-batch and Python start.
_RESERVED_VARIABLES = frozenset({"ALLO_BASE_URL", "ALLO_BATCH_DS", "PATH", "HOME"})
_RESERVED_PREFIXES = ("PYTHON", "LD_", "DYLD_")


class ConfError(ValueError):
    """A refused trigger conf (or job spec): the message names the key, never the whole value."""


def shown(value: object) -> str:
    """A short, escaped prefix of ``value`` (its type for anything but a string)."""
    if not isinstance(value, str):
        return f"a value of type {type(value).__name__}"
    # ascii() escapes control, invisible and non-ASCII characters alike.
    return ascii(value[:_SHOWN]) + ("..." if len(value) > _SHOWN else "")


def _has_hidden(value: str) -> bool:
    return any(unicodedata.category(char) in _HIDDEN for char in value)


def check_conf_keys(conf: Mapping[str, object]) -> None:
    """Refuse a base URL and any key but ``job``, ``input`` and ``output``."""
    for key in conf:
        squeezed = re.sub(r"[^a-z]", "", str(key).lower())
        if any(word in squeezed for word in _BASE_URL_WORDS):
            msg = (
                f"trigger conf key {shown(key)}: the base URL comes only from the Airflow "
                "connection allo_api (or the worker's ALLO_BASE_URL), never from a trigger"
            )
            raise ConfError(msg)
        if key not in CONF_KEYS:
            msg = (
                f"trigger conf key {shown(key)}: unknown; a trigger may set {', '.join(CONF_KEYS)}"
            )
            raise ConfError(msg)


def job_spec(value: object, jobs: Path) -> Path:
    """The spec named by ``job``: a plain ``.toml`` file name of a file in ``jobs``."""
    if not isinstance(value, str) or not value:
        msg = f"trigger conf key 'job': must be a spec file name, not {shown(value)}"
        raise ConfError(msg)
    plain = "/" not in value and "\\" not in value and ".." not in value
    if not plain or not value.endswith(".toml") or _has_hidden(value):
        msg = (
            f"trigger conf key 'job': must be the file name of a .toml spec in the jobs folder "
            f"(no '/', no '..'), not {shown(value)}"
        )
        raise ConfError(msg)
    folder = jobs.resolve()
    spec = (folder / value).resolve()
    # resolve() follows links: a link in the folder that points elsewhere is not a spec in it.
    if spec.parent != folder or not spec.is_file():
        msg = f"trigger conf key 'job': no spec {shown(value)} in the jobs folder"
        raise ConfError(msg)
    return spec


def location(key: str, value: object) -> str | None:
    """``input`` or ``output`` when given: an absolute path or an object-store URI."""
    if value is None or value == "":  # a trigger form's empty field: the spec's own
        return None
    if not isinstance(value, str):
        msg = f"trigger conf key {key!r}: must be a string, not {shown(value)}"
        raise ConfError(msg)
    if _has_hidden(value):
        msg = f"trigger conf key {key!r}: control or invisible characters in {shown(value)}"
        raise ConfError(msg)
    store = next((prefix for prefix in OBJECT_STORES if value.startswith(prefix)), None)
    if store is not None:
        if len(value) == len(store):
            msg = f"trigger conf key {key!r}: {shown(value)} names no bucket"
            raise ConfError(msg)
        return value
    # "-..." is not absolute either; said apart because it is how an option would get in.
    if value.startswith("-"):
        msg = f"trigger conf key {key!r}: must not start with '-' ({shown(value)})"
        raise ConfError(msg)
    if not value.startswith("/"):
        msg = (
            f"trigger conf key {key!r}: must be an absolute path or an "
            f"{', '.join(OBJECT_STORES)} URI, not {shown(value)}"
        )
        raise ConfError(msg)
    return value


def key_variable(spec: Path) -> str:
    """The environment variable the spec reads the key from (``api_key_env``)."""
    try:
        with spec.open("rb") as handle:
            name = tomllib.load(handle).get("api_key_env", DEFAULT_KEY_VARIABLE)
    except (OSError, tomllib.TOMLDecodeError):
        return DEFAULT_KEY_VARIABLE  # allo-batch itself reports what is wrong with the spec
    if not isinstance(name, str):
        return DEFAULT_KEY_VARIABLE  # allo-batch refuses the spec, naming the key and its type
    reserved = name in _RESERVED_VARIABLES or name.startswith(_RESERVED_PREFIXES)
    if not _VARIABLE.fullmatch(name) or reserved:
        msg = f"job spec {spec.name}: api_key_env {shown(name)} is not a variable for the key"
        raise ConfError(msg)
    return name


def base_url(connection_url: str | None, environ: Mapping[str, str]) -> str | None:
    """The base URL to pass: the connection's, else the worker's ``ALLO_BASE_URL``, else none
    (then the spec's ``base_url`` or allo-batch's default applies)."""
    return connection_url or environ.get("ALLO_BASE_URL") or None


@dataclass(frozen=True)
class Request:
    """What a run was asked for, checked: the spec, and the input and output if given."""

    spec: Path
    input_path: str | None = None
    output: str | None = None


def checked_request(
    conf: Mapping[str, object], params: Mapping[str, object], jobs: Path
) -> Request:
    """Check a run's trigger conf and params.

    ``conf`` is the trigger's own (its keys are checked); ``params`` are the DAG's params with
    the conf merged in, whose values are the ones used, so they are the ones checked.
    """
    check_conf_keys(conf)
    return Request(
        spec=job_spec(params.get("job"), jobs),
        input_path=location("input", params.get("input")),
        output=location("output", params.get("output")),
    )


def command(allo_batch: str, request: Request, *, ds: str, base_url: str | None) -> list[str]:
    """The argument list. Every option carries its value after ``=`` (a value can never be read
    as an option of its own), and ``--`` ends the options before the input."""
    args = [allo_batch, "run", f"--job={request.spec}", f"--ds={ds}"]
    args += ["--json", "--log-format=json", "--no-progress"]
    if base_url:
        args.append(f"--base-url={base_url}")
    if request.output is not None:
        args.append(f"--output={request.output}")
    args.append("--")
    if request.input_path is not None:
        args.append(request.input_path)
    return args
