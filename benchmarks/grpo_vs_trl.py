"""prefalign GRPO vs TRL's GRPOTrainer, side by side in one run, on the same weights, prompts and reward.

Both sides: the bundled SmolLM2-135M-Instruct (float32), prompts as plain text (no chat template), the
VADER sentiment reward, temperature 1, lr 1e-6 with linear decay, beta 0.04 (so a reference model is
kept), one pass per batch of samples, DAPO's token-level aggregation (given explicitly to prefalign; TRL's
default ``loss_type`` in recent versions: check the installed TRL's ``GRPOConfig().loss_type``),
no gradient checkpointing. TRL runs from its own virtual environment (``--peers``, default
``~/.cache/peers``) so it never becomes a prefalign dependency.

Two shapes (``--shape``):

- ``short`` (the default): the movie-review prefixes of ``shared/bench/trl_grpo.py`` (about 4 tokens),
  8 prompts x 4 generations per step, 32 completion tokens, 8 steps. No goal against TRL; prefalign
  must not get slower than before.
- ``long``: 64 few-shot prompts of ``shared/bench/long_prompts.py`` (about 130-150 tokens), 4 prompts x 8
  generations per step, 48 completion tokens, 6 steps: the shape of verifiable-reward work, where a
  prompt is several times longer than its response. Goal: prefalign <= 0.5x TRL's time and <= 0.5x its
  peak memory.

Each run is a fresh process, timed from start to exit (model loading included); peak RSS is that
process tree's maximum resident set. Runs of the two sides are interleaved; the median whole-run time
and the highest peak RSS of each side are compared (prefalign / TRL).

Usage:
    python benchmarks/grpo_vs_trl.py [--shape short|long] [--steps N] [--beta 0.04] [--peers ~/.cache/peers]
                                     [--repeat 2] [--model DIR] [--skip-trl] [--lora 16 --variants lora,default]

With ``--lora R`` TRL trains a PEFT LoRA adapter (``TRL_LORA=R``: rank R, alpha 2R, all linear layers) and
the ``lora`` variant runs ``prefalign grpo --lora-r R --lora-alpha 2R``; the ``default`` variant beside it
is prefalign's full fine-tuning, for LoRA against its own full run. The ``noshare`` variant runs prefalign
with ``--no-share-prompts`` (each prompt encoded once per sample instead of once per group).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_vs_trl import SHARED, measured, median_run  # noqa: E402

TRL_SCRIPT = SHARED / "bench" / "trl_grpo.py"
LONG_PROMPTS_SCRIPT = SHARED / "bench" / "long_prompts.py"


@dataclass(frozen=True)
class Shape:
    """One benchmark shape: prompts per step x generations, completion tokens, default steps, goal."""

    prompts_per_step: int
    generations: int
    completion_tokens: int
    steps: int
    goal: str


SHAPES = {
    "short": Shape(8, 4, 32, 8, "no goal against TRL; prefalign must not be slower than before"),
    "long": Shape(4, 8, 48, 6, "goal <= 0.5x time and <= 0.5x memory"),
}


def trl_prompts() -> list[str]:
    """The prompts trl_grpo.py trains on, read from its source (its subjects x verbs, shuffled by seed 0)."""
    tree = ast.parse(TRL_SCRIPT.read_text())
    lists = {
        node.targets[0].id: ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
        and node.targets[0].id in ("subjects", "verbs")
    }  # fmt: skip
    prompts = [f"{s} {v}" for s in lists["subjects"] for v in lists["verbs"]]
    random.Random(0).shuffle(prompts)
    return prompts


def long_prompts(n: int = 64) -> list[str]:
    """``n`` prompts of ``shared/bench/long_prompts.py`` (few-shot movie reviews, about 130-150 tokens)."""
    out = subprocess.run(
        [sys.executable, str(LONG_PROMPTS_SCRIPT), str(n)], capture_output=True, text=True, check=True
    ).stdout
    return [json.loads(line)["prompt"] for line in out.splitlines() if line.strip()]


def run_trl(
    peers: Path,
    model_dir: Path,
    steps: int,
    beta: float,
    lora: int = 0,
    shape: str = "short",
    prompts: Path | None = None,
) -> dict:
    env = {**os.environ, **({"TRL_LORA": str(lora)} if lora else {})}
    cmd = [str(peers / "bin" / "python"), str(TRL_SCRIPT), str(model_dir), str(steps), str(beta)]
    if shape != "short":  # the short shape keeps trl_grpo.py's own built-in prompts and defaults
        s = SHAPES[shape]
        cmd += [str(prompts), str(s.generations), str(s.completion_tokens), str(s.prompts_per_step)]
    res = measured(cmd, env=env)
    m = re.search(r"train_s=([\d.]+) steps=(\d+)", res["stdout"])
    rewards = re.search(r"rewards \[([^\]]*)\]", res["stdout"])
    res["train_s"], res["steps"] = float(m.group(1)), int(m.group(2))
    values = [float(x) for x in rewards.group(1).split(",")] if rewards and rewards.group(1) else []
    res["first_reward"], res["last_reward"] = (values[0], values[-1]) if values else (float("nan"),) * 2
    return res


def run_prefalign(
    model_dir: Path,
    prompts: Path,
    out: Path,
    steps: int,
    beta: float,
    extra: list[str],
    shape: str = "short",
) -> dict:
    s = SHAPES[shape]
    cmd = [
        str(Path(sys.executable).with_name("prefalign")), "grpo", "--model", str(model_dir),
        "--prompts", str(prompts), "--output", str(out), "--reward", "sentiment", "--raw",
        "--iterations", str(steps), "--rollout-batch", str(s.prompts_per_step),
        "--num-generations", str(s.generations), "--response-length", str(s.completion_tokens),
        "--temperature", "1.0", "--lr", "1e-6", "--lr-schedule", "linear",
        "--beta", str(beta), "--loss-type", "dapo", "--dtype", "float32", "--no-progress", *extra,
    ]  # fmt: skip
    res = measured(cmd)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [m for m in metrics if "objective/scores" in m]
    res["train_s"] = sum(m["time/iteration"] for m in rows)
    res["steps"] = json.loads((out / "summary.json").read_text())["steps"]
    res["first_reward"], res["last_reward"] = rows[0]["objective/scores"], rows[-1]["objective/scores"]
    return res


VARIANTS = {"default": [], "noshare": ["--no-share-prompts"]}


def lora_variant(rank: int) -> list[str]:
    """prefalign's side of ``--lora R``: the PEFT LoRA TRL trains under ``TRL_LORA=R`` (rank R, alpha 2R,
    every linear layer of the decoder, no dropout; the reference is the base with the adapter off)."""
    return ["--lora-r", str(rank), "--lora-alpha", str(2 * rank)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="short",
        help="short: 8 prompts x 4 samples, 32 tokens; long: 4 long prompts x 8 samples, 48 tokens",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="optimiser steps (default: 8 for short, 6 for long)"
    )
    parser.add_argument(
        "--beta", type=float, default=0.04, help="KL coefficient (> 0 keeps a reference model)"
    )
    parser.add_argument("--peers", type=Path, default=Path.home() / ".cache" / "peers")
    parser.add_argument("--model", type=Path, default=None, help="HF folder (default: the bundled SmolLM2)")
    parser.add_argument("--variants", default="default")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per side, interleaved; the median is reported"
    )
    parser.add_argument("--skip-trl", action="store_true", help="only run prefalign (no ratios)")
    parser.add_argument(
        "--lora", type=int, default=0, help="LoRA rank R on both sides (TRL_LORA=R; prefalign --lora-r R)"
    )
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    steps = shape.steps if args.steps is None else args.steps
    if args.lora:
        VARIANTS["lora"] = lora_variant(args.lora)
    if args.model is None:
        from prefalign.models import fetch_builtin

        args.model = fetch_builtin("smollm2")
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prompts = work / "prompts.jsonl"
        texts = trl_prompts() if args.shape == "short" else long_prompts(64)
        prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in texts))
        for rep in range(args.repeat):
            if not args.skip_trl:
                runs.setdefault("trl", []).append(
                    run_trl(args.peers, args.model, steps, args.beta, args.lora, args.shape, prompts)
                )
            for name in args.variants.split(","):
                out = work / f"{name}-{rep}"
                runs.setdefault(f"prefalign-{name}", []).append(
                    run_prefalign(args.model, prompts, out, steps, args.beta, VARIANTS[name], args.shape)
                )
    rows = {name: median_run(r) for name, r in runs.items()}
    print(
        f"shape {args.shape}: {shape.prompts_per_step} prompts x {shape.generations} generations per step, "
        f"{shape.completion_tokens} completion tokens, {steps} steps, beta {args.beta}"
        + (f", LoRA rank {args.lora}" if args.lora else "")
    )
    print(
        f"{'run':<24}{'whole run s':>12}{'s/step':>9}{'peak RSS MB':>13}{'reward first->last':>20}  all runs (s)"
    )
    for name, r in rows.items():
        trend = f"{r['first_reward']:.3f} -> {r['last_reward']:.3f}"
        print(
            f"{name:<24}{r['wall_s']:>12.1f}{r['train_s'] / r['steps']:>9.2f}{r['max_peak_rss_mb']:>13.0f}"
            f"{trend:>20}  {r['all_wall_s']}"
        )
    if "trl" in rows:
        trl = rows["trl"]
        for name, r in rows.items():
            if name != "trl":
                print(
                    f"{name}: time ratio {r['wall_s'] / trl['wall_s']:.2f}x, memory ratio "
                    f"{r['max_peak_rss_mb'] / trl['max_peak_rss_mb']:.2f}x (prefalign / TRL; {args.shape} shape: "
                    f"{shape.goal}; medians of whole-run time, highest peak RSS)"
                )


if __name__ == "__main__":
    main()
