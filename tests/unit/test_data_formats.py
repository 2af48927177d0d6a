"""Every dataset format TRL documents (language modelling, prompt-only, prompt-completion, preference
with explicit and implicit prompt, unpaired preference; standard and conversational) is read into the
normalised rows the trainers use, and the unpaired loader's rules (boolean labels, paired data unpaired,
one kind per source) hold. The examples are TRL's own (its "Dataset formats and types" page)."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefalign.data import (
    DataError,
    encode_completion,
    encode_preference,
    encode_prompt,
    encode_unpaired,
    encode_unpaired_example,
    is_conversational,
    load_preferences,
    load_prompts,
    load_sft,
    load_unpaired,
    validate_preference,
    validate_unpaired,
)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def quietly(load, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load(*args, **kwargs)


ASK = [user("What color is the sky?")]

# (loader, the row as TRL documents it, the row the loader returns)
FORMATS = {
    "language modeling, standard": (load_sft, {"text": "The sky is blue."}, {"text": "The sky is blue."}),
    "language modeling, conversational": (
        load_sft,
        {"messages": [*ASK, assistant("It is blue.")]},
        {"messages": [*ASK, assistant("It is blue.")]},
    ),
    "prompt-only, standard": (load_prompts, {"prompt": "The sky is"}, {"prompt": "The sky is"}),
    "prompt-only, conversational": (load_prompts, {"prompt": ASK}, {"prompt": ASK}),
    "prompt-completion, standard": (
        load_sft,
        {"prompt": "The sky is", "completion": " blue."},
        {"prompt": "The sky is", "completion": " blue."},
    ),
    "prompt-completion, conversational": (
        load_sft,
        {"prompt": ASK, "completion": [assistant("It is blue.")]},
        {"prompt": ASK, "completion": [assistant("It is blue.")]},
    ),
    "preference, standard": (
        load_preferences,
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    ),
    "preference, standard, implicit prompt": (
        load_preferences,
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    ),
    "preference, conversational": (
        load_preferences,
        {"prompt": ASK, "chosen": [assistant("It is blue.")], "rejected": [assistant("It is green.")]},
        {"prompt": ASK, "chosen": [assistant("It is blue.")], "rejected": [assistant("It is green.")]},
    ),
    "preference, conversational, implicit prompt": (
        load_preferences,
        {"chosen": [*ASK, assistant("It is blue.")], "rejected": [*ASK, assistant("It is green.")]},
        {"prompt": ASK, "chosen": [assistant("It is blue.")], "rejected": [assistant("It is green.")]},
    ),
    "unpaired preference, standard": (
        load_unpaired,
        {"prompt": "The sky is", "completion": " blue.", "label": True},
        {"prompt": "The sky is", "completion": " blue.", "label": True},
    ),
    "unpaired preference, conversational": (
        load_unpaired,
        {"prompt": ASK, "completion": [assistant("It is green.")], "label": False},
        {"prompt": ASK, "completion": [assistant("It is green.")], "label": False},
    ),
}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_every_trl_format_is_read(tmp_path, name):
    load, row, expected = FORMATS[name]
    (out,) = quietly(load, write_jsonl(tmp_path / "data.jsonl", [row]))
    assert out == expected


# ---- implicit prompt in standard (text) pairs ---------------------------------------------------


@pytest.mark.parametrize(
    ("chosen", "rejected", "prompt"),
    [
        # differs inside a word ("bright"/"blue"): the cut moves back to the space, not "The sky is b"
        ("The sky is bright.", "The sky is blue.", "The sky is"),
        # HH-RLHF layout: the prompt ends with the assistant tag, the answers start with its space
        (
            "\n\nHuman: Hi\n\nAssistant: Hello there.",
            "\n\nHuman: Hi\n\nAssistant: Go away.",
            "\n\nHuman: Hi\n\nAssistant:",
        ),
        # one text is the other's start: the completions still keep at least one word each
        ("The sky is blue", "The sky is blue and green", "The sky is"),
    ],
)
def test_text_pairs_without_prompt_split_at_the_last_whitespace_before_they_differ(chosen, rejected, prompt):
    out = validate_preference({"chosen": chosen, "rejected": rejected}, "pairs.jsonl:1")
    assert out["prompt"] == prompt
    assert prompt + out["chosen"] == chosen and prompt + out["rejected"] == rejected
    assert out["chosen"][0].isspace() and out["chosen"].strip() and out["rejected"].strip()


def test_implicit_text_prompts_are_announced_once_with_their_count(tmp_path):
    rows = [{"chosen": "The sky is blue.", "rejected": "The sky is green."}] * 2
    rows.append({"prompt": "Grass is", "chosen": " green.", "rejected": " blue."})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_preferences(write_jsonl(tmp_path / "pairs.jsonl", rows))
    assert len(caught) == 1 and str(caught[0].message).startswith("pairs.jsonl: 2 of 3 pairs have no prompt;")


def test_text_pairs_sharing_no_whole_word_have_no_implicit_prompt(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": "Sunny", "rejected": "Sundown later"}])
    with pytest.raises(
        DataError, match=r'^pairs.jsonl:1: missing field "prompt" \(chosen and rejected are plain'
    ):
        load_preferences(path)


def test_a_null_prompt_with_nothing_to_split_is_reported_as_null(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": None, "chosen": "Yes", "rejected": "No"}])
    with pytest.raises(DataError, match=r'^pairs.jsonl:1: field "prompt" is null$'):
        load_preferences(path)


# ---- unpaired preference: labels ----------------------------------------------------------------


@pytest.mark.parametrize(("cell", "label"), [("true", True), ("False", False), ("TRUE", True)])
def test_csv_labels_are_the_text_true_or_false_in_any_case(tmp_path, cell, label):
    path = tmp_path / "kto.csv"
    path.write_text(f"prompt,completion,label\nThe sky is, blue.,{cell}\n")
    assert load_unpaired(path) == [{"prompt": "The sky is", "completion": " blue.", "label": label}]


@pytest.mark.parametrize(
    ("label", "shown"),
    [(1, "1"), (0, "0"), (0.5, "0.5"), ("yes", "'yes'"), (" true", "' true'"), ([True], "list")],
)
def test_a_label_that_is_not_true_or_false_is_refused(label, shown):
    row = {"prompt": "P", "completion": "C", "label": label}
    with pytest.raises(DataError, match=rf'^kto.jsonl:4: field "label" must be true or false, got {shown} '):
        validate_unpaired(row, "kto.jsonl:4")


def test_a_missing_or_null_label_is_named(tmp_path):
    with pytest.raises(DataError, match=r'^k:1: missing field "label" \(fields: prompt, completion\)$'):
        validate_unpaired({"prompt": "P", "completion": "C"}, "k:1")
    with pytest.raises(DataError, match=r'^k:1: field "label" is null$'):
        validate_unpaired({"prompt": "P", "completion": "C", "label": None}, "k:1")


def test_labels_from_parquet_are_booleans(tmp_path):
    import pandas as pd

    path = tmp_path / "kto.parquet"
    pd.DataFrame({"prompt": ["P", "Q"], "completion": ["a", "b"], "label": [True, False]}).to_parquet(path)
    assert [r["label"] for r in load_unpaired(path)] == [True, False]


def test_unpaired_completion_must_be_assistant_messages(tmp_path):
    row = {"prompt": ASK, "completion": [user("It is blue.")], "label": True}
    with pytest.raises(DataError, match=r"^kto.jsonl:1: completion\[0\] has role 'user'"):
        load_unpaired(write_jsonl(tmp_path / "kto.jsonl", [row]))


# ---- unpaired preference: paired data, one kind per source ------------------------------------


def test_pairs_given_as_unpaired_data_become_two_rows_each(tmp_path):
    rows = [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green.", "id": 7},
        {"chosen": [*ASK, assistant("Blue.")], "rejected": [*ASK, assistant("Green.")]},
    ]
    out = load_unpaired(write_jsonl(tmp_path / "pairs.jsonl", rows))
    assert out == [
        {"prompt": "The sky is", "completion": " blue.", "label": True, "id": 7},
        {"prompt": "The sky is", "completion": " green.", "label": False, "id": 7},
        {"prompt": ASK, "completion": [assistant("Blue.")], "label": True},
        {"prompt": ASK, "completion": [assistant("Green.")], "label": False},
    ]
    assert [r.where for r in out] == ["pairs.jsonl:1", "pairs.jsonl:1", "pairs.jsonl:2", "pairs.jsonl:2"]


def test_pairs_given_as_unpaired_data_drop_equal_pairs_with_a_warning(tmp_path):
    rows = [
        {"prompt": "P", "chosen": "same", "rejected": "same"},
        {"prompt": "P", "chosen": "a", "rejected": "b"},
    ]
    with pytest.warns(UserWarning, match="dropped 1 of 2 pairs whose chosen equals rejected"):
        out = load_unpaired(write_jsonl(tmp_path / "pairs.jsonl", rows))
    assert [(r["completion"], r["label"]) for r in out] == [("a", True), ("b", False)]


@pytest.mark.parametrize("first_paired", [True, False])
def test_mixing_paired_and_unpaired_rows_names_the_line(tmp_path, first_paired):
    pair = {"prompt": "P", "chosen": "a", "rejected": "b"}
    single = {"prompt": "P", "completion": "a", "label": True}
    rows = [pair, pair, single] if first_paired else [single, single, pair]
    kind, other = ("unpaired", "paired") if first_paired else ("paired", "unpaired")
    with pytest.raises(
        DataError, match=rf"^kto.jsonl:3: a {kind} row .* among {other} rows: the first row \(kto.jsonl:1\)"
    ):
        load_unpaired(write_jsonl(tmp_path / "kto.jsonl", rows))


def test_an_empty_unpaired_source_is_an_error(tmp_path):
    with pytest.raises(DataError, match="^kto.jsonl: no usable unpaired preference rows$"):
        load_unpaired(write_jsonl(tmp_path / "kto.jsonl", []))


# ---- unpaired rows as token ids -----------------------------------------------------------------


def test_an_unpaired_row_encodes_like_one_side_of_a_pair(tokenizer, tmp_path):
    pair = {"prompt": "Was the movie good?", "chosen": "Yes, very.", "rejected": "No."}
    good, bad = load_unpaired(write_jsonl(tmp_path / "pairs.jsonl", [pair]))
    ids = encode_preference(tokenizer, pair, max_length=256)
    for row, side in ((good, "chosen"), (bad, "rejected")):
        out = encode_unpaired_example(tokenizer, row, max_length=256)
        assert out["prompt_input_ids"] == ids["prompt_input_ids"] == encode_prompt(tokenizer, pair["prompt"])
        assert out["completion_input_ids"] == ids[f"{side}_input_ids"]
        assert out["label"] is (side == "chosen") and out["truncated"] is False


def test_unpaired_encoding_truncates_by_the_pair_rule_and_keeps_the_label(tokenizer):
    """Prompt of P tokens, completion of C tokens, max_length 12, max_prompt_length 6: P + C > 12, so the
    prompt keeps its last 6 tokens and the completion its first 12 - 6 = 6."""
    row = {"prompt": "word " * 20, "completion": "more words " * 10, "label": False}
    prompt = encode_prompt(tokenizer, row["prompt"])
    completion = encode_completion(tokenizer, row["prompt"], row["completion"])
    assert len(prompt) > 6 and len(completion) > 6
    (out,) = encode_unpaired(tokenizer, [row], max_length=12, max_prompt_length=6)
    assert out["prompt_input_ids"] == prompt[-6:]
    assert out["completion_input_ids"] == completion[:6]
    assert out["label"] is False and out["truncated"] is True


# ---- the documentation's examples ---------------------------------------------------------------


def test_every_example_of_the_data_formats_page_loads_as_it_says(tmp_path):
    """Each ```json block of docs/data_formats.md is one row; it loads with the loader its columns call
    for, so the page cannot show a format the loaders refuse."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "data_formats.md").read_text()
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)\n```", page, flags=re.S)]
    loaders = {"chosen": load_preferences, "label": load_unpaired, "completion": load_sft, "text": load_sft}
    loaders["messages"] = load_sft
    seen = set()
    for i, row in enumerate(blocks):
        load = next((loaders[k] for k in loaders if k in row), load_prompts)
        seen.add((load.__name__, is_conversational(row)))
        assert len(quietly(load, write_jsonl(tmp_path / f"{i}.jsonl", [row]))) == 1
    kinds = {"load_preferences", "load_unpaired", "load_sft", "load_prompts"}
    assert seen == {(k, c) for k in kinds for c in (False, True)}, seen


