"""Shared fixtures: a sandbox served on 127.0.0.1 for the duration of a test.

Helpers live in ``tests/helpers.py``; import them from there. ``SandboxFactory`` is re-exported
here only for modules not yet moved over (tests/test_ratelimit.py).
"""

from __future__ import annotations

import pytest

from tests.helpers import SandboxFactory, running_sandbox

__all__ = ["SandboxFactory", "sandbox_factory"]


@pytest.fixture
def sandbox_factory() -> SandboxFactory:
    """Start sandboxes with custom worlds, faults and personas inside a ``with`` block."""
    return running_sandbox
