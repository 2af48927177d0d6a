"""The offline step loop (SFT, reward model, DPO): Accelerate, accumulation, micro-batches, optimiser step.

A method supplies an :class:`Objective`: the trainable model and a function from a list of encoded
examples to the *sum* of their losses plus per-example metric sums. The loop owns the rest, built from the
pieces every trainer shares: the options (:mod:`~prefalign.train.options`), the run folder and metrics
(:mod:`~prefalign.train.run_folder`), checkpoints (:mod:`~prefalign.train.checkpoint`), the optimiser and
schedule (:mod:`~prefalign.train.optim`), the processes (:mod:`~prefalign.train.processes`) and the outer
loop of Ctrl-C, non-finite steps, cadence and progress (:mod:`~prefalign.train.driver`). What is its own
is deterministic data order, gradient accumulation and micro-batching by a token budget (memory is bounded
by the micro-batch, not the batch).

Because objectives return sums over examples, splitting a step's ``n`` examples into any number of
processes, chunks and micro-batches and scaling each loss sum by ``processes / n`` (DDP averages the
processes' gradients) gives exactly the gradient of the step's mean loss: batch 2 x 4 accumulation steps
equals batch 8 x 1, and 3 examples on 2 processes weigh 1/3 each.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from prefalign.config import ConfigError
from prefalign.data import batches
from prefalign.train.checkpoint import (
    checkpoint_folders,
    checkpoint_problem,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    save_final_model,
    save_run_checkpoint,
    save_run_model,
)
from prefalign.train.driver import DivergenceError, Interrupt, train_steps
from prefalign.train.model_card import write_model_card
from prefalign.train.optim import clip_gradients, contiguous_gradients, make_optimizer, make_scheduler
from prefalign.train.options import OPTIMIZERS, SCHEDULES, SINKS, TrainConfig
from prefalign.train.precision import LossScaler
from prefalign.train.processes import (
    distributed_type,
    make_accelerator,
    seed_everything,
    sharded,
    sum_over_processes,
)
from prefalign.train.run_folder import (
    MetricsWriter,
    begin_run,
    check_run_folder,
    clear_run,
    open_metrics,
    read_metrics,
    report_done,
    truncate_metrics,
    write_summary,
)

__all__ = [  # the names this module has always offered, wherever they live now
    "OPTIMIZERS",
    "SCHEDULES",
    "SINKS",
    "DivergenceError",
    "MetricsWriter",
    "Objective",
    "TrainConfig",
    "check_run_folder",
    "checkpoint_folders",
    "checkpoint_problem",
    "clear_run",
    "describe_examples",
    "held_out_metrics",
    "latest_checkpoint",
    "load_checkpoint",
    "load_pairs",
    "make_accelerator",
    "make_optimizer",
    "make_scheduler",
    "micro_batches",
    "prune_checkpoints",
    "read_data",
    "read_metrics",
    "report_done",
    "run_examples",
    "save_checkpoint",
    "save_final_model",
    "seed_everything",
    "sharded",
    "split_rows",
    "step_batches",
    "total_steps",
    "train_loop",
    "truncate_metrics",
]

log = logging.getLogger(__name__)


class Objective(Protocol):
    """What a training method gives the loop."""

    model: nn.Module
    """The trainable model (prepared by Accelerate by the loop)."""

    def example_tokens(self, example: dict[str, Any]) -> int:
        """Tokens one example costs in a forward pass (for micro-batching by token budget)."""
        ...

    def loss(self, examples: list[dict[str, Any]]) -> tuple[Tensor, dict[str, Tensor]]:
        """Sum of the examples' losses, and per-example metric values summed over the examples."""
        ...

    # Optional: ``prepare(examples)`` is called once per batch before its micro-batches, for work that
    # needs no gradient and is cheaper in one large pass (DPO's reference log-probs).
    # ``prepare_step(share)`` is called once per optimiser step on every process with its share of the
    # step (possibly empty), so it may join collective calls (KTO's reference point, summed over processes).
    # ``finish_metrics(means)`` turns the step's (or the held-out set's) per-example means into the logged
    # metrics (KTO's means over desirable or undesirable examples only).


def finish_metrics(objective: Any, metrics: dict[str, float]) -> dict[str, float]:
    """``objective.finish_metrics(metrics)`` where the objective has it, else ``metrics`` as they are."""
    finish = getattr(objective, "finish_metrics", None)
    return finish(metrics) if finish is not None else metrics


# --------------------------------------------------------------------------------------------------
# data order, micro-batches


