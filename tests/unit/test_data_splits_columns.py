"""Splits, subsets and column names as hub data sets ship them: a split or subset is read where the
source has it and refused (naming what is there) where it has not; a ``columns`` mapping renames before
validation, and every error names the data set's own column and the split it came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefalign.config import ConfigError
from prefalign.data import (
    DataError,
    load_preferences,
    load_prompts,
    load_sft,
    load_unpaired,
    parse_columns,
    read_rows,
    validate_preference,
)

PAIR = {"prompt": "Was it good?", "chosen": "Yes.", "rejected": "No."}


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def save(path: Path, splits: dict[str, list[dict]] | list[dict]) -> Path:
    """A DatasetDict of ``splits`` (or one Dataset of a list) saved as ``datasets`` saves it."""
    import datasets

    if isinstance(splits, list):
        datasets.Dataset.from_list(splits).save_to_disk(str(path))
    else:
        datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(
            str(path)
        )
    return path


@pytest.fixture
def prefs(tmp_path) -> Path:
    """UltraFeedback-binarized's layout: splits train_prefs and test_prefs, no train."""
    return save(
        tmp_path / "prefs",
        {
            "train_prefs": [PAIR, {**PAIR, "chosen": "Sure."}],
            "test_prefs": [{**PAIR, "chosen": "Indeed."}, {**PAIR, "rejected": ""}],
        },
    )


# ---- splits ---------------------------------------------------------------------------------------


def test_a_dataset_dict_with_several_splits_reads_the_one_asked_for(prefs):
    assert [r["chosen"] for r in load_preferences(prefs, split="train_prefs")] == ["Yes.", "Sure."]
    assert [where for where, _ in read_rows(prefs, split="test_prefs")] == [
        "prefs['test_prefs'][0]",
        "prefs['test_prefs'][1]",
    ]


def test_a_bad_row_is_located_in_its_split(prefs):
    with pytest.raises(DataError, match=r"""^prefs\['test_prefs'\]\[1\]: field "rejected" is empty$"""):
        load_preferences(prefs, split="test_prefs")


@pytest.mark.parametrize(("split", "missing"), [(None, "train"), ("validation", "validation")])
def test_a_split_that_is_not_there_names_the_ones_that_are(prefs, split, missing):
    with pytest.raises(
        DataError, match=rf"^prefs: no split '{missing}' \(available: train_prefs, test_prefs\)$"
    ):
        load_preferences(prefs, split=split)


def test_a_folder_of_split_files_names_its_splits(tmp_path):
    write_jsonl(tmp_path / "d" / "train.jsonl", [PAIR])
    (tmp_path / "d" / "test.csv").write_text("prompt,chosen,rejected\nP,C,R\n")
    assert load_preferences(tmp_path / "d", split="test") == [{"prompt": "P", "chosen": "C", "rejected": "R"}]
    with pytest.raises(DataError, match=r"^d: no split 'validation' \(available: test, train\)$"):
        load_preferences(tmp_path / "d", split="validation")


def test_a_json_object_of_splits(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps({"train": [PAIR], "test": [PAIR, {**PAIR, "chosen": 3}]}))
    assert load_preferences(path) == [PAIR]
    with pytest.raises(DataError, match=r"""^pairs.json\['test'\]\[1\]: field "chosen" must be text"""):
        load_preferences(path, split="test")
    with pytest.raises(DataError, match=r"^pairs.json: no split 'dev' \(available: train, test\)$"):
        load_preferences(path, split="dev")


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("pairs.jsonl", "a JSONL file"),
        ("pairs.csv", "a CSV file"),
        ("pairs.parquet", "a Parquet file"),
        ("pairs.json", "a JSON array"),
        ("saved", r"a saved Dataset \(not a DatasetDict\)"),
    ],
)
def test_a_split_for_a_source_without_splits_is_refused_not_ignored(tmp_path, name, kind):
    import pandas as pd

    path = tmp_path / name
    if name == "saved":
        save(path, [PAIR])
    elif name.endswith(".jsonl"):
        write_jsonl(path, [PAIR])
    elif name.endswith(".json"):
        path.write_text(json.dumps([PAIR]))
    elif name.endswith(".csv"):
        pd.DataFrame([PAIR]).to_csv(path, index=False)
    else:
        pd.DataFrame([PAIR]).to_parquet(path)
    assert load_preferences(path) == [PAIR]  # without the option it reads
    with pytest.raises(
        DataError, match=rf"^{name}: split 'train' given, but {kind} has no splits \(a split picks"
    ):
        load_preferences(path, split="train")


