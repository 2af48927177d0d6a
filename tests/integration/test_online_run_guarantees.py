"""The online methods (ppo, grpo, rloo) keep the offline guarantees: Ctrl-C saves then exits 130 and the
run resumes; a non-finite iteration stops the run naming it (or is skipped and counted) and no NaN
model is saved; every input is checked before an old run is cleared; sizes are bounded by the model's
context before loading; a finished run resumed with the same budget is left as it is."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefalign.cli import main
from prefalign.train.loop import checkpoint_folders, latest_checkpoint, read_metrics

ONLINE = {
    "ppo": ["--reward", "synthetic_rewards:share_of_e", "--shared-value-head", "--rollout-batch", "4"],
    "grpo": ["--reward", "synthetic_rewards:share_of_e", "--rollout-batch", "2", "--num-generations", "2"],
    "rloo": ["--reward", "synthetic_rewards:share_of_e", "--rollout-batch", "2", "--num-generations", "2"],
}


def args(command: str, workdir: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [
        command, "--model", str(model), "--prompts", str(workdir / "prompts.jsonl"), "--output", str(out),
        *ONLINE[command], "--raw", "--response-length", "6", "--no-progress", *extra,
    ]  # fmt: skip


def files_of(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and the SHA-256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("command", ["ppo", "grpo"])
def test_ctrl_c_saves_then_exits_130_and_the_run_resumes(workdir, tiny_model_dir, tmp_path, command):
    """SIGINT after a few iterations: exit 130 without a traceback, a checkpoint of the last finished
    iteration (no periodic ones were asked for), and --resume continues from it to one more."""
    out = tmp_path / "run"
    common = args(command, workdir, tiny_model_dir, out, "--save-every", "0")
    env = {**os.environ, "PYTHONPATH": str(workdir), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefalign", *common, "--iterations", "100000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    done = [m["step"] for m in read_metrics(out)]
    step = done[-1]
    assert done == list(range(1, step + 1)) and step >= 2
    assert latest_checkpoint(out).name == f"step-{step}"
    resumed = subprocess.run(
        [sys.executable, "-m", "prefalign", *common, "--iterations", str(step + 1), "--resume"],
        capture_output=True, text=True, env=env, timeout=240,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [m["step"] for m in read_metrics(out)] == list(range(1, step + 2))
    assert (out / "model.safetensors").is_file()


def moving(argv: list[str]) -> list[str]:
    """A group method's arguments with the reward that differs within every group: the first update then
    always moves the weights (at lr 1e30, to where the next forward overflows), whatever was sampled. With
    share_of_e a group could tie (advantages 0, no update) and the first NaN came an iteration later."""
    argv = list(argv)
    argv[argv.index("--reward") + 1] = "synthetic_rewards:position"
    return argv


def all_finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(path)).values())


def test_a_non_finite_iteration_stops_grpo_naming_it_and_saves_no_nan_model(
    on_path, tiny_model_dir, tmp_path, capsys
):
    """lr 1e30: the first update sends the weights to ~1e30, so iteration 2's gradient norm is NaN. The
    run used to go on to the end and save a model of NaNs with exit 0; now it stops with exit 2 naming
    iteration 2, keeps iteration 1's checkpoint (finite) and writes no final model."""
    out = tmp_path / "run"
    code = main(moving(args("grpo", on_path, tiny_model_dir, out, "--iterations", "3", "--lr", "1e30")))
    err = capsys.readouterr().err
    assert code == 2 and "iteration 2: not finite" in err and "checkpoints/step-1" in err, err
    assert "Traceback" not in err
    assert [p.name for p in checkpoint_folders(out)] == ["step-1"]
    assert all_finite(out / "checkpoints" / "step-1" / "model.safetensors")
    assert not (out / "model.safetensors").exists() and not (out / "summary.json").exists()


