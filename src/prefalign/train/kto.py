"""KTO: align a policy on unpaired, labelled completions (Ethayarajh et al. 2024).

Each example is a prompt, one completion and a boolean label (desirable or not); paired data becomes
one desirable and one undesirable row (:func:`prefalign.data.load_unpaired`). With the implicit reward
``r = log pi(y|x) - log pi_ref(y|x)`` and a reference point ``z0`` the loss of an example is
``w_d (1 - sigmoid(beta (r - z0)))`` when desirable, ``w_u (1 - sigmoid(beta (z0 - r)))`` when not
(:func:`prefalign.losses.kto_loss`).

``z0`` estimates ``KL(pi || pi_ref)`` as TRL does: once per optimiser step, the mean log-ratio of
mismatched pairs of the step's examples (completion ``i`` after the prompt of example ``i + 1``, rolled),
computed without gradient, summed over the processes where there are several, and clamped at 0. The
held-out set gets its own ``z0`` the same way, over the whole set.

The reference is a frozen copy of the starting policy (or ``--ref-model``); with LoRA, the policy with
its adapter switched off. Unlike DPO's, its log-probs cannot all be precomputed: the mismatched pairs
depend on which examples share a step.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from prefalign.config import ConfigError, add_config_arguments, config_from_args
from prefalign.losses import kto_loss
from prefalign.train.dpo import REFERENCE_BATCH_FACTOR, adapter_disabled
from prefalign.train.loop import (
    TrainConfig,
    check_run_folder,
    make_accelerator,
    micro_batches,
    read_data,
    report_done,
    seed_everything,
    train_loop,
)


@dataclass(kw_only=True)
class KTOConfig(TrainConfig):
    """Train a policy on unpaired desirable / undesirable completions (KTO; Ethayarajh et al. 2024)."""

    beta: float = 0.1
    """Inverse temperature of the implicit reward log pi - log pi_ref."""
    desirable_weight: float = 1.0
    """Weight of a desirable example's loss (the paper's lambda_D)."""
    undesirable_weight: float = 1.0
    """Weight of an undesirable example's loss (lambda_U); the paper keeps
    lambda_D n_D / (lambda_U n_U) in [1, 4/3]."""
    ref_model: str | None = None
    """Reference model, if not the starting policy (--model)."""

    def checks(self) -> list[tuple[bool, str]]:
        return [
            *super().checks(),
            (0 < self.beta < float("inf"), f"beta must be > 0, got {self.beta}"),
            (0 < self.desirable_weight < float("inf"), f"desirable_weight must be > 0, got {self.desirable_weight}"),
            (
                0 < self.undesirable_weight < float("inf"),
                f"undesirable_weight must be > 0, got {self.undesirable_weight}",
            ),
        ]  # fmt: skip


# --------------------------------------------------------------------------------------------------
# the objective


def sequence(prompt: list[int], completion: list[int], max_length: int | None = None) -> dict[str, Any]:
    """One prompt + completion as ``input_ids`` / ``labels`` (only the completion counted); with
    ``max_length``, the completion is cut so that the pair fits (keeping at least one token)."""
    if max_length is not None:
        completion = completion[: max(1, max_length - len(prompt))]
    return {"input_ids": [*prompt, *completion], "labels": [-100] * len(prompt) + list(completion)}


def mismatched(examples: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Completion ``i`` after the prompt of example ``i + 1`` (rolled): the pairs ``z0`` is taken on."""
    n = len(examples)
    return [
        sequence(examples[(i + 1) % n]["prompt_input_ids"], ex["completion_input_ids"], max_length)
        for i, ex in enumerate(examples)
    ]


