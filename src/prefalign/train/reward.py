"""Reward-model training with the Bradley-Terry preference model (the second stage of RLHF).

``P(chosen > rejected) = sigmoid(r(x, y_w) - r(x, y_l))``; the model is a causal LM body with a scalar
head read at the last token of each completion. Pairs are packed with a shared prompt exactly as in DPO
(:mod:`prefalign.packing`), so the prompt is run once per pair.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from prefalign.config import add_config_arguments, config_from_args
from prefalign.losses import bradley_terry_loss
from prefalign.train.loop import (
    TrainConfig,
    check_run_folder,
    load_pairs,
    make_accelerator,
    report_done,
    seed_everything,
    train_loop,
)


@dataclass(kw_only=True)
class RewardConfig(TrainConfig):
    """Train a Bradley-Terry reward model on preference pairs."""

    lr: float = 1e-5
    """Peak learning rate."""
    center_rewards_coef: float = 0.0
    """Weight of a penalty on the squared sum of the pair's rewards, keeping rewards centred at 0."""


class RewardObjective:
    """Summed Bradley-Terry negative log-likelihood and per-pair accuracy/margin sums."""

    def __init__(self, model: nn.Module, config: RewardConfig) -> None:
        self.model = model
        self.config = config

    def example_tokens(self, example: dict[str, Any]) -> int:
        # packing is imported here, not at the top: building the parser (`--help`) must not import it
        from prefalign.packing import pair_tokens

        return pair_tokens(example)

    def loss(self, examples: list[dict[str, Any]]) -> tuple[Tensor, dict[str, Tensor]]:
        from prefalign.packing import pack_pairs, packed_scores

        scores = packed_scores(self.model, pack_pairs(examples))
        chosen, rejected = scores[0::2], scores[1::2]
        loss = bradley_terry_loss(chosen, rejected) * len(examples)
        if self.config.center_rewards_coef:
            loss = loss + self.config.center_rewards_coef * ((chosen + rejected) ** 2).sum()
        margins = (chosen - rejected).detach()
        return loss, {
            "rewards/chosen": chosen.detach().sum(),
            "rewards/rejected": rejected.detach().sum(),
            "rewards/margins": margins.sum(),
            "rewards/accuracies": (margins > 0).float().sum(),
        }


def train(
    config: RewardConfig,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    callback: Callable[[int, nn.Module], None] | None = None,
) -> dict[str, Any]:
    """Train the reward model as configured; returns the summary (also written to ``summary.json``).

    ``callback(step, model)`` is passed to :func:`~prefalign.train.loop.train_loop`.
    """
    from prefalign.models import load_reward_model, load_tokenizer

    check_run_folder(config)  # before any model is loaded
    seed_everything(config.seed)
    accelerator = make_accelerator()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
    train_set, held = load_pairs(config, tokenizer)
    if model is None:
        lora = config.lora_settings()
        model = load_reward_model(
            config.model, dtype=config.dtype, lora=lora, trust_remote_code=config.trust_remote_code
        )
    model.to(accelerator.device)
    return train_loop(
        config,
        RewardObjective(model, config),
        train_set,
        held,
        tokenizer=tokenizer,
        accelerator=accelerator,
        callback=callback,
    )


def _run(args: argparse.Namespace) -> int:
    config = config_from_args(RewardConfig, args)
    report_done(train(config), config.output, ("loss", "rewards/accuracies", "rewards/margins"))
    return 0


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "reward",
        help="Train a Bradley-Terry reward model on preference pairs.",
        description=RewardConfig.__doc__,
    )
    add_config_arguments(parser, RewardConfig)
    parser.set_defaults(func=_run)
