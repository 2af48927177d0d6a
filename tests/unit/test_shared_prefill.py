"""The G samples of a prompt share one prefill: same logits, tokens and log-probs as prefilling every row."""

from __future__ import annotations

import pytest
import torch

from prefalign.decoding import HFStepper, LeanStepper, make_stepper
from prefalign.generation import SamplingSettings, generate, position_ids_from_mask, prompt_groups
from prefalign.testing import tiny_causal_lm

# Three prompts of different lengths, so the groups need different left padding.
PROMPTS = ["The movie", "It is tedious and messy. It is", "Write a short review of the movie. It is good"]


@pytest.fixture
def prompts(tokenizer) -> list[list[int]]:
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in PROMPTS]
    assert len({len(p) for p in ids}) == 3
    return ids


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_causal_lm(tokenizer=tokenizer, hidden_size=64, seed=1)


def _left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


def _grouped(prompts: list[list[int]], sizes: list[int]) -> list[list[int]]:
    return [p for p, n in zip(prompts, sizes, strict=False) for _ in range(n)]


def test_prompt_groups_are_the_runs_of_identical_prompts():
    assert prompt_groups([[1, 2], [1, 2], [1, 2], [3], [1, 2], [1, 2]]) == [3, 1, 2]
    assert prompt_groups([[5]]) == [1]
    assert prompt_groups([[1, 2], [1, 2, 3], [1, 2, 3]]) == [1, 2]


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("sizes", [[1], [2, 2], [5, 5, 5], [3, 1, 2]])
def test_shared_steps_give_the_logits_of_unshared_ones(tokenizer, model, prompts, sizes, lean):
    """The same tokens fed to a grouped stepper (U unique prompts prefilled) and to a plain one (every row
    prefilled): the prefill's logits repeated per group, then every decode step's logits, agree to 1e-5.
    The fed tokens are sampled per row, so the rows of a group go different ways."""
    unique_ids, unique_mask = _left_pad(prompts[: len(sizes)], tokenizer.pad_token_id)
    index = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    ids, mask = unique_ids[index], unique_mask[index]
    steps = 6
    plain_mask = torch.cat([mask, torch.ones(len(index), steps, dtype=torch.long)], 1)
    plain = LeanStepper(model, plain_mask.bool()) if lean else HFStepper(model, plain_mask)
    shared_mask = torch.cat([unique_mask, torch.ones(len(sizes), steps, dtype=torch.long)], 1)
    shared = make_stepper(model, shared_mask, lean=lean, groups=sizes)
    assert isinstance(shared, type(plain))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        a = plain.step(ids, position_ids_from_mask(mask))
        b = shared.step(unique_ids, position_ids_from_mask(unique_mask))
        assert b.shape[0] == len(sizes)
        torch.testing.assert_close(b[index], a, atol=1e-5, rtol=0)
        position = mask.sum(-1, keepdim=True)
        for _ in range(steps):
            token = torch.multinomial(a.softmax(-1), 1, generator=generator)
            a, b = plain.step(token, position), shared.step(token, position)
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
            position = position + 1


def test_the_lean_prompt_cache_holds_one_row_per_group(tokenizer, model, prompts):
    """Prompt keys/values once per group (U rows), generated ones per row (B rows)."""
    sizes = [4, 4, 2]
    unique_ids, unique_mask = _left_pad(prompts, tokenizer.pad_token_id)
    stepper = make_stepper(
        model, torch.cat([unique_mask, torch.ones(3, 5, dtype=torch.long)], 1), groups=sizes
    )
    assert isinstance(stepper, LeanStepper)
    with torch.no_grad():
        stepper.step(unique_ids, position_ids_from_mask(unique_mask))
    layers, heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    width, dim = unique_ids.shape[1], model.config.hidden_size // model.config.num_attention_heads
    assert stepper.prompt_k.shape == stepper.prompt_v.shape == (layers, 3, heads, width, dim)
    assert stepper.gen_k.shape == stepper.gen_v.shape == (layers, 10, heads, 5, dim)


