"""DPO and its variants: train a policy directly on preference pairs (Rafailov et al. 2023).

How a batch is computed (the part that makes it fast on a CPU; see :mod:`prefalign.packing`):

- **Prefix sharing.** Each pair becomes one packed sequence ``prompt + chosen + rejected``: the prompt
  is run once for both completions, and each completion still sees exactly ``prompt + itself``.
- **No padding.** All pairs of a micro-batch are concatenated into one row; attention alone runs per
  pair, in padded blocks.
- **LM head only where counted.** Hidden states are gathered at the positions that predict completion
  tokens (``logits_to_keep``); the vocabulary projection never runs over prompt positions.
- **One log-softmax-free gather.** Log-probs are the target logit minus logsumexp (``token_logps``).
- **Reference pass, once.** By default the reference log-probs are computed in one forward-only pass
  over the data before training (split over the processes), so no second model stays in memory and no
  epoch pays for the reference again. The scorer is the starting policy (with LoRA: the policy with its
  adapter switched off) or ``--ref-model``. ``--no-precompute-ref`` keeps a frozen reference and scores
  each batch as it comes instead (the same numbers, more memory).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from prefalign.config import ConfigError, add_config_arguments, config_from_args
from prefalign.losses import DPO_LOSSES, REFERENCE_FREE_LOSSES, check_dpo_args, dpo_loss, orpo_loss
from prefalign.train.loop import (
    TrainConfig,
    check_run_folder,
    load_pairs,
    make_accelerator,
    micro_batches,
    report_done,
    seed_everything,
    train_loop,
)

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class DPOConfig(TrainConfig):
    """Train a policy directly on preference pairs (Rafailov et al. 2023)."""

    beta: float = 0.1
    """Strength of the implicit KL penalty toward the reference model."""
    loss_type: str = "sigmoid"
    """One of sigmoid (DPO), cdpo, robust, ipo, hinge, simpo (prefalign.losses.DPO_LOSSES), or orpo
    (Hong et al. 2024: chosen NLL + beta x log-odds-ratio term, no reference model)."""
    label_smoothing: float = 0.0
    """Assumed rate of flipped preference labels, in [0, 0.5) (cdpo and robust)."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin gamma."""
    reference_free: bool = False
    """Ignore the reference model (its log-probs are taken as 0)."""
    rpo_alpha: float = 0.0
    """Weight of an added NLL term on the chosen completion, per token (RPO; Pang et al. 2024). 0 disables."""
    precompute_ref: bool = True
    """Compute reference log-probs in one forward pass before training, so no reference model stays in
    memory (exact: the reference never changes); --no-precompute-ref scores each batch as it comes."""
    ref_model: str | None = None
    """Reference model, if not the starting policy (--model)."""
    micro_batch_tokens: int = 384
    """Upper bound on tokens per forward pass: batches are split into micro-batches to bound memory
    (exact). Lower than other commands' 512, which keeps the peak of the DPO benchmark under half of
    TRL's at no measurable cost in time (BENCHMARKS.md)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rpo_alpha < 0:
            raise ConfigError(f"rpo_alpha must be >= 0, got {self.rpo_alpha}")
        if self.loss_type == ORPO:
            if self.rpo_alpha:
                raise ConfigError("rpo_alpha: orpo's loss already holds the chosen completion's NLL")
            if self.ref_model:
                raise ConfigError("ref_model: orpo uses no reference model")
        try:
            loss_type = "sigmoid" if self.loss_type == ORPO else self.loss_type  # (orpo: only beta to check)
            check_dpo_args(loss_type, self.beta, self.label_smoothing)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    @property
    def needs_reference(self) -> bool:
        return not (self.reference_free or self.loss_type in REFERENCE_FREE_LOSSES or self.loss_type == ORPO)

    @property
    def average_logps(self) -> bool:
        """SimPO and ORPO score completions by their length-averaged log-probability."""
        return self.loss_type in ("simpo", ORPO)


ORPO = "orpo"
"""ORPO (Hong et al. 2024) is a ``--loss-type`` of its own: not a function of the log-ratio difference
(``DPO_LOSSES``) but :func:`prefalign.losses.orpo_loss` of the chosen and rejected log-probs."""


# --------------------------------------------------------------------------------------------------
# the objective


REFERENCE_BATCH_FACTOR = 4
"""Forward-only passes keep no activations, so they run on micro-batches this many times larger."""


def reference_pass(
    scorer: nn.Module,
    examples: list[dict[str, Any]],
    config: DPOConfig,
    adapter_off: bool = False,
    progress: bool = False,
    split: bool = False,
    only: set[int] | None = None,
) -> Tensor:
    """Reference log-probs ``[len(examples), 2]`` (chosen, rejected), forward only, in eval mode.

    Args:
        scorer: the reference model, or the policy itself (the reference before training starts, or,
            with ``adapter_off``, a LoRA policy's base weights).
        split: under several processes, each scores every N-th example and the shares are summed
            across processes (the other rows are zeros, so the sum is exact); every process returns the
            whole table.
        only: score just the micro-batches that hold one of these example indices (the others' rows
            stay 0). Micro-batches are formed over all of ``examples`` either way, so an example's
            log-probs do not depend on which others are asked for (a resumed run gets the same numbers).
    """
    # packing is imported here, not at the top: building the parser (`--help`) must not import transformers
    import torch.distributed as dist

    from prefalign.packing import pack_pairs, packed_logps, pair_tokens

    out = torch.zeros(len(examples), 2)
    items = list(enumerate(examples))
    world = dist.get_world_size() if split and dist.is_available() and dist.is_initialized() else 1
    if world > 1:
        items = items[dist.get_rank() :: world]
    groups = micro_batches(
        items, lambda item: pair_tokens(item[1]), config.micro_batch_tokens * REFERENCE_BATCH_FACTOR
    )
    if only is not None:
        groups = [g for g in groups if any(i in only for i, _ in g)]
    was_training = scorer.training
    scorer.eval()
    with torch.inference_mode(), adapter_disabled(scorer) if adapter_off else nullcontext():
        for group in tqdm(groups, desc="reference log-probs", unit="batch", disable=not progress):
            logps = packed_logps(scorer, pack_pairs([ex for _, ex in group]), config.average_logps)
            out[torch.tensor([i for i, _ in group])] = logps.float().cpu().view(-1, 2)
    scorer.train(was_training)
    if world > 1:  # an empty share still joins the collective call
        device = next(scorer.parameters()).device
        total = out.to(device)
        dist.all_reduce(total)
        out = total.cpu()
    return out.clone()


class DPOObjective:
    """Turns a micro-batch of encoded pairs into the summed DPO loss and per-pair metric sums.

    Args:
        model: the policy (possibly a peft model).
        config: the DPO options.
        reference: a frozen reference model, or ``None`` when reference log-probs come from ``ref_logps``,
            from the policy with its LoRA adapter disabled, or are not needed.
        ref_logps: precomputed ``[n, 2]`` reference log-probs indexed by each example's ``"index"``.
    """

    def __init__(
        self,
        model: nn.Module,
        config: DPOConfig,
        reference: nn.Module | None = None,
        ref_logps: Tensor | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.reference = reference
        self.ref_logps = ref_logps
        self._batch_ref: dict[int, Tensor] = {}

    def example_tokens(self, example: dict[str, Any]) -> int:
        from prefalign.packing import pair_tokens

        return pair_tokens(example)

    def prepare(self, examples: list[dict[str, Any]]) -> None:
        """Score a whole batch under the reference before its micro-batches run (called by the loop)."""
        if not self.config.needs_reference or self.ref_logps is not None:
            return
        scorer = self.reference if self.reference is not None else self.model
        rows = reference_pass(scorer, examples, self.config, adapter_off=self.reference is None)
        self._batch_ref = {ex["index"]: row for ex, row in zip(examples, rows, strict=True)}

    def reference_logps(self, examples: list[dict[str, Any]]) -> Tensor | None:
        """``[2B]`` reference log-probs for these pairs, or ``None`` when the loss has no reference."""
        if not self.config.needs_reference:
            return None
        if self.ref_logps is not None:
            return self.ref_logps[torch.tensor([ex["index"] for ex in examples])].reshape(-1)
        if any(ex["index"] not in self._batch_ref for ex in examples):
            self.prepare(examples)
        return torch.stack([self._batch_ref[ex["index"]] for ex in examples]).reshape(-1)

    def loss(self, examples: list[dict[str, Any]]) -> tuple[Tensor, dict[str, Tensor]]:
        from prefalign.packing import pack_pairs, packed_logps

        packed = pack_pairs(examples)
        policy = packed_logps(self.model, packed, self.config.average_logps)
        ref = self.reference_logps(examples)
        ref = None if ref is None else ref.to(policy.device)
        c = self.config
        if c.loss_type == ORPO:
            return self.orpo(policy)
        out = dpo_loss(
            policy[0::2],
            policy[1::2],
            None if ref is None else ref[0::2],
            None if ref is None else ref[1::2],
            beta=c.beta,
            loss_type=c.loss_type,
            label_smoothing=c.label_smoothing,
            margin=c.simpo_gamma,
            reference_free=c.reference_free,
        )
        losses = out.losses
        margins = out.chosen_rewards - out.rejected_rewards
        metrics = {
            "rewards/chosen": out.chosen_rewards.sum(),
            "rewards/rejected": out.rejected_rewards.sum(),
            "rewards/margins": margins.sum(),
            "rewards/accuracies": (margins > 0).float().sum(),
            "logps/chosen": policy[0::2].detach().sum(),
            "logps/rejected": policy[1::2].detach().sum(),
        }
        if c.rpo_alpha:
            per_token = (
                policy[0::2] if c.average_logps else policy[0::2] / packed.lengths[0::2].to(policy.device)
            )
            losses = losses + c.rpo_alpha * -per_token
            metrics["nll/chosen"] = -per_token.detach().sum()
        return losses.sum(), metrics

    def orpo(self, policy: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """ORPO's summed loss and metric sums from ``[2B]`` length-averaged log-probs (chosen, rejected)."""
        chosen, rejected = policy[0::2], policy[1::2]
        out = orpo_loss(chosen, rejected, beta=self.config.beta)
        margins = out.chosen_rewards - out.rejected_rewards
        return out.losses.sum(), {
            "rewards/chosen": out.chosen_rewards.sum(),
            "rewards/rejected": out.rejected_rewards.sum(),
            "rewards/margins": margins.sum(),
            "rewards/accuracies": (margins > 0).float().sum(),
            "logps/chosen": chosen.detach().sum(),
            "logps/rejected": rejected.detach().sum(),
            "nll/chosen": -chosen.detach().sum(),
        }


# --------------------------------------------------------------------------------------------------
# entry points


def adapter_disabled(model: nn.Module) -> Any:
    """Context in which a LoRA model computes with its base weights (a no-op for other models):
    :func:`prefalign.models.adapter_disabled`, imported when called (building the parser stays light)."""
    from prefalign.models import adapter_disabled as disabled

    return disabled(model)


def steps_examples(config: DPOConfig, n: int) -> list[int]:
    """Indices of the training examples the run's steps will use, in order (all of them from one full
    epoch on; fewer for ``--epochs`` below 1 or a small ``--max-steps``)."""
    import torch.distributed as dist

    from prefalign.train.loop import step_batches, total_steps

    procs = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    stream = step_batches(n, config.examples_per_step * procs, config.seed)
    used: set[int] = set()
    for _ in range(total_steps(config, n, procs)):
        used.update(next(stream))
        if len(used) == n:
            break
    return sorted(used)


def build_objective(
    config: DPOConfig,
    train: list[dict[str, Any]],
    held: list[dict[str, Any]],
    model: nn.Module | None = None,
    reference: nn.Module | None = None,
    device: torch.device | None = None,
) -> tuple[DPOObjective, DPOObjective | None]:
    """Load the models (unless given) and set up the reference the config asks for.

    The reference is ``--ref-model`` if given, else the starting policy (with LoRA: the policy with its
    adapter switched off). By default it scores the data once before training and is then dropped;
    ``--no-precompute-ref`` keeps it (a frozen copy, or the adapter switched off per batch).

    Returns:
        The training objective and one over the held-out pairs (``None`` without held-out pairs).
    """
    from prefalign.models import load_policy, load_reference

    lora = config.lora_settings()
    if model is None:
        model = load_policy(
            config.model, dtype=config.dtype, lora=lora, trust_remote_code=config.trust_remote_code
        )
    policy_is_reference = not config.ref_model and (lora is not None or config.precompute_ref)
    if config.needs_reference and reference is None and not policy_is_reference:
        reference = load_reference(
            config.ref_model or config.model, dtype=config.dtype, trust_remote_code=config.trust_remote_code
        )
    if device is not None:
        model.to(device)
        if reference is not None:
            reference.to(device)
    if not (config.needs_reference and config.precompute_ref):
        make = lambda: DPOObjective(model, config, reference=reference)  # noqa: E731
        return make(), (make() if held else None)
    scorer = reference if reference is not None else model
    off = reference is None
    used = steps_examples(config, len(train))  # a run shorter than an epoch scores only what it uses
    ref_train = reference_pass(
        scorer, train, config, adapter_off=off, progress=config.progress, split=True, only=set(used)
    )
    unused = torch.ones(len(train), dtype=torch.bool)
    unused[used] = False
    ref_train[unused] = float("nan")  # a pair the run does not use has no reference: NaN, never a 0
    ref_held = reference_pass(scorer, held, config, adapter_off=off, split=True) if held else None
    return DPOObjective(model, config, ref_logps=ref_train), (
        DPOObjective(model, config, ref_logps=ref_held) if held else None
    )


def train(
    config: DPOConfig,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    callback: Callable[[int, nn.Module], None] | None = None,
    reference: nn.Module | None = None,
) -> dict[str, Any]:
    """Run DPO as configured; returns the summary (also written to ``<output>/summary.json``).

    ``model``, ``tokenizer`` and ``reference`` may be passed in (Python use, tests); otherwise they are
    loaded from ``config.model`` / ``config.ref_model``. ``callback(step, model)`` is passed to
    :func:`~prefalign.train.loop.train_loop`.
    """
    from prefalign.models import load_tokenizer

    check_run_folder(config)  # before any model is loaded
    seed_everything(config.seed)
    accelerator = make_accelerator()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
    train_set, held = load_pairs(config, tokenizer)
    objective, eval_objective = build_objective(config, train_set, held, model, reference, accelerator.device)
    return train_loop(
        config,
        objective,
        train_set,
        held,
        tokenizer=tokenizer,
        accelerator=accelerator,
        eval_objective=eval_objective,
        callback=callback,
    )


# --------------------------------------------------------------------------------------------------
# command line


def _run(args: argparse.Namespace) -> int:
    config = config_from_args(DPOConfig, args)
    report_done(
        train(config),
        config.output,
        ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"),
    )
    return 0


def add_commands(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "dpo",
        help="Direct Preference Optimisation on preference pairs.",
        description=DPOConfig.__doc__ + f" Loss types: {', '.join([*DPO_LOSSES, ORPO])}.",
    )
    add_config_arguments(parser, DPOConfig)
    parser.set_defaults(func=_run)
