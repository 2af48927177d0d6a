"""An online run on two processes prepares its run folder as the offline loop does: every process checks
it before anything loads, then the main process alone clears it (--overwrite) after a barrier."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from prefalign.train.loop import read_metrics


def prefalign(workdir, *args):
    env = {**os.environ, "PYTHONPATH": str(workdir), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "prefalign", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=workdir, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_overwrite_on_two_processes_leaves_one_consistent_run(workdir, tiny_model_dir):
    """A 3-iteration run with a checkpoint each iteration (steps 2 and 3 kept), then a 1-iteration run
    over it with --overwrite on 2 processes: the folder holds the new run only (its config, its metrics,
    its one checkpoint, its summary), nothing of the old one."""
    out = workdir / "overwritten"
    common = ["grpo", "--model", str(tiny_model_dir), "--prompts", str(workdir / "prompts.jsonl")]
    common += ["--output", str(out), "--reward", "synthetic_rewards:share_of_e", "--raw"]
    common += ["--rollout-batch", "4", "--num-generations", "2", "--response-length", "4", "--no-progress"]
    prefalign(workdir, *common, "--iterations", "3", "--save-every", "1")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-3"]
    prefalign(workdir, *common, "--iterations", "1", "--overwrite", "--num-processes", "2")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]
    assert [r["step"] for r in read_metrics(out) if "objective/scores" in r] == [1]
    assert max(r["step"] for r in read_metrics(out)) == 1
    assert json.loads((out / "summary.json").read_text())["steps"] == 1
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["iterations"] == 1 and saved["overwrite"] is True
    assert (out / "model.safetensors").is_file()
    # both processes' samples of iteration 1, written once by the main one (the old run's are gone)
    logged = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in logged] == [1] * 8
    (scores,) = [r["objective/scores"] for r in read_metrics(out) if "objective/scores" in r]
    assert abs(sum(r["reward"] for r in logged) / 8 - scores) < 1e-6
