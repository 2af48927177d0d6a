"""The one training loop, shared by every method (SFT, reward model, DPO; PPO reuses its parts).

A method supplies an :class:`Objective`: the trainable model and a function from a list of encoded
examples to the *sum* of their losses plus per-example metric sums. The loop owns everything else:
Accelerate, the optimiser and schedule, deterministic data order, gradient accumulation, micro-batching
by a token budget (memory is bounded by the micro-batch, not the batch), gradient clipping,
checkpoint/resume, metrics (JSON lines, optional TensorBoard/W&B), progress and ``summary.json``.

Because objectives return sums over examples, splitting a step's examples into any number of chunks
and micro-batches and scaling each by ``1 / examples_per_step`` gives exactly the gradient of the
step's mean loss: batch 2 x 4 accumulation steps equals batch 8 x 1.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from prefalign.config import ConfigError, save_config
from prefalign.data import batches
from prefalign.memory import release_freed_memory, use_memory_efficient_layers

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "rmsprop")
SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class TrainConfig:
    """Options shared by every training command."""

    model: str
    """Policy to train: a local folder, a hub id, or a builtin name (`prefalign models list`)."""
    data: str
    """Training data: a .jsonl/.json/.csv/.parquet file, a saved `datasets` folder, or a hub dataset id."""
    output: str
    """Run folder: checkpoints, metrics.jsonl, summary.json and the final model go here."""
    eval_data: str | None = None
    """Held-out data in the same format as --data."""
    eval_split: float = 0.0
    """Fraction of --data held out for evaluation when --eval-data is not given (0 disables)."""
    lr: float = 1e-6
    """Peak learning rate."""
    optimizer: str = "adamw"
    """Optimiser: adamw or rmsprop (the DPO paper's choice)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) or L2 penalty (RMSprop)."""
    lr_schedule: str = "linear"
    """After warm-up: constant, linear (decay to 0) or cosine (decay to 0)."""
    warmup_steps: int = 0
    """Linear warm-up steps; overrides --warmup-ratio when > 0."""
    warmup_ratio: float = 0.0
    """Warm-up length as a fraction of the total optimiser steps."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    batch_size: int = 8
    """Examples per forward batch (per process)."""
    grad_accum: int = 1
    """Batches accumulated per optimiser step; the effective batch is batch_size x grad_accum x processes."""
    micro_batch_tokens: int = 512
    """Upper bound on tokens per forward pass: batches are split into micro-batches to bound memory (exact)."""
    epochs: float = 1.0
    """Passes over the training data (fractions allowed)."""
    max_steps: int | None = None
    """Stop after this many optimiser steps (overrides --epochs)."""
    max_length: int = 512
    """Longest tokenised example (prompt + completion); longer ones are truncated and counted."""
    max_prompt_length: int | None = None
    """Longest prompt kept (cut from the left) when an example is too long; default max_length // 2."""
    raw: bool = False
    """Send text prompts as they are instead of through the model's chat template (plain continuation)."""
    seed: int = 0
    """Seed for data order, initialisation of new heads and sampling."""
    dtype: str = "float32"
    """Weights dtype: float32 (CPU default), bfloat16, float16 or auto."""
    lora_r: int = 0
    """LoRA rank; 0 trains all weights."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA path."""
    log_every: int = 1
    """Write metrics every N optimiser steps."""
    eval_every: int = 0
    """Evaluate every N optimiser steps (0: only at the end)."""
    save_every: int = 0
    """Checkpoint every N optimiser steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep (older ones are deleted)."""
    resume: bool = False
    """Continue from the latest checkpoint in --output."""
    report_to: list[str] = field(default_factory=list)
    """Extra metric sinks besides metrics.jsonl: tensorboard, wandb (comma separated)."""
    progress: bool = True
    """Show a progress bar."""
    trust_remote_code: bool = False
    """Allow model repositories to run their own Python code."""

    def __post_init__(self) -> None:
        checks = [
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"),
            (
                self.lr_schedule in SCHEDULES,
                f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}",
            ),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (
                self.micro_batch_tokens >= 16,
                f"micro_batch_tokens must be >= 16, got {self.micro_batch_tokens}",
            ),
            (self.epochs > 0, f"epochs must be > 0, got {self.epochs}"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.max_length >= 8, f"max_length must be >= 8, got {self.max_length}"),
            (0.0 <= self.eval_split < 1.0, f"eval_split must be in [0, 1), got {self.eval_split}"),
            (0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.lora_r >= 0, f"lora_r must be >= 0, got {self.lora_r}"),
            (set(self.report_to) <= {"tensorboard", "wandb"}, f"report_to: unknown sink in {self.report_to}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def lora_settings(self) -> Any:
        """The LoRA adapters these options ask for (a ``prefalign.models.LoraSettings``), or ``None``."""
        from prefalign.models import LoraSettings

        return (
            LoraSettings(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout)
            if self.lora_r
            else None
        )

    @property
    def examples_per_step(self) -> int:
        """Examples consumed by one optimiser step on one process."""
        return self.batch_size * self.grad_accum


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


# --------------------------------------------------------------------------------------------------
# seeding, data order, micro-batches


def make_accelerator() -> Any:
    """An Accelerate ``Accelerator`` for however the process was launched (plain, ``accelerate launch``,
    ``torchrun``): one CPU, one GPU, or many with DDP/FSDP/DeepSpeed."""
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
    """Hold out ``fraction`` of ``rows`` (shuffled by ``seed``) unless an eval set was given."""
    if eval_rows or fraction <= 0:
        return rows, eval_rows
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(fraction * len(rows))))
    return [rows[i] for i in order[n_eval:]], [rows[i] for i in order[:n_eval]]


