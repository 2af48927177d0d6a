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
import json
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from prefalign.config import ConfigError, add_config_arguments, config_from_args, config_to_dict, save_config
from prefalign.kl import AdaptiveKLController, FixedKLController
from prefalign.losses import KL_ESTIMATORS, gae, masked_mean, ppo_policy_loss, ppo_value_loss, token_logps
from prefalign.memory import use_memory_efficient_layers
from prefalign.train import online
from prefalign.train.loop import (
    MetricsWriter,
    latest_checkpoint,
    load_checkpoint,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    prune_checkpoints,
    save_checkpoint,
    save_final_model,
    seed_everything,
    split_rows,
)

log = logging.getLogger(__name__)


@dataclass
class PPOConfig(online.OnlineConfig):
    """RLHF with PPO: a reward (model, VADER or your function) minus a KL penalty to the reference."""

    value_model: str | None = None
    """Critic to start from (default: the reward model when there is one, else the policy), a separate model."""
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
            (self.target_kl is None or self.target_kl > 0, f"target_kl must be > 0, got {self.target_kl}"),
            (self.kl_horizon >= 1, f"kl_horizon must be >= 1, got {self.kl_horizon}"),
            (0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma and lam must be in [0, 1]"),
            (self.cliprange > 0 and self.cliprange_value > 0, "cliprange and cliprange_value must be > 0"),
            (self.vf_coef >= 0, f"vf_coef must be >= 0, got {self.vf_coef}"),
            (not (self.shared_value_head and self.value_model), "give --value-model or --shared-value-head, not both"),
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
    module: nn.Module, micro: online.Micro, batch: dict[str, Tensor], config: PPOConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """Summed (not averaged) policy + value loss of one micro-batch, and summed statistics."""
    logits, values = module(micro, config.temperature)
    take = {k: micro.take(v).to(logits.device) for k, v in batch.items()}
    mask = micro.mask
    n = mask.sum()
    logprobs = token_logps(logits, micro.response_ids)
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
class PPORun:
    """Everything one PPO run holds between iterations."""

    config: PPOConfig
    accelerator: Any
    module: nn.Module
    reference: nn.Module
    source: Any
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    kl_ctl: Any
    prompts: tuple[list[list[int]], list[str]]
    eval_prompts: tuple[list[list[int]], list[str]]
    iterations: int
    state: dict[str, Any] = field(default_factory=lambda: {"step": 0})
    minibatch_stats: list[dict[str, float]] = field(default_factory=list)

    @property
    def unwrapped(self) -> online.PolicyWithValue:
        return self.accelerator.unwrap_model(self.module)


def update(
    run: PPORun, rollout: online.Rollout, batch: dict[str, Tensor], first: list[list[list[int]]], it: int
) -> dict[str, float]:
    """``ppo_epochs`` passes of one optimiser step per minibatch; returns the statistics' means."""
    config, acc = run.config, run.accelerator
    run.minibatch_stats = []
    run.module.train()
    for epoch in range(config.ppo_epochs):
        plans = first if epoch == 0 else [
            online.micro_plan(rollout, rows, config.micro_batch_tokens)
            for rows in online.minibatch_plan(len(rollout), config.minibatches, config.seed, it, epoch)
        ]  # fmt: skip
        for micros in plans:
            local = float(sum(rollout.mask[rows].sum() for rows in micros))
            (tokens,) = online.global_sum(acc, local)
            sums: dict[str, Tensor] = {}
            for j, rows in enumerate(micros):
                sync = nullcontext() if j == len(micros) - 1 else acc.no_sync(run.module)
                with sync:
                    loss, stats = micro_loss(
                        run.module, online.make_micro(rollout, rows, acc.device), batch, config
                    )
                    acc.backward(loss * (acc.num_processes / max(tokens, 1.0)))
                sums = {k: sums.get(k, 0.0) + v for k, v in stats.items()}
            params = [p for p in run.module.parameters() if p.grad is not None]
            norm = acc.clip_grad_norm_(params, config.max_grad_norm) if config.max_grad_norm else None
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            totals = online.global_sum(acc, *(float(v) for v in sums.values()))
            row = {k: v / max(tokens, 1.0) for k, v in zip(sums, totals, strict=True)}
            row["policy/grad_norm"] = float(norm) if norm is not None else 0.0
            run.minibatch_stats.append(row)
    keys = run.minibatch_stats[0].keys()
    return {k: sum(r[k] for r in run.minibatch_stats) / len(run.minibatch_stats) for k in keys}


def rollout_for(
    run: PPORun, prompt_ids: list[list[int]], texts: list[str], seed: int, for_update: bool = False
) -> tuple[online.Rollout, dict[str, float]]:
    """Sample, score and re-score under the reference; returns the rollout and the phase timings."""
    config = run.config
    t0 = time.perf_counter()
    keep = for_update and not config.recompute_logprobs
    out = online.sample(run.unwrapped.policy, run.tokenizer, prompt_ids, config, seed, return_hidden=keep)
    t1 = time.perf_counter()
    scores, raw = online.score(run.source, texts, out, config.missing_eos_penalty)
    t2 = time.perf_counter()
    rollout = online.Rollout(out, scores, raw)
    rollout.ref_logprobs = online.reference_logprobs(run.reference, out, config).cpu()
    return rollout, {
        "time/generate": t1 - t0,
        "time/score": t2 - t1,
        "time/forward": time.perf_counter() - t2,
    }


def run_iteration(run: PPORun, it: int) -> dict[str, float]:
    """One PPO iteration (0-based ``it``): rollout, old pass, advantages, update; returns its metrics."""
    config, acc = run.config, run.accelerator
    start = time.perf_counter()
    ids, texts = run.prompts
    chosen = online.iteration_prompts(len(ids), config.rollout_batch, config.seed, it)
    mine = chosen[acc.process_index :: acc.num_processes]
    seed = (config.seed * 1_000_003 + it) * 64 + acc.process_index
    rollout, timing = rollout_for(
        run, [ids[i] for i in mine], [texts[i] for i in mine], seed, for_update=True
    )
    t0 = time.perf_counter()
    first = [
        online.micro_plan(rollout, rows, config.micro_batch_tokens)
        for rows in online.minibatch_plan(len(rollout), config.minibatches, config.seed, it, 0)
    ]
    flat = [m for plan in first for m in plan]
    if config.recompute_logprobs:
        online.old_pass(run.unwrapped, rollout, flat, acc.device, config.temperature)
    else:
        online.sampler_pass(run.unwrapped, rollout, flat, acc.device)
    timing["time/forward"] += time.perf_counter() - t0
    kl_coef = run.kl_ctl.value
    advantages, returns, kl = ppo_advantages(rollout, kl_coef, config, acc)
    batch = {
        "logprobs": rollout.logprobs,
        "values": rollout.values,
        "advantages": advantages,
        "returns": returns,
    }
    t0 = time.perf_counter()
    stats = update(run, rollout, batch, first, it)
    timing["time/update"] = time.perf_counter() - t0
    metrics = rollout_metrics(run, rollout, kl, kl_coef)
    run.kl_ctl.update(metrics["objective/kl"], config.rollout_batch)
    return {
        **metrics,
        **stats,
        **timing,
        "lr": run.scheduler.get_last_lr()[0],
        "time/iteration": time.perf_counter() - start,
    }


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
    totals = online.global_sum(
        run.accelerator,
        float(len(rollout)),
        float(mask.sum()),
        float((rollout.entropy * mask).sum()),
        *(float(v) for v in sums.values()),
    )
    n, tokens, entropy = totals[:3]
    out = {k: v / n for k, v in zip(sums, totals[3:], strict=True)}
    return {**out, "objective/entropy": entropy / max(tokens, 1.0), "kl_coef": kl_coef}


def evaluate(run: PPORun) -> dict[str, float]:
    """Mean score and sequence KL to the reference on the held-out prompts (fixed sampling seed)."""
    ids, texts = run.eval_prompts
    acc = run.accelerator
    mine = list(range(acc.process_index, len(ids), acc.num_processes))
    if not ids:
        return {}
    seed = run.config.seed + 10**9 + acc.process_index
    rollout, _ = rollout_for(run, [ids[i] for i in mine], [texts[i] for i in mine], seed)
    kl = ((rollout.out.logprobs - rollout.ref_logprobs) * rollout.mask).sum(-1)
    n, s, k = online.global_sum(acc, float(len(rollout)), float(rollout.raw_scores.sum()), float(kl.sum()))
    return {"eval/scores": s / n, "eval/kl": k / n}


# --------------------------------------------------------------------------------------------------
# setup and the outer loop


def load_models(
    config: PPOConfig, model: nn.Module | None, device: Any
) -> tuple[online.PolicyWithValue, nn.Module]:
    """The policy with its critic, and the frozen reference."""
    from prefalign.models import load_policy, load_reference, load_value_model

    kwargs = {"dtype": config.dtype, "trust_remote_code": config.trust_remote_code}
    policy = model if model is not None else load_policy(config.model, **kwargs)
    for sub in policy.modules():  # PPO's ratio needs the same function in every pass: no dropout
        if isinstance(sub, nn.Dropout):
            sub.p = 0.0
    critic = None
    if not config.shared_value_head:
        critic = load_value_model(config.value_model or config.reward_model or config.model, **kwargs)
    reference = load_reference(config.ref_model or config.model, **kwargs)
    module = online.PolicyWithValue(policy, critic).to(device)
    use_memory_efficient_layers(module)
    return module, reference.to(device)


def make_source(config: PPOConfig, tokenizer: Any, device: Any) -> Any:
    from prefalign.rewards import ModelReward, make_reward

    source = make_reward(config.reward, config.reward_model, device=device, raw=config.raw)
    if isinstance(source, ModelReward):
        source.same_vocab = source.tokenizer.get_vocab() == tokenizer.get_vocab()
    return source


def setup(config: PPOConfig, model: nn.Module | None = None, tokenizer: Any = None) -> PPORun:
    """Load prompts, models and the reward source; build the optimiser, schedule and KL controller."""
    from prefalign.data import load_prompts
    from prefalign.models import load_tokenizer

    seed_everything(config.seed)
    acc = make_accelerator()
    if config.rollout_batch % acc.num_processes:
        raise ConfigError(
            f"rollout_batch {config.rollout_batch} must divide over {acc.num_processes} processes"
        )
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
    rows, held = split_rows(
        load_prompts(config.prompts),
        load_prompts(config.eval_prompts) if config.eval_prompts else [],
        config.eval_split,
        config.seed,
    )
    source = make_source(config, tokenizer, acc.device)
    module, reference = load_models(config, model, acc.device)
    iterations = config.total_iterations(len(rows))
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config)
    scheduler = make_scheduler(optimizer, config, iterations * config.ppo_epochs * config.minibatches)
    module, optimizer = acc.prepare(module, optimizer)
    kl_ctl = (
        AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
        if config.target_kl
        else FixedKLController(config.kl_coef)
    )
    encode = lambda r: (online.encode_prompts(tokenizer, r, config), online.prompt_texts(tokenizer, r))  # noqa: E731
    return PPORun(
        config,
        acc,
        module,
        reference,
        source,
        tokenizer,
        optimizer,
        scheduler,
        kl_ctl,
        encode(rows),
        encode(held),
        iterations,
    )


