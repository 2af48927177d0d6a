"""Validation of preference, unpaired-preference, SFT and prompt rows, and the loaders that read and
validate a source.

Every row is validated before anything is returned; the first bad row raises :class:`DataError` naming
where it is (``pairs.jsonl:17: field "chosen" is empty``). With a ``columns`` mapping each row is renamed
first (:func:`~prefalign.data.columns.rename_columns`) and errors name the data set's own column
(``pairs.jsonl:17: field "good" (--columns chosen=good) is empty``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefalign.data.columns import Columns, Names, check_columns, rename_columns
from prefalign.data.readers import iter_rows
from prefalign.data.rows import ROLES, DataError, LocatedRow, Messages, Row, located

LABEL_TEXT = {"true": True, "false": False}
"""Text read as an unpaired-preference label, compared without regard to case (CSV cells are text)."""


@dataclass(frozen=True)
class _At:
    """Where a row was read and how its fields are named in errors."""

    where: str
    names: Names = field(default_factory=Names)

    def error(self, message: str) -> DataError:
        return DataError(f"{self.where}: {message}")

    def q(self, name: str) -> str:
        return self.names.quoted(name)

    def p(self, name: str) -> str:
        return self.names.path(name)


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value) and bool(value)


def is_conversational(example: Row) -> bool:
    """Whether ``example`` holds any field as a list of ``{"role", "content"}`` messages."""
    keys = ("prompt", "chosen", "rejected", "completion", "messages")
    return any(_is_messages(example.get(k)) for k in keys)


def _check_text(value: Any, at: _At, name: str) -> str:
    if value is None:
        raise at.error(f"field {at.q(name)} is null")
    if not isinstance(value, str):
        raise at.error(f"field {at.q(name)} must be text, got {type(value).__name__}")
    if not value.strip():
        raise at.error(f"field {at.q(name)} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # JSON allows "\ud800"; no tokenizer does
        raise at.error(
            f"field {at.q(name)} holds a lone surrogate ({value[err.start]!r} at character {err.start}), "
            "which is not text"
        ) from None
    return value


def _check_messages(value: Any, at: _At, name: str) -> Messages:
    if not isinstance(value, list):
        raise at.error(f"field {at.q(name)} must be text or a list of messages, got {type(value).__name__}")
    if not value:
        raise at.error(f"field {at.q(name)} is an empty list of messages")
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise at.error(
                f"{at.p(f'{name}[{i}]')} must be a {{role, content}} object, got {type(msg).__name__}"
            )
        for key in ("role", "content"):
            if key not in msg:
                raise at.error(f'{at.p(f"{name}[{i}]")} is missing field "{key}"')
        if msg["role"] not in ROLES:
            raise at.error(
                f"{at.p(f'{name}[{i}]')} has unknown role {msg['role']!r} (allowed: {', '.join(ROLES)})"
            )
        _check_text(msg["content"], at, f"{name}[{i}].content")
    return value


def _check_field(row: Row, at: _At, name: str) -> str | Messages:
    """A text or a message list, validated."""
    if name not in row:
        raise at.error(f"missing field {at.q(name)} (fields: {at.names.fields(row)})")
    value = row[name]
    if value is not None and not isinstance(value, (str, list)):
        raise at.error(f"field {at.q(name)} must be text or a list of messages, got {type(value).__name__}")
    return _check_messages(value, at, name) if isinstance(value, list) else _check_text(value, at, name)


def _check_prompt_messages(prompt: Messages, at: _At, name: str = "prompt") -> Messages:
    if prompt[-1]["role"] == "assistant":
        raise at.error(
            f"{at.p(name)} ends with an assistant message; it must end with a user, system or tool turn"
        )
    return prompt


def _as_completion(value: str | Messages, at: _At, name: str) -> Messages:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    for i, msg in enumerate(value):
        if msg["role"] != "assistant":
            raise at.error(
                f"{at.p(f'{name}[{i}]')} has role {msg['role']!r}; a completion holds assistant messages only"
            )
    return value


def _as_prompt(value: str | Messages, at: _At) -> Messages:
    messages = [{"role": "user", "content": value}] if isinstance(value, str) else value
    return _check_prompt_messages(messages, at)


def _common_prefix_length(a: Messages, b: Messages) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _split_implicit(
    row: Row, chosen: Messages, rejected: Messages, at: _At
) -> tuple[Messages, Messages, Messages]:
    """Split two whole conversations at their longest common message prefix."""
    n = _common_prefix_length(chosen, rejected)
    if n == 0:
        raise at.error(
            f"{at.p('chosen')} and {at.p('rejected')} share no leading messages, so there is no prompt "
            "to split off"
        )
    prompt, c, r = chosen[:n], chosen[n:], rejected[n:]
    if not c or not r:
        side = "chosen" if not c else "rejected"
        raise at.error(f"{at.p(side)} has no messages after the prompt the two conversations share")
    _check_prompt_messages(prompt, at, "the shared prefix of chosen and rejected")
    _as_completion(c, at, f"chosen[{n}:]")
    _as_completion(r, at, f"rejected[{n}:]")
    if row.get("prompt") is not None:  # columnar formats fill a missing prompt with null
        given = _check_field(row, at, "prompt")
        expected = [{"role": "user", "content": given}] if isinstance(given, str) else given
        if expected != prompt:
            raise at.error(
                f"field {at.q('prompt')} does not match the messages chosen and rejected start with"
            )
    return prompt, c, r


def _text_split_point(chosen: str, rejected: str) -> int | None:
    """Where two texts with an implicit prompt split: at the last whitespace before they differ (TRL
    splits at the first differing character, moved back one if a space precedes it), leaving a non-blank
    prompt and two non-blank completions that start with that whitespace. None if there is no such place."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    for i in range(k - 1, 0, -1):
        if chosen[i].isspace() and chosen[:i].strip() and chosen[i:].strip() and rejected[i:].strip():
            return i
    return None


