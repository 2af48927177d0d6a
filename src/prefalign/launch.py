"""Run a training command on several processes: ``--num-processes N`` and ``--launch-config YAML``.

Every training command (sft, reward, dpo, ppo, grpo, rloo) accepts both options. Given either, prefalign
checks the command's options once, then runs the same command line again, without these two options,
on several processes, and waits for them:

- ``--num-processes N`` alone: prefalign starts the N worker processes itself (one machine; on GPUs one
  per device, plain DDP; on CPUs the gloo backend). It hosts their rendezvous store on a port the system
  picks (no port race) and hands each worker the environment ``torchrun`` would (``RANK``,
  ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``).
- ``--launch-config YAML``: ``accelerate launch --config_file YAML -m prefalign ...`` with an Accelerate
  config file such as those in ``configs/accelerate/`` (DDP, FSDP, DeepSpeed ZeRO-2/3);
  ``--num-processes`` then overrides the file's ``num_processes``.

The training loop needs nothing else: it reads its rank and world size from that environment. A process
that is already a worker (``LOCAL_RANK`` is set) never launches again.

With ``--num-processes``, the workers form a process group of their own, and the command passes Ctrl-C
(SIGINT) and SIGTERM on to every worker exactly once: the workers save a checkpoint after the current
step and stop, and the command exits 130 (143 after SIGTERM), like a single-process run; a second Ctrl-C
stops them at once. Nothing outlives the command. A worker's mistake report (a bad data file, say; exit 2)
is printed once, not once per worker, and its exit status is the command's. When one worker fails, the
others are given a few seconds to stop, then killed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefalign.config import ConfigError

TRAINING_COMMANDS = ("sft", "reward", "dpo", "kto", "ppo", "grpo", "rloo")
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


def launch_processes(args: argparse.Namespace) -> int | None:
    """How many processes the launch ``args`` ask for: ``--num-processes``, else the ``num_processes`` of
    the ``--launch-config`` file; None when neither says."""
    if getattr(args, "num_processes", None) is not None:
        return args.num_processes
    if getattr(args, "launch_config", None) is None:
        return None
    import yaml

    try:
        settings = yaml.safe_load(Path(args.launch_config).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"launch_config: {args.launch_config}: cannot be read ({err})") from None
    n = settings.get("num_processes") if isinstance(settings, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else None


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


def launch_command(argv: Sequence[str], num_processes: int | None, launch_config: str) -> list[str]:
    """The ``accelerate launch`` command line that runs ``prefalign <argv>`` (``argv`` already stripped)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_config)]
    if num_processes is not None:
        cmd += ["--num_processes", str(num_processes)]
    return [*cmd, "-m", "prefalign", *argv]


ERRORS_ENV = "PREFALIGN_WORKER_ERRORS"
"""Set by the launcher for its workers: a folder where a worker writes its error report instead of
printing it (``rank-<RANK>.txt``), so that the command prints each report once."""

FAILURE_GRACE_S = 10.0
"""How long the other workers get to stop by themselves after one has failed, before they are killed."""


def worker_environment(rank: int, world_size: int, port: int, errors: Path) -> dict[str, str]:
    """The environment of worker ``rank``: what ``torchrun`` would set, with the rendezvous store hosted
    by the launcher (``TORCHELASTIC_USE_AGENT_STORE``: every worker connects to it as a client). Unless the
    user set it, each worker gets an equal share of the machine's cores as its thread count, and only the
    first worker draws progress bars (the others would draw the same ones again)."""
    shared = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world_size))}
    quiet = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"} if rank else {}
    return {
        **shared,
        **os.environ,
        **quiet,
        "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0",
        "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "TORCHELASTIC_USE_AGENT_STORE": "True", ERRORS_ENV: str(errors),
    }  # fmt: skip


def report_worker_error(message: str) -> bool:
    """In a launcher's worker, leave ``message`` for the launcher to print once and return True;
    elsewhere return False (the caller prints it)."""
    folder = os.environ.get(ERRORS_ENV)
    if not folder or not Path(folder).is_dir():
        return False
    (Path(folder) / f"rank-{os.environ.get('RANK', '0')}.txt").write_text(message)
    return True


class _Forward:
    """While active, SIGINT and SIGTERM received by this process are sent on to a process group once
    each; ``received`` keeps the first one."""

    def __init__(self) -> None:
        self.group: int | None = None
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Forward:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.received = self.received or signum
        if self.group is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.group, signum)

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _wait(procs: list[subprocess.Popen], forward: _Forward) -> int:
    """Wait for every worker; the first failure's exit status (or 0). After a failure the others get
    :data:`FAILURE_GRACE_S` to stop, then are killed; after a forwarded signal they all stop by
    themselves (each saves first), so none is cut short."""
    failed_at: float | None = None
    code = 0
    while any(p.poll() is None for p in procs):
        if failed_at is None:
            failure = next((p.returncode for p in procs if p.returncode not in (None, 0)), None)
            if failure is not None:
                code, failed_at = failure, time.monotonic()
        elif forward.received is None and time.monotonic() - failed_at > FAILURE_GRACE_S:
            _kill_group(procs[0].pid)
        time.sleep(0.05)
    return code or next((p.returncode for p in procs if p.returncode), 0)


def _join_group(group: int) -> Any:
    """A ``preexec_fn`` that puts the child in process group ``group`` (0: a new one led by the child)."""
    return lambda: os.setpgid(0, group)


def _kill_group(group: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signal.SIGKILL)


def run_workers(argv: Sequence[str], num_processes: int) -> int:
    """Run ``prefalign <argv>`` on ``num_processes`` worker processes of one new process group; returns
    the command's exit status (130 / 143 after SIGINT / SIGTERM)."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, world_size=num_processes + 1, is_master=True, wait_for_workers=False)
    cmd = [sys.executable, "-m", "prefalign", *argv]
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="prefalign-workers-") as errors, _Forward() as forward:
        try:
            for rank in range(num_processes):
                env = worker_environment(rank, num_processes, store.port, Path(errors))
                group = (
                    procs[0].pid if procs else 0
                )  # a new process group (not the terminal's foreground one)
                procs.append(subprocess.Popen(cmd, env=env, preexec_fn=_join_group(group)))
                forward.group = procs[0].pid
            code = _wait(procs, forward)
        finally:
            if procs:
                _kill_group(procs[0].pid)  # nothing outlives the command
                for p in procs:
                    p.wait()
        reports = [f.read_text() for f in sorted(Path(errors).glob("rank-*.txt"), key=_rank_of)]
    for message in dict.fromkeys(reports):  # each distinct report once, in rank order
        print(message, file=sys.stderr)
    if forward.received is not None:
        return 128 + forward.received
    return code


def _rank_of(path: Path) -> int:
    return int(path.stem.split("-")[1])


def relaunch(argv: Sequence[str], args: argparse.Namespace) -> int:
    """Run ``prefalign <argv>`` on the processes ``args`` asks for; returns the command's exit status
    (130 after Ctrl-C, 143 after SIGTERM)."""
    argv = strip_launch_options(argv)
    if args.launch_config is None:
        print(f"prefalign: starting {args.num_processes} worker processes", file=sys.stderr, flush=True)
        return run_workers(argv, args.num_processes)
    cmd = launch_command(argv, args.num_processes, args.launch_config)
    print(f"prefalign: launching {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    with _Forward() as forward:
        proc = subprocess.Popen(cmd, preexec_fn=_join_group(0))
        forward.group = proc.pid
        try:
            code = proc.wait()
        finally:
            _kill_group(proc.pid)
    return 128 + forward.received if forward.received is not None else code