def _extra(run: PPORun) -> dict[str, nn.Module]:
    unwrapped = run.unwrapped
    return (
        {"value_model": unwrapped.value_model}
        if unwrapped.value_model is not None
        else {"value_head": unwrapped.value_head}
    )


def _checkpoint(run: PPORun) -> None:
    output = Path(run.config.output)
    run.state["kl_coef"] = run.kl_ctl.value
    if run.accelerator.is_main_process:
        save_checkpoint(
            output / "checkpoints" / f"step-{run.state['step']}",
            run.unwrapped.policy,
            run.optimizer,
            run.scheduler,
            run.state,
            run.tokenizer,
            run.config,
            extra=_extra(run),
        )
        prune_checkpoints(output, max(1, run.config.keep_checkpoints))


def _resume(run: PPORun) -> bool:
    ckpt = latest_checkpoint(Path(run.config.output)) if run.config.resume else None
    if run.config.resume and ckpt is None:
        log.info("--resume: no checkpoint in %s, starting from scratch", run.config.output)
    if ckpt is None:
        return False
    run.state = load_checkpoint(ckpt, run.unwrapped.policy, run.optimizer, run.scheduler, extra=_extra(run))
    run.kl_ctl.value = float(run.state["kl_coef"])
    log.info("resumed from %s (iteration %d)", ckpt, run.state["step"])
    return True


