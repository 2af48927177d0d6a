"""Reading and validating datasets: every format gives the same rows; every kind of bad input gives a
DataError that names the file, the line (or row) and what is wrong."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd
import pytest

from prefalign.data import DataError, is_conversational, load_preferences, load_prompts, load_sft

GOOD = {"prompt": "Was the movie good?", "chosen": "Yes.", "rejected": "No."}


def write_jsonl(tmp_path: Path, lines: list[str], name: str = "pairs.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def rows_then_bad(bad: dict | str, n_good: int = 2) -> list[str]:
    """``n_good`` valid lines, then the bad one on line ``n_good + 1``."""
    return [json.dumps(GOOD)] * n_good + [bad if isinstance(bad, str) else json.dumps(bad)]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


# ---- every source format gives the same rows ---------------------------------------------------


def test_standard_pairs_keep_strings_and_extra_fields(assets):
    rows = load_preferences(assets / "pairs.jsonl")
    assert len(rows) == 4
    assert rows[0]["prompt"] == "Write a short review of the movie."
    assert rows[0]["source"] == "handwritten"  # extra field kept untouched
    assert rows[1]["chosen"] == "It is delightful and gripping."
    assert not any(is_conversational(r) for r in rows)


@pytest.mark.parametrize("fmt", ["json", "json_splits", "csv", "parquet", "saved_dataset", "saved_dict"])
def test_every_format_reads_the_same_rows(assets, tmp_path, fmt):
    expected = load_preferences(assets / "pairs.jsonl")
    df = pd.read_json(assets / "pairs.jsonl", lines=True).fillna("")
    records = [{k: v for k, v in row.items() if v != ""} for row in df.to_dict("records")]
    if fmt == "json":
        source = tmp_path / "pairs.json"
        source.write_text(json.dumps(records))
    elif fmt == "json_splits":
        source = tmp_path / "pairs.json"
        source.write_text(json.dumps({"train": records, "test": records[:1]}))
    elif fmt == "csv":
        source = tmp_path / "pairs.csv"
        df.to_csv(source, index=False)
        expected[1:] = [{**r, "source": ""} for r in expected[1:]]  # CSV cells exist for every row
    elif fmt == "parquet":
        source = tmp_path / "pairs.parquet"
        df.to_parquet(source)
        expected[1:] = [{**r, "source": ""} for r in expected[1:]]
    else:
        import datasets

        ds = datasets.Dataset.from_list([{**r, "source": r.get("source", "")} for r in records])
        expected[1:] = [{**r, "source": ""} for r in expected[1:]]
        source = tmp_path / "saved"
        (datasets.DatasetDict({"train": ds}) if fmt == "saved_dict" else ds).save_to_disk(str(source))
    assert load_preferences(source) == expected


def test_folder_of_split_files_picks_the_split(assets, tmp_path):
    (tmp_path / "test.jsonl").write_text(json.dumps(GOOD) + "\n")
    (tmp_path / "train.jsonl").write_text((assets / "pairs.jsonl").read_text())
    assert load_preferences(tmp_path, split="test") == [GOOD]
    assert len(load_preferences(tmp_path)) == 4


def test_saved_dataset_dict_without_the_split_names_the_available_ones(assets, tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([GOOD])}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"d: no split 'validation' \(available: train\)"):
        load_preferences(tmp_path / "d", split="validation")


def test_conversational_pairs_and_implicit_prompts(assets):
    rows = load_preferences(assets / "pairs_chat.jsonl")
    assert all(is_conversational(r) for r in rows)
    explicit, implicit, multi_turn = rows
    assert explicit["prompt"][0]["role"] == "system"
    assert explicit["chosen"] == [assistant("A brilliant film worth seeing.")]
    assert implicit["prompt"] == [user("Was the movie good?")]
    assert implicit["chosen"] == [assistant("Yes, delightful and gripping.")]
    assert implicit["rejected"] == [assistant("No, tedious and messy.")]
    # Longest common prefix: user, assistant "Which film?", user; then the completions differ.
    assert [m["content"] for m in multi_turn["prompt"]] == ["Review the film.", "Which film?", "The movie."]
    assert multi_turn["chosen"] == [assistant("It is wonderful and moving.")]


def test_conversational_pairs_through_parquet_with_null_prompts(assets, tmp_path):
    """Parquet stores the implicit-prompt rows' missing prompt as null; they still split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = [json.loads(line) for line in (assets / "pairs_chat.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(raw), tmp_path / "pairs_chat.parquet")
    assert load_preferences(tmp_path / "pairs_chat.parquet") == load_preferences(assets / "pairs_chat.jsonl")


