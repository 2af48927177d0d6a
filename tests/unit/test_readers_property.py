"""Property-based tests over every reader (JSONL, JSON, CSV, Parquet) and every loader (prompts, SFT,
pairs): whatever a file holds, the only exception that escapes is ``DataError``, its message starts with
the file's name and, where the file has lines or rows, with the place of the first bad one.

"First bad one" is checked without re-implementing the validation: the rows before the reported place
must load on their own, and the reported row alone must give the same complaint.

The explicit tests at the end are the minimal examples these properties found, kept as regressions.
"""

from __future__ import annotations

import csv
import io
import json
import re
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from prefalign.data import DataError, load_preferences, load_prompts, load_sft

LOADERS = {"prompts": load_prompts, "sft": load_sft, "pairs": load_preferences}
KINDS = st.sampled_from(sorted(LOADERS))
BOM = "\ufeff"
SETTINGS = settings(  # derandomized: the same examples on every run (CI must not turn red by chance)
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

KEYS = ["prompt", "chosen", "rejected", "completion", "text", "messages", "role", "content"]
ROLES = ["system", "user", "assistant", "tool"]
# Rows every loader accepts, so that bad rows also turn up after good ones.
GOOD_ROWS = [
    {"prompt": "Hi", "chosen": "Yes.", "rejected": "No.", "text": "Hi. Yes."},
    {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Yes."}],
        "rejected": [{"role": "assistant", "content": "No."}],
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes."}],
    },
]
FILE_LEVEL = ("no prompts", "no examples", "no usable preference pairs")

texts = st.text(max_size=8)  # lone surrogates included: JSON can carry them as \ud800
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    texts,
    st.sampled_from([*ROLES, "", " ", "\t\n"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), texts), inner, max_size=3),
    ),
    max_leaves=10,
)
messages = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "role": st.one_of(st.sampled_from(ROLES), json_values),
            "content": st.one_of(texts, json_values),
        },
    ),
    max_size=3,
)
rows = st.one_of(
    st.sampled_from(GOOD_ROWS),
    st.dictionaries(st.sampled_from(KEYS), st.one_of(texts, messages, json_values), max_size=5),
    json_values,
)
# Text a JSON parser chokes on in every way: deep nesting, integers past Python's digit limit, a byte-order
# mark in the middle, trailing data, escapes of a lone surrogate and of NUL.
JSON_JUNK = [
    "[" * 5000,
    "{" * 3000,
    "[" * 200 + "]" * 200,
    "1" * 5000,
    '{"prompt": ' + "9" * 5000 + "}",
    '{"prompt": "a"} x',
    BOM + '{"prompt": "a"}',
    "NaN",
    "",
    "   ",
    '{"prompt": "\\ud800"}',
    '{"prompt": "a\\u0000b", "chosen": "c", "rejected": "d", "text": "e"}',
    '"just a string"',
    "[1, 2]",
    "{}",
    *('{"prompt": [{"role": ' + "[" * k + "]" * k + ', "content": "x"}]}' for k in (940, 965, 980, 990, 996)),
]
one_line = st.characters(blacklist_categories=("Cs",), blacklist_characters="\n")
jsonl_lines = st.one_of(
    rows.map(json.dumps),  # ASCII: lone surrogates travel escaped
    st.text(one_line, max_size=20),
    st.sampled_from(JSON_JUNK),
)


