"""`prefalign demo`: the DPO paper's controlled-sentiment experiment at laptop scale.

Not built yet: it lands with its own issue (RLHF-PPO and the demo come after DPO). Until then the command
says so and exits with status 2, so `make demo` never fails silently.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

NOT_YET = (
    "prefalign demo: not yet implemented. The controlled-sentiment experiment (DPO vs PPO-RLHF on the\n"
    "bundled SmolLM2-135M, with a report and plots) lands with its own issue. What works today:\n"
    "  prefalign dpo --model smollm2 --data pairs.jsonl --output runs/dpo\n"
    "  prefalign generate --model smollm2 --prompt 'Write a haiku about autumn.'\n"
    "  prefalign rl gridworld | prefalign rl random-walk | prefalign rl ppo --env CartPole-v1"
)


def _run(args: argparse.Namespace) -> int:
    print(NOT_YET, file=sys.stderr)
    return 2


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo", help="The controlled-sentiment DPO experiment (not yet implemented)."
    )
    parser.add_argument("--output", default="runs/demo", help="Run folder for the report.")
    parser.set_defaults(func=_run)