def load_pairs(config: TrainConfig, tokenizer: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read, validate, tokenise and split preference data (DPO, reward models); each example gets its
    ``index`` in its set."""
    from prefalign.data import encode_preferences, load_preferences

    rows, held = split_rows(
        load_preferences(config.data),
        load_preferences(config.eval_data) if config.eval_data else [],
        config.eval_split,
        config.seed,
    )
    if not rows:
        raise ConfigError(f"{config.data}: no training pairs left")
    sets = [
        encode_preferences(tokenizer, r, config.max_length, config.max_prompt_length, config.raw) if r else []
        for r in (rows, held)
    ]
    for examples in sets:
        for i, ex in enumerate(examples):
            ex["index"] = i
    return sets[0], sets[1]


# --------------------------------------------------------------------------------------------------
# optimiser and schedule


def make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (fused kernel where available) or RMSprop over the trainable parameters."""
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=config.lr, weight_decay=config.weight_decay)
    try:
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def lr_lambda(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimiser step ``step`` (0-based).

    Linear warm-up from 1/(warmup+1) to 1 over ``warmup`` steps, then constant, linear or cosine decay to 0
    at ``total``.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = config.warmup_steps or int(config.warmup_ratio * total)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, total, warmup, config.lr_schedule)
    )


def total_steps(config: TrainConfig, n_examples: int, processes: int = 1) -> int:
    per_step = config.examples_per_step * processes
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil(config.epochs * n_examples / per_step))


# --------------------------------------------------------------------------------------------------
# metrics


