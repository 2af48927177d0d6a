"""`prefalign generate`: sample completions for prompts from the command line.

The sampling itself is :func:`prefalign.generation.generate`; this module holds the command's options,
the checks made before any model is loaded (device, output file, context and memory bounds) and the
printing and writing of the samples.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prefalign.config import check_device, check_output_file
from prefalign.generation import SamplingSettings, check_settings, context_entry, generate

log = logging.getLogger(__name__)


GENERATE_MEMORY_BOUND = 4 * 2**30
"""Bytes `prefalign generate` may plan to hold for its responses: every response stays in memory until all
are written (see :func:`check_generation_size`)."""

BYTES_PER_POSITION = 36
"""Held per token position of a response row (prompt + response columns): int64 ids and masks and float32
log-probs. Measured: 20,000 responses of up to 64 tokens after a 2-token prompt took 4.58 kB each at peak
(resident set size, the tests' tiny model), 2.1 kB more than responses of 4 tokens, ~35 bytes a position."""

BYTES_PER_RESPONSE = 2300
"""Held per response besides its positions: its record, text and bookkeeping (Python objects). Measured:
50,000 and 100,000 responses of 4 tokens after a 2-token prompt took 2.47 kB each at peak, 2.26 kB of it
besides the 6 positions."""


def check_generation_size(
    num_samples: int, num_prompts: int, longest_prompt: int, max_new_tokens: int
) -> None:
    """Refuse a generation whose responses would not fit :data:`GENERATE_MEMORY_BOUND` in memory.

    Args:
        num_samples: responses per prompt.
        num_prompts: prompts.
        longest_prompt: tokens of the longest prompt as it is generated from (after any cut to the context).
        max_new_tokens: length cap of each response.

    Raises:
        ConfigError: naming ``num_samples``, the number of responses and the estimate.
    """
    from prefalign.config import ConfigError

    responses = num_samples * num_prompts
    positions = longest_prompt + max_new_tokens
    need = responses * (positions * BYTES_PER_POSITION + BYTES_PER_RESPONSE)
    if need <= GENERATE_MEMORY_BOUND:
        return
    count = f"{responses}" if num_prompts == 1 else f"{num_samples} x {num_prompts} prompts = {responses}"
    fits = GENERATE_MEMORY_BOUND // (num_prompts * (positions * BYTES_PER_POSITION + BYTES_PER_RESPONSE))
    fix = f"ask for at most {fits} samples per prompt, or split" if fits >= 1 else "split"
    raise ConfigError(
        f"num_samples: {count} responses of up to {positions} tokens would hold about "
        f"{need / 2**30:,.0f} GiB in memory until they are written, past the {GENERATE_MEMORY_BOUND // 2**30} "
        f"GiB bound of `prefalign generate`; {fix} the prompts into several runs"
    )


def check_context(
    prompt_lengths: Sequence[int], max_new_tokens: int, context: tuple[str, int] | None
) -> None:
    """Refuse a ``max_new_tokens`` for which no prompt leaves room in the model's context.

    The shortest prompt counts (after the cut of a longer prompt to the context): a longer prompt whose
    response runs past the context is warned about by :func:`cap_prompts`, as before, but when even the
    shortest one leaves no room, no response could be sampled from trained positions (and the cache for
    ``max_new_tokens`` positions is allocated up front: ``--max-new-tokens 10**12`` asked for terabytes).

    Args:
        prompt_lengths: tokens of each prompt.
        max_new_tokens: length cap of each response.
        context: ``(config key, length)`` from :func:`context_entry`; None (unknown) checks nothing.

    Raises:
        ConfigError: naming ``max_new_tokens``, the prompt length, the context and how many tokens fit.
    """
    from prefalign.config import ConfigError

    if context is None or not prompt_lengths:
        return
    key, length = context
    shortest = min(min(prompt_lengths), length)
    if shortest + max_new_tokens <= length:
        return
    which = (
        f"a prompt of {shortest} tokens"
        if len(prompt_lengths) == 1
        else f"the shortest prompt ({shortest} tokens)"
    )
    room = length - shortest
    fix = f"at most {room} fit" if room > 0 else "the prompt already fills it; shorten the prompt"
    raise ConfigError(
        f"max_new_tokens: {max_new_tokens} new tokens after {which} pass the model's context of {length} "
        f"tokens ({key} in its config); {fix}"
    )


@dataclass
class GenerateConfig:
    """Sample responses from a model to one prompt or a file of prompts."""

    model: str
    """Local folder, hub id, or builtin name (`prefalign models list`)."""
    prompt: str | None = None
    """One prompt given as text (use this or --prompts)."""
    prompts: str | None = None
    """File or dataset of prompts (JSONL/JSON/CSV/Parquet with a "prompt" field, text or messages)."""
    num_samples: int = 1
    """Responses per prompt."""
    max_new_tokens: int = 256
    """Length cap of each response, in tokens."""
    temperature: float = 0.7
    """Sampling temperature; 0 (or anything below 1e-5) means greedy."""
    top_k: int = 0
    """Sample among the k most likely tokens; 0 turns it off."""
    top_p: float = 0.9
    """Nucleus sampling: smallest set of tokens with this much probability; 1 turns it off."""
    seed: int | None = None
    """Seed for reproducible samples (same prompts, batch size and seed give the same output)."""
    raw: bool = False
    """Send text prompts as they are instead of through the model's chat template."""
    output: str | None = None
    """Write one JSON line per response here instead of printing the responses."""
    batch_size: int = 8
    """Prompts sampled together in one batch."""
    dtype: str = "float32"
    """float32, bfloat16, float16 or auto (bf16 on a CPU without bf16 hardware is ~10x slower)."""
    device: str | None = None
    """Where to run the model (cpu, cuda, cuda:1); default: cuda if available, else cpu."""

    def __post_init__(self) -> None:
        from prefalign.config import ConfigError

        if (self.prompt is None) == (self.prompts is None):
            raise ConfigError("give exactly one of --prompt TEXT or --prompts FILE")
        if self.prompt is not None and not self.prompt.strip():
            raise ConfigError("--prompt is empty")
        if self.num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        try:
            check_settings(self.max_new_tokens, self.temperature, self.top_k, self.top_p)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        check_device(self.device)


def run_generate(config: GenerateConfig) -> list[dict[str, Any]]:
    """Load the model, sample ``num_samples`` responses per prompt and return one record per response.

    Each record: ``prompt`` (as given), ``sample`` (0-based), ``response`` (text), ``num_tokens``,
    ``finished`` (ended with a stop token) and ``logprob`` (sum of the response's token log-probs), after
    the prompt row's other columns (an ``answer`` travels on to ``prefalign score --reward accuracy``).
    """
    from prefalign.data import encode_prompt, load_prompts
    from prefalign.models import load_config, load_policy, load_tokenizer, resolve_model

    rows = [{"prompt": config.prompt}] if config.prompt is not None else load_prompts(config.prompts)
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = resolve_model(config.model)  # fetches a builtin the first time
    tokenizer = load_tokenizer(path)
    ids = [encode_prompt(tokenizer, row["prompt"], raw=config.raw) for row in rows]
    # the sizes against the model's context and memory, before its weights are loaded
    context = context_entry(load_config(path))
    check_context([len(p) for p in ids], config.max_new_tokens, context)
    longest = max(len(p) for p in ids)
    check_generation_size(
        config.num_samples,
        len(ids),
        longest if context is None else min(longest, context[1]),
        config.max_new_tokens,
    )
    start = time.perf_counter()
    model = load_policy(path, dtype=config.dtype, device=device)
    log.info("loaded model %s in %.1f s", config.model, time.perf_counter() - start)
    expanded = [(r, k, p) for r, p in zip(rows, ids, strict=True) for k in range(config.num_samples)]
    start = time.perf_counter()
    settings = SamplingSettings(
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        seed=config.seed,
    )
    out = generate(model, tokenizer, [p for _, _, p in expanded], settings, batch_size=config.batch_size)
    num_tokens = out.response_mask.sum(-1)
    log.info(
        "generated %d tokens for %d responses in %.1f s",
        int(num_tokens.sum()),
        len(expanded),
        time.perf_counter() - start,
    )
    generated = ("sample", "response", "num_tokens", "finished", "logprob")
    return [
        {
            **{c: v for c, v in row.items() if c not in generated},  # the row's other columns (an answer)
            "prompt": row["prompt"],
            "sample": k,
            "response": text,
            "num_tokens": int(n),
            "finished": bool(f),
            "logprob": float(lp),
        }
        for (row, k, _), text, n, f, lp in zip(
            expanded, out.texts, num_tokens, out.finished, out.logprobs.sum(-1), strict=True
        )
    ]


def _print_records(records: list[dict[str, Any]], num_samples: int) -> None:
    if len(records) == 1:
        print(records[0]["response"].strip())
        return
    for rec in records:
        prompt = rec["prompt"] if isinstance(rec["prompt"], str) else rec["prompt"][-1]["content"]
        label = f" [sample {rec['sample'] + 1}/{num_samples}]" if num_samples > 1 else ""
        print(f"### {prompt.strip()}{label}\n{rec['response'].strip()}\n")


def _generate_command(args: argparse.Namespace) -> int:
    from prefalign.config import config_from_args

    config = config_from_args(GenerateConfig, args)
    if config.output is not None:
        check_output_file(config.output)  # before the model is loaded and the sampling done
    records = run_generate(config)
    if config.output is None:
        _print_records(records, config.num_samples)
        return 0
    path = Path(config.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} responses to {path}", file=sys.stderr)
    return 0


def add_commands(subparsers: Any) -> None:
    """Register ``prefalign generate``."""
    from prefalign.config import add_config_arguments

    parser = subparsers.add_parser(
        "generate", help=GenerateConfig.__doc__, description=GenerateConfig.__doc__
    )
    add_config_arguments(parser, GenerateConfig)
    parser.set_defaults(func=_generate_command)
