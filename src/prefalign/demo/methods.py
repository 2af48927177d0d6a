"""The methods the demo compares, each a phase that trains from the reference and is evaluated along its
training: Preferred-FT, DPO (and its beta sweep), the Bradley-Terry reward model of RLHF, PPO against it
(or against the ground truth: PPO-GT; and a target-KL sweep), GRPO, RLOO and Best-of-N."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from prefalign.demo.evaluation import eval_settings, evaluator, save_point
from prefalign.demo.phase import Phase, digest, write_jsonl

if TYPE_CHECKING:
    from prefalign.demo.run import Demo

Runner = Callable[[str], None]
"""Trains and evaluates one run, given its name (its folder under ``runs/``)."""


def steps_between_evals(total_steps: int, evals: int) -> int:
    """``eval_every`` giving at least ``evals`` evaluations (multiples of it, plus the last step), evenly
    spaced where possible: 40 steps and 3 evaluations give 14, 28, 40."""
    if evals <= 1:
        return max(1, total_steps)
    return max(1, min(math.ceil(total_steps / evals), (total_steps - 1) // (evals - 1)))


def method_runs(demo: Demo, method: str, prefs: dict[str, Any]) -> list[tuple[str, Runner]]:
    """The (run name, runner) pairs one method stands for (a sweep stands for several runs)."""
    c = demo.config
    ppo_run = partial(ppo, demo, prefs=prefs)
    runs: dict[str, list[tuple[str, Runner]]] = {
        "preferred-ft": [("preferred-ft", partial(preferred_ft, demo, prefs=prefs))],
        "dpo": [("dpo", partial(dpo, demo, prefs=prefs, beta=c.dpo_beta))],
        "dpo-sweep": [(f"dpo-beta{b:g}", partial(dpo, demo, prefs=prefs, beta=b)) for b in c.dpo_betas],
        "ppo": [("ppo", partial(ppo_run, target_kl=c.ppo_target_kl, learned=True))],
        "ppo-gt": [("ppo-gt", partial(ppo_run, target_kl=c.ppo_target_kl, learned=False))],
        "ppo-kl-sweep": [
            (f"ppo-kl{t:g}", partial(ppo_run, target_kl=t, learned=True)) for t in c.ppo_target_kls
        ],
        "grpo": [("grpo", partial(online, demo, kind="grpo", prefs=prefs, learned=True, options={}))],
        "rloo": [("rloo", partial(online, demo, kind="rloo", prefs=prefs, learned=True, options={}))],
        "best-of-n": [(f"best-of-{n}", partial(best_of_n, demo, prefs=prefs, n=n)) for n in c.best_of],
    }
    return runs[method]


def _trained(summary: dict, points: list[dict], per_step: int, wall: float) -> dict:
    """A training phase's result: its evaluation points, steps, samples seen and time split."""
    eval_s = sum(p["eval_s"] for p in points)
    return {
        "points": points,
        "steps": summary["steps"],
        "training_samples": summary["steps"] * per_step,
        "eval_s": round(eval_s, 2),
        "train_s": round(wall - eval_s, 2),
        "final": summary.get("final", {}),
        "eval": summary.get("eval", {}),
    }


def preferred_ft(demo: Demo, name: str, prefs: dict[str, Any]) -> None:
    """Preferred-FT: supervised fine-tuning on the chosen completions, one per training prompt (the
    sample preferred over all the others of its prompt)."""
    from prefalign.train.loop import total_steps
    from prefalign.train.sft import SFTConfig
    from prefalign.train.sft import train as train_sft

    c = demo.config

    def body(phase: Phase) -> dict[str, Any]:
        start = time.perf_counter()
        config = SFTConfig(
            model=demo.reference_path,
            data=str(demo.out / prefs["folder"] / "chosen-train.jsonl"),
            output=str(phase.folder),
            lr=c.pft_lr,
            epochs=c.pft_epochs,
            batch_size=c.batch_size,
            seed=c.seed,
            progress=c.progress,
        )
        steps = total_steps(config, prefs["chosen_train"])
        config.eval_every = steps_between_evals(steps, c.evals_per_run)
        callback, points = evaluator(demo, name)
        summary = train_sft(config, model=demo.load_policy(), tokenizer=demo.tokenizer, callback=callback)
        return _trained(summary, points, c.batch_size, time.perf_counter() - start)

    inputs = {"preferences": prefs["key"], "eval": eval_settings(demo), "lr": c.pft_lr}
    inputs |= {"epochs": c.pft_epochs, "batch_size": c.batch_size, "evals": c.evals_per_run}
    demo.phase(name, demo.out / "runs" / name, inputs, body)


