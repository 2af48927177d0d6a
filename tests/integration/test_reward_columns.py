"""Rewards that see the data in training: a prompts file's columns travel with each prompt to the reward
(a group's samples each get their prompt's values), prompts given as messages arrive as messages, and
data a reward cannot take stops the command before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prefalign.cli import main
from prefalign.train import grpo, online

COLUMN_REWARDS = '''
def echo_answer(prompts, completions, answer, tag):
    """The row's answer as the reward, after checking that the tag column travelled with its prompt."""
    assert all(t == p.upper() for t, p in zip(tag, prompts)), (tag, prompts)
    return [float(a) for a in answer]

def is_conversation(prompts, completions, **columns):
    return [1.0 if isinstance(p, list) and p[-1]["role"] == "user" else 0.0 for p in prompts]

def strict(prompts, completions):
    return [0.0] * len(completions)
'''


@pytest.fixture
def data(tmp_path, monkeypatch, prefixes) -> Path:
    """``column_rewards.py`` (importable), ``answers.jsonl`` (prefix, answer = its index, tag = upper
    case) and ``chats.jsonl`` (each prefix as a user message)."""
    (tmp_path / "column_rewards.py").write_text(COLUMN_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = [{"prompt": p, "answer": i, "tag": p.upper()} for i, p in enumerate(prefixes)]
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    chats = [{"prompt": [{"role": "user", "content": p}]} for p in prefixes]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    return tmp_path


def run_grpo(data: Path, model: Path, prompts: str, reward: str, output: str, **overrides) -> Path:
    settings = dict(
        model=str(model), prompts=str(data / prompts), output=str(data / output), reward=[reward],
        rollout_batch=4, num_generations=2, response_length=4, iterations=2, progress=False, seed=0,
        log_completions=1,
    )  # fmt: skip
    grpo.train(grpo.GRPOConfig(**{**settings, **overrides}))
    return data / output


def test_each_sample_gets_its_own_prompts_columns(data, tiny_model_dir):
    """The reward is the row's answer: every logged sample's reward equals the answer of the prompt it
    answered (so the columns stayed aligned through grouping, sharding and sampling), and the tag column
    arrived beside it."""
    out = run_grpo(data, tiny_model_dir, "answers.jsonl", "column_rewards:echo_answer", "echo", raw=True)
    answers = {
        json.loads(line)["prompt"]: json.loads(line)["answer"] for line in (data / "answers.jsonl").open()
    }
    rows = [json.loads(line) for line in (out / "completions.jsonl").open()]
    assert len(rows) == 2 * 4 * 2  # two iterations, each 4 prompts x 2 samples
    assert {r["prompt"] for r in rows} <= set(answers)
    assert all(r["reward"] == answers[r["prompt"]] for r in rows)
    assert len({r["reward"] for r in rows}) > 1  # several prompts, several answers


def test_prompts_given_as_messages_arrive_as_messages(data, tiny_model_dir):
    out = run_grpo(
        data, tiny_model_dir, "chats.jsonl", "column_rewards:is_conversation", "chats", iterations=1
    )
    rows = [json.loads(line) for line in (out / "completions.jsonl").open()]
    assert rows and all(r["reward"] == 1.0 for r in rows)
    assert all(isinstance(r["prompt"], list) and isinstance(r["completion"], str) for r in rows)


@pytest.fixture
def nothing_loads(monkeypatch):
    """Loading the policy fails the test: the data is refused before any model loads or samples."""

    def refuse(*args, **kwargs):
        raise AssertionError("the policy was loaded")

    monkeypatch.setattr(online, "load_policy", refuse)


@pytest.mark.parametrize(
    ("command", "prompts", "reward", "message"),
    [
        ("grpo", "answers.jsonl", "column_rewards:strict",
         "reward column_rewards:strict: the function does not accept the column 'answer'"),
        ("rloo", "chats.jsonl", "column_rewards:echo_answer",
         "reward column_rewards:echo_answer: the function requires a column 'answer'"),
        ("ppo", "chats.jsonl", "accuracy", 'reward accuracy: chats.jsonl has no column "answer"'),
    ],
)  # fmt: skip
def test_data_a_reward_cannot_take_is_one_line_and_status_2_before_loading(
    data, tiny_model_dir, capsys, nothing_loads, command, prompts, reward, message
):
    args = [command, "--model", str(tiny_model_dir), "--prompts", str(data / prompts), "--output",
            str(data / f"refused-{command}"), "--reward", reward, "--iterations", "1", "--no-progress"]  # fmt: skip
    if command != "ppo":
        args += ["--rollout-batch", "2", "--num-generations", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"prefalign {command}: error: {message}"), err
    assert "\n" not in err and "Traceback" not in err
    assert not (data / f"refused-{command}" / "metrics.jsonl").exists()


def test_a_bad_format_pattern_is_refused_at_config_time(data, tiny_model_dir):
    from prefalign.config import ConfigError

    common = dict(model=str(tiny_model_dir), prompts=str(data / "answers.jsonl"), output=str(data / "fmt"))
    with pytest.raises(ConfigError, match="is not a valid regular expression"):
        grpo.GRPOConfig(**common, reward=["format"], format_pattern="(unclosed")
    with pytest.raises(ConfigError, match="needs --format-pattern"):
        grpo.GRPOConfig(**common, reward=["accuracy", "format"])
    with pytest.raises(ConfigError, match="only read by --reward format"):
        grpo.GRPOConfig(**common, reward=["accuracy"], format_pattern="x")
    assert grpo.GRPOConfig(**common, reward=["format"], format_pattern=r"\d+$").format_pattern == r"\d+$"