def outcome(kind: str, path: Path) -> str | None:
    """None when ``path`` loads as ``kind``, else the DataError's message; anything else fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pairs whose chosen equals rejected are dropped with a warning
        try:
            LOADERS[kind](path)
        except DataError as err:
            return str(err)
    return None


def is_file_level(message: str, name: str) -> bool:
    return any(message == f"{name}: {what}" for what in FILE_LEVEL)


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


# ---- JSONL ----------------------------------------------------------------------------------------


@SETTINGS
@given(lines=st.lists(jsonl_lines, max_size=6), bom=st.booleans(), kind=KINDS)
def test_jsonl_reports_the_first_bad_line(tmp_path, lines, bom, kind):
    name = "data.jsonl"
    text = (BOM if bom else "") + "\n".join(lines) + "\n"
    message = outcome(kind, write(tmp_path / name, text))
    if message is None or is_file_level(message, name):
        return
    match = re.fullmatch(rf"{re.escape(name)}:(\d+): (.+)", message, re.DOTALL)
    assert match, message
    line = int(match[1])
    assert 1 <= line <= len(lines), message
    before = (BOM if bom else "") + "".join(f"{x}\n" for x in lines[: line - 1])
    rest = outcome(kind, write(tmp_path / name, before))
    assert rest is None or is_file_level(rest, name), (message, rest)
    alone = (BOM if bom and line == 1 else "") + lines[line - 1] + "\n"
    assert outcome(kind, write(tmp_path / name, alone)) == f"{name}:1: {match[2]}"


@SETTINGS
@given(lines=st.lists(jsonl_lines, max_size=6), kind=KINDS, suffix=st.sampled_from(["jsonl", "json", "csv"]))
def test_a_byte_order_mark_changes_nothing(tmp_path, lines, kind, suffix):
    """Editors on Windows start UTF-8 files with a BOM; the file must read as if it were not there."""
    name = f"data.{suffix}"
    text = "\n".join(lines) + "\n" if suffix != "json" else "[" + ",".join(filter(_is_json, lines)) + "]"
    assume(not text.startswith(BOM))  # text that itself starts with U+FEFF reads as a BOM: nothing to compare
    plain = outcome(kind, write(tmp_path / name, text))
    assert outcome(kind, write(tmp_path / name, BOM + text)) == plain


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


# ---- JSON -----------------------------------------------------------------------------------------


@SETTINGS
@given(
    items=st.lists(rows, max_size=5),
    layout=st.sampled_from(["array", "splits", "junk"]),
    junk=st.one_of(
        st.sampled_from(JSON_JUNK), st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
    ),
    bom=st.booleans(),
    kind=KINDS,
)
def test_json_reports_the_first_bad_row(tmp_path, items, layout, junk, bom, kind):
    name = "data.json"
    prefix = BOM if bom else ""
    if layout == "junk":
        text = junk
    else:
        text = json.dumps(items if layout == "array" else {"train": items, "test": []})
    message = outcome(kind, write(tmp_path / name, prefix + text))
    if message is None or is_file_level(message, name):
        return
    assert message.startswith(name), message
    if match := re.fullmatch(rf"{re.escape(name)}:(\d+): (.+)", message, re.DOTALL):  # a parse error
        assert 1 <= int(match[1]) <= text.count("\n") + 1, message
        return
    label = re.escape(name) + (r"\['train'\]" if layout == "splits" else "")
    match = re.fullmatch(rf"{label}\[(\d+)\]: (.+)", message, re.DOTALL)
    if match is None:  # a top-level value that is not an array of rows, or nesting no parser follows
        expected = rf"{re.escape(name)}: (expected .+|invalid JSON \(nested too deeply\))"
        assert re.fullmatch(expected, message, re.DOTALL), message
        return
    if layout == "junk":
        return
    index = int(match[1])
    assert index < len(items), message

    def again(part: list) -> str | None:
        body = json.dumps(part if layout == "array" else {"train": part})
        return outcome(kind, write(tmp_path / name, prefix + body))

    rest = again(items[:index])
    assert rest is None or is_file_level(rest, name), (message, rest)
    alone = again([items[index]])
    assert alone is not None and alone.endswith(f"[0]: {match[2]}"), (message, alone)


# ---- CSV ------------------------------------------------------------------------------------------

cells = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=10),
    st.sampled_from(["", " ", "Hi", "a,b", '"', "\r", "\n", "\r\n", "\x00", BOM, "x" * 140_000]),
)


def _line_of(text: str, offset: int) -> int:
    """1-based line of ``offset``, counting \\n, \\r\\n and a lone \\r as line ends, as csv does."""
    return len(io.StringIO(text[:offset], newline="").readlines()) + 1


@SETTINGS
@given(
    header=st.lists(st.one_of(st.sampled_from(KEYS), cells), min_size=1, max_size=4),
    records=st.lists(st.lists(cells, max_size=5), max_size=5),
    terminator=st.sampled_from(["\r\n", "\n"]),
    bom=st.booleans(),
    kind=KINDS,
)
def test_csv_reports_the_line_of_the_first_bad_row(tmp_path, header, records, terminator, bom, kind):
    name = "data.csv"
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator=terminator)
    writer.writerow(header)
    starts = []
    for record in records:
        starts.append(out.tell())
        writer.writerow(record)
    text = out.getvalue()
    message = outcome(kind, write(tmp_path / name, (BOM if bom else "") + text))
    if message is None or is_file_level(message, name):
        return
    match = re.fullmatch(rf"{re.escape(name)}:(\d+): (.+)", message, re.DOTALL)
    assert match, message
    line, detail = int(match[1]), match[2]
    assert 1 <= line <= _line_of(text, len(text)), message
    start_lines = [_line_of(text, s) for s in starts]
    if detail.startswith("not valid CSV") or line not in start_lines:
        return  # a parse error (the writer does not quote a lone \r with a \n terminator), or ambiguous
    k = start_lines.index(line)
    rest = outcome(kind, write(tmp_path / name, (BOM if bom else "") + text[: starts[k]]))
    assert rest is None or is_file_level(rest, name), (message, rest)
    end = starts[k + 1] if k + 1 < len(starts) else len(text)
    alone = text[: starts[0]] + text[starts[k] : end]
    got = outcome(kind, write(tmp_path / name, (BOM if bom else "") + alone))  # the same file start
    assert got == f"{name}:{_line_of(alone, starts[0])}: {detail}"


# ---- Parquet --------------------------------------------------------------------------------------


def _parquet_columns() -> st.SearchStrategy:
    import pyarrow as pa

    safe_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)
    message_type = pa.struct([("role", pa.string()), ("content", pa.string())])
    kinds = {
        "text": (pa.string(), st.one_of(st.none(), safe_text, st.sampled_from(["Hi", "", " "]))),
        "int": (pa.int64(), st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1))),
        "float": (pa.float64(), st.one_of(st.none(), st.floats())),
        "bool": (pa.bool_(), st.one_of(st.none(), st.booleans())),
        "binary": (pa.binary(), st.one_of(st.none(), st.binary(max_size=8))),
        "strings": (pa.list_(pa.string()), st.one_of(st.none(), st.lists(safe_text, max_size=2))),
        "messages": (
            pa.list_(message_type),
            st.one_of(
                st.none(),
                st.lists(
                    st.fixed_dictionaries(
                        {
                            "role": st.one_of(st.none(), st.sampled_from([*ROLES, "bot", ""])),
                            "content": st.one_of(st.none(), safe_text, st.just("Hi")),
                        }
                    ),
                    max_size=3,
                ),
            ),
        ),
    }
    return st.dictionaries(
        st.one_of(st.sampled_from(KEYS), safe_text),
        st.sampled_from(sorted(kinds)).map(lambda k: kinds[k]),
        min_size=1,
        max_size=4,
    )


@SETTINGS
@given(data=st.data(), kind=KINDS)
def test_parquet_reports_the_index_of_the_first_bad_row(tmp_path, data, kind):
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = data.draw(_parquet_columns())
    n = data.draw(st.integers(0, 4))
    values = {
        c: data.draw(st.lists(strategy, min_size=n, max_size=n)) for c, (_, strategy) in columns.items()
    }
    schema = pa.schema([(c, t) for c, (t, _) in columns.items()])
    name = "data.parquet"

    def write_rows(index: slice) -> Path:
        table = pa.table(
            {c: pa.array(v[index], type=schema.field(c).type) for c, v in values.items()}, schema=schema
        )
        pq.write_table(table, tmp_path / name)
        return tmp_path / name

    message = outcome(kind, write_rows(slice(None)))
    if message is None or is_file_level(message, name):
        return
    match = re.fullmatch(rf"{re.escape(name)}\[(\d+)\]: (.+)", message, re.DOTALL)
    assert match, message
    index = int(match[1])
    assert index < n
    rest = outcome(kind, write_rows(slice(0, index)))
    assert rest is None or is_file_level(rest, name), (message, rest)
    assert outcome(kind, write_rows(slice(index, index + 1))) == f"{name}[0]: {match[2]}"


# ---- any bytes at all -----------------------------------------------------------------------------


@settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    raw=st.one_of(
        st.binary(max_size=64),
        st.sampled_from([b"", b"\xef\xbb\xbf", b"\xff\xfe{}", b"PAR1", b"PAR1\x00\x00PAR1", b"\xed\xa0\x80"]),
        st.lists(
            st.sampled_from([b"{", b"}", b"[", b"]", b'"', b",", b":", b"\n", b"\r", b"\xff", b"1"])
        ).map(b"".join),
    ),
    suffix=st.sampled_from(["jsonl", "json", "csv", "parquet"]),
    kind=KINDS,
)
def test_any_bytes_give_a_data_error_that_names_the_file(tmp_path, raw, suffix, kind):
    name = f"data.{suffix}"
    (tmp_path / name).write_bytes(raw)
    message = outcome(kind, tmp_path / name)
    if message is None:
        return
    assert message.startswith(name), message
    if match := re.match(rf"{re.escape(name)}:(\d+): ", message):
        assert 1 <= int(match[1]) <= raw.count(b"\n") + raw.count(b"\r") + 1, message


# ---- the minimal examples the properties found, kept as regressions -------------------------------

PAIR = {"prompt": "Hi", "chosen": "Yes.", "rejected": "No."}


@pytest.mark.parametrize("suffix", ["jsonl", "json"])
def test_a_json_file_with_a_byte_order_mark_is_read(tmp_path, suffix):
    """Was: `invalid JSON (Unexpected UTF-8 BOM (decode using utf-8-sig) at column 1)`."""
    body = json.dumps(PAIR) if suffix == "jsonl" else json.dumps([PAIR])
    path = write(tmp_path / f"pairs.{suffix}", BOM + body + "\n")
    assert load_preferences(path) == [PAIR]


@pytest.mark.parametrize("suffix", ["jsonl", "json"])
def test_nesting_deeper_than_the_parser_goes_is_a_data_error(tmp_path, suffix):
    """Was: RecursionError out of json.loads."""
    deep = "[" * 100_000 + "]" * 100_000
    text = json.dumps(PAIR) + "\n" + deep + "\n" if suffix == "jsonl" else "[\n" + deep + "\n]"
    with pytest.raises(DataError, match=rf"^pairs.{suffix}(:2)?: invalid JSON \(nested too deeply\)$"):
        load_preferences(write(tmp_path / f"pairs.{suffix}", text))


@pytest.mark.parametrize("suffix", ["jsonl", "json"])
def test_an_integer_past_pythons_digit_limit_is_a_data_error_at_its_line(tmp_path, suffix):
    """Was: ValueError `Exceeds the limit (4300 digits) for integer string conversion` out of json.loads."""
    row = '{"prompt": "Hi", "chosen": "Yes.", "rejected": ' + "7" * 5000 + "}"
    text = json.dumps(PAIR) + "\n" + row + "\n" if suffix == "jsonl" else "[\n" + row + "\n]"
    with pytest.raises(
        DataError, match=rf"^pairs.{suffix}:2: invalid JSON \(Exceeds the limit \(4300 digits\)"
    ):
        load_preferences(write(tmp_path / f"pairs.{suffix}", text))


def test_nesting_around_the_parsers_limit_is_read_or_refused_never_a_crash(tmp_path):
    """How deep json.loads goes depends on the stack it starts from: every depth either reaches the
    validation (an unknown role) or is refused as nested too deeply, both on line 1."""
    seen = set()
    for depth in range(900, 1101, 8):
        role = "[" * depth + "]" * depth
        line = '{"prompt": [{"role": ' + role + ', "content": "Hi"}]}'
        with pytest.raises(DataError, match=r"^prompts.jsonl:1: ") as err:
            load_prompts(write(tmp_path / "prompts.jsonl", line + "\n"))
        seen.add("nested too deeply" in str(err.value))
    assert seen == {True, False}


def test_a_bad_row_is_reported_before_a_later_unreadable_line(tmp_path):
    """Was: every line was parsed before any was validated, so line 2's JSON error hid line 1's."""
    path = write(tmp_path / "pairs.jsonl", '{"prompt": "Hi"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r'^pairs.jsonl:1: missing field "chosen"'):
        load_preferences(path)
    path = write(tmp_path / "pairs.csv", "prompt,chosen,rejected\nHi,,No.\nHi,Yes.\n")
    with pytest.raises(DataError, match=r'^pairs.csv:2: field "chosen" is empty$'):
        load_preferences(path)


def test_a_csv_header_that_names_a_column_twice_is_refused(tmp_path):
    """Was: the last "prompt" cell silently won (csv.DictReader), so the row's error pointed elsewhere."""
    path = write(tmp_path / "prompts.csv", "prompt,prompt\nHi,\n")
    with pytest.raises(DataError, match=r"^prompts.csv:1: the header names column 'prompt' twice$"):
        load_prompts(path)


