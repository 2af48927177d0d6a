"""Tiny, deterministic, offline stand-ins for tests: a tokenizer built locally and random tiny models.

Nothing here touches the network. The tokenizer is a byte-level BPE trained in memory on a small
corpus, with ChatML special tokens and a ChatML chat template (the format of SmolLM2-Instruct), so
that chat-template code paths run exactly as they do on the real model.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The movie was wonderful and moving, a brilliant film worth seeing.",
    "The movie was boring and clumsy, a dull film to skip.",
    "Write a short review of the movie. It is delightful and gripping.",
    "It is tedious and messy. It is forgettable and awful and lifeless.",
    "You are a helpful assistant. Answer the question with care.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()[]{}-_/\\@#$%^&*+=<>|~`",
    "user assistant system good bad yes no positive negative review movie film",
]


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A ChatML byte-level BPE tokenizer (EOS ``<|im_end|>``, pad ``<|endoftext|>``) built offline.

    Any text round-trips through it, because the byte alphabet is always in the vocabulary.
    """
    from tokenizers import Tokenizer

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_causal_lm(
    vocab_size: int | None = None,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerFast | None = None,
    tie_word_embeddings: bool = True,
) -> LlamaForCausalLM:
    """A random 2-layer Llama (the SmolLM2 architecture) in float32, deterministic by ``seed``.

    Args:
        vocab_size: defaults to ``len(tokenizer)`` (or the tiny tokenizer's size).
        tokenizer: used for the vocabulary size and the special-token ids.
    """
    tokenizer = tokenizer or tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.float().eval()


# --------------------------------------------------------------------------------------------------
# synthetic preference data with a learnable rule (positive words are preferred)

MOVIES = [
    "Titanic",
    "Alien",
    "Heat",
    "Up",
    "Jaws",
    "Rocky",
    "Psycho",
    "Vertigo",
    "Amelie",
    "Fargo",
    "Memento",
    "Gravity",
    "Inception",
    "Arrival",
    "Coco",
    "Her",
]
GOOD = ["wonderful", "moving", "brilliant", "delightful", "gripping", "beautiful", "superb", "charming"]
BAD = ["boring", "clumsy", "dull", "tedious", "messy", "forgettable", "awful", "lifeless"]


def perturb_adapters(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    """Give every LoRA ``B`` matrix of ``model`` (zero when peft creates it) random values, so that the
    adapter changes the model's function and a test of the adapted model can fail."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def synthetic_pairs(n: int, seed: int = 0, chat: bool = False) -> list[dict]:
    """``n`` pairs whose chosen review uses positive words and whose rejected review negative ones."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        movie = rng.choice(MOVIES)
        good = " and ".join(rng.sample(GOOD, 2))
        bad = " and ".join(rng.sample(BAD, 2))
        row = {
            "prompt": f"Write a short review of the movie {movie}.",
            "chosen": f"{movie} is {good}.",
            "rejected": f"{movie} is {bad}.",
        }
        if chat:
            row = {
                "prompt": [{"role": "user", "content": row["prompt"]}],
                "chosen": [{"role": "assistant", "content": row["chosen"]}],
                "rejected": [{"role": "assistant", "content": row["rejected"]}],
            }
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
