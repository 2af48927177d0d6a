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


def test_tensorboard_and_wandb_get_the_samples_as_a_table(tmp_path, monkeypatch):
    """With both sinks on (stand-ins recording their calls, as neither package is a dependency), a table
    call gives TensorBoard one markdown table in its text tab and W&B one ``wandb.Table`` at that step;
    messages become JSON text and a '|' in a completion cannot break the markdown row."""
    import sys
    import types

    from prefalign.train.run_folder import MetricsWriter

    calls: list[tuple] = []

    class SummaryWriter:
        def __init__(self, folder):
            calls.append(("tb", folder))

        def add_text(self, tag, text, step):
            calls.append(("text", tag, text, step))

        def close(self):
            pass

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    class WandbRun:
        def log(self, record, step):
            calls.append(("wandb", record, step))

        def finish(self):
            pass

    monkeypatch.setitem(
        sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter)
    )
    wandb = types.SimpleNamespace(init=lambda **kw: WandbRun(), Table=Table)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    writer = MetricsWriter(tmp_path, report_to=["tensorboard", "wandb"])
    rows = [
        {"iteration": 3, "prompt": "2+2?", "completion": "4 | four", "reward": 1.0, "advantage": 0.5},
        {"iteration": 3, "prompt": [{"role": "user", "content": "hi"}], "completion": "x", "reward": 0.0,
         "advantage": -0.5},
    ]  # fmt: skip
    writer.table(3, "completions", rows)
    writer.close()
    (text,) = [c for c in calls if c[0] == "text"]
    assert text[1] == "completions" and text[3] == 3
    lines = text[2].splitlines()
    assert lines[0] == "| iteration | prompt | completion | reward | advantage |"
    assert lines[2] == "| 3 | 2+2? | 4 \\| four | 1.0 | 0.5 |"
    assert len(lines) == 4
    (logged,) = [c for c in calls if c[0] == "wandb"]
    table = logged[1]["completions"]
    assert logged[2] == 3 and table.columns == list(rows[0])
    assert table.data[1][1] == '[{"role": "user", "content": "hi"}]' and table.data[0][4] == 0.5