def dpo(demo: Demo, name: str, prefs: dict[str, Any], beta: float) -> None:
    """DPO on the training pairs; the held-out pairs give its implicit-reward accuracy."""
    from prefalign.train.dpo import DPOConfig
    from prefalign.train.dpo import train as train_dpo
    from prefalign.train.loop import total_steps

    c = demo.config

    def body(phase: Phase) -> dict[str, Any]:
        start = time.perf_counter()
        config = DPOConfig(
            model=demo.reference_path,
            data=str(demo.out / prefs["folder"] / "pairs-train.jsonl"),
            eval_data=str(demo.out / prefs["folder"] / "pairs-heldout.jsonl"),
            output=str(phase.folder),
            beta=beta,
            lr=c.dpo_lr,
            epochs=c.dpo_epochs,
            batch_size=c.batch_size,
            seed=c.seed,
            progress=c.progress,
        )
        config.eval_every = steps_between_evals(total_steps(config, prefs["pairs_train"]), c.evals_per_run)
        callback, points = evaluator(demo, name)
        summary = train_dpo(
            config,
            model=demo.load_policy(),
            tokenizer=demo.tokenizer,
            reference=demo.reference,
            callback=callback,
        )
        return _trained(summary, points, c.batch_size, time.perf_counter() - start)

    inputs = {"preferences": prefs["key"], "eval": eval_settings(demo), "beta": beta, "lr": c.dpo_lr}
    inputs |= {"epochs": c.dpo_epochs, "batch_size": c.batch_size, "evals": c.evals_per_run}
    demo.phase(name, demo.out / "runs" / name, inputs, body)


def reward_model(demo: Demo, prefs: dict[str, Any]) -> dict[str, Any]:
    """The Bradley-Terry reward model of RLHF, on the same training pairs as DPO."""
    from prefalign.train.reward import RewardConfig
    from prefalign.train.reward import train as train_reward

    c = demo.config

    def body(phase: Phase) -> dict[str, Any]:
        config = RewardConfig(
            model=demo.reference_path,
            data=str(demo.out / prefs["folder"] / "pairs-train.jsonl"),
            eval_data=str(demo.out / prefs["folder"] / "pairs-heldout.jsonl"),
            output=str(phase.folder),
            lr=c.rm_lr,
            epochs=c.rm_epochs,
            batch_size=c.batch_size,
            seed=c.seed,
            progress=c.progress,
        )
        summary = train_reward(config, tokenizer=demo.tokenizer)
        return {
            "heldout_accuracy": summary["eval"].get("val/rewards/accuracies"),
            "heldout_pairs": summary["eval_examples"],
            "train_accuracy": summary["final"].get("rewards/accuracies"),
            "steps": summary["steps"],
            "training_samples": summary["steps"] * c.batch_size,
            "path": str(phase.folder),
        }

    inputs = {"preferences": prefs["key"], "lr": c.rm_lr, "epochs": c.rm_epochs, "batch_size": c.batch_size}
    return demo.phase("reward-model", demo.out / "runs" / "reward-model", inputs, body)


def ppo(demo: Demo, name: str, prefs: dict[str, Any], target_kl: float | None, learned: bool) -> None:
    """PPO against the learned reward model (RLHF) or, for ppo-gt, against the ground truth itself."""
    c = demo.config
    options: dict[str, Any] = {"target_kl": target_kl, "shared_value_head": c.ppo_shared_value_head}
    if target_kl is not None:
        options["kl_horizon"] = c.ppo_kl_horizon or c.ppo_rollout_batch
    options |= {"ppo_epochs": c.ppo_epochs, "minibatches": c.ppo_minibatches}
    online(demo, name, "ppo", prefs, learned, options)