def logps(model: nn.Module, sequences: list[dict[str, Any]], budget: int) -> Tensor:
    """``[len(sequences)]`` summed completion log-probs, forward only, in micro-batches of ``budget`` tokens."""
    from prefalign.packing import pack_completions, packed_logps

    out = [torch.zeros(0)]
    with torch.no_grad():
        for micro in micro_batches(sequences, lambda s: len(s["input_ids"]), budget):
            out.append(packed_logps(model, pack_completions(micro)).float().cpu())
    return torch.cat(out)


def _sum_over_processes(values: Tensor, device: torch.device, across: bool) -> Tensor:
    import torch.distributed as dist

    if across and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        total = values.to(device)
        dist.all_reduce(total)
        return total.cpu()
    return values


class KTOObjective:
    """Turns a micro-batch of encoded unpaired examples into the summed KTO loss and metric sums.

    Args:
        model: the policy (possibly a peft model).
        config: the KTO options.
        reference: the frozen reference model, or ``None`` for the policy with its LoRA adapter off.
        training: ``z0`` comes from :meth:`prepare_step` (once per optimiser step, summed over processes);
            otherwise (the held-out set) from :meth:`prepare`, over the examples it is given.
    """

    def __init__(
        self, model: nn.Module, config: KTOConfig, reference: nn.Module | None, training: bool = True
    ) -> None:
        self.model = model
        self.config = config
        self.reference = reference
        self.training = training
        self.z0 = torch.zeros(())
        self._ref: dict[int, Tensor] = {}

    def example_tokens(self, example: dict[str, Any]) -> int:
        return len(example["prompt_input_ids"]) + len(example["completion_input_ids"])

    def _reference_logps(self, sequences: list[dict[str, Any]]) -> Tensor:
        scorer = self.reference if self.reference is not None else self.model
        budget = self.config.micro_batch_tokens * REFERENCE_BATCH_FACTOR
        with adapter_disabled(scorer) if self.reference is None else nullcontext():
            return logps(scorer, sequences, budget)

    def _reference_point(self, examples: list[dict[str, Any]], across: bool) -> None:
        """``z0`` over ``examples`` (summed over processes when ``across``), and their reference log-probs."""
        budget = self.config.micro_batch_tokens * REFERENCE_BATCH_FACTOR
        matched = [sequence(ex["prompt_input_ids"], ex["completion_input_ids"]) for ex in examples]
        shifted = mismatched(examples, self.config.max_length)
        ref = self._reference_logps(matched + shifted)
        self._ref = {ex["index"]: ref[i] for i, ex in enumerate(examples)}
        ratio = logps(self.model, shifted, budget) - ref[len(examples) :] if examples else torch.zeros(0)
        device = next(self.model.parameters()).device
        total = _sum_over_processes(
            torch.stack([ratio.sum(), torch.tensor(float(len(ratio)))]), device, across
        )
        self.z0 = (total[0] / total[1].clamp(min=1)).clamp(min=0)

    def prepare_step(self, share: list[dict[str, Any]]) -> None:
        """Once per optimiser step, on every process (an empty share still joins the sum)."""
        self._reference_point(share, across=True)

    def prepare(self, examples: list[dict[str, Any]]) -> None:
        """The held-out set's ``z0`` and reference log-probs (training steps get theirs from prepare_step)."""
        if not self.training:
            self._reference_point(examples, across=False)

    def loss(self, examples: list[dict[str, Any]]) -> tuple[Tensor, dict[str, Tensor]]:
        from prefalign.packing import pack_completions, packed_logps

        c = self.config
        if any(ex["index"] not in self._ref for ex in examples):  # a batch scored outside a step
            self._reference_point(examples, across=False)
        policy = packed_logps(
            self.model, pack_completions([sequence(ex["prompt_input_ids"], ex["completion_input_ids"]) for ex in examples])
        )  # fmt: skip
        ref = torch.stack([self._ref[ex["index"]] for ex in examples]).to(policy.device, policy.dtype)
        labels = torch.tensor([ex["label"] for ex in examples], device=policy.device)
        z0 = self.z0.to(policy.device)
        mean = kto_loss(policy, ref, labels, z0, c.beta, c.desirable_weight, c.undesirable_weight)
        rewards = c.beta * (policy.detach() - ref)
        good, bad = labels.float(), (~labels).float()
        return mean * len(examples), {
            "rewards/chosen": (rewards * good).sum(),
            "rewards/rejected": (rewards * bad).sum(),
            "logps/chosen": (policy.detach() * good).sum(),
            "logps/rejected": (policy.detach() * bad).sum(),
            "kl": z0 * len(examples),
            "_n/chosen": good.sum(),
            "_n/rejected": bad.sum(),
        }

    def finish_metrics(self, means: dict[str, float]) -> dict[str, float]:
        """Rewards and log-probs as means over the desirable (chosen) or undesirable (rejected) examples
        alone, and their margin; a kind with no example in the step is left out."""
        out = {k: v for k, v in means.items() if not k.startswith("_n/")}
        for kind in ("chosen", "rejected"):
            n = means.get(f"_n/{kind}", 0.0)  # (means are sums / examples: the ratio is sum / n_kind)
            for key in (f"rewards/{kind}", f"logps/{kind}"):
                if key in out and n > 0:
                    out[key] /= n
                else:
                    out.pop(key, None)
        if "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out


