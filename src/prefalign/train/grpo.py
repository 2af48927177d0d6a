"""GRPO: group-relative policy optimisation (Shao et al. 2024, DeepSeekMath), PPO without a critic.

Each iteration samples ``--num-generations`` responses to each of ``--rollout-batch`` prompts; a
response's advantage is its reward against the others of its group, ``(r_i - mean) / (std + 1e-4)``
(:func:`prefalign.losses.group_advantages`; ``--scale-rewards batch`` or ``none`` for Dr. GRPO, Liu et
al. 2025), shared by all its tokens. The loss is the token-level clipped surrogate with DAPO's separate
upper clip (``--epsilon-high``, Yu et al. 2025) plus ``--kl-coef`` (TRL's ``--beta``) times the k3
estimate of KL(pi || ref) in the loss, aggregated as ``--loss-type`` grpo, bnpo, dr_grpo or dapo
(:func:`prefalign.losses.aggregate_loss`).

With ``--ppo-epochs 1`` and one minibatch (the defaults) the old log-probs are the detached current
ones, so the ratio is exactly 1 and the clip never acts (TRL with ``num_iterations=1``); otherwise they
are the sampler's. RLOO (:mod:`prefalign.train.rloo`) reuses this file's run with its own advantages
and loss; sampling, scoring, checkpoints and the outer loop are :mod:`prefalign.train.online`'s.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from prefalign.config import add_config_arguments, config_from_args
from prefalign.losses import (
    GROUP_SCALES,
    LOSS_TYPES,
    aggregate_loss,
    group_advantages,
    grpo_token_loss,
)
from prefalign.train import online
from prefalign.train.processes import sum_over_processes
from prefalign.train.run_folder import report_done


@dataclass(kw_only=True)
class GroupConfig(online.OnlineConfig):
    """Options of the critic-free methods that compare several samples of one prompt (GRPO, RLOO)."""

    reward: list[str] = field(default_factory=list)
    """Reward source(s): sentiment (VADER), accuracy (against the prompts' "answer" column), format
    (--format-pattern) or a callable module:function, called as fn(prompts, completions, **columns);
    repeat the flag for several."""
    reward_weights: list[float] = field(default_factory=list)
    """Weights of the reward sources (comma separated; --reward ones in order, then --reward-model); default 1 each."""
    num_generations: int = 4
    """Responses sampled per prompt (the group), at least 2."""
    ppo_epochs: int = 1
    """Passes over each iteration's samples (TRL's num_iterations); with 1 and one minibatch the ratio is exactly 1."""
    epsilon: float = 0.2
    """Lower clip of the importance ratio (1 - epsilon)."""
    epsilon_high: float | None = None
    """Upper clip (1 + epsilon_high; DAPO's clip-higher uses 0.28); default: --epsilon."""
    share_prompts: bool = True
    """Pay for each prompt once per group: one prefill shared by its samples when sampling, and one packed
    row (the prompt, then its responses, each attending to the prompt and itself) in the reference, old and
    update passes. The same numbers to float rounding; off, each sample carries its own copy of the prompt."""

    def reward_problem(self) -> str | None:
        n = len(self.reward) + (self.reward_model is not None)
        if n == 0:
            return (
                "give a reward source: --reward sentiment|accuracy|format|module:function (repeatable) or "
                "--reward-model PATH"
            )
        if self.reward_weights and len(self.reward_weights) != n:
            return f"--reward-weights has {len(self.reward_weights)} values for {n} reward sources"
        return None

    def __post_init__(self) -> None:
        super().__post_init__()
        from prefalign.config import ConfigError

        if self.num_generations < 2:
            raise ConfigError(f"num_generations must be >= 2, got {self.num_generations}")
        if self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise ConfigError("epsilon and epsilon_high must be > 0")


@dataclass(kw_only=True)
class GRPOConfig(GroupConfig):
    """GRPO (Shao et al. 2024): PPO without a critic, advantages relative to a group of samples per prompt."""

    kl_coef: float = 0.04
    """Weight of the k3 KL(pi || ref) term in the loss (TRL's --beta)."""
    scale_rewards: str = "group"
    """Divide the group-centred rewards by the group's std (group), the batch's (batch) or not at all (none)."""
    loss_type: str = "dapo"
    """Aggregation: grpo (mean of sequence means), bnpo (per-process token mean), dr_grpo (tokens / (batch x
    --response-length)) or dapo (token mean over the whole step)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        from prefalign.config import ConfigError

        if self.scale_rewards not in GROUP_SCALES:
            raise ConfigError(f"scale_rewards must be one of {GROUP_SCALES}, got {self.scale_rewards!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")


# --------------------------------------------------------------------------------------------------
# the run


@dataclass
class GroupRun(online.OnlineRun):
    """A GRPO run; RLOO overrides :meth:`rewards`, :meth:`advantages`, :meth:`micro_loss` and :meth:`extra_metrics`."""

    name = "grpo"
    shown = ("objective/scores", "reward_std", "objective/kl")

    @property
    def repeats(self) -> int:  # type: ignore[override]
        return self.config.num_generations

    def rewards(self, rollout: online.Rollout) -> Tensor:
        """``[N]`` the rewards the advantages compare: the scores (GRPO's KL is in the loss)."""
        return rollout.scores

    def advantages(self, rewards: Tensor) -> Tensor:
        """``[N]`` from the rewards of every process (whole groups, prompt-major)."""
        return group_advantages(rewards, self.config.num_generations, self.config.scale_rewards)

    def micro_loss(
        self, rollout: online.Rollout, rows: list[int], batch: dict[str, Tensor], weight: Any
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The aggregated token loss of one micro-batch, weighted so that the micro-batches of a minibatch
        add up to :func:`aggregate_loss` over the whole minibatch; and summed token statistics."""
        config = self.config
        micro = online.make_micro(rollout, rows, self.accelerator.device)
        lse = online.known_lse(self, rollout, micro)
        logprobs, _ = self.module(
            micro, config.temperature, with_values=False, targets=micro.response_ids, lse=lse
        )
        take = {k: micro.take(v).to(logprobs.device) for k, v in batch.items() if v.dim() == 2}
        old = logprobs.detach() if fresh_old(config) else take["logprobs"]
        adv = batch["advantages"][rows].to(logprobs.device)
        per_token, stats = grpo_token_loss(
            logprobs, old, adv, take["ref_logprobs"], config.kl_coef, config.epsilon, config.epsilon_high
        )
        mask = micro.mask
        loss = aggregate_loss(per_token, mask, config.loss_type, config.response_length, weight["tokens"])
        sums = {
            "policy/loss": (per_token.detach() * mask).sum(),
            "policy/kl": (stats["kl"] * mask).sum(),
            "policy/ratio_mean": (stats["ratio"] * mask).sum(),
            "policy/clip_ratio_low": (stats["low"] * mask).sum(),
            "policy/clip_ratio_high": (stats["high"] * mask).sum(),
        }
        return loss * micro_weight(config.loss_type, len(rows), float(mask.sum()), weight), sums

    def stat_norm(self, seqs: float, tokens: float) -> float:
        return tokens

    def extra_metrics(self, rollout: online.Rollout, rewards: Tensor) -> dict[str, float]:
        return {}

    def targets(self, rollout: online.Rollout, it: int) -> tuple[dict[str, Tensor], Any]:
        """Old and reference log-probs, and the advantages of whole groups (every process's rewards)."""
        acc = self.accelerator
        rewards = self.rewards(rollout)
        everyone = acc.gather(rewards.to(acc.device)).cpu()
        n = len(rollout)
        advantages = self.advantages(everyone)[acc.process_index * n : (acc.process_index + 1) * n]
        batch = {"logprobs": rollout.logprobs, "ref_logprobs": rollout.ref_logprobs, "advantages": advantages}
        return batch, rewards

    def minibatch_step(
        self, rollout: online.Rollout, batch: dict[str, Tensor], rows: list[int], micros: list[list[int]]
    ) -> dict[str, float]:
        """The minibatch's sequence and token counts over every process weigh each micro-batch."""
        local = float(rollout.mask[rows].sum())
        seqs, tokens = sum_over_processes(self.accelerator, float(len(rows)), local)
        weight = {
            "seqs": seqs,
            "tokens": tokens,
            "local_tokens": local,
            "procs": self.accelerator.num_processes,
        }
        loss_of = lambda r: self.micro_loss(rollout, r, batch, weight)  # noqa: E731
        return online.optimizer_step(self, micros, loss_of, 1.0, self.stat_norm(seqs, tokens))

    def iteration_metrics(self, rollout: online.Rollout, extra: Any) -> dict[str, float]:
        return {**group_metrics(self, rollout, extra), **self.extra_metrics(rollout, extra)}


def fresh_old(config: GroupConfig) -> bool:
    """Whether the old log-probs are the detached current ones (one pass, one minibatch: ratio exactly 1)."""
    return config.ppo_epochs == 1 and config.minibatches == 1 and not config.recompute_logprobs


def micro_weight(loss_type: str, rows: int, tokens: float, weight: dict[str, float]) -> float:
    """What turns :func:`aggregate_loss` of a micro-batch (``rows`` sequences, ``tokens`` tokens) into its
    share of the minibatch's loss, times the process count where the normaliser spans every process
    (DDP averages gradients). ``weight`` holds the minibatch's ``seqs`` and ``tokens`` over every process,
    its ``local_tokens`` and the process count ``procs``."""
    if loss_type in ("grpo", "dr_grpo"):
        return rows * weight["procs"] / max(weight["seqs"], 1.0)
    if loss_type == "bnpo":
        return tokens / max(weight["local_tokens"], 1.0)
    return weight["procs"]  # dapo: already over the step's tokens on every process


def group_metrics(run: GroupRun, rollout: online.Rollout, rewards: Tensor) -> dict[str, float]:
    """Means over every process's samples: scores per source, the groups' spread, KL, lengths."""
    mask, g = rollout.mask, run.config.num_generations
    groups = rewards.view(-1, g)
    components = getattr(run.source, "components", None) or {run.source.name: rollout.raw_scores.tolist()}
    sums = {
        "objective/scores": rollout.raw_scores.sum(),
        "reward": rewards.sum(),
        **{f"reward/{name}": torch.tensor(v).sum() for name, v in components.items()},
        "objective/kl": ((rollout.logprobs - rollout.ref_logprobs) * mask).sum(),
        "completions/mean_length": mask.sum(),
        "completions/clipped_ratio": (~rollout.out.finished).float().sum(),
        # per-group figures, times the group size: their means over samples are means over groups
        "reward_std": groups.std(-1).sum() * g,
        "frac_reward_zero_std": (groups.max(-1).values == groups.min(-1).values).float().sum() * g,
    }
    return {**online.sample_means(run, rollout, sums), "kl_coef": run.config.kl_coef}


# --------------------------------------------------------------------------------------------------
# setup


def setup(
    config: GroupConfig, model: nn.Module | None = None, tokenizer: Any = None, run_class: type = GroupRun
) -> GroupRun:
    """Load prompts, the policy, the reference and the reward source(s); build the optimiser and schedule."""
    from prefalign.rewards import make_rewards

    acc, tokenizer, prompts, held, ckpt = online.prepare(config, tokenizer)
    source = make_rewards(
        config.reward,
        config.reward_model,
        config.reward_weights,
        acc.device,
        config.raw,
        config.format_pattern,
    )
    online.check_reward_data(source, config, prompts, held)  # before any model loads or samples
    source = online.check_vocabulary(source, tokenizer)
    module = online.PolicyLogits(online.load_policy(config, model)).to(acc.device)
    reference = online.load_reference(config, acc.device)
    return online.build_run(
        run_class, config, acc, module, prompts, held, reference=reference, source=source, tokenizer=tokenizer,
        resume_from=ckpt,
    )  # fmt: skip


def train(
    config: GRPOConfig, model: nn.Module | None = None, tokenizer: Any = None, callback: Any = None
) -> dict[str, Any]:
    """Run GRPO as configured; returns the summary (also written to ``<output>/summary.json``).

    ``callback(iteration, policy)`` runs on the main process every ``eval_every`` iterations and after
    the last one.
    """
    return online.train_run(setup(config, model, tokenizer), callback)


# --------------------------------------------------------------------------------------------------
# command line

SUMMARY_KEYS = ("objective/scores", "reward_std", "objective/kl", "eval/scores", "eval/kl")


def register(subparsers: Any, name: str, config_class: type, run: Any, help_text: str) -> None:
    """A sub-command whose --reward may repeat and whose --kl-coef is also --beta (TRL's name)."""
    parser = subparsers.add_parser(
        name, help=help_text, description=config_class.__doc__, conflict_handler="resolve"
    )
    add_config_arguments(parser, config_class)
    action = next(a for a in parser._actions if a.dest == "kl_coef")
    parser.add_argument(
        "--kl-coef", "--beta", dest="kl_coef", default=argparse.SUPPRESS, metavar="KL_COEF",
        help=f"{action.help} --beta is the same option (TRL's name).",
    )  # fmt: skip
    action = next(a for a in parser._actions if a.dest == "reward")
    parser.add_argument(
        "--reward",
        dest="reward",
        action="append",
        default=argparse.SUPPRESS,
        metavar="REWARD",
        help=action.help,
    )
    parser.set_defaults(func=run)


def _run(args: argparse.Namespace) -> int:
    config = config_from_args(GRPOConfig, args)
    report_done(train(config), config.output, SUMMARY_KEYS, unit="iterations")
    return 0


def add_commands(subparsers: Any) -> None:
    register(subparsers, "grpo", GRPOConfig, _run, "GRPO: critic-free RL on groups of samples per prompt.")
