"""Ctrl-C and divergence: an interrupted run leaves a checkpoint to resume from; a run whose loss or
gradient stops being finite stops (or skips the step) instead of writing a NaN model and exit 0."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest

from prefalign.cli import main
from prefalign.train.dpo import DPOConfig, train
from prefalign.train.loop import DivergenceError, checkpoint_folders, latest_checkpoint, read_metrics


def _strict_json(text: str):
    def refuse(token):
        raise ValueError(f"non-JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def _start_then_wait_for_steps(args: list[str], out, steps: int, **popen) -> subprocess.Popen:
    """`python -m prefalign ARGS` in the background, returned once ``out`` holds ``steps`` metric rows."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefalign", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )
    deadline = time.monotonic() + 240
    metrics = out / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= steps):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"no {steps} steps in 240 s"
        time.sleep(0.2)
    return proc


def test_sigint_saves_a_checkpoint_then_exits_130(tiny_model_dir, pairs, tmp_path):
    """Ctrl-C after a few steps: exit 130, a checkpoint of the last finished step (no periodic ones were
    asked for), and --resume continues from it."""
    out = tmp_path / "run"
    common = ["--model", str(tiny_model_dir), "--data", str(pairs), "--output", str(out)]
    common += ["--max-length", "64", "--batch-size", "4", "--no-progress"]
    proc = _start_then_wait_for_steps(
        ["dpo", *common, "--max-steps", "100000", "--save-every", "0"], out, steps=3
    )
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    done = [m["step"] for m in read_metrics(out)]
    step = done[-1]
    assert done == list(range(1, step + 1)) and step >= 3
    assert latest_checkpoint(out).name == f"step-{step}"
    assert main(["dpo", *common, "--max-steps", str(step + 1), "--save-every", "0", "--resume"]) == 0
    assert [m["step"] for m in read_metrics(out)] == list(range(1, step + 2))


def test_sigkill_then_resume_gives_bitwise_the_weights_of_an_uninterrupted_run(
    tiny_model_dir, pairs, tmp_path
):
    """Killed outright (no chance to save) after a few steps with --save-every 1, then resumed to step n:
    the weights equal, to the bit, those of a run that went to n in one go (and no metric row repeats)."""
    from safetensors.torch import load_file

    killed = tmp_path / "killed"
    common = ["--model", str(tiny_model_dir), "--data", str(pairs), "--max-length", "64", "--batch-size", "4"]
    common += ["--no-progress", "--save-every", "1", "--lr", "1e-3", "--lr-schedule", "constant"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefalign", "dpo", *common, "--output", str(killed), "--max-steps", "100000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240

    def newest_step():
        found = checkpoint_folders(killed)
        return int(found[-1].name.split("-")[1]) if found else 0

    while newest_step() < 3:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    n = int(latest_checkpoint(killed).name.split("-")[1]) + 2
    assert main(["dpo", *common, "--output", str(killed), "--max-steps", str(n), "--resume"]) == 0
    assert main(["dpo", *common, "--output", str(tmp_path / "straight"), "--max-steps", str(n)]) == 0
    a, b = (
        load_file(str(killed / "model.safetensors")),
        load_file(str(tmp_path / "straight" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert [m["step"] for m in read_metrics(killed)] == list(range(1, n + 1))


def test_ctrl_c_on_a_relaunched_multi_process_run_saves_then_exits_130(tiny_model_dir, pairs, tmp_path):
    """`--num-processes 2`: Ctrl-C in a terminal reaches the command and its torchrun (one process group,
    sent here with killpg); torchrun passes it on to the workers, which finish the step, save a
    checkpoint together and stop; the command exits 130."""
    import os

    out = tmp_path / "run"
    common = ["--model", str(tiny_model_dir), "--data", str(pairs), "--output", str(out)]
    common += ["--max-length", "64", "--batch-size", "2", "--no-progress", "--save-every", "0"]
    proc = _start_then_wait_for_steps(
        ["dpo", "--num-processes", "2", *common, "--max-steps", "100000"],
        out,
        steps=2,
        start_new_session=True,  # its own process group, like a shell's foreground job
    )
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    done = [m["step"] for m in read_metrics(out)]
    assert done == list(range(1, done[-1] + 1)) and done[-1] >= 2
    assert latest_checkpoint(out).name == f"step-{done[-1]}"


def config(model_dir, pairs, out, **kw):
    base = dict(model=str(model_dir), data=str(pairs), output=str(out), max_length=64, batch_size=4)
    return DPOConfig(**{**base, "progress": False, **kw})


def test_a_non_finite_step_stops_the_run_naming_it_and_keeps_the_last_good_state(
    tiny_model_dir, pairs, tmp_path
):
    """lr 1e30: the first update sends the weights to ~1e30, so step 2's loss is not finite. The message
    names the step's four pairs by file and line."""
    with pytest.raises(DivergenceError, match="step 2: the loss .* not finite") as err:
        train(config(tiny_model_dir, pairs, tmp_path, lr=1e30, max_steps=4))
    named = re.findall(r"pairs\.jsonl:(\d+)", str(err.value))
    assert len(set(named)) == 4 and all(1 <= int(n) <= 16 for n in named), str(err.value)
    assert [p.name for p in checkpoint_folders(tmp_path)] == ["step-1"]
    assert not (tmp_path / "model.safetensors").exists()  # no NaN model written as the result
    assert [m["step"] for m in read_metrics(tmp_path)] == [1]
    args = ["dpo", "--model", str(tiny_model_dir), "--data", str(pairs), "--output", str(tmp_path / "cli")]
    assert main([*args, "--lr", "1e30", "--max-steps", "3", "--max-length", "64", "--no-progress"]) == 2


def test_skip_nonfinite_skips_and_counts_and_files_stay_valid_json(tiny_model_dir, pairs, tmp_path):
    summary = train(config(tiny_model_dir, pairs, tmp_path, lr=1e30, max_steps=4, skip_nonfinite=True))
    assert summary["steps"] == 4
    rows = [_strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("nonfinite_skipped", 0) for r in rows] == [0, 1, 2, 3]
    assert _strict_json((tmp_path / "summary.json").read_text())["final"]["nonfinite_skipped"] == 3
