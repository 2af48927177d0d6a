"""The options every training command shares, and their validation, defined once.

:class:`TrainOptions` is the base of every command's config, through the offline methods'
:class:`TrainConfig` (sft, reward, dpo, kto) and the online methods' :class:`OnlineConfig` (ppo, grpo, rloo). An option means the same thing and is
checked by the same rule in every command; a subclass adds its own options and checks, or redefines an
option's default (and its one-line docstring, which is the flag's ``--help``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from prefalign.config import ConfigError, check_output_folder
from prefalign.generation import MIN_TEMPERATURE

OPTIMIZERS = ("adamw", "rmsprop")
SCHEDULES = ("constant", "linear", "cosine")
SINKS = {"tensorboard": "tensorboard", "wandb": "wandb"}
"""Metric sinks for --report-to, and the module each needs."""


@dataclass(kw_only=True)
class TrainOptions:
    """Options shared by every training command."""

    model: str
    """Policy to train: a local folder, a hub id, or a builtin name (`prefalign models list`)."""
    output: str
    """Run folder: checkpoints, metrics.jsonl, summary.json and the final model go here."""
    eval_split: float = 0.0
    """Fraction of the training data held out for evaluation when no held-out set is given (0 disables)."""
    raw: bool = False
    """Send text prompts as they are instead of through the model's chat template (plain continuation)."""
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
    micro_batch_tokens: int = 512
    """Upper bound on tokens per forward pass: batches are split into micro-batches to bound memory (exact)."""
    gradient_checkpointing: bool = False
    """Keep only each decoder layer's input and recompute its activations in the backward: less memory
    for about one more forward pass of time, the same numbers (see BENCHMARKS.md)."""
    seed: int = 0
    """Seed for data order, sampling and the initialisation of new heads."""
    dtype: str = "float32"
    """Weights dtype: float32 (CPU default), bfloat16 or float16 (the weights themselves cast: pure
    half-precision training, no float32 master copy; see --mixed-precision for autocast), or auto."""
    mixed_precision: str = "no"
    """Autocast the forward passes to bf16 or fp16 over float32 master weights (fp16 with a dynamic loss
    scale, overflowed steps skipped and counted in amp/skipped_steps); no: off."""
    lora_r: int = 0
    """LoRA rank; 0 trains all weights."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA path. Online methods (ppo, grpo, rloo) apply it in the update passes only:
    sampling, the old and the reference passes run without it, so the first ratio is 1 only on average."""
    log_every: int = 1
    """Write metrics every N steps (an online method's step is one iteration)."""
    eval_every: int = 0
    """Evaluate every N steps (an online method's step is one iteration; 0: only at the end)."""
    save_every: int = 100
    """Checkpoint every N steps (0: no periodic ones); a checkpoint is always written after the last step."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep, at least 1 (older ones are deleted)."""
    resume: bool = False
    """Continue the run in --output from its latest whole checkpoint (only the step budget may change)."""
    overwrite: bool = False
    """Replace the run already in --output (its checkpoints, metrics and summary are deleted)."""
    report_to: list[str] = field(default_factory=list)
    """Extra metric sinks besides metrics.jsonl: tensorboard, wandb (comma separated)."""
    progress: bool = True
    """Show a progress bar."""
    trust_remote_code: bool = False
    """Allow model repositories to run their own Python code."""
    skip_nonfinite: bool = False
    """Skip an optimiser step whose loss or gradient is not finite (an online method: also an iteration whose
    scores or KL are not), counted in the metrics, instead of stopping."""
    columns: str = ""
    """Rename the data set's columns before validation: canonical=column, comma separated (e.g.
    prompt=question,chosen=good,rejected=bad; answer=solution for a reward reading an extra column)."""

    def __post_init__(self) -> None:
        for ok, message in [*self.checks(), *self.finite_checks()]:
            if not ok:
                raise ConfigError(message)
        check_output_folder(self.output)

    def finite_checks(self) -> list[tuple[bool, str]]:
        """Every float option (and each value of a list of floats) of every command is finite: ``inf``
        or ``nan`` would only show up steps later as a model of NaNs."""
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            values = value if isinstance(value, (list, tuple)) else [value]
            for v in values:
                if isinstance(v, float) and not math.isfinite(v):
                    out.append((False, f"{f.name} must be finite, got {v}"))
        return out

    def checks(self) -> list[tuple[bool, str]]:
        """``(holds, message)`` for each rule on the shared options; a subclass adds its own."""
        return [
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.lr < math.inf, f"lr must be finite, got {self.lr}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}"),
            (
                self.lr_schedule in SCHEDULES,
                f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}",
            ),
            (0 <= self.weight_decay < math.inf, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (0 <= self.max_grad_norm < math.inf, f"max_grad_norm must be >= 0, got {self.max_grad_norm}"),
            (
                self.micro_batch_tokens >= 16,
                f"micro_batch_tokens must be >= 16, got {self.micro_batch_tokens}",
            ),
            (0.0 <= self.eval_split < 1.0, f"eval_split must be in [0, 1), got {self.eval_split}"),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (self.lora_r >= 0, f"lora_r must be >= 0, got {self.lora_r}"),
            (
                math.isfinite(self.lora_alpha) and self.lora_alpha > 0,
                f"lora_alpha must be > 0, got {self.lora_alpha}",
            ),
            (0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}"),
            (self.save_every >= 0, f"save_every must be >= 0, got {self.save_every}"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (not (self.resume and self.overwrite), "give at most one of --resume and --overwrite"),
            (set(self.report_to) <= set(SINKS), f"report_to: unknown sink in {self.report_to}"),
            _holds(self.column_map),
            (
                self.mixed_precision in ("no", "bf16", "fp16"),
                f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}",
            ),
            (
                self.mixed_precision == "no" or self.dtype == "float32",
                f"--mixed-precision {self.mixed_precision} autocasts over float32 master weights: leave --dtype "
                f"at float32 (--dtype {self.dtype} casts the weights themselves)",
            ),
        ]

    def column_map(self) -> dict[str, str]:
        """``--columns`` as a mapping, canonical name -> the data set's column (empty: none)."""
        from prefalign.data.columns import parse_columns

        return parse_columns(self.columns)

    def check_processes(self, num_processes: int) -> None:
        """Refuse options that do not fit a run on ``num_processes`` processes: checked by the launcher
        before it starts any worker (``--num-processes``) and by the run itself (a method overrides it).

        Raises:
            ConfigError: naming the option, its value and the process count.
        """

    def lora_settings(self) -> Any:
        """The LoRA adapters these options ask for (a ``prefalign.models.LoraSettings``), or ``None``."""
        from prefalign.models import LoraSettings

        return (
            LoraSettings(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout)
            if self.lora_r
            else None
        )


