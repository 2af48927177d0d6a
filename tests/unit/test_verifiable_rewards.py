"""Rewards that see the data: the number a completion answers with, the accuracy and format sources, and
the columns of a prompts file passed to a user function (checked against its signature first)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from prefalign.data import located
from prefalign.rewards import (
    AccuracyReward,
    CallableReward,
    FormatReward,
    RewardError,
    WeightedReward,
    answer_value,
    boxed_content,
    check_reward_data,
    column_problem,
    make_rewards,
    read_answer,
)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        # the last number of the text wins: 3, 4, then 7
        ("3 + 4 = 7", "7"),
        # a minus after a space is a sign; after a digit it is subtraction: 5 - 3 reads 5, 3, then 2
        ("I owe -5 dollars", "-5"),
        ("5-3=2", "2"),
        ("from 3-5", "5"),
        # thousands separators come in groups of three: 1,000 is one thousand; 1,2 is the numbers 1 and 2
        ("She has 1,000 apples.", "1000"),
        ("pick 1,2", "2"),
        ("total 12,345,678.5 units", "12345678.5"),
        # a full stop ending the sentence is not a decimal point; 3.50 keeps its digits (equal to 3.5)
        ("The answer is 42.", "42"),
        ("It costs 3.50", "3.50"),
        # a final \boxed{} decides even when numbers follow it; its last number is the answer
        (r"so \boxed{12} (I checked 13 twice)", "12"),
        (r"\boxed{1} then \boxed{-8}", "-8"),
        (r"\boxed{x = 1,000}", "1000"),
        # the Unicode minus sign reads as a minus
        ("\u22124", "-4"),
        ("no digits here", None),
        (r"\boxed{none}", None),
    ],
)
def test_the_number_a_completion_answers_with(completion, expected):
    assert read_answer(completion) == (None if expected is None else Decimal(expected))


def test_boxed_content_matches_nested_braces_and_takes_the_last_box():
    assert boxed_content(r"\boxed{\frac{1}{2}} and \boxed{{3}}") == "{3}"
    assert boxed_content(r"a \boxed{\frac{1}{2}} b") == r"\frac{1}{2}"
    assert boxed_content(r"cut off \boxed{12") == "12"
    assert boxed_content("nothing boxed") is None


def test_answers_read_as_numbers():
    """1,000 = 1000 = 1000.0 and 3.50 = 3.5 as numbers; a bool, NaN, a word or two numbers are not answers."""
    assert answer_value("1,000") == answer_value(1000) == answer_value(1000.0) == Decimal(1000)
    assert answer_value(" 3.50 ") == answer_value(3.5) == Decimal("3.5")
    assert answer_value("-5") == Decimal(-5)
    for bad in (True, float("nan"), "five", "1 2", None, [1]):
        assert answer_value(bad) is None


def test_accuracy_compares_the_answer_numerically():
    """Each completion against its own row's answer: 1,000 = 1000.0; 3.5 = "3.50"; -5 != 5; no number 0."""
    source = AccuracyReward()
    completions = ["It is 1,000.", r"\boxed{3.5}", "-5", "I don't know", "7 then 8"]
    answers = [1000.0, "3.50", 5, 2, 7]
    assert source(["p"] * 5, completions, answer=answers) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_accuracy_refuses_data_without_answers_naming_the_file_and_row():
    source = AccuracyReward()
    with pytest.raises(RewardError, match='reward accuracy: math.jsonl has no column "answer"'):
        check_reward_data(source, [located({"prompt": "p"}, "math.jsonl:1")], "math.jsonl")
    rows = [
        located({"prompt": "p", "answer": 3}, "math.jsonl:1"),
        located({"prompt": "q", "answer": "x"}, "math.jsonl:2"),
    ]
    with pytest.raises(RewardError, match=r"math.jsonl:2: field \"answer\" is 'x', not a number"):
        check_reward_data(source, rows, "math.jsonl")
    rows[1]["answer"] = None
    with pytest.raises(RewardError, match=r"math.jsonl:2: field \"answer\" is missing"):
        check_reward_data(source, rows, "math.jsonl")


def test_format_scores_a_search_of_the_pattern():
    source = FormatReward(r"^<think>.*</think>\s*<answer>\d+</answer>$")
    assert source(
        ["p"] * 3,
        ["<think>a</think> <answer>4</answer>", "<answer>4</answer>", "<think></think><answer>x</answer>"],
    ) == [1.0, 0.0, 0.0]
    with pytest.raises(RewardError, match="not a valid regular expression"):
        FormatReward("(")
    with pytest.raises(RewardError, match="needs --format-pattern"):
        FormatReward(None)


def test_several_sources_combine_and_keep_each_score():
    """accuracy + 0.5 x format: a right, well-formed answer scores 1.5, a right bare one 1, a wrong one 0."""
    source = make_rewards(["accuracy", "format"], weights=[1.0, 0.5], format_pattern=r"\\boxed")
    assert isinstance(source, WeightedReward) and source.needs == ("answer",)
    scores = source(["p"] * 3, [r"\boxed{4}", "4", "5"], answer=[4, 4, 4])
    assert scores == [1.5, 1.0, 0.0]
    assert source.components == {"accuracy": [1.0, 1.0, 0.0], "format": [1.0, 0.0, 0.0]}


def strict(prompts, completions):
    return [0.0] * len(completions)


def reads_answer(prompts, completions, answer):
    return [float(a) for a in answer]


def takes_all(prompts, completions, **columns):
    return [float(len(columns))] * len(completions)


def keyword_only(p, c, *, answer=None, tag):
    return [0.0] * len(c)


@pytest.mark.parametrize(
    ("fn", "columns", "problem"),
    [
        (strict, [], None),
        (strict, ["answer"], "the function does not accept the column 'answer'"),
        (reads_answer, ["answer"], None),
        (reads_answer, ["answer", "id"], "does not accept the column 'id'"),
        (reads_answer, [], "requires a column 'answer'"),
        (takes_all, ["answer", "id", "my column"], None),
        (keyword_only, ["tag"], None),
        (keyword_only, ["answer"], "requires a column 'tag'"),
        (keyword_only, ["c", "tag"], "has the name of the function's argument that takes the completions"),
    ],
)
def test_a_functions_signature_is_checked_against_the_columns(fn, columns, problem):
    got = column_problem(fn, columns)
    assert got is None if problem is None else problem in got


def test_a_callable_gets_every_column_aligned_with_the_completions(monkeypatch):
    """fn(prompts, completions, **columns): each column a list as long as the completions, in their order."""
    import sys
    import types

    module = types.ModuleType("colrewards")
    module.reads_answer, module.strict = reads_answer, strict
    monkeypatch.setitem(sys.modules, "colrewards", module)
    source = CallableReward("colrewards:reads_answer")
    assert source(["a", "a", "b", "b"], ["x", "y", "z", "w"], answer=[1, 1, 2, 2]) == [1.0, 1.0, 2.0, 2.0]
    rows = [located({"prompt": "a", "answer": 1}, "q.jsonl:1")]
    check_reward_data(source, rows, "q.jsonl")  # accepted
    with pytest.raises(RewardError) as info:
        check_reward_data(CallableReward("colrewards:strict"), rows, "q.jsonl")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("reward colrewards:strict: the function does not accept the column 'answer'")
    assert message.endswith("(q.jsonl)")
