"""PPO against VADER sentiment on the bundled SmolLM2 raises the sentiment of held-out continuations."""

from __future__ import annotations

import json
import random

from prefalign.train.loop import read_metrics
from prefalign.train.ppo import PPOConfig, train

SUBJECTS = ["This movie", "The film", "The acting", "The plot", "The ending", "The soundtrack", "This sequel",
            "The cast", "The script", "The special effects", "The story", "The main character", "The dialogue",
            "The pacing", "The villain", "The second half"]  # fmt: skip
VERBS = ["was", "is", "felt", "seemed", "really", "made me", "left me", "turned out"]


def test_ppo_raises_held_out_sentiment(tmp_path):
    """16 review openings x 24 tokens per iteration, 16 iterations at lr 3e-5 with a value head on the
    trunk: the mean VADER score of continuations to 32 held-out openings (same sampling seed before and
    after) rises by at least 0.08 (the demo's PPO gains about 0.1 in 14 iterations at 2e-5), and the KL to
    the reference stays a few nats."""
    prompts = [f"{s} {v}" for s in SUBJECTS for v in VERBS]
    random.Random(0).shuffle(prompts)
    for name, rows in (("train", prompts[32:]), ("eval", prompts[:32])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
    summary = train(
        PPOConfig(
            model="smollm2", prompts=str(tmp_path / "train.jsonl"), eval_prompts=str(tmp_path / "eval.jsonl"),
            output=str(tmp_path / "run"), reward="sentiment", raw=True, shared_value_head=True,
            rollout_batch=16, response_length=24, ppo_epochs=2, minibatches=2, lr=3e-5, kl_coef=0.05,
            iterations=16, lr_schedule="constant", progress=False,
        )
    )  # fmt: skip
    before, after = summary["eval_start"]["eval/scores"], summary["eval"]["eval/scores"]
    assert abs(summary["eval_start"]["eval/kl"]) < 1e-3  # the starting policy is the reference
    assert after > before + 0.08, (before, after)
    assert 0 < summary["eval"]["eval/kl"] < 20
    rows = [r for r in read_metrics(tmp_path / "run") if "objective/scores" in r]
    assert len(rows) == 16
