"""Tokenisation with the offline ChatML tokenizer: one prompt encoding shared by chosen and rejected,
exactly one ``<|im_end|>`` per completion, round trips to the template rendering, the truncation rule."""

from __future__ import annotations

import copy
import logging

import pytest

from prefalign.data import (
    IGNORE_INDEX,
    DataError,
    encode_completion,
    encode_preference,
    encode_preferences,
    encode_prompt,
    encode_sft,
    end_of_turn_id,
    load_preferences,
    load_sft,
    truncate_pair,
)


@pytest.fixture(scope="module")
def plain_tokenizer():
    """The tiny tokenizer without a chat template (a base model's tokenizer)."""
    from prefalign.testing import tiny_tokenizer

    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = None
    return tok


def test_end_of_turn_is_im_end_for_chatml(tokenizer):
    assert (
        end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>") == tokenizer.eos_token_id
    )


def test_end_of_turn_follows_the_template_not_the_eos(tokenizer):
    """A template that closes assistant turns with <|endoftext|> (id 0 here), while EOS is <|im_end|>."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|endoftext|>' }}{% endfor %}"
    )
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|endoftext|>") == 0
    assert encode_completion(tok, "Hi", "Yes.")[-1] == 0


def test_text_prompt_goes_through_the_template_as_one_user_message(tokenizer):
    ids = encode_prompt(tokenizer, "Was the movie good?")
    assert tokenizer.decode(ids) == "<|im_start|>user\nWas the movie good?<|im_end|>\n<|im_start|>assistant\n"


def test_raw_prompt_and_tokenizer_without_template_skip_it(tokenizer, plain_tokenizer):
    text = "Was the movie good?"
    assert tokenizer.decode(encode_prompt(tokenizer, text, raw=True)) == text
    assert tokenizer.decode(encode_prompt(plain_tokenizer, text)) == text


def test_message_prompt_needs_a_template(plain_tokenizer):
    with pytest.raises(DataError, match="conversational prompt, but the tokenizer has no chat template"):
        encode_prompt(plain_tokenizer, [{"role": "user", "content": "hi"}])


def test_standard_pair_round_trips_to_the_template_rendering(tokenizer, assets):
    """decode(prompt + chosen) is the template's [user, assistant] rendering minus its final newline."""
    example = load_preferences(assets / "pairs.jsonl")[2]
    out = encode_preference(tokenizer, example, max_length=256)
    assert out["prompt_input_ids"] == encode_prompt(tokenizer, example["prompt"])
    assert tokenizer.decode(out["prompt_input_ids"] + out["chosen_input_ids"]) == (
        "<|im_start|>user\nWas the movie good?<|im_end|>\n"
        "<|im_start|>assistant\nYes, a brilliant film worth seeing.<|im_end|>"
    )
    assert (
        tokenizer.decode(out["rejected_input_ids"])
        == "No, it is forgettable and awful and lifeless.<|im_end|>"
    )
    assert out["truncated"] is False


@pytest.mark.parametrize("index", [0, 1, 2])
def test_conversational_pair_round_trips_to_the_template_rendering(tokenizer, assets, index):
    example = load_preferences(assets / "pairs_chat.jsonl")[index]
    out = encode_preference(tokenizer, example, max_length=256)
    for side in ("chosen", "rejected"):
        rendered = tokenizer.apply_chat_template(example["prompt"] + example[side], tokenize=False)
        assert rendered.endswith("<|im_end|>\n")
        assert tokenizer.decode(out["prompt_input_ids"] + out[f"{side}_input_ids"]) == rendered[: -len("\n")]


def test_multi_turn_implicit_prompt_completion_is_only_the_last_answer(tokenizer, assets):
    out = encode_preference(tokenizer, load_preferences(assets / "pairs_chat.jsonl")[2], max_length=256)
    assert tokenizer.decode(out["chosen_input_ids"]) == "It is wonderful and moving.<|im_end|>"
    assert tokenizer.decode(out["prompt_input_ids"]).endswith("The movie.<|im_end|>\n<|im_start|>assistant\n")


def test_multi_message_completion_keeps_inner_turn_ends(tokenizer):
    """Two assistant messages: the inner <|im_end|>\\n<|im_start|>assistant\\n stays, one EOS ends it."""
    prompt = [{"role": "user", "content": "Hi"}]
    completion = [{"role": "assistant", "content": "One."}, {"role": "assistant", "content": "Two."}]
    ids = encode_completion(tokenizer, prompt, completion)
    assert tokenizer.decode(ids) == "One.<|im_end|>\n<|im_start|>assistant\nTwo.<|im_end|>"