def test_a_non_finite_update_inside_an_iteration_saves_nothing_half_updated(
    on_path, tiny_model_dir, tmp_path, capsys
):
    """ppo's four passes per iteration: lr 1e30 makes a later minibatch of iteration 1 NaN after the
    first was applied. That state is neither iteration 0's nor 1's, so nothing is saved as "good"."""
    out = tmp_path / "run"
    code = main(args("ppo", on_path, tiny_model_dir, out, "--iterations", "3", "--lr", "1e30"))
    err = capsys.readouterr().err
    assert code == 2 and "iteration 1: not finite" in err and "No good state was saved" in err, err
    assert checkpoint_folders(out) == [] and not (out / "model.safetensors").exists()


@pytest.mark.parametrize("command", ["grpo", "rloo"])
def test_skip_nonfinite_skips_the_update_and_counts_it(on_path, tiny_model_dir, tmp_path, command):
    """--skip-nonfinite: the NaN updates are skipped and counted (metrics, exit 0), the saved model is
    finite and the metrics file stays strict JSON."""
    out = tmp_path / "run"
    extra = ("--iterations", "3", "--lr", "1e30", "--skip-nonfinite")
    assert main(moving(args(command, on_path, tiny_model_dir, out, *extra))) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("nonfinite_skipped", 0) for r in rows] == [0, 1, 2]
    assert all_finite(out / "model.safetensors")


def old_run(folder: Path) -> dict[str, str]:
    """A run folder as a finished run leaves it (its files' hashes returned)."""
    (folder / "checkpoints" / "step-1").mkdir(parents=True)
    (folder / "checkpoints" / "step-1" / "model.safetensors").write_bytes(b"weights")
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model.safetensors"):
        (folder / name).write_text(f"the old run's {name}\n")
    return files_of(folder)


@pytest.mark.parametrize("command", ["ppo", "grpo", "rloo"])
@pytest.mark.parametrize(
    "bad",
    [
        ("--prompts", "missing.jsonl"),
        ("--eval-prompts", "missing.jsonl"),
        ("--ref-model", "no-such-model"),
        ("--reward", "no_such_module:fn"),
    ],
)
def test_overwrite_checks_every_input_before_it_clears_the_old_run(
    on_path, tiny_model_dir, tmp_path, capsys, command, bad
):
    """`--overwrite` with an input that does not exist: exit 2 naming it, and the old run is untouched
    (the folder is cleared only once everything was read and loaded)."""
    out = tmp_path / "run"
    out.mkdir()
    before = old_run(out)
    flag, value = bad
    value = str(tmp_path / value) if value.endswith(".jsonl") else value
    argv = args(command, on_path, tiny_model_dir, out, "--overwrite", "--iterations", "1")
    if flag == "--reward":  # (replaces the working one)
        argv[argv.index("--reward") + 1] = value
    else:
        argv += [flag, value]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and value.split(":")[0] in err, err
    assert files_of(out) == before


