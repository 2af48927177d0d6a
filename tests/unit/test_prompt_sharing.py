"""A group's prompt paid once: the packed layout of G responses after one prompt gives each response the
per-token log-probs, hidden states and values it gets in a row of its own (1e-5), whatever G, the
response lengths, an EOS in the middle, or a token budget that splits a group."""

from __future__ import annotations

import pytest
import torch

from prefalign.generation import SamplingSettings, generate, response_logprobs
from prefalign.packing import pack_shared, packed_token_logps
from prefalign.testing import tiny_causal_lm, tiny_tokenizer
from prefalign.train.policy import make_micro, micro_plan, minibatch_plan
from prefalign.train.rollout import Rollout
from prefalign.train.sharing import (
    group_runs,
    pack_rows,
    packed_hidden,
    shared_micro_plan,
    shared_response_logprobs,
)

TOK = tiny_tokenizer()
MODEL = tiny_causal_lm(tokenizer=TOK, hidden_size=64, seed=3).eval()
PROMPTS = ["The movie was", "It is tedious and messy. It is", "A"]


def alone(model, prompt, response, temperature=1.0):
    """Per-token log-probs of ``response`` after ``prompt``, the pair run alone."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None])[:, 0]


def test_pack_shared_hand_example():
    """Prompt [5, 6], responses [7], [8, 9], [2]: row 5 6 7 8 9 2, positions 0 1 2 2 3 2; every first token
    is predicted from position 1; the third response (index 5) sees the prompt and itself only."""
    packed = pack_shared([([5, 6], [[7], [8, 9], [2]])])
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 2]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 2, 3, 2]]
    assert packed.keep.tolist() == [1, 1, 3, 1]
    assert packed.targets.tolist() == [7, 8, 9, 2]
    assert packed.segment.tolist() == [0, 1, 1, 2]
    assert packed.layout.mask[0, 0, 5].nonzero().flatten().tolist() == [0, 1, 5]
    assert packed.layout.mask[0, 0, 4].nonzero().flatten().tolist() == [0, 1, 3, 4]


@pytest.mark.parametrize("sizes", [[1], [2], [5], [5, 1, 3]])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_shared_token_logps_equal_each_response_alone(sizes, temperature):
    """G = 1, 2, 5 (and mixed groups in one row), responses of uneven lengths 1-9."""
    gen = torch.Generator().manual_seed(sum(sizes))
    groups = []
    for g, n in enumerate(sizes):
        prompt = TOK(PROMPTS[g % 3], add_special_tokens=False)["input_ids"]
        responses = [
            torch.randint(3, 200, (int(torch.randint(1, 10, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)
        ]
        groups.append((prompt, responses))
    with torch.no_grad():
        got = packed_token_logps(MODEL, pack_shared(groups), temperature)
    want = torch.cat([alone(MODEL, p, r, temperature) for p, rs in groups for r in rs])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def grouped_samples():
    """Three prompts x 5 samples (prompt-major), temperature 1, with a stop token frequent enough that some
    responses end early (EOS in the middle of a group)."""
    ids = [TOK(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    prompts = [p for p in ids for _ in range(5)]
    settings = SamplingSettings(max_new_tokens=12, seed=0, stop_ids=(TOK.eos_token_id,))
    free = generate(MODEL, TOK, prompts, settings)
    stop = int(free.response_ids[0, 3])  # row 0 (same seed, same draws) now stops at its fourth token
    out = generate(MODEL, TOK, prompts, SamplingSettings(max_new_tokens=12, seed=0, stop_ids=(stop,)))
    lengths = out.response_mask.sum(-1)
    assert lengths.min() < lengths.max() == 12, lengths  # uneven lengths, some stopped early
    return out


@pytest.mark.parametrize("budget", [4096, 40])
def test_shared_reference_pass_equals_the_padded_one(grouped_samples, budget):
    """The reference pass in the shared layout against today's padded pass; budget 40 splits groups
    across micro-batches (each part then carries its own copy of the prompt)."""
    out = grouped_samples
    shared = shared_response_logprobs(
        MODEL, out.prompt_ids, out.prompt_mask, out.response_ids, out.response_mask, 5, 1.0, budget
    )
    padded = response_logprobs(MODEL, out)
    torch.testing.assert_close(shared, padded, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared, out.logprobs, atol=1e-5, rtol=0)  # and the sampler's own


def test_micro_plans_respect_the_budget_and_pay_each_prompt_once_per_micro_batch(grouped_samples):
    out = grouped_samples
    p, r = out.prompt_mask.sum(-1), out.response_mask.sum(-1)
    rows = list(range(15))
    for budget in (30, 60, 10_000):
        plan = shared_micro_plan(p, r, rows, 5, budget)
        assert [x for part in plan for x in part] == rows
        for part in plan:
            packed = pack_rows(
                out.prompt_ids, out.prompt_mask, out.response_ids, out.response_mask, part, 5
            ).packed
            tokens = packed.input_ids.shape[1]
            assert tokens == sum(int(r[i]) for i in part) + sum(int(p[g * 5]) for g, _ in group_runs(part, 5))
            assert tokens <= budget or len(part) == 1
    assert len(shared_micro_plan(p, r, rows, 5, 10_000)) == 1


def test_shared_hidden_states_equal_the_padded_micro_batch(grouped_samples):
    """The update's forward: the hidden states that predict each response token (what the head's log-probs
    and a value head read), rows in a shuffled order spanning all three groups, gradients included."""
    from prefalign.train.policy import PolicyLogits

    out = grouped_samples
    rows = [7, 0, 14, 3, 5, 11, 1]
    padded_rollout = Rollout(out, torch.zeros(15), torch.zeros(15), group=5, shared=False)
    shared_rollout = Rollout(out, torch.zeros(15), torch.zeros(15), group=5, shared=True)
    module = PolicyLogits(MODEL)
    a = make_micro(padded_rollout, rows, torch.device("cpu"))
    b = make_micro(shared_rollout, rows, torch.device("cpu"))
    assert b.input_ids is None and b.width == a.width
    ha, hb = module.hidden(a), module.hidden(b)
    mask = a.mask[..., None]
    torch.testing.assert_close(hb * mask, ha * mask, atol=1e-5, rtol=0)
    (hb * mask).sum().backward()
    grads_shared = [p.grad.clone() for p in MODEL.parameters()]
    MODEL.zero_grad()
    (ha * mask).sum().backward()
    for gs, gp in zip(grads_shared, (p.grad for p in MODEL.parameters()), strict=True):
        torch.testing.assert_close(gs, gp, atol=1e-4, rtol=1e-4)
    MODEL.zero_grad()
    la, _ = module(a, 1.0, targets=a.response_ids)
    lb, _ = module(b, 1.0, targets=b.response_ids)
    torch.testing.assert_close(lb * a.mask, la * a.mask, atol=1e-5, rtol=0)
    assert packed_hidden(MODEL, b.shared, len(rows)).shape == ha.shape
    assert micro_plan(shared_rollout, rows, 10_000) == [rows]


def test_minibatches_keep_groups_whole():
    """Rows in groups of 4: each minibatch holds whole groups; groups of 1 shuffle rows as before; fewer
    groups than minibatches fall back to rows."""
    plan = minibatch_plan(16, 2, seed=0, iteration=3, epoch=1, group=4)
    assert sorted(x for part in plan for x in part) == list(range(16))
    for part in plan:
        assert len(part) == 8 and all(
            {x // 4 for x in part[i : i + 4]} == {part[i] // 4} for i in range(0, 8, 4)
        )
    assert minibatch_plan(16, 2, 0, 3, 1) == minibatch_plan(16, 2, 0, 3, 1, group=1)
    assert sorted(x for part in minibatch_plan(8, 4, 0, 0, 0, group=4) for x in part) == list(range(8))