@pytest.mark.parametrize("saved", [False, True])
def test_a_subset_for_a_file_or_a_saved_dataset_is_refused(tmp_path, saved):
    path = save(tmp_path / "saved", {"train": [PAIR]}) if saved else write_jsonl(tmp_path / "p.jsonl", [PAIR])
    kind = "a saved dataset folder" if saved else "a single file"
    with pytest.raises(DataError, match=rf"^{path.name}: subset 'sst2' given, but {kind} has no subsets \("):
        load_preferences(path, subset="sst2")


# ---- subsets in a local folder --------------------------------------------------------------------


@pytest.fixture
def subsets(tmp_path) -> Path:
    """data/chat/ a saved DatasetDict, data/plain/ a folder of split files."""
    save(tmp_path / "data" / "chat", {"train": [PAIR], "test": [{**PAIR, "chosen": "Chat."}]})
    write_jsonl(tmp_path / "data" / "plain" / "train.jsonl", [{**PAIR, "chosen": "Plain."}])
    write_jsonl(tmp_path / "data" / "plain" / "test.jsonl", [PAIR, {**PAIR, "prompt": ""}])
    return tmp_path / "data"


def test_a_subset_is_a_sub_folder_read_with_its_split(subsets):
    assert [r["chosen"] for r in load_preferences(subsets, subset="chat", split="test")] == ["Chat."]
    assert [r["chosen"] for r in load_preferences(subsets, subset="plain")] == ["Plain."]
    assert [w for w, _ in read_rows(subsets, subset="chat")] == ["data/chat['train'][0]"]
    with pytest.raises(DataError, match=r'^data/plain/test.jsonl:2: field "prompt" is empty$'):
        load_preferences(subsets, subset="plain", split="test")


def test_a_subset_that_is_not_there_names_the_sub_folders(subsets):
    with pytest.raises(
        DataError, match=r"^data: no subset 'code' \(no sub-folder of that name; sub-folders: chat, plain\)$"
    ):
        load_preferences(subsets, subset="code")


def test_a_folder_of_subsets_read_without_one_says_so(subsets):
    with pytest.raises(DataError, match=r"its sub-folders \(chat, plain\) may be subsets$"):
        load_preferences(subsets)


@pytest.mark.parametrize(
    ("load", "row"),
    [
        (load_sft, {"text": "Hello."}),
        (load_prompts, {"prompt": "Hello"}),
        (load_unpaired, {"prompt": "Hi", "completion": "Hello.", "label": True}),
    ],
)
def test_every_loader_takes_split_and_subset(tmp_path, load, row):
    write_jsonl(tmp_path / "d" / "sub" / "train.jsonl", [{"text": "no"}])
    write_jsonl(tmp_path / "d" / "sub" / "eval.jsonl", [row])
    (out,) = load(tmp_path / "d", subset="sub", split="eval")
    assert out == row and out.where == "d/sub/eval.jsonl:1"


def test_a_clone_of_a_hub_repository_reads_its_shards_in_order(tmp_path):
    """The hub's layout: the default config's shards in data/, another config's in <config>/."""
    import pandas as pd

    repo = tmp_path / "ultrafeedback"
    (repo / "data").mkdir(parents=True)
    (repo / "README.md").write_text("---\nconfigs: ...\n---\n")
    for i, chosen in enumerate(["One.", "Two."]):
        shard = repo / "data" / f"train_prefs-0000{i}-of-00002.parquet"
        pd.DataFrame([{**PAIR, "chosen": chosen}]).to_parquet(shard)
    pd.DataFrame([{**PAIR, "chosen": None}]).to_parquet(repo / "data" / "test_prefs-00000-of-00001.parquet")
    write_jsonl(repo / "chat" / "train-00000-of-00001.jsonl", [{**PAIR, "chosen": "Chat."}])

    rows = load_preferences(repo, split="train_prefs")
    assert [r["chosen"] for r in rows] == ["One.", "Two."]
    assert [r.where for r in rows] == [
        "ultrafeedback/data/train_prefs-00000-of-00002.parquet[0]",
        "ultrafeedback/data/train_prefs-00001-of-00002.parquet[0]",
    ]
    with pytest.raises(
        DataError,
        match=r'^ultrafeedback/data/test_prefs-00000-of-00001.parquet\[0\]: field "chosen" is null$',
    ):
        load_preferences(repo, split="test_prefs")
    with pytest.raises(
        DataError, match=r"^ultrafeedback/data: no split 'train' \(available: test_prefs, train_prefs\)$"
    ):
        load_preferences(repo)
    assert [r["chosen"] for r in load_preferences(repo, subset="chat")] == ["Chat."]


