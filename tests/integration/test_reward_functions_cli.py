"""A user's reward function that returns something unusable stops an online run with one line, exit 2."""

from __future__ import annotations

import json

import pytest

from prefalign.cli import main

BROKEN = """
def as_dict(prompts, completions):
    return {i: 0.5 for i in range(len(completions))}

def huge(prompts, completions):
    return [10**400] * len(completions)

def quits_quietly(prompts, completions):
    import sys
    sys.exit()

def text(prompts, completions):
    return "high"
"""


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("as_dict", "returned a dict, expected a list of 4 numbers"),
        ("huge", "too large for a float"),
        ("quits_quietly", "called sys.exit()"),
        ("text", "returned a str, expected a list of 4 numbers"),
    ],
)
def test_a_broken_reward_function_is_one_line_and_exit_2(
    tmp_path, monkeypatch, capsys, tiny_model_dir, function, message
):
    """Each was accepted or crashed before: a dict's keys taken as scores (exit 0), an OverflowError
    traceback, a silent exit 0 with nothing saved, "4 scores for 4 completions" from a 4-letter string (the
    letters counted as scores). Now: one error line naming the function, exit 2, no model saved."""
    (tmp_path / "brokenrewards.py").write_text(BROKEN)
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("The movie", "It was")))
    out = tmp_path / "run"
    argv = ["grpo", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--output", str(out), "--raw"]
    argv += ["--reward", f"brokenrewards:{function}", "--iterations", "1", "--rollout-batch", "2"]
    argv += ["--num-generations", "2", "--response-length", "4", "--no-progress"]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"prefalign grpo: error: reward brokenrewards:{function}: "), last
    assert message in last
    assert "Traceback" not in err
    assert not (out / "model.safetensors").exists()
