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

    monkeypatch.setattr("prefalign.rewards.run_score", no_scoring)
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