@pytest.mark.parametrize("command", ["ppo", "grpo", "rloo", "dpo"])
def test_an_eval_split_that_leaves_nothing_to_train_on_names_both_counts(
    on_path, tiny_model_dir, tmp_path, capsys, pairs, command
):
    """3 rows and --eval-split 0.9: all 3 held out. The online commands ended in ZeroDivisionError, dpo in
    a message without the counts; now exit 2 naming both, and no run folder is left behind."""
    out = tmp_path / "run"
    if command == "dpo":
        data = tmp_path / "three.jsonl"
        data.write_text("".join(pairs.read_text().splitlines(keepends=True)[:3]))
        argv = ["dpo", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out)]
    else:
        prompts = tmp_path / "three.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("a", "b", "c")))
        argv = args(command, on_path, tiny_model_dir, out, "--prompts", str(prompts))
    code = main([*argv, "--eval-split", "0.9", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "holds out 3 of the 3 training rows, leaving 0" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("command", ["ppo", "grpo", "rloo"])
def test_a_response_length_past_the_context_is_refused_before_loading(
    on_path, tiny_model_dir, tmp_path, capsys, monkeypatch, command
):
    """--response-length 10**12 tried to allocate terabytes for the sampler's cache; now one line naming
    the model's context (512 for the tiny model), from its config alone (no weights loaded), exit 2 and
    no run folder left behind. 511 (a one-token prompt's room) passes this check."""

    def no_weights(*a, **k):
        raise AssertionError("weights loaded before the size check")

    monkeypatch.setattr("prefalign.models.load_policy", no_weights)
    out = tmp_path / "run"
    code = main(args(command, on_path, tiny_model_dir, out, "--response-length", "1000000000000"))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "response_length: 1000000000000 new tokens pass the context" in err and "512 tokens" in err
    assert "at most 511 fit" in err and not out.exists()
    from prefalign.train import online

    cfg = online.OnlineConfig(
        model=str(tiny_model_dir), prompts="p", reward="sentiment", output=str(out), response_length=511
    )
    online.check_response_length(cfg)


@pytest.mark.parametrize("command", ["dpo", "reward"])
def test_pairs_cut_to_identical_tokens_are_dropped_and_none_left_is_refused(
    tiny_model_dir, pairs, tmp_path, capsys, caplog, command
):
    """--max-length 9 with an 8-token prompt leaves one completion token, the same in chosen and
    rejected for every pair: that trained on nothing with exit 0; now exit 2 saying so (as sft does for
    examples without a completion token), no run folder. With 4 completion tokens 12 of the 16 pairs are
    identical: they are dropped with a warning that counts them, and the run trains on the other 4."""
    base = [command, "--model", str(tiny_model_dir), "--data", str(pairs), "--max-prompt-length", "8"]
    base += ["--max-steps", "1", "--no-progress"]
    out = tmp_path / "none"
    assert main([*base, "--output", str(out), "--max-length", "9"]) == 2
    err = capsys.readouterr().err
    assert "chosen and rejected are identical in all 16 training pairs" in err and not out.exists(), err
    out = tmp_path / "some"
    with caplog.at_level("WARNING"):
        assert main([*base, "--output", str(out), "--max-length", "12"]) == 0
    assert "dropped 12 of 16 pairs whose chosen and rejected are identical" in caplog.text
    assert json.loads((out / "summary.json").read_text())["train_examples"] == 4


def test_the_final_model_is_never_written_in_place_over_a_checkpoints_weights(tiny_model_dir, tmp_path):
    """The final model.safetensors is a hard link to the last checkpoint's: saving a final model over it
    by the path that writes (LoRA, gathered shards) used to truncate and rewrite that one file, changing
    the checkpoint's weights under its other name. Now the old name is unlinked first."""
    import os

    from prefalign.testing import tiny_causal_lm, tiny_tokenizer
    from prefalign.train.checkpoint import save_final_model

    ckpt, out = tmp_path / "checkpoints" / "step-1", tmp_path
    ckpt.mkdir(parents=True)
    tok = tiny_tokenizer()
    tiny_causal_lm(tokenizer=tok, hidden_size=64, seed=0).save_pretrained(ckpt)
    os.link(ckpt / "model.safetensors", out / "model.safetensors")
    before = files_of(ckpt)
    save_final_model(tiny_causal_lm(tokenizer=tok, hidden_size=64, seed=1), tok, out)
    assert files_of(ckpt) == before
    assert (out / "model.safetensors").stat().st_ino != (ckpt / "model.safetensors").stat().st_ino
    assert files_of(out)["model.safetensors"] != before["model.safetensors"]


def test_a_resumed_run_leaves_the_old_final_models_weights_as_they_were(tiny_model_dir, pairs, tmp_path):
    """A finished run (final model linked to checkpoint step-2), resumed to step 4: checkpoint step-2
    (the old final model under its other name) keeps its bytes; the new final model is step-4's."""
    out = tmp_path / "run"
    base = ["dpo", "--model", str(tiny_model_dir), "--data", str(pairs), "--output", str(out)]
    base += ["--max-length", "64", "--batch-size", "4", "--save-every", "1", "--keep-checkpoints", "10"]
    base += ["--no-progress", "--lr", "1e-3"]
    assert main([*base, "--max-steps", "2"]) == 0
    step2 = out / "checkpoints" / "step-2" / "model.safetensors"
    assert (out / "model.safetensors").stat().st_ino == step2.stat().st_ino
    before = hashlib.sha256(step2.read_bytes()).hexdigest()
    assert main([*base, "--max-steps", "4", "--resume"]) == 0
    assert hashlib.sha256(step2.read_bytes()).hexdigest() == before
    step4 = out / "checkpoints" / "step-4" / "model.safetensors"
    assert (out / "model.safetensors").stat().st_ino == step4.stat().st_ino
    assert hashlib.sha256(step4.read_bytes()).hexdigest() != before


@pytest.mark.parametrize("command", ["dpo", "grpo"])
def test_resuming_a_finished_run_with_the_same_budget_changes_nothing(
    on_path, tiny_model_dir, pairs, tmp_path, capsys, command
):
    """A finished run resumed with its own budget rewrote summary.json with "final": {} (and config.yaml,
    metrics.jsonl); now it says the run is finished, exits 0 and every file keeps its bytes."""
    out = tmp_path / "run"
    if command == "dpo":
        argv = ["dpo", "--model", str(tiny_model_dir), "--data", str(pairs), "--output", str(out)]
        argv += ["--max-length", "64", "--batch-size", "4", "--no-progress", "--max-steps", "2"]
    else:
        argv = args("grpo", on_path, tiny_model_dir, out, "--iterations", "2")
    assert main(argv) == 0
    before = files_of(out)
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    assert "already finished: 2 steps of this budget" in capsys.readouterr().out
    assert files_of(out) == before
    assert json.loads((out / "summary.json").read_text())["final"] != {}


def test_resume_accepts_the_same_paths_spelled_differently_and_names_changed_data(
    tiny_model_dir, pairs, tmp_path, capsys, monkeypatch
):
    """--resume compared the saved options as text: `run` vs `./run` vs its absolute path, or the data
    file spelled another way, were "other settings". Now resolved paths are compared; and the content of
    a data file is recorded at the start (inputs.json), so an edited file is named as a changed setting."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pairs.jsonl").write_bytes(pairs.read_bytes())
    common = ["--model", str(tiny_model_dir), "--max-length", "64", "--batch-size", "4", "--no-progress"]
    assert main(["dpo", *common, "--data", "pairs.jsonl", "--output", "run", "--max-steps", "1"]) == 0
    recorded = json.loads((tmp_path / "run" / "inputs.json").read_text())
    assert recorded["data"]["path"] == str(tmp_path / "pairs.jsonl")
    spelled = [("./pairs.jsonl", "./run"), (str(tmp_path / "pairs.jsonl"), str(tmp_path / "run"))]
    for step, (data, output) in enumerate(spelled, start=2):
        argv = ["dpo", *common, "--data", data, "--output", output, "--max-steps", str(step), "--resume"]
        assert main(argv) == 0, capsys.readouterr().err
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]
    with (tmp_path / "pairs.jsonl").open("a") as f:
        f.write(pairs.read_text().splitlines()[0] + "\n")
    capsys.readouterr()
    argv = ["dpo", *common, "--data", "pairs.jsonl", "--output", "run", "--max-steps", "4", "--resume"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"data (the content of {tmp_path / 'pairs.jsonl'} changed since the run started)" in err, err


@pytest.mark.parametrize(
    ("command", "bad"),
    [
        ("sft", ("--data", "missing.jsonl")),
        ("reward", ("--eval-data", "missing.jsonl")),
        ("dpo", ("--eval-data", "missing.jsonl")),
        ("dpo", ("--ref-model", "no-such-model")),
    ],
)
def test_offline_overwrite_also_checks_every_input_before_it_clears(
    tiny_model_dir, pairs, tmp_path, capsys, command, bad
):
    out = tmp_path / "run"
    out.mkdir()
    before = old_run(out)
    flag, value = bad
    value = str(tmp_path / value) if value.endswith(".jsonl") else value
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "Say hi", "completion": "hi"}) + "\n")
    argv = [command, "--model", str(tiny_model_dir), "--data", str(data if command == "sft" else pairs)]
    code = main(
        [*argv, "--output", str(out), "--overwrite", "--max-steps", "1", "--no-progress", flag, value]
    )
    err = capsys.readouterr().err
    assert code == 2 and value in err, err
    assert files_of(out) == before
