"""CartPole-v1: prefalign's PPO against Stable-Baselines3 PPO (rl-zoo3 settings), wall time to a return of 475.

SB3 runs the fixed shared script (``shared/bench/sb3_cartpole.py``): rl-zoo3's tuned CartPole
hyper-parameters (8 envs x 32 steps, 20 epochs, minibatch 256, gamma 0.98, lambda 0.8, lr 1e-3 and
clip 0.2 linearly annealed once over the budget, no entropy bonus, 64x64 tanh MLPs), one ``learn()``
over 100k env steps with SB3's own ``EvalCallback``: 10 deterministic episodes every 8,192 env steps
on a seeded evaluation env, stop at a mean of 475. Ours runs ``prefalign rl ppo`` with its defaults
(the same except minibatches of 128 and a constant clip range) and the same budget and stopping rule.
Both sides use one torch thread (each script calls ``torch.set_num_threads(1)``) and this script also
sets ``OMP_NUM_THREADS=MKL_NUM_THREADS=OPENBLAS_NUM_THREADS=1`` for both processes.

SB3 runs from a separate virtual environment (it is never a prefalign dependency):

    python3 -m venv ~/.cache/peers
    ~/.cache/peers/bin/pip install torch==2.13.0 stable-baselines3 gymnasium

Usage: python benchmarks/cartpole_vs_sb3.py [--seeds 0 1 2 3 4] [--peers-python PATH] [--sb3-script PATH]

The two sides alternate per seed (SB3 first on even seeds, ours first on odd ones), one process at
a time, so slow drifts in machine load fall on both. Reported per seed: env steps at the first
evaluation reaching 475, the wall seconds each script measures itself (from after env, model and
optimiser construction to the end, evaluations included), and ours / SB3. The total ratio is the sum
of our walls over the sum of SB3's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SB3 = REPO.parent / "shared" / "bench" / "sb3_cartpole.py"
DEFAULT_PEERS = Path.home() / ".cache" / "peers" / "bin" / "python"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _run(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, **ONE_THREAD})
    return out, time.perf_counter() - t0


def run_sb3(python: Path, script: Path, seed: int) -> dict:
    """Run the SB3 script; parse its last line."""
    out, process_s = _run([str(python), str(script), str(seed)])
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
        cmd += ["--threads", "1", "--no-progress", "--output", tmp]
        _, process_s = _run(cmd)
        s = json.loads((Path(tmp) / "summary.json").read_text())
    return {
        "steps": s["solved_steps"],
        "steps_run": s["env_steps"],
        "wall_s": s["wall_seconds"],
        "process_s": process_s,
        "eval": s["eval_return_mean"],
    }


def _side(r: dict) -> str:
    """``steps to 475 (or "not solved in N"), wall s``."""
    steps = f"{r['steps']:>7,}" if r["steps"] else f"not solved in {r['steps_run']:,} (eval {r['eval']:.0f})"
    return f"{steps}, {r['wall_s']:5.1f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--peers-python", type=Path, default=DEFAULT_PEERS)
    parser.add_argument("--sb3-script", type=Path, default=DEFAULT_SB3)
    args = parser.parse_args()
    if not args.peers_python.exists():
        print(f"no peers venv at {args.peers_python}; see this file's docstring", file=sys.stderr)
        return 2
    rows = []
    print("seed | SB3: steps to 475, wall | ours: steps to 475, wall | ours / SB3")
    for k, seed in enumerate(args.seeds):
        order = ("sb3", "ours") if k % 2 == 0 else ("ours", "sb3")
        res = {}
        for side in order:
            res[side] = run_sb3(args.peers_python, args.sb3_script, seed) if side == "sb3" else run_ours(seed)
        ratio = res["ours"]["wall_s"] / res["sb3"]["wall_s"]
        rows.append({"seed": seed, "first": order[0], **res, "wall_ratio": ratio})
        print(f"{seed:>4} | {_side(res['sb3'])} | {_side(res['ours'])} | {ratio:.2f}", flush=True)
    sb3_w = sum(r["sb3"]["wall_s"] for r in rows)
    ours_w = sum(r["ours"]["wall_s"] for r in rows)
    unsolved = [f"{side} seed {r['seed']}" for r in rows for side in ("sb3", "ours") if not r[side]["steps"]]
    print(f"total wall: SB3 {sb3_w:.1f} s, ours {ours_w:.1f} s, ratio {ours_w / sb3_w:.2f}")
    if unsolved:
        print(f"not solved within the budget: {', '.join(unsolved)}")
    proc = sum(r["ours"]["process_s"] for r in rows) / sum(r["sb3"]["process_s"] for r in rows)
    print(f"whole-process time ratio (interpreter, imports and setup included): {proc:.2f}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