def step_batches(n: int, per_step: int, seed: int) -> Iterator[list[int]]:
    """Endless stream of index lists, ``per_step`` each, epoch after epoch. The order depends only on
    (seed, epoch), so a resumed run sees the same batches; an epoch's last partial batch is kept, so every
    example is seen once per epoch."""
    epoch = 0
    while True:
        yield from batches(n, per_step, seed, epoch)
        epoch += 1


def micro_batches(examples: Sequence[dict[str, Any]], cost: Any, budget: int) -> list[list[dict[str, Any]]]:
    """Split ``examples`` (in order) into runs whose summed ``cost(example)`` stays within ``budget``.

    An example larger than the budget forms a micro-batch of its own.
    """
    out: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    used = 0
    for ex in examples:
        c = cost(ex)
        if current and used + c > budget:
            out.append(current)
            current, used = [], 0
        current.append(ex)
        used += c
    if current:
        out.append(current)
    return out


def split_rows(
    rows: list[Any], eval_rows: list[Any], fraction: float, seed: int
) -> tuple[list[Any], list[Any]]:
    """Hold out ``fraction`` of ``rows`` (shuffled by ``seed``) unless an eval set was given.

    Raises:
        ConfigError: the held-out share would leave no row to train on (both counts named).
    """
    if eval_rows or fraction <= 0:
        return rows, eval_rows
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(fraction * len(rows))))
    if n_eval >= len(rows):
        raise ConfigError(
            f"--eval-split {fraction} holds out {n_eval} of the {len(rows)} training rows, leaving 0 to train "
            "on: lower --eval-split or give a held-out set of its own (--eval-data, --eval-prompts)"
        )
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


def read_data(config: TrainConfig, loader: Callable[..., list[Any]]) -> tuple[list[Any], list[Any]]:
    """The training and held-out rows that ``loader`` (a ``prefalign.data.load_*``) reads from the
    sources the config names (``--data``/``--eval-data``, their splits and subset, ``--columns``),
    with ``--eval-split`` held out when no held-out set is given."""
    train, held = config.data_sources()
    return split_rows(loader(**train), loader(**held) if held else [], config.eval_split, config.seed)