def test_string_prompt_with_whole_conversations_must_match_their_shared_start(tmp_path):
    """UltraFeedback-binarized layout: prompt text, chosen/rejected are [user, assistant]."""
    row = {
        "prompt": "Hi",
        "chosen": [user("Hi"), assistant("Hello!")],
        "rejected": [user("Hi"), assistant("Go.")],
    }
    path = write_jsonl(tmp_path, [json.dumps(row), json.dumps({**row, "prompt": "Hey"})])
    with pytest.raises(DataError, match=r'pairs.jsonl:2: field "prompt" does not match'):
        load_preferences(path)
    (out,) = load_preferences(write_jsonl(tmp_path, [json.dumps(row)]))
    assert out == {"prompt": [user("Hi")], "chosen": [assistant("Hello!")], "rejected": [assistant("Go.")]}


def test_mixed_forms_become_conversational(tmp_path):
    row = {"prompt": "Hi", "chosen": [assistant("Hello!")], "rejected": "Go away."}
    (out,) = load_preferences(write_jsonl(tmp_path, [json.dumps(row)]))
    assert out == {
        "prompt": [user("Hi")],
        "chosen": [assistant("Hello!")],
        "rejected": [assistant("Go away.")],
    }


def test_equal_pairs_are_dropped_with_one_warning(tmp_path):
    same = {"prompt": "P", "chosen": "same", "rejected": "same"}
    path = write_jsonl(tmp_path, [json.dumps(same), json.dumps(GOOD), json.dumps(same)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = load_preferences(path)
    assert rows == [GOOD]
    assert [str(w.message) for w in caught] == [
        "pairs.jsonl: dropped 2 of 3 pairs whose chosen equals rejected"
    ]


def test_only_equal_pairs_is_an_error(tmp_path):
    path = write_jsonl(tmp_path, [json.dumps({"prompt": "P", "chosen": "x", "rejected": "x"})])
    with pytest.warns(UserWarning), pytest.raises(DataError, match="pairs.jsonl: no usable preference pairs"):
        load_preferences(path)


def test_sft_forms(assets):
    rows = load_sft(assets / "sft.jsonl") + load_sft(assets / "sft_chat.jsonl")
    assert [sorted(r) for r in rows] == [
        ["completion", "prompt"],
        ["completion", "prompt"],
        ["text"],
        ["messages"],
        ["messages"],
    ]


def test_prompt_forms(assets):
    rows = load_prompts(assets / "prompts.jsonl")
    assert [is_conversational(r) for r in rows] == [False, False, True]


# ---- one test per kind of bad input ------------------------------------------------------------


def test_invalid_json_names_the_line(tmp_path):
    path = write_jsonl(tmp_path, rows_then_bad('{"prompt": "P", "chosen": "C", "rejected": }'))
    with pytest.raises(DataError, match=r"^pairs.jsonl:3: invalid JSON \(Expecting value at column 44\)$"):
        load_preferences(path)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"^pairs.jsonl:2: not valid UTF-8 text$"):
        load_preferences(path)


def test_invalid_json_array_file_names_the_line(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text('[\n  {"prompt": "P",\n   "chosen" "C"}\n]')
    with pytest.raises(DataError, match=r"^pairs.json:3: invalid JSON \(Expecting ':' delimiter"):
        load_preferences(path)


def test_missing_field_names_the_line_and_field(tmp_path):
    path = write_jsonl(tmp_path, rows_then_bad({"prompt": "P", "chosen": "C"}))
    with pytest.raises(
        DataError, match=r'^pairs.jsonl:3: missing field "rejected" \(fields: prompt, chosen\)$'
    ):
        load_preferences(path)


def test_wrong_type_names_the_line_and_type(tmp_path):
    path = write_jsonl(tmp_path, rows_then_bad({**GOOD, "chosen": 5}))
    with pytest.raises(
        DataError, match=r'^pairs.jsonl:3: field "chosen" must be text or a list of messages, got int$'
    ):
        load_preferences(path)


def test_empty_text_names_the_line_and_field(tmp_path):
    path = write_jsonl(tmp_path, rows_then_bad({**GOOD, "chosen": "  "}))
    with pytest.raises(DataError, match=r'^pairs.jsonl:3: field "chosen" is empty$'):
        load_preferences(path)


def test_unknown_role_names_the_message(tmp_path):
    bad = {
        "prompt": [{"role": "bot", "content": "hi"}],
        "chosen": [assistant("a")],
        "rejected": [assistant("b")],
    }
    path = write_jsonl(tmp_path, rows_then_bad(bad))
    with pytest.raises(
        DataError, match=r"^pairs.jsonl:3: prompt\[0\] has unknown role 'bot' \(allowed: system"
    ):
        load_preferences(path)


def test_message_without_content(tmp_path):
    bad = {"prompt": [user("hi")], "chosen": [{"role": "assistant"}], "rejected": [assistant("b")]}
    path = write_jsonl(tmp_path, rows_then_bad(bad))
    with pytest.raises(DataError, match=r'^pairs.jsonl:3: chosen\[0\] is missing field "content"$'):
        load_preferences(path)


def test_empty_message_content(tmp_path):
    bad = {"prompt": [user("")], "chosen": [assistant("a")], "rejected": [assistant("b")]}
    path = write_jsonl(tmp_path, rows_then_bad(bad))
    with pytest.raises(DataError, match=r'^pairs.jsonl:3: field "prompt\[0\].content" is empty$'):
        load_preferences(path)


def test_row_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path, rows_then_bad('["P", "C", "R"]'))
    with pytest.raises(
        DataError, match=r"^pairs.jsonl:3: expected an object with prompt/chosen/rejected, got list$"
    ):
        load_preferences(path)


def test_plain_text_pair_without_prompt_asks_for_one(tmp_path):
    path = write_jsonl(tmp_path, rows_then_bad({"chosen": "C", "rejected": "R"}))
    with pytest.raises(
        DataError, match=r'^pairs.jsonl:3: missing field "prompt" \(chosen and rejected are plain text'
    ):
        load_preferences(path)


def test_completion_with_a_user_message(tmp_path):
    bad = {"prompt": [user("hi")], "chosen": [user("a")], "rejected": [assistant("b")]}
    path = write_jsonl(tmp_path, rows_then_bad(bad))
    with pytest.raises(
        DataError, match=r"^pairs.jsonl:3: chosen\[0\] has role 'user'; a completion holds assistant"
    ):
        load_preferences(path)


def test_prompt_ending_with_an_assistant_message(tmp_path):
    bad = {"prompt": [user("hi"), assistant("yo")], "chosen": [assistant("a")], "rejected": [assistant("b")]}
    path = write_jsonl(tmp_path, rows_then_bad(bad))
    with pytest.raises(DataError, match=r"^pairs.jsonl:3: prompt ends with an assistant message"):
        load_preferences(path)


def test_implicit_prompt_with_nothing_in_common(tmp_path):
    bad = {"chosen": [user("hi"), assistant("a")], "rejected": [user("hey"), assistant("b")]}
    path = write_jsonl(tmp_path, rows_then_bad(bad))
    with pytest.raises(DataError, match=r"^pairs.jsonl:3: chosen and rejected share no leading messages"):
        load_preferences(path)


def test_csv_line_numbers_count_quoted_newlines(tmp_path):
    """Row 1's prompt spans lines 2-3, so the empty cell of the second data row is on line 4."""
    path = tmp_path / "pairs.csv"
    path.write_text('prompt,chosen,rejected\n"Two\nlines",Yes.,No.\nP,,No.\n')
    with pytest.raises(DataError, match=r'^pairs.csv:4: field "chosen" is empty$'):
        load_preferences(path)


def test_csv_row_with_too_few_cells(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\nP,C,R\nP,C\n")
    with pytest.raises(DataError, match=r"^pairs.csv:3: wrong number of cells \(header has 3\)$"):
        load_preferences(path)


def test_parquet_null_names_the_row_index(tmp_path):
    path = tmp_path / "pairs.parquet"
    pd.DataFrame({"prompt": ["P", "P"], "chosen": ["C", None], "rejected": ["R", "R"]}).to_parquet(path)
    with pytest.raises(DataError, match=r'^pairs.parquet\[1\]: field "chosen" is null$'):
        load_preferences(path)


def test_sft_row_without_any_known_field(tmp_path):
    path = write_jsonl(tmp_path, ['{"text": "ok"}', '{"prompt": "P"}'], name="sft.jsonl")
    with pytest.raises(
        DataError, match=r'^sft.jsonl:2: missing field: expected "text", "prompt" and "completion"'
    ):
        load_sft(path)


def test_sft_messages_must_end_with_an_assistant_turn(tmp_path):
    path = write_jsonl(tmp_path, [json.dumps({"messages": [user("hi")]})], name="sft.jsonl")
    with pytest.raises(DataError, match=r'^sft.jsonl:1: field "messages" must end with an assistant message'):
        load_sft(path)


def test_prompt_row_with_wrong_type(tmp_path):
    path = write_jsonl(tmp_path, ['{"prompt": "ok"}', '{"prompt": 3}'], name="prompts.jsonl")
    with pytest.raises(
        DataError, match=r'^prompts.jsonl:2: field "prompt" must be text or a list of messages, got int$'
    ):
        load_prompts(path)


# ---- sources that are not there ------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope.jsonl: no such file or folder$"):
        load_preferences(tmp_path / "nope.jsonl")


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match=r"pairs.txt: unsupported file type '.txt'"):
        load_preferences(path)


def test_hub_id_that_cannot_be_loaded_says_where_it_looked(monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/pairs' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError) as err:
        load_preferences("someone/pairs")
    assert str(err.value) == (
        "someone/pairs: not found locally (no such file or folder) or on the Hugging Face hub "
        "(Couldn't reach 'someone/pairs' on the Hub (LocalEntryNotFoundError))"
    )


def test_hub_dataset_rows_are_validated_with_their_index(monkeypatch):
    import datasets

    ds = datasets.Dataset.from_list([GOOD, {**GOOD, "rejected": ""}])
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: ds)
    with pytest.raises(DataError, match=r"^someone/pairs\['train'\]\[1\]: field \"rejected\" is empty$"):
        load_preferences("someone/pairs")
