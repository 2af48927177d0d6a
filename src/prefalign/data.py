"""Read, validate, tokenise and collate preference, SFT and prompt datasets.

Three kinds of dataset, each in two forms (standard text, or conversational lists of
``{"role", "content"}`` messages with roles ``system``, ``user``, ``assistant``, ``tool``):

- preference pairs: ``prompt`` / ``chosen`` / ``rejected``; an implicit prompt is allowed when
  ``chosen`` and ``rejected`` are whole conversations (split at their longest common message prefix);
- SFT examples: ``text``, or ``prompt`` / ``completion``, or ``messages``;
- prompts alone: ``prompt`` (for generation and PPO).

Sources: ``.jsonl``, ``.json`` (an array of objects, or an object mapping split names to arrays),
``.csv`` (standard form only: cells are text), ``.parquet``, a folder written by
``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``: ``split`` picks one), a folder holding
``<split>.jsonl`` (or .json/.csv/.parquet), or a hub dataset id passed to ``datasets.load_dataset``.

Every row is validated before anything is returned; the first bad row raises :class:`DataError`
naming where it is. Locations read ``pairs.jsonl:17:`` (1-based line, for JSONL and CSV files) or
``pairs.parquet[16]:`` (0-based row index, as ``dataset[16]`` or ``df.iloc[16]`` would find it).

Tokenisation (:func:`encode_prompt`, :func:`encode_preference`, :func:`encode_sft`) goes through the
tokenizer's chat template when it has one; every completion ends with exactly one end-of-turn token
(:func:`end_of_turn_id`: ``<|im_end|>`` for ChatML models, otherwise the tokenizer's EOS).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
IGNORE_INDEX = -100
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

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


CSV_FIELD_LIMIT = 2**31 - 1
"""Largest CSV cell read, in characters (the csv module's default, 131072, refuses a long prompt)."""


# --------------------------------------------------------------------------------------------------
# Reading rows with their locations
# --------------------------------------------------------------------------------------------------


def _decode(path: Path, raw: bytes) -> str:
    """``raw`` as UTF-8 text without its byte-order mark, if any; a bad byte is a DataError with its line."""
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        at = skip + err.start
        line = raw.count(b"\n", 0, at) + 1
        raise DataError(f"{path.name}:{line}: not valid UTF-8 text (byte {at})") from None


def _parse_json(text: str, where: str, lines: bool) -> Any:
    """``json.loads`` whose every failure is a DataError at ``where`` (plus the error's line if ``lines``)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        at = f"{where}:{err.lineno}" if lines else where
        raise DataError(f"{at}: invalid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise DataError(f"{where}: invalid JSON (nested too deeply)") from None
    except ValueError as err:  # an integer past Python's digit limit (sys.get_int_max_str_digits)
        at = where
        digits = re.search(rf"\d{{{sys.get_int_max_str_digits() + 1},}}", text) if lines else None
        if digits:
            line = text.count("\n", 0, digits.start()) + 1
            at = f"{where}:{line}"
        raise DataError(f"{at}: invalid JSON ({str(err).split(';')[0]})") from None


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path.name}:{lineno}"
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where}: not valid UTF-8 text") from None
            if not line.strip():
                continue
            yield where, _parse_json(line, where, lines=False)


def _read_json(path: Path, split: str) -> Iterator[tuple[str, Any]]:
    data = _parse_json(_decode(path, path.read_bytes()), path.name, lines=True)
    name = path.name
    if isinstance(data, dict):
        if split not in data:
            raise DataError(
                f"{name}: expected an array of objects or an object with a {split!r} array; "
                f"found keys {sorted(data)}"
            )
        data, name = data[split], f"{path.name}[{split!r}]"
    if not isinstance(data, list):
        raise DataError(f"{name}: expected an array of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        yield f"{name}[{i}]", row


def _read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    """Rows as ``{header: cell}``, each located at the line its record starts on (a quoted cell may span
    lines); blank lines are skipped, a leading byte-order mark is dropped."""
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)
    reader = csv.reader(io.StringIO(_decode(path, path.read_bytes()), newline=""))
    header: list[str] | None = None
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise DataError(f"{path.name}:{start}: not valid CSV ({err})") from None
        if not cells:
            continue
        if header is None:
            header = cells
            twice = sorted({c for c in cells if cells.count(c) > 1})
            if twice:
                raise DataError(f"{path.name}:{start}: the header names column {twice[0]!r} twice")
        elif len(cells) != len(header):
            raise DataError(f"{path.name}:{start}: wrong number of cells (header has {len(header)})")
        else:
            yield f"{path.name}:{start}", dict(zip(header, cells, strict=True))


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path.name}: not a readable Parquet file ({err})") from None
    for i, row in enumerate(rows):
        yield f"{path.name}[{i}]", row


def _read_file(path: Path, split: str) -> Iterator[tuple[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path, split)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(f"{path}: unsupported file type {suffix!r} (expected one of {', '.join(SUFFIXES)})")


def _read_dataset_rows(dataset: Any, name: str) -> Iterator[tuple[str, Any]]:
    for i, row in enumerate(dataset):
        yield f"{name}[{i}]", row


def _read_saved_dataset(path: Path, split: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises several types for a damaged folder
        raise DataError(f"{path}: not a readable saved dataset ({err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r} (available: {', '.join(loaded)})")
        return _read_dataset_rows(loaded[split], f"{path.name}[{split!r}]")
    return _read_dataset_rows(loaded, path.name)


def _read_folder(path: Path, split: str) -> Iterator[tuple[str, Any]]:
    markers = ("dataset_info.json", "dataset_dict.json", "state.json")
    if any((path / m).exists() for m in markers):
        return _read_saved_dataset(path, split)
    for suffix in SUFFIXES:
        candidate = path / f"{split}{suffix}"
        if candidate.exists():
            return _read_file(candidate, split)
    raise DataError(
        f"{path}: folder is neither a saved `datasets` dataset nor holds {split}.jsonl/.json/.csv/.parquet"
    )


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""What a Hugging Face hub dataset id looks like: ``owner/name``."""


def _looks_like_hub_id(source: str) -> bool:
    """``owner/name`` with no data-file suffix, whose ``owner`` is not a local folder (``data/pairs``
    with a ``data`` folder here is a path that does not exist, not a hub id)."""
    if source.lower().endswith(SUFFIXES) or not HUB_ID.fullmatch(source):
        return False
    return not Path(source.split("/")[0]).is_dir()


def _read_hub(source: str, split: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        dataset = datasets.load_dataset(source, split=split)
    except Exception as err:  # offline, unknown id, bad split: all mean "not available"
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(
            f"{source}: not found locally (no such file or folder) or on the Hugging Face hub ({reason})"
        ) from None
    return _read_dataset_rows(dataset, f"{source}[{split!r}]")


def read_rows(source: str | Path, split: str = "train") -> list[tuple[str, Any]]:
    """Every raw row of ``source`` with its location label, unvalidated.

    Args:
        source: a data file, a folder (saved dataset or ``<split>.<ext>`` files), or a hub dataset id.
        split: which split to read from a ``DatasetDict``, a folder, a JSON object or the hub.

    Returns:
        ``(location, row)`` pairs, e.g. ``("pairs.jsonl:3", {...})``.

    Raises:
        DataError: the source cannot be found or read, or a JSON line is invalid.
    """
    return list(iter_rows(source, split))


def iter_rows(source: str | Path, split: str = "train") -> Iterator[tuple[str, Any]]:
    """:func:`read_rows` one row at a time: JSONL and CSV files are parsed as far as the rows taken,
    so a loader that validates each row as it comes reports the first bad line, whether it is unreadable
    or invalid."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_folder(path, split)
    if path.is_file():
        return _read_file(path, split)
    if isinstance(source, Path) or not _looks_like_hub_id(str(source)):
        raise DataError(f"{source}: no such file or folder")
    return _read_hub(str(source), split)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value) and bool(value)


def is_conversational(example: Row) -> bool:
    """Whether ``example`` holds any field as a list of ``{"role", "content"}`` messages."""
    keys = ("prompt", "chosen", "rejected", "completion", "messages")
    return any(_is_messages(example.get(k)) for k in keys)


def _check_text(value: Any, where: str, name: str) -> str:
    if value is None:
        raise DataError(f'{where}: field "{name}" is null')
    if not isinstance(value, str):
        raise DataError(f'{where}: field "{name}" must be text, got {type(value).__name__}')
    if not value.strip():
        raise DataError(f'{where}: field "{name}" is empty')
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # JSON allows "\ud800"; no tokenizer does
        raise DataError(
            f'{where}: field "{name}" holds a lone surrogate ({value[err.start]!r} at character {err.start}), '
            "which is not text"
        ) from None
    return value


def _check_messages(value: Any, where: str, name: str) -> Messages:
    if not isinstance(value, list):
        raise DataError(
            f'{where}: field "{name}" must be text or a list of messages, got {type(value).__name__}'
        )
    if not value:
        raise DataError(f'{where}: field "{name}" is an empty list of messages')
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise DataError(
                f"{where}: {name}[{i}] must be a {{role, content}} object, got {type(msg).__name__}"
            )
        for key in ("role", "content"):
            if key not in msg:
                raise DataError(f'{where}: {name}[{i}] is missing field "{key}"')
        if msg["role"] not in ROLES:
            raise DataError(
                f"{where}: {name}[{i}] has unknown role {msg['role']!r} (allowed: {', '.join(ROLES)})"
            )
        _check_text(msg["content"], where, f"{name}[{i}].content")
    return value


def _check_field(row: Row, where: str, name: str) -> str | Messages:
    """A text or a message list, validated."""
    if name not in row:
        raise DataError(f'{where}: missing field "{name}" (fields: {", ".join(map(str, row)) or "none"})')
    value = row[name]
    if value is not None and not isinstance(value, (str, list)):
        raise DataError(
            f'{where}: field "{name}" must be text or a list of messages, got {type(value).__name__}'
        )
    return _check_messages(value, where, name) if isinstance(value, list) else _check_text(value, where, name)


def _check_prompt_messages(prompt: Messages, where: str, name: str = "prompt") -> Messages:
    if prompt[-1]["role"] == "assistant":
        raise DataError(
            f"{where}: {name} ends with an assistant message; it must end with a user, system or tool turn"
        )
    return prompt


def _as_completion(value: str | Messages, where: str, name: str) -> Messages:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    for i, msg in enumerate(value):
        if msg["role"] != "assistant":
            raise DataError(
                f"{where}: {name}[{i}] has role {msg['role']!r}; a completion holds assistant messages only"
            )
    return value


def _as_prompt(value: str | Messages, where: str) -> Messages:
    messages = [{"role": "user", "content": value}] if isinstance(value, str) else value
    return _check_prompt_messages(messages, where)


def _common_prefix_length(a: Messages, b: Messages) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _split_implicit(
    row: Row, chosen: Messages, rejected: Messages, where: str
) -> tuple[Messages, Messages, Messages]:
    """Split two whole conversations at their longest common message prefix."""
    n = _common_prefix_length(chosen, rejected)
    if n == 0:
        raise DataError(
            f"{where}: chosen and rejected share no leading messages, so there is no prompt to split off"
        )
    prompt, c, r = chosen[:n], chosen[n:], rejected[n:]
    if not c or not r:
        side = "chosen" if not c else "rejected"
        raise DataError(f"{where}: {side} has no messages after the prompt the two conversations share")
    _check_prompt_messages(prompt, where, "the shared prefix of chosen and rejected")
    _as_completion(c, where, f"chosen[{n}:]")
    _as_completion(r, where, f"rejected[{n}:]")
    if row.get("prompt") is not None:  # columnar formats fill a missing prompt with null
        given = _check_field(row, where, "prompt")
        expected = [{"role": "user", "content": given}] if isinstance(given, str) else given
        if expected != prompt:
            raise DataError(
                f'{where}: field "prompt" does not match the messages chosen and rejected start with'
            )
    return prompt, c, r


def _is_whole_conversation(value: Any) -> bool:
    """A message list that starts with a non-assistant turn holds its own prompt."""
    return (
        isinstance(value, list)
        and bool(value)
        and isinstance(value[0], dict)
        and value[0].get("role") != "assistant"
    )


def validate_preference(row: Any, where: str) -> Row:
    """One preference row, validated and normalised to ``{"prompt", "chosen", "rejected", ...extras}``.

    Standard form keeps three strings. Any message list makes the row conversational: a string prompt
    becomes one user message, string completions become one assistant message each. Chosen/rejected
    that contain non-assistant messages are whole conversations, split at their common prefix.

    Raises:
        DataError: naming ``where`` and the problem.
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with prompt/chosen/rejected, got {type(row).__name__}")
    chosen = _check_field(row, where, "chosen")
    rejected = _check_field(row, where, "rejected")
    if _is_whole_conversation(chosen) and _is_whole_conversation(rejected):
        prompt, c, r = _split_implicit(row, chosen, rejected, where)
        return {**row, "prompt": prompt, "chosen": c, "rejected": r}
    if "prompt" not in row and isinstance(chosen, str):
        raise DataError(
            f'{where}: missing field "prompt" (chosen and rejected are plain text; only conversations '
            "have an implicit prompt)"
        )
    prompt = _check_field(row, where, "prompt")
    if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
        return {**row, "prompt": prompt, "chosen": chosen, "rejected": rejected}
    return {
        **row,
        "prompt": _as_prompt(prompt, where),
        "chosen": _as_completion(chosen, where, "chosen"),
        "rejected": _as_completion(rejected, where, "rejected"),
    }


def validate_sft(row: Any, where: str) -> Row:
    """One SFT row, validated: ``messages``, or ``text``, or ``prompt`` + ``completion``.

    A ``messages`` conversation must end with an assistant turn. A prompt/completion pair with any
    message list is normalised to the conversational form, as in :func:`validate_preference`.
    """
    if not isinstance(row, dict):
        raise DataError(
            f"{where}: expected an object with text, prompt/completion or messages, got {type(row).__name__}"
        )
    if "messages" in row:
        messages = _check_field(row, where, "messages")
        if isinstance(messages, str):
            raise DataError(f'{where}: field "messages" must be a list of messages, got str')
        if messages[-1]["role"] != "assistant":
            raise DataError(f'{where}: field "messages" must end with an assistant message to train on')
        if all(m["role"] == "assistant" for m in messages):
            raise DataError(
                f'{where}: field "messages" has no user, system or tool message before the answer'
            )
        return row
    if "text" in row:
        _check_text(row["text"], where, "text")
        return row
    if "prompt" not in row or "completion" not in row:
        raise DataError(
            f'{where}: missing field: expected "text", "prompt" and "completion", or "messages" '
            f"(fields: {', '.join(map(str, row)) or 'none'})"
        )
    prompt = _check_field(row, where, "prompt")
    completion = _check_field(row, where, "completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return row
    return {
        **row,
        "prompt": _as_prompt(prompt, where),
        "completion": _as_completion(completion, where, "completion"),
    }


def validate_prompt(row: Any, where: str) -> Row:
    """One prompt row, validated: ``prompt`` as text or as messages not ending with an assistant turn."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with a prompt, got {type(row).__name__}")
    prompt = _check_field(row, where, "prompt")
    if isinstance(prompt, list):
        _check_prompt_messages(prompt, where)
    return row


# --------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------


def _source_name(source: str | Path) -> str:
    path = Path(source).expanduser()
    return path.name if path.exists() else str(source)


def load_preferences(source: str | Path, split: str = "train") -> list[Row]:
    """Read and validate preference pairs.

    Args:
        source: see the module docstring for the accepted files, folders and hub ids.
        split: the split to read where the source has several.

    Returns:
        Rows normalised to ``{"prompt": P, "chosen": C, "rejected": R, ...extra fields}``: three
        strings, or P a list of messages and C, R lists of assistant messages. Pairs whose chosen
        equals rejected are dropped, with one warning giving their count.

    Raises:
        DataError: on the first bad row (nothing is returned), or if no usable pair remains.
    """
    rows = [located(validate_preference(row, where), where) for where, row in iter_rows(source, split)]
    kept = [row for row in rows if row["chosen"] != row["rejected"]]
    if len(kept) < len(rows):
        warnings.warn(
            f"{_source_name(source)}: dropped {len(rows) - len(kept)} of {len(rows)} pairs whose chosen "
            "equals rejected",
            UserWarning,
            stacklevel=2,
        )
    if not kept:
        raise DataError(f"{_source_name(source)}: no usable preference pairs")
    return kept


def load_sft(source: str | Path, split: str = "train") -> list[Row]:
    """Read and validate SFT examples (``text``, ``prompt``/``completion`` or ``messages``).

    Raises:
        DataError: on the first bad row (nothing is returned), or if the source has no rows.
    """
    rows = [located(validate_sft(row, where), where) for where, row in iter_rows(source, split)]
    if not rows:
        raise DataError(f"{_source_name(source)}: no examples")
    return rows


def load_prompts(source: str | Path, split: str = "train") -> list[Row]:
    """Read and validate prompts (``prompt`` as text or messages) for generation and PPO.

    Raises:
        DataError: on the first bad row (nothing is returned), or if the source has no rows.
    """
    rows = [located(validate_prompt(row, where), where) for where, row in iter_rows(source, split)]
    if not rows:
        raise DataError(f"{_source_name(source)}: no prompts")
    return rows


# --------------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------------


def _has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render(tokenizer: Any, messages: Messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _ids(tokenizer: Any, text: str, add_special_tokens: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that ends every completion (and that generation should stop at).

    With a chat template: the special token the template writes right after an assistant message
    (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3). Otherwise the tokenizer's EOS.

    Raises:
        DataError: the tokenizer has neither.
    """
    if _has_template(tokenizer):
        marker = "PREFALIGN_END_OF_TURN_PROBE"
        text = _render(
            tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}], False
        )
        if marker in text:
            after = text[text.rfind(marker) + len(marker) :]
            specials = {*tokenizer.get_added_vocab(), *tokenizer.all_special_tokens}
            for token in sorted(specials, key=len, reverse=True):
                if token and after.startswith(token):
                    return int(tokenizer.convert_tokens_to_ids(token))
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer has no EOS token and no chat template that ends assistant turns")
    return int(tokenizer.eos_token_id)


def encode_prompt(tokenizer: Any, prompt: str | Messages, raw: bool = False) -> list[int]:
    """The one place a prompt becomes token ids (generation, DPO, PPO and SFT all call it).

    Args:
        tokenizer: a Hugging Face tokenizer.
        prompt: text, or a list of ``{"role", "content"}`` messages.
        raw: send text as it is even when the tokenizer has a chat template.

    Returns:
        Ids of the template rendering with the assistant header appended (``add_generation_prompt``)
        for messages, and for text when the tokenizer has a template and ``raw`` is False (the text
        becomes one user message); else ``tokenizer(text)`` with its own special tokens (e.g. BOS).

    Raises:
        DataError: a message list but the tokenizer has no chat template.
    """
    if isinstance(prompt, list):
        if not _has_template(tokenizer):
            raise DataError("conversational prompt, but the tokenizer has no chat template")
        return _ids(tokenizer, _render(tokenizer, prompt, add_generation_prompt=True))
    if _has_template(tokenizer) and not raw:
        text = _render(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
        return _ids(tokenizer, text)
    return _ids(tokenizer, prompt, add_special_tokens=True)


def _end_with_one(ids: list[int], eot: int) -> list[int]:
    while ids and ids[-1] == eot:
        ids = ids[:-1]
    return [*ids, eot]


def _completion_text(tokenizer: Any, prompt: Messages, completion: Messages, eot: int) -> str:
    """The template's rendering of ``completion`` after ``prompt``, up to its last end-of-turn token."""
    prefix = _render(tokenizer, prompt, add_generation_prompt=True)
    full = _render(tokenizer, prompt + completion, add_generation_prompt=False)
    if not full.startswith(prefix):
        raise DataError(
            "the chat template renders the prompt differently once a completion follows, so the "
            "completion cannot be split off"
        )
    text = full[len(prefix) :]
    eot_text = tokenizer.convert_ids_to_tokens(eot)
    end = text.rfind(eot_text)
    return text[: end + len(eot_text)] if end >= 0 else text


def encode_completion(tokenizer: Any, prompt: str | Messages, completion: str | Messages) -> list[int]:
    """Ids of a completion as they follow :func:`encode_prompt`'s ids, ending with one end-of-turn token.

    Conversational: the chat template's rendering of the completion after the prompt, without the
    template's text after the last end-of-turn token (ChatML's trailing newline). Standard: the text's
    ids. Either way trailing end-of-turn ids are stripped and exactly one is appended, so a completion
    that already ends with ``<|im_end|>`` is not doubled.
    """
    eot = end_of_turn_id(tokenizer)
    if isinstance(completion, list):
        if not isinstance(prompt, list):
            prompt = [{"role": "user", "content": prompt}]
        if not _has_template(tokenizer):
            raise DataError("conversational completion, but the tokenizer has no chat template")
        return _end_with_one(_ids(tokenizer, _completion_text(tokenizer, prompt, completion, eot)), eot)
    return _end_with_one(_ids(tokenizer, completion), eot)


def truncate_pair(
    prompt: list[int], chosen: list[int], rejected: list[int], max_length: int, max_prompt_length: int
) -> tuple[list[int], list[int], list[int], bool]:
    """Apply the truncation rule of :func:`encode_preference`; returns the three lists and whether it cut."""
    if len(prompt) + max(len(chosen), len(rejected)) <= max_length:
        return prompt, chosen, rejected, False
    if len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:]
    room = max_length - len(prompt)
    return prompt, chosen[:room], rejected[:room], True


def encode_preference(
    tokenizer: Any, example: Row, max_length: int, max_prompt_length: int | None = None, raw: bool = False
) -> dict[str, Any]:
    """Tokenise one validated preference pair.

    The prompt is tokenised once with :func:`encode_prompt`, so chosen and rejected share its ids;
    each completion comes from :func:`encode_completion` and ends with exactly one end-of-turn token.

    Truncation rule: if ``len(prompt) + max(len(chosen), len(rejected)) > max_length``, first the prompt
    is cut from the left to its last ``max_prompt_length`` tokens (default ``max_length // 2``; a
    shorter prompt is kept whole), then both completions are cut from the right to
    ``max_length - len(prompt)`` tokens (a cut completion loses its end-of-turn token).

    Args:
        tokenizer: a Hugging Face tokenizer.
        example: a row from :func:`load_preferences`.
        max_length: the most tokens of prompt + completion in one sequence.
        max_prompt_length: the most prompt tokens kept when truncating; must be < ``max_length``.
        raw: text prompts are sent as they are, not through the chat template (see :func:`encode_prompt`).

    Returns:
        ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` (lists of ints, the
        completions without the prompt) and ``truncated`` (bool).
    """
    max_prompt_length = max_length // 2 if max_prompt_length is None else max_prompt_length
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length < max_length, got {max_prompt_length} and {max_length}")
    prompt = encode_prompt(tokenizer, example["prompt"], raw=raw)
    chosen = encode_completion(tokenizer, example["prompt"], example["chosen"])
    rejected = encode_completion(tokenizer, example["prompt"], example["rejected"])
    prompt, chosen, rejected, truncated = truncate_pair(
        prompt, chosen, rejected, max_length, max_prompt_length
    )
    return {
        "prompt_input_ids": prompt,
        "chosen_input_ids": chosen,
        "rejected_input_ids": rejected,
        "truncated": truncated,
    }


def _split_messages(messages: Messages) -> tuple[Messages, Messages]:
    """Split a conversation before its final run of assistant messages."""
    k = len(messages)
    while k > 0 and messages[k - 1]["role"] == "assistant":
        k -= 1
    return messages[:k], messages[k:]


def encode_sft(tokenizer: Any, example: Row, max_length: int, raw: bool = False) -> dict[str, Any]:
    """Tokenise one validated SFT example.

    ``text`` is trained on whole (its ids plus one EOS); ``prompt``/``completion`` and ``messages``
    (split before the final assistant turn(s)) train on the completion only. Over-long sequences
    are cut from the right to ``max_length``.

    Returns:
        ``input_ids`` and ``labels`` (lists of the same length; labels are ``-100`` on prompt tokens
        and equal to ``input_ids`` elsewhere, not shifted) and ``truncated`` (bool).
    """
    if "messages" in example:
        prompt_msgs, completion_msgs = _split_messages(example["messages"])
        prompt = encode_prompt(tokenizer, prompt_msgs)
        completion = encode_completion(tokenizer, prompt_msgs, completion_msgs)
    elif "text" in example:
        prompt, completion = (
            [],
            _end_with_one(_ids(tokenizer, example["text"], add_special_tokens=True), _eos(tokenizer)),
        )
    else:
        prompt = encode_prompt(tokenizer, example["prompt"], raw=raw)
        completion = encode_completion(tokenizer, example["prompt"], example["completion"])
    input_ids = (prompt + completion)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + completion)[:max_length]
    return {"input_ids": input_ids, "labels": labels, "truncated": len(prompt) + len(completion) > max_length}