# ---- whatever an unpaired file holds, only a located DataError escapes ----------------------------

_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 2),
    st.sampled_from(["", " ", "true", "FALSE", "yes", "Hi there", "Hi you"]),
    st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                "role": st.sampled_from(["user", "assistant", "bot"]),
                "content": st.sampled_from(["", "x"]),
            },
        ),
        max_size=2,
    ),
)
_good_rows = [
    {"prompt": "Hi", "completion": "Hello.", "label": True},
    {"prompt": ASK, "completion": [assistant("Blue.")], "label": "false"},
    {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go."},
    {"chosen": [*ASK, assistant("Blue.")], "rejected": [*ASK, assistant("Green.")]},
]
_rows = st.one_of(
    st.sampled_from(_good_rows),
    st.dictionaries(
        st.sampled_from(["prompt", "completion", "label", "chosen", "rejected"]), _values, max_size=5
    ),
    _values,
)


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    rows=st.one_of(
        st.lists(_rows, max_size=5),
        # good rows of one kind first, so that loading succeeds as often as it fails
        st.sampled_from([_good_rows[:2], _good_rows[2:]])
        .flatmap(
            lambda good: st.tuples(
                st.lists(st.sampled_from(good), min_size=1, max_size=3), st.lists(_rows, max_size=2)
            )
        )
        .map(lambda parts: parts[0] + parts[1]),
    )
)
def test_load_unpaired_returns_boolean_labels_or_a_data_error_at_a_line(tmp_path, rows):
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    try:
        out = quietly(load_unpaired, path)
    except DataError as err:
        message = str(err)
        if message != "kto.jsonl: no usable unpaired preference rows":
            line = re.match(r"kto.jsonl:(\d+): ", message)
            assert line and 1 <= int(line[1]) <= len(rows), message
        return
    assert out and all(isinstance(r["label"], bool) for r in out)
    assert all(isinstance(r[k], (str, list)) and r[k] for r in out for k in ("prompt", "completion"))
