"""A step means the same on two processes as on one, also when its examples do not split evenly: every
example weighs the same, and a process with no example still joins every collective call (it used to
hang the run, or weigh its examples 1/2 against the other process's 1/4)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from prefalign.cli import main
from prefalign.testing import synthetic_pairs, write_jsonl
from prefalign.train.loop import read_metrics


@pytest.mark.parametrize(
    ("n_pairs", "batch", "steps"),
    [
        (17, 4, 3),  # 8 + 8 + 1 pairs: the last step gives process 1 nothing
        (3, 3, 2),  # 3 pairs per step (the epoch's partial batch): 2 on process 0, 1 on process 1
    ],
)
def test_two_processes_with_uneven_shares_train_exactly_like_one(
    tiny_model_dir, tmp_path, n_pairs, batch, steps
):
    """(lr 1e-4 for the reason given in test_dpo_train's accumulation test.)"""
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(n_pairs, seed=4))
    common = ["--model", str(tiny_model_dir), "--data", str(data), "--max-steps", str(steps)]
    common += ["--lr", "1e-4", "--max-length", "64", "--no-progress", "--micro-batch-tokens", "64"]
    two = subprocess.run(  # `--num-processes 2` relaunches the command under torchrun
        [sys.executable, "-m", "prefalign", "dpo", "--num-processes", "2"]
        + [*common, "--output", str(tmp_path / "two"), "--batch-size", str(batch)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    assert main(["dpo", *common, "--output", str(tmp_path / "one"), "--batch-size", str(2 * batch)]) == 0
    keys = ("loss", "grad_norm", "lr", "rewards/margins", "logps/chosen")
    one_m = [[m[k] for k in keys] for m in read_metrics(tmp_path / "one")]
    two_m = [[m[k] for k in keys] for m in read_metrics(tmp_path / "two")]
    assert len(two_m) == steps
    # Float32 sums split over two processes round differently from one: compare to a tolerance that scales
    # with the value (``logps/chosen`` is about -117, where one float32 step is 7.6e-6).
    assert two_m == [pytest.approx(row, rel=1e-6, abs=1e-5) for row in one_m]
    one_w, two_w = (
        load_file(str(tmp_path / "one" / "model.safetensors")),
        load_file(str(tmp_path / "two" / "model.safetensors")),
    )
    for k, v in one_w.items():
        torch.testing.assert_close(two_w[k], v, rtol=1e-5, atol=1e-5)
