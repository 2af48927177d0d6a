"""The lecture chapters that train the bundled SmolLM2 run as scripts, in a fresh process (see
tests/integration/test_lecture.py for the fast ones)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

LECTURE = Path(__file__).resolve().parents[2] / "docs" / "lecture"


@pytest.mark.parametrize("chapter", ["06_rlhf_ppo.py", "08_dpo_smollm2.py"])
def test_smollm2_chapter_runs_as_a_script_and_draws_its_figures(chapter, tmp_path):
    """Chapter 8 asserts its own numbers: first DPO loss ln 2 with zero rewards, held-out implicit-reward
    accuracy above 0.8, and per-pair implicit rewards whose mean margin equals the trainer's."""
    env = {**os.environ, "PREFALIGN_LECTURE_FIGURES": str(tmp_path / "figures")}
    proc = subprocess.run(
        [sys.executable, str(LECTURE / chapter)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, f"{chapter}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    figures = sorted((tmp_path / "figures").glob("*.png"))
    assert figures and all(f.stat().st_size > 10_000 for f in figures)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures"]
