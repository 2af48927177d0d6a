"""The lean Llama-family stepper against the model's own forward with its KV cache."""

from __future__ import annotations

import pytest
import torch

from prefalign.decoding import HFStepper, LeanStepper, lean_supported, make_stepper
from prefalign.generation import SamplingSettings, generate
from prefalign.testing import tiny_causal_lm

PROMPTS = ["The movie", "It is tedious and messy. It is", "Write a short review of the movie. It is good"]


@pytest.fixture
def prompts(tokenizer) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in PROMPTS]


@pytest.mark.parametrize("seed", [0, 1])
def test_lean_logits_equal_the_models_forward_step_by_step(tokenizer, prompts, seed):
    """Same left-padded batch, same tokens fed: every step's logits agree to 1e-4 (random weights of two
    seeds, grouped-query attention with 4 query and 2 key/value heads)."""
    model = tiny_causal_lm(tokenizer=tokenizer, hidden_size=64, seed=seed)
    width = max(len(p) for p in prompts)
    ids = torch.full((3, width), tokenizer.pad_token_id)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    key_mask = torch.cat([mask, torch.ones(3, 6, dtype=torch.long)], 1)
    lean, hf = LeanStepper(model, key_mask.bool()), HFStepper(model, key_mask)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a, b = lean.step(ids, positions), hf.step(ids, positions)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
        position = mask.sum(-1, keepdim=True)
        for _ in range(6):
            token = a.argmax(-1, keepdim=True)
            a, b = lean.step(token, position), hf.step(token, position)
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
            position = position + 1


def test_greedy_generation_is_the_same_either_way(tiny_model, tokenizer, prompts):
    lean = generate(
        tiny_model, tokenizer, prompts, SamplingSettings(max_new_tokens=12, do_sample=False), lean=True
    )
    hf = generate(
        tiny_model, tokenizer, prompts, SamplingSettings(max_new_tokens=12, do_sample=False), lean=False
    )
    assert torch.equal(lean.response_ids, hf.response_ids)
    torch.testing.assert_close(lean.logprobs, hf.logprobs, atol=1e-4, rtol=0)


def test_other_architectures_fall_back_to_their_own_forward(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)).eval()
    assert not lean_supported(gpt2)
    assert isinstance(make_stepper(gpt2, torch.ones(1, 4, dtype=torch.long)), HFStepper)
    assert lean_supported(tiny_causal_lm(tokenizer=tokenizer))
    out = generate(
        gpt2, tokenizer, [[5, 6, 7]], SamplingSettings(max_new_tokens=3, do_sample=False, stop_ids=[])
    )
    ids = torch.tensor([[5, 6, 7]])  # greedy by hand: the whole sequence through the model's forward
    with torch.no_grad():
        for _ in range(3):
            ids = torch.cat([ids, gpt2(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert out.response_ids.tolist() == ids[:, 3:].tolist()
