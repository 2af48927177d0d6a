"""`prefalign rl ...` commands end to end (small settings)."""

from __future__ import annotations

import json

from prefalign.cli import main


def test_gridworld_prints_example_4_1_tables(capsys):
    """Sweep 1 shows -1.0 everywhere but the corners; v_pi's first row is 0 -14 -20 -22; the optimal
    policy moves left from the cell next to the top-left corner."""
    assert main(["rl", "gridworld", "--sweeps", "1"]) == 0
    out = capsys.readouterr().out
    assert "sweep k = 1:\n 0.0 -1.0 -1.0 -1.0" in out
    assert "  0.0 -14.0 -20.0 -22.0" in out
    assert "pi*:\n*    ←" in out


def test_gridworld_5x5_prints_v_star(capsys):
    assert main(["rl", "gridworld", "--grid", "5x5"]) == 0
    assert "22.0 24.4 22.0 19.4 17.5" in capsys.readouterr().out


def test_gridworld_rejects_unknown_grid(capsys):
    assert main(["rl", "gridworld", "--grid", "3x3"]) == 2
    assert "grid must be 4x4 or 5x5" in capsys.readouterr().err


def test_random_walk_writes_plot_and_curves(tmp_path, capsys):
    out = tmp_path / "rw"
    args = [
        "rl",
        "random-walk",
        "--runs",
        "3",
        "--episodes",
        "10",
        "--td-alphas",
        "0.1",
        "--mc-alphas",
        "0.02",
    ]
    assert main([*args, "--output", str(out)]) == 0
    curves = json.loads((out / "rms.json").read_text())
    assert set(curves) == {"TD alpha=0.1", "MC alpha=0.02"}
    assert all(len(c) == 11 for c in curves.values())
    assert (out / "rms.png").stat().st_size > 1000
    assert "RMS error after 10 episodes" in capsys.readouterr().out


def test_ppo_help_comes_from_the_config_docstrings(capsys):
    try:
        main(["rl", "ppo", "--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
    out = capsys.readouterr().out
    assert "Stop once an evaluation's mean return reaches this" in out
    assert "(default: CartPole-v1)" in out


def test_ppo_command_writes_summary(tmp_path, capsys):
    args = ["rl", "ppo", "--total-steps", "256", "--num-envs", "2", "--epochs", "1", "--eval-episodes", "2"]
    assert main([*args, "--no-progress", "--output", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["env_steps"] == 256 and summary["eval_episodes"] == 2
    assert (
        summary["config"]["num_envs"] == 2 and summary["config"]["epochs"] == 1
    )  # the flags reached the run
    line = (
        f"CartPole-v1 seed 0: eval return {summary['eval_return_mean']:.1f} over 2 deterministic episodes "
        "after 256 env steps"
    )
    assert line in capsys.readouterr().out  # what it prints is what it wrote


def test_unknown_env_and_file_outputs_are_one_line_errors(tmp_path, capsys):
    """An env id gymnasium does not know, and an --output that is a file or lies under one, exit 2 with
    one line naming the value, before any environment is built or anything is written."""
    afile = tmp_path / "afile"
    afile.write_text("keep me\n")
    cases = [
        (["rl", "ppo", "--env", "Nope-v1"], "env 'Nope-v1' is not a registered gymnasium environment"),
        (["rl", "ppo", "--output", str(afile)], f"output {afile} is a file"),
        (["rl", "random-walk", "--output", str(afile / "sub")], f"lies under the file {afile}"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert afile.read_text() == "keep me\n"
