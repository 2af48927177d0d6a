"""`prefalign demo --seeds 0,1,2`: the whole experiment once per seed, and the spread of its results.

Each seed's run is a complete demo in ``OUTPUT/seed-N`` (a rerun completes it and skips what is done);
``OUTPUT/seeds.json`` and ``OUTPUT/seeds.md`` then hold every method's final point per seed and, across
seeds, the mean, the sample standard deviation and the range of its reward and KL.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefalign.config import save_config
from prefalign.demo.folder import prepare_demo_folder
from prefalign.demo.phase import say

if TYPE_CHECKING:
    from prefalign.demo.config import DemoConfig


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), minimum and maximum of ``values``."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def across_seeds(summaries: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Every method's final point per seed and the spread of its reward and KL across the seeds."""
    per_method: dict[str, dict[int, dict[str, Any]]] = {}
    for seed, summary in summaries.items():
        for m in summary["methods"]:
            per_method.setdefault(m["method"], {})[seed] = {
                k: m.get(k) for k in ("checkpoint", "reward", "kl", "reward_ci", "kl_ci")
            }
    methods = {
        name: {
            "per_seed": {str(seed): point for seed, point in runs.items()},
            "reward": spread([p["reward"] for p in runs.values()]),
            "kl": spread([p["kl"] for p in runs.values()]),
        }
        for name, runs in per_method.items()
    }
    return {
        "seeds": sorted(summaries),
        "methods": methods,
        "conclusions": {str(seed): s["conclusion"] for seed, s in summaries.items()},
    }


def seeds_markdown(result: dict[str, Any]) -> str:
    """The per-seed table and the spread, as Markdown."""
    seeds = result["seeds"]
    head = ["method", *[f"seed {s}: reward / KL" for s in seeds], "reward mean ± sd", "KL mean ± sd"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, m in result["methods"].items():
        cells = [name]
        for s in seeds:
            p = m["per_seed"].get(str(s))
            cells.append(f"{p['reward']:+.3f} / {p['kl']:.2f}" if p else "-")
        cells += [
            f"{m['reward']['mean']:+.3f} ± {m['reward']['std']:.3f}",
            f"{m['kl']['mean']:.2f} ± {m['kl']['std']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    conclusions = [f"- seed {s}: {text}" for s, text in result["conclusions"].items()]
    return "\n".join(["# The demo over several seeds", "", *lines, "", *conclusions, ""])


def run_seeds(config: DemoConfig, run_one: Any) -> dict[str, Any]:
    """Run ``run_one(config for seed N)`` for each of ``config.seeds`` in ``OUTPUT/seed-N`` and write
    ``seeds.json`` and ``seeds.md`` in ``OUTPUT``; returns the across-seeds result."""
    out = Path(config.output)
    prepare_demo_folder(config)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    summaries = {}
    for seed in config.seeds:
        say(f"== seed {seed} ==")
        one = dataclasses.replace(
            config, seed=seed, seeds=[], output=str(out / f"seed-{seed}"), overwrite=False
        )
        summaries[seed] = run_one(one)
    result = across_seeds(summaries)
    (out / "seeds.json").write_text(json.dumps(result, indent=2))
    (out / "seeds.md").write_text(seeds_markdown(result))
    return result
