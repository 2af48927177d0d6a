"""Evaluation: every policy sampled on the test prompts with the same seed, scored by the ground truth,
and its KL to the reference measured; one (reward, KL) point per evaluation, its samples kept in
``samples/``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prefalign.demo.phase import Phase, digest, say

if TYPE_CHECKING:
    from prefalign.demo.run import Demo


def eval_settings(demo: Demo) -> dict[str, Any]:
    """What an evaluation's numbers depend on (part of the inputs of every phase that evaluates)."""
    c = demo.config
    return {
        "reference": demo.reference_key,
        "test_prompts": digest(demo.test_prompts),
        "max_new_tokens": c.max_new_tokens,
        "seed": c.seed,
        "sample_batch_size": c.sample_batch_size,
        "eval_samples": c.eval_samples,
    }


def save_point(demo: Demo, method: str, checkpoint: str, result: Any, **extra: Any) -> dict[str, Any]:
    """Write an evaluation's samples under ``samples/`` and return its point for the summary."""
    rel = f"samples/{method}-{checkpoint}.jsonl"
    result.write(demo.out / rel)
    half = (result.reward_ci[1] - result.reward_ci[0]) / 2
    say(
        f"  {method} {checkpoint}: reward {result.reward:+.3f} ±{half:.3f}  KL {result.kl:.2f}"
        f"  ({len(result.records)} samples, {result.seconds:.1f} s)"
    )
    return {
        "method": method,
        "checkpoint": checkpoint,
        "reward": result.reward,
        "kl": result.kl,
        "reward_ci": result.reward_ci,
        "kl_ci": result.kl_ci,
        "samples": rel,
        "eval_s": round(result.seconds, 2),
        **extra,
    }


def evaluate(demo: Demo, policy: Any, progress: bool = False) -> Any:
    """``policy`` evaluated as every point is: the test prompts, ``eval_samples`` samples each, the same
    sampling seed for every policy, the ground truth and the KL to the reference."""
    from prefalign.evaluate import evaluate_policy

    c = demo.config
    return evaluate_policy(
        policy, demo.reference, demo.tokenizer, demo.test_prompts, demo.ground_truth,
        max_new_tokens=c.max_new_tokens, seed=c.seed + 1, batch_size=c.sample_batch_size, progress=progress,
        samples_per_prompt=c.eval_samples,
    )  # fmt: skip


def evaluator(demo: Demo, method: str) -> tuple[Callable[[int, Any], None], list[dict[str, Any]]]:
    """A training callback that evaluates the policy at each call; and the list of points it fills."""

    points: list[dict[str, Any]] = []

    def callback(step: int, model: Any) -> None:
        result = evaluate(demo, model)
        points.append(save_point(demo, method, f"step-{step}", result, step=step))

    return callback, points


def evaluate_reference(demo: Demo) -> None:
    """The reference policy's point: where every method starts (KL 0)."""

    def body(phase: Phase) -> dict[str, Any]:
        result = evaluate(demo, demo.reference, progress=demo.config.progress)
        point = save_point(demo, "reference", "step-0", result, step=0)
        return {"points": [point], "eval_s": point["eval_s"], "training_samples": 0}

    demo.phase("reference", demo.out / "runs" / "reference", eval_settings(demo), body)
