"""`prefalign <command>`: one sub-command per method; options come from each command's config dataclass.

Each feature module contributes its sub-commands through an ``add_commands(subparsers)`` function
that registers parsers and sets ``func`` (called with the parsed namespace, returning an exit code).
User mistakes (bad data, bad config) become one clear line on stderr and exit code 2, not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from prefalign import __version__
from prefalign.config import ConfigError, config_from_args
from prefalign.launch import TRAINING_COMMANDS, add_launch_arguments, relaunch, wants_launch

# The module that registers each sub-command, in the order they appear in `prefalign --help`.
COMMANDS: dict[str, str] = {
    "sft": "prefalign.train.sft",
    "reward": "prefalign.train.reward",
    "dpo": "prefalign.train.dpo",
    "ppo": "prefalign.train.ppo",
    "grpo": "prefalign.train.grpo",
    "rloo": "prefalign.train.rloo",
    "score": "prefalign.rewards",
    "generate": "prefalign.generation",
    "models": "prefalign.models",
    "rl": "prefalign.rl.cli",
    "demo": "prefalign.demo",
}


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that are the user's mistake and are reported without a traceback."""
    from prefalign.data import DataError
    from prefalign.models import ModelError
    from prefalign.rewards import RewardError
    from prefalign.train.loop import DivergenceError

    return (ConfigError, DataError, ModelError, RewardError, DivergenceError, FileNotFoundError)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; with ``command`` only that sub-command's module is imported (so that, say,
    `prefalign rl ...` does not pay for importing the language-model stack)."""
    parser = argparse.ArgumentParser(
        prog="prefalign",
        description="Align language models with human preferences: DPO, RLHF and the RL foundations.",
    )
    parser.add_argument("--version", action="version", version=f"prefalign {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        if command is None or name == command:
            importlib.import_module(module).add_commands(sub)
            if name in TRAINING_COMMANDS:
                add_launch_arguments(sub.choices[name])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        if args.command in TRAINING_COMMANDS and wants_launch(args):
            config_from_args(args.config_class, args)  # refuse bad options once, before any process starts
            return relaunch(argv, args)
        return int(args.func(args) or 0)
    except user_errors() as err:
        print(f"prefalign {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