@pytest.mark.parametrize("chosen", ["Yes.", "Yes.<|im_end|>", "Yes.<|im_end|><|im_end|>"])
def test_exactly_one_eos_ends_each_completion(tokenizer, chosen):
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for prompt, completion in [
        ("Hi", chosen),
        ([{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": chosen}]),
    ]:
        ids = encode_completion(tokenizer, prompt, completion)
        assert ids[-1] == eos and ids[-2] != eos, tokenizer.decode(ids)
        assert tokenizer.decode(ids) == "Yes.<|im_end|>"


def test_without_template_completion_ends_with_the_tokenizers_eos(plain_tokenizer):
    out = encode_preference(
        plain_tokenizer, {"prompt": "Review:", "chosen": " Good.", "rejected": " Bad."}, 64
    )
    assert (
        plain_tokenizer.decode(out["prompt_input_ids"] + out["chosen_input_ids"]) == "Review: Good.<|im_end|>"
    )


def test_truncation_rule_cuts_prompt_from_the_left_then_completions_from_the_right():
    """10 + max(8, 3) = 18 > 12: the prompt keeps its last 6 tokens (5..10), leaving 12 - 6 = 6 for each
    completion: chosen loses its last 2 tokens, rejected (3 tokens) fits untouched."""
    prompt, chosen, rejected = list(range(1, 11)), list(range(20, 28)), [30, 31, 32]
    assert truncate_pair(prompt, chosen, rejected, max_length=12, max_prompt_length=6) == (
        [5, 6, 7, 8, 9, 10],
        [20, 21, 22, 23, 24, 25],
        [30, 31, 32],
        True,
    )


def test_truncation_keeps_a_short_prompt_whole():
    """4 + 10 = 14 > 12; the prompt (4 <= 6) stays, completions get 12 - 4 = 8 tokens."""
    out = truncate_pair([1, 2, 3, 4], list(range(10, 20)), [7], max_length=12, max_prompt_length=6)
    assert out == ([1, 2, 3, 4], list(range(10, 18)), [7], True)


def test_no_truncation_at_exactly_max_length():
    out = truncate_pair([1, 2], [3, 4, 5], [6], max_length=5, max_prompt_length=2)
    assert out == ([1, 2], [3, 4, 5], [6], False)


def test_encode_preference_truncates_and_counts(tokenizer, assets, caplog):
    examples = load_preferences(assets / "pairs.jsonl")
    full = [encode_preference(tokenizer, ex, max_length=1000) for ex in examples]
    longest = max(len(f["prompt_input_ids"]) + len(f["chosen_input_ids"]) for f in full)
    with caplog.at_level(logging.WARNING, logger="prefalign.data"):
        cut = encode_preferences(tokenizer, examples, max_length=longest - 1, max_prompt_length=8)
    n_cut = sum(
        len(f["prompt_input_ids"]) + max(len(f["chosen_input_ids"]), len(f["rejected_input_ids"]))
        > longest - 1
        for f in full
    )
    assert n_cut >= 1 and [c["truncated"] for c in cut].count(True) == n_cut
    assert f"truncated {n_cut} of 4 examples to max_length={longest - 1}" in caplog.text
    for before, after in zip(full, cut, strict=True):
        for side in ("chosen_input_ids", "rejected_input_ids"):
            assert len(after["prompt_input_ids"]) + len(after[side]) <= longest - 1
        if after["truncated"]:
            assert after["prompt_input_ids"] == before["prompt_input_ids"][-8:]


def test_max_prompt_length_must_leave_room_for_the_completion(tokenizer):
    with pytest.raises(ValueError, match="need 0 < max_prompt_length < max_length, got 32 and 32"):
        encode_preference(
            tokenizer, {"prompt": "P", "chosen": "C", "rejected": "R"}, 32, max_prompt_length=32
        )


def test_sft_prompt_completion_labels_only_the_completion(tokenizer, assets):
    example = load_sft(assets / "sft.jsonl")[1]
    out = encode_sft(tokenizer, example, max_length=256)
    n_prompt = len(encode_prompt(tokenizer, example["prompt"]))
    assert out["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert out["labels"][n_prompt:] == out["input_ids"][n_prompt:]
    assert tokenizer.decode(out["input_ids"][n_prompt:]) == "It is delightful and gripping.<|im_end|>"


def test_sft_messages_train_on_the_last_assistant_turn_only(tokenizer, assets):
    example = load_sft(assets / "sft_chat.jsonl")[1]
    out = encode_sft(tokenizer, example, max_length=256)
    trained = [t for t, lab in zip(out["input_ids"], out["labels"], strict=True) if lab != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "It is wonderful and moving.<|im_end|>"
    rendered = tokenizer.apply_chat_template(example["messages"], tokenize=False)
    assert tokenizer.decode(out["input_ids"]) == rendered[: -len("\n")]


def test_sft_text_trains_on_every_token_and_is_cut_from_the_right(tokenizer, assets):
    example = load_sft(assets / "sft.jsonl")[2]
    out = encode_sft(tokenizer, example, max_length=256)
    assert out["labels"] == out["input_ids"]
    assert tokenizer.decode(out["input_ids"]) == "The movie was wonderful and moving.<|im_end|>"
    short = encode_sft(tokenizer, example, max_length=3)
    assert short["input_ids"] == out["input_ids"][:3] and short["truncated"] is True


def test_raw_pair_and_sft_prompts_skip_the_template(tokenizer):
    """With raw=True a text prompt is the text's own ids (plain continuation, as the demo's movie-review
    prefixes), the same ids encode_prompt(raw=True) gives generation; without it, the template's."""
    row = {"prompt": "The film opens with", "chosen": " a bang.", "rejected": " a whimper."}
    plain = encode_prompt(tokenizer, row["prompt"], raw=True)
    templated = encode_prompt(tokenizer, row["prompt"])
    assert plain != templated
    assert encode_preference(tokenizer, row, 64, raw=True)["prompt_input_ids"] == plain
    assert encode_preference(tokenizer, row, 64)["prompt_input_ids"] == templated
    sft = encode_sft(tokenizer, {"prompt": row["prompt"], "completion": row["chosen"]}, 64, raw=True)
    assert sft["input_ids"][: len(plain)] == plain
    assert sft["labels"][: len(plain)] == [-100] * len(plain)
