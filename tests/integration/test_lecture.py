"""The lecture chapters (docs/lecture) run as scripts, each in a fresh process, and draw their figures.

Each chapter asserts its own numbers (textbook values, closed forms); a failing assert fails its test here.
The chapters that load the bundled SmolLM2 run under `make test-slow` (tests/slow/test_lecture_slow.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

LECTURE = Path(__file__).resolve().parents[2] / "docs" / "lecture"
FAST = [
    "01_markov_reward_process.py",
    "02_mdp_dynamic_programming.py",
    "03_model_free_prediction.py",
    "04_value_function_approximation.py",
    "05_policy_gradient_to_ppo.py",
    "07_dpo_tabular.py",
    "09_demo.py",
]
SLOW = ["06_rlhf_ppo.py", "08_dpo_smollm2.py"]


def run_chapter(chapter: str, workdir: Path, timeout: float) -> list[Path]:
    """Run ``chapter`` with this interpreter in ``workdir``; returns the PNG figures it saved."""
    figures = workdir / "figures"
    env = {**os.environ, "PREFALIGN_LECTURE_FIGURES": str(figures)}
    proc = subprocess.run(
        [sys.executable, str(LECTURE / chapter)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"{chapter} exited with {proc.returncode}\n--- stdout (end) ---\n{proc.stdout[-3000:]}"
        f"\n--- stderr (end) ---\n{proc.stderr[-6000:]}"
    )
    return sorted(figures.glob("*.png"))


def test_every_chapter_is_run_by_a_test():
    """A new chapter must be added to FAST or SLOW, so it cannot silently go untested."""
    chapters = sorted(p.name for p in LECTURE.glob("[0-9][0-9]_*.py"))
    assert chapters == sorted(FAST + SLOW)


@pytest.mark.parametrize("chapter", FAST)
def test_chapter_runs_as_a_script_and_draws_its_figures(chapter, tmp_path):
    figures = run_chapter(chapter, tmp_path, timeout=180)
    assert figures, f"{chapter} saved no figure"
    assert all(f.stat().st_size > 10_000 for f in figures)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures"], (
        "the chapter wrote files besides figures"
    )
