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
from prefalign.config import ConfigError

# Modules that register sub-commands, in the order they appear in `prefalign --help`.
COMMAND_MODULES: tuple[str, ...] = (
    "prefalign.train.dpo",
    "prefalign.generation",
    "prefalign.models",
    "prefalign.rl.cli",
    "prefalign.demo",
)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that are the user's mistake and are reported without a traceback."""
    from prefalign.data import DataError
    from prefalign.models import ModelError

    return (ConfigError, DataError, ModelError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefalign",
        description="Align language models with human preferences: DPO, RLHF and the RL foundations.",
    )
    parser.add_argument("--version", action="version", version=f"prefalign {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except user_errors() as err:
        print(f"prefalign {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
