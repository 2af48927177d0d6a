"""The data layer against the real SmolLM2-135M-Instruct tokenizer and chat template (which adds a
default system message): shared prompt ids, exactly one <|im_end|> per completion, and both data forms
decode to exactly what the chat template renders."""

from __future__ import annotations

import pytest

from prefalign.data import (
    IGNORE_INDEX,
    encode_preference,
    encode_prompt,
    encode_sft,
    end_of_turn_id,
    load_preferences,
    load_sft,
)


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoTokenizer

    from prefalign.models import fetch_builtin

    return AutoTokenizer.from_pretrained(fetch_builtin("smollm2"))


def as_messages(example: dict, side: str) -> list[dict]:
    """The whole conversation a pair stands for, in message form."""
    if isinstance(example["prompt"], str):
        return [
            {"role": "user", "content": example["prompt"]},
            {"role": "assistant", "content": example[side]},
        ]
    return example["prompt"] + example[side]


def test_end_of_turn_is_im_end(smol):
    assert smol.convert_ids_to_tokens(end_of_turn_id(smol)) == "<|im_end|>"


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs_chat.jsonl"])
def test_pairs_round_trip_with_one_eos_and_shared_prompt(smol, assets, name):
    eot = end_of_turn_id(smol)
    examples = load_preferences(assets / name)
    features = [encode_preference(smol, ex, max_length=1024) for ex in examples]
    for ex, f in zip(examples, features, strict=True):
        assert f["prompt_input_ids"] == encode_prompt(smol, ex["prompt"])
        for side in ("chosen", "rejected"):
            ids = f[f"{side}_input_ids"]
            assert ids[-1] == eot and ids[-2] != eot
            rendered = smol.apply_chat_template(as_messages(ex, side), tokenize=False)
            assert rendered.endswith("<|im_end|>\n")
            assert smol.decode(f["prompt_input_ids"] + ids) == rendered[: -len("\n")]
            # Token level too: tokenising prompt and completion apart gives the whole rendering's ids.
            whole = smol(rendered[: -len("\n")], add_special_tokens=False)["input_ids"]
            assert f["prompt_input_ids"] + ids == list(whole)


def test_prompt_carries_the_default_system_message_and_generation_header(smol):
    text = smol.decode(encode_prompt(smol, "Write a haiku about autumn."))
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nWrite a haiku about autumn.<|im_end|>\n<|im_start|>assistant\n")


def test_sft_messages_round_trip_and_label_the_last_answer(smol, assets):
    for example in load_sft(assets / "sft_chat.jsonl"):
        out = encode_sft(smol, example, max_length=1024)
        rendered = smol.apply_chat_template(example["messages"], tokenize=False)
        assert smol.decode(out["input_ids"]) == rendered[: -len("\n")]
        trained = [t for t, lab in zip(out["input_ids"], out["labels"], strict=True) if lab != IGNORE_INDEX]
        assert smol.decode(trained) == example["messages"][-1]["content"] + "<|im_end|>"
