"""Reproducible fault injection for the sandbox.

Spec: comma-separated ``name=value`` pairs, for example
``latency=50ms,jitter=20ms,500=0.01,503=0.01,drop=0.005,stall=0.001,stall-time=30s``.

======================  ========================================================================
``latency=D``           added to every conversation request (``ms`` or ``s``; default 0)
``jitter=D``            latency is uniform in ``latency ± jitter``
``500=P``               probability of a 500 ``INTERNAL_SERVER_ERROR`` envelope (write not applied)
``502=P`` / ``503=P``   probability of a gateway error (write not applied): a non-JSON page,
``504=P``               or the v2 error envelope under the persona switch ``gateway=envelope``
``drop=P``              probability that the connection closes with no complete answer
                        (write not applied)
``stall=P``             probability that the write is applied, then the answer is held back for
                        ``stall-time`` (the hard case: the client times out on a landed write)
``stall-time=D``        how long a stalled answer is held (default 30s)
======================  ========================================================================

Each decision is a pure function of ``(seed, target, n)``, where ``n`` counts the requests for that
target so far, so the same seed gives the same faults to the same rows whatever the concurrency.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass
from typing import Literal

# 504 comes last so that adding it left the decisions of specs without it unchanged.
Fault = Literal["none", "500", "502", "503", "drop", "stall", "504"]
_KINDS: tuple[Fault, ...] = ("500", "502", "503", "drop", "stall", "504")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s)?$")


class FaultSpecError(ValueError):
    """A fault spec that cannot be parsed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultSpec:
    """What to inject, parsed from the spec string."""

    latency: float = 0.0
    jitter: float = 0.0
    p500: float = 0.0
    p502: float = 0.0
    p503: float = 0.0
    drop: float = 0.0
    stall: float = 0.0
    stall_time: float = 30.0
    p504: float = 0.0

    @property
    def any_fault(self) -> bool:
        """Whether anything at all is injected."""
        return any(
            (
                self.latency,
                self.jitter,
                self.p500,
                self.p502,
                self.p503,
                self.p504,
                self.drop,
                self.stall,
            )
        )


def parse_duration(text: str) -> float:
    """``"50ms"`` → 0.05, ``"2s"`` or ``"2"`` → 2.0."""
    match = _DURATION.match(text.strip())
    if not match:
        msg = f"not a duration: {text!r} (use e.g. 50ms or 2s)"
        raise FaultSpecError(msg)
    value = float(match.group(1))
    return value / 1000 if match.group(2) == "ms" else value


def parse_fault_spec(spec: str | None) -> FaultSpec:
    """Parse a spec string (see the module docstring); empty means no faults."""
    if not spec:
        return FaultSpec()
    fields: dict[str, float] = {}
    names = {
        "500": "p500",
        "502": "p502",
        "503": "p503",
        "504": "p504",
        "drop": "drop",
        "stall": "stall",
    }
    for part in spec.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            msg = f"fault spec part {part!r} is not name=value"
            raise FaultSpecError(msg)
        if name in ("latency", "jitter"):
            fields[name] = parse_duration(value)
        elif name == "stall-time":
            fields["stall_time"] = parse_duration(value)
        elif name in names:
            try:
                probability = float(value)
            except ValueError as exc:
                msg = f"fault {name}: {value!r} is not a probability"
                raise FaultSpecError(msg) from exc
            if not 0.0 <= probability <= 1.0:
                msg = f"fault {name}: probability {probability} is outside 0..1"
                raise FaultSpecError(msg)
            fields[names[name]] = probability
        else:
            msg = f"unknown fault {name!r}; known: latency, jitter, stall-time, " + ", ".join(names)
            raise FaultSpecError(msg)
    spec_obj = FaultSpec(**fields)
    probabilities = (spec_obj.p500, spec_obj.p502, spec_obj.p503, spec_obj.p504)
    if sum(probabilities) + spec_obj.drop + spec_obj.stall > 1.0:
        msg = "fault probabilities add up to more than 1"
        raise FaultSpecError(msg)
    return spec_obj


def _uniforms(seed: int, target: str, n: int) -> tuple[float, float]:
    digest = hashlib.blake2b(f"{seed}\x00{target}\x00{n}".encode(), digest_size=16).digest()
    a, b = struct.unpack("<QQ", digest)
    return a / 2**64, b / 2**64


def decide(spec: FaultSpec, seed: int, target: str, n: int) -> tuple[Fault, float]:
    """The fault and the added latency (seconds) for the ``n``-th request to ``target``."""
    pick, spread = _uniforms(seed, target, n)
    delay = max(spec.latency + (2 * spread - 1) * spec.jitter, 0.0)
    edge = 0.0
    for kind, probability in zip(
        _KINDS, (spec.p500, spec.p502, spec.p503, spec.drop, spec.stall, spec.p504), strict=True
    ):
        edge += probability
        if pick < edge:
            return kind, delay
    return "none", delay
