"""Sampling loop: log-probs against a fresh forward, padding invariance, stopping, seeding, warping."""

from __future__ import annotations

import pytest
import torch

from prefalign.config import check_device
from prefalign.generation import (
    MIN_TEMPERATURE,
    GenerationOutput,
    SamplingSettings,
    _inverse_cdf,
    _sample,
    cap_prompts,
    context_length,
    generate,
    is_greedy_temperature,
    position_ids_from_mask,
    response_logits,
    response_logprobs,
    stop_token_ids,
    warp_logits,
)
from prefalign.testing import tiny_causal_lm

# Prompts of different lengths, so batches need 0 to 9 columns of left padding.
PROMPT_TEXTS = [
    "The movie",
    "It is tedious and messy. It is",
    "Write a short review of the movie. It is good",
]


@pytest.fixture
def prompts(tokenizer) -> list[list[int]]:
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in PROMPT_TEXTS]
    assert len({len(p) for p in ids}) == 3, "the test needs prompts of three different lengths"
    return ids


def _responses(out: GenerationOutput) -> list[list[int]]:
    return [ids[m.bool()].tolist() for ids, m in zip(out.response_ids, out.response_mask, strict=True)]


def test_logprobs_equal_a_fresh_unpadded_forward(tiny_model, tokenizer, prompts):
    """Each generated token's log-prob must equal log_softmax(logits / T) of a plain forward over that row's
    own prompt + response, with no padding and default positions: the log-prob under the distribution
    that sampled (temperature 0.7 here), the convention PPO's ratio needs."""
    out = generate(
        tiny_model, tokenizer, prompts, SamplingSettings(max_new_tokens=12, temperature=0.7, seed=3)
    )
    assert out.response_ids.shape == out.logprobs.shape == out.response_mask.shape
    for i, prompt in enumerate(prompts):
        response = _responses(out)[i]
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logits = tiny_model(input_ids=ids).logits[0].float() / 0.7
        expected = (
            logits[len(prompt) - 1 : -1].log_softmax(-1).gather(1, torch.tensor(response)[:, None])[:, 0]
        )
        got = out.logprobs[i, : len(response)]
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        assert torch.all(out.logprobs[i, len(response) :] == 0)


def test_logprobs_with_top_k_are_those_of_the_truncated_distribution(tiny_model, tokenizer, prompts):
    """With top-k the sampling distribution is the renormalised top k, so each recorded log-prob is
    log_softmax over the warped logits: never below the plain log-prob, and the k kept probabilities
    of every step sum to 1 (checked through the first token)."""
    out = generate(
        tiny_model, tokenizer, prompts, SamplingSettings(max_new_tokens=6, temperature=1.0, top_k=5, seed=1)
    )
    plain = response_logprobs(tiny_model, out)
    mask = out.response_mask.bool()
    assert torch.all(out.logprobs[mask] >= plain[mask] - 1e-5)
    assert torch.any(out.logprobs[mask] > plain[mask] + 1e-3)
    first = response_logits(tiny_model, out)[:, 0]
    warped = warp_logits(first, top_k=5).log_softmax(-1)
    torch.testing.assert_close(
        out.logprobs[:, 0], warped.gather(1, out.response_ids[:, :1])[:, 0], atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_response_logprobs_of_the_sampling_model_equal_the_recorded_ones(
    tiny_model, tokenizer, prompts, temperature
):
    """PPO's old/reference passes: a fresh batched forward over GenerationOutput (left-padded prompts,
    right-padded responses) reproduces the sampled log-probs to 1e-4, at the same temperature, in one
    batch or several; 0 off the response mask."""
    out = generate(
        tiny_model, tokenizer, prompts, SamplingSettings(max_new_tokens=10, temperature=temperature, seed=5)
    )
    for batch_size in (None, 2):
        again = response_logprobs(tiny_model, out, temperature=temperature, batch_size=batch_size)
        torch.testing.assert_close(again, out.logprobs, atol=1e-4, rtol=0)
    assert torch.all(again[~out.response_mask.bool()] == 0)


def test_logprobs_equal_a_padded_batch_forward(tiny_model, tokenizer, prompts):
    """The batch layout of GenerationOutput.sequences(), scored in one forward with mask-derived positions,
    reproduces the log-probs too (this is how a trainer re-scores rollouts)."""
    out = generate(tiny_model, tokenizer, prompts, SamplingSettings(max_new_tokens=10, seed=0))
    input_ids, attention_mask = out.sequences()
    with torch.no_grad():
        logits = tiny_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
        ).logits.float()
    width = out.prompt_ids.shape[1]
    scored = logits[:, width - 1 : -1].log_softmax(-1).gather(2, out.response_ids[..., None])[..., 0]
    mask = out.response_mask.bool()
    torch.testing.assert_close(out.logprobs[mask], scored[mask], atol=1e-4, rtol=0)


