"""allo-batch: apply corrected Allo call summaries in bulk, safely and at the key's pace."""

from __future__ import annotations

__all__: list[str] = []
