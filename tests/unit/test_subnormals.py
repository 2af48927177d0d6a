"""Subnormal floats are flushed to zero in every torch thread once a command (or a training run) starts:
on x86 a matrix product over subnormal operands runs in microcode, 10-100x slower (DPO at beta 5 had
steps of 53 s instead of 5 from an underflowing loss gradient)."""

from __future__ import annotations

import contextlib
import subprocess
import sys

from prefalign import cli
from prefalign.train.precision import flushing_subnormals, subnormals_flushed

PROBE = """
import sys, torch
torch.set_num_threads(2)
if sys.argv[1] == "flush":
    from prefalign.train.precision import flush_subnormals
    flush_subnormals()
# subnormal float32 bit patterns (exponent 0, mantissa non-zero), built without arithmetic
tiny = torch.randint(1, 2**23, (256, 512), dtype=torch.int32).view(torch.float32)
out = tiny @ torch.ones(512, 384)  # rows split over the threads
print(int((out != 0).sum()), out.numel())
"""


def _nonzero(mode: str) -> tuple[int, int]:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    nonzero, total = map(int, done.stdout.split())
    return nonzero, total


def test_flushing_zeroes_subnormal_products_in_every_thread():
    """Without the mode a product of subnormals is a (slow) non-zero subnormal; with it every output of a
    two-thread product is zero, the rows computed by the intra-op worker included."""
    nonzero, total = _nonzero("keep")
    assert nonzero == total  # IEEE arithmetic, the default of every x86 process
    assert _nonzero("flush") == (0, total)


def test_the_scoped_form_gives_the_thread_its_ieee_subnormals_back():
    """The command line and training runs flush only for their duration: a caller's own float code (a
    property-based test generating subnormal floats, say) works again after them."""
    assert not flushing_subnormals()
    with subnormals_flushed():
        assert flushing_subnormals()
        assert sys.float_info.min * 0.5 == 0.0  # Python's own arithmetic flushes too, in this thread
    assert not flushing_subnormals()
    assert sys.float_info.min * 0.5 > 0.0


def test_model_commands_flush_while_they_run(monkeypatch, tmp_path):
    calls = []

    @contextlib.contextmanager
    def recording():
        calls.append("enter")
        yield
        calls.append("exit")

    monkeypatch.setattr("prefalign.train.precision.subnormals_flushed", recording)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "The film was", "completion": " wonderful."}\n')
    out = tmp_path / "scored.jsonl"
    assert cli.main(["score", "--data", str(rows), "--reward", "sentiment", "--output", str(out)]) == 0
    assert calls == ["enter", "exit"] and out.exists()
    assert {"sft", "reward", "dpo", "kto", "ppo", "grpo", "rloo", "generate", "demo"} <= cli.MODEL_COMMANDS
