"""Reward sources for online training (PPO, GRPO, RLOO) and evaluation, behind one interface.

A reward source is called with the prompts and completions as text and returns one float per
completion: ``source(prompts, completions) -> list[float]``. Three kinds:

- a trained reward model (a `prefalign reward` output folder): the Bradley-Terry scalar head read at
  the last token of ``prompt + completion``;
- ``sentiment``: VADER's compound sentiment score of the completion, in [-1, 1] (Hutto & Gilbert 2014;
  a lexicon and rule model that runs offline, the demo's ground truth);
- any user callable named ``module:function`` taking ``(prompts, completions)`` and returning a list of
  numbers; the module is imported only because the user named it.

Every source's output is checked (:func:`check_scores`): a wrong count, a non-number or a non-finite
value stops the run with a :class:`RewardError` naming the source.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any

import torch


class RewardError(ValueError):
    """A reward source is misconfigured or returned something unusable; the message names the source."""


def check_scores(name: str, scores: Any, count: int) -> list[float]:
    """Validate what a reward source returned: ``count`` finite numbers.

    Accepted containers are ordered ones: a list, a tuple, any other sequence, a tensor or NumPy array
    (flattened) and an iterator such as a generator. A text, a mapping (its keys would pass for the scores)
    or a set (no order) is refused, as is anything that is not a real number or does not fit a float.

    Raises:
        RewardError: naming ``name`` and the first problem found.
    """
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().float().cpu().reshape(-1).tolist()
    elif type(scores).__module__ == "numpy" and hasattr(scores, "tolist") and hasattr(scores, "reshape"):
        scores = scores.reshape(-1).tolist()
    if isinstance(scores, str | bytes | Mapping | Set) or not isinstance(scores, Sequence | Iterator):
        raise RewardError(
            f"reward {name}: returned a {type(scores).__name__}, expected a list of {count} numbers "
            "(one per completion, in order)"
        )
    scores = list(scores)
    if len(scores) != count:
        raise RewardError(f"reward {name}: returned {len(scores)} scores for {count} completions")
    return [_score_value(name, i, value) for i, value in enumerate(scores)]


def _score_value(name: str, i: int, value: Any) -> float:
    """Score ``i`` as a finite float, or a RewardError naming the source and the score."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RewardError(f"reward {name}: score {i} is {_short_repr(value)}, not a number")
    try:
        number = float(value)
    except OverflowError:  # an int past ~1.8e308
        raise RewardError(
            f"reward {name}: score {i} is {_short_repr(value)}, too large for a float"
        ) from None
    if not math.isfinite(number):
        raise RewardError(f"reward {name}: score {i} is {number}, not finite")
    return number


def _short_repr(value: Any, limit: int = 40) -> str:
    """``repr(value)`` for one line of an error message: a huge integer as its digit count, else cut."""
    if isinstance(value, int) and abs(value) >= 10**limit:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RewardSource:
    """Base class: ``name`` for messages and metrics, and ``__call__`` returning checked scores."""

    name: str = "reward"

    def score(self, prompts: list[str], completions: list[str]) -> Any:
        raise NotImplementedError

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        return check_scores(self.name, self.score(list(prompts), list(completions)), len(completions))


# --------------------------------------------------------------------------------------------------
# VADER sentiment

_VADER: Any = None


def vader_scores(texts: Sequence[str]) -> list[float]:
    """VADER's compound sentiment score of each text, in [-1, 1] (0 for an empty text)."""
    global _VADER
    if _VADER is None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise RewardError(
                "reward sentiment needs the package vaderSentiment: pip install vaderSentiment"
            ) from None
        _VADER = SentimentIntensityAnalyzer()
    return [float(_VADER.polarity_scores(t)["compound"]) if t.strip() else 0.0 for t in texts]


class SentimentReward(RewardSource):
    """VADER's compound score of the completion (the prompt is ignored)."""

    name = "sentiment"

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        return vader_scores(completions)


BUILTIN_REWARDS: dict[str, type[RewardSource]] = {"sentiment": SentimentReward}
"""The reward sources named by a word (``--reward sentiment``); any other name is a ``module:function``."""


# --------------------------------------------------------------------------------------------------
# user callables


