"""CartPole-v1: prefalign's PPO against Stable-Baselines3 PPO (rl-zoo3 settings), same seeds, one run.

SB3 uses rl-zoo3's tuned CartPole hyper-parameters (8 envs x 32 steps, 20 epochs, minibatch 256,
gamma 0.98, lambda 0.8, lr 1e-3 and clip 0.2 annealed, no entropy bonus, 64x64 tanh MLPs); ours uses
the same except minibatches of 128 and a constant clip range (prefalign's defaults). Both use one
torch thread and the same stopping rule: a 10-episode deterministic evaluation every 8192 env steps,
stop at mean >= 475, budget 100k steps.

SB3 runs from a separate virtual environment (it is never a prefalign dependency):

    python3 -m venv ~/.cache/peers
    ~/.cache/peers/bin/pip install torch==2.13.0 stable-baselines3 gymnasium

Usage: python benchmarks/cartpole_vs_sb3.py [--seeds 0 1 2] [--peers-python PATH] [--sb3-script PATH]

Reported per seed: env steps at the first evaluation reaching 475, the wall seconds each script
measures itself (both from after env, model and optimiser construction, evaluations included),
wall per env step, the whole process time including imports and setup, and ours/SB3.

Caveat: the SB3 script calls ``learn(8192, reset_num_timesteps=False)`` repeatedly, so SB3's linear
schedules see ``progress_remaining = 1 - num_timesteps / (num_timesteps_at_call + 8192)``: each chunk
restarts the learning rate and clip range at ``8192 / (steps so far + 8192)`` of their initial
values and anneals them to 0. Ours anneals once over the whole 100k budget. This is part of why
SB3 needs more steps; the wall-per-step column compares the implementations' speed alone.
The runs are sequential so that they never compete for the CPU.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SB3 = REPO.parent / "shared" / "bench" / "sb3_cartpole.py"
DEFAULT_PEERS = Path.home() / ".cache" / "peers" / "bin" / "python"


def run_sb3(python: Path, script: Path, seed: int) -> dict:
    """Run the SB3 script; parse its per-evaluation lines and its last line."""
    t0 = time.perf_counter()
    out = subprocess.run([str(python), str(script), str(seed)], capture_output=True, text=True, check=True)
    process_s = time.perf_counter() - t0
    m = re.search(r"solved_steps=(\d+) wall_s=([\d.]+) eval=([\d.]+)", out.stdout)
    if m is None:
        raise RuntimeError(f"unexpected SB3 output:\n{out.stdout}\n{out.stderr}")
    steps, wall, ev = int(m.group(1)), float(m.group(2)), float(m.group(3))
    solved = steps if ev >= 475 else None
    return {"steps": solved, "steps_run": steps, "wall_s": wall, "process_s": process_s, "eval": ev}


def run_ours(seed: int) -> dict:
    """Run ``prefalign rl ppo`` in a fresh process with the same budget and stopping rule."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "prefalign", "rl", "ppo", "--env", "CartPole-v1", "--seed", str(seed)]
        cmd += ["--total-steps", "100000", "--target-return", "475", "--eval-every", "8192"]
        cmd += ["--no-progress", "--output", tmp]
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, text=True, check=True)
        process_s = time.perf_counter() - t0
        s = json.loads((Path(tmp) / "summary.json").read_text())
    return {
        "steps": s["solved_steps"],
        "steps_run": s["env_steps"],
        "wall_s": s["wall_seconds"],
        "process_s": process_s,
        "eval": s["eval_return_mean"],
    }


def _side(r: dict) -> str:
    """``steps to 475 (or "not solved in N"), wall s, ms per 1k env steps``."""
    steps = f"{r['steps']:>6}" if r["steps"] else f"not solved in {r['steps_run']} (eval {r['eval']:.0f})"
    return f"{steps}, {r['wall_s']:5.1f} s, {1e6 * r['wall_s'] / r['steps_run']:6.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--peers-python", type=Path, default=DEFAULT_PEERS)
    parser.add_argument("--sb3-script", type=Path, default=DEFAULT_SB3)
    args = parser.parse_args()
    if not args.peers_python.exists():
        print(f"no peers venv at {args.peers_python}; see this file's docstring", file=sys.stderr)
        return 2
    rows = []
    print(
        "seed | SB3: steps to 475, wall s, ms/1k steps | ours: steps to 475, wall s, ms/1k steps | wall ratio"
    )
    for seed in args.seeds:
        sb3, ours = run_sb3(args.peers_python, args.sb3_script, seed), run_ours(seed)
        ratio = ours["wall_s"] / sb3["wall_s"]
        rows.append({"seed": seed, "sb3": sb3, "ours": ours, "wall_ratio": ratio})
        print(f"{seed:>4} | {_side(sb3)} | {_side(ours)} | {ratio:.3f}", flush=True)
    both = [r for r in rows if r["sb3"]["steps"] and r["ours"]["steps"]]
    for label, chosen in (("all seeds", rows), ("seeds both solved", both)):
        if chosen:
            sb3_w = sum(r["sb3"]["wall_s"] for r in chosen)
            ours_w = sum(r["ours"]["wall_s"] for r in chosen)
            print(f"total wall ({label}): SB3 {sb3_w:.1f} s, ours {ours_w:.1f} s, ratio {ours_w / sb3_w:.3f}")
    per_step = [
        (1e3 * r["ours"]["wall_s"] / r["ours"]["steps_run"])
        / (1e3 * r["sb3"]["wall_s"] / r["sb3"]["steps_run"])
        for r in rows
    ]
    print(f"wall per env step, ours/SB3: {', '.join(f'{x:.3f}' for x in per_step)}")
    proc = sum(r["ours"]["process_s"] for r in rows) / sum(r["sb3"]["process_s"] for r in rows)
    print(f"whole-process time ratio (imports and setup included): {proc:.3f}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
