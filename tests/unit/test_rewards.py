"""Reward sources: VADER, user callables and reward models behind one checked interface."""

from __future__ import annotations

import math

import pytest
import torch

from prefalign.rewards import (
    CallableReward,
    ModelReward,
    RewardError,
    SentimentReward,
    check_scores,
    make_reward,
    vader_scores,
)

USER_MODULE = """
def share_of_a(prompts, completions):
    return [c.count("a") / max(1, len(c)) for c in completions]

def too_few(prompts, completions):
    return [1.0]

def not_numbers(prompts, completions):
    return ["high"] * len(completions)

def nan(prompts, completions):
    return [float("nan")] * len(completions)

def crash(prompts, completions):
    raise KeyError("score")

def as_dict(prompts, completions):
    return {i: 0.5 for i in range(len(completions))}

def huge(prompts, completions):
    return [10**400] * len(completions)

def quits(prompts, completions):
    import sys
    sys.exit(3)

def quits_quietly(prompts, completions):
    import sys
    sys.exit()

def text(prompts, completions):
    return "high!"

def infinite(prompts, completions):
    return [1.0, float("-inf")]

def a_set(prompts, completions):
    return {1.0, 2.0}

value = 3
"""


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    (tmp_path / "userrewards.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "userrewards"


def test_sentiment_is_vaders_compound_score_of_the_completion():
    """VADER's compound score: positive words push it toward +1, negative toward -1; the prompt is
    ignored and an empty completion scores 0."""
    source = make_reward(reward="sentiment")
    assert isinstance(source, SentimentReward)
    good, bad, empty = source(["x", "y", "z"], ["a wonderful, moving film", "dull and awful", " "])
    assert good > 0.5 and bad < -0.5 and empty == 0.0
    assert vader_scores(["a wonderful, moving film"]) == [good]


def test_callable_reward_is_imported_by_name_and_called(user_rewards):
    source = make_reward(reward=f"{user_rewards}:share_of_a")
    assert isinstance(source, CallableReward)
    assert source(["p", "p"], ["aaaa", "abab"]) == [1.0, 0.5]


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("too_few", "returned 1 scores for 2 completions"),
        ("not_numbers", "score 0 is 'high', not a number"),
        ("nan", "score 0 is nan, not finite"),
        ("crash", "raised KeyError"),
        ("as_dict", "returned a dict, expected a list of 2 numbers"),
        ("a_set", "returned a set, expected a list of 2 numbers"),
        ("text", "returned a str, expected a list of 2 numbers"),
        ("huge", "score 0 is an integer of 401 digits, too large for a float"),
        ("quits", r"called sys.exit\(3\)"),
        ("quits_quietly", r"called sys.exit\(\)"),
        ("infinite", "score 1 is -inf, not finite"),
    ],
)
def test_a_broken_callable_names_itself_and_the_fault(user_rewards, function, message):
    source = make_reward(reward=f"{user_rewards}:{function}")
    with pytest.raises(RewardError, match=message) as info:
        source(["p", "q"], ["a", "b"])
    assert f"{user_rewards}:{function}" in str(info.value)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "expected 'sentiment', 'accuracy', 'format' or a callable"),
        ("no_such_module_xyz:f", "cannot import module"),
        ("userrewards:missing", "has no attribute"),
        ("userrewards:value", "is not callable"),
    ],
)
def test_bad_callable_specs_fail_before_any_training(user_rewards, spec, message):
    with pytest.raises(RewardError, match=message):
        make_reward(reward=spec)


def test_exactly_one_source():
    with pytest.raises(RewardError, match="exactly one"):
        make_reward()
    with pytest.raises(RewardError, match="exactly one"):
        make_reward(reward="sentiment", reward_model="runs/rm")


def test_check_scores_accepts_tensors_and_ints_and_rejects_bools():
    assert check_scores("t", torch.tensor([1.0, 2.0]), 2) == [1.0, 2.0]
    assert check_scores("t", (1, 2), 2) == [1.0, 2.0]
    assert check_scores("t", torch.tensor([[1.0], [2.0]]).numpy(), 2) == [1.0, 2.0]  # flattened like a tensor
    assert check_scores("t", (float(len(c)) for c in ("a", "bb")), 2) == [1.0, 2.0]  # a generator is ordered
    with pytest.raises(RewardError, match="not a number"):
        check_scores("t", [True], 1)
    with pytest.raises(RewardError, match="not finite"):
        check_scores("t", [math.inf], 1)


def test_model_reward_scores_the_last_token_of_prompt_plus_completion(tiny_model_dir, tokenizer):
    """A sequence classifier saved as a folder scores text pairs through the training tokenisation; the
    score equals the head read at the last token of a single unpadded forward (batching and right
    padding change nothing)."""
    from prefalign.data import encode_completion, encode_prompt
    from prefalign.models import load_reward_model, sequence_scores

    model = load_reward_model(str(tiny_model_dir))
    model.save_pretrained(tiny_model_dir.parent / "rm")
    tokenizer.save_pretrained(tiny_model_dir.parent / "rm")
    source = ModelReward(str(tiny_model_dir.parent / "rm"), raw=True, batch_size=2)
    prompts = ["The movie", "It was", "A long prefix of a review that"]
    completions = [" was fine.", " bad", " goes on and on"]
    got = source(prompts, completions)
    for p, c, score in zip(prompts, completions, got, strict=True):
        ids = torch.tensor([encode_prompt(tokenizer, p, raw=True) + encode_completion(tokenizer, p, c)])
        with torch.no_grad():
            expected = sequence_scores(source.model, ids, torch.ones_like(ids))
        assert score == pytest.approx(float(expected[0]), abs=1e-5)


def test_a_model_without_a_trained_head_is_refused_but_a_saved_reward_model_loads(tiny_model_dir, tmp_path):
    """Only a checkpoint that holds the scalar head is a reward model: the causal LM it was made from is
    refused (its head would be random), the same model saved as a sequence classifier is accepted."""
    from prefalign.models import ModelError, load_reward_model, load_tokenizer

    with pytest.raises(ModelError, match="no trained reward head"):
        ModelReward(str(tiny_model_dir))
    load_reward_model(str(tiny_model_dir))  # training one from a causal LM still starts a new head
    rm = tmp_path / "rm"
    load_reward_model(str(tiny_model_dir)).save_pretrained(rm)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(rm)
    assert len(ModelReward(str(rm))(["a"], ["b"])) == 1


def test_a_headless_checkpoint_is_refused_after_loading_when_its_files_cannot_be_read_first(
    tiny_model_dir, monkeypatch
):
    """A hub id's files are not read before loading: then transformers' loading info (the head among the
    missing keys) is what refuses it."""
    from prefalign.models import ModelError, load_reward_model

    monkeypatch.setattr("prefalign.models.loading._checkpoint_shapes", lambda path: None)
    with pytest.raises(ModelError, match="no trained reward head.*score.weight"):
        load_reward_model(str(tiny_model_dir), trained_head=True)
