"""`--num-processes N`: the command starts its workers itself, passes SIGINT and SIGTERM on to each of
them once, reports a worker's mistake once with its exit status, and leaves no process behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prefalign.train.loop import latest_checkpoint, read_metrics


def processes_naming(text: str) -> list[int]:
    """Pids of the live processes whose command line contains ``text``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:  # the process ended meanwhile
            continue
    return found


def start_and_wait_for_steps(args: list[str], out: Path, steps: int) -> subprocess.Popen:
    """The command in a session of its own (as a shell's job), returned once ``out`` has ``steps`` rows."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefalign", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    metrics = out / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= steps):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"no {steps} steps in 240 s"
        time.sleep(0.2)
    return proc


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_the_command_alone_saves_and_stops_every_worker(
    tiny_model_dir, pairs, tmp_path, sig, status
):
    """The signal goes to the launching command only (not to its workers' process group, as a service
    manager's SIGTERM or `kill -INT PID` would): the workers still finish the step, save a checkpoint of
    it together and stop; the command exits 128 + signal, and no worker outlives it."""
    out = tmp_path / "run"
    args = ["dpo", "--num-processes", "2", "--model", str(tiny_model_dir), "--data", str(pairs)]
    args += ["--output", str(out), "--max-length", "64", "--batch-size", "2", "--no-progress"]
    proc = start_and_wait_for_steps([*args, "--save-every", "0", "--max-steps", "100000"], out, steps=2)
    assert len(processes_naming(str(out))) == 3  # the command and its two workers
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == status, stderr[-3000:]
    done = [m["step"] for m in read_metrics(out)]
    assert done == list(range(1, done[-1] + 1)) and done[-1] >= 2
    assert latest_checkpoint(out).name == f"step-{done[-1]}"
    assert processes_naming(str(out)) == []
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.splitlines()  # each message once, not once per worker
    assert sum("saving a checkpoint after this step" in line for line in lines) == 1, stderr[-3000:]
    assert lines.count("interrupted") == 1, stderr[-3000:]
    assert "OMP_NUM_THREADS/MKL_NUM_THREADS unset" not in stderr  # the launcher shares the cores out itself


def test_a_workers_mistake_is_reported_once_with_its_exit_status(tiny_model_dir, pairs, tmp_path):
    """A malformed line 3 in the data file: both workers find it; the command prints the one-line
    report once, without a traceback, and exits 2 as a single process would."""
    lines = pairs.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([*lines[:2], '{"prompt": "x", "chosen": ', *lines[3:]]) + "\n")
    out = tmp_path / "run"
    run = subprocess.run(
        [sys.executable, "-m", "prefalign", "dpo", "--num-processes", "2", "--model", str(tiny_model_dir)]
        + ["--data", str(bad), "--output", str(out), "--max-steps", "2", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.count("bad.jsonl:3") == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "ChildFailedError" not in run.stderr, run.stderr[-3000:]
    assert processes_naming(str(out)) == []