def test_prompts_are_left_padded(tiny_model, tokenizer, prompts):
    out = generate(tiny_model, tokenizer, prompts, SamplingSettings(max_new_tokens=2, do_sample=False))
    pad = tokenizer.pad_token_id
    for i, prompt in enumerate(prompts):
        row, mask = out.prompt_ids[i], out.prompt_mask[i]
        assert row[-len(prompt) :].tolist() == prompt
        assert mask.tolist() == [0] * (len(row) - len(prompt)) + [1] * len(prompt)
        assert set(row[: len(row) - len(prompt)].tolist()) <= {pad}


@pytest.mark.parametrize("batch_size", [None, 2])
def test_greedy_batched_equals_one_prompt_at_a_time(tiny_model, tokenizer, prompts, batch_size):
    """With correct position ids and masks, padding must not change a prompt's greedy continuation."""
    batched = generate(
        tiny_model,
        tokenizer,
        prompts,
        SamplingSettings(max_new_tokens=15, do_sample=False),
        batch_size=batch_size,
    )
    for i, prompt in enumerate(prompts):
        alone = generate(
            tiny_model, tokenizer, [prompt], SamplingSettings(max_new_tokens=15, do_sample=False)
        )
        assert _responses(batched)[i] == _responses(alone)[0]
        assert batched.texts[i] == alone.texts[0]
        torch.testing.assert_close(
            batched.logprobs[i, : alone.logprobs.shape[1]], alone.logprobs[0], atol=1e-4, rtol=0
        )


def test_stops_at_the_first_stop_token_and_masks_the_rest(tiny_model, tokenizer, prompts):
    """Greedy is deterministic, so a run with stop tokens must equal the run without, cut after the first
    stop token of each row; afterwards: pad ids, mask 0, log-prob 0."""
    free = generate(
        tiny_model, tokenizer, prompts, SamplingSettings(max_new_tokens=12, do_sample=False, stop_ids=[])
    )
    assert free.response_mask.all() and not free.finished.any()
    stop = int(free.response_ids[0, 3])
    cut = generate(
        tiny_model, tokenizer, prompts, SamplingSettings(max_new_tokens=12, do_sample=False, stop_ids=[stop])
    )
    pad = tokenizer.pad_token_id
    for i in range(len(prompts)):
        full = free.response_ids[i].tolist()
        n = full.index(stop) + 1 if stop in full else len(full)
        assert cut.response_mask[i].tolist()[: len(full)] == [1] * n + [0] * (len(full) - n)
        assert cut.response_ids[i, :n].tolist() == full[:n]
        assert set(cut.response_ids[i, n:].tolist()) <= {pad}
        assert torch.all(cut.logprobs[i, n:] == 0)
        assert bool(cut.finished[i]) == (stop in full)
    assert cut.finished[0] and cut.response_mask[0].sum() <= 4