def _holds(check: Any) -> tuple[bool, str]:
    """``(True, "")`` if ``check()`` raises no ConfigError, else ``(False, its message)``: a rule that a
    helper enforces (``--columns``, the data sources), checked at config time, before any model loads."""
    try:
        check()
    except ConfigError as err:
        return False, str(err)
    return True, ""


def _sources(
    main: str, split: str | None, subset: str | None, held: str | None, held_split: str | None, flag: str
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Loader arguments (source, split, subset) of the training set and of the held-out set, if any.

    The held-out set is ``held`` read at ``held_split``, or, with a split and no source of its own, that
    split of the training source; it shares the training data's subset when it is the same source.

    Raises:
        ConfigError: the held-out set would be the very split the run trains on.
    """
    train = {"source": main, "split": split, "subset": subset}
    if held is None and held_split is None:
        return train, None
    source = held if held is not None else main
    same = source == main
    other = {"source": source, "split": held_split, "subset": subset if same else None}
    if same and (held_split or "train") == (split or "train"):
        raise ConfigError(
            f"the held-out set is the training data itself ({main}, split {split or 'train'}): give "
            f"--eval-{flag}-split another split, or another --eval-{flag}"
        )
    return train, other


@dataclass(kw_only=True)
class TrainConfig(TrainOptions):
    """Options shared by every offline training command (sft, reward, dpo, kto)."""

    data: str
    """Training data: a .jsonl/.json/.csv/.parquet file, a saved `datasets` folder, or a hub dataset id."""
    eval_data: str | None = None
    """Held-out data in the same format as --data."""
    data_split: str | None = None
    """Split of --data to train on where it has several (a hub id or a saved DatasetDict; default train)."""
    data_subset: str | None = None
    """Subset (a hub data set's config name, or a sub-folder of a local folder) of --data."""
    eval_data_split: str | None = None
    """Split of --eval-data, or without --eval-data the split of --data held out (e.g. test_prefs)."""
    batch_size: int = 8
    """Examples per forward batch (per process)."""
    grad_accum: int = 1
    """Batches accumulated per optimiser step; the effective batch is batch_size x grad_accum x processes."""
    epochs: float = 1.0
    """Passes over the training data (fractions allowed)."""
    max_steps: int | None = None
    """Stop after this many optimiser steps (overrides --epochs)."""
    max_length: int = 512
    """Longest tokenised example (prompt + completion); longer ones are truncated and counted."""
    max_prompt_length: int | None = None
    """Longest prompt kept (cut from the left) when an example is too long; default max_length // 2."""

    def checks(self) -> list[tuple[bool, str]]:
        return [
            *super().checks(),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (0 < self.epochs < math.inf, f"epochs must be > 0 and finite, got {self.epochs}"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.max_length >= 8, f"max_length must be >= 8, got {self.max_length}"),
            (
                self.max_prompt_length is None or 1 <= self.max_prompt_length < self.max_length,
                f"max_prompt_length must be >= 1 and < max_length ({self.max_length}), "
                f"got {self.max_prompt_length}",
            ),
            _holds(self.data_sources),
        ]

    def data_sources(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Loader arguments (source, split, subset, columns) of the training and held-out data."""
        train, held = _sources(
            self.data, self.data_split, self.data_subset, self.eval_data, self.eval_data_split, "data"
        )
        columns = self.column_map()
        return {**train, "columns": columns}, (None if held is None else {**held, "columns": columns})

    @property
    def examples_per_step(self) -> int:
        """Examples consumed by one optimiser step on one process."""
        return self.batch_size * self.grad_accum


@dataclass(kw_only=True)
class OnlineConfig(TrainOptions):
    """Options every online method (sample, score, update) shares."""

    model: str
    """Policy to train (also the reference unless --ref-model): a folder, hub id or builtin name."""
    prompts: str
    """Prompts (JSONL/JSON/CSV/Parquet or a dataset) with a "prompt" field, text or messages."""
    reward: str | None = None
    """Reward source: sentiment (VADER's compound score of the response), accuracy (1 when the response's
    last number or final \\boxed{} equals the prompt row's "answer"), format (1 when --format-pattern
    matches) or a callable module:function, called as fn(prompts, completions, **columns) with every
    column of the prompts file but the prompt."""
    reward_model: str | None = None
    """Reward source: a `prefalign reward` output folder (use this or --reward)."""
    format_pattern: str | None = None
    """The Python regular expression of --reward format: a response scores 1 when re.search finds it."""
    log_completions: int = 10
    """At the first iteration and every N-th, append each sample (prompt, completion, rewards, advantage) to
    completions.jsonl in the run folder and show the best and the worst on the terminal (0 disables)."""
    ref_model: str | None = None
    """Reference model for the KL penalty, if not the starting policy."""
    eval_prompts: str | None = None
    """Held-out prompts, sampled and scored at --eval-every and at the end (eval/scores, eval/kl)."""
    prompts_split: str | None = None
    """Split of --prompts where it has several (a hub id or a saved DatasetDict; default train)."""
    prompts_subset: str | None = None
    """Subset (a hub data set's config name, or a sub-folder of a local folder) of --prompts."""
    eval_prompts_split: str | None = None
    """Split of --eval-prompts, or without --eval-prompts the split of --prompts held out."""
    iterations: int | None = None
    """Rounds of rollout then update (default: one pass over the prompts, see --epochs)."""
    epochs: float | None = None
    """Passes over the prompt set, when --iterations is not given (default 1)."""
    rollout_batch: int = 16
    """Prompts sampled per iteration (over all processes)."""
    response_length: int = 64
    """New tokens per response at most; a response ends at its first stop token (EOS)."""
    temperature: float = 1.0
    """Sampling temperature, applied the same way in sampling, the old/reference passes and training."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the score of a response that never ends (hits --response-length)."""
    kl_coef: float = 0.05
    """Weight of the KL penalty to the reference (initial value under --target-kl)."""
    ppo_epochs: int = 4
    """Passes over each iteration's samples."""
    recompute_logprobs: bool = False
    """Score the samples again in a fresh forward for the old log-probs (and a trunk head's values) instead
    of keeping the sampler's: one policy pass more per iteration; the first minibatch's ratio is then 1
    to the bit instead of to float rounding (~1e-6)."""
    minibatches: int = 1
    """Shuffled minibatches per pass; one optimiser step each."""
    lr: float = 3e-6
    """Peak learning rate."""
    micro_batch_tokens: int = 2048
    """Upper bound on tokens per forward pass (minibatches are split to bound memory; exact). 512 brings
    the peak of BENCHMARKS.md's SmolLM2 GRPO run to 4.2-4.3 GB for about 8 per cent more time per
    iteration."""
    generation_batch: int | None = None
    """Prompts sampled together (default: the whole rollout batch of the process)."""
    max_prompt_length: int = 256
    """Longest prompt kept, in tokens (cut from the left)."""
    save_every: int = 0
    """Checkpoint every N iterations (0: no periodic ones); a checkpoint is always written after the last one."""
    lora_targets: str | None = None
    """With --lora-r: the modules to adapt, names separated by commas (e.g. q_proj,v_proj); default every
    linear layer of the decoder (not the output layer)."""

    def checks(self) -> list[tuple[bool, str]]:
        problem = self.reward_problem()
        return [
            (problem is None, problem or ""),
            *super().checks(),
            (
                self.lora_targets is None or bool(self.lora_target_list()),
                f"lora_targets: give module names separated by commas, got {self.lora_targets!r}",
            ),
            (self.iterations is None or self.iterations >= 1, f"iterations must be >= 1, got {self.iterations}"),
            (self.epochs is None or 0 < self.epochs < math.inf, f"epochs must be > 0 and finite, got {self.epochs}"),
            (self.rollout_batch >= 1, f"rollout_batch must be >= 1, got {self.rollout_batch}"),
            (self.response_length >= 1, f"response_length must be >= 1, got {self.response_length}"),
            (
                MIN_TEMPERATURE <= self.temperature < math.inf,
                f"temperature must be >= {MIN_TEMPERATURE} and finite (online methods learn from a sampling "
                f"distribution, not greedy decoding), got {self.temperature}",
            ),
            (self.kl_coef >= 0, f"kl_coef must be >= 0, got {self.kl_coef}"),
            (self.ppo_epochs >= 1, f"ppo_epochs must be >= 1, got {self.ppo_epochs}"),
            (1 <= self.minibatches <= self.rollout_batch, f"minibatches must be in [1, rollout_batch], got {self.minibatches}"),
            (self.generation_batch is None or self.generation_batch >= 1, "generation_batch must be >= 1"),
            (self.max_prompt_length >= 1, f"max_prompt_length must be >= 1, got {self.max_prompt_length}"),
            _holds(self.prompt_sources),
            (self.log_completions >= 0, f"log_completions must be >= 0, got {self.log_completions}"),
            _holds(self.format_check),
        ]  # fmt: skip

    def lora_target_list(self) -> list[str]:
        """``--lora-targets`` as a list of module names (empty: none given)."""
        return [t.strip() for t in (self.lora_targets or "").split(",") if t.strip()]

    def lora_settings(self) -> Any:
        """The LoRA adapters these options ask for, on ``--lora-targets`` (default all-linear), or ``None``."""
        settings = super().lora_settings()
        if settings is not None and self.lora_targets is not None:
            settings.target_modules = self.lora_target_list()
        return settings

    def check_processes(self, num_processes: int) -> None:
        if self.rollout_batch % num_processes:
            raise ConfigError(
                f"rollout_batch {self.rollout_batch} must divide over {num_processes} processes "
                f"(each samples the same share of an iteration's prompts)"
            )

    def reward_problem(self) -> str | None:
        """What is wrong with the reward options, if anything (methods that combine sources override)."""
        if (self.reward is None) == (self.reward_model is None):
            return "give exactly one of --reward-model PATH or --reward sentiment|accuracy|format|module:function"
        return None

    def format_check(self) -> None:
        """A ConfigError unless --format-pattern is a regular expression given exactly with --reward format."""
        from prefalign.rewards import format_pattern_problem

        names = self.reward if isinstance(self.reward, list) else [self.reward]
        problem = format_pattern_problem(self.format_pattern, [str(n) for n in names if n])
        if problem:
            raise ConfigError(problem)

    def prompt_sources(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Loader arguments (source, split, subset, columns) of the training and held-out prompts."""
        train, held = _sources(
            self.prompts, self.prompts_split, self.prompts_subset, self.eval_prompts,
            self.eval_prompts_split, "prompts",
        )  # fmt: skip
        columns = self.column_map()
        return {**train, "columns": columns}, (None if held is None else {**held, "columns": columns})

    def total_iterations(self, n_prompts: int) -> int:
        """Iterations of the run: ``--iterations``, or ``--epochs`` passes over ``n_prompts``."""
        if self.iterations is not None:
            return self.iterations
        return max(1, math.ceil((self.epochs or 1.0) * n_prompts / self.rollout_batch))