class CallableReward(RewardSource):
    """A user function ``fn(prompts, completions) -> list[float]`` named as ``module:function``."""

    def __init__(self, spec: str) -> None:
        self.name = spec
        self.fn = load_callable(spec)

    def score(self, prompts: list[str], completions: list[str]) -> Any:
        try:
            return self.fn(prompts, completions)
        except RewardError:
            raise
        except SystemExit as err:  # would end the run with its code (often 0) and nothing saved
            code = "" if err.code is None else repr(err.code)
            raise RewardError(
                f"reward {self.name}: called sys.exit({code}) instead of returning scores"
            ) from None
        except Exception as err:  # the user's code: report it as the reward's failure, in one line
            raise RewardError(f"reward {self.name} raised {type(err).__name__}: {err}") from err


def load_callable(spec: str) -> Callable[..., Any]:
    """Import ``module:function`` (dotted attribute paths allowed after the colon)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RewardError(
            f"reward {spec!r}: expected 'sentiment' or a callable as module:function (e.g. mypkg.rewards:length)"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise RewardError(f"reward {spec}: cannot import module {module_name!r} ({err})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"reward {spec}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"reward {spec}: {attr!r} is not callable")
    return obj


# --------------------------------------------------------------------------------------------------
# trained reward models


class ModelReward(RewardSource):
    """A Bradley-Terry reward model: the scalar head at the last token of ``prompt + completion``.

    The texts are tokenised as the reward model saw them in training: the prompt through
    :func:`prefalign.data.encode_prompt` (chat template unless ``raw``), the completion through
    :func:`prefalign.data.encode_completion` (ending with one end-of-turn token).
    """

    def __init__(
        self,
        path: str,
        device: str | torch.device | None = None,
        dtype: str = "float32",
        raw: bool = False,
        batch_size: int = 16,
    ) -> None:
        from prefalign.models import freeze, load_reward_model, load_tokenizer

        self.name = f"model:{path}"
        self.tokenizer = load_tokenizer(path)
        self.model = freeze(load_reward_model(path, dtype=dtype, device=device, trained_head=True))
        self.raw = raw
        self.batch_size = batch_size

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        return self.score_rows(prompts, completions)

    def score_rows(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[float]:
        """Scores of prompts (text or messages) and completions (text or messages), checked."""
        from prefalign.data import encode_completion, encode_prompt

        ids = [
            encode_prompt(self.tokenizer, p, raw=self.raw) + encode_completion(self.tokenizer, p, c)
            for p, c in zip(prompts, completions, strict=True)
        ]
        return check_scores(self.name, self.score_ids(ids), len(ids))

    def score_ids(self, sequences: Sequence[Sequence[int]]) -> list[float]:
        """Scores of token-id sequences (prompt + completion), in batches, right padded."""
        from prefalign.models import sequence_scores

        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id or 0
        out: list[float] = []
        with torch.inference_mode():
            for i in range(0, len(sequences), self.batch_size):
                chunk = sequences[i : i + self.batch_size]
                width = max(len(s) for s in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for j, s in enumerate(chunk):
                    ids[j, : len(s)] = torch.as_tensor(list(s))
                    mask[j, : len(s)] = 1
                out += sequence_scores(self.model, ids.to(device), mask.to(device)).cpu().tolist()
        return out


def make_reward(
    reward: str | None = None,
    reward_model: str | None = None,
    device: str | torch.device | None = None,
    raw: bool = False,
) -> RewardSource:
    """The reward source a command's options name: exactly one of ``reward`` and ``reward_model``.

    Args:
        reward: ``"sentiment"`` or ``"module:function"``.
        reward_model: a `prefalign reward` output folder (or any sequence classifier with one label).
        device: where a reward model runs.
        raw: how a reward model tokenises text prompts (as in training: chat template unless raw).
    """
    if (reward is None) == (reward_model is None):
        raise RewardError(
            "give exactly one reward source: --reward-model PATH or --reward sentiment|module:function"
        )
    if reward_model is not None:
        return ModelReward(reward_model, device=device, raw=raw)
    builtin = BUILTIN_REWARDS.get(str(reward))
    return builtin() if builtin is not None else CallableReward(str(reward))


class WeightedReward(RewardSource):
    """Several sources at once: the weighted sum of their scores (TRL's ``reward_funcs`` with
    ``reward_weights``). The last call's scores of each source stay in ``components`` (for metrics)."""

    def __init__(self, sources: Sequence[RewardSource], weights: Sequence[float]) -> None:
        if len(sources) != len(weights):
            raise RewardError(f"{len(weights)} reward weights for {len(sources)} reward sources")
        self.sources, self.weights = list(sources), [float(w) for w in weights]
        self.name = " + ".join(f"{w:g} * {s.name}" for s, w in zip(self.sources, self.weights, strict=True))
        self.components: dict[str, list[float]] = {}

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        total = [0.0] * len(completions)
        self.components = {}
        for source, weight in zip(self.sources, self.weights, strict=True):
            scores = source(prompts, completions)
            self.components[source.name] = scores
            total = [t + weight * s for t, s in zip(total, scores, strict=True)]
        return total