def test_default_stop_is_eos_and_the_loop_ends_when_all_rows_stop(tokenizer, prompts):
    """A model that always puts all its mass on EOS answers every prompt with exactly [EOS]: one column,
    finished, log-prob ~0, empty text."""
    model = tiny_causal_lm(tokenizer=tokenizer, tie_word_embeddings=False)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 30.0
    model.lm_head = head
    out = generate(model, tokenizer, prompts, SamplingSettings(max_new_tokens=20, seed=0))
    assert out.response_ids.tolist() == [[tokenizer.eos_token_id]] * 3
    assert out.response_mask.tolist() == [[1]] * 3
    assert out.finished.all()
    assert out.texts == ["", "", ""]
    assert torch.all(out.logprobs.abs() < 1e-6)


def test_stop_token_ids_include_eos_and_end_of_turn(tiny_model, tokenizer):
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tokenizer, tiny_model)
    tiny_model.generation_config.eos_token_id = [5, tokenizer.eos_token_id]
    assert 5 in stop_token_ids(tokenizer, tiny_model)


def test_same_seed_same_samples_other_seed_other_samples(tiny_model, tokenizer, prompts):
    a = generate(tiny_model, tokenizer, prompts, SamplingSettings(max_new_tokens=10, seed=7))
    b = generate(tiny_model, tokenizer, prompts, SamplingSettings(max_new_tokens=10, seed=7))
    c = generate(tiny_model, tokenizer, prompts, SamplingSettings(max_new_tokens=10, seed=8))
    assert torch.equal(a.response_ids, b.response_ids) and a.texts == b.texts
    assert not torch.equal(a.response_ids, c.response_ids)


def test_seed_does_not_touch_the_global_rng(tiny_model, tokenizer, prompts):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    generate(tiny_model, tokenizer, prompts, SamplingSettings(max_new_tokens=5, seed=1))
    assert torch.equal(torch.rand(3), expected)


def test_top_k_1_and_temperature_0_are_greedy(tiny_model, tokenizer, prompts):
    greedy = generate(tiny_model, tokenizer, prompts, SamplingSettings(max_new_tokens=10, do_sample=False))
    top1 = generate(
        tiny_model, tokenizer, prompts, SamplingSettings(max_new_tokens=10, top_k=1, temperature=1.5, seed=0)
    )
    cold = generate(tiny_model, tokenizer, prompts, SamplingSettings(max_new_tokens=10, temperature=0.0))
    assert torch.equal(top1.response_ids, greedy.response_ids)
    assert torch.equal(cold.response_ids, greedy.response_ids)


def test_texts_decode_the_masked_response(tiny_model, tokenizer, prompts):
    out = generate(tiny_model, tokenizer, prompts, SamplingSettings(max_new_tokens=8, seed=0))
    for text, ids in zip(out.texts, _responses(out), strict=True):
        assert text == tokenizer.decode(ids, skip_special_tokens=True)


def test_restores_train_mode_and_builds_no_graph(tiny_model, tokenizer, prompts):
    tiny_model.train()
    out = generate(tiny_model, tokenizer, prompts, SamplingSettings(max_new_tokens=3, seed=0))
    assert tiny_model.training
    assert not out.logprobs.requires_grad


def test_bad_settings_say_what(tiny_model, tokenizer, prompts):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(tiny_model, tokenizer, [prompts[0], []])
    with pytest.raises(ValueError, match="top_p"):
        generate(tiny_model, tokenizer, prompts, SamplingSettings(top_p=0.0))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(tiny_model, tokenizer, prompts, SamplingSettings(max_new_tokens=0))
    with pytest.raises(ValueError, match="no prompts"):
        generate(tiny_model, tokenizer, [])


def test_sampling_settings_are_checked_when_made_and_keep_stop_ids_as_a_tuple():
    """A bad setting fails where the bundle is made, not deep in the sampling loop; stop ids given as a
    list are held as a tuple (the bundle is frozen and hashable); greedy is do_sample off or T below 1e-5."""
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        SamplingSettings(top_k=-1)
    settings = SamplingSettings(stop_ids=[7, 3])
    assert settings.stop_ids == (7, 3) and settings == SamplingSettings(stop_ids=(7, 3))
    assert hash(settings) == hash(SamplingSettings(stop_ids=(7, 3)))
    assert SamplingSettings(do_sample=False).greedy and SamplingSettings(temperature=9e-6).greedy
    assert not SamplingSettings(temperature=1e-5).greedy and not SamplingSettings().greedy