def test_a_csv_cell_longer_than_the_csv_modules_default_limit_is_read(tmp_path):
    """Was: csv.Error `field larger than field limit (131072)`."""
    prompt = "word " * 40_000
    path = write(tmp_path / "prompts.csv", f"prompt\n{prompt}\n")
    assert load_prompts(path) == [{"prompt": prompt}]


def test_invalid_utf8_in_csv_and_json_names_the_line(tmp_path):
    """Was: the byte offset only, and for CSV an offset within a read buffer, not the file."""
    for name, head in [("prompts.csv", b"prompt\nHi\n"), ("prompts.json", b'[\n{"prompt": "Hi"},\n')]:
        (tmp_path / name).write_bytes(head + b'{"prompt": "\xff"}\n')
        with pytest.raises(
            DataError, match=rf"^{re.escape(name)}:3: not valid UTF-8 text \(byte {len(head) + 12}\)$"
        ):
            load_prompts(tmp_path / name)


def test_a_csv_row_spanning_lines_is_reported_at_its_first_line(tmp_path):
    path = write(tmp_path / "pairs.csv", 'prompt,chosen,rejected\nP,C,R\n"Two\nlines",,No.\n')
    with pytest.raises(DataError, match=r'^pairs.csv:3: field "chosen" is empty$'):
        load_preferences(path)
