"""Prefix-shared packing must give exactly the log-probs of running each completion on its own."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prefalign.losses import sequence_logps
from prefalign.packing import pack_completions, pack_pairs, packed_logps, packed_scores, pair_tokens
from prefalign.testing import tiny_causal_lm, tiny_tokenizer

TOK = tiny_tokenizer()
MODEL = tiny_causal_lm(tokenizer=TOK, hidden_size=64, seed=1)


def separate_logps(model, examples, average=False):
    """Each (prompt + completion) run alone, prompt labels masked: the naive reference."""
    out = []
    for ex in examples:
        for completion in (ex["chosen_input_ids"], ex["rejected_input_ids"]):
            ids = torch.tensor([ex["prompt_input_ids"] + completion])
            labels = ids.clone()
            labels[0, : len(ex["prompt_input_ids"])] = -100
            out.append(sequence_logps(model(ids).logits, labels, average=average))
    return torch.cat(out)


def test_pack_pairs_layout_hand_example():
    """Pair (p=[5, 6], c=[7, 2], r=[8, 9, 2]): row 5 6 7 2 8 9 2, positions 0 1 2 3 2 3 4.
    Chosen targets 7, 2 are predicted at positions 1 (last prompt token) and 2; rejected targets 8, 9, 2 at
    1, 4, 5. The rejected token at row index 4 sees indices 0, 1, 4 only."""
    pair = {"prompt_input_ids": [5, 6], "chosen_input_ids": [7, 2], "rejected_input_ids": [8, 9, 2]}
    packed = pack_pairs([pair])
    assert packed.input_ids.tolist() == [[5, 6, 7, 2, 8, 9, 2]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4]]
    assert packed.keep.tolist() == [1, 2, 1, 4, 5]
    assert packed.targets.tolist() == [7, 2, 8, 9, 2]
    assert packed.segment.tolist() == [0, 0, 1, 1, 1]
    assert packed.lengths.tolist() == [2, 3]
    assert packed.layout.mask[0, 0, 4].nonzero().flatten().tolist() == [0, 1, 4]
    assert packed.layout.mask[0, 0, 3].nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert pair_tokens(pair) == 7


def test_pairs_become_padded_blocks():
    """Pairs of 3 and 5 tokens: blocks of width 5; the first block's two padding slots point at its first
    token and are never attended to; packed token 3 (the second pair's prompt) sits at slot 1 * 5 + 0."""
    packed = pack_pairs(
        [
            {"prompt_input_ids": [5], "chosen_input_ids": [6], "rejected_input_ids": [7]},
            {"prompt_input_ids": [8, 9], "chosen_input_ids": [10, 2], "rejected_input_ids": [11]},
        ]
    )
    assert packed.layout.gather.tolist() == [[0, 1, 2, 0, 0], [3, 4, 5, 6, 7]]
    assert packed.layout.scatter.tolist() == [0, 1, 2, 5, 6, 7, 8, 9]
    assert packed.layout.mask[0, 0, 2].tolist() == [True, False, True, False, False]
    assert not packed.layout.mask[0, 0, :, 3:].any()


def test_empty_prompt_is_rejected():
    with pytest.raises(ValueError, match="empty prompt"):
        pack_pairs([{"prompt_input_ids": [], "chosen_input_ids": [1], "rejected_input_ids": [2]}])


@settings(max_examples=15, deadline=None)
@given(
    shapes=st.lists(
        st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=3
    ),
    seed=st.integers(0, 1000),
    average=st.booleans(),
)
def test_packed_logps_equal_separate_forward_passes(shapes, seed, average):
    g = torch.Generator().manual_seed(seed)
    vocab = len(TOK)
    examples = [
        {
            "prompt_input_ids": torch.randint(3, vocab, (p,), generator=g).tolist(),
            "chosen_input_ids": torch.randint(3, vocab, (c,), generator=g).tolist(),
            "rejected_input_ids": torch.randint(3, vocab, (r,), generator=g).tolist(),
        }
        for p, c, r in shapes
    ]
    with torch.no_grad():
        got = packed_logps(MODEL, pack_pairs(examples), average=average)
        want = separate_logps(MODEL, examples, average=average)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_packed_logps_gradients_match_separate_passes():
    examples = [
        {"prompt_input_ids": [5, 6, 7], "chosen_input_ids": [8, 9, 2], "rejected_input_ids": [10, 2]},
        {"prompt_input_ids": [11], "chosen_input_ids": [12, 2], "rejected_input_ids": [13, 14, 15, 2]},
    ]
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])
    MODEL.zero_grad()
    (packed_logps(MODEL, pack_pairs(examples)) * weights).sum().backward()
    assert MODEL.config._attn_implementation == "sdpa"  # the block attention is only swapped in per call
    packed_grads = [p.grad.clone() for p in MODEL.parameters()]
    MODEL.zero_grad()
    (separate_logps(MODEL, examples) * weights).sum().backward()
    for a, p in zip(packed_grads, MODEL.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-5)
    MODEL.zero_grad()


def test_pack_completions_matches_separate_forward_passes():
    """SFT packing: each sequence restarts at position 0 and sees only itself; only labelled tokens count."""
    examples = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
        {"input_ids": [9, 10, 11], "labels": [9, 10, 11]},
    ]
    packed = pack_completions(examples)
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert packed.keep.tolist() == [1, 2, 4, 5]  # label 7 from position 1, 8 from 2; 10 from 4, 11 from 5
    assert packed.lengths.tolist() == [2, 2]
    with torch.no_grad():
        got = packed_logps(MODEL, packed)
        want = torch.cat(
            [
                sequence_logps(MODEL(torch.tensor([ex["input_ids"]])).logits, torch.tensor([ex["labels"]]))
                for ex in examples
            ]
        )
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_packed_scores_equal_scores_of_separate_sequences():
    """A reward model read at each completion's last token, packed, equals scoring prompt+completion alone."""
    from prefalign.models import sequence_scores

    torch.manual_seed(0)
    from transformers import LlamaForSequenceClassification

    settings = {k: v for k, v in MODEL.config.to_dict().items() if k not in ("id2label", "label2id")}
    rm = LlamaForSequenceClassification(MODEL.config.__class__(**{**settings, "num_labels": 1})).eval()
    examples = [
        {"prompt_input_ids": [5, 6, 7], "chosen_input_ids": [8, 9, 2], "rejected_input_ids": [10, 2]},
        {"prompt_input_ids": [11], "chosen_input_ids": [12, 2], "rejected_input_ids": [13, 14, 15, 2]},
    ]
    with torch.no_grad():
        got = packed_scores(rm, pack_pairs(examples))
        want = torch.cat(
            [
                sequence_scores(
                    rm,
                    torch.tensor([ex["prompt_input_ids"] + c]),
                    torch.ones(1, len(ex["prompt_input_ids"]) + len(c)),
                )
                for ex in examples
                for c in (ex["chosen_input_ids"], ex["rejected_input_ids"])
            ]
        )
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
