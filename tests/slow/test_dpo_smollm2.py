"""DPO on the real bundled SmolLM2-135M: the invariants hold and a preference is learned in a few steps."""

from __future__ import annotations

import math

from prefalign.testing import synthetic_pairs, write_jsonl
from prefalign.train.dpo import DPOConfig, train
from prefalign.train.loop import read_metrics


def test_dpo_on_smollm2_starts_at_ln2_and_learns_held_out_preferences(tmp_path):
    """Pairs prefer positive movie reviews; 4 steps of batch 8 at lr 5e-6 (about a minute on 2 cores) give a
    held-out implicit-reward accuracy above 0.8, from ln 2 and zero rewards at the first step."""
    train_file = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(32, seed=1, chat=True))
    eval_file = write_jsonl(tmp_path / "eval.jsonl", synthetic_pairs(16, seed=2, chat=True))
    config = DPOConfig(
        model="smollm2",
        data=str(train_file),
        eval_data=str(eval_file),
        output=str(tmp_path / "run"),
        lr=5e-6,
        batch_size=8,
        epochs=1,
        max_length=256,
        lr_schedule="constant",
        progress=False,
    )
    summary = train(config)
    first = read_metrics(tmp_path / "run")[0]
    assert math.isclose(first["loss"], math.log(2), abs_tol=1e-5)
    assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/rejected"]) < 1e-5
    assert summary["steps"] == 4
    assert summary["eval"]["val/rewards/accuracies"] > 0.8
    assert summary["eval"]["val/rewards/margins"] > 0