def load_pairs(config: TrainConfig, tokenizer: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read, validate, tokenise and split preference data (DPO, reward models); each example gets its
    ``index`` in its set."""
    from prefalign.data import encode_preferences, load_preferences, location

    rows, held = read_data(config, load_preferences)
    if not rows:
        raise ConfigError(f"{config.data}: no training pairs left")
    sets = [
        encode_preferences(tokenizer, r, config.max_length, config.max_prompt_length, config.raw) if r else []
        for r in (rows, held)
    ]
    for examples, source in zip(sets, (rows, held), strict=True):
        for ex, row in zip(examples, source, strict=True):
            ex["where"] = location(row)
    sets[0] = distinct_pairs(sets[0], config)
    for examples in sets:
        for i, ex in enumerate(examples):
            ex["index"] = i
    return sets[0], sets[1]


def distinct_pairs(examples: list[dict[str, Any]], config: TrainConfig) -> list[dict[str, Any]]:
    """The encoded pairs whose chosen and rejected tokens still differ (after the cut to --max-length):
    an identical pair teaches nothing. Those dropped are counted in a warning; none left is an error."""
    kept = [ex for ex in examples if ex["chosen_input_ids"] != ex["rejected_input_ids"]]
    dropped = len(examples) - len(kept)
    if not kept:
        raise ConfigError(
            f"{config.data}: chosen and rejected are identical in all {len(examples)} training pairs once cut "
            f"to max_length={config.max_length} (max_prompt_length={config.max_prompt_length}): nothing to "
            "train on; raise --max-length or lower --max-prompt-length"
        )
    if dropped:
        log.warning(
            "dropped %d of %d pairs whose chosen and rejected are identical once cut to max_length=%d",
            dropped, len(examples), config.max_length,
        )  # fmt: skip
    return kept


def total_steps(config: TrainConfig, n_examples: int, processes: int = 1) -> int:
    """Optimiser steps of the run: ``--max-steps``, or ``--epochs`` passes over ``n_examples``."""
    per_step = config.examples_per_step * processes
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil(config.epochs * n_examples / per_step))


# --------------------------------------------------------------------------------------------------
# forward and backward over examples


def reduce_metrics(sums: dict[str, Tensor], count: int) -> dict[str, float]:
    """Per-example means of metric sums."""
    return {k: float(v) / max(count, 1) for k, v in sums.items()}


def run_examples(
    objective: Objective,
    examples: Sequence[dict[str, Any]],
    budget: int,
    scale: float | None,
    backward: Any = None,
    sync: Any = None,
) -> tuple[dict[str, Tensor], int]:
    """Forward (and backward when ``scale`` is given) over micro-batches; returns metric sums and tokens.

    ``sync(is_last_micro_batch)`` gives the context each micro-batch runs in (under DDP: ``no_sync`` for
    all but the step's last one, so gradients are all-reduced once per step).
    """
    sums: dict[str, Tensor] = {}
    tokens = 0
    if hasattr(objective, "prepare"):
        objective.prepare(list(examples))  # per-batch work without gradients (e.g. reference log-probs)
    micros = micro_batches(examples, objective.example_tokens, budget)
    for j, micro in enumerate(micros):
        with sync(j == len(micros) - 1) if sync is not None else nullcontext():
            loss_sum, metrics = objective.loss(micro)
            if scale is not None:
                (backward or (lambda x: x.backward()))(loss_sum * scale)
        metrics = {"loss": loss_sum.detach(), **metrics}
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        tokens += sum(objective.example_tokens(ex) for ex in micro)
    return sums, tokens


def held_out_metrics(
    objective: Objective, examples: Sequence[dict[str, Any]], config: TrainConfig, prefix: str = "val/"
) -> dict[str, float]:
    """Mean loss and metrics of ``objective`` over held-out ``examples``, without gradients (the offline
    evaluation; the online methods sample and score held-out prompts instead:
    :func:`prefalign.train.online.held_out_scores`)."""
    if not examples:
        return {}
    was_training = objective.model.training
    objective.model.eval()
    with torch.no_grad():
        sums, _ = run_examples(objective, examples, config.micro_batch_tokens, None)
    objective.model.train(was_training)
    means = finish_metrics(objective, reduce_metrics(sums, len(examples)))
    return {prefix + k: v for k, v in means.items()}


# --------------------------------------------------------------------------------------------------
# the run


_SHOWN = ("loss", "rewards/accuracies", "rewards/margins", "accuracy", "tokens_per_s")


@dataclass
class _Run:
    """Everything the steps of one run share (a :class:`prefalign.train.driver.StepRun`)."""

    config: TrainConfig
    objective: Objective
    scorer: Objective
    train_examples: Sequence[dict[str, Any]]
    eval_examples: Sequence[dict[str, Any]]
    accelerator: Any
    optimizer: Any
    scheduler: Any
    writer: MetricsWriter
    state: dict[str, Any]
    total: int
    tokenizer: Any = None
    callback: Callable[[int, nn.Module], None] | None = None
    interrupt: Interrupt = field(default_factory=Interrupt)
    saved_step: int = -1
    """The step of the newest checkpoint this run wrote or resumed from."""
    stream: Iterator[list[int]] | None = None
    scaler: LossScaler | None = None
    """fp16's loss scale (:mod:`~prefalign.train.precision`); inactive otherwise."""

    name = "train"
    unit = "step"
    shown = _SHOWN
    release_every = 0  # (its gradients live in one buffer across steps: the peak is the same either way)

    @property
    def output(self) -> Path:
        return Path(self.config.output)

    @property
    def per_step(self) -> int:
        """Examples of one optimiser step over all processes."""
        return self.config.examples_per_step * self.accelerator.num_processes

    def lean_target(self) -> tuple[nn.Module, list[nn.Parameter]]:
        model = self.accelerator.unwrap_model(self.objective.model)
        single = self.accelerator.num_processes == 1 and not sharded(self.accelerator)
        # (DDP must see every gradient arrive through autograd; FSDP / DeepSpeed own their buffers)
        return model, [p for p in model.parameters() if p.requires_grad] if single else []

    def begin(self) -> None:
        self.stream = step_batches(len(self.train_examples), self.per_step, self.config.seed)
        for _ in range(self.state["step"]):
            next(self.stream)  # deterministic order: skip what the resumed run already consumed
        self.objective.model.train()

    def advance(self) -> dict[str, float]:
        metrics = _one_step(self, next(self.stream))
        metrics["epoch"] = (self.state["step"] + 1) * self.per_step / len(self.train_examples)
        return metrics

    def evaluate(self) -> dict[str, float]:
        return held_out_metrics(self.scorer, self.eval_examples, self.config)

    def save(self) -> None:
        save_run_checkpoint(
            self.accelerator,
            self.output,
            self.accelerator.unwrap_model(self.objective.model),
            self.optimizer,
            self.scheduler,
            self.state,
            self.tokenizer,
            self.config,
        )
        self.saved_step = self.state["step"]

    def trained_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.objective.model)


def train_loop(
    config: TrainConfig,
    objective: Objective,
    train_examples: Sequence[dict[str, Any]],
    eval_examples: Sequence[dict[str, Any]] = (),
    tokenizer: Any = None,
    accelerator: Any = None,
    extra_summary: dict[str, Any] | None = None,
    eval_objective: Objective | None = None,
    callback: Callable[[int, nn.Module], None] | None = None,
) -> dict[str, Any]:
    """Train ``objective.model`` on ``train_examples``; returns (and writes) the run summary.

    Writes to ``config.output``: ``config.yaml``, ``metrics.jsonl``, ``checkpoints/step-N`` (every
    ``config.save_every`` steps and after the last one), the final model (Hugging Face folder) and
    ``summary.json``. A folder that already holds a run is refused unless ``config.resume`` (continue
    from its latest whole checkpoint, same settings but the step budget) or ``config.overwrite``.
    ``eval_objective`` scores ``eval_examples`` when they need their own state (e.g. precomputed
    reference log-probs); by default ``objective`` does. ``callback(step, model)`` is called on the main
    process after every ``config.eval_every`` optimiser steps and after the last one, with the unwrapped
    model (e.g. to sample from it along training).

    Raises:
        ConfigError: the run folder or the resumed checkpoint is unusable (see :func:`check_run_folder`).
        DivergenceError: a step's loss or gradient is not finite (without ``config.skip_nonfinite``); the
            last good state is saved as a checkpoint first.
        KeyboardInterrupt: after Ctrl-C, once a checkpoint of the last finished step is saved.
    """
    start = time.perf_counter()
    accelerator = accelerator or make_accelerator()
    ckpt = check_run_folder(config)
    run = _start(config, objective, train_examples, eval_examples, accelerator, ckpt)
    run.scorer, run.tokenizer, run.callback = eval_objective or objective, tokenizer, callback
    run.scaler = LossScaler(config.mixed_precision, accelerator.device, run.state)
    try:
        last_metrics, final_eval = train_steps(run)
    finally:
        run.writer.close()
    step = run.state["step"]
    save_run_model(
        accelerator, objective.model, run.trained_model(), tokenizer, run.output, step, run.saved_step
    )
    summary = {
        "steps": step,
        "train_examples": len(train_examples),
        "eval_examples": len(eval_examples),
        "final": last_metrics,
        "eval": final_eval,
        "wall_s": round(time.perf_counter() - start, 3),
        **(extra_summary or {}),
    }
    if accelerator.is_main_process:
        write_summary(run.output, summary)
        write_model_card(run.output, config, summary)
    return summary


def _start(
    config: TrainConfig,
    objective: Objective,
    train_examples: Sequence[dict[str, Any]],
    eval_examples: Sequence[dict[str, Any]],
    accelerator: Any,
    ckpt: Path | None,
) -> _Run:
    """The optimiser and schedule, the model prepared by Accelerate, the run folder made ready, the
    checkpoint ``ckpt`` (if resuming) loaded and the metrics opened."""
    params = [p for p in objective.model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    if sharded(accelerator):
        if ckpt is not None:
            raise ConfigError("--resume is not available under FSDP or DeepSpeed (no mid-run checkpoints)")
        log.warning("FSDP/DeepSpeed: only the final model is saved (no mid-run checkpoints)")
    optimizer = make_optimizer(params, config)
    steps = total_steps(config, len(train_examples), accelerator.num_processes)
    scheduler = make_scheduler(optimizer, config, steps)
    # The scheduler stays ours: Accelerate would step a prepared one once per process per step.
    objective.model, optimizer = accelerator.prepare(objective.model, optimizer)
    if not sharded(accelerator):  # (FSDP / DeepSpeed manage their own gradient buffers)
        contiguous_gradients(params)
    begin_run(config, accelerator)
    state = {"step": 0}
    if ckpt is not None:
        state = load_checkpoint(ckpt, accelerator.unwrap_model(objective.model), optimizer, scheduler)
        log.info("resumed from %s (step %d)", ckpt, state["step"])
    writer = open_metrics(config, accelerator, state["step"] if ckpt is not None else None)
    return _Run(
        config, objective, objective, train_examples, eval_examples, accelerator, optimizer, scheduler,
        writer, state, steps, saved_step=state["step"] if ckpt is not None else -1,
    )  # fmt: skip


def _one_step(run: _Run, batch: list[int]) -> dict[str, float]:
    """One optimiser step over the step's examples ``batch`` (indices, all processes together).

    Each process takes its share (``batch[rank::processes]``) in chunks of batch_size with micro-batches
    inside. Every example weighs 1 / len(batch) in the step's gradient however the batch splits over the
    processes: each process scales its loss sum by ``processes / len(batch)`` and DDP averages the
    processes' gradients. A process with an empty share runs one example at weight 0, so that it still
    joins every collective call.
    """
    config, accelerator, objective = run.config, run.accelerator, run.objective
    scaler = run.scaler or LossScaler("no", accelerator.device, run.state)

    def backward(loss: Tensor) -> None:
        accelerator.backward(scaler.scale(loss))

    t0 = time.perf_counter()
    share = [run.train_examples[i] for i in batch[accelerator.process_index :: accelerator.num_processes]]
    count = len(share)
    examples = share or [run.train_examples[batch[0]]]
    if hasattr(objective, "prepare_step"):
        objective.prepare_step(share)
    scale = accelerator.num_processes / len(batch) if count else 0.0
    sums: dict[str, Tensor] = {}
    tokens = 0
    chunks = [examples[i : i + config.batch_size] for i in range(0, len(examples), config.batch_size)]
    for k, chunk in enumerate(chunks):

        def sync(last_micro: bool, last_chunk: bool = k == len(chunks) - 1) -> Any:
            last = last_micro and last_chunk
            if distributed_type(accelerator) == "DEEPSPEED":  # its engine steps on the step's last backward
                accelerator.gradient_state._set_sync_gradients(last)
                return nullcontext()
            return nullcontext() if last else accelerator.no_sync(objective.model)

        chunk_sums, chunk_tokens = run_examples(
            objective, chunk, config.micro_batch_tokens, scale, backward, sync
        )
        for key, v in chunk_sums.items():
            sums[key] = sums.get(key, 0.0) + (v if count else v * 0.0)
        tokens += chunk_tokens if count else 0
    scaler.unscale(run.optimizer)  # (fp16: the norm, the clip and the step see the true gradients)
    grad_norm = clip_gradients(accelerator, objective.model, config.max_grad_norm)
    keys = list(sums)  # one all-reduce: the metric sums, the example and token counts, Ctrl-C requests
    *totals, count, tokens, interrupt = sum_over_processes(
        accelerator, *(sums[k] for k in keys), count, tokens, float(run.interrupt.requested)
    )
    metrics = finish_metrics(objective, {k: v / max(count, 1) for k, v in zip(keys, totals, strict=True)})
    lr = run.scheduler.get_last_lr()[0]  # the rate this step uses
    skipped = run.state.get("nonfinite_skipped", 0)
    if math.isfinite(metrics["loss"]) and (math.isfinite(grad_norm) or scaler.active):
        scaler.step(run.optimizer, grad_norm)  # (fp16: an overflowed step is skipped and counted)
    elif config.skip_nonfinite:
        skipped += 1
        log.warning(
            "step %d: loss %s, gradient norm %s: skipped", run.state["step"] + 1, metrics["loss"], grad_norm
        )
    else:
        run.optimizer.zero_grad(set_to_none=sharded(accelerator))
        raise DivergenceError(
            f"step {run.state['step'] + 1}: the loss ({metrics['loss']}) or the gradient norm ({grad_norm}) "
            f"is not finite (the step's examples: {describe_examples([run.train_examples[i] for i in batch])})"
        )
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=sharded(accelerator))  # in place: see contiguous_gradients
    elapsed = time.perf_counter() - t0
    if skipped:
        run.state["nonfinite_skipped"] = skipped
        metrics["nonfinite_skipped"] = skipped
    metrics.update(grad_norm=grad_norm, lr=lr, tokens_per_s=tokens / elapsed, step_s=elapsed)
    metrics.update(scaler.metrics())
    metrics["_interrupt"] = interrupt  # (the driver takes it out)
    return metrics


def describe_examples(examples: Sequence[dict[str, Any]], limit: int = 8) -> str:
    """Where examples were read, for messages: ``pairs.jsonl:3, pairs.jsonl:17`` (or their indices in
    the training set when their source has no lines), the first ``limit`` of them."""
    names = [ex.get("where") or f"#{ex.get('index')}" for ex in examples[:limit]]
    more = len(examples) - limit
    return ", ".join(names) + (f" and {more} more" if more > 0 else "")
