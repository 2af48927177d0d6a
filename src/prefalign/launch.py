"""Run a training command on several processes: ``--num-processes N`` and ``--launch-config YAML``.

Every training command (sft, reward, dpo, ppo, grpo, rloo) accepts both options. Given either, prefalign
checks the command's options once, then runs the same command line again, without these two options,
under a launcher, and waits for it:

- ``--num-processes N`` alone: ``torchrun --standalone --nproc_per_node N -m prefalign ...`` (one
  machine, N processes; on GPUs one per device, plain DDP; on CPUs the gloo backend).
- ``--launch-config YAML``: ``accelerate launch --config_file YAML -m prefalign ...`` with an Accelerate
  config file such as those in ``configs/accelerate/`` (DDP, FSDP, DeepSpeed ZeRO-2/3);
  ``--num-processes`` then overrides the file's ``num_processes``.

The training loop needs nothing else: it reads its rank and world size from the launcher's environment.
A process that is already one of a launcher's workers (``LOCAL_RANK`` is set) never launches again.

Ctrl-C reaches the launcher, which passes one interrupt on to each worker (torchrun waits 30 s, then
kills): the workers save a checkpoint after the current step and the command exits 130, like a
single-process run.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from prefalign.config import ConfigError

TRAINING_COMMANDS = ("sft", "reward", "dpo", "ppo", "grpo", "rloo")
"""Commands that run the training loop and so can run on several processes."""

_OPTIONS = ("--num-processes", "--launch-config")


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("running on several processes (see README: running at scale)")
    group.add_argument(
        "--num-processes",
        type=int,
        default=None,
        metavar="N",
        help="Run on N processes: relaunches this command under torchrun (one per GPU, or N CPU "
        "processes); with --launch-config it overrides the file's num_processes.",
    )
    group.add_argument(
        "--launch-config",
        default=None,
        metavar="YAML",
        help="Relaunch under `accelerate launch` with this Accelerate config file (configs/accelerate/: "
        "ddp, fsdp, deepspeed_zero2, deepspeed_zero3).",
    )


def wants_launch(args: argparse.Namespace) -> bool:
    """True when the parsed options ask for a launch and this process is not already a worker."""
    n, launch_config = getattr(args, "num_processes", None), getattr(args, "launch_config", None)
    if n is not None and n < 1:
        raise ConfigError(f"num_processes must be >= 1, got {n}")
    if launch_config is not None and not Path(launch_config).is_file():
        raise ConfigError(f"launch_config: {launch_config}: no such file")
    if "LOCAL_RANK" in os.environ:
        return False
    return launch_config is not None or (n is not None and n > 1)


def strip_launch_options(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--num-processes``/``--launch-config`` and their values (both spellings)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _OPTIONS:
            skip = True
        elif not arg.startswith(tuple(o + "=" for o in _OPTIONS)):
            out.append(arg)
    return out


def launch_command(argv: Sequence[str], num_processes: int | None, launch_config: str | None) -> list[str]:
    """The launcher's command line that runs ``prefalign <argv>`` (``argv`` already stripped)."""
    if launch_config is not None:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_config)]
        if num_processes is not None:
            cmd += ["--num_processes", str(num_processes)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc_per_node", str(num_processes)]
    return [*cmd, "-m", "prefalign", *argv]


def relaunch(argv: Sequence[str], args: argparse.Namespace) -> int:
    """Run ``prefalign <argv>`` under the launcher ``args`` asks for; returns its exit code (130 after
    Ctrl-C)."""
    cmd = launch_command(strip_launch_options(argv), args.num_processes, args.launch_config)
    print(f"prefalign: launching {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    interrupted = False

    def note(signum: int, frame: object) -> None:  # the launcher gets the same Ctrl-C and passes it on
        nonlocal interrupted
        interrupted = True

    previous = signal.signal(signal.SIGINT, note)
    try:
        proc = subprocess.Popen(cmd)
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:  # pragma: no cover - only if a handler was replaced
                interrupted = True
    finally:
        signal.signal(signal.SIGINT, previous)
    return 130 if interrupted else code