# --------------------------------------------------------------------------------------------------
# entry points


def load_examples(config: KTOConfig, tokenizer: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read, validate, tokenise and split unpaired data; each example gets its ``index`` in its set."""
    from prefalign.data import encode_unpaired, load_unpaired, location

    rows, held = read_data(config, load_unpaired)
    if not rows:
        raise ConfigError(f"{config.data}: no training rows left")
    sets = [
        encode_unpaired(tokenizer, r, config.max_length, config.max_prompt_length, config.raw) if r else []
        for r in (rows, held)
    ]
    for examples, source in zip(sets, (rows, held), strict=True):
        for i, (ex, row) in enumerate(zip(examples, source, strict=True)):
            ex["index"], ex["where"] = i, location(row)
    return sets[0], sets[1]


def train(
    config: KTOConfig,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    callback: Callable[[int, nn.Module], None] | None = None,
    reference: nn.Module | None = None,
) -> dict[str, Any]:
    """Run KTO as configured; returns the summary (also written to ``<output>/summary.json``).

    ``model``, ``tokenizer`` and ``reference`` may be passed in (Python use, tests); otherwise they are
    loaded from ``config.model`` / ``config.ref_model`` (with LoRA and no ``--ref-model``, the reference
    is the policy with its adapter off).
    """
    from prefalign.models import load_policy, load_reference, load_tokenizer

    check_run_folder(config)  # before any model is loaded
    seed_everything(config.seed)
    accelerator = make_accelerator()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
    train_set, held = load_examples(config, tokenizer)
    lora = config.lora_settings()
    if model is None:
        model = load_policy(
            config.model, dtype=config.dtype, lora=lora, trust_remote_code=config.trust_remote_code
        )
    if reference is None and (lora is None or config.ref_model):
        reference = load_reference(
            config.ref_model or config.model, dtype=config.dtype, trust_remote_code=config.trust_remote_code
        )
    model.to(accelerator.device)
    if reference is not None:
        reference.to(accelerator.device)
    return train_loop(
        config,
        KTOObjective(model, config, reference),
        train_set,
        held,
        tokenizer=tokenizer,
        accelerator=accelerator,
        eval_objective=KTOObjective(model, config, reference, training=False),
        callback=callback,
    )


def _run(args: argparse.Namespace) -> int:
    config = config_from_args(KTOConfig, args)
    report_done(train(config), config.output, ("loss", "rewards/chosen", "rewards/rejected", "kl"))
    return 0


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "kto", help="KTO on unpaired desirable / undesirable completions.", description=KTOConfig.__doc__
    )
    add_config_arguments(parser, KTOConfig)
    parser.set_defaults(func=_run)
