"""`prefalign <command>`: one sub-command per method; options come from each command's config dataclass.

Each feature module contributes its sub-commands through an ``add_commands(subparsers)`` function
that registers parsers and sets ``func`` (called with the parsed namespace, returning an exit code).
User mistakes (bad data, bad config) become one clear line on stderr and exit code 2, not a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from types import ModuleType
from typing import Any

from prefalign import __version__
from prefalign.config import ConfigError, config_from_args
from prefalign.launch import (
    ERRORS_ENV,
    TRAINING_COMMANDS,
    add_launch_arguments,
    launch_processes,
    relaunch,
    report_worker_error,
    wants_launch,
)

# One loader per sub-command: a plain import of the module that registers it, made only when that command
# is asked for (so that `prefalign rl ...` or `prefalign dpo --help` does not import transformers).


def _sft() -> ModuleType:
    from prefalign.train import sft

    return sft


def _reward() -> ModuleType:
    from prefalign.train import reward

    return reward


def _dpo() -> ModuleType:
    from prefalign.train import dpo

    return dpo


def _kto() -> ModuleType:
    from prefalign.train import kto

    return kto


def _ppo() -> ModuleType:
    from prefalign.train import ppo

    return ppo


def _grpo() -> ModuleType:
    from prefalign.train import grpo

    return grpo


def _rloo() -> ModuleType:
    from prefalign.train import rloo

    return rloo


def _score() -> ModuleType:
    from prefalign import score_command

    return score_command


def _tasks() -> ModuleType:
    from prefalign import tasks

    return tasks


def _generate() -> ModuleType:
    from prefalign import generate_command

    return generate_command


def _models() -> ModuleType:
    from prefalign import models

    return models


def _rl() -> ModuleType:
    from prefalign.rl import cli

    return cli


def _demo() -> ModuleType:
    from prefalign import demo

    return demo


COMMANDS: dict[str, Callable[[], ModuleType]] = {
    "sft": _sft,
    "reward": _reward,
    "dpo": _dpo,
    "kto": _kto,
    "ppo": _ppo,
    "grpo": _grpo,
    "rloo": _rloo,
    "score": _score,
    "tasks": _tasks,
    "generate": _generate,
    "models": _models,
    "rl": _rl,
    "demo": _demo,
}
"""Each sub-command's loader, in the order they appear in `prefalign --help`; the module it returns
registers the command with ``add_commands(subparsers)``."""

MODEL_COMMANDS = frozenset(COMMANDS) - {"tasks", "models", "rl"}
"""Commands that run language models: they flush subnormal floats to zero
(:func:`prefalign.train.precision.subnormals_flushed`)."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that are the user's mistake and are reported without a traceback."""
    from prefalign.data import DataError
    from prefalign.models import ModelError
    from prefalign.rewards import RewardError
    from prefalign.train.loop import DivergenceError

    return (ConfigError, DataError, ModelError, RewardError, DivergenceError, FileNotFoundError)


def check_before_launch(config: Any, args: argparse.Namespace) -> None:
    """What the launching process checks before it starts any worker, so that a mistake is reported
    once, by it: the options against the process count (an online rollout batch that does not split)
    and the run folder (a run already there without --resume or --overwrite, a --resume with nothing to
    resume or with changed settings)."""
    from prefalign.train.run_folder import check_run_folder

    n = launch_processes(args)
    if n is not None:
        config.check_processes(n)
    check_run_folder(config)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``command`` only that sub-command's module is imported (so that, say,
    `prefalign rl ...` does not pay for importing the language-model stack)."""
    parser = argparse.ArgumentParser(
        prog="prefalign",
        description="Align language models with human preferences: DPO, RLHF and the RL foundations.",
    )
    parser.add_argument("--version", action="version", version=f"prefalign {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, load in COMMANDS.items():
        if command is None or name == command:
            load().add_commands(sub)
            if name in TRAINING_COMMANDS:
                add_launch_arguments(sub.choices[name])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Under the launcher every worker runs this; only the first one tells the user what happens.
    quiet = os.environ.get(ERRORS_ENV) and os.environ.get("RANK", "0") != "0"
    logging.basicConfig(level=logging.ERROR if quiet else logging.INFO, format="%(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        if args.command in TRAINING_COMMANDS and wants_launch(args):
            config = config_from_args(args.config_class, args)  # bad options refused once, before any start
            check_before_launch(config, args)
            return relaunch(argv, args)
        flushed: Any = nullcontext()
        if (
            args.command in MODEL_COMMANDS
        ):  # before the first parallel region, so every torch thread inherits it
            from prefalign.train.precision import subnormals_flushed

            flushed = subnormals_flushed()
        with flushed:
            return int(args.func(args) or 0)
    except user_errors() as err:
        message = f"prefalign {args.command}: error: {err}"
        if not report_worker_error(message):  # a launcher's worker leaves it to be printed once
            print(message, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if not quiet:
            print("interrupted", file=sys.stderr)
        return 130
    except _run_finished() as done:  # (--resume of a finished run: nothing to do, nothing touched)
        print(f"prefalign {args.command}: {done}")
        return 0


def _run_finished() -> type[BaseException]:
    """The exception a --resume of an already finished run stops with (imported only when needed)."""
    if "prefalign.train.run_folder" not in sys.modules:
        return _NeverRaised
    from prefalign.train.run_folder import RunFinished

    return RunFinished


class _NeverRaised(Exception):
    """Stands for :class:`~prefalign.train.run_folder.RunFinished` when no training module was imported."""


if __name__ == "__main__":
    raise SystemExit(main())
