"""`--num-processes` / `--launch-config`: how a command relaunches itself, and the Accelerate configs in
configs/accelerate/ checked against Accelerate's own launcher (the GPU runs themselves need GPUs)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

from prefalign.cli import build_parser, main
from prefalign.launch import (
    ERRORS_ENV,
    TRAINING_COMMANDS,
    launch_command,
    report_worker_error,
    strip_launch_options,
    worker_environment,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
EXPECTED = {  # file: (distributed type, what it shards)
    "ddp.yaml": ("MULTI_GPU", None),
    "fsdp.yaml": ("FSDP", 2),  # FSDP version
    "deepspeed_zero2.yaml": ("DEEPSPEED", 2),  # ZeRO stage
    "deepspeed_zero3.yaml": ("DEEPSPEED", 3),
}


def test_the_launch_options_are_removed_in_both_spellings():
    argv = ["dpo", "--num-processes", "2", "--data", "d", "--launch-config=x.yaml", "--lr", "1e-5"]
    assert strip_launch_options(argv) == ["dpo", "--data", "d", "--lr", "1e-5"]
    assert strip_launch_options(["dpo", "--num-processes=4", "--num-processes-x"]) == [
        "dpo",
        "--num-processes-x",
    ]


def test_launcher_command_line_and_worker_environment(tmp_path):
    """--launch-config runs `accelerate launch`; --num-processes alone starts the workers here, each with
    torchrun's variables and the launcher's store (every worker a client of it)."""
    acc = launch_command(["sft"], 8, "configs/accelerate/fsdp.yaml")
    assert acc[0] == sys.executable
    assert acc[1:] == [
        "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/fsdp.yaml",
        "--num_processes", "8", "-m", "prefalign", "sft",
    ]  # fmt: skip
    assert "--num_processes" not in launch_command(["sft"], None, "c.yaml")
    env = worker_environment(1, 3, 29555, tmp_path)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["MASTER_PORT"]) == ("1", "1", "3", "29555")
    assert env["TORCHELASTIC_USE_AGENT_STORE"] == "True" and env[ERRORS_ENV] == str(tmp_path)


def test_a_worker_leaves_its_report_to_the_launcher(tmp_path, monkeypatch):
    monkeypatch.delenv(ERRORS_ENV, raising=False)
    assert report_worker_error("not under a launcher") is False
    monkeypatch.setenv(ERRORS_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    assert report_worker_error("pairs.jsonl:3: bad") is True
    assert (tmp_path / "rank-1.txt").read_text() == "pairs.jsonl:3: bad"


@pytest.mark.parametrize("command", TRAINING_COMMANDS)
def test_every_training_command_offers_the_options(command, capsys):
    with pytest.raises(SystemExit):
        build_parser(command).parse_args([command, "--help"])
    out = capsys.readouterr().out
    assert "--num-processes N" in out and "--launch-config YAML" in out


def test_bad_launch_options_and_bad_command_options_are_refused_before_any_launch(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr("prefalign.launch.subprocess.Popen", _no_launch)
    base = ["dpo", "--model", "m", "--data", "d", "--output", str(tmp_path / "o")]
    assert main([*base, "--num-processes", "0"]) == 2
    assert "num_processes must be >= 1" in capsys.readouterr().err
    assert main([*base, "--launch-config", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml: no such file" in capsys.readouterr().err
    assert main([*base, "--num-processes", "2", "--beta", "0"]) == 2  # the command's own check, once
    assert "beta must be > 0" in capsys.readouterr().err


def _no_launch(*args, **kwargs):
    raise AssertionError("launched although the options were bad")


def test_a_launcher_worker_never_launches_again(tmp_path, monkeypatch, capsys):
    """Under torchrun LOCAL_RANK is set: --num-processes is then ignored and the command runs here (and
    fails here, on its output folder being a file, a check the relaunching process does not make)."""
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr("prefalign.launch.subprocess.Popen", _no_launch)
    taken = tmp_path / "taken"
    taken.write_text("")
    code = main(["dpo", "--model", "m", "--data", "d", "--output", str(taken), "--num-processes", "2"])
    assert code == 2 and "taken" in capsys.readouterr().err


def test_the_repository_ships_exactly_the_documented_configs():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_configs_are_what_accelerate_launch_accepts(name, monkeypatch):
    """Each file loads as Accelerate's ClusterConfig (which refuses unknown keys), every nested key is an
    option of `accelerate launch`, and the launcher turns it into the environment from which the
    Accelerator builds its FSDP / DeepSpeed plugin with the intended settings."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    path = CONFIGS / name
    kind, level = EXPECTED[name]
    cluster = ClusterConfig.from_yaml_file(str(path))
    assert cluster.distributed_type.value == kind
    assert cluster.num_machines == 1 and cluster.mixed_precision == "no"
    raw = yaml.safe_load(path.read_text())
    parser = launch_command_parser()
    options = {a.dest for a in parser._actions}
    nested = {**(raw.get("fsdp_config") or {}), **(raw.get("deepspeed_config") or {})}
    assert set(nested) <= options, sorted(set(nested) - options)

    args = parser.parse_args(["--config_file", str(path), "-m", "prefalign", "dpo"])
    _validate_launch_command(args)  # fills args from the file, as `accelerate launch` does
    for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
        monkeypatch.delenv(key)
    if kind == "DEEPSPEED":
        args.deepspeed_fields_from_accelerate_config = ",".join([*raw["deepspeed_config"], "mixed_precision"])
        _, env = prepare_deepspeed_cmd_env(args)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        plugin = DeepSpeedPlugin()
        assert plugin.zero_stage == level
        assert plugin.zero3_init_flag == (level == 3)
    else:
        env = prepare_multi_gpu_env(args)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert ("ACCELERATE_USE_FSDP" in env) == (kind == "FSDP")
        if kind == "FSDP":
            plugin = FullyShardedDataParallelPlugin()
            assert plugin.fsdp_version == level
            assert plugin.state_dict_type.name == "FULL_STATE_DICT"  # the final model is one full state dict
            assert plugin.auto_wrap_policy is not None


@pytest.mark.parametrize("how", ["flag", "config"])
def test_a_rollout_batch_that_does_not_split_is_refused_before_any_worker_starts(
    tmp_path, capsys, monkeypatch, how
):
    """grpo --rollout-batch 3 on 2 processes: each worker found it (printed twice, ChildFailedError);
    now the launching command refuses it once, whether the count is a flag or the launch config's."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr("prefalign.launch.subprocess.Popen", _no_launch)
    launch_config = tmp_path / "ddp.yaml"
    launch_config.write_text("distributed_type: MULTI_CPU\nnum_processes: 2\n")
    processes = ["--num-processes", "2"] if how == "flag" else ["--launch-config", str(launch_config)]
    base = [
        "grpo",
        "--model",
        "m",
        "--prompts",
        "p",
        "--reward",
        "sentiment",
        "--output",
        str(tmp_path / "o"),
    ]
    assert main([*base, "--rollout-batch", "3", *processes]) == 2
    err = capsys.readouterr().err
    assert "rollout_batch 3 must divide over 2 processes" in err and len(err.strip().splitlines()) == 1


def test_a_folder_holding_a_run_is_refused_before_any_worker_starts(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr("prefalign.launch.subprocess.Popen", _no_launch)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "metrics.jsonl").write_text("")
    base = ["dpo", "--model", "m", "--data", "d", "--output", str(tmp_path / "o"), "--num-processes", "2"]
    assert main(base) == 2
    assert "already holds a run" in capsys.readouterr().err
