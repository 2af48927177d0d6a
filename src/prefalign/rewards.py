"""Reward sources for online training (PPO, GRPO, RLOO) and evaluation, behind one interface.

A reward source is called with the prompts, the completions (text) and the prompts' other columns, and
returns one float per completion: ``source(prompts, completions, **columns) -> list[float]``. Each column
of a prompts file other than ``prompt`` travels with its prompt: ``columns["answer"][i]`` is the
``answer`` of the row that ``completions[i]`` answers (a group's G completions each get their prompt's
values). A prompt given as messages arrives as messages; completions arrive as text. The kinds:

- a trained reward model (a `prefalign reward` output folder): the Bradley-Terry scalar head read at
  the last token of ``prompt + completion``;
- ``sentiment``: VADER's compound sentiment score of the completion, in [-1, 1] (Hutto & Gilbert 2014;
  a lexicon and rule model that runs offline, the demo's ground truth);
- ``accuracy``: 1.0 when the completion's answer equals the row's ``answer`` numerically, else 0.0. The
  completion's answer is the content of its last ``\\boxed{...}`` if it has one, else its last number; signs,
  thousands separators and decimals are read as numbers (``-5``; ``1,000`` = ``1000`` = ``1000.0``;
  ``3.50`` = ``3.5``; :func:`read_answer`). A prompts file without an ``answer`` column, or a row whose
  answer is not a number, is refused when the prompts are loaded;
- ``format``: 1.0 when ``re.search(--format-pattern, completion)`` finds a match, else 0.0 (anchor the
  pattern with ``^...$`` to require the whole completion; ``(?s)`` lets ``.`` cross lines);
- any user callable named ``module:function``; the module is imported only because the user named it.
  It is called as ``fn(prompts, completions, **columns)``, so it names the columns it reads as
  parameters, or takes ``**kwargs`` to accept every column::

      # my_rewards.py, used as --reward my_rewards:exact
      def exact(prompts, completions, answer, **kwargs):
          return [1.0 if c.strip() == str(a) else 0.0 for c, a in zip(completions, answer)]

  A function that cannot take a column the prompts file has (``def f(prompts, completions)`` given a
  file with an ``answer`` column), or that requires one the file lacks, stops the command before any
  sampling with one line naming the function and the column (:meth:`RewardSource.check_columns`).

Every source's output is checked (:func:`check_scores`): a wrong count, a non-number or a non-finite
value stops the run with a :class:`RewardError` naming the source.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence, Set
from decimal import Decimal
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
    """Base class: ``name`` for messages and metrics, and ``__call__`` returning checked scores.

    ``needs`` names the columns the source reads (each row must have them); :meth:`check_columns` and
    :meth:`check_rows` refuse data the source cannot score, before any sampling."""

    name: str = "reward"
    needs: tuple[str, ...] = ()

    def score(self, prompts: list[Any], completions: list[str], **columns: list[Any]) -> Any:
        raise NotImplementedError

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[str], **columns: Sequence[Any]
    ) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        for key, values in columns.items():
            if len(values) != len(completions):
                raise ValueError(
                    f"column {key!r} has {len(values)} values for {len(completions)} completions"
                )
        lists = {key: list(values) for key, values in columns.items()}
        return check_scores(
            self.name, self.score(list(prompts), list(completions), **lists), len(completions)
        )

    def check_columns(self, names: Collection[str], where: str) -> None:
        """Refuse data whose columns (besides the prompt and the completion) are ``names``: a column this
        source needs and ``where`` (the file, for the message) lacks.

        Raises:
            RewardError: one line naming the source, the column and ``where``.
        """
        for need in self.needs:
            if need not in names:
                raise RewardError(f'reward {self.name}: {where} has no column "{need}" (the reward reads it)')

    def check_rows(self, rows: Sequence[Mapping[str, Any]], where: str) -> None:
        """Refuse a row the source cannot score (each row's location is its ``where`` when it has one)."""


def data_columns(rows: Sequence[Mapping[str, Any]], exclude: Collection[str] = ("prompt",)) -> list[str]:
    """The columns of ``rows`` that travel with the prompts to a reward: every key of any row but those in
    ``exclude``, in order of first appearance."""
    names: dict[str, None] = {}
    for row in rows:
        names.update((key, None) for key in row if key not in exclude)
    return list(names)


def column_values(rows: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, list[Any]]:
    """``{name: [each row's value]}`` for the ``names`` (``None`` where a row lacks one)."""
    return {name: [row.get(name) for row in rows] for name in names}


def check_reward_data(
    source: RewardSource,
    rows: Sequence[Mapping[str, Any]],
    where: str,
    exclude: Collection[str] = ("prompt",),
) -> None:
    """Before any sampling or scoring: ``source`` can take every column of ``rows`` (read from ``where``),
    and finds the columns and values it needs.

    Raises:
        RewardError: one line naming the source, the column and the file (or the row).
    """
    source.check_columns(data_columns(rows, exclude), where)
    source.check_rows(rows, where)


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

    def score(self, prompts: list[Any], completions: list[str], **columns: list[Any]) -> list[float]:
        return vader_scores(completions)


# --------------------------------------------------------------------------------------------------
# verifiable rewards: accuracy against the row's answer, format against a pattern

_NUMBER = re.compile(
    r"(?<![\d.])"  # not the tail of another number
    r"(?:(?<![\w)])[-\u2212])?"  # a sign, unless the minus follows a word or a bracket (5-3, x-3)
    r"(?:\d{1,3}(?:,\d{3})+(?![\d])|\d+)(?:\.\d+)?"  # 1,000 (separators every 3 digits) or 1000; .5
)
"""A number as written in text: an optional sign, digits with or without thousands separators, decimals."""


def parse_number(text: str) -> Decimal:
    """The value of one match of :data:`_NUMBER` (separators dropped, the Unicode minus read as ``-``)."""
    return Decimal(text.replace(",", "").replace("\u2212", "-"))


def boxed_content(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (nested braces matched), or ``None``."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[begin:i]
            depth -= 1
    return text[begin:]  # never closed: what follows (the completion was cut at its length cap)


def read_answer(completion: str) -> Decimal | None:
    """The number a completion gives as its answer: the last number inside its last ``\\boxed{...}`` if it
    has one, else its last number; ``None`` when there is none.

    >>> read_answer("3 + 4 = 7, so she has 1,000.50 dollars.")
    Decimal('1000.50')
    >>> read_answer("-5 or 6? \\boxed{-5}")
    Decimal('-5')
    """
    boxed = boxed_content(completion)
    found = _NUMBER.findall(completion if boxed is None else boxed)
    return parse_number(found[-1]) if found else None


def answer_value(value: Any) -> Decimal | None:
    """A row's ``answer`` as a number: an int, a finite float, or a text that is one number (``"1,000"``,
    ``" -3.5 "``); ``None`` for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value)) if math.isfinite(value) else None
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return parse_number(value.strip())
    return None


class AccuracyReward(RewardSource):
    """1.0 when the completion's answer (:func:`read_answer`) equals the row's ``answer`` as a number."""

    name = "accuracy"
    needs = ("answer",)

    def score(self, prompts: list[Any], completions: list[str], **columns: list[Any]) -> list[float]:
        if "answer" not in columns:
            raise RewardError('reward accuracy: no "answer" column was given with the prompts')
        out = []
        for completion, answer in zip(completions, columns["answer"], strict=True):
            expected, got = answer_value(answer), read_answer(completion)
            out.append(1.0 if expected is not None and got is not None and got == expected else 0.0)
        return out

    def check_rows(self, rows: Sequence[Mapping[str, Any]], where: str) -> None:
        for i, row in enumerate(rows):
            if answer_value(row.get("answer")) is None:
                at = getattr(row, "where", None) or f"{where} row {i + 1}"
                what = (
                    "missing" if row.get("answer") is None else f"{_short_repr(row['answer'])}, not a number"
                )
                raise RewardError(f'reward accuracy: {at}: field "answer" is {what}')


class FormatReward(RewardSource):
    """1.0 when ``re.search(pattern, completion)`` finds a match (``--format-pattern``), else 0.0."""

    name = "format"

    def __init__(self, pattern: str | None) -> None:
        problem = format_pattern_problem(pattern, ["format"])
        if problem:
            raise RewardError(problem)
        self.pattern = re.compile(str(pattern))

    def score(self, prompts: list[Any], completions: list[str], **columns: list[Any]) -> list[float]:
        return [1.0 if self.pattern.search(c) else 0.0 for c in completions]


def format_pattern_problem(pattern: str | None, rewards: Sequence[str]) -> str | None:
    """What is wrong with ``--format-pattern`` for the ``--reward`` sources named, if anything."""
    if "format" not in rewards:
        return (
            None
            if pattern is None
            else "--format-pattern is only read by --reward format; give both or neither"
        )
    if pattern is None:
        return "--reward format needs --format-pattern REGEX (a Python regular expression)"
    try:
        re.compile(pattern)
    except re.error as err:
        return f"--format-pattern {pattern!r} is not a valid regular expression: {err}"
    return None


BUILTIN_REWARDS: dict[str, type[RewardSource]] = {
    "sentiment": SentimentReward,
    "accuracy": AccuracyReward,
    "format": FormatReward,
}
"""The reward sources named by a word (``--reward accuracy``); any other name is a ``module:function``."""


# --------------------------------------------------------------------------------------------------
# user callables


class CallableReward(RewardSource):
    """A user function ``fn(prompts, completions, **columns) -> list[float]`` named as ``module:function``."""

    def __init__(self, spec: str) -> None:
        self.name = spec
        self.fn = load_callable(spec)

    def check_columns(self, names: Collection[str], where: str) -> None:
        """The function accepts every column of ``where`` (by a parameter of its name or ``**kwargs``) and
        finds every column it requires (a parameter without a default after the first two)."""
        problem = column_problem(self.fn, names)
        if problem:
            raise RewardError(f"reward {self.name}: {problem} ({where})")

    def score(self, prompts: list[Any], completions: list[str], **columns: list[Any]) -> Any:
        try:
            return self.fn(prompts, completions, **columns)
        except RewardError:
            raise
        except SystemExit as err:  # would end the run with its code (often 0) and nothing saved
            code = "" if err.code is None else repr(err.code)
            raise RewardError(
                f"reward {self.name}: called sys.exit({code}) instead of returning scores"
            ) from None
        except Exception as err:  # the user's code: report it as the reward's failure, in one line
            raise RewardError(f"reward {self.name} raised {type(err).__name__}: {err}") from err


def column_problem(fn: Callable[..., Any], names: Collection[str]) -> str | None:
    """Why ``fn(prompts, completions, **columns)`` cannot be called with the columns ``names``, or ``None``
    (also ``None`` when the signature cannot be read, as for some builtins)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    kind = inspect.Parameter
    positional = [p.name for p in params if p.kind in (kind.POSITIONAL_ONLY, kind.POSITIONAL_OR_KEYWORD)]
    first = set(positional[:2])  # they take the prompts and the completions
    named = {p.name for p in params if p.kind in (kind.POSITIONAL_OR_KEYWORD, kind.KEYWORD_ONLY)} - first
    takes_all = any(p.kind is kind.VAR_KEYWORD for p in params)
    for name in names:
        if name in first:
            return (
                f"the column {name!r} has the name of the function's argument that takes the "
                + ("prompts" if name == positional[0] else "completions")
                + "; rename the column (--columns) or the argument"
            )
        if not takes_all and name not in named:
            return (
                f"the function does not accept the column {name!r}: add a parameter {name} or **kwargs "
                "(it is called as fn(prompts, completions, **columns), every column but the prompt passed)"
            )
    for p in params:
        required = p.default is kind.empty and p.kind in (kind.POSITIONAL_OR_KEYWORD, kind.KEYWORD_ONLY)
        if required and p.name not in first and p.name not in names:
            return f"the function requires a column {p.name!r} that the data does not have"
    return None


def load_callable(spec: str) -> Callable[..., Any]:
    """Import ``module:function`` (dotted attribute paths allowed after the colon)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RewardError(
            f"reward {spec!r}: expected 'sentiment', 'accuracy', 'format' or a callable as module:function "
            "(e.g. mypkg.rewards:length)"
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

    def score(self, prompts: list[Any], completions: list[str], **columns: list[Any]) -> list[float]:
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
    format_pattern: str | None = None,
) -> RewardSource:
    """The reward source a command's options name: exactly one of ``reward`` and ``reward_model``.

    Args:
        reward: ``"sentiment"``, ``"accuracy"``, ``"format"`` or ``"module:function"``.
        reward_model: a `prefalign reward` output folder (or any sequence classifier with one label).
        device: where a reward model runs.
        raw: how a reward model tokenises text prompts (as in training: chat template unless raw).
        format_pattern: the regular expression of ``format`` (``--format-pattern``).
    """
    if (reward is None) == (reward_model is None):
        raise RewardError(f"give exactly one reward source: --reward-model PATH or --reward {REWARD_CHOICES}")
    if reward_model is not None:
        return ModelReward(reward_model, device=device, raw=raw)
    if reward == "format":
        return FormatReward(format_pattern)
    builtin = BUILTIN_REWARDS.get(str(reward))
    return builtin() if builtin is not None else CallableReward(str(reward))


REWARD_CHOICES = "sentiment|accuracy|format|module:function"
"""How ``--reward`` is spelt in messages."""


class WeightedReward(RewardSource):
    """Several sources at once: the weighted sum of their scores (TRL's ``reward_funcs`` with
    ``reward_weights``). The last call's scores of each source stay in ``components`` (for metrics)."""

    def __init__(self, sources: Sequence[RewardSource], weights: Sequence[float]) -> None:
        if len(sources) != len(weights):
            raise RewardError(f"{len(weights)} reward weights for {len(sources)} reward sources")
        self.sources, self.weights = list(sources), [float(w) for w in weights]
        self.name = " + ".join(f"{w:g} * {s.name}" for s, w in zip(self.sources, self.weights, strict=True))
        self.components: dict[str, list[float]] = {}

    @property
    def needs(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(dict.fromkeys(n for s in self.sources for n in s.needs))

    def check_columns(self, names: Collection[str], where: str) -> None:
        for source in self.sources:
            source.check_columns(names, where)

    def check_rows(self, rows: Sequence[Mapping[str, Any]], where: str) -> None:
        for source in self.sources:
            source.check_rows(rows, where)

    def score(self, prompts: list[Any], completions: list[str], **columns: list[Any]) -> list[float]:
        total = [0.0] * len(completions)
        self.components = {}
        for source, weight in zip(self.sources, self.weights, strict=True):
            scores = source(prompts, completions, **columns)
            self.components[source.name] = scores
            total = [t + weight * s for t, s in zip(total, scores, strict=True)]
        return total


def make_rewards(
    rewards: Sequence[str] = (),
    reward_model: str | None = None,
    weights: Sequence[float] = (),
    device: str | torch.device | None = None,
    raw: bool = False,
    format_pattern: str | None = None,
) -> RewardSource:
    """One source from several: each of ``rewards`` (``sentiment``, ``accuracy``, ``format`` or
    ``module:function``) and the reward model if given (last), combined by ``weights`` (default: all 1).
    A single source with weight 1 is returned as it is."""
    sources = [make_reward(spec, device=device, raw=raw, format_pattern=format_pattern) for spec in rewards]
    if reward_model is not None:
        sources.append(make_reward(reward_model=reward_model, device=device, raw=raw))
    if not sources:
        raise RewardError(f"give a reward source: --reward {REWARD_CHOICES} or --reward-model PATH")
    weights = list(weights) or [1.0] * len(sources)
    if len(sources) == 1 and weights == [1.0]:
        return sources[0]
    return WeightedReward(sources, weights)