# ---- splits and subsets on the hub ------------------------------------------------------------------


class FakeHub:
    """``datasets.load_dataset`` for one hub data set with configs and splits, recording its calls."""

    def __init__(self, configs: dict[str, dict[str, list[dict]]]) -> None:
        self.configs, self.calls = configs, []

    def load_dataset(self, path, name=None, split=None):
        import datasets

        self.calls.append({"path": path, "name": name, "split": split})
        config = name or "default"
        if config not in self.configs:
            raise ValueError(f"BuilderConfig '{config}' not found. Available: {list(self.configs)}")
        if split not in self.configs[config]:
            raise ValueError(f'Unknown split "{split}". Should be one of {list(self.configs[config])}.\nmore')
        return datasets.Dataset.from_list(self.configs[config][split])

    def split_names(self, path, config_name=None):
        return list(self.configs[config_name or "default"])

    def config_names(self, path):
        return list(self.configs)


@pytest.fixture
def hub(monkeypatch) -> FakeHub:
    import datasets

    fake = FakeHub(
        {
            "default": {"train_prefs": [PAIR], "test_prefs": [PAIR]},
            "mrpc": {"train": [PAIR], "test": [PAIR, {**PAIR, "chosen": None}]},
        }
    )
    monkeypatch.setattr(datasets, "load_dataset", fake.load_dataset)
    monkeypatch.setattr(datasets, "get_dataset_split_names", fake.split_names)
    monkeypatch.setattr(datasets, "get_dataset_config_names", fake.config_names)
    return fake


def test_a_hub_subset_is_its_config_name_and_labels_name_both(hub):
    with pytest.raises(
        DataError, match=r"""^someone/pairs\['mrpc'\]\['test'\]\[1\]: field "chosen" is null$"""
    ):
        load_preferences("someone/pairs", subset="mrpc", split="test")
    assert hub.calls == [{"path": "someone/pairs", "name": "mrpc", "split": "test"}]
    assert load_preferences("someone/pairs", split="train_prefs") == [PAIR]
    assert hub.calls[-1] == {"path": "someone/pairs", "name": None, "split": "train_prefs"}


def test_a_hub_split_that_is_not_there_names_the_ones_that_are(hub):
    with pytest.raises(
        DataError, match=r"^someone/pairs: no split 'train' \(available: train_prefs, test_prefs\)$"
    ):
        load_preferences("someone/pairs")
    with pytest.raises(
        DataError, match=r"^someone/pairs\['mrpc'\]: no split 'dev' \(available: train, test\)$"
    ):
        load_preferences("someone/pairs", subset="mrpc", split="dev")


def test_a_hub_subset_that_is_not_there_names_the_ones_that_are(hub):
    with pytest.raises(DataError, match=r"^someone/pairs: no subset 'cola' \(available: default, mrpc\)$"):
        load_preferences("someone/pairs", subset="cola")


def test_without_the_hubs_lists_the_first_line_of_its_own_error_is_kept(hub, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "get_dataset_split_names", offline)
    with pytest.raises(DataError) as err:
        load_preferences("someone/pairs")
    assert str(err.value) == (
        """someone/pairs: cannot read split 'train' (Unknown split "train". Should be one of """
        """['train_prefs', 'test_prefs'].)"""
    )


# ---- columns: parsing -----------------------------------------------------------------------------


def test_parse_columns_reads_the_command_line_form():
    assert parse_columns("prompt=question,chosen=good, rejected = bad") == {
        "prompt": "question",
        "chosen": "good",
        "rejected": "bad",
    }
    assert parse_columns("answer=solution") == {"answer": "solution"}  # any extra canonical name
    assert parse_columns("") == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prompt", "entry 'prompt' is not canonical=column"),
        ("prompt=question;chosen=good", "entry 'prompt=question;chosen=good' is not canonical=column"),
        ("prompt=", "entry 'prompt=' has an empty name"),
        ("=question", "entry '=question' has an empty name"),
        ("prompt=q,,chosen=c", "an empty entry"),
        ("prompt=q,prompt=r", "'prompt' is given twice"),
        ("prompt=q,chosen=q", "column 'q' is given for both 'prompt' and 'chosen'"),
    ],
)
def test_parse_columns_refuses_malformed_text_in_one_line(text, message):
    with pytest.raises(ConfigError, match=rf"^--columns .*({message})") as err:
        parse_columns(text)
    assert "\n" not in str(err.value)


