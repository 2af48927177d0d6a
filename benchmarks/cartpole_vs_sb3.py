"""CartPole-v1: prefalign's PPO against Stable-Baselines3 PPO (rl-zoo3 settings), same seeds, one run.

Both sides use rl-zoo3's tuned CartPole hyper-parameters (8 envs x 32 steps, 20 epochs, minibatch
256, gamma 0.98, lambda 0.8, lr 1e-3 annealed, 64x64 tanh MLPs), one torch thread, and the same
stopping rule: a 10-episode deterministic evaluation every 8192 env steps, stop at mean >= 475.

SB3 runs from a separate virtual environment (it is never a prefalign dependency):

    python3 -m venv ~/.cache/peers
    ~/.cache/peers/bin/pip install torch==2.13.0 stable-baselines3 gymnasium

Usage: python benchmarks/cartpole_vs_sb3.py [--seeds 0 1 2] [--peers-python PATH] [--sb3-script PATH]

Reported per seed: env steps at the first evaluation reaching 475, the wall seconds each script
measures itself (SB3's from after model construction; ours from the start of ``train``, so env and
model construction count against us), the whole process time including imports, and ours/SB3.
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
    """Run the SB3 script; parse its last line ``sb3 solved_steps=N wall_s=S eval=E``."""
    t0 = time.perf_counter()
    out = subprocess.run([str(python), str(script), str(seed)], capture_output=True, text=True, check=True)
    process_s = time.perf_counter() - t0
    m = re.search(r"solved_steps=(\d+) wall_s=([\d.]+) eval=([\d.]+)", out.stdout)
    if m is None:
        raise RuntimeError(f"unexpected SB3 output:\n{out.stdout}\n{out.stderr}")
    steps, wall, ev = int(m.group(1)), float(m.group(2)), float(m.group(3))
    return {"steps": steps if ev >= 475 else None, "wall_s": wall, "process_s": process_s, "eval": ev}


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
        "wall_s": s["wall_seconds"],
        "process_s": process_s,
        "eval": s["eval_return_mean"],
    }


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
    head = f"{'seed':>4} | {'SB3 steps':>9} {'SB3 wall':>8} {'SB3 proc':>8} | {'ours steps':>10} {'ours wall':>9} {'ours proc':>9} | {'wall ratio':>10}"
    print(head)
    for seed in args.seeds:
        sb3, ours = run_sb3(args.peers_python, args.sb3_script, seed), run_ours(seed)
        ratio = ours["wall_s"] / sb3["wall_s"]
        rows.append({"seed": seed, "sb3": sb3, "ours": ours, "wall_ratio": ratio})
        print(
            f"{seed:>4} | {sb3['steps'] or '-':>9} {sb3['wall_s']:>8.1f} {sb3['process_s']:>8.1f} | "
            f"{ours['steps'] or '-':>10} {ours['wall_s']:>9.1f} {ours['process_s']:>9.1f} | {ratio:>10.3f}",
            flush=True,
        )
    sb3_total = sum(r["sb3"]["wall_s"] for r in rows)
    ours_total = sum(r["ours"]["wall_s"] for r in rows)
    proc_ratio = sum(r["ours"]["process_s"] for r in rows) / sum(r["sb3"]["process_s"] for r in rows)
    print(f"total wall: SB3 {sb3_total:.1f} s, ours {ours_total:.1f} s, ratio {ours_total / sb3_total:.3f}")
    print(f"whole-process ratio (imports included): {proc_ratio:.3f}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
