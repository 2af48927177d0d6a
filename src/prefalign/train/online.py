"""What the online methods (PPO; GRPO and RLOO build on it too) share: sample, score, re-score, batch.

One iteration of an online method:

1. **sample** responses to a batch of prompts from the current policy (:func:`prefalign.generation.
   generate`, temperature applied, log-probs of the distribution that sampled);
2. **score** them with a reward source (:mod:`prefalign.rewards`), minus ``missing_eos_penalty`` for
   responses that hit the length cap;
3. **re-score** the tokens under the reference model (the KL penalty) and under the policy before any
   update (the "old" log-probs of the importance ratio), in the exact micro-batch layout of the first
   update pass, so that the first minibatch's ratio is exactly 1;
4. the method turns that into advantages and runs its update epochs over shuffled minibatches.

The optimiser, schedule, checkpoints and metrics are :mod:`prefalign.train.loop`'s; nothing here
copies them.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from prefalign.config import ConfigError
from prefalign.generation import (
    MIN_TEMPERATURE,
    GenerationOutput,
    generate,
    position_ids_from_mask,
    response_logprobs,
)
from prefalign.losses import KL_ESTIMATORS, token_logps
from prefalign.memory import release_freed_memory
from prefalign.train.loop import OPTIMIZERS, SCHEDULES


@dataclass
class OnlineConfig:
    """Options every online method (sample, score, update) shares."""

    model: str
    """Policy to train (also the reference unless --ref-model): a folder, hub id or builtin name."""
    prompts: str
    """Prompts (JSONL/JSON/CSV/Parquet or a dataset) with a "prompt" field, text or messages."""
    output: str
    """Run folder: checkpoints, metrics.jsonl, summary.json and the final policy go here."""
    reward: str | None = None
    """Reward source: sentiment (VADER's compound score of the response) or a callable module:function."""
    reward_model: str | None = None
    """Reward source: a `prefalign reward` output folder (use this or --reward)."""
    ref_model: str | None = None
    """Reference model for the KL penalty, if not the starting policy."""
    eval_prompts: str | None = None
    """Held-out prompts, sampled and scored at --eval-every and at the end (eval/scores, eval/kl)."""
    eval_split: float = 0.0
    """Fraction of --prompts held out when --eval-prompts is not given (0 disables)."""
    raw: bool = False
    """Send text prompts as they are instead of through the chat template (plain continuation)."""
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
    optimizer: str = "adamw"
    """Optimiser: adamw or rmsprop."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) or L2 penalty (RMSprop)."""
    lr_schedule: str = "linear"
    """After warm-up: constant, linear (decay to 0) or cosine (decay to 0)."""
    warmup_steps: int = 0
    """Linear warm-up optimiser steps; overrides --warmup-ratio when > 0."""
    warmup_ratio: float = 0.0
    """Warm-up length as a fraction of the optimiser steps."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    micro_batch_tokens: int = 2048
    """Upper bound on tokens per forward pass (minibatches are split to bound memory; exact). 512 cuts
    the peak of a SmolLM2 GRPO run from about 5.1 to 4.3 GB for about 8 per cent more time per iteration."""
    generation_batch: int | None = None
    """Prompts sampled together (default: the whole rollout batch of the process)."""
    max_prompt_length: int = 256
    """Longest prompt kept, in tokens (cut from the left)."""
    eval_every: int = 0
    """Evaluate every N iterations (0: only at the end)."""
    save_every: int = 0
    """Checkpoint every N iterations (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep (older ones are deleted)."""
    resume: bool = False
    """Continue from the latest checkpoint in --output (only the step budget, --iterations or --epochs, may change)."""
    overwrite: bool = False
    """Replace the run already in --output (its checkpoints, metrics and summary) instead of refusing to."""
    seed: int = 0
    """Seed for prompt order, sampling, minibatch order and new heads."""
    dtype: str = "float32"
    """Weights dtype: float32 (CPU default), bfloat16, float16 or auto."""
    report_to: list[str] = field(default_factory=list)
    """Extra metric sinks besides metrics.jsonl: tensorboard, wandb (comma separated)."""
    progress: bool = True
    """Show a progress bar."""
    trust_remote_code: bool = False
    """Allow model repositories to run their own Python code."""

    def __post_init__(self) -> None:
        problem = self.reward_problem()
        if problem:
            raise ConfigError(problem)
        checks = [
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
            (0 < self.lr < math.inf, f"lr must be > 0 and finite, got {self.lr}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}"),
            (self.lr_schedule in SCHEDULES, f"lr_schedule must be one of {SCHEDULES}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.warmup_steps >= 0 and 0 <= self.warmup_ratio < 1, "warmup_steps must be >= 0 and warmup_ratio in [0, 1)"),
            (self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {self.max_grad_norm}"),
            (self.micro_batch_tokens >= 16, f"micro_batch_tokens must be >= 16, got {self.micro_batch_tokens}"),
            (self.generation_batch is None or self.generation_batch >= 1, "generation_batch must be >= 1"),
            (self.max_prompt_length >= 1, f"max_prompt_length must be >= 1, got {self.max_prompt_length}"),
            (0.0 <= self.eval_split < 1.0, f"eval_split must be in [0, 1), got {self.eval_split}"),
            (min(self.eval_every, self.save_every, self.keep_checkpoints) >= 0, "eval_every, save_every and keep_checkpoints must be >= 0"),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (set(self.report_to) <= {"tensorboard", "wandb"}, f"report_to: unknown sink in {self.report_to}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def reward_problem(self) -> str | None:
        """What is wrong with the reward options, if anything (methods that combine sources override)."""
        if (self.reward is None) == (self.reward_model is None):
            return "give exactly one of --reward-model PATH or --reward sentiment|module:function"
        return None

    def total_iterations(self, n_prompts: int) -> int:
        if self.iterations is not None:
            return self.iterations
        return max(1, math.ceil((self.epochs or 1.0) * n_prompts / self.rollout_batch))


# --------------------------------------------------------------------------------------------------
# prompts


def encode_prompts(tokenizer: Any, rows: list[dict[str, Any]], config: OnlineConfig) -> list[list[int]]:
    """Token ids of each prompt (as `prefalign generate` encodes them), cut from the left."""
    from prefalign.data import encode_prompt

    return [encode_prompt(tokenizer, r["prompt"], raw=config.raw)[-config.max_prompt_length :] for r in rows]


def prompt_texts(tokenizer: Any, rows: list[dict[str, Any]]) -> list[str]:
    """What a text reward sees as the prompt: the text itself, or a conversation's rendering."""
    return [
        r["prompt"]
        if isinstance(r["prompt"], str)
        else tokenizer.apply_chat_template(r["prompt"], tokenize=False)
        for r in rows
    ]


def iteration_prompts(n_prompts: int, per_iteration: int, seed: int, iteration: int) -> list[int]:
    """Indices of the prompts of ``iteration`` (0-based): epochs of a fixed permutation per (seed, epoch),
    so a resumed run sees the same prompts; an epoch's end wraps into the next epoch's start."""
    start = iteration * per_iteration
    out: list[int] = []
    while len(out) < per_iteration:
        epoch, offset = divmod(start + len(out), n_prompts)
        order = np.random.default_rng([seed, epoch]).permutation(n_prompts)
        out += order[offset : offset + per_iteration - len(out)].tolist()
    return out


# --------------------------------------------------------------------------------------------------
# sampling and scoring


@dataclass
class Rollout:
    """One iteration's samples and what was computed about them (rows in prompt order).

    Attributes:
        out: the sampler's output (prompt/response ids and masks, sampled log-probs, texts).
        scores: ``[N]`` reward of each response, after the missing-EOS penalty.
        raw_scores: ``[N]`` the reward source's scores as returned.
        ref_logprobs: ``[N, R]`` log-probs under the reference model (0 off the response mask).
        logprobs: ``[N, R]`` log-probs under the policy before this iteration's update ("old").
        values: ``[N, R]`` the critic's values before the update (PPO only).
        entropy: ``[N, R]`` the policy's entropy at each response position.
    """

    out: GenerationOutput
    scores: Tensor
    raw_scores: Tensor
    ref_logprobs: Tensor | None = None
    logprobs: Tensor | None = None
    values: Tensor | None = None
    entropy: Tensor | None = None

    @property
    def mask(self) -> Tensor:
        return self.out.response_mask.float()

    def __len__(self) -> int:
        return self.out.response_ids.shape[0]


def sample(
    policy: nn.Module,
    tokenizer: Any,
    prompt_ids: list[list[int]],
    config: OnlineConfig,
    seed: int,
    return_hidden: bool = False,
) -> GenerationOutput:
    """Responses of ``policy`` to ``prompt_ids`` at the config's temperature (no top-k/top-p)."""
    return generate(
        policy,
        tokenizer,
        prompt_ids,
        max_new_tokens=config.response_length,
        temperature=config.temperature,
        seed=seed,
        batch_size=config.generation_batch,
        progress=False,
        return_hidden=return_hidden,
    )


def score(source: Any, prompts: list[str], out: GenerationOutput, penalty: float) -> tuple[Tensor, Tensor]:
    """``(scores, raw_scores)``, both ``[N]`` float32: the source's scores, and those less ``penalty``
    where a response never reached a stop token. A reward model sharing the policy's vocabulary scores
    the sampled token ids themselves (no decode/re-encode round trip)."""
    if getattr(source, "same_vocab", False):
        ids = [
            p[m.bool()].tolist() + r[k.bool()].tolist()
            for p, m, r, k in zip(
                out.prompt_ids, out.prompt_mask, out.response_ids, out.response_mask, strict=True
            )
        ]
        raw = torch.tensor(source.score_ids(ids), dtype=torch.float32)
        from prefalign.rewards import check_scores

        check_scores(source.name, raw, len(ids))
    else:
        raw = torch.tensor(source(prompts, out.texts), dtype=torch.float32)
    return raw - penalty * (~out.finished).float().cpu(), raw


def reference_logprobs(reference: nn.Module, out: GenerationOutput, config: OnlineConfig) -> Tensor:
    """Reference log-probs of the sampled tokens at the sampling temperature, in token-budget batches."""
    rows = max(1, config.micro_batch_tokens // max(1, out.prompt_ids.shape[1] + out.response_ids.shape[1]))
    return response_logprobs(reference, out, temperature=config.temperature, batch_size=rows * 2)


def sequence_kl(rollout: Rollout, kind: str = "k1") -> Tensor:
    """``[N]`` sum over response tokens of the per-token KL estimate (k1: log pi - log ref)."""
    d = (rollout.logprobs - rollout.ref_logprobs) * rollout.mask
    return (KL_ESTIMATORS[kind](d) * rollout.mask).sum(-1)


# --------------------------------------------------------------------------------------------------
# minibatches and the forward pass


def minibatch_plan(n: int, minibatches: int, seed: int, iteration: int, epoch: int) -> list[list[int]]:
    """Shuffled, near-equal minibatches of ``range(n)`` for one update pass, fixed by (seed, iteration,
    epoch) so that a resumed run repeats them."""
    order = np.random.default_rng([seed, 7919, iteration, epoch]).permutation(n)
    return [part.tolist() for part in np.array_split(order, minibatches)]


def micro_plan(rollout: Rollout, rows: list[int], budget: int) -> list[list[int]]:
    """Split ``rows`` (in order) so that rows x (prompt + response width) stays within ``budget``."""
    out: list[list[int]] = []
    current: list[int] = []
    p_len = rollout.out.prompt_mask.sum(-1)
    r_len = rollout.out.response_mask.sum(-1)
    for i in rows:
        trial = current + [i]
        width = int(p_len[trial].max() + r_len[trial].max())
        if current and width * len(trial) > budget:
            out.append(current)
            trial = [i]
        current = trial
    if current:
        out.append(current)
    return out


@dataclass
class Micro:
    """Rows of a rollout cut to their own widths: ``input_ids``/``attention_mask`` ``[b, P' + R']``."""

    rows: list[int]
    input_ids: Tensor
    attention_mask: Tensor
    response_ids: Tensor
    mask: Tensor
    width: int

    def take(self, x: Tensor) -> Tensor:
        """The rows and response columns of a rollout tensor ``[N, R]``."""
        return x[self.rows, : self.width]


def make_micro(rollout: Rollout, rows: list[int], device: torch.device) -> Micro:
    out = rollout.out
    p = int(out.prompt_mask[rows].sum(-1).max())
    r = int(out.response_mask[rows].sum(-1).max())
    prompt_ids, prompt_mask = out.prompt_ids[rows, -p:], out.prompt_mask[rows, -p:]
    response_ids, response_mask = out.response_ids[rows, :r], out.response_mask[rows, :r]
    input_ids = torch.cat([prompt_ids, response_ids], 1).to(device)
    attention_mask = torch.cat([prompt_mask.to(response_mask.dtype), response_mask], 1).to(device)
    return Micro(
        rows, input_ids, attention_mask, response_ids.to(device), response_mask.float().to(device), r
    )


def _rows_over_temperature(hidden: Tensor, temperature: float) -> Tensor:
    """``[b, R', H] -> [b * R', H]`` divided by the temperature: ``(h / T) W^T = (h W^T) / T``."""
    scaled = hidden if temperature == 1 else hidden / temperature
    return scaled.reshape(-1, scaled.shape[-1])


class PolicyLogits(nn.Module):
    """The policy as a module whose forward takes a :class:`Micro` (what the critic-free methods train)."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.value_head: nn.Linear | None = None

    def hidden(self, micro: Micro) -> Tensor:
        """The output layer's inputs ``[b, R', H]`` at the positions that predict each response token."""
        positions = position_ids_from_mask(micro.attention_mask)
        trunk = self.policy.get_decoder()
        hidden = trunk(
            input_ids=micro.input_ids, attention_mask=micro.attention_mask, position_ids=positions
        ).last_hidden_state
        return hidden[:, -(micro.width + 1) : -1]

    def forward(
        self, micro: Micro, temperature: float, with_values: bool = False, targets: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Logits ``[b, R', V]`` (divided by ``temperature``) that predict each response token, or with
        ``targets`` ``[b, R']`` the log-probabilities of those tokens; no values."""
        return self.head_output(self.hidden(micro), temperature, targets), None

    def old_outputs(self, micro: Micro, temperature: float) -> tuple[Tensor, Tensor, Tensor | None]:
        """Without gradients: the response tokens' log-probs and entropies ``[b, R']`` (computed as the
        update computes log-probs, so that before any step the ratio is exactly 1) and the values."""
        from prefalign.losses import entropy_from_logits
        from prefalign.memory import HEAD_CHUNK, head_logps, plain_lm_head

        with torch.no_grad():
            targets = micro.response_ids
            head = plain_lm_head(self.policy)
            if head is None:
                logits, values = self(micro, temperature)
                return token_logps(logits, targets), entropy_from_logits(logits), values
            hidden = self.hidden(micro)
            values = self.values_of(micro, hidden)
            flat = _rows_over_temperature(hidden, temperature)
            logp, _, ent = head_logps(flat, head.weight, targets.reshape(-1), HEAD_CHUNK, entropy=True)
            return logp.view(targets.shape), ent.view(targets.shape), values

    def values_of(self, micro: Micro, hidden: Tensor) -> Tensor | None:
        """The critic's values ``[b, R']`` (none here: no critic)."""
        return None

    def head_output(self, hidden: Tensor, temperature: float, targets: Tensor | None) -> Tensor:
        """Logits from ``hidden`` (over temperature), or the log-probs of ``targets`` under them. Log-probs
        of a plain linear head are computed a chunk of rows at a time (no ``[b, R', V]`` tensor, nor its
        gradient, ever exists: :class:`prefalign.memory.HeadTokenLogps`)."""
        from prefalign.memory import HEAD_CHUNK, HeadTokenLogps, plain_lm_head

        head = plain_lm_head(self.policy) if targets is not None else None
        if head is None:
            logits = self.policy.get_output_embeddings()(hidden).float() / temperature
            return logits if targets is None else token_logps(logits, targets)
        flat = _rows_over_temperature(hidden, temperature)
        return HeadTokenLogps.apply(flat, head.weight, targets.reshape(-1), HEAD_CHUNK).view(targets.shape)


class PolicyWithValue(PolicyLogits):
    """The policy and its critic as one module (one optimiser, one DDP wrapper).

    The critic is either a separate sequence classifier (its own transformer; values from its scalar
    head at every position) or a scalar head on the policy's own last hidden states (``shared``: one
    transformer pass gives both logits and values).
    """

    def __init__(self, policy: nn.Module, value_model: nn.Module | None = None) -> None:
        super().__init__(policy)
        self.value_model = value_model
        if value_model is None:
            hidden = policy.get_output_embeddings().weight.shape[1]
            self.value_head = nn.Linear(hidden, 1).to(policy.get_output_embeddings().weight.dtype)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def forward(
        self, micro: Micro, temperature: float, with_values: bool = True, targets: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Logits ``[b, R', V]`` (divided by ``temperature``) that predict each response token (with
        ``targets``: the log-probs of those tokens), and the values ``[b, R']`` of the states they are
        predicted from."""
        hidden = self.hidden(micro)
        logits = self.head_output(hidden, temperature, targets)
        return logits, (self.values_of(micro, hidden) if with_values else None)

    def values_of(self, micro: Micro, hidden: Tensor) -> Tensor | None:
        """Values ``[b, R']``: the trunk head on ``hidden``, or the separate critic's own pass."""
        if self.value_head is not None:
            return self.value_head(hidden).squeeze(-1).float()
        from prefalign.models import token_scores

        values = token_scores(self.value_model, micro.input_ids, micro.attention_mask)
        return values[:, -(micro.width + 1) : -1]


def old_pass(
    module: nn.Module, rollout: Rollout, plans: list[list[int]], device: torch.device, temperature: float
) -> None:
    """Fill ``rollout.logprobs``, ``.values`` and ``.entropy`` before any update, micro-batch by
    micro-batch in the layout of the first update pass (same rows, same widths: the same arithmetic)."""
    shape = rollout.out.response_ids.shape
    rollout.logprobs = torch.zeros(shape)
    rollout.values = torch.zeros(shape)
    rollout.entropy = torch.zeros(shape)
    with torch.no_grad():
        for rows in plans:
            micro = make_micro(rollout, rows, device)
            logprobs, entropy, values = module.old_outputs(micro, temperature)
            w = micro.width
            rollout.logprobs[rows, :w] = (logprobs * micro.mask).cpu()
            rollout.entropy[rows, :w] = (entropy * micro.mask).cpu()
            if values is not None:
                rollout.values[rows, :w] = (values * micro.mask).cpu()


def sampler_pass(module: nn.Module, rollout: Rollout, plans: list[list[int]], device: torch.device) -> None:
    """The cheap alternative to :func:`old_pass`: the sampler's log-probs and entropies are the old
    policy's already, a trunk value head reads the sampler's hidden states, and only a separate critic
    runs its own forward (in ``plans``' micro-batches)."""
    out = rollout.out
    rollout.logprobs = out.logprobs.cpu()
    rollout.entropy = out.entropy.cpu()
    with torch.no_grad():
        if module.value_head is not None:
            rollout.values = (module.value_head(out.hidden).squeeze(-1).float() * out.response_mask).cpu()
            return
        from prefalign.models import token_scores

        rollout.values = torch.zeros(out.response_ids.shape)
        for rows in plans:
            micro = make_micro(rollout, rows, device)
            values = token_scores(module.value_model, micro.input_ids, micro.attention_mask)
            rollout.values[rows, : micro.width] = (values[:, -(micro.width + 1) : -1] * micro.mask).cpu()


def global_sum(accelerator: Any, *values: float) -> list[float]:
    """Sums over processes of a few numbers (one all-reduce; no-op on one process)."""
    if accelerator.num_processes == 1:
        return list(values)
    vec = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(vec, reduction="sum").cpu().tolist()


def global_whiten(accelerator: Any, x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Whiten ``x`` over the masked positions of every process (mean 0, unbiased variance 1)."""
    n, s, ss = global_sum(
        accelerator, float(mask.sum()), float((x * mask).sum()), float((x * x * mask).sum())
    )
    mean = s / max(n, 1.0)
    var = (ss - n * mean * mean) / max(n - 1.0, 1.0)
    out = (x - mean) * (1.0 / math.sqrt(max(var, 0.0) + 1e-8))
    return (out if shift_mean else out + mean) * mask


# --------------------------------------------------------------------------------------------------
# the run: what every online method holds between iterations, and the outer loop


@dataclass
class OnlineRun:
    """Everything one online run holds between iterations. A method subclasses it and fills in
    :meth:`run_iteration` (and, if it keeps more state, the checkpoint hooks)."""

    config: OnlineConfig
    accelerator: Any
    module: nn.Module
    reference: nn.Module
    source: Any
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    prompts: tuple[list[list[int]], list[str]]
    eval_prompts: tuple[list[list[int]], list[str]]
    iterations: int
    state: dict[str, Any] = field(default_factory=lambda: {"step": 0})
    minibatch_stats: list[dict[str, float]] = field(default_factory=list)

    name = "online"
    """The command's name (progress bar)."""
    shown: ClassVar[tuple[str, ...]] = ("objective/scores", "objective/kl")
    """Metrics shown next to the progress bar."""

    @property
    def unwrapped(self) -> PolicyLogits:
        return self.accelerator.unwrap_model(self.module)

    def run_iteration(self, it: int) -> dict[str, float]:
        raise NotImplementedError

    def extra_modules(self) -> dict[str, nn.Module]:
        """Modules saved in checkpoints beside the policy."""
        return {}

    def before_checkpoint(self) -> None:
        """Copy state that lives outside ``state`` into it."""

    def after_resume(self) -> None:
        """Restore state that lives outside ``state`` from it."""

    def save_extra(self, output: Any) -> None:
        """Save what the final folder holds beside the policy."""


def prepare(config: OnlineConfig, tokenizer: Any = None) -> tuple[Any, Any, tuple, tuple]:
    """Seed, make the accelerator and the tokenizer, load and encode the training and held-out prompts:
    ``(accelerator, tokenizer, (ids, texts), (eval_ids, eval_texts))``."""
    from pathlib import Path

    from prefalign.data import load_prompts
    from prefalign.models import load_tokenizer
    from prefalign.train.loop import (
        check_run_folder,
        clear_run,
        make_accelerator,
        seed_everything,
        sharded,
        split_rows,
    )

    check_run_folder(config)  # before anything is loaded: a folder holding a run needs --resume/--overwrite
    if config.overwrite and not config.resume:
        clear_run(Path(config.output))
    seed_everything(config.seed)
    acc = make_accelerator()
    if sharded(acc):
        raise ConfigError(
            "online methods (ppo, grpo, rloo) run on one process or several under DDP (--num-processes, "
            "configs/accelerate/ddp.yaml), not under FSDP or DeepSpeed yet"
        )
    if config.rollout_batch % acc.num_processes:
        raise ConfigError(
            f"rollout_batch {config.rollout_batch} must divide over {acc.num_processes} processes"
        )
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
    rows, held = split_rows(
        load_prompts(config.prompts),
        load_prompts(config.eval_prompts) if config.eval_prompts else [],
        config.eval_split,
        config.seed,
    )
    encode = lambda r: (encode_prompts(tokenizer, r, config), prompt_texts(tokenizer, r))  # noqa: E731
    return acc, tokenizer, encode(rows), encode(held)


def build_run(run_class: type, config: OnlineConfig, acc: Any, module: nn.Module, prompts: tuple,
              held: tuple, **parts: Any) -> Any:  # fmt: skip
    """A ``run_class`` run: the optimiser and schedule over ``module``'s trainable parameters, prepared by
    the accelerator; ``parts`` are the run's other fields (reference, source, tokenizer, ...)."""
    from prefalign.train.loop import make_optimizer, make_scheduler

    iterations = config.total_iterations(len(prompts[0]))
    optimizer = make_optimizer([p for p in module.parameters() if p.requires_grad], config)
    scheduler = make_scheduler(optimizer, config, iterations * config.ppo_epochs * config.minibatches)
    module, optimizer = acc.prepare(module, optimizer)
    return run_class(
        config=config, accelerator=acc, module=module, optimizer=optimizer, scheduler=scheduler,
        prompts=prompts, eval_prompts=held, iterations=iterations, **parts,
    )  # fmt: skip


def rollout_for(
    run: OnlineRun, prompt_ids: list[list[int]], texts: list[str], seed: int, for_update: bool = False
) -> tuple[Rollout, dict[str, float]]:
    """Sample, score and re-score under the reference; returns the rollout and the phase timings.
    ``for_update`` keeps the sampler's hidden states and entropies (unless --recompute-logprobs)."""
    import time

    config = run.config
    t0 = time.perf_counter()
    keep = for_update and not config.recompute_logprobs
    out = sample(run.unwrapped.policy, run.tokenizer, prompt_ids, config, seed, return_hidden=keep)
    t1 = time.perf_counter()
    scores, raw = score(run.source, texts, out, config.missing_eos_penalty)
    t2 = time.perf_counter()
    rollout = Rollout(out, scores, raw)
    rollout.ref_logprobs = reference_logprobs(run.reference, out, config).cpu()
    return rollout, {
        "time/generate": t1 - t0,
        "time/score": t2 - t1,
        "time/forward": time.perf_counter() - t2,
    }


def sample_iteration(run: OnlineRun, it: int, repeats: int = 1) -> tuple[Rollout, dict[str, float]]:
    """This process's share of iteration ``it``'s prompts, each ``repeats`` times in a row (a group),
    sampled with the iteration's seed, scored and re-scored under the reference."""
    config, acc = run.config, run.accelerator
    ids, texts = run.prompts
    chosen = iteration_prompts(len(ids), config.rollout_batch, config.seed, it)
    mine = [i for i in chosen[acc.process_index :: acc.num_processes] for _ in range(repeats)]
    seed = (config.seed * 1_000_003 + it) * 64 + acc.process_index
    return rollout_for(run, [ids[i] for i in mine], [texts[i] for i in mine], seed, for_update=True)


def sample_means(run: OnlineRun, rollout: Rollout, sums: dict[str, Tensor]) -> dict[str, float]:
    """Means over every process's samples of per-sample sums (one all-reduce), and the token-level mean
    ``objective/entropy`` of the sampling distribution."""
    mask = rollout.mask
    totals = global_sum(
        run.accelerator,
        float(len(rollout)),
        float(mask.sum()),
        float((rollout.entropy * mask).sum()),
        *(float(v) for v in sums.values()),
    )
    n, tokens, entropy = totals[:3]
    out = {k: v / n for k, v in zip(sums, totals[3:], strict=True)}
    return {**out, "objective/entropy": entropy / max(tokens, 1.0)}


def mean_stats(rows: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each statistic over the minibatch rows of an update."""
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def evaluate(run: OnlineRun) -> dict[str, float]:
    """Mean score and sequence KL to the reference on the held-out prompts (fixed sampling seed)."""
    ids, texts = run.eval_prompts
    acc = run.accelerator
    mine = list(range(acc.process_index, len(ids), acc.num_processes))
    if not ids:
        return {}
    seed = run.config.seed + 10**9 + acc.process_index
    rollout, _ = rollout_for(run, [ids[i] for i in mine], [texts[i] for i in mine], seed)
    kl = ((rollout.out.logprobs - rollout.ref_logprobs) * rollout.mask).sum(-1)
    n, s, k = global_sum(acc, float(len(rollout)), float(rollout.raw_scores.sum()), float(kl.sum()))
    return {"eval/scores": s / n, "eval/kl": k / n}


def optimizer_step(
    run: OnlineRun, micros: list[list[int]], micro_loss: Any, scale: float, norm: float
) -> dict[str, float]:
    """One optimiser step over one minibatch split into micro-batches (gradients synchronised once).

    Args:
        micros: the minibatch's rows, micro-batch by micro-batch.
        micro_loss: ``micro_loss(rows) -> (loss, sums)``: a summed loss and summed statistics.
        scale: what each micro-batch's loss is multiplied by before backward (``1 / normaliser``, times
            the process count where the normaliser spans every process, as DDP averages gradients).
        norm: the statistics' sums over every process are divided by this.

    Returns:
        The normalised statistics and ``policy/grad_norm``.
    """
    acc = run.accelerator
    sums: dict[str, Tensor] = {}
    for j, rows in enumerate(micros):
        sync = nullcontext() if j == len(micros) - 1 else acc.no_sync(run.module)
        with sync:
            loss, stats = micro_loss(rows)
            acc.backward(loss * scale)
        sums = {k: sums.get(k, 0.0) + v for k, v in stats.items()}
    params = [p for p in run.module.parameters() if p.grad is not None]
    grad_norm = acc.clip_grad_norm_(params, run.config.max_grad_norm) if run.config.max_grad_norm else None
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)  # no gradients held through the next sampling phase
    release_freed_memory()
    totals = global_sum(acc, *(float(v) for v in sums.values()))
    row = {k: v / max(norm, 1.0) for k, v in zip(sums, totals, strict=True)}
    row["policy/grad_norm"] = float(grad_norm) if grad_norm is not None else 0.0
    return row


def checkpoint(run: OnlineRun) -> None:
    from pathlib import Path

    from prefalign.train.loop import prune_checkpoints, save_checkpoint

    output = Path(run.config.output)
    run.before_checkpoint()
    if run.accelerator.is_main_process:
        save_checkpoint(
            output / "checkpoints" / f"step-{run.state['step']}",
            run.unwrapped.policy,
            run.optimizer,
            run.scheduler,
            run.state,
            run.tokenizer,
            run.config,
            extra=run.extra_modules(),
        )
        prune_checkpoints(output, max(1, run.config.keep_checkpoints))


def resume(run: OnlineRun) -> bool:
    """Load the latest checkpoint under --resume; False when starting from scratch."""
    import logging
    from pathlib import Path

    from prefalign.train.loop import latest_checkpoint, load_checkpoint, truncate_metrics

    log = logging.getLogger(__name__)
    ckpt = latest_checkpoint(Path(run.config.output)) if run.config.resume else None
    if run.config.resume and ckpt is None:
        log.info("--resume: no checkpoint in %s, starting from scratch", run.config.output)
    if ckpt is None:
        return False
    extra = run.extra_modules()
    run.state = load_checkpoint(ckpt, run.unwrapped.policy, run.optimizer, run.scheduler, extra=extra)
    run.after_resume()
    truncate_metrics(Path(run.config.output), run.state["step"])  # rows past the checkpoint were redone
    log.info("resumed from %s (iteration %d)", ckpt, run.state["step"])
    return True


def train_run(run: OnlineRun, callback: Any = None) -> dict[str, Any]:
    """The outer loop of every online method: resume, iterate (metrics, evaluation, checkpoints, the
    callback, a progress bar), evaluate at the end, save the final policy and ``summary.json``."""
    import json
    import time
    from pathlib import Path

    from prefalign.config import config_to_dict, save_config
    from prefalign.train.loop import MetricsWriter, save_final_model

    start = time.perf_counter()
    config = run.config
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    main = run.accelerator.is_main_process
    if main:
        save_config(config, output / "config.yaml")
    resumed = resume(run)
    writer = MetricsWriter(
        output, config.report_to, config=config_to_dict(config), append=resumed, enabled=main
    )
    start_eval = {} if resumed else evaluate(run)  # the starting policy's held-out score: the baseline
    if start_eval:
        writer.write(0, start_eval)
    last = _iterate(run, writer, callback)
    final_eval = evaluate(run)
    if final_eval:
        writer.write(run.state["step"], final_eval)
    writer.close()
    if config.save_every == 0 or run.state["step"] % config.save_every:
        checkpoint(run)
    summary = {
        "steps": run.state["step"],
        "train_prompts": len(run.prompts[0]),
        "eval_prompts": len(run.eval_prompts[0]),
        "final": last,
        "eval": final_eval,
        "eval_start": start_eval,
        "wall_s": round(time.perf_counter() - start, 3),
        "settings": config_to_dict(config),
    }
    if main:
        save_final_model(run.unwrapped.policy, run.tokenizer, output)
        run.save_extra(output)
        (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _iterate(run: OnlineRun, writer: Any, callback: Any) -> dict[str, float]:
    from tqdm.auto import tqdm

    config = run.config
    bar = tqdm(
        total=run.iterations,
        initial=run.state["step"],
        desc=run.name,
        unit="it",
        disable=not config.progress,
        dynamic_ncols=True,
    )
    metrics: dict[str, float] = {}
    while run.state["step"] < run.iterations:
        metrics = run.run_iteration(run.state["step"])
        run.state["step"] += 1
        step = run.state["step"]
        is_last = step == run.iterations
        if config.eval_every and step % config.eval_every == 0 and not is_last:
            metrics.update(evaluate(run))
        writer.write(step, metrics)
        if callback is not None and ((config.eval_every and step % config.eval_every == 0) or is_last):
            callback(step, run.unwrapped.policy)
        if config.save_every and step % config.save_every == 0:
            checkpoint(run)
        bar.set_postfix(
            {k.split("/")[-1]: f"{metrics[k]:.3g}" for k in run.shown if k in metrics}, refresh=False
        )
        bar.update(1)
    bar.close()
    return metrics


def print_summary(summary: dict[str, Any], output: str, keys: tuple[str, ...]) -> None:
    """The two lines a command prints when it finishes (main process only)."""
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    final = {**summary["final"], **summary["eval"]}
    print(f"done: {summary['steps']} iterations in {summary['wall_s']:.1f} s; policy saved to {output}")
    print("  " + "  ".join(f"{k}={final[k]:.4g}" for k in keys if k in final))