def _naive_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Reference nucleus filter, one row at a time: keep most likely tokens until their mass reaches top_p."""
    out = torch.full_like(logits, float("-inf"))
    for r, row in enumerate(logits):
        probs = row.softmax(-1)
        mass = 0.0
        for j in torch.argsort(row, descending=True).tolist():
            out[r, j] = row[j]
            mass += float(probs[j])
            if mass >= top_p:
                break
    return out


@pytest.mark.parametrize("scale", [0.1, 3.0, 12.0])  # flat (full-sort path) to peaked (top-256 path)
def test_top_p_matches_a_naive_nucleus(scale):
    torch.manual_seed(0)
    logits = torch.randn(3, 2000, dtype=torch.float64) * scale
    got = warp_logits(logits, top_p=0.8)
    assert torch.equal(torch.isfinite(got), torch.isfinite(_naive_top_p(logits, 0.8)))
    assert torch.equal(got[torch.isfinite(got)], logits[torch.isfinite(got)])


def test_top_k_keeps_k_and_temperature_divides():
    logits = torch.tensor([[1.0, 4.0, 2.0, 3.0]])
    assert torch.isfinite(warp_logits(logits, top_k=2)).tolist() == [[False, True, False, True]]
    torch.testing.assert_close(warp_logits(logits, temperature=2.0), logits / 2)


def test_sampler_draws_in_proportion_to_probs():
    """30,000 draws from (0.1, 0.2, 0.7): each frequency within 0.01 (about 4 standard errors)."""
    probs = torch.tensor([[0.1, 0.2, 0.7]]).expand(30_000, 3)
    draws = _sample(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3).float() / len(draws)
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.2, 0.7]), atol=0.01, rtol=0)


def test_the_sampler_never_draws_a_token_of_probability_zero():
    """Masked tokens (top-k, top-p) have probability 0 wherever they sit, the last entries included, and
    the rows need not sum to 1."""
    probs = torch.tensor([[0.0, 3.0, 0.0, 1.0, 0.0, 0.0]]).expand(20_000, 6)
    draws = _sample(probs, torch.Generator().manual_seed(1))
    counts = torch.bincount(draws, minlength=6)
    assert counts[[0, 2, 4, 5]].sum() == 0
    assert abs(counts[1].item() / 20_000 - 0.75) < 0.015
    one_hot = torch.zeros(4, 49_152)
    one_hot[torch.arange(4), torch.tensor([0, 7, 49_151, 30_000])] = 1.0
    assert _sample(one_hot, torch.Generator().manual_seed(0)).tolist() == [0, 7, 49_151, 30_000]


def test_the_two_level_search_draws_what_one_cumulative_sum_would():
    """Blocks then one block's cumulative sums: for the same uniforms, the token a cumulative sum over the
    whole row gives, on rows with a short tail block, whole blocks of zeros (as top-k leaves), and mass
    only in the tail; a one-hot row always gives its token."""
    gen = torch.Generator().manual_seed(0)
    vocab = 4 * 256 + 37
    probs = torch.rand(64, vocab, generator=gen).pow(8)
    probs[:16, 256:768] = 0.0  # two empty blocks
    probs[16:32, :] = 0.0
    probs[16:32, -37:] = torch.rand(16, 37, generator=gen)  # only the tail
    probs[32:48] *= torch.rand(16, vocab, generator=gen) > 0.99  # sparse rows
    probs[48:, :] = 0.0
    hot = torch.randint(0, vocab, (16,), generator=gen)
    probs[torch.arange(48, 64), hot] = 2.0
    for seed in range(20):
        u = torch.rand(64, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        draws = _sample(probs, torch.Generator().manual_seed(seed))
        assert torch.equal(draws, _inverse_cdf(probs, u))
        assert bool((probs.gather(-1, draws[:, None]) > 0).all())
        assert torch.equal(draws[48:], hot)


def test_returned_hidden_states_and_entropy_match_a_fresh_forward(tiny_model, tokenizer, prompts):
    """With return_hidden, each response position carries the output layer's input there: the output
    layer applied to it gives the logits of a fresh forward (so a value head on the trunk needs no extra
    pass), and the entropy equals that of softmax(logits / T). Zeros off the response mask."""
    from prefalign.losses import entropy_from_logits

    out = generate(
        tiny_model,
        tokenizer,
        prompts,
        SamplingSettings(max_new_tokens=8, temperature=0.9, seed=2),
        return_hidden=True,
    )
    assert out.hidden.shape == (*out.response_ids.shape, tiny_model.config.hidden_size)
    fresh = response_logits(tiny_model, out, temperature=0.9)
    mask = out.response_mask.bool()
    with torch.no_grad():
        again = tiny_model.get_output_embeddings()(out.hidden).float() / 0.9
    torch.testing.assert_close(again[mask], fresh[mask], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.entropy[mask], entropy_from_logits(fresh)[mask], atol=1e-4, rtol=0)
    assert torch.all(out.hidden[~mask] == 0) and torch.all(out.entropy[~mask] == 0)
    plain = generate(
        tiny_model, tokenizer, prompts, SamplingSettings(max_new_tokens=8, temperature=0.9, seed=2)
    )
    assert torch.equal(plain.response_ids, out.response_ids) and plain.hidden is None


# ---- temperatures near 0 and prompts past the context -----------------------------------------


@pytest.mark.parametrize("temperature", [1e-45, 5e-324, 9e-6])
def test_a_temperature_below_the_threshold_is_exactly_greedy(tiny_model, tokenizer, prompts, temperature):
    """Dividing by 1e-45 overflows every logit to inf and softmax gives NaN; below MIN_TEMPERATURE the
    sampler decodes greedily instead: the same tokens and log-probs as do_sample=False, all finite, and
    the fresh-forward pass at that temperature agrees with them."""
    greedy = generate(tiny_model, tokenizer, prompts, SamplingSettings(max_new_tokens=10, do_sample=False))
    cold = generate(
        tiny_model, tokenizer, prompts, SamplingSettings(max_new_tokens=10, temperature=temperature, seed=0)
    )
    assert torch.equal(cold.response_ids, greedy.response_ids)
    assert torch.equal(cold.logprobs, greedy.logprobs)
    assert torch.isfinite(cold.logprobs).all()
    again = response_logprobs(tiny_model, cold, temperature=temperature)
    assert torch.isfinite(again).all()
    torch.testing.assert_close(again, cold.logprobs, atol=1e-4, rtol=0)


def test_warp_at_a_tiny_temperature_is_a_point_mass_on_the_argmax():
    """The temperature -> 0 limit: the largest logits stay (ties share the mass), the rest are -inf."""
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0], [0.5, -1.0, 0.0, 0.2]])
    warped = warp_logits(logits, temperature=1e-45)
    assert torch.isfinite(warped).tolist() == [[False, True, False, True], [True, False, False, False]]
    probs = warped.softmax(-1)
    assert not torch.isnan(probs).any()
    torch.testing.assert_close(probs[0], torch.tensor([0.0, 0.5, 0.0, 0.5]))
    assert MIN_TEMPERATURE == 1e-5 and is_greedy_temperature(9.9e-6) and not is_greedy_temperature(1e-5)


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1e-9])
def test_a_temperature_that_is_not_a_number_or_negative_is_refused(
    tiny_model, tokenizer, prompts, temperature
):
    with pytest.raises(ValueError, match="temperature must be >= 0 and finite"):
        generate(tiny_model, tokenizer, prompts, SamplingSettings(temperature=temperature))


def test_prompts_longer_than_the_context_keep_their_last_tokens(tiny_model, tokenizer, prompts, caplog):
    """Context 12: the 13-token prompt becomes its last 12 tokens (one warning says 1 of 3 was cut),
    and the continuation equals that of the cut prompt given directly; prompt + 4 new tokens passes the
    context, which is a second warning."""
    tiny_model.config.max_position_embeddings = 12
    long = prompts[2]
    assert len(long) > 12 >= max(len(prompts[0]), len(prompts[1]))
    caplog.set_level("WARNING")
    out = generate(tiny_model, tokenizer, prompts, SamplingSettings(max_new_tokens=4, do_sample=False))
    assert out.prompt_ids.shape[1] == 12
    assert out.prompt_ids[2].tolist() == long[-12:]
    cut_warnings = [r.getMessage() for r in caplog.records if "cut" in r.getMessage()]
    assert cut_warnings == ["cut 1 of 3 prompts to their last 12 tokens: the model's context is 12 tokens"]
    assert any("pass the model's context of 12 tokens" in r.getMessage() for r in caplog.records)
    direct = generate(
        tiny_model, tokenizer, [long[-12:]], SamplingSettings(max_new_tokens=4, do_sample=False)
    )
    assert direct.response_ids[0].tolist() == out.response_ids[2, : direct.response_ids.shape[1]].tolist()


def test_prompts_within_the_context_give_no_warning(tiny_model, tokenizer, prompts, caplog):
    caplog.set_level("WARNING")
    out = generate(tiny_model, tokenizer, prompts, SamplingSettings(max_new_tokens=4, seed=0))
    assert out.prompt_mask.sum(-1).tolist() == [len(p) for p in prompts]
    assert not caplog.records


def test_context_length_reads_the_families_keys():
    from types import SimpleNamespace

    assert context_length(SimpleNamespace(config=SimpleNamespace(max_position_embeddings=2048))) == 2048
    assert context_length(SimpleNamespace(config=SimpleNamespace(n_positions=1024))) == 1024  # GPT-2
    assert context_length(SimpleNamespace(config=SimpleNamespace())) is None
    assert cap_prompts([[1, 2, 3]], None, 10) == [[1, 2, 3]]  # unknown context: nothing cut


@pytest.mark.parametrize(
    ("device", "available", "count", "message"),
    [
        ("cuda", False, 0, "device: 'cuda' asked for, but CUDA is not available here"),
        ("cuda:1", True, 1, "device: 'cuda:1' asked for, but this machine has 1 CUDA device(s)"),
        ("gpu", True, 1, "device: 'gpu' is not a device"),
    ],
)
def test_check_device_refuses_what_the_machine_lacks(monkeypatch, device, available, count, message):
    from prefalign.config import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    with pytest.raises(ConfigError) as err:
        check_device(device)
    assert str(err.value).startswith(message)
    check_device("cpu")
    check_device(None)


def test_the_generation_size_bound_says_how_many_samples_fit_and_that_many_do():
    """1000 prompts x 1000 samples of up to 250 positions: 10^6 responses at 250 x 36 + 2300 bytes each is
    11.3 GB, past the 4 GiB bound; 4 GiB / (1000 x 11300) = 380.09, so 380 samples fit and 381 do not."""
    from prefalign.config import ConfigError
    from prefalign.generate_command import check_generation_size

    with pytest.raises(ConfigError) as err:
        check_generation_size(1000, 1000, 50, 200)
    assert str(err.value).startswith(
        "num_samples: 1000 x 1000 prompts = 1000000 responses of up to 250 tokens would hold about 11 GiB"
    )
    assert "ask for at most 380 samples per prompt" in str(err.value)
    check_generation_size(380, 1000, 50, 200)
    with pytest.raises(ConfigError):
        check_generation_size(381, 1000, 50, 200)
    with pytest.raises(ConfigError, match="; split the prompts into several runs"):
        check_generation_size(1, 10**6, 50, 200)  # not even one sample each fits
