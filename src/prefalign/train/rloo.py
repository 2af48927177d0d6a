"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024, "Back to Basics"; Kool et al. 2019).

Each prompt is sampled ``--num-generations`` times. A response's reward carries the KL penalty,
``score - kl_coef * sum_t (log pi - log ref)`` (k1 summed over its tokens,
:func:`prefalign.losses.rloo_rewards`), and its advantage is that reward less the mean reward of the
other responses to the same prompt (:func:`prefalign.losses.rloo_advantages`): no critic, and a baseline
that does not depend on the sample it corrects. The loss is the clipped surrogate on one sequence-level
ratio per response (:func:`prefalign.losses.rloo_sequence_loss`), averaged over responses. Sampling,
scoring, the run and its options are GRPO's (:mod:`prefalign.train.grpo`) and the online machinery's.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from prefalign.config import config_from_args
from prefalign.losses import rloo_advantages, rloo_rewards, rloo_sequence_loss
from prefalign.train import grpo, online
from prefalign.train.processes import sum_over_processes
from prefalign.train.run_folder import report_done


@dataclass(kw_only=True)
class RLOOConfig(grpo.GroupConfig):
    """RLOO (Ahmadian et al. 2024): REINFORCE with a leave-one-out baseline over several samples per prompt."""

    kl_coef: float = 0.05
    """Weight of the KL penalty in the reward: k1 summed over the response's tokens (also --beta)."""


@dataclass
class RLOORun(grpo.GroupRun):
    """An RLOO run: the KL in the reward, leave-one-out advantages, a sequence-level ratio."""

    name = "rloo"

    def rewards(self, rollout: online.Rollout) -> Tensor:
        return rloo_rewards(
            rollout.scores, rollout.logprobs, rollout.ref_logprobs, rollout.mask, self.config.kl_coef
        )

    def advantages(self, rewards: Tensor) -> Tensor:
        return rloo_advantages(rewards, self.config.num_generations)

    def micro_loss(
        self, rollout: online.Rollout, rows: list[int], batch: dict[str, Tensor], weight: Any
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Summed per-response losses of one micro-batch (scaled to the minibatch's mean over responses)
        and summed per-response statistics."""
        config = self.config
        micro = online.make_micro(rollout, rows, self.accelerator.device)
        lse = online.known_lse(self, rollout, micro)
        logprobs, _ = self.module(
            micro, config.temperature, with_values=False, targets=micro.response_ids, lse=lse
        )
        old = (
            logprobs.detach() if grpo.fresh_old(config) else micro.take(batch["logprobs"]).to(logprobs.device)
        )
        adv = batch["advantages"][rows].to(logprobs.device)
        loss, stats = rloo_sequence_loss(logprobs, old, adv, micro.mask, config.epsilon, config.epsilon_high)
        sums = {
            "policy/loss": loss.detach().sum(),
            "policy/ratio_mean": stats["ratio"].sum(),
            "policy/clip_ratio_low": stats["low"].sum(),
            "policy/clip_ratio_high": stats["high"].sum(),
        }
        return loss.sum() * (weight["procs"] / max(weight["seqs"], 1.0)), sums

    def stat_norm(self, seqs: float, tokens: float) -> float:
        return seqs

    def extra_metrics(self, rollout: online.Rollout, rewards: Tensor) -> dict[str, float]:
        n, non_score = sum_over_processes(
            self.accelerator, float(len(rollout)), float((rewards - rollout.scores).sum())
        )
        return {"objective/non_score_reward": non_score / n}


def train(
    config: RLOOConfig, model: nn.Module | None = None, tokenizer: Any = None, callback: Any = None
) -> dict[str, Any]:
    """Run RLOO as configured; returns the summary (also written to ``<output>/summary.json``).

    ``callback(iteration, policy)`` runs on the main process every ``eval_every`` iterations and after
    the last one.
    """
    return online.train_run(grpo.setup(config, model, tokenizer, run_class=RLOORun), callback)


def _run(args: argparse.Namespace) -> int:
    config = config_from_args(RLOOConfig, args)
    report_done(train(config), config.output, grpo.SUMMARY_KEYS, unit="iterations")
    return 0


def add_commands(subparsers: Any) -> None:
    grpo.register(subparsers, "rloo", RLOOConfig, _run, "RLOO: REINFORCE with a leave-one-out baseline.")
