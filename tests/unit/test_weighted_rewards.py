"""Several reward sources at once (GRPO/RLOO): the weighted sum, per-source scores, and the flags."""

from __future__ import annotations

import pytest

from prefalign.cli import build_parser
from prefalign.config import ConfigError, config_from_args
from prefalign.rewards import RewardError, SentimentReward, WeightedReward, make_rewards
from prefalign.train.grpo import GRPOConfig


def test_weighted_sum_keeps_each_sources_scores():
    """Scores (0.5, 0) and (2, 4) with weights 1 and 0.25: totals 0.5 + 0.5 = 1.0 and 0 + 1 = 1.0."""
    a, b = SentimentReward(), SentimentReward()
    a.score = lambda p, c: [0.5, 0.0]
    b.score = lambda p, c: [2.0, 4.0]
    b.name = "other"
    source = WeightedReward([a, b], [1.0, 0.25])
    assert source(["x", "y"], ["u", "v"]) == [1.0, 1.0]
    assert source.components == {"sentiment": [0.5, 0.0], "other": [2.0, 4.0]}


def test_make_rewards_returns_a_single_unweighted_source_as_is():
    assert isinstance(make_rewards(["sentiment"]), SentimentReward)
    assert isinstance(make_rewards(["sentiment"], weights=[2.0]), WeightedReward)
    with pytest.raises(RewardError, match="give a reward source"):
        make_rewards([])
    with pytest.raises(RewardError, match="2 reward weights for 1"):
        make_rewards(["sentiment"], weights=[1.0, 2.0])


def test_reward_repeats_and_beta_is_kl_coef():
    args = build_parser("grpo").parse_args(
        ["grpo", "--model", "m", "--prompts", "p", "--output", "o", "--reward", "sentiment",
         "--reward", "mypkg.r:fmt", "--reward-weights", "1.0,0.5", "--beta", "0.1"]
    )  # fmt: skip
    config = config_from_args(GRPOConfig, args)
    assert config.reward == ["sentiment", "mypkg.r:fmt"]
    assert config.reward_weights == [1.0, 0.5]
    assert config.kl_coef == 0.1


def test_reward_options_are_checked():
    with pytest.raises(ConfigError, match="give a reward source"):
        GRPOConfig(model="m", prompts="p", output="o")
    with pytest.raises(ConfigError, match="3 values for 2 reward sources"):
        GRPOConfig(model="m", prompts="p", output="o", reward=["sentiment"], reward_model="rm",
                   reward_weights=[1, 2, 3])  # fmt: skip
    with pytest.raises(ConfigError, match="num_generations"):
        GRPOConfig(model="m", prompts="p", output="o", reward=["sentiment"], num_generations=1)


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_the_example_configs_load(name):
    from pathlib import Path

    from prefalign.config import build_config
    from prefalign.train.rloo import RLOOConfig

    path = Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml"
    cls = GRPOConfig if name == "grpo" else RLOOConfig
    config = build_config(cls, path, {"prompts": "p.jsonl", "output": "runs/x"})
    assert config.reward == ["sentiment"]
    assert config.num_generations == 4
    assert config.kl_coef == (0.04 if name == "grpo" else 0.05)