def make_rewards(
    rewards: Sequence[str] = (),
    reward_model: str | None = None,
    weights: Sequence[float] = (),
    device: str | torch.device | None = None,
    raw: bool = False,
) -> RewardSource:
    """One source from several: each of ``rewards`` (``sentiment`` or ``module:function``) and the reward
    model if given (last), combined by ``weights`` (default: all 1). A single source with weight 1 is
    returned as it is."""
    sources = [make_reward(spec, device=device, raw=raw) for spec in rewards]
    if reward_model is not None:
        sources.append(make_reward(reward_model=reward_model, device=device, raw=raw))
    if not sources:
        raise RewardError("give a reward source: --reward sentiment|module:function or --reward-model PATH")
    weights = list(weights) or [1.0] * len(sources)
    if len(sources) == 1 and weights == [1.0]:
        return sources[0]
    return WeightedReward(sources, weights)


# --------------------------------------------------------------------------------------------------
# Command line: `prefalign score`
# --------------------------------------------------------------------------------------------------


@dataclass
class ScoreConfig:
    """Score completions with a reward model, VADER sentiment or your function; writes JSON lines."""

    data: str
    """Rows with a "prompt" and a "completion" (or "response", as `prefalign generate` writes them)."""
    output: str
    """JSONL file to write: each input row with a "reward" field added."""
    reward_model: str | None = None
    """A `prefalign reward` output folder (use this or --reward)."""
    reward: str | None = None
    """sentiment (VADER's compound score) or a callable module:function."""
    raw: bool = False
    """How a reward model sees text prompts: as they are, instead of through the chat template."""
    batch_size: int = 16
    """Sequences per reward-model forward pass."""
    device: str | None = None
    """Where a reward model runs (cpu, cuda); default: cuda if available, else cpu."""

    def __post_init__(self) -> None:
        from prefalign.config import check_device

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


def run_score(config: ScoreConfig) -> list[dict[str, Any]]:
    """Read the rows, score them with the configured source, return the rows with ``reward`` added."""
    from prefalign.data import read_rows, validate_prompt

    entries = read_rows(config.data)
    rows = [validate_prompt(row, where) for where, row in entries]
    completions = [_completion_of(row, where) for (where, _), row in zip(entries, rows, strict=True)]
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    source = make_reward(config.reward, config.reward_model, device=device, raw=config.raw)
    if isinstance(source, ModelReward):
        source.batch_size = config.batch_size
    prompts = [r["prompt"] for r in rows]
    texts = [p if isinstance(p, str) else source_text(p) for p in prompts]
    scores = (
        source(texts, completions)
        if not isinstance(source, ModelReward)
        else source.score_rows(prompts, completions)
    )
    return [{**row, "reward": s} for row, s in zip(rows, scores, strict=True)]


def source_text(messages: list[dict[str, Any]]) -> str:
    """A conversation as plain text for sources that read text ("role: content" lines)."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


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
    from prefalign.config import add_config_arguments

    parser = subparsers.add_parser("score", help=ScoreConfig.__doc__, description=ScoreConfig.__doc__)
    add_config_arguments(parser, ScoreConfig)
    parser.set_defaults(func=_score_command)
