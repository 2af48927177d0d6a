"""SFT and reward-model training on tiny models: they learn, and the CLI runs them end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from prefalign.cli import main
from prefalign.losses import sequence_logps
from prefalign.testing import synthetic_pairs, tiny_causal_lm, tiny_tokenizer, write_jsonl
from prefalign.train.loop import read_metrics
from prefalign.train.reward import RewardConfig
from prefalign.train.reward import train as train_reward
from prefalign.train.sft import SFTConfig
from prefalign.train.sft import train as train_sft


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


def test_sft_first_loss_is_the_mean_completion_nll_and_training_lowers_it(model_dir, tmp_path):
    """Step 1's loss is computed before any update: the mean over examples of each example's mean NLL of
    its completion tokens, which a naive per-example forward reproduces."""
    from prefalign.data import encode_sft, load_sft

    rows = [{"prompt": "Say hi.", "completion": "Hi there, friend."}, {"text": "The movie was wonderful."}]
    data = write_jsonl(tmp_path / "sft.jsonl", rows * 4)
    tok = tiny_tokenizer()
    model = tiny_causal_lm(tokenizer=tok, hidden_size=64, seed=0)
    expected = []
    for row in load_sft(data)[:2]:
        ex = encode_sft(tok, row, 64)
        labels = torch.tensor([ex["labels"]])
        n = int((labels[0, 1:] != -100).sum())
        expected.append(-sequence_logps(model(torch.tensor([ex["input_ids"]])).logits, labels).item() / n)
    cfg = SFTConfig(
        model=str(model_dir),
        data=str(data),
        output=str(tmp_path / "run"),
        lr=3e-3,
        batch_size=8,
        max_steps=15,
        max_length=64,
        lr_schedule="constant",
        progress=False,
    )
    summary = train_sft(cfg, model=model, tokenizer=tok)
    losses = [m["loss"] for m in read_metrics(tmp_path / "run")]
    assert losses[0] == pytest.approx(sum(expected) / 2, rel=1e-5)
    assert losses[-1] < 0.5 * losses[0]
    assert summary["steps"] == 15


def test_reward_model_learns_held_out_preferences(model_dir, tmp_path):
    train_file = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(64, seed=1))
    eval_file = write_jsonl(tmp_path / "eval.jsonl", synthetic_pairs(32, seed=2))
    cfg = RewardConfig(
        model=str(model_dir),
        data=str(train_file),
        eval_data=str(eval_file),
        output=str(tmp_path / "rm"),
        lr=3e-3,
        batch_size=8,
        epochs=3,
        max_length=64,
        lr_schedule="constant",
        progress=False,
    )
    summary = train_reward(cfg)
    first = read_metrics(tmp_path / "rm")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=0.05)  # a fresh head scores pairs nearly alike
    assert summary["eval"]["val/rewards/accuracies"] > 0.9
    from transformers import AutoModelForSequenceClassification

    from prefalign.data import encode_preferences, load_preferences

    # The saved folder is a plain transformers classifier: its trunk and scalar head, read at each
    # sequence's last token, rank the held-out pairs exactly as the run's evaluation did.
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    right = []
    with torch.no_grad():
        for ex in encode_preferences(tiny_tokenizer(), load_preferences(eval_file), 64):
            scores = [
                saved.score(
                    saved.model(input_ids=torch.tensor([ex["prompt_input_ids"] + ex[key]])).last_hidden_state
                )[0, -1, 0]
                for key in ("chosen_input_ids", "rejected_input_ids")
            ]
            right.append(float(scores[0] > scores[1]))
    assert sum(right) / len(right) == pytest.approx(summary["eval"]["val/rewards/accuracies"])


@pytest.mark.parametrize("command", ["sft", "reward"])
def test_cli_runs(model_dir, tmp_path, command):
    if command == "sft":
        data = write_jsonl(
            tmp_path / "d.jsonl",
            [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}]
            * 4,
        )
    else:
        data = write_jsonl(tmp_path / "d.jsonl", synthetic_pairs(8))
    out = tmp_path / command
    code = main(
        [
            command,
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--output",
            str(out),
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--max-length",
            "64",
            "--no-progress",
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and math.isfinite(summary["final"]["loss"])
    settings = yaml.safe_load((out / "config.yaml").read_text())  # the flags reached the run
    assert (settings["model"], settings["batch_size"], settings["max_length"]) == (str(model_dir), 4, 64)
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2]
