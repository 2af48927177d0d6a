"""completions.jsonl's cadence (the first iteration and every N-th) and its truncation on resume."""

from __future__ import annotations

import json

from prefalign.train.completions import due, show, truncate_completions


def test_the_first_iteration_and_every_nth_are_logged():
    assert [s for s in range(1, 31) if due(10, s)] == [1, 10, 20, 30]
    assert [s for s in range(1, 5) if due(1, s)] == [1, 2, 3, 4]
    assert not any(due(0, s) for s in range(1, 30))


def test_a_resumed_run_drops_the_lines_past_its_checkpoint(tmp_path):
    lines = [json.dumps({"iteration": i, "reward": 0.5}) for i in (1, 1, 2, 3, 3)]
    (tmp_path / "completions.jsonl").write_text("\n".join(lines) + '\n{"iteration": 4, "rew')
    truncate_completions(tmp_path, 2)
    kept = [
        json.loads(line)["iteration"] for line in (tmp_path / "completions.jsonl").read_text().splitlines()
    ]
    assert kept == [1, 1, 2]
    truncate_completions(tmp_path / "nothing-here", 2)  # no file: nothing to do


def test_a_shown_sample_is_one_line_cut_short():
    record = {"prompt": [{"role": "user", "content": "Rate it"}], "completion": "a\n" * 50, "reward": 0.25,
              "advantage": -1.0}  # fmt: skip
    line = show(record)
    assert "\n" not in line and line.startswith("reward 0.250, advantage -1.000: 'Rate it' -> 'a\\na\\n")
    assert len(line) < 160 and line.endswith("...'")
