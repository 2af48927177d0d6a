"""The reference policy: the smoke preset's tiny model, the optional SFT step (the paper's SFT, at this
scale) and sampling continuations from the reference."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prefalign.demo.config import SMOKE_VOCAB
from prefalign.demo.phase import Phase, digest, write_jsonl

if TYPE_CHECKING:
    from prefalign.demo.run import Demo


def plain_text_tokenizer(path: str) -> Any:
    """The model's tokenizer without its chat template.

    The demo continues plain text, so every trainer must encode prompts as
    ``encode_prompt(tokenizer, text, raw=True)`` does; without a template that is what they all do.
    """
    from prefalign.models import load_tokenizer

    tokenizer = load_tokenizer(path)
    tokenizer.chat_template = None
    return tokenizer


def build_smoke_model(demo: Demo) -> None:
    """A tiny random Llama and an in-process tokenizer (prefalign.testing), saved in the run folder.

    The tokenizer's vocabulary is large enough to hold whole words of its corpus ("wonderful",
    "boring", ...), so that random samples now and then carry a word VADER scores and not every
    preference is a tie."""

    def body(phase: Phase) -> dict[str, Any]:
        from prefalign.testing import tiny_causal_lm, tiny_tokenizer

        tokenizer = tiny_tokenizer(vocab_size=SMOKE_VOCAB)
        model = tiny_causal_lm(tokenizer=tokenizer, hidden_size=64, seed=demo.config.seed)
        model.save_pretrained(phase.folder)
        tokenizer.save_pretrained(phase.folder)
        return {"path": str(phase.folder), "vocab": len(tokenizer)}

    folder = demo.out / "tiny-model"
    inputs = {"seed": demo.config.seed, "hidden_size": 64, "vocab": SMOKE_VOCAB}
    demo.phase("tiny-model", folder, inputs, body)
    demo.model_path = str(folder)
    demo.set_reference(str(folder), digest({"model": "tiny-random", **inputs}))


def sample(demo: Demo, prompts: list[str], seed: int) -> list[str]:
    """One continuation per prompt from the reference (temperature 1, no top-k/top-p)."""
    from prefalign.data import encode_prompt
    from prefalign.generation import SamplingSettings, generate

    out = generate(
        demo.reference,
        demo.tokenizer,
        [encode_prompt(demo.tokenizer, p, raw=True) for p in prompts],
        SamplingSettings(max_new_tokens=demo.config.max_new_tokens, seed=seed),
        batch_size=demo.config.sample_batch_size,
        progress=demo.config.progress,
    )
    return out.texts


def sft_step(demo: Demo) -> None:
    """The paper's SFT step, at this scale: fine-tune on the model's own continuations of train prompts;
    the result is the reference from then on."""
    from prefalign.train.sft import SFTConfig
    from prefalign.train.sft import train as train_sft

    c = demo.config
    prompts = demo.train_prompts[: c.sft_prompts]

    def body(phase: Phase) -> dict[str, Any]:
        texts = sample(demo, prompts, c.seed + 2)
        rows = [{"prompt": p, "completion": t} for p, t in zip(prompts, texts, strict=True) if t.strip()]
        data = write_jsonl(phase.folder / "demonstrations.jsonl", rows)
        config = SFTConfig(
            model=demo.model_path,
            data=str(data),
            output=str(phase.folder),
            lr=c.sft_lr,
            batch_size=c.batch_size,
            seed=c.seed,
            progress=c.progress,
        )
        summary = train_sft(config, model=demo.load_policy(), tokenizer=demo.tokenizer)
        return {"demonstrations": len(rows), "steps": summary["steps"]}

    inputs = {"model": demo.reference_key, "prompts": digest(prompts), "lr": c.sft_lr, "seed": c.seed}
    inputs |= {"max_new_tokens": c.max_new_tokens, "batch_size": c.batch_size}
    result = demo.phase("sft", demo.out / "runs" / "sft", inputs, body)
    demo.set_reference(str(demo.out / "runs" / "sft"), result["key"])
