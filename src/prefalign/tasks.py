"""`prefalign tasks`: generated tasks with verifiable answers, for the ``accuracy`` reward.

``prefalign tasks arithmetic --n 1000 --seed 0 --output math.jsonl`` writes word problems, one JSON line
each with a ``prompt`` and its ``answer`` (an integer)::

    {"prompt": "Mia has 12 marbles. She finds 7 more. How many marbles does Mia have now? Give the final
     answer as a number.", "answer": 19}

The same ``--seed``, ``--n`` and ``--difficulty`` always give the same file. ``--difficulty`` sets the
number of steps and the size of the numbers (:data:`LEVELS`): 1 is one addition or subtraction of numbers
up to 20; 2 adds multiplication and numbers up to 50; each level after adds a step, with numbers up to
100. Every intermediate result stays a whole number of at least 0, so an answer is always an integer.

Measured on the bundled SmolLM2-135M-Instruct (2026-12-07; 128 problems of seed 1, its chat template,
sampled at temperature 1 with 64 new tokens, scored by the ``accuracy`` reward): 7.8% at difficulty 1,
2.3% at 2, 1.6% at 3. Even the easiest level is below the 10-60% where GRPO's groups of 8 reliably hold
both right and wrong answers: the model often writes the sum correctly ("4 - 1 = 3") and then runs on into
other numbers, and the last number is the one read. A larger model, or prompts with a worked example,
lands in range; ``eval/scores`` at step 0 of ``prefalign grpo --reward accuracy --eval-prompts
held_out.jsonl`` is the held-out accuracy before training.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LEVELS: dict[int, tuple[int, int, tuple[str, ...]]] = {
    1: (1, 20, ("+", "-")),
    2: (1, 50, ("+", "-", "*")),
    3: (2, 100, ("+", "-", "*")),
    4: (3, 100, ("+", "-", "*")),
    5: (4, 100, ("+", "-", "*")),
}
"""Difficulty -> (steps, largest starting number or addend, operations)."""

NAMES = ("Mia", "Noah", "Ava", "Liam", "Zoe", "Omar", "Lena", "Ravi", "Sara", "Tom", "Ines", "Kofi")
PRONOUNS = {
    name: ("She" if name in ("Mia", "Ava", "Zoe", "Lena", "Sara", "Ines") else "He") for name in NAMES
}
ITEMS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "stamps", "shells", "cards", "eggs")
STEPS = {
    "+": ("{p} finds {n} more.", "{p} buys {n} more.", "A friend gives {o} {n} more."),
    "-": ("{p} gives {n} away.", "{p} loses {n} of them.", "{p} sells {n} of them."),
    "*": ("Then {o} number of {items} becomes {n} times as large.",),
}
"""Each step's sentences; an addition says "more", a subtraction "away", "loses" or "sells", a
multiplication "times", and each holds exactly one number."""
OBJECT = {"She": "her", "He": "him"}
POSSESSIVE = {"She": "her", "He": "his"}


def arithmetic_problem(rng: random.Random, difficulty: int) -> dict[str, Any]:
    """One word problem: ``{"prompt": text, "answer": int}`` drawn from ``rng`` at ``difficulty``."""
    steps, largest, ops = LEVELS[difficulty]
    name, items = rng.choice(NAMES), rng.choice(ITEMS)
    pronoun = PRONOUNS[name]
    value = rng.randint(2, largest)
    sentences = [f"{name} has {value} {items}."]
    for _ in range(steps):
        op = rng.choice(ops if value > 0 else ("+", "*"))
        if op == "+":
            n = rng.randint(1, largest)
            value += n
        elif op == "-":
            n = rng.randint(1, value)
            value -= n
        else:
            n = rng.randint(2, 5 if difficulty < 3 else 9)
            value *= n
        template = rng.choice(STEPS[op])
        o = POSSESSIVE[pronoun] if op == "*" else OBJECT[pronoun]
        sentences.append(template.format(p=pronoun, n=n, o=o, items=items))
    question = f"How many {items} does {name} have now? Give the final answer as a number."
    return {"prompt": " ".join([*sentences, question]), "answer": value}


def arithmetic_problems(n: int, seed: int = 0, difficulty: int = 1) -> list[dict[str, Any]]:
    """``n`` word problems, the same for the same ``seed`` and ``difficulty``."""
    rng = random.Random(seed)
    return [arithmetic_problem(rng, difficulty) for _ in range(n)]


@dataclass
class ArithmeticConfig:
    """Write generated arithmetic word problems with an "answer" column (for --reward accuracy)."""

    output: str
    """JSONL file to write: one {"prompt", "answer"} row per problem."""
    n: int = 1000
    """Problems to write."""
    seed: int = 0
    """Seed of the generator: the same seed, n and difficulty always give the same file."""
    difficulty: int = 1
    """1: one addition or subtraction of numbers up to 20; 2: also multiplication, numbers up to 50;
    3-5: 2-4 steps with numbers up to 100."""

    def __post_init__(self) -> None:
        from prefalign.config import ConfigError

        if self.n < 1:
            raise ConfigError(f"n must be >= 1, got {self.n}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if self.difficulty not in LEVELS:
            raise ConfigError(f"difficulty must be one of {sorted(LEVELS)}, got {self.difficulty}")


def _arithmetic_command(args: Any) -> int:
    from prefalign.config import check_output_file, config_from_args

    config = config_from_args(ArithmeticConfig, args)
    out = Path(config.output)
    check_output_file(out)
    rows = arithmetic_problems(config.n, config.seed, config.difficulty)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(
        f"wrote {len(rows)} problems (difficulty {config.difficulty}, seed {config.seed}) -> {out}",
        file=sys.stderr,
    )
    return 0


def add_commands(subparsers: Any) -> None:
    """Register ``prefalign tasks arithmetic``."""
    from prefalign.config import add_config_arguments

    parser = subparsers.add_parser(
        "tasks", help="Generated tasks with verifiable answers (for --reward accuracy)."
    )
    tasks = parser.add_subparsers(dest="task", metavar="TASK")
    arithmetic = tasks.add_parser(
        "arithmetic", help=ArithmeticConfig.__doc__, description=ArithmeticConfig.__doc__
    )
    add_config_arguments(arithmetic, ArithmeticConfig)
    arithmetic.set_defaults(func=_arithmetic_command)
