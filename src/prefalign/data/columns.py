"""Column names that differ from data set to data set: a mapping from the canonical name a loader reads
(``prompt``, ``chosen``, ``rejected``, ``completion``, ``label``, ``text``, ``messages``, or any extra
column a reward function reads) to the data set's own column.

On the command line the mapping is written ``prompt=question,chosen=good,rejected=bad``
(:func:`parse_columns`). Loaders rename each row with :func:`rename_columns` before validating it, and
their errors name the data set's column, not the canonical one
(``pairs.jsonl:3: field "good" (--columns chosen=good) is empty``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prefalign.config import ConfigError
from prefalign.data.rows import DataError, Row

Columns = Mapping[str, str]
"""Canonical name -> the data set's column."""


def parse_columns(text: str) -> dict[str, str]:
    """The command-line form ``prompt=question,chosen=good`` as ``{"prompt": "question", "chosen": "good"}``.

    Spaces around entries and names are dropped; an empty text is no mapping.

    Raises:
        ConfigError: (the option's text is wrong, not the data) an entry without ``=``, an empty name,
            a canonical name given twice, or one column given for two canonical names.
    """
    columns: dict[str, str] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            if text.strip():
                raise ConfigError(f"--columns {text!r}: an empty entry (entries are canonical=column)")
            continue
        canonical, eq, column = (part.strip() for part in entry.partition("="))
        if not eq or "=" in column:
            raise ConfigError(
                f"--columns {text!r}: entry {entry!r} is not canonical=column (entries are separated by commas)"
            )
        if not canonical or not column:
            raise ConfigError(f"--columns {text!r}: entry {entry!r} has an empty name")
        if canonical in columns:
            raise ConfigError(f"--columns {text!r}: {canonical!r} is given twice")
        columns[canonical] = column
    check_columns(columns)
    return columns


def check_columns(columns: Columns) -> None:
    """A mapping as the loaders accept it: text names, none empty, no column given for two names.

    Raises:
        ConfigError: naming the offending entry.
    """
    seen: dict[str, str] = {}
    for canonical, column in columns.items():
        if not isinstance(canonical, str) or not isinstance(column, str) or not canonical or not column:
            raise ConfigError(f"--columns {canonical!r}={column!r}: must map a name to a column, both text")
        if column in seen:
            raise ConfigError(
                f"--columns {show_columns(columns)!r}: column {column!r} is given for both "
                f"{seen[column]!r} and {canonical!r}"
            )
        seen[column] = canonical


def show_columns(columns: Columns) -> str:
    """The mapping in its command-line form, ``prompt=question,chosen=good``."""
    return ",".join(f"{canonical}={column}" for canonical, column in columns.items())


def rename_columns(row: Any, where: str, columns: Columns | None) -> Any:
    """``row`` with each mapped column under its canonical name; other columns are kept as they are.

    A row that is not an object is returned unchanged (validation reports it). Mappings may swap names
    (``chosen=rejected,rejected=chosen``).

    Raises:
        DataError: the row lacks a mapped column, or already holds a canonical name beside the column
            renamed to it (the renamed column would hide it).
    """
    if not columns or not isinstance(row, dict):
        return row
    renamed_from = set(columns.values())
    for canonical, column in columns.items():
        if column not in row:
            fields = ", ".join(map(str, row)) or "none"
            raise DataError(
                f'{where}: no column "{column}" (--columns {canonical}={column}); columns: {fields}'
            )
        if canonical != column and canonical in row and canonical not in renamed_from:
            raise DataError(
                f'{where}: column "{canonical}" is there beside "{column}", which --columns '
                f"{canonical}={column} renames to it; rename or drop one of them"
            )
    to_canonical = {column: canonical for canonical, column in columns.items()}
    return {to_canonical.get(key, key): value for key, value in row.items()}


class Names:
    """How validation names a field of a renamed row: by the data set's column, with the mapping.

    ``Names({"chosen": "good"}).quoted("chosen")`` is ``"good" (--columns chosen=good)``; a path inside a
    field keeps its tail: ``Names(...).path("chosen[0]")`` is ``good[0] (--columns chosen=good)``.
    Without a mapping the canonical names are shown as they are.
    """

    def __init__(self, columns: Columns | None = None) -> None:
        self.columns = {k: v for k, v in (columns or {}).items() if k != v}

    def _split(self, name: str) -> tuple[str, str, str]:
        head = name
        for stop in ("[", "."):
            head = head.split(stop, 1)[0]
        column = self.columns.get(head)
        if column is None:
            return name, "", ""
        return column, name[len(head) :], f" (--columns {head}={column})"

    def quoted(self, name: str) -> str:
        """``"chosen"``, or ``"good" (--columns chosen=good)``."""
        column, tail, note = self._split(name)
        return f'"{column}{tail}"{note}'

    def path(self, name: str) -> str:
        """``chosen[0]``, or ``good[0] (--columns chosen=good)``."""
        column, tail, note = self._split(name)
        return f"{column}{tail}{note}"

    def fields(self, row: Row) -> str:
        """The row's columns as the data set names them, comma-separated (``none`` if it has none)."""
        to_column = self.columns
        return ", ".join(str(to_column.get(k, k)) if isinstance(k, str) else str(k) for k in row) or "none"