def _is_whole_conversation(value: Any) -> bool:
    """A message list that starts with a non-assistant turn holds its own prompt."""
    return (
        isinstance(value, list)
        and bool(value)
        and isinstance(value[0], dict)
        and value[0].get("role") != "assistant"
    )


def _is_implicit_text(row: Any) -> bool:
    """A preference row of two texts without a prompt (a columnar format's missing prompt is null)."""
    return (
        isinstance(row, dict)
        and row.get("prompt") is None
        and isinstance(row.get("chosen"), str)
        and isinstance(row.get("rejected"), str)
    )


def _validate_preference(row: Any, at: _At) -> Row:
    if not isinstance(row, dict):
        raise at.error(f"expected an object with prompt/chosen/rejected, got {type(row).__name__}")
    chosen = _check_field(row, at, "chosen")
    rejected = _check_field(row, at, "rejected")
    if _is_whole_conversation(chosen) and _is_whole_conversation(rejected):
        prompt, c, r = _split_implicit(row, chosen, rejected, at)
        return {**row, "prompt": prompt, "chosen": c, "rejected": r}
    if _is_implicit_text(row):
        cut = _text_split_point(chosen, rejected)
        if cut is not None:
            return {**row, "prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}
        if "prompt" not in row:
            raise at.error(
                f"missing field {at.q('prompt')} ({at.p('chosen')} and {at.p('rejected')} are plain text "
                "sharing no leading words, so there is no implicit prompt to split off)"
            )
    if "prompt" not in row and isinstance(chosen, str):
        raise at.error(
            f"missing field {at.q('prompt')} ({at.p('chosen')} and {at.p('rejected')} are plain text; "
            "only texts that share leading words and conversations have an implicit prompt)"
        )
    prompt = _check_field(row, at, "prompt")
    if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
        return {**row, "prompt": prompt, "chosen": chosen, "rejected": rejected}
    return {
        **row,
        "prompt": _as_prompt(prompt, at),
        "chosen": _as_completion(chosen, at, "chosen"),
        "rejected": _as_completion(rejected, at, "rejected"),
    }


def validate_preference(row: Any, where: str, columns: Columns | None = None) -> Row:
    """One preference row, validated and normalised to ``{"prompt", "chosen", "rejected", ...extras}``.

    Standard form keeps three strings. Two texts without a prompt (implicit prompt) split at the last
    whitespace before they differ: ``"The sky is blue."`` / ``"The sky is green."`` give the prompt
    ``"The sky is"`` and the completions ``" blue."`` / ``" green."``. Any message list makes the row
    conversational: a string prompt becomes one user message, string completions become one assistant
    message each. Chosen/rejected that contain non-assistant messages are whole conversations, split at
    their common prefix.

    Args:
        row: the raw row.
        where: its location, e.g. ``pairs.jsonl:17``.
        columns: canonical name -> the row's column (see :func:`~prefalign.data.columns.parse_columns`).

    Raises:
        DataError: naming ``where`` and the problem.
    """
    return _validate_preference(rename_columns(row, where, columns), _At(where, Names(columns)))


def _check_label(row: Row, at: _At) -> bool:
    """``label`` as a bool: true/false, or the text ``true``/``false`` in any case (as CSV holds it)."""
    if "label" not in row:
        raise at.error(f"missing field {at.q('label')} (fields: {at.names.fields(row)})")
    value = row["label"]
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in LABEL_TEXT:
        return LABEL_TEXT[value.lower()]
    if value is None:
        raise at.error(f"field {at.q('label')} is null")
    shown = repr(value) if isinstance(value, (str, int, float)) else type(value).__name__
    raise at.error(
        f"field {at.q('label')} must be true or false, got {shown} (numbers are not read as labels: a 1 "
        "may be a rating; write true for a desirable completion, false for an undesirable one)"
    )


def _validate_unpaired(row: Any, at: _At) -> Row:
    if not isinstance(row, dict):
        raise at.error(f"expected an object with prompt/completion/label, got {type(row).__name__}")
    prompt = _check_field(row, at, "prompt")
    completion = _check_field(row, at, "completion")
    label = _check_label(row, at)
    if isinstance(prompt, str) and isinstance(completion, str):
        return {**row, "label": label}
    return {
        **row,
        "prompt": _as_prompt(prompt, at),
        "completion": _as_completion(completion, at, "completion"),
        "label": label,
    }


def validate_unpaired(row: Any, where: str, columns: Columns | None = None) -> Row:
    """One unpaired preference row (KTO's data), validated: ``prompt``, ``completion``, ``label``.

    ``label`` says whether the completion is desirable: a boolean, or the text ``true``/``false`` in any
    case (CSV cells are text). Numbers, 0/1 included, are refused: a label column of integers is as likely
    a rating, where 1 is the worst, as a flag. A prompt/completion with any message list is normalised to
    the conversational form, as in :func:`validate_preference`.

    Returns:
        ``{"prompt", "completion", "label": bool, ...extras}``.

    Raises:
        DataError: naming ``where`` and the problem.
    """
    return _validate_unpaired(rename_columns(row, where, columns), _At(where, Names(columns)))


def _validate_sft(row: Any, at: _At) -> Row:
    if not isinstance(row, dict):
        raise at.error(
            f"expected an object with text, prompt/completion or messages, got {type(row).__name__}"
        )
    if "messages" in row:
        messages = _check_field(row, at, "messages")
        if isinstance(messages, str):
            raise at.error(f"field {at.q('messages')} must be a list of messages, got str")
        if messages[-1]["role"] != "assistant":
            raise at.error(f"field {at.q('messages')} must end with an assistant message to train on")
        if all(m["role"] == "assistant" for m in messages):
            raise at.error(f"field {at.q('messages')} has no user, system or tool message before the answer")
        return row
    if "text" in row:
        _check_text(row["text"], at, "text")
        return row
    if "prompt" not in row or "completion" not in row:
        raise at.error(
            f"missing field: expected {at.q('text')}, {at.q('prompt')} and {at.q('completion')}, or "
            f"{at.q('messages')} (fields: {at.names.fields(row)})"
        )
    prompt = _check_field(row, at, "prompt")
    completion = _check_field(row, at, "completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return row
    return {
        **row,
        "prompt": _as_prompt(prompt, at),
        "completion": _as_completion(completion, at, "completion"),
    }


def validate_sft(row: Any, where: str, columns: Columns | None = None) -> Row:
    """One SFT row, validated: ``messages``, or ``text``, or ``prompt`` + ``completion``.

    A ``messages`` conversation must end with an assistant turn. A prompt/completion pair with any
    message list is normalised to the conversational form, as in :func:`validate_preference`.
    ``columns`` renames first, as in :func:`validate_preference`.
    """
    return _validate_sft(rename_columns(row, where, columns), _At(where, Names(columns)))


def _validate_prompt(row: Any, at: _At) -> Row:
    if not isinstance(row, dict):
        raise at.error(f"expected an object with a prompt, got {type(row).__name__}")
    prompt = _check_field(row, at, "prompt")
    if isinstance(prompt, list):
        _check_prompt_messages(prompt, at)
    return row


def validate_prompt(row: Any, where: str, columns: Columns | None = None) -> Row:
    """One prompt row, validated: ``prompt`` as text or as messages not ending with an assistant turn.
    ``columns`` renames first, as in :func:`validate_preference` (extra columns a reward reads, such as
    ``answer=solution``, are renamed too)."""
    return _validate_prompt(rename_columns(row, where, columns), _At(where, Names(columns)))


# --------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------


def _source_name(source: str | Path) -> str:
    path = Path(source).expanduser()
    return path.name if path.exists() else str(source)


def _renamed(
    source: str | Path, split: str | None, subset: str | None, columns: Columns | None
) -> Iterable[tuple[_At, Any]]:
    """Each raw row of the source under its canonical names, with its place (rows are read lazily, so
    the first bad row is reported before a later unreadable line)."""
    if columns:
        check_columns(columns)
    names = Names(columns)
    for where, row in iter_rows(source, split=split, subset=subset):
        yield _At(where, names), rename_columns(row, where, columns)


def _load(
    source: str | Path,
    split: str | None,
    subset: str | None,
    columns: Columns | None,
    validate: Callable[[Any, _At], Row],
) -> list[LocatedRow]:
    return [located(validate(row, at), at.where) for at, row in _renamed(source, split, subset, columns)]


def _drop_equal_pairs(rows: list[LocatedRow], source: str | Path) -> list[LocatedRow]:
    kept = [row for row in rows if row["chosen"] != row["rejected"]]
    if len(kept) < len(rows):
        warnings.warn(
            f"{_source_name(source)}: dropped {len(rows) - len(kept)} of {len(rows)} pairs whose chosen "
            "equals rejected",
            UserWarning,
            stacklevel=3,
        )
    return kept


def _warn_implicit_text(n: int, total: int, source: str | Path) -> None:
    if n:
        warnings.warn(
            f"{_source_name(source)}: {n} of {total} pairs have no prompt; each one's prompt is the text "
            "chosen and rejected share, up to the last whitespace before they differ (implicit prompt). "
            "If the prompt is in another column, name it with columns (--columns prompt=COLUMN)",
            UserWarning,
            stacklevel=3,
        )


def load_preferences(
    source: str | Path,
    *,
    split: str | None = None,
    subset: str | None = None,
    columns: Columns | None = None,
) -> list[Row]:
    """Read and validate preference pairs (explicit or implicit prompt, standard or conversational).

    Args:
        source: see :mod:`prefalign.data.readers` for the accepted files, folders and hub ids.
        split: the split to read where the source has several (None: ``train``).
        subset: a hub data set's config name, or a sub-folder of a local folder.
        columns: canonical name -> the data set's column, e.g. ``{"prompt": "question"}``.

    Returns:
        Rows normalised to ``{"prompt": P, "chosen": C, "rejected": R, ...extra fields}``: three
        strings, or P a list of messages and C, R lists of assistant messages. Pairs whose chosen
        equals rejected are dropped, with one warning giving their count; pairs of texts without a
        prompt are split with one warning (see :func:`validate_preference`).

    Raises:
        DataError: on the first bad row (nothing is returned), or if no usable pair remains.
    """
    rows, implicit = [], 0
    for at, row in _renamed(source, split, subset, columns):
        implicit += _is_implicit_text(row)
        rows.append(located(_validate_preference(row, at), at.where))
    _warn_implicit_text(implicit, len(rows), source)
    kept = _drop_equal_pairs(rows, source)
    if not kept:
        raise DataError(f"{_source_name(source)}: no usable preference pairs")
    return kept


def _shape(row: Any) -> str | None:
    """``paired`` (chosen/rejected), ``unpaired`` (completion/label) or None (neither: validation says)."""
    if not isinstance(row, dict):
        return None
    if "chosen" in row or "rejected" in row:
        return "paired"
    return "unpaired" if "completion" in row or "label" in row else None


def _unpair(row: LocatedRow) -> list[LocatedRow]:
    """A validated pair as two unpaired rows: chosen desirable, rejected undesirable."""
    rest = {k: v for k, v in row.items() if k not in ("chosen", "rejected")}
    return [
        located({**rest, "completion": row["chosen"], "label": True}, row.where),
        located({**rest, "completion": row["rejected"], "label": False}, row.where),
    ]


def load_unpaired(
    source: str | Path,
    *,
    split: str | None = None,
    subset: str | None = None,
    columns: Columns | None = None,
) -> list[Row]:
    """Read and validate unpaired preference data (``prompt``, ``completion``, boolean ``label``: KTO's).

    Paired data is accepted too: each pair becomes two rows, chosen with label true and rejected with
    label false (as TRL's ``unpair_preference_dataset``), both located where the pair was read. The first
    row decides which kind the source holds; a row of the other kind is an error naming its line.

    Args:
        source: see :mod:`prefalign.data.readers` for the accepted files, folders and hub ids.
        split: the split to read where the source has several (None: ``train``).
        subset: a hub data set's config name, or a sub-folder of a local folder.
        columns: canonical name -> the data set's column, e.g. ``{"label": "is_good"}``.

    Returns:
        Rows ``{"prompt": P, "completion": C, "label": bool, ...extra fields}``: P and C strings, or P a
        list of messages and C a list of assistant messages (see :func:`validate_unpaired`).

    Raises:
        DataError: on the first bad row (nothing is returned), or if the source has no usable rows.
    """
    rows: list[LocatedRow] = []
    kind, first, implicit = None, "", 0
    for at, row in _renamed(source, split, subset, columns):
        shape = _shape(row)
        if kind is None:
            kind, first = shape or "unpaired", at.where
        elif shape is not None and shape != kind:
            raise at.error(
                f"a {shape} row ({'chosen, rejected' if shape == 'paired' else 'completion, label'}) "
                f"among {kind} rows: the first row ({first}) decides, and a source holds one kind"
            )
        validate = _validate_preference if kind == "paired" else _validate_unpaired
        implicit += kind == "paired" and _is_implicit_text(row)
        rows.append(located(validate(row, at), at.where))
    if kind == "paired":
        _warn_implicit_text(implicit, len(rows), source)
        rows = [half for pair in _drop_equal_pairs(rows, source) for half in _unpair(pair)]
    if not rows:
        raise DataError(f"{_source_name(source)}: no usable unpaired preference rows")
    return rows


def load_sft(
    source: str | Path,
    *,
    split: str | None = None,
    subset: str | None = None,
    columns: Columns | None = None,
) -> list[Row]:
    """Read and validate SFT examples (``text``, ``prompt``/``completion`` or ``messages``).

    ``split``, ``subset`` and ``columns`` as in :func:`load_preferences`.

    Raises:
        DataError: on the first bad row (nothing is returned), or if the source has no rows.
    """
    rows = _load(source, split, subset, columns, _validate_sft)
    if not rows:
        raise DataError(f"{_source_name(source)}: no examples")
    return rows


def load_prompts(
    source: str | Path,
    *,
    split: str | None = None,
    subset: str | None = None,
    columns: Columns | None = None,
) -> list[Row]:
    """Read and validate prompts (``prompt`` as text or messages) for generation and PPO.

    ``split``, ``subset`` and ``columns`` as in :func:`load_preferences`; ``columns`` may also name
    extra columns a reward function reads (``answer=solution``).

    Raises:
        DataError: on the first bad row (nothing is returned), or if the source has no rows.
    """
    rows = _load(source, split, subset, columns, _validate_prompt)
    if not rows:
        raise DataError(f"{_source_name(source)}: no prompts")
    return rows
