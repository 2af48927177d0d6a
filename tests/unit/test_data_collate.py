"""Collation pads to the batch's longest row, chosen rows first; packing restarts positions per
sequence and gives the same logits as running each sequence alone; index batches are deterministic."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prefalign.data import (
    IGNORE_INDEX,
    PreferenceCollator,
    batches,
    collate_preferences,
    collate_sft,
    encode_preference,
    load_preferences,
    pack_sequences,
)

X = IGNORE_INDEX


def test_collate_preferences_by_hand():
    """Rows: [p1+c1, p2+c2, p1+r1, p2+r2] = lengths 5, 2, 3, 3, so T = 5 (pad id 0)."""
    features = [
        {"prompt_input_ids": [5, 6], "chosen_input_ids": [7, 8, 9], "rejected_input_ids": [10]},
        {"prompt_input_ids": [11], "chosen_input_ids": [12], "rejected_input_ids": [13, 14]},
    ]
    batch = collate_preferences(features, pad_token_id=0)
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, 8, 9],
        [11, 12, 0, 0, 0],
        [5, 6, 10, 0, 0],
        [11, 13, 14, 0, 0],
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
    ]
    assert batch["labels"].tolist() == [
        [X, X, 7, 8, 9],
        [X, 12, X, X, X],
        [X, X, 10, X, X],
        [X, 13, 14, X, X],
    ]
    assert all(t.dtype == torch.long for t in batch.values())


def test_padding_equal_to_eos_is_still_masked():
    """Pad id 2 is also a real token (EOS) here: the mask and labels come from lengths, not from ids."""
    features = [{"prompt_input_ids": [1], "chosen_input_ids": [2], "rejected_input_ids": [3, 2]}]
    batch = PreferenceCollator(pad_token_id=2)(features)
    assert batch["input_ids"].tolist() == [[1, 2, 2], [1, 3, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch["labels"].tolist() == [[X, 2, X], [X, 3, 2]]


ids = st.lists(st.integers(1, 50), min_size=1, max_size=12)
pair = st.fixed_dictionaries({"prompt_input_ids": ids, "chosen_input_ids": ids, "rejected_input_ids": ids})


@settings(max_examples=60, deadline=None)
@given(st.lists(pair, min_size=1, max_size=5))
def test_padding_never_exceeds_the_longest_row(features):
    batch = collate_preferences(features, pad_token_id=0)
    rows = [
        f["prompt_input_ids"] + f[side]
        for side in ("chosen_input_ids", "rejected_input_ids")
        for f in features
    ]
    assert batch["input_ids"].shape == (2 * len(features), max(len(r) for r in rows))
    for i, row in enumerate(rows):
        n_prompt = len(features[i % len(features)]["prompt_input_ids"])
        assert batch["input_ids"][i, : len(row)].tolist() == row
        assert batch["attention_mask"][i].tolist() == [1] * len(row) + [0] * (
            batch["input_ids"].shape[1] - len(row)
        )
        assert batch["labels"][i, :n_prompt].eq(X).all() and batch["labels"][i, len(row) :].eq(X).all()
        assert batch["labels"][i, n_prompt : len(row)].tolist() == row[n_prompt:]


def test_collated_prompts_are_identical_for_chosen_and_rejected(tokenizer, assets):
    examples = load_preferences(assets / "pairs.jsonl") + load_preferences(assets / "pairs_chat.jsonl")
    features = [encode_preference(tokenizer, ex, max_length=256) for ex in examples]
    batch = collate_preferences(features, tokenizer.pad_token_id)
    b = len(features)
    for i, f in enumerate(features):
        n = len(f["prompt_input_ids"])
        assert torch.equal(batch["input_ids"][i, :n], batch["input_ids"][b + i, :n])
        assert batch["labels"][i, :n].eq(X).all() and batch["labels"][b + i, :n].eq(X).all()


def test_collate_sft_by_hand():
    features = [{"input_ids": [4, 5, 6], "labels": [X, 5, 6]}, {"input_ids": [7], "labels": [7]}]
    batch = collate_sft(features, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[4, 5, 6], [7, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[X, 5, 6], [7, X, X]]


def test_pack_sequences_by_hand():
    out = pack_sequences([[4, 5, 6], [7, 8]], [[X, 5, 6], [7, 8]])
    assert out["input_ids"].tolist() == [[4, 5, 6, 7, 8]]
    assert out["labels"].tolist() == [[X, 5, 6, X, 8]]  # 7 would be "predicted" by 6 across the boundary
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert out["seq_lens"] == [3, 2]


def test_packed_forward_equals_separate_forwards(tiny_model):
    """Restarting position ids make transformers mask attention per sequence (no attention mask, no cache)."""
    a, b = [5, 6, 7, 8], [9, 10, 11]
    packed = pack_sequences([a, b], [a, b])
    with torch.no_grad():
        joint = tiny_model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False
        ).logits
        alone_a = tiny_model(input_ids=torch.tensor([a])).logits
        alone_b = tiny_model(input_ids=torch.tensor([b])).logits
    torch.testing.assert_close(joint[0, :4], alone_a[0])
    torch.testing.assert_close(joint[0, 4:], alone_b[0])


def test_batches_are_deterministic_and_cover_every_index_once():
    first = batches(10, 3, seed=7, epoch=0)
    assert first == batches(10, 3, seed=7, epoch=0)
    assert first != batches(10, 3, seed=7, epoch=1)
    assert [len(b) for b in first] == [3, 3, 3, 1]
    assert sorted(i for b in first for i in b) == list(range(10))


def test_batches_in_order_and_drop_last():
    assert batches(7, 3, seed=0, epoch=0, shuffle=False) == [[0, 1, 2], [3, 4, 5], [6]]
    assert batches(7, 3, seed=0, epoch=0, shuffle=False, drop_last=True) == [[0, 1, 2], [3, 4, 5]]
