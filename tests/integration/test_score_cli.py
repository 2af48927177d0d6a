"""`prefalign score`: rewards for rows of prompt + completion, from VADER or a reward model."""

from __future__ import annotations

import json

import pytest

from prefalign.cli import main
from prefalign.rewards import ModelReward, vader_scores

ROWS = [
    {"prompt": "The movie", "completion": " was a wonderful, moving surprise."},
    {"prompt": "It was", "response": " dull, clumsy and far too long.", "sample": 0},
    {"prompt": [{"role": "user", "content": "Review it."}], "completion": " Fine."},
]


def test_score_with_sentiment_adds_vaders_score_and_keeps_the_fields(tmp_path):
    data = tmp_path / "samples.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "scored.jsonl"
    assert main(["score", "--data", str(data), "--output", str(out), "--reward", "sentiment"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = vader_scores([ROWS[0]["completion"], ROWS[1]["response"], ROWS[2]["completion"]])
    assert [r["reward"] for r in rows] == expected
    assert rows[0]["reward"] > 0.5 and rows[1]["reward"] < -0.3
    assert rows[1]["sample"] == 0


def test_score_with_a_reward_model_matches_the_python_source(tmp_path, tiny_model_dir):
    from prefalign.models import load_reward_model

    rm = tmp_path / "rm"
    load_reward_model(str(tiny_model_dir)).save_pretrained(rm)
    from prefalign.models import load_tokenizer

    load_tokenizer(str(tiny_model_dir)).save_pretrained(rm)
    data = tmp_path / "samples.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    out = tmp_path / "scored.jsonl"
    assert main(["score", "--data", str(data), "--output", str(out), "--reward-model", str(rm)]) == 0
    got = [json.loads(line)["reward"] for line in out.read_text().splitlines()]
    source = ModelReward(str(rm))
    assert got == pytest.approx(source(["The movie", "It was"], [ROWS[0]["completion"], ROWS[1]["response"]]))


def test_score_names_the_row_without_a_completion(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(
        json.dumps({"prompt": "x", "completion": "y"}) + "\n" + json.dumps({"prompt": "x"}) + "\n"
    )
    assert (
        main(["score", "--data", str(data), "--output", str(tmp_path / "o.jsonl"), "--reward", "sentiment"])
        == 2
    )
    assert 'bad.jsonl:2: missing field "completion"' in capsys.readouterr().err


def test_an_output_that_cannot_be_written_is_refused_before_scoring(tmp_path, capsys, monkeypatch):
    data = tmp_path / "samples.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    taken = tmp_path / "taken"
    taken.write_text("")

    def no_scoring(config):
        raise AssertionError("scored before checking the output")

    monkeypatch.setattr("prefalign.score_command.run_score", no_scoring)
    for out, why in ((tmp_path, "is a folder"), (taken / "scored.jsonl", "which is a file")):
        assert main(["score", "--data", str(data), "--output", str(out), "--reward", "sentiment"]) == 2
        assert why in capsys.readouterr().err


def test_a_plain_language_model_is_refused_as_a_reward_model(tmp_path, tiny_model_dir, capsys):
    """A causal-LM folder has no trained ``score`` head: scoring with it used to warn and return the
    outputs of a freshly initialised random head. Now one line naming the folder, exit 2, no output."""
    data = tmp_path / "samples.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    out = tmp_path / "scored.jsonl"
    argv = ["score", "--data", str(data), "--output", str(out), "--reward-model", str(tiny_model_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"prefalign score: error: {tiny_model_dir}: no trained reward head"), err
    assert "score.weight" in err[0] and "prefalign reward" in err[0]
    assert not out.exists()


def test_a_classifier_with_two_labels_is_refused_as_a_reward_model(tmp_path, tiny_model_dir, capsys):
    """A sequence classifier with 2 labels used to end in transformers' size-mismatch RuntimeError
    traceback; now one line saying its head has 2 outputs where a reward model has one."""
    from transformers import AutoModelForSequenceClassification

    from prefalign.models import load_tokenizer

    two = tmp_path / "two-labels"
    AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=2).save_pretrained(two)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(two)
    data = tmp_path / "samples.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    out = tmp_path / "scored.jsonl"
    assert main(["score", "--data", str(data), "--output", str(out), "--reward-model", str(two)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"prefalign score: error: {two}: its head score.weight has 2 outputs (a classifier with 2 labels), "
        "but a reward model has one: give a `prefalign reward` output folder"
    )
    assert not out.exists()


MATH = [
    {"prompt": "2 + 2?", "completion": r"It is \boxed{4}.", "answer": 4, "id": "a"},
    {"prompt": "10 * 100?", "completion": "That makes 1,000", "answer": "1000.0", "id": "b"},
    {"prompt": [{"role": "user", "content": "3 - 5?"}], "completion": "5", "answer": -2, "id": "c"},
]

COLUMN_FUNCTIONS = '''
def close(prompts, completions, answer, id):
    """1 / (1 + |last number - answer|), after checking the columns arrived in order; messages stay messages."""
    assert id == ["a", "b", "c"] and isinstance(prompts[2], list)
    return [1 / (1 + abs(float(c.replace(",", "").split()[-1].strip(".{}boxed\\\\")) - float(a)))
            for c, a in zip(completions, answer)]

def strict(prompts, completions):
    return [0.0] * len(completions)
'''


@pytest.fixture
def math_rows(tmp_path, monkeypatch):
    (tmp_path / "column_functions.py").write_text(COLUMN_FUNCTIONS)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MATH))
    return data


def test_score_with_accuracy_and_format_writes_the_total_and_each_source(math_rows, tmp_path):
    """accuracy + 0.5 x format(boxed): row a is right and boxed (1.5), row b right in words (1,000 =
    1000.0: 1), row c wrong (0); every input field is kept."""
    out = tmp_path / "scored.jsonl"
    args = ["score", "--data", str(math_rows), "--output", str(out), "--reward", "accuracy", "--reward", "format",
            "--format-pattern", r"\\boxed\{", "--reward-weights", "1,0.5"]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["reward"] for r in rows] == [1.5, 1.0, 0.0]
    assert [r["reward/accuracy"] for r in rows] == [1.0, 1.0, 0.0]
    assert [r["reward/format"] for r in rows] == [1.0, 0.0, 0.0]
    assert [{k: r[k] for k in MATH[0]} for r in rows] == MATH


def test_score_passes_every_other_column_to_a_function(math_rows, tmp_path):
    out = tmp_path / "scored.jsonl"
    args = ["score", "--data", str(math_rows), "--output", str(out), "--reward", "column_functions:close"]
    assert main(args) == 0
    assert [json.loads(line)["reward"] for line in out.read_text().splitlines()] == [1.0, 1.0, 1 / 8]


@pytest.mark.parametrize(
    ("reward", "message"),
    [
        ("column_functions:strict", "reward column_functions:strict: the function does not accept the column 'answer'"),
        ("accuracy", 'reward accuracy: plain.jsonl has no column "answer"'),
    ],
)  # fmt: skip
def test_score_refuses_columns_a_reward_cannot_take_in_one_line(math_rows, tmp_path, capsys, reward, message):
    data = math_rows if reward != "accuracy" else tmp_path / "plain.jsonl"
    data.write_text(
        data.read_text() if reward != "accuracy" else json.dumps({"prompt": "p", "completion": "1"}) + "\n"
    )
    assert (
        main(["score", "--data", str(data), "--output", str(tmp_path / "o.jsonl"), "--reward", reward]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"prefalign score: error: {message}") and "\n" not in err
    assert not (tmp_path / "o.jsonl").exists()