def train(
    config: PPOConfig, callback: Any = None, model: nn.Module | None = None, tokenizer: Any = None
) -> dict[str, Any]:
    """Run PPO as configured; returns the summary (also written to ``<output>/summary.json``).

    ``callback(iteration, policy)`` runs every ``eval_every`` iterations and after the last one.
    """
    start = time.perf_counter()
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    run = setup(config, model, tokenizer)
    main = run.accelerator.is_main_process
    if main:
        save_config(config, output / "config.yaml")
    resumed = _resume(run)
    writer = MetricsWriter(
        output, config.report_to, config=config_to_dict(config), append=resumed, enabled=main
    )
    last = _iterate(run, writer, callback)
    final_eval = evaluate(run)
    if final_eval:
        writer.write(run.state["step"], final_eval)
    writer.close()
    if config.save_every == 0 or run.state["step"] % config.save_every:
        _checkpoint(run)
    summary = {
        "steps": run.state["step"],
        "train_prompts": len(run.prompts[0]),
        "eval_prompts": len(run.eval_prompts[0]),
        "final": last,
        "eval": final_eval,
        "wall_s": round(time.perf_counter() - start, 3),
        "settings": config_to_dict(config),
    }
    if main:
        _save_final(run, output)
        (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _iterate(run: PPORun, writer: MetricsWriter, callback: Any) -> dict[str, float]:
    config = run.config
    bar = tqdm(
        total=run.iterations,
        initial=run.state["step"],
        desc="ppo",
        unit="it",
        disable=not config.progress,
        dynamic_ncols=True,
    )
    metrics: dict[str, float] = {}
    while run.state["step"] < run.iterations:
        metrics = run_iteration(run, run.state["step"])
        run.state["step"] += 1
        step = run.state["step"]
        is_last = step == run.iterations
        if config.eval_every and step % config.eval_every == 0 and not is_last:
            metrics.update(evaluate(run))
        writer.write(step, metrics)
        if callback is not None and ((config.eval_every and step % config.eval_every == 0) or is_last):
            callback(step, run.unwrapped.policy)
        if config.save_every and step % config.save_every == 0:
            _checkpoint(run)
        shown = ("objective/scores", "objective/kl", "kl_coef")
        bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.3g}" for k in shown}, refresh=False)
        bar.update(1)
    bar.close()
    return metrics


