"""Raw rows with their locations, from every kind of source, unvalidated.

Sources: ``.jsonl``, ``.json`` (an array of objects, or an object mapping split names to arrays),
``.csv`` (standard form only: cells are text), ``.parquet``, a folder written by
``datasets.Dataset.save_to_disk`` (or by ``DatasetDict.save_to_disk``, one or several splits), a folder
holding ``<split>.jsonl`` (or .json/.csv/.parquet) or the hub's shards ``<split>-00000-of-00002.parquet``
(a clone of a hub data set's repository: the default config's files in ``data/``, each other config's in
``<config>/``), or a hub dataset id passed to ``datasets.load_dataset``.

Splits and subsets as the hub ships them: ``split`` picks a split where the source has several (None:
``train``); ``subset`` picks a hub data set's config (``load_dataset(id, name=subset, split=...)``) or,
for a local folder, its sub-folder of that name (``data/<subset>/``, which holds a saved dataset or
``<split>.<ext>`` files). A split that is not there is refused naming the ones that are; a split or
subset given for a source that has none (one JSONL/CSV/Parquet file, a JSON array, a saved ``Dataset``)
is refused rather than ignored.

Locations read ``pairs.jsonl:17`` (1-based line, for JSONL and CSV files), ``pairs.parquet[16]`` (0-based
row index, as ``dataset[16]`` or ``df.iloc[16]`` would find it), and name the split and subset where
there are some: ``prefs['test_prefs'][3]``, ``data/mrpc/test.jsonl:3``, ``owner/name['mrpc']['train'][3]``.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefalign.data.rows import DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

CSV_FIELD_LIMIT = 2**31 - 1
"""Largest CSV cell read, in characters (the csv module's default, 131072, refuses a long prompt)."""


def _decode(name: str, raw: bytes) -> str:
    """``raw`` as UTF-8 text without its byte-order mark, if any; a bad byte is a DataError with its line."""
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        at = skip + err.start
        line = raw.count(b"\n", 0, at) + 1
        raise DataError(f"{name}:{line}: not valid UTF-8 text (byte {at})") from None


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


def _read_jsonl(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{name}:{lineno}"
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where}: not valid UTF-8 text") from None
            if not line.strip():
                continue
            yield where, _parse_json(line, where, lines=False)


def _read_json(path: Path, name: str, split: str | None) -> Iterator[tuple[str, Any]]:
    data = _parse_json(_decode(name, path.read_bytes()), name, lines=True)
    if isinstance(data, dict):
        want = split or "train"
        if want not in data:
            available = [k for k, v in data.items() if isinstance(v, list)]
            if split is not None and available:
                raise DataError(f"{name}: no split {split!r} (available: {', '.join(available)})")
            raise DataError(
                f"{name}: expected an array of objects or an object with a {want!r} array; "
                f"found keys {sorted(data)}"
            )
        data, name = data[want], f"{name}[{want!r}]"
    elif split is not None:
        _refuse("split", split, name, "a JSON array")
    if not isinstance(data, list):
        raise DataError(f"{name}: expected an array of objects, got {type(data).__name__}")
    for i, row in enumerate(data):
        yield f"{name}[{i}]", row


def _read_csv(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    """Rows as ``{header: cell}``, each located at the line its record starts on (a quoted cell may span
    lines); blank lines are skipped, a leading byte-order mark is dropped."""
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)
    reader = csv.reader(io.StringIO(_decode(name, path.read_bytes()), newline=""))
    header: list[str] | None = None
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise DataError(f"{name}:{start}: not valid CSV ({err})") from None
        if not cells:
            continue
        if header is None:
            header = cells
            twice = sorted({c for c in cells if cells.count(c) > 1})
            if twice:
                raise DataError(f"{name}:{start}: the header names column {twice[0]!r} twice")
        elif len(cells) != len(header):
            raise DataError(f"{name}:{start}: wrong number of cells (header has {len(header)})")
        else:
            yield f"{name}:{start}", dict(zip(header, cells, strict=True))


def _read_parquet(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{name}: not a readable Parquet file ({err})") from None
    for i, row in enumerate(rows):
        yield f"{name}[{i}]", row


_KIND = {".jsonl": "a JSONL file", ".csv": "a CSV file", ".parquet": "a Parquet file"}

_WHAT = {
    "split": "a split picks one from a saved DatasetDict, a folder of <split>.<ext> files, a JSON object "
    "of splits or a hub data set",
    "subset": "a subset picks a hub data set's config or a sub-folder of a local folder",
}


def _refuse(option: str, value: str, name: str, kind: str) -> None:
    """A split or subset given for a source that has none: refused, not ignored."""
    raise DataError(f"{name}: {option} {value!r} given, but {kind} has no {option}s ({_WHAT[option]})")


def _read_file(path: Path, name: str, split: str | None) -> Iterator[tuple[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _read_json(path, name, split)
    if suffix not in _KIND:
        raise DataError(f"{path}: unsupported file type {suffix!r} (expected one of {', '.join(SUFFIXES)})")
    if split is not None:
        _refuse("split", split, name, _KIND[suffix])
    if suffix == ".jsonl":
        return _read_jsonl(path, name)
    if suffix == ".csv":
        return _read_csv(path, name)
    return _read_parquet(path, name)


def _read_dataset_rows(dataset: Any, name: str) -> Iterator[tuple[str, Any]]:
    for i, row in enumerate(dataset):
        yield f"{name}[{i}]", row


def _read_saved_dataset(path: Path, name: str, split: str | None) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises several types for a damaged folder
        raise DataError(f"{path}: not a readable saved dataset ({err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        want = split or "train"
        if want not in loaded:
            raise DataError(f"{name}: no split {want!r} (available: {', '.join(loaded)})")
        return _read_dataset_rows(loaded[want], f"{name}[{want!r}]")
    if split is not None:
        _refuse("split", split, name, "a saved Dataset (not a DatasetDict)")
    return _read_dataset_rows(loaded, name)


SAVED_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
"""Files that make a folder one written by ``save_to_disk``."""


SHARD = re.compile(r"(?P<split>.+?)-\d{5}-of-\d{5}(?:-[0-9a-f]+)?")
"""The hub's name for one file of a split: ``train-00000-of-00002.parquet`` (sometimes with a hash)."""


def _split_files(path: Path) -> dict[str, list[Path]]:
    """The folder's files by split name: ``<split>.<ext>``, or the hub's shards ``<split>-00000-of-00002.<ext>``
    in order. Where a split has files of several types, the first of :data:`SUFFIXES` wins."""
    found: dict[str, dict[str, list[Path]]] = {}
    for file in sorted(path.iterdir()):
        if file.is_file() and file.suffix in SUFFIXES and not file.name.startswith(("dataset_info", ".")):
            shard = SHARD.fullmatch(file.stem)
            split = shard["split"] if shard else file.stem
            found.setdefault(split, {}).setdefault(file.suffix, []).append(file)
    return {
        split: by_suffix[next(s for s in SUFFIXES if s in by_suffix)]
        for split, by_suffix in sorted(found.items())
    }


def _read_files(files: list[Path], prefix: str) -> Iterator[tuple[str, Any]]:
    """The rows of a split's files one after the other, each located in its own file."""
    if len(files) == 1:
        return _read_file(files[0], f"{prefix}{files[0].name}", None)
    return (row for file in files for row in _read_file(file, f"{prefix}{file.name}", None))


def _subfolders(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def _read_folder(
    path: Path, name: str, split: str | None, subset: str | None, prefix: str = ""
) -> Iterator[tuple[str, Any]]:
    """A saved dataset, or a folder of ``<split>.<ext>`` files or of the hub's shards (in ``data/`` when
    the folder is a hub repository's clone); with ``subset``, its sub-folder of that name. ``prefix``
    starts the label of a split file (``data/mrpc/`` inside a subset, else nothing)."""
    saved = any((path / m).exists() for m in SAVED_MARKERS)
    if subset is not None:
        if saved:
            _refuse("subset", subset, name, "a saved dataset folder")
        if not (path / subset).is_dir():
            available = ", ".join(_subfolders(path)) or "none"
            raise DataError(
                f"{name}: no subset {subset!r} (no sub-folder of that name; sub-folders: {available})"
            )
        inner = f"{name}/{subset}"
        return _read_folder(path / subset, inner, split, None, prefix=f"{inner}/")
    if saved:
        return _read_saved_dataset(path, name, split)
    files = _split_files(path)
    if not files and (path / "data").is_dir() and _split_files(path / "data"):
        # A hub data set's repository keeps its default config's files in data/.
        return _read_folder(path / "data", f"{name}/data", split, None, prefix=f"{name}/data/")
    want = split or "train"
    if want in files:
        return _read_files(files[want], prefix)
    if files:
        raise DataError(f"{name}: no split {want!r} (available: {', '.join(files)})")
    subfolders = _subfolders(path)
    hint = f"; its sub-folders ({', '.join(subfolders)}) may be subsets" if subfolders else ""
    raise DataError(
        f"{path}: folder is neither a saved `datasets` dataset nor holds {want}.jsonl/.json/.csv/.parquet{hint}"
    )


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""What a Hugging Face hub dataset id looks like: ``owner/name``."""


def _looks_like_hub_id(source: str) -> bool:
    """``owner/name`` with no data-file suffix, whose ``owner`` is not a local folder (``data/pairs``
    with a ``data`` folder here is a path that does not exist, not a hub id)."""
    if source.lower().endswith(SUFFIXES) or not HUB_ID.fullmatch(source):
        return False
    return not Path(source.split("/")[0]).is_dir()


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err).strip() else type(err).__name__


def _hub_names(lookup: Any, *args: Any, **kwargs: Any) -> list[str] | None:
    """What ``datasets.get_dataset_split_names`` / ``get_dataset_config_names`` say, or None if they fail."""
    try:
        return [str(n) for n in lookup(*args, **kwargs)]
    except Exception:  # offline, unknown id: the caller falls back to load_dataset's own words
        return None


def _hub_error(source: str, name: str, split: str, subset: str | None, err: ValueError) -> DataError:
    """The data set was found but the split or config was not: say which, naming the ones there are."""
    import datasets

    if subset is not None:
        configs = _hub_names(datasets.get_dataset_config_names, source)
        if configs is not None and subset not in configs:
            return DataError(f"{source}: no subset {subset!r} (available: {', '.join(configs)})")
    splits = _hub_names(datasets.get_dataset_split_names, source, config_name=subset)
    if splits is not None and split not in splits:
        return DataError(f"{name}: no split {split!r} (available: {', '.join(splits)})")
    return DataError(f"{name}: cannot read split {split!r} ({_first_line(err)})")


def _read_hub(source: str, split: str | None, subset: str | None = None) -> Iterator[tuple[str, Any]]:
    import datasets

    want = split or "train"
    name = source if subset is None else f"{source}[{subset!r}]"
    options = {"split": want} if subset is None else {"name": subset, "split": want}
    try:
        dataset = datasets.load_dataset(source, **options)
    except ValueError as err:  # found, but no such split or config
        raise _hub_error(source, name, want, subset, err) from None
    except Exception as err:  # offline, unknown id: both mean "not available"
        raise DataError(
            f"{source}: not found locally (no such file or folder) or on the Hugging Face hub "
            f"({_first_line(err)})"
        ) from None
    return _read_dataset_rows(dataset, f"{name}[{want!r}]")


def read_rows(
    source: str | Path, *, split: str | None = None, subset: str | None = None
) -> list[tuple[str, Any]]:
    """Every raw row of ``source`` with its location label, unvalidated.

    Args:
        source: a data file, a folder (saved dataset or ``<split>.<ext>`` files), or a hub dataset id.
        split: which split to read from a ``DatasetDict``, a folder, a JSON object or the hub (None:
            ``train``); refused for a source without splits.
        subset: a hub data set's config name, or a sub-folder of a local folder; refused for a file.

    Returns:
        ``(location, row)`` pairs, e.g. ``("pairs.jsonl:3", {...})``.

    Raises:
        DataError: the source, split or subset cannot be found or read, or a JSON line is invalid.
    """
    return list(iter_rows(source, split=split, subset=subset))


def iter_rows(
    source: str | Path, *, split: str | None = None, subset: str | None = None
) -> Iterator[tuple[str, Any]]:
    """:func:`read_rows` one row at a time: JSONL and CSV files are parsed as far as the rows taken,
    so a loader that validates each row as it comes reports the first bad line, whether it is unreadable
    or invalid. A missing source, split or subset is reported at once, before any row."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_folder(path, path.name, split, subset)
    if path.is_file():
        if subset is not None:
            _refuse("subset", subset, path.name, "a single file")
        return _read_file(path, path.name, split)
    if isinstance(source, Path) or not _looks_like_hub_id(str(source)):
        raise DataError(f"{source}: no such file or folder")
    return _read_hub(str(source), split, subset)
