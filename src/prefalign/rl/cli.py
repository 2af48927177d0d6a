"""`prefalign rl gridworld | random-walk | ppo`: the RL foundations from the command line."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prefalign.config import ConfigError, add_config_arguments, check_output_folder, config_from_args


@dataclass
class GridworldConfig:
    """Print value tables and greedy policies of Sutton & Barto's gridworlds."""

    grid: str = "4x4"
    """4x4 (Example 4.1, gamma 1) or 5x5 (Figure 3.2, gamma 0.9)."""
    sweeps: list[int] = field(default_factory=list)
    """Also print iterative policy evaluation of the random policy after these sweeps, e.g. 0,1,2,3,10."""
    decimals: int = 1
    """Decimals shown in value tables."""

    def __post_init__(self) -> None:
        if self.grid not in ("4x4", "5x5"):
            raise ConfigError(f"grid must be 4x4 or 5x5, got {self.grid!r}")
        if any(k < 0 for k in self.sweeps):
            raise ConfigError(f"sweeps must be >= 0, got {self.sweeps}")


@dataclass
class RandomWalkConfig:
    """TD(0) vs constant-alpha Monte-Carlo on the 5-state random walk (Sutton & Barto Example 6.2)."""

    runs: int = 100
    """Independent runs averaged per curve."""
    episodes: int = 100
    """Episodes per run."""
    td_alphas: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.15])
    """TD(0) step sizes."""
    mc_alphas: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.03, 0.04])
    """Monte-Carlo step sizes."""
    seed: int = 0
    """Random seed."""
    output: str = "runs/random-walk"
    """Folder for rms.png and rms.json."""

    def __post_init__(self) -> None:
        if self.runs < 1 or self.episodes < 1:
            raise ConfigError(f"runs and episodes must be >= 1, got {self.runs}, {self.episodes}")
        check_output_folder(self.output)


def format_values(v: np.ndarray, rows: int, cols: int, decimals: int = 1) -> str:
    """A value vector ``(rows * cols,)`` as a right-aligned table."""
    cells = [f"{x:.{decimals}f}" for x in np.where(np.abs(v) < 0.5 * 10**-decimals, 0.0, v)]
    width = max(len(c) for c in cells)
    return "\n".join(" ".join(c.rjust(width) for c in cells[r * cols : (r + 1) * cols]) for r in range(rows))


def format_policy(policy: np.ndarray, rows: int, cols: int, terminal: np.ndarray) -> str:
    """Greedy actions per cell as arrows (all tied actions shown), terminal cells as ``*``."""
    from prefalign.rl.envs import GRID_ARROWS

    cells = [
        "*" if terminal[s] else "".join(GRID_ARROWS[a] for a in np.flatnonzero(policy[s] > 0))
        for s in range(len(policy))
    ]
    width = max(len(c) for c in cells)
    return "\n".join(" ".join(c.ljust(width) for c in cells[r * cols : (r + 1) * cols]) for r in range(rows))


def run_gridworld(args: argparse.Namespace) -> int:
    from prefalign.rl import gridworld_4x4, gridworld_5x5, iterative_policy_evaluation, policy_iteration

    cfg = config_from_args(GridworldConfig, args)
    mdp = gridworld_4x4() if cfg.grid == "4x4" else gridworld_5x5()
    n = 4 if cfg.grid == "4x4" else 5
    random_pi = mdp.uniform_policy()
    for k in cfg.sweeps:
        v_k = iterative_policy_evaluation(mdp, random_pi, sweeps=k)
        print(f"random policy, sweep k = {k}:\n{format_values(v_k, n, n, cfg.decimals)}")
        print(f"greedy policy w.r.t. v_{k}:\n{format_policy(mdp.greedy(v_k), n, n, mdp.terminal)}\n")
    v_pi = mdp.evaluate(random_pi)
    print(
        f"v_pi of the equiprobable random policy (gamma = {mdp.gamma:g}):\n{format_values(v_pi, n, n, cfg.decimals)}"
    )
    print(f"greedy policy w.r.t. v_pi:\n{format_policy(mdp.greedy(v_pi), n, n, mdp.terminal)}\n")
    result = policy_iteration(mdp)
    print(
        f"v* (policy iteration, {result.iterations} iterations):\n{format_values(result.v, n, n, cfg.decimals)}"
    )
    print(f"pi*:\n{format_policy(result.policy, n, n, mdp.terminal)}")
    return 0


def run_random_walk(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from prefalign.rl import random_walk, td_vs_mc_rms
    from prefalign.rl.envs import RANDOM_WALK_START

    cfg = config_from_args(RandomWalkConfig, args)
    curves = td_vs_mc_rms(
        random_walk(), RANDOM_WALK_START, runs=cfg.runs, episodes=cfg.episodes,
        td_alphas=cfg.td_alphas, mc_alphas=cfg.mc_alphas, seed=cfg.seed,
    )  # fmt: skip
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rms.json").write_text(json.dumps({k: v.tolist() for k, v in curves.items()}) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot(curve, label=name, linestyle="-" if name.startswith("TD") else "--")
    ax.set(xlabel="episodes", ylabel=f"RMS error over states, averaged over {cfg.runs} runs")
    ax.set_title("Random walk (Sutton & Barto Example 6.2)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "rms.png", dpi=120)
    plt.close(fig)
    print(f"RMS error after {cfg.episodes} episodes (mean of {cfg.runs} runs):")
    for name, curve in sorted(curves.items(), key=lambda kv: kv[1][-1]):
        print(f"  {name:<16} {curve[-1]:.4f}")
    print(f"wrote {out / 'rms.png'} and {out / 'rms.json'}")
    return 0


def run_ppo(args: argparse.Namespace) -> int:
    from prefalign.rl.ppo import PPOConfig, train

    cfg = config_from_args(PPOConfig, args)
    summary = train(cfg)
    solved = summary["solved_steps"]
    print(
        f"{cfg.env} seed {cfg.seed}: eval return {summary['eval_return_mean']:.1f} over {cfg.eval_episodes} "
        f"deterministic episodes after {summary['env_steps']} env steps"
        + (f" (target reached at {solved})" if solved is not None else "")
        + f", {summary['wall_seconds']:.1f} s; wrote {Path(cfg.output) / 'summary.json'}"
    )
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``prefalign rl`` and its sub-commands."""
    from prefalign.rl.ppo import PPOConfig

    rl = subparsers.add_parser("rl", help="RL foundations: gridworld DP, TD vs MC, PPO on gymnasium.")
    rl.set_defaults(func=lambda _args: rl.print_help() or 2)
    sub = rl.add_subparsers(dest="rl_command", metavar="RL_COMMAND")
    for name, cls, func in (
        ("gridworld", GridworldConfig, run_gridworld),
        ("random-walk", RandomWalkConfig, run_random_walk),
        ("ppo", PPOConfig, run_ppo),
    ):
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        p = sub.add_parser(name, help=doc, description=doc)
        add_config_arguments(p, cls)
        p.set_defaults(func=func)
