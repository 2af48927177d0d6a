"""RLHF with PPO: maximise a reward with a KL penalty to the reference policy (Ziegler et al. 2019;
Stiennon et al. 2020; Ouyang et al. 2022), the centre of the lecture's RLHF part.

The per-token reward of a response ``y`` to a prompt ``x`` is

    r_t = -kl_coef * KL_t + [t is the last response token] * score(x, y),

with ``KL_t`` an estimate of ``log pi(y_t | ...) - log pi_ref(y_t | ...)`` (k1 by default), so that the
return of a whole response is ``score - kl_coef * KL(pi || pi_ref)``, the objective of the slides. GAE
(gamma 1, lambda 0.95) over the response tokens gives advantages (whitened over the batch) and
returns; the policy minimises PPO's clipped surrogate, the critic a clipped squared error, for
``ppo_epochs`` passes over ``minibatches`` shuffled minibatches. ``--target-kl`` steers ``kl_coef`` with
the adaptive controller. Implementation details follow Huang et al. 2024, "The N Implementation Details
of RLHF with PPO": token-level means, no bootstrapping past EOS, log-probs under the sampling temperature.
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prefalign.config import ConfigError, add_config_arguments, config_from_args
from prefalign.kl import AdaptiveKLController, FixedKLController
from prefalign.losses import KL_ESTIMATORS, gae, masked_mean, ppo_policy_loss, ppo_value_loss
from prefalign.train import online
from prefalign.train.processes import sum_over_processes
from prefalign.train.run_folder import report_done

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class PPOConfig(online.OnlineConfig):
    """RLHF with PPO: a reward (model, VADER or your function) minus a KL penalty to the reference."""

    kl_estimator: str = "k1"
    """Per-token KL estimator in the reward: k1 (log-ratio), k2 or k3 (GRPO always uses k3, RLOO k1)."""
    value_model: str | None = None
    """Critic to start from (default: the reward model when there is one, else the policy), a separate model.
    With --lora-r the critic is instead a second LoRA adapter (and its head) on the policy's base weights."""
    shared_value_head: bool = False
    """Use a scalar head on the policy's own trunk as the critic instead of a separate model: one model
    fewer in memory and one transformer pass fewer per step, the cheap choice on a CPU. Off by default
    because a separate critic (TRL's and OpenRLHF's choice) keeps value errors out of the policy."""
    target_kl: float | None = None
    """Steer --kl-coef toward this mean sequence KL with the adaptive controller (Ziegler et al. 2019)."""
    kl_horizon: int = 10000
    """Adaptive controller horizon, in samples."""
    gamma: float = 1.0
    """Discount over response tokens."""
    lam: float = 0.95
    """GAE lambda."""
    cliprange: float = 0.2
    """Clip range of the policy ratio."""
    cliprange_value: float = 0.2
    """Clip range of the value update around the values at sampling time."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards over the batch (keeping their mean) before GAE."""

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            (self.kl_estimator in KL_ESTIMATORS, f"kl_estimator must be one of {tuple(KL_ESTIMATORS)}"),
            (self.target_kl is None or self.target_kl > 0, f"target_kl must be > 0, got {self.target_kl}"),
            (self.kl_horizon >= 1, f"kl_horizon must be >= 1, got {self.kl_horizon}"),
            (0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma and lam must be in [0, 1]"),
            (self.cliprange > 0 and self.cliprange_value > 0, "cliprange and cliprange_value must be > 0"),
            (self.vf_coef >= 0, f"vf_coef must be >= 0, got {self.vf_coef}"),
            (not (self.shared_value_head and self.value_model), "give --value-model or --shared-value-head, not both"),
            (
                not (self.lora_r and self.value_model),
                "--value-model with --lora-r: the critic is then a second adapter on the policy's base weights "
                "(it starts from them); leave out --value-model",
            ),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


# --------------------------------------------------------------------------------------------------
# advantages and the loss


def token_rewards(rollout: online.Rollout, kl_coef: float, kind: str) -> tuple[Tensor, Tensor]:
    """Per-token rewards ``[N, R]``: ``-kl_coef * KL_t`` everywhere on the response plus the score at its
    last token; and the per-token KL estimates ``[N, R]``."""
    mask = rollout.mask
    kl = KL_ESTIMATORS[kind]((rollout.logprobs - rollout.ref_logprobs) * mask) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(rollout)), last] += rollout.scores
    return rewards, kl