class MetricsWriter:
    """Flat metric dicts as JSON lines in ``metrics.jsonl``, optionally mirrored to TensorBoard and W&B."""

    def __init__(
        self,
        output: Path,
        report_to: Sequence[str] = (),
        config: dict[str, Any] | None = None,
        append: bool = False,
        enabled: bool = True,
    ) -> None:
        self.path = output / "metrics.jsonl"
        self._file = self.path.open("a" if append else "w") if enabled else None
        self._tb = None
        self._wandb = None
        if not enabled:  # not the main process: write nothing
            return
        try:
            if "tensorboard" in report_to:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(output / "tensorboard"))
            if "wandb" in report_to:
                import wandb

                self._wandb = wandb.init(dir=str(output), config=config or {})
        except ImportError as err:
            self._file.close()
            raise ConfigError(
                f"--report-to needs a package that is not installed ({err.name}): "
                "pip install 'prefalign[tensorboard]' or 'prefalign[wandb]'"
            ) from None

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if self._file is None:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(record, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _plain(v: Any) -> Any:
    if isinstance(v, Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def report_done(summary: dict[str, Any], output: str, keys: Sequence[str] = ()) -> None:
    """Print a run's closing line (and the chosen final/eval metrics) once, from the main process."""
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    print(f"done: {summary['steps']} steps in {summary['wall_s']:.1f} s; model saved to {output}")
    final = {**summary.get("final", {}), **summary.get("eval", {})}
    shown = {
        k: v
        for k, v in final.items()
        if isinstance(v, float) and (not keys or k.split("/", 1)[-1] in keys or k in keys)
    }
    if shown:
        print("  " + "  ".join(f"{k}={v:.4g}" for k, v in shown.items()))


def read_metrics(output: str | Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl``."""
    path = Path(output) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------
# checkpoints


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    tokenizer: Any = None,
    config: Any = None,
    extra: dict[str, nn.Module] | None = None,
) -> None:
    """Write a resumable checkpoint atomically (a temporary folder, then one rename).

    The folder is a Hugging Face model folder (``from_pretrained`` loads it; for a LoRA model it holds the
    adapter), plus the tokenizer, the resolved ``config.yaml``, ``state.pt`` (optimiser, scheduler, RNG)
    and ``trainer_state.json``. LoRA checkpoints also keep ``trainable.safetensors``, the trainable
    weights under their in-memory names, which is what resuming reads. Each ``extra`` module (e.g. PPO's
    critic) is saved as ``<name>.safetensors``.
    """
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    if hasattr(model, "peft_config"):
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    for name, module in (extra or {}).items():
        save_file(
            {k: v.detach().contiguous() for k, v in module.state_dict().items()},
            str(tmp / f"{name}.safetensors"),
        )
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if config is not None:
        save_config(config, tmp / "config.yaml")
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng},
        tmp / "state.pt",
    )
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def latest_checkpoint(output: Path) -> Path | None:
    folders = sorted(
        (p for p in (output / "checkpoints").glob("step-*") if (p / "trainer_state.json").exists()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    return folders[-1] if folders else None


def load_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, nn.Module] | None = None,
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns the loop state (step, ...)."""
    from safetensors.torch import load_file

    for name, module in (extra or {}).items():
        module.load_state_dict(load_file(str(folder / f"{name}.safetensors")))

    lora_weights = folder / "trainable.safetensors"
    weights = load_file(str(lora_weights if lora_weights.exists() else folder / "model.safetensors"))
    missing = set(trainable_state(model)) - set(weights)
    if missing:
        raise ConfigError(
            f"{folder}: checkpoint does not match the model (missing {sorted(missing)[:3]} ...)"
        )
    model.load_state_dict(weights, strict=False)
    blob = torch.load(folder / "state.pt", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["rng"]["torch"])
    np.random.set_state(blob["rng"]["numpy"])
    random.setstate(blob["rng"]["python"])
    return json.loads((folder / "trainer_state.json").read_text())


def prune_checkpoints(output: Path, keep: int) -> None:
    folders = sorted((output / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in folders[: max(0, len(folders) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def save_final_model(model: nn.Module, tokenizer: Any, output: Path) -> None:
    """Save a plain Hugging Face folder (safetensors + config + tokenizer) loadable with ``from_pretrained``.

    A LoRA model is saved twice: the adapter in ``output/adapter`` and the merged weights at the root.
    """
    if hasattr(model, "peft_config"):
        model.save_pretrained(str(output / "adapter"), safe_serialization=True)
        model = model.merge_and_unload()
    model.save_pretrained(str(output), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(output))


# --------------------------------------------------------------------------------------------------
# the loop


def reduce_metrics(sums: dict[str, Tensor], count: int) -> dict[str, float]:
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


def evaluate(
    objective: Objective, examples: Sequence[dict[str, Any]], config: TrainConfig, prefix: str = "val/"
) -> dict[str, float]:
    """Mean loss and metrics over ``examples`` without gradients."""
    if not examples:
        return {}
    was_training = objective.model.training
    objective.model.eval()
    with torch.no_grad():
        sums, _ = run_examples(objective, examples, config.micro_batch_tokens, None)
    objective.model.train(was_training)
    return {prefix + k: v for k, v in reduce_metrics(sums, len(examples)).items()}


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

    Writes to ``config.output``: ``config.yaml``, ``metrics.jsonl``, ``checkpoints/step-N``, the final
    model (Hugging Face folder) and ``summary.json``. ``eval_objective`` scores ``eval_examples`` when
    they need their own state (e.g. precomputed reference log-probs); by default ``objective`` does.
    ``callback(step, model)`` is called on the main process after every ``config.eval_every`` optimiser
    steps and after the last one, with the unwrapped model (e.g. to sample from it along training).
    """
    start = time.perf_counter()
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    accelerator = accelerator or make_accelerator()
    main = accelerator.is_main_process
    if main:
        save_config(config, output / "config.yaml")
    use_memory_efficient_layers(objective.model)
    params = [p for p in objective.model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    optimizer = make_optimizer(params, config)
    steps = total_steps(config, len(train_examples), accelerator.num_processes)
    scheduler = make_scheduler(optimizer, config, steps)
    # The scheduler stays ours: Accelerate would step a prepared one once per process per step.
    objective.model, optimizer = accelerator.prepare(objective.model, optimizer)
    state = {"step": 0}
    ckpt = latest_checkpoint(output) if config.resume else None
    if config.resume and ckpt is None:
        log.info("--resume: no checkpoint in %s, starting from scratch", output)
    if ckpt is not None:
        state = load_checkpoint(ckpt, accelerator.unwrap_model(objective.model), optimizer, scheduler)
        log.info("resumed from %s (step %d)", ckpt, state["step"])
    writer = MetricsWriter(output, config.report_to, append=ckpt is not None, enabled=main)
    scorer = eval_objective or objective
    last_metrics = _steps(
        config,
        objective,
        train_examples,
        eval_examples,
        scorer,
        accelerator,
        optimizer,
        scheduler,
        writer,
        state,
        steps,
        tokenizer,
        callback,
    )
    final_eval = evaluate(scorer, eval_examples, config) if eval_examples else {}
    if final_eval:
        writer.write(state["step"], final_eval)
    writer.close()
    model = accelerator.unwrap_model(objective.model)
    if accelerator.is_main_process:
        save_final_model(model, tokenizer, output)
    summary = {
        "steps": state["step"],
        "train_examples": len(train_examples),
        "eval_examples": len(eval_examples),
        "final": last_metrics,
        "eval": final_eval,
        "wall_s": round(time.perf_counter() - start, 3),
        **(extra_summary or {}),
    }
    if main:
        (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _steps(
    config: TrainConfig,
    objective: Objective,
    train_examples: Sequence[dict[str, Any]],
    eval_examples: Sequence[dict[str, Any]],
    scorer: Objective,
    accelerator: Any,
    optimizer: Any,
    scheduler: Any,
    writer: MetricsWriter,
    state: dict[str, Any],
    steps: int,
    tokenizer: Any = None,
    callback: Callable[[int, nn.Module], None] | None = None,
) -> dict[str, float]:
    """Run the remaining optimiser steps; returns the last step's metrics (empty if none ran)."""
    per_step = config.examples_per_step * accelerator.num_processes
    stream = step_batches(len(train_examples), per_step, config.seed)
    for _ in range(state["step"]):
        next(stream)  # deterministic order: skip what the resumed run already consumed
    bar = tqdm(
        total=steps,
        initial=state["step"],
        desc="train",
        unit="step",
        disable=not config.progress,
        dynamic_ncols=True,
    )
    step_metrics: dict[str, float] = {}
    objective.model.train()
    while state["step"] < steps:
        indices = next(stream)[accelerator.process_index :: accelerator.num_processes]
        step_metrics = _one_step(
            config,
            objective,
            [train_examples[i] for i in indices],
            len(indices) or 1,
            accelerator,
            optimizer,
            scheduler,
        )
        state["step"] += 1
        metrics = {**step_metrics, "epoch": state["step"] * per_step / len(train_examples)}
        if state["step"] % config.log_every == 0 or state["step"] == steps:
            writer.write(state["step"], metrics)
        if config.eval_every and state["step"] % config.eval_every == 0 and state["step"] < steps:
            writer.write(state["step"], evaluate(scorer, eval_examples, config))
        if config.save_every and state["step"] % config.save_every == 0 and accelerator.is_main_process:
            save_checkpoint(
                Path(config.output) / "checkpoints" / f"step-{state['step']}",
                accelerator.unwrap_model(objective.model),
                optimizer,
                scheduler,
                state,
                tokenizer,
                config,
            )
            prune_checkpoints(Path(config.output), config.keep_checkpoints)
        at_eval = config.eval_every and state["step"] % config.eval_every == 0
        if callback is not None and accelerator.is_main_process and (at_eval or state["step"] == steps):
            callback(state["step"], accelerator.unwrap_model(objective.model))
        bar.set_postfix({k: f"{metrics[k]:.4g}" for k in _SHOWN if k in metrics}, refresh=False)
        bar.update(1)
    bar.close()
    return step_metrics


_SHOWN = ("loss", "rewards/accuracies", "rewards/margins", "accuracy", "tokens_per_s")


def _one_step(
    config: TrainConfig,
    objective: Objective,
    examples: list[dict[str, Any]],
    count: int,
    accelerator: Any,
    optimizer: Any,
    scheduler: Any,
) -> dict[str, float]:
    """One optimiser step over ``examples``: chunks of batch_size, micro-batches inside, one update."""
    t0 = time.perf_counter()
    sums: dict[str, Tensor] = {}
    tokens = 0
    chunks = [examples[i : i + config.batch_size] for i in range(0, len(examples), config.batch_size)]
    for k, chunk in enumerate(chunks):

        def sync(last_micro: bool, last_chunk: bool = k == len(chunks) - 1) -> Any:
            return nullcontext() if last_micro and last_chunk else accelerator.no_sync(objective.model)

        # Each process scales its loss sum by 1 / its example count; DDP then averages over processes,
        # which gives the mean over all examples of the step (processes get equal shares).
        chunk_sums, chunk_tokens = run_examples(
            objective, chunk, config.micro_batch_tokens, 1.0 / count, accelerator.backward, sync
        )
        for key, v in chunk_sums.items():
            sums[key] = sums.get(key, 0.0) + v
        tokens += chunk_tokens
    grad_norm = _clip(accelerator, objective.model, config.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    release_freed_memory()
    sums, count, tokens = _sum_over_processes(accelerator, sums, count, tokens)
    elapsed = time.perf_counter() - t0
    metrics = reduce_metrics(sums, count)
    metrics.update(
        grad_norm=grad_norm, lr=scheduler.get_last_lr()[0], tokens_per_s=tokens / elapsed, step_s=elapsed
    )
    return metrics


def _sum_over_processes(
    accelerator: Any, sums: dict[str, Tensor], count: int, tokens: int
) -> tuple[dict[str, Tensor], int, int]:
    """Add up metric sums, example and token counts of all processes (one all-reduce)."""
    if accelerator.num_processes == 1:
        return sums, count, tokens
    keys = sorted(sums)
    values = [torch.as_tensor(sums[k], dtype=torch.float64) for k in keys]
    vec = torch.stack(
        [
            *values,
            torch.tensor(float(count), dtype=torch.float64),
            torch.tensor(float(tokens), dtype=torch.float64),
        ]
    )
    vec = accelerator.reduce(vec.to(accelerator.device), reduction="sum").cpu()
    return {k: vec[i] for i, k in enumerate(keys)}, int(vec[-2]), int(vec[-1])


def _clip(accelerator: Any, model: nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm and max_norm > 0:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    return float(torch.nn.utils.get_total_norm([p.grad for p in params])) if params else 0.0
