"""Data as the hub ships it, through the training commands: named splits of a saved DatasetDict
(--data-split, --eval-data-split; --prompts-split for the online methods), a split that is not there
refused naming the ones that are (exit 2, before any model is loaded), and --columns renaming."""

from __future__ import annotations

import json

import pytest

from prefalign.cli import main
from prefalign.config import ConfigError
from prefalign.testing import synthetic_pairs, write_jsonl
from prefalign.train.dpo import DPOConfig
from prefalign.train.loop import read_metrics


def save_splits(path, splits):
    import datasets

    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(
        str(path)
    )
    return path


@pytest.fixture(scope="module")
def ultrafeedback_like(tmp_path_factory):
    """UltraFeedback-binarized's layout: splits train_prefs (12 pairs) and test_prefs (4), no train."""
    rows = synthetic_pairs(16, seed=3)
    return save_splits(
        tmp_path_factory.mktemp("hub") / "prefs", {"train_prefs": rows[:12], "test_prefs": rows[12:]}
    )


def dpo_args(model_dir, data, out, *extra):
    return ["dpo", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--max-length", "64",
            "--batch-size", "4", "--max-steps", "2", "--no-progress", *extra]  # fmt: skip


def test_dpo_trains_on_one_split_and_evaluates_on_another(tiny_model_dir, ultrafeedback_like, tmp_path):
    """--data-split train_prefs --eval-data-split test_prefs: 12 training pairs, 4 held out (the held-out
    split of the same folder, not its training rows and not a `train` split it does not have)."""
    out = tmp_path / "run"
    code = main(dpo_args(tiny_model_dir, ultrafeedback_like, out, "--data-split", "train_prefs",
                         "--eval-data-split", "test_prefs"))  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["train_examples"], summary["eval_examples"]) == (12, 4)
    assert "val/loss" in summary["eval"]


def test_a_missing_split_is_refused_naming_the_available_ones(
    tiny_model_dir, ultrafeedback_like, tmp_path, capsys
):
    code = main(dpo_args(tiny_model_dir, ultrafeedback_like, tmp_path / "run"))  # default split: train
    err = capsys.readouterr().err
    assert code == 2
    assert "no split 'train'" in err and "test_prefs" in err and "train_prefs" in err
    assert "Traceback" not in err
    code = main(dpo_args(tiny_model_dir, ultrafeedback_like, tmp_path / "run2", "--data-split", "train_prefs",
                         "--eval-data-split", "validation"))  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "no split 'validation'" in err and "test_prefs" in err


def test_columns_rename_before_validation_on_a_dpo_run(tiny_model_dir, tmp_path, capsys):
    """Pairs under question/good/bad train with --columns prompt=question,chosen=good,rejected=bad, and
    the run equals one on the same pairs under the canonical names; a data error names the original
    column."""
    rows = synthetic_pairs(8, seed=1)
    renamed = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in rows]
    plain = write_jsonl(tmp_path / "plain.jsonl", rows)
    odd = write_jsonl(tmp_path / "odd.jsonl", renamed)
    mapping = "prompt=question,chosen=good,rejected=bad"
    assert main(dpo_args(tiny_model_dir, odd, tmp_path / "odd", "--columns", mapping)) == 0
    assert main(dpo_args(tiny_model_dir, plain, tmp_path / "plain")) == 0
    losses = [[m["loss"] for m in read_metrics(tmp_path / name)] for name in ("odd", "plain")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    bad = write_jsonl(tmp_path / "bad.jsonl", [*renamed[:2], {**renamed[2], "good": ""}])
    capsys.readouterr()
    assert main(dpo_args(tiny_model_dir, bad, tmp_path / "bad", "--columns", mapping)) == 2
    err = capsys.readouterr().err
    assert 'bad.jsonl:3: field "good" (--columns chosen=good)' in err


def test_columns_text_is_checked_at_config_time(tiny_model_dir, pairs, tmp_path, capsys, monkeypatch):
    """A malformed --columns is a ConfigError when the config is built: no model is loaded."""
    import prefalign.models as models

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_tokenizer", no_loading)
    monkeypatch.setattr(models, "load_policy", no_loading)
    with pytest.raises(ConfigError, match="not canonical=column"):
        DPOConfig(model="m", data=str(pairs), output=str(tmp_path / "a"), columns="prompt:question")
    with pytest.raises(ConfigError, match="given for both"):
        DPOConfig(model="m", data=str(pairs), output=str(tmp_path / "a"), columns="prompt=x,chosen=x")
    assert main(dpo_args(tiny_model_dir, pairs, tmp_path / "b", "--columns", "chosen")) == 2
    assert "--columns 'chosen'" in capsys.readouterr().err


def test_held_out_set_equal_to_the_training_split_is_refused(pairs, tmp_path):
    with pytest.raises(ConfigError, match="held-out set is the training data itself"):
        DPOConfig(model="m", data=str(pairs), eval_data=str(pairs), output=str(tmp_path / "a"))
    cfg = DPOConfig(model="m", data="org/prefs", data_split="train_prefs", eval_data_split="test_prefs",
                    data_subset="default", output=str(tmp_path / "b"))  # fmt: skip
    train, held = cfg.data_sources()
    assert train == {"source": "org/prefs", "split": "train_prefs", "subset": "default", "columns": {}}
    assert held == {"source": "org/prefs", "split": "test_prefs", "subset": "default", "columns": {}}


def test_online_prompts_read_their_splits_and_columns(tiny_model_dir, tmp_path, tokenizer):
    """--prompts-split / --eval-prompts-split / --columns reach the prompt loader of the online methods."""
    from prefalign.train.grpo import GRPOConfig
    from prefalign.train.online import prepare

    prompts = save_splits(
        tmp_path / "prompts",
        {"train_gen": [{"question": f"Tell me {i}"} for i in range(6)], "test_gen": [{"question": "Hi"}]},
    )
    cfg = GRPOConfig(
        model=str(tiny_model_dir), prompts=str(prompts), prompts_split="train_gen",
        eval_prompts_split="test_gen", columns="prompt=question", output=str(tmp_path / "run"),
        reward=["synthetic_rewards:flat_for_the"], raw=True, rollout_batch=4, num_generations=4,
    )  # fmt: skip
    _, _, (ids, rows), (eval_ids, eval_rows), _ = prepare(cfg, tokenizer)
    text = lambda row: row["prompt"] if isinstance(row, dict) else row  # noqa: E731 (a row, or its text)
    assert [text(r) for r in rows] == [f"Tell me {i}" for i in range(6)]
    assert [text(r) for r in eval_rows] == ["Hi"]
    assert len(ids) == 6 and len(eval_ids) == 1