def _stopping_model(tokenizer, stop: int):
    """The tiny model with its output layer's bias raised on ``stop``: sampled often enough that rows
    stop at different steps, some never (checked where it matters)."""
    model = tiny_causal_lm(tokenizer=tokenizer, hidden_size=64, seed=2, tie_word_embeddings=False)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[stop] = 3.5
    model.lm_head = head
    return model


def _assert_same(a, b, hidden: bool = False) -> None:
    assert torch.equal(a.prompt_ids, b.prompt_ids) and torch.equal(a.prompt_mask, b.prompt_mask)
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.response_mask, b.response_mask)
    assert torch.equal(a.finished, b.finished)
    assert a.texts == b.texts
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    if hidden:
        torch.testing.assert_close(a.hidden, b.hidden, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.entropy, b.entropy, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize(
    ("sizes", "batch_size"),
    [([1], None), ([2, 2], None), ([5, 5, 5], None), ([3, 1, 2], None), ([4, 4, 4], 5)],
)
def test_shared_sampling_equals_unshared(tokenizer, prompts, sizes, batch_size, lean, monkeypatch):
    """Seeded sampling at temperature 1 with a frequent stop token: identical tokens, masks, ``finished``
    and texts, log-probs within 1e-5; some rows stop mid-way, others run to the cap. Batches of 5 cut the
    groups of 4 into runs [4, 1], [3, 2], [2]; a batch of single rows shares nothing."""
    import prefalign.decoding

    stop = tokenizer.convert_tokens_to_ids("e")
    model = _stopping_model(tokenizer, stop)
    rows = _grouped(prompts, sizes)
    settings = SamplingSettings(max_new_tokens=10, temperature=1.0, seed=4, stop_ids=[stop])
    seen: list[list[int] | None] = []
    real = prefalign.decoding.make_stepper

    def spy(model, key_mask, lean=True, groups=None):
        seen.append(groups)
        return real(model, key_mask, lean=lean, groups=groups)

    monkeypatch.setattr(prefalign.decoding, "make_stepper", spy)
    shared = generate(model, tokenizer, rows, settings, batch_size=batch_size, lean=lean)
    expected = [[4, 1], [3, 2], [2]] if batch_size else [None if max(sizes) == 1 else sizes]
    assert seen == expected
    plain = generate(model, tokenizer, rows, settings, batch_size=batch_size, lean=lean, share_prompts=False)
    _assert_same(shared, plain)
    if len(rows) >= 10:
        lengths = shared.response_mask.sum(-1)
        assert shared.finished.any() and not shared.finished.all()
        assert int(lengths[shared.finished].min()) < 10


@pytest.mark.parametrize("lean", [True, False])
def test_shared_hidden_states_and_entropy_equal_unshared(tokenizer, model, prompts, lean):
    rows = _grouped(prompts, [4, 3, 4])
    settings = SamplingSettings(max_new_tokens=8, temperature=0.9, seed=2)
    shared = generate(model, tokenizer, rows, settings, return_hidden=True, lean=lean)
    plain = generate(model, tokenizer, rows, settings, return_hidden=True, lean=lean, share_prompts=False)
    assert shared.hidden.shape == (len(rows), shared.response_ids.shape[1], model.config.hidden_size)
    _assert_same(shared, plain, hidden=True)


def test_other_architectures_share_through_the_expanded_cache(tokenizer, prompts):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2)).eval()
    rows = _grouped(prompts, [3, 2, 3])
    settings = SamplingSettings(max_new_tokens=6, seed=1, stop_ids=[])
    shared = generate(gpt2, tokenizer, rows, settings)
    plain = generate(gpt2, tokenizer, rows, settings, share_prompts=False)
    _assert_same(shared, plain)