def _eos(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("tokenizer has no EOS token to end a text example with")
    return int(tokenizer.eos_token_id)


def encode_preferences(
    tokenizer: Any,
    examples: Sequence[Row],
    max_length: int,
    max_prompt_length: int | None = None,
    raw: bool = False,
) -> list[dict[str, Any]]:
    """:func:`encode_preference` over a dataset, logging how many pairs were truncated."""
    encoded = [
        encode_preference(tokenizer, ex, max_length, max_prompt_length, raw)
        for ex in _progress(examples, "pairs")
    ]
    _log_truncations(sum(e["truncated"] for e in encoded), len(encoded), max_length)
    return encoded


def encode_sft_examples(
    tokenizer: Any, examples: Sequence[Row], max_length: int, raw: bool = False
) -> list[dict[str, Any]]:
    """:func:`encode_sft` over a dataset, logging how many examples were truncated."""
    encoded = [encode_sft(tokenizer, ex, max_length, raw) for ex in _progress(examples, "examples")]
    _log_truncations(sum(e["truncated"] for e in encoded), len(encoded), max_length)
    return encoded


def _progress(items: Sequence[Row], unit: str) -> Any:
    """A tokenising progress bar for datasets large enough to take more than a moment."""
    from tqdm.auto import tqdm

    return tqdm(items, desc="tokenising", unit=f" {unit}", disable=len(items) < 5000, leave=False)


def _log_truncations(n: int, total: int, max_length: int) -> None:
    if n:
        logger.warning("truncated %d of %d examples to max_length=%d", n, total, max_length)


# --------------------------------------------------------------------------------------------------
# Collation, packing, batching
# --------------------------------------------------------------------------------------------------


def _pad(rows: list[list[int]], labels: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    label_t = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(rows, labels, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        label_t[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_t}


def collate_preferences(features: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack encoded pairs into one right-padded batch, chosen rows first.

    Args:
        features: ``B`` outputs of :func:`encode_preference`.
        pad_token_id: id written into padding (masked out; may equal EOS).

    Returns:
        ``input_ids``, ``attention_mask``, ``labels``, each ``[2B, T]``: rows ``0..B-1`` are
        prompt + chosen, rows ``B..2B-1`` prompt + rejected, ``T`` the longest row in this batch.
        Labels are ``-100`` on prompt and padding, the completion ids elsewhere (not shifted).
    """
    if not features:
        raise ValueError("collate_preferences: empty batch")
    rows, labels = [], []
    for side in ("chosen_input_ids", "rejected_input_ids"):
        for f in features:
            prompt = list(f["prompt_input_ids"])
            rows.append(prompt + list(f[side]))
            labels.append([IGNORE_INDEX] * len(prompt) + list(f[side]))
    return _pad(rows, labels, pad_token_id)


def collate_sft(features: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack :func:`encode_sft` outputs into ``input_ids``, ``attention_mask``, ``labels`` of ``[B, T]``.

    Right-padded to the longest sequence in the batch; labels are ``-100`` on padding.
    """
    if not features:
        raise ValueError("collate_sft: empty batch")
    return _pad([list(f["input_ids"]) for f in features], [list(f["labels"]) for f in features], pad_token_id)


class PreferenceCollator:
    """:func:`collate_preferences` with the pad id bound, usable as a DataLoader ``collate_fn``."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return collate_preferences(features, self.pad_token_id)


def pack_sequences(seqs: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Concatenate sequences into one padding-free row.

    Feed ``model(input_ids=..., position_ids=..., use_cache=False)`` with no attention mask:
    transformers then reads the sequence boundaries from the restarting position ids and masks
    attention block-diagonally (SDPA, eager and flash-attention alike). This is the generic form for
    any causal-LM forward; prefalign's trainers use :mod:`prefalign.packing`, which also shares each
    pair's prompt, runs attention per sequence in small blocks and projects only scored positions.

    Args:
        seqs: token ids of each sequence.
        labels: labels of each sequence, same lengths as ``seqs`` (not shifted).

    Returns:
        ``input_ids``, ``labels``, ``position_ids`` as ``[1, N]`` long tensors with ``N`` the total
        length, and ``seq_lens`` (list of ints). The first label of every sequence is ``-100``, so
        after the usual shift no token is trained to predict the start of the next sequence.
    """
    if not seqs or len(seqs) != len(labels):
        raise ValueError(
            f"pack_sequences: need as many label lists as sequences, got {len(seqs)} and {len(labels)}"
        )
    ids, labs, pos = [], [], []
    for i, (s, lab) in enumerate(zip(seqs, labels, strict=True)):
        if len(s) != len(lab) or not s:
            raise ValueError(f"pack_sequences: sequence {i} has {len(s)} ids and {len(lab)} labels")
        ids.extend(s)
        labs.extend([IGNORE_INDEX, *lab[1:]])
        pos.extend(range(len(s)))
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labs], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
        "seq_lens": [len(s) for s in seqs],
    }


def batches(
    n_examples: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True, drop_last: bool = False
) -> list[list[int]]:
    """Deterministic index batches: the same ``(seed, epoch)`` always gives the same batches.

    The permutation comes from ``numpy.random.default_rng([seed, epoch])``, independent of any global
    random state, so resuming at an epoch reproduces its order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = np.random.default_rng([seed, epoch]).permutation(n_examples) if shuffle else np.arange(n_examples)
    out = [order[i : i + batch_size].tolist() for i in range(0, n_examples, batch_size)]
    if drop_last and out and len(out[-1]) < batch_size:
        out.pop()
    return out
