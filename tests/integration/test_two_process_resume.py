"""Resume is exact on two processes too: each process gets back its own random generators (with LoRA
dropout the processes draw different masks, since their packed rows differ in length)."""

from __future__ import annotations

import subprocess
import sys

import torch
from safetensors.torch import load_file

from prefalign.testing import synthetic_pairs, write_jsonl
from prefalign.train.loop import read_metrics


def torchrun(*args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "prefalign", "dpo"]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_two_process_resume_with_dropout_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(16, seed=6))
    common = ["--model", str(tiny_model_dir), "--data", str(data), "--batch-size", "2", "--max-length", "64"]
    common += ["--lr", "1e-3", "--lr-schedule", "constant", "--lora-r", "4", "--lora-dropout", "0.3"]
    common += ["--no-progress"]
    torchrun(*common, "--output", str(tmp_path / "full"), "--max-steps", "4")
    torchrun(*common, "--output", str(tmp_path / "parts"), "--max-steps", "2")
    torchrun(*common, "--output", str(tmp_path / "parts"), "--max-steps", "4", "--resume")
    full = [m["loss"] for m in read_metrics(tmp_path / "full")]
    parts = [m["loss"] for m in read_metrics(tmp_path / "parts")]
    assert parts == full
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "parts" / "model.safetensors"))
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=1e-6, atol=1e-6)
