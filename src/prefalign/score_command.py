"""`prefalign score`: rewards for rows of prompt + completion, from every source training accepts.

Each row's other columns travel with it to the reward (an ``accuracy`` reward reads ``answer``), as in
training (:mod:`prefalign.rewards`); the rows are written back with ``reward``, and with
``reward/<source>`` for each source when several are combined (``--reward-weights``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from prefalign.rewards import (
    REWARD_CHOICES,
    ModelReward,
    check_reward_data,
    column_values,
    data_columns,
    format_pattern_problem,
    make_rewards,
)


@dataclass
class ScoreConfig:
    """Score completions with a reward model, VADER sentiment, accuracy, a format check or your function."""

    data: str
    """Rows with a "prompt" and a "completion" (or "response", as `prefalign generate` writes them); every
    other column is passed to the reward (an accuracy reward reads "answer")."""
    output: str
    """JSONL file to write: each input row with a "reward" field added (and "reward/<source>" for each
    source when there are several)."""
    reward_model: str | None = None
    """A `prefalign reward` output folder (with or instead of --reward)."""
    reward: list[str] = field(default_factory=list)
    """sentiment (VADER), accuracy (against the "answer" column), format (--format-pattern) or a callable
    module:function; repeat the flag for several."""
    reward_weights: list[float] = field(default_factory=list)
    """Weights of the reward sources (comma separated; --reward ones in order, then --reward-model); default 1 each."""
    format_pattern: str | None = None
    """The Python regular expression of --reward format (a completion scores 1 when re.search finds it)."""
    raw: bool = False
    """How a reward model sees text prompts: as they are, instead of through the chat template."""
    batch_size: int = 16
    """Sequences per reward-model forward pass."""
    device: str | None = None
    """Where a reward model runs (cpu, cuda); default: cuda if available, else cpu."""

    def __post_init__(self) -> None:
        from prefalign.config import ConfigError, check_device

        if isinstance(self.reward, str):  # one source, as the Python API took it before sources combined
            self.reward = [self.reward]
        n = len(self.reward) + (self.reward_model is not None)
        if n == 0:
            raise ConfigError(
                f"give a reward source: --reward {REWARD_CHOICES} (repeatable) or --reward-model PATH"
            )
        if self.reward_weights and len(self.reward_weights) != n:
            raise ConfigError(
                f"--reward-weights has {len(self.reward_weights)} values for {n} reward sources"
            )
        problem = format_pattern_problem(self.format_pattern, self.reward)
        if problem:
            raise ConfigError(problem)
        check_device(self.device)  # before any reward model is loaded


def _completion_of(row: dict[str, Any], where: str) -> str:
    from prefalign.data import DataError

    for key in ("completion", "response"):
        if key in row:
            value = row[key]
            if isinstance(value, list) and value and isinstance(value[-1], dict):
                value = value[-1].get("content", "")
            if not isinstance(value, str):
                raise DataError(f'{where}: field "{key}" must be text, got {type(value).__name__}')
            return value
    raise DataError(f'{where}: missing field "completion" (or "response")')


SCORE_FIELDS = ("prompt", "completion", "response", "reward")
"""Columns of `prefalign score`'s input that are not passed to the reward (nor are "reward/..." ones)."""


def run_score(config: ScoreConfig) -> list[dict[str, Any]]:
    """Read the rows, score them with the configured sources, return the rows with ``reward`` added (and
    ``reward/<source>`` for each source when there are several)."""
    from prefalign.data import located, read_rows, validate_prompt

    entries = read_rows(config.data)
    rows = [located(validate_prompt(row, where), where) for where, row in entries]
    completions = [_completion_of(row, where) for (where, _), row in zip(entries, rows, strict=True)]
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    source = make_rewards(
        config.reward, config.reward_model, config.reward_weights, device, config.raw, config.format_pattern
    )
    exclude = {*SCORE_FIELDS, *(c for c in data_columns(rows, ()) if c.startswith("reward/"))}
    names = data_columns(rows, exclude)
    check_reward_data(source, rows, _file_name(config.data), exclude)
    for sub in getattr(source, "sources", [source]):
        if isinstance(sub, ModelReward):
            sub.batch_size = config.batch_size
    scores = source([r["prompt"] for r in rows], completions, **column_values(rows, names))
    parts = getattr(source, "components", {})
    out = []
    for i, (row, total) in enumerate(zip(rows, scores, strict=True)):
        fields = {f"reward/{name}": values[i] for name, values in parts.items()}
        out.append({**row, "reward": total, **fields})
    return out


def _file_name(source: str) -> str:
    """A data source as messages name it: a file's name, else the source as given."""
    from pathlib import Path

    path = Path(source).expanduser()
    return path.name if path.exists() else source


def _score_command(args: Any) -> int:
    import json
    import sys
    from pathlib import Path

    from prefalign.config import check_output_file, config_from_args

    config = config_from_args(ScoreConfig, args)
    out = Path(config.output)
    check_output_file(out)  # a folder, a path under a file, an unwritable place: refused before scoring
    records = run_score(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    mean = sum(r["reward"] for r in records) / len(records)
    print(f"scored {len(records)} rows (mean reward {mean:.4f}) -> {out}", file=sys.stderr)
    return 0


def add_commands(subparsers: Any) -> None:
    """Register ``prefalign score``."""
    import argparse

    from prefalign.config import add_config_arguments

    parser = subparsers.add_parser(
        "score", help=ScoreConfig.__doc__, description=ScoreConfig.__doc__, conflict_handler="resolve"
    )
    add_config_arguments(parser, ScoreConfig)
    action = next(a for a in parser._actions if a.dest == "reward")
    parser.add_argument(  # repeatable, as in grpo and rloo
        "--reward",
        dest="reward",
        action="append",
        default=argparse.SUPPRESS,
        metavar="REWARD",
        help=action.help,
    )
    parser.set_defaults(func=_score_command)
