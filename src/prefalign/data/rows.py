"""What every part of the data layer shares: rows that remember where they were read, and the error
that names that place (``pairs.jsonl:17: field "chosen" is empty``)."""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant", "tool")
IGNORE_INDEX = -100

Messages = list[dict[str, Any]]
Row = dict[str, Any]


class LocatedRow(dict):
    """A validated row that remembers where it was read (``where``: ``pairs.jsonl:17``), so that a
    training step that goes wrong can name its examples. Otherwise an ordinary dict."""

    where: str | None = None


def located(row: Row, where: str) -> LocatedRow:
    out = LocatedRow(row)
    out.where = where
    return out


def location(row: Any) -> str | None:
    """Where a row returned by ``load_preferences`` / ``load_sft`` / ``load_prompts`` was read."""
    return getattr(row, "where", None)


class DataError(ValueError):
    """A user's dataset is unreadable or malformed; the message names the source and the line or row."""
