"""The committed frontier run (docs/results/frontier/) recomputed from its texts: every sample's reward is
VADER's score of its completion, every point's reward and KL are the means of its samples, and its 95%
intervals are the bootstrap intervals of those samples (resampling prompts)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from prefalign.evaluate import bootstrap_interval
from prefalign.rewards import make_reward

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results" / "frontier"
SUMMARY = json.loads((RESULTS / "summary.json").read_text()) if (RESULTS / "summary.json").exists() else None


def samples(point: dict) -> list[dict]:
    with gzip.open(RESULTS / f"{point['samples']}.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_the_run_is_committed_whole():
    """Every method the run was configured with has points (each DPO beta, each PPO target KL, each N of
    Best-of-N), Figure 2's methods among them, and every point its samples file."""
    assert SUMMARY is not None, f"{RESULTS}/summary.json is missing"
    config = SUMMARY["config"]
    assert {"preferred-ft", "dpo", "ppo", "dpo-sweep", "ppo-gt", "ppo-kl-sweep", "best-of-n"} <= set(
        config["methods"]
    )
    expected = {"reference"} | set(config["methods"]) - {"dpo-sweep", "ppo-kl-sweep", "best-of-n"}
    expected |= {f"dpo-beta{b:g}" for b in config["dpo_betas"]}
    expected |= {f"ppo-kl{k:g}" for k in config["ppo_target_kls"]}
    expected |= {f"best-of-{n}" for n in config["best_of"]}
    assert {p["method"] for p in SUMMARY["points"]} == expected
    for point in SUMMARY["points"]:
        assert (RESULTS / f"{point['samples']}.gz").is_file(), point["samples"]
    assert (RESULTS / "plots" / "frontier.png").is_file()


@pytest.mark.parametrize("index", range(len(SUMMARY["points"]) if SUMMARY else 0))
def test_each_point_is_recomputed_from_its_texts(index):
    point = SUMMARY["points"][index]
    rows = samples(point)
    assert len(rows) == 64 * SUMMARY["config"]["eval_samples"]  # every test prompt, K samples each
    vader = make_reward(reward="sentiment")
    scores = vader([r["prompt"] for r in rows], [r["completion"] for r in rows])
    assert [float(s) for s in scores] == pytest.approx([r["reward"] for r in rows], abs=1e-9)
    rewards, kls = [float(s) for s in scores], [r["kl"] for r in rows]
    assert sum(rewards) / len(rewards) == pytest.approx(point["reward"], abs=1e-9)
    assert sum(kls) / len(kls) == pytest.approx(point["kl"], abs=1e-9)
    groups = [r["prompt_index"] for r in rows]
    assert bootstrap_interval(rewards, groups) == pytest.approx(point["reward_ci"], abs=1e-9)
    assert bootstrap_interval(kls, groups) == pytest.approx(point["kl_ci"], abs=1e-9)
