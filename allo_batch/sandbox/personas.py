"""Switches for every behaviour the Allo docs leave UNKNOWN, and named personas combining them.

A client that passes its tests against one reading of the docs may still break against the
real API, which may have made the other choice. Each field of :class:`Behaviour` is one such
UNKNOWN of ``shared/reference/allo-api.md`` that changes what a client sees; a persona is a
named set of choices. ``documented`` is the default: the documented behaviour where the docs
speak, and the sandbox's long-standing choice where they are silent. ``secondhand`` and
``awkward`` take the other side of every switch between them, so a client tested against all
three has met every value of every switch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

AuthForm = Literal["prefixed", "bare", "both"]
Window = Literal["fixed", "sliding"]
Bucket = Literal["read", "write"]
RetryAfter = Literal["header", "body", "both"]
Gateway = Literal["html", "envelope"]
TwoTemplateRead = Literal["classic", "short", "latest"]
BatchOrder = Literal["input", "shuffled"]
BatchMissing = Literal["omit", "error"]
BatchDuplicates = Literal["once", "repeat"]
Idempotency = Literal["ignore", "honour", "refuse"]

# The values each switch can take (read_lag, any number of seconds >= 0, is checked apart).
SWITCH_VALUES: dict[str, tuple[object, ...]] = {
    "auth": ("prefixed", "bare", "both"),
    "window": ("fixed", "sliding"),
    "batch_bucket": ("read", "write"),
    "retry_after": ("header", "body", "both"),
    "retryable_500": (True, False, None),
    "gateway": ("html", "envelope"),
    "identical_bumps_version": (True, False),
    "two_template_read": ("classic", "short", "latest"),
    "batch_order": ("input", "shuffled"),
    "batch_missing": ("omit", "error"),
    "batch_duplicates": ("once", "repeat"),
    "idempotency": ("ignore", "honour", "refuse"),
}

CUSTOM = "custom"


class UnknownPersonaError(ValueError):
    """A persona name the sandbox does not know."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Behaviour:
    """One choice per UNKNOWN of the API that a client can observe (allo-api.md section in [])."""

    auth: AuthForm = "prefixed"
    """Accepted ``Authorization`` forms: ``Api-Key <key>``, a bare ``<key>``, or both [§3]."""
    window: Window = "fixed"
    """Rate-limit window: whole Unix seconds, or a true sliding 1.0 s window [§4]."""
    batch_bucket: Bucket = "write"
    """Which per-second budget the batch read (a POST) spends [§4, §7]."""
    retry_after: RetryAfter = "both"
    """Where a 429 says how long to wait: ``Retry-After``, ``retry_after_seconds``, both [§4]."""
    retryable_500: bool | None = True
    """``retryable`` in a 500 envelope; ``None`` leaves the flag out [§2]."""
    gateway: Gateway = "html"
    """Injected 502/503/504: a non-JSON page, or the v2 error envelope [§2]."""
    identical_bumps_version: bool = True
    """Whether a PATCH with the current content still bumps ``version`` [§1]."""
    read_lag: float = 0.0
    """Seconds by which reads (GET item, batch) trail the writes [§7]."""
    two_template_read: TwoTemplateRead = "classic"
    """Which template's text a read's ``summary`` shows when a call has two [§7]."""
    batch_order: BatchOrder = "input"
    """Batch result order: the order of ``ids``, or a seeded shuffle [§7]."""
    batch_missing: BatchMissing = "omit"
    """Unknown or bad-prefix ids in a batch: left out, or the whole request refused [§7]."""
    batch_duplicates: BatchDuplicates = "repeat"
    """A repeated id in a batch: one item per occurrence, or only once [§7]."""
    idempotency: Idempotency = "ignore"
    """``Idempotency-Key`` on the PATCH: ignored, honoured for an hour, or refused [§5]."""

    def __post_init__(self) -> None:
        # Literal types are not checked at run time; a typo in a custom behaviour would
        # otherwise silently select some default branch.
        for name, allowed in SWITCH_VALUES.items():
            value = getattr(self, name)
            if not any(value is option or value == option for option in allowed):
                choices = ", ".join(repr(option) for option in allowed)
                msg = f"behaviour {name}={value!r}: choose one of {choices}"
                raise ValueError(msg)
        if not self.read_lag >= 0.0:
            msg = f"behaviour read_lag={self.read_lag!r}: must be a number of seconds >= 0"
            raise ValueError(msg)

    def as_dict(self) -> dict[str, Any]:
        """Every switch and its value, JSON-ready (for ``GET /_sandbox/state``)."""
        return asdict(self)


DOCUMENTED = Behaviour()

PERSONAS: dict[str, Behaviour] = {
    "documented": DOCUMENTED,
    # What the second-hand sources suggest: the endpoint pages' bare-key curl samples, the
    # unverified idempotency convention, the batch read billed as the read it is.
    "secondhand": Behaviour(
        auth="bare",
        window="sliding",
        batch_bucket="read",
        retry_after="header",
        retryable_500=False,
        gateway="envelope",
        identical_bumps_version=False,
        read_lag=0.5,
        two_template_read="short",
        batch_order="shuffled",
        batch_missing="error",
        batch_duplicates="once",
        idempotency="honour",
    ),
    # An API that is hard on clients: says as little as it can about retries, refuses the
    # Idempotency-Key header, and lets reads trail writes by more than a second.
    "awkward": Behaviour(
        auth="both",
        window="sliding",
        batch_bucket="read",
        retry_after="body",
        retryable_500=None,
        gateway="envelope",
        identical_bumps_version=False,
        read_lag=1.5,
        two_template_read="latest",
        batch_order="shuffled",
        batch_missing="error",
        batch_duplicates="once",
        idempotency="refuse",
    ),
}

_SUMMARIES = {
    "documented": "the documented API; elsewhere the sandbox's long-standing choices",
    "secondhand": "as samples and unverified sources suggest: bare key, idempotency",
    "awkward": "little retry guidance, Idempotency-Key refused, reads 1.5 s behind",
}


def persona(name: str) -> Behaviour:
    """The behaviour of persona ``name``; :class:`UnknownPersonaError` names the known ones."""
    try:
        return PERSONAS[name]
    except KeyError:
        msg = f"unknown sandbox persona {name!r}; known: {', '.join(PERSONAS)}"
        raise UnknownPersonaError(msg) from None


def resolve_persona(choice: str | Behaviour) -> Behaviour:
    """A behaviour given as itself or by persona name."""
    return choice if isinstance(choice, Behaviour) else persona(choice)


def persona_name(behaviour: Behaviour) -> str:
    """The name of the persona with exactly this behaviour, or ``"custom"``."""
    return next((name for name, known in PERSONAS.items() if known == behaviour), CUSTOM)


def _render(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "absent"}[value]
    if isinstance(value, float):
        return f"{value:g}s"
    return str(value)


def describe_personas() -> str:
    """A few lines per persona: its name, what it is for, and every switch it sets."""
    blocks = []
    for name, behaviour in PERSONAS.items():
        settings = [f"{f.name}={_render(getattr(behaviour, f.name))}" for f in fields(behaviour)]
        lines = [f"{name}: {_SUMMARIES.get(name, 'a persona added at run time')}"]
        line = " "
        for setting in settings:
            if len(line) + len(setting) + 1 > 78:
                lines.append(line)
                line = " "
            line += f" {setting}"
        lines.append(line)
        blocks.append("\n".join(lines))
    return "\n".join(blocks)