# ---- columns: renaming before validation ------------------------------------------------------------

MAPPED = {"question": "Was it good?", "good": "Yes.", "bad": "No.", "id": 1}
COLUMNS = {"prompt": "question", "chosen": "good", "rejected": "bad"}


def test_columns_rename_before_validation_and_keep_the_other_columns(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [MAPPED])
    assert load_preferences(path, columns=COLUMNS) == [{**PAIR, "id": 1}]


def test_columns_apply_to_csv_labels_and_to_extra_names(tmp_path):
    path = tmp_path / "kto.csv"
    path.write_text("question,answer,ok\nWas it good?,Yes.,TRUE\n")
    out = load_unpaired(path, columns=parse_columns("prompt=question,completion=answer,label=ok"))
    assert out == [{"prompt": "Was it good?", "completion": "Yes.", "label": True}]
    prompts = write_jsonl(tmp_path / "math.jsonl", [{"question": "1+1?", "solution": "2"}])
    assert load_prompts(prompts, columns={"prompt": "question", "answer": "solution"}) == [
        {"prompt": "1+1?", "answer": "2"}
    ]


def test_columns_may_swap_two_names(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [PAIR])
    assert load_preferences(path, columns={"chosen": "rejected", "rejected": "chosen"}) == [
        {"prompt": "Was it good?", "chosen": "No.", "rejected": "Yes."}
    ]


def test_a_row_without_the_mapped_column_names_it_and_the_mapping(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [MAPPED, MAPPED, {"q": "Hi", "good": "Y", "bad": "N"}])
    with pytest.raises(
        DataError,
        match=r'^pairs.jsonl:3: no column "question" \(--columns prompt=question\); columns: q, good, bad$',
    ):
        load_preferences(path, columns=COLUMNS)


def test_a_canonical_column_beside_the_renamed_one_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{**MAPPED, "prompt": "Another prompt"}])
    with pytest.raises(
        DataError,
        match=r'^pairs.jsonl:1: column "prompt" is there beside "question", which --columns prompt=question renames',
    ):
        load_preferences(path, columns=COLUMNS)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({**MAPPED, "good": " "}, r'field "good" \(--columns chosen=good\) is empty$'),
        ({**MAPPED, "good": 5}, r'field "good" \(--columns chosen=good\) must be text or a list of messages'),
        (
            {
                **MAPPED,
                "question": [{"role": "user", "content": ""}],
                "good": [{"role": "assistant", "content": "Y"}],
            },
            r'field "question\[0\].content" \(--columns prompt=question\) is empty$',
        ),
        (
            {**MAPPED, "good": [{"role": "user", "content": "Y"}]},
            r"good\[0\] \(--columns chosen=good\) has role 'user'; a completion holds assistant messages only$",
        ),
        (
            {
                "question": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}],
                "good": "Y",
                "bad": "N",
            },
            r"question \(--columns prompt=question\) ends with an assistant message",
        ),
    ],
)
def test_validation_errors_name_the_data_sets_column(tmp_path, row, message):
    path = write_jsonl(tmp_path / "pairs.jsonl", [MAPPED, row])
    with pytest.raises(DataError, match=rf"^pairs.jsonl:2: {message}"):
        load_preferences(path, columns=COLUMNS)


def test_a_missing_unmapped_field_lists_the_columns_by_their_own_names(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"question": "Hi", "good": "Y"}])
    with pytest.raises(
        DataError, match=r'^pairs.jsonl:1: missing field "rejected" \(fields: question, good\)$'
    ):
        load_preferences(path, columns={"prompt": "question", "chosen": "good"})


def test_the_validate_functions_take_columns_too():
    assert validate_preference(MAPPED, "x:1", columns=COLUMNS) == {**PAIR, "id": 1}


def test_a_malformed_mapping_given_in_python_is_a_config_error(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [PAIR])
    with pytest.raises(ConfigError, match="column 'prompt' is given for both 'chosen' and 'rejected'"):
        load_preferences(path, columns={"chosen": "prompt", "rejected": "prompt"})