def _save_final(run: PPORun, output: Path) -> None:
    from safetensors.torch import save_file

    unwrapped = run.unwrapped
    save_final_model(unwrapped.policy, run.tokenizer, output)
    if unwrapped.value_model is not None:
        unwrapped.value_model.save_pretrained(str(output / "value_model"), safe_serialization=True)
    else:
        save_file(
            {k: v.contiguous() for k, v in unwrapped.value_head.state_dict().items()},
            str(output / "value_head.safetensors"),
        )


# --------------------------------------------------------------------------------------------------
# command line


def _run(args: argparse.Namespace) -> int:
    config = config_from_args(PPOConfig, args)
    summary = train(config)
    if args_main():
        final = {**summary["final"], **summary["eval"]}
        keys = ("objective/scores", "objective/kl", "kl_coef", "eval/scores", "eval/kl")
        print(
            f"done: {summary['steps']} iterations in {summary['wall_s']:.1f} s; policy saved to {config.output}"
        )
        print("  " + "  ".join(f"{k}={final[k]:.4g}" for k in keys if k in final))
    return 0


def args_main() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "ppo", help="RLHF with PPO against a reward, with a KL penalty.", description=PPOConfig.__doc__
    )
    add_config_arguments(parser, PPOConfig)
    parser.set_defaults(func=_run)
