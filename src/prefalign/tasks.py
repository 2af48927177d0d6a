"""`prefalign tasks`: generated tasks with verifiable answers, for the ``accuracy`` reward.

``prefalign tasks arithmetic --n 1000 --seed 0 --output math.jsonl`` writes word problems, one JSON line
each with a ``prompt`` and its ``answer`` (an integer)::

    {"prompt": "Mia has 12 marbles. She finds 7 more. How many marbles does Mia have now? Give the final
     answer as a number.", "answer": 19}

The same ``--seed``, ``--n`` and ``--difficulty`` always give the same file. ``--difficulty`` sets the
number of steps and the size of the numbers (:data:`LEVELS`): 0 is a bare sum or difference of two
numbers up to 20 ("What is 7 + 5? Give the final answer as a number."); 1 is one addition or subtraction
of numbers up to 20 in words; 2 adds multiplication and numbers up to 50; each level after adds a step,
with numbers up to 100. Every intermediate result stays a whole number of at least 0, so an answer is
always an integer.

Measured on the bundled SmolLM2-135M-Instruct (2026-12-07; 128 problems of seed 1, its chat template,
sampled at temperature 1 with 64 new tokens, scored by the ``accuracy`` reward): 14.8% at difficulty 0
(11.7% with 32 new tokens; 21.9% when its numbers only go up to 10, too few distinct problems to hold
any out), 3.9-7.8% at difficulty 1, 2.3% at 2, 1.6% at 3. Difficulty 0 is the one in
the 10-60% where GRPO's groups of 8 reliably hold both right and wrong answers, so it is the default for
this model; in words the model often writes the sum correctly ("4 - 1 = 3") and then runs on into other
numbers, and the last number is the one read. ``eval/scores`` at step 0 of ``prefalign grpo --reward
accuracy --eval-prompts held_out.jsonl`` is the held-out accuracy before training.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LEVELS: dict[int, tuple[int, int, tuple[str, ...]]] = {
    0: (1, 20, ("+", "-")),
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
ANSWER = "Give the final answer as a number."
POSSESSIVE = {"She": "her", "He": "his"}


def arithmetic_problem(rng: random.Random, difficulty: int) -> dict[str, Any]:
    """One word problem: ``{"prompt": text, "answer": int}`` drawn from ``rng`` at ``difficulty``."""
    steps, largest, ops = LEVELS[difficulty]
    if difficulty == 0:  # a bare sum or difference, never below 0
        a, b = rng.randint(1, largest), rng.randint(1, largest)
        op = rng.choice(ops)
        if op == "-":
            a, b = max(a, b), min(a, b)
        return {"prompt": f"What is {a} {op} {b}? {ANSWER}", "answer": a + b if op == "+" else a - b}
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
    question = f"How many {items} does {name} have now? {ANSWER}"
    return {"prompt": " ".join([*sentences, question]), "answer": value}


def arithmetic_problems(
    n: int, seed: int = 0, difficulty: int = 0, exclude: frozenset[str] = frozenset()
) -> list[dict[str, Any]]:
    """``n`` word problems, the same for the same ``seed``, ``difficulty`` and ``exclude`` (prompts that
    must not appear: a training file's, so that held-out problems are new ones).

    Raises:
        ValueError: ``n`` problems outside ``exclude`` not found in ``100 n`` draws.
    """
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for _ in range(100 * n):
        if len(out) == n:
            break
        problem = arithmetic_problem(rng, difficulty)
        if problem["prompt"] not in exclude:
            out.append(problem)
    if len(out) < n:
        raise ValueError(
            f"found only {len(out)} of {n} problems at difficulty {difficulty} outside the excluded ones; "
            "ask for fewer, or a higher difficulty (more distinct problems)"
        )
    return out


@dataclass
class ArithmeticConfig:
    """Write generated arithmetic word problems with an "answer" column (for --reward accuracy)."""

    output: str
    """JSONL file to write: one {"prompt", "answer"} row per problem."""
    n: int = 1000
    """Problems to write."""
    seed: int = 0
    """Seed of the generator: the same seed, n and difficulty always give the same file."""
    exclude: str | None = None
    """A JSONL file (e.g. the training problems) whose prompts must not be written: held-out problems that
    training never saw."""
    difficulty: int = 0
    """0: a bare sum or difference of numbers up to 20 (the bundled SmolLM2 gets about 15% right before
    training); 1: one addition or subtraction in words, numbers up to 20; 2: also multiplication, numbers
    up to 50; 3-5: 2-4 steps with numbers up to 100."""

    def __post_init__(self) -> None:
        from prefalign.config import ConfigError

        if self.n < 1:
            raise ConfigError(f"n must be >= 1, got {self.n}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if self.difficulty not in LEVELS:
            raise ConfigError(f"difficulty must be one of {sorted(LEVELS)}, got {self.difficulty}")


def _prompts_of(path: Path) -> frozenset[str]:
    """The ``prompt`` of every line of a JSONL file (a tasks file)."""
    from prefalign.config import ConfigError

    if not path.is_file():
        raise ConfigError(f"--exclude {path}: file not found")
    prompts = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError as err:
            raise ConfigError(f"--exclude {path}, line {number}: not JSON ({err.msg})") from None
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            prompts.add(row["prompt"])
    return frozenset(prompts)


def _arithmetic_command(args: Any) -> int:
    from prefalign.config import check_output_file, config_from_args

    config = config_from_args(ArithmeticConfig, args)
    out = Path(config.output)
    check_output_file(out)
    excluded: frozenset[str] = frozenset()
    if config.exclude:
        excluded = _prompts_of(Path(config.exclude))
    try:
        rows = arithmetic_problems(config.n, config.seed, config.difficulty, excluded)
    except ValueError as err:
        from prefalign.config import ConfigError

        raise ConfigError(str(err)) from None
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
