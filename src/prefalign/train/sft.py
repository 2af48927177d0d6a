"""Supervised fine-tuning: maximise the likelihood of demonstration completions (the first stage of RLHF).

Each micro-batch is one packed row with no padding (every sequence restarts its positions and attends
only to itself); the vocabulary projection runs only at positions whose next token is counted (the
completion, or the whole text for plain ``text`` rows).

The loss of an example is the mean negative log-likelihood of its counted tokens; a step's loss is the
mean over its examples.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from prefalign.config import ConfigError, add_config_arguments, config_from_args
from prefalign.train.loop import (
    TrainConfig,
    check_run_folder,
    make_accelerator,
    read_data,
    report_done,
    seed_everything,
    train_loop,
)

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class SFTConfig(TrainConfig):
    """Supervised fine-tuning on demonstrations (text, prompt/completion, or messages)."""

    lr: float = 2e-5
    """Peak learning rate."""


class SFTObjective:
    """Summed per-example mean NLL of the counted tokens."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def example_tokens(self, example: dict[str, Any]) -> int:
        return len(example["input_ids"])

    def loss(self, examples: list[dict[str, Any]]) -> tuple[Tensor, dict[str, Tensor]]:
        # packing is imported here, not at the top: building the parser (`--help`) must not import it
        from prefalign.packing import pack_completions, packed_logps

        packed = pack_completions(examples)
        mean_logps = packed_logps(self.model, packed, average=True)
        nll = -mean_logps
        return nll.sum(), {"logps/mean": mean_logps.detach().sum(), "tokens": packed.lengths.sum().float()}


def train(
    config: SFTConfig,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    callback: Callable[[int, nn.Module], None] | None = None,
) -> dict[str, Any]:
    """Run SFT as configured; returns the summary (also written to ``<output>/summary.json``).

    ``callback(step, model)`` is passed to :func:`~prefalign.train.loop.train_loop`.
    """
    from prefalign.data import encode_sft_examples, load_sft, location
    from prefalign.models import load_policy, load_tokenizer

    check_run_folder(config)  # before any model is loaded
    seed_everything(config.seed)
    accelerator = make_accelerator()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
    rows, held = read_data(config, load_sft)
    encoded = encode_sft_examples(tokenizer, rows, config.max_length, config.raw)
    for ex, row in zip(encoded, rows, strict=True):
        ex["where"] = location(row)  # named if a step with it diverges
    train_set = [ex for ex in encoded if any(x != -100 for x in ex["labels"][1:])]
    if not train_set:
        raise ConfigError(f"{config.data}: no example has a completion token left to train on")
    dropped = len(encoded) - len(train_set)
    if dropped:
        log.warning(
            "dropped %d of %d examples whose prompt fills max_length=%d (no completion token left)",
            dropped,
            len(encoded),
            config.max_length,
        )
    held_set = encode_sft_examples(tokenizer, held, config.max_length, config.raw) if held else []
    if model is None:
        lora = config.lora_settings()
        model = load_policy(
            config.model, dtype=config.dtype, lora=lora, trust_remote_code=config.trust_remote_code
        )
    model.to(accelerator.device)
    return train_loop(
        config,
        SFTObjective(model),
        train_set,
        held_set,
        tokenizer=tokenizer,
        accelerator=accelerator,
        extra_summary={"dropped_examples": dropped},
        callback=callback,
    )


def _run(args: argparse.Namespace) -> int:
    config = config_from_args(SFTConfig, args)
    report_done(train(config), config.output, ("loss",))
    return 0


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sft", help="Supervised fine-tuning on demonstrations.", description=SFTConfig.__doc__
    )
    add_config_arguments(parser, SFTConfig)
    parser.set_defaults(func=_run)