def ppo_advantages(
    rollout: online.Rollout, kl_coef: float, config: PPOConfig, accelerator: Any
) -> tuple[Tensor, Tensor, Tensor]:
    """``(advantages, returns, kl)``, each ``[N, R]``: GAE over the response with nothing bootstrapped
    past its last token, advantages whitened over every process's response tokens."""
    mask = rollout.mask
    rewards, kl = token_rewards(rollout, kl_coef, config.kl_estimator)
    if config.whiten_rewards:
        rewards = online.global_whiten(accelerator, rewards, mask, shift_mean=False)
    last = (mask.sum(-1).long() - 1).clamp(min=0)
    dones = torch.zeros_like(mask)
    dones[torch.arange(len(rollout)), last] = 1.0
    values = rollout.values * mask
    advantages, returns = gae(rewards, values, dones, torch.zeros(len(rollout)), config.gamma, config.lam)
    return online.global_whiten(accelerator, advantages, mask), returns * mask, kl


def micro_loss(
    run: PPORun, rollout: online.Rollout, rows: list[int], batch: dict[str, Tensor]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Summed (not averaged) policy + value loss of one micro-batch, and summed statistics."""
    config = run.config
    micro = online.make_micro(rollout, rows, run.accelerator.device)
    lse = online.known_lse(run, rollout, micro)
    logprobs, values = run.module(micro, config.temperature, targets=micro.response_ids, lse=lse)
    take = {k: micro.take(v).to(logprobs.device) for k, v in batch.items()}
    mask = micro.mask
    n = mask.sum()
    pg, stats = ppo_policy_loss(logprobs, take["logprobs"], take["advantages"], mask, config.cliprange)
    vf = ppo_value_loss(values, take["values"], take["returns"], mask, config.cliprange_value)
    with torch.no_grad():
        moved = (values - take["values"]).abs() > config.cliprange_value
        sums = {
            "policy/loss": pg * n,
            "value/loss": vf * n,
            "policy/clipfrac": stats["clipfrac"] * n,
            "policy/approx_kl": stats["approx_kl"] * n,
            "policy/ratio_mean": masked_mean((logprobs - take["logprobs"]).exp(), mask) * n,
            "value/clipfrac": masked_mean(moved.float(), mask) * n,
        }
    return (pg + config.vf_coef * vf) * n, sums


# --------------------------------------------------------------------------------------------------
# the run


@dataclass
class PPORun(online.OnlineRun):
    """Everything one PPO run holds between iterations: the shared run plus the KL controller."""

    kl_ctl: Any = None

    name = "ppo"
    shown = ("objective/scores", "objective/kl", "kl_coef")

    def targets(self, rollout: online.Rollout, it: int) -> tuple[dict[str, Tensor], Any]:
        """Old log-probs and values, GAE advantages and returns at the current KL coefficient."""
        kl_coef = self.kl_ctl.value
        advantages, returns, kl = ppo_advantages(rollout, kl_coef, self.config, self.accelerator)
        batch = {
            "logprobs": rollout.logprobs,
            "values": rollout.values,
            "advantages": advantages,
            "returns": returns,
        }
        return batch, (kl, kl_coef)

    def minibatch_step(
        self, rollout: online.Rollout, batch: dict[str, Tensor], rows: list[int], micros: list[list[int]]
    ) -> dict[str, float]:
        """Token-level means over the minibatch's response tokens on every process."""
        (tokens,) = sum_over_processes(self.accelerator, float(rollout.mask[rows].sum()))
        scale = self.accelerator.num_processes / max(tokens, 1.0)
        loss_of = lambda r: micro_loss(self, rollout, r, batch)  # noqa: E731
        return online.optimizer_step(self, micros, loss_of, scale, tokens)

    def iteration_metrics(self, rollout: online.Rollout, extra: Any) -> dict[str, float]:
        """The objective terms; the adaptive KL controller steps toward its target."""
        kl, kl_coef = extra
        metrics = rollout_metrics(self, rollout, kl, kl_coef)
        if math.isfinite(metrics["objective/kl"]):  # (a skipped non-finite iteration leaves it alone)
            self.kl_ctl.update(metrics["objective/kl"], self.config.rollout_batch)
        return metrics

    def extra_modules(self) -> dict[str, nn.Module]:
        unwrapped = self.unwrapped
        if unwrapped.value_model is not None:
            return {"value_model": unwrapped.value_model}
        return {"value_head": unwrapped.value_head}

    def sample_fields(self, rollout: online.Rollout, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The first response token's advantage and the sequence KL to the reference (``objective/kl``'s)."""
        kl = ((rollout.logprobs - rollout.ref_logprobs) * rollout.mask).sum(-1)
        return {**super().sample_fields(rollout, batch), "kl": kl}

    def before_checkpoint(self) -> None:
        self.state["kl_coef"] = self.kl_ctl.value

    def after_resume(self) -> None:
        self.kl_ctl.value = float(self.state["kl_coef"])

    def save_extra(self, output: Path) -> None:
        from safetensors.torch import save_file

        unwrapped = self.unwrapped
        if unwrapped.value_model is not None:
            unwrapped.value_model.save_pretrained(str(output / "value_model"), safe_serialization=True)
        else:
            save_file(
                {k: v.contiguous() for k, v in unwrapped.value_head.state_dict().items()},
                str(output / "value_head.safetensors"),
            )


rollout_for = online.rollout_for
run_iteration = online.run_iteration


def rollout_metrics(run: PPORun, rollout: online.Rollout, kl: Tensor, kl_coef: float) -> dict[str, float]:
    """Means over every process's samples of the rollout's objective terms."""
    mask = rollout.mask
    seq_kl = ((rollout.logprobs - rollout.ref_logprobs) * mask).sum(-1)
    non_score = -kl_coef * kl.sum(-1)
    sums = {
        "objective/scores": rollout.raw_scores.sum(),
        "objective/kl": seq_kl.sum(),
        "objective/non_score_reward": non_score.sum(),
        "objective/rlhf_reward": (rollout.scores + non_score).sum(),
        "response_length": mask.sum(),
        "eos_rate": rollout.out.finished.float().sum(),
    }
    return {**online.sample_means(run, rollout, sums), "kl_coef": kl_coef}


# --------------------------------------------------------------------------------------------------
# setup and the outer loop


def load_models(
    config: PPOConfig, model: nn.Module | None, device: Any
) -> tuple[online.PolicyWithValue, nn.Module]:
    """The policy with its critic, and the frozen reference."""
    from prefalign.models import CRITIC_ADAPTER, add_critic_adapter, load_value_model

    policy = online.load_policy(config, model)
    critic = adapter = None
    lora = config.lora_settings()
    if not config.shared_value_head and lora is not None:  # a second adapter on the same base weights
        add_critic_adapter(policy, lora)
        adapter = CRITIC_ADAPTER
    elif not config.shared_value_head:
        critic = load_value_model(
            config.value_model or config.reward_model or config.model,
            dtype=config.dtype,
            trust_remote_code=config.trust_remote_code,
        )
    reference = online.load_reference(config, device)
    return online.PolicyWithValue(policy, critic, adapter).to(device), reference


def setup(config: PPOConfig, model: nn.Module | None = None, tokenizer: Any = None) -> PPORun:
    """Load prompts, models and the reward source; build the optimiser, schedule and KL controller."""
    from prefalign.rewards import make_reward

    acc, tokenizer, prompts, held, ckpt = online.prepare(config, tokenizer)
    source = make_reward(
        config.reward,
        config.reward_model,
        device=acc.device,
        raw=config.raw,
        format_pattern=config.format_pattern,
    )
    online.check_reward_data(source, config, prompts, held)  # before any model loads or samples
    source = online.check_vocabulary(source, tokenizer)
    module, reference = load_models(config, model, acc.device)
    kl_ctl = (
        AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
        if config.target_kl
        else FixedKLController(config.kl_coef)
    )
    return online.build_run(
        PPORun, config, acc, module, prompts, held, reference=reference, source=source, tokenizer=tokenizer,
        kl_ctl=kl_ctl, resume_from=ckpt,
    )  # fmt: skip


def train(
    config: PPOConfig, model: nn.Module | None = None, tokenizer: Any = None, callback: Any = None
) -> dict[str, Any]:
    """Run PPO as configured; returns the summary (also written to ``<output>/summary.json``).

    ``callback(iteration, policy)`` runs on the main process every ``eval_every`` iterations and after
    the last one.
    """
    return online.train_run(setup(config, model, tokenizer), callback)


# --------------------------------------------------------------------------------------------------
# command line


def _run(args: argparse.Namespace) -> int:
    config = config_from_args(PPOConfig, args)
    keys = ("objective/scores", "objective/kl", "kl_coef", "eval/scores", "eval/kl")
    report_done(train(config), config.output, keys, unit="iterations")
    return 0


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "ppo", help="RLHF with PPO against a reward, with a KL penalty.", description=PPOConfig.__doc__
    )
    add_config_arguments(parser, PPOConfig)
    parser.set_defaults(func=_run)