def online_trainer(kind: str) -> tuple[type, Callable[..., dict[str, Any]]]:
    """The config class and ``train`` function of an online method (ppo, grpo, rloo)."""
    from prefalign.train import grpo, ppo, rloo

    trainers = {
        "ppo": (ppo.PPOConfig, ppo.train),
        "grpo": (grpo.GRPOConfig, grpo.train),
        "rloo": (rloo.RLOOConfig, rloo.train),
    }
    return trainers[kind]


def online(
    demo: Demo, name: str, kind: str, prefs: dict[str, Any], learned: bool, options: dict[str, Any]
) -> None:
    """An online method (:func:`online_trainer`: ppo, grpo, rloo) against the learned reward model or the
    ground truth, evaluated along its iterations."""
    c = demo.config
    config_cls, train = online_trainer(kind)
    rm = reward_model(demo, prefs) if learned else None
    prompts = write_jsonl(demo.out / "prompts-train.jsonl", [{"prompt": p} for p in demo.train_prompts])
    reward: Any = None if rm else "sentiment"
    if kind != "ppo":  # the group methods take a list of reward sources
        reward = [] if rm else ["sentiment"]

    def body(phase: Phase) -> dict[str, Any]:
        start = time.perf_counter()
        config = config_cls(
            model=demo.reference_path,
            prompts=str(prompts),
            output=str(phase.folder),
            reward_model=rm["path"] if rm else None,
            reward=reward,
            raw=True,
            iterations=c.ppo_iterations,
            rollout_batch=c.ppo_rollout_batch,
            response_length=c.max_new_tokens,
            lr=c.ppo_lr,
            kl_coef=c.ppo_kl_coef,
            eval_every=steps_between_evals(c.ppo_iterations, c.evals_per_run),
            seed=c.seed,
            progress=c.progress,
            **options,
        )
        callback, points = evaluator(demo, name)
        summary = train(config, callback=callback)
        per_step = c.ppo_rollout_batch * getattr(config, "num_generations", 1)  # responses per iteration
        return _trained(summary, points, per_step, time.perf_counter() - start)

    inputs = {"kind": kind, "reward": rm["key"] if rm else "sentiment", "eval": eval_settings(demo)}
    inputs |= {"prompts": digest(demo.train_prompts), "lr": c.ppo_lr, "options": options}
    inputs |= {"iterations": c.ppo_iterations, "rollout_batch": c.ppo_rollout_batch}
    inputs |= {"kl_coef": c.ppo_kl_coef, "evals": c.evals_per_run}
    demo.phase(name, demo.out / "runs" / name, inputs, body)


def best_of_n(demo: Demo, name: str, prefs: dict[str, Any], n: int) -> None:
    """Best-of-N from the reference, chosen by the reward model; KL is the analytic log N - (N-1)/N."""
    from prefalign.evaluate import best_of_n as sample_best_of_n
    from prefalign.rewards import make_reward

    c = demo.config
    rm = reward_model(demo, prefs)

    def body(phase: Phase) -> dict[str, Any]:
        selector = make_reward(reward_model=rm["path"], device=demo.device, raw=True)
        result = sample_best_of_n(
            demo.reference,
            demo.tokenizer,
            demo.test_prompts,
            n,
            selector,
            demo.ground_truth,
            max_new_tokens=c.max_new_tokens,
            seed=c.seed + 3,
            batch_size=c.sample_batch_size,
            samples_per_prompt=c.eval_samples,
        )
        point = save_point(demo, name, f"n-{n}", result, step=0)
        return {"points": [point], "eval_s": point["eval_s"], "training_samples": 0}

    demo.phase(name, demo.out / "runs" / name, {"reward": rm["key"], "eval": eval_settings(demo)}, body)
