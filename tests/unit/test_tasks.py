"""`prefalign tasks arithmetic`: deterministic word problems whose answers are right, as a prompts file
that the accuracy reward accepts."""

from __future__ import annotations

import json
import re

import pytest

from prefalign.cli import main
from prefalign.tasks import LEVELS, arithmetic_problems


def solve(prompt: str) -> int:
    """Work a problem out from its text alone: the first sentence's number is the start; each later
    sentence holds one number and says "more" (add), "away"/"loses"/"sells" (subtract) or "times"
    (multiply); the question ends it."""
    bare = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\? Give the final answer as a number\.", prompt)
    if bare:
        a, op, b = int(bare.group(1)), bare.group(2), int(bare.group(3))
        assert a - b >= 0 or op == "+", prompt
        return a + b if op == "+" else a - b
    sentences = [s for s in re.split(r"(?<=[.?]) ", prompt) if not s.startswith("How many")]
    (value,) = (int(x) for x in re.findall(r"\d+", sentences[0]))
    for sentence in sentences[1:-1] if sentences[-1].startswith("Give") else sentences[1:]:
        (n,) = (int(x) for x in re.findall(r"\d+", sentence))
        if "more" in sentence:
            value += n
        elif "times" in sentence:
            value *= n
        else:
            assert re.search(r"away|loses|sells", sentence), sentence
            value -= n
        assert value >= 0, prompt
    return value


@pytest.mark.parametrize("difficulty", sorted(LEVELS))
def test_every_answer_is_what_the_text_works_out_to(difficulty):
    problems = arithmetic_problems(300, seed=difficulty, difficulty=difficulty)
    for problem in problems:
        assert problem["answer"] == solve(problem["prompt"]), problem
        assert set(problem) == {"prompt", "answer"} and isinstance(problem["answer"], int)
    steps = LEVELS[difficulty][0]
    assert all(len(re.findall(r"\d+", p["prompt"])) == steps + 1 for p in problems)


def test_the_same_seed_gives_the_same_problems_and_another_seed_others():
    assert arithmetic_problems(50, seed=3) == arithmetic_problems(50, seed=3)
    assert arithmetic_problems(50, seed=3) != arithmetic_problems(50, seed=4)
    assert arithmetic_problems(10, seed=3) == arithmetic_problems(50, seed=3)[:10]
    first = arithmetic_problems(3, seed=0, difficulty=1)  # fixed: a change to the generator shows here
    assert arithmetic_problems(1, seed=0) == [
        {"prompt": "What is 13 + 14? Give the final answer as a number.", "answer": 27}
    ]
    assert first[1] == {
        "prompt": "Lena has 17 coins. She sells 7 of them. How many coins does Lena have now? Give the final "
        "answer as a number.",
        "answer": 10,
    }


def test_the_command_writes_a_prompts_file_the_accuracy_reward_accepts(tmp_path):
    from prefalign.data import load_prompts
    from prefalign.rewards import AccuracyReward, check_reward_data

    out = tmp_path / "math.jsonl"
    assert (
        main(["tasks", "arithmetic", "--n", "40", "--seed", "0", "--output", str(out), "--difficulty", "2"])
        == 0
    )
    rows = load_prompts(out)
    assert len(rows) == 40 and rows == arithmetic_problems(40, seed=0, difficulty=2)
    check_reward_data(AccuracyReward(), rows, out.name)  # the answer column is there and numeric
    assert AccuracyReward()([r["prompt"] for r in rows], [f"It is {r['answer']}." for r in rows],
                            answer=[r["answer"] for r in rows]) == [1.0] * 40  # fmt: skip
    again = tmp_path / "again.jsonl"
    assert main(["tasks", "arithmetic", "--n", "40", "--output", str(again), "--difficulty", "2"]) == 0
    assert again.read_bytes() == out.read_bytes()
    assert [json.loads(line)["answer"] for line in out.read_text().splitlines()] == [
        r["answer"] for r in rows
    ]


def test_a_difficulty_out_of_range_is_refused(tmp_path, capsys):
    assert main(["tasks", "arithmetic", "--output", str(tmp_path / "m.jsonl"), "--difficulty", "9"]) == 2
    assert "difficulty must be one of [0, 1, 2, 3, 4, 5], got 9" in capsys.readouterr().err
    assert not (tmp_path / "m.jsonl").exists()


def test_held_out_problems_can_leave_out_the_training_ones(tmp_path, capsys):
    """--exclude: the held-out file holds only problems whose prompt is not in the training file; asking
    for more new problems than the difficulty has is refused in one line."""
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    assert main(["tasks", "arithmetic", "--n", "300", "--seed", "0", "--output", str(train)]) == 0
    assert (
        main(
            [
                "tasks",
                "arithmetic",
                "--n",
                "100",
                "--seed",
                "1",
                "--exclude",
                str(train),
                "--output",
                str(held),
            ]
        )
        == 0
    )
    seen = {json.loads(line)["prompt"] for line in train.read_text().splitlines()}
    rows = [json.loads(line) for line in held.read_text().splitlines()]
    assert len(rows) == 100 and not seen & {r["prompt"] for r in rows}
    assert all(r["answer"] == solve(r["prompt"]) for r in rows)
    every = tmp_path / "every.jsonl"  # 5,000 draws cover nearly all of difficulty 0's 610 problems
    assert main(["tasks", "arithmetic", "--n", "5000", "--output", str(every)]) == 0
    code = main(
        ["tasks", "arithmetic", "--n", "100", "--exclude", str(every), "--output", str(tmp_path / "x.jsonl")]
    )
    assert code == 2 and "found only" in capsys.readouterr().err
