"""The demo's last phase: ``summary.json`` (every method's final point, every evaluation point, the
preferences, the reward model, the timings and the environment) and the report written from it
(:func:`prefalign.report.write_report`)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from prefalign.config import config_to_dict

if TYPE_CHECKING:
    from prefalign.demo.run import Demo


def heldout(metrics: dict[str, Any]) -> dict[str, Any]:
    """What a preference-trained run learned of the held-out pairs: its loss there and how often its implicit
    reward ranks the chosen completion first (empty for methods without held-out pairs)."""
    if "val/loss" not in metrics:
        return {}
    return {"heldout_loss": metrics["val/loss"], "heldout_accuracy": metrics.get("val/rewards/accuracies")}


def summary(demo: Demo, wall: float) -> dict[str, Any]:
    """The run's summary from the results of its phases; ``wall`` is the whole run's time in seconds."""
    from prefalign.report import environment, frontier_sentence

    points = [p for r in demo.results.values() for p in r.get("points", [])]
    methods = []
    for name, r in demo.results.items():
        if not r.get("points"):
            continue
        last = r["points"][-1]
        methods.append(
            {
                "method": name,
                "checkpoint": last["checkpoint"],
                "reward": last["reward"],
                "kl": last["kl"],
                "reward_ci": last.get("reward_ci"),
                "kl_ci": last.get("kl_ci"),
                "train_s": r.get("train_s", 0.0),
                "eval_s": r.get("eval_s", 0.0),
                "training_samples": r.get("training_samples", 0),
                "run": f"runs/{name}",
                **heldout(r.get("eval") or {}),
            }
        )
    return {
        "config": config_to_dict(demo.config),
        "preferences": demo.results.get("preferences"),
        "reward_model": demo.results.get("reward-model"),
        "methods": methods,
        "points": points,
        "conclusion": frontier_sentence(points),
        "phases": demo.timings,
        "wall_s": round(wall, 1),
        "environment": environment(demo.device),
    }


def write_summary(demo: Demo, wall: float) -> dict[str, Any]:
    """Write ``summary.json`` and ``report.html``/``report.md`` in the run folder; returns the summary."""
    from prefalign.report import write_report

    result = summary(demo, wall)
    (demo.out / "summary.json").write_text(json.dumps(result, indent=2))
    write_report(demo.out, result)
    return result
