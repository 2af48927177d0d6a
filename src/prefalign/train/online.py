"""What the online methods (PPO, GRPO, RLOO) share: sample, score, re-score, update.

One iteration of an online method (:func:`run_iteration`):

1. **sample** responses to a batch of prompts from the current policy (:func:`prefalign.generation.
   generate`, temperature applied, log-probs of the distribution that sampled);
2. **score** them with a reward source (:mod:`prefalign.rewards`), minus ``missing_eos_penalty`` for
   responses that hit the length cap;
3. **re-score** the tokens under the reference model (the KL penalty) and take the "old" log-probs of
   the importance ratio (the sampler's, or with ``--recompute-logprobs`` a fresh pass in the exact
   micro-batch layout of the first update pass, so that the first minibatch's ratio is exactly 1);
4. the method turns that into advantages (:meth:`OnlineRun.targets`), and :func:`update` runs its update
   epochs over shuffled minibatches, one optimiser step each (:meth:`OnlineRun.minibatch_step`).

The options, run folder, checkpoints, optimiser and schedule, and the outer loop (Ctrl-C, cadence,
progress, the lean layers) are the pieces the offline loop uses too; the policy's forward over
micro-batches is :mod:`prefalign.train.policy`'s.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from prefalign.config import ConfigError, config_to_dict
from prefalign.train.checkpoint import load_checkpoint, save_run_checkpoint, save_run_model
from prefalign.train.completions import log_completions, truncate_completions
from prefalign.train.driver import Interrupt, train_steps
from prefalign.train.model_card import write_model_card
from prefalign.train.optim import make_optimizer, make_scheduler
from prefalign.train.options import OnlineConfig
from prefalign.train.policy import (
    Micro,
    PolicyLogits,
    PolicyWithValue,
    make_micro,
    mean_stats,
    micro_plan,
    minibatch_plan,
    nonfinite,
    old_pass,
    optimizer_step,
    sampler_pass,
)
from prefalign.train.precision import LossScaler
from prefalign.train.processes import make_accelerator, seed_everything, sharded, sum_over_processes
from prefalign.train.rollout import (
    Rollout,
    check_reward_data,
    encode_prompts,
    iteration_prompts,
    reference_logprobs,
    reward_rows,
    sample,
    score,
    sequence_kl,
    shares_prompts,
)
from prefalign.train.run_folder import (
    MetricsWriter,
    begin_run,
    check_run_folder,
    open_metrics,
    write_summary,
)

__all__ = [  # (the options, the policy's pieces and the rollout, long offered here, live in their modules)
    "Micro",
    "OnlineConfig",
    "Rollout",
    "check_reward_data",
    "encode_prompts",
    "iteration_prompts",
    "reference_logprobs",
    "reward_rows",
    "sample",
    "score",
    "sequence_kl",
    "PolicyLogits",
    "PolicyWithValue",
    "make_micro",
    "mean_stats",
    "micro_plan",
    "minibatch_plan",
    "old_pass",
    "optimizer_step",
    "sampler_pass",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------


def global_whiten(accelerator: Any, x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Whiten ``x`` over the masked positions of every process (mean 0, unbiased variance 1)."""
    n, s, ss = sum_over_processes(
        accelerator, float(mask.sum()), float((x * mask).sum()), float((x * x * mask).sum())
    )
    mean = s / max(n, 1.0)
    var = (ss - n * mean * mean) / max(n - 1.0, 1.0)
    out = (x - mean) * (1.0 / math.sqrt(max(var, 0.0) + 1e-8))
    return (out if shift_mean else out + mean) * mask


# --------------------------------------------------------------------------------------------------
# the run: what every online method holds between iterations


@dataclass
class OnlineRun:
    """Everything one online run holds between iterations (a :class:`prefalign.train.driver.StepRun`).
    A method subclasses it and fills in :meth:`targets`, :meth:`minibatch_step` and
    :meth:`iteration_metrics` (and, if it keeps more state, the checkpoint hooks)."""

    config: OnlineConfig
    accelerator: Any
    module: nn.Module
    reference: nn.Module | None
    """The frozen reference; ``None`` for the LoRA policy with its adapter off."""
    source: Any
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    prompts: tuple[list[list[int]], list[str]]
    eval_prompts: tuple[list[list[int]], list[str]]
    iterations: int
    state: dict[str, Any] = field(default_factory=lambda: {"step": 0})
    minibatch_stats: list[dict[str, float]] = field(default_factory=list)
    resume_from: Path | None = None
    """The checkpoint to resume from (``--resume``), found before anything was loaded."""
    writer: MetricsWriter | None = None
    callback: Any = None
    interrupt: Interrupt = field(default_factory=Interrupt)
    saved_step: int = -1
    start_eval: dict[str, float] = field(default_factory=dict)
    """The starting policy's held-out scores (the baseline; not taken again on resume)."""
    reference_same: bool | None = None
    """Whether the reference computes the policy's function (:func:`reference_is_policy`; ``None``: not
    checked yet; ``False`` from the first update on)."""

    name = "online"
    """The command's name (progress bar)."""
    unit = "it"
    shown: ClassVar[tuple[str, ...]] = ("objective/scores", "objective/kl")
    """Metrics shown next to the progress bar."""
    repeats: ClassVar[int] = 1
    """Samples per prompt in an iteration (GRPO and RLOO: the group size)."""
    release_every: ClassVar[int] = 6
    """Freed memory goes back to the OS after every 6th decoder layer of the update's forward (the
    iteration's peak: BENCHMARKS.md)."""

    @property
    def unwrapped(self) -> PolicyLogits:
        return self.accelerator.unwrap_model(self.module)

    @property
    def total(self) -> int:
        return self.iterations

    # what a method fills in

    def targets(self, rollout: Rollout, it: int) -> tuple[dict[str, Tensor], Any]:
        """What the update trains toward (advantages, old log-probs, ...) as rollout-row tensors, and what
        :meth:`iteration_metrics` needs besides."""
        raise NotImplementedError

    def minibatch_step(
        self, rollout: Rollout, batch: dict[str, Tensor], rows: list[int], micros: list[list[int]]
    ) -> dict[str, float]:
        """One optimiser step on the minibatch ``rows`` (split into ``micros``); its statistics."""
        raise NotImplementedError

    def iteration_metrics(self, rollout: Rollout, extra: Any) -> dict[str, float]:
        """The iteration's objective terms, means over every process's samples."""
        raise NotImplementedError

    def run_iteration(self, it: int) -> dict[str, float]:
        return run_iteration(self, it)

    def extra_modules(self) -> dict[str, nn.Module]:
        """Modules saved in checkpoints beside the policy."""
        return {}

    def before_checkpoint(self) -> None:
        """Copy state that lives outside ``state`` into it."""

    def after_resume(self) -> None:
        """Restore state that lives outside ``state`` from it."""

    def save_extra(self, output: Path) -> None:
        """Save what the final folder holds beside the policy."""

    def sample_fields(self, rollout: Rollout, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``[N]`` figures of each sample for ``completions.jsonl`` beside its rewards: ``advantage`` (the
        sequence's, or the first response token's where the advantages are per token)."""
        adv = batch["advantages"]
        return {"advantage": adv[:, 0] if adv.dim() == 2 else adv}

    # the driver's side (prefalign.train.driver.StepRun)

    def lean_target(self) -> tuple[nn.Module, list[nn.Parameter]]:
        return self.unwrapped, []  # (gradients are freed after each step: nothing to add in place)

    def begin(self) -> None:
        if self.saved_step < 0:  # not resumed: the starting policy's held-out score is the baseline
            self.start_eval = held_out_scores(self)
            if self.start_eval:
                self.writer.write(0, self.start_eval)

    def advance(self) -> dict[str, float]:
        return self.run_iteration(self.state["step"])

    def evaluate(self) -> dict[str, float]:
        return held_out_scores(self)

    def save(self) -> None:
        self.before_checkpoint()
        save_run_checkpoint(
            self.accelerator, Path(self.config.output), self.unwrapped.policy, self.optimizer,
            self.scheduler, self.state, self.tokenizer, self.config, extra=self.extra_modules(),
        )  # fmt: skip
        self.saved_step = self.state["step"]

    def trained_model(self) -> nn.Module:
        return self.unwrapped.policy


def prepare(config: OnlineConfig, tokenizer: Any = None) -> tuple[Any, Any, tuple, tuple, Path | None]:
    """Check the run folder, seed, make the accelerator and the tokenizer, load and encode the training
    and held-out prompts: ``(accelerator, tokenizer, (ids, rows), (eval_ids, eval_rows), checkpoint)`` (the
    rows: :func:`reward_rows`),
    the last the one to resume from (``None`` without ``--resume``). The folder itself is cleared
    (``--overwrite``) later, by the main process, when the run begins (:func:`train_run`)."""
    from prefalign.data import load_prompts
    from prefalign.models import load_tokenizer
    from prefalign.train.loop import split_rows

    ckpt = check_run_folder(config)  # before anything is loaded: a folder holding a run needs a flag
    check_response_length(config)
    seed_everything(config.seed)
    acc = make_accelerator()
    if sharded(acc):
        raise ConfigError(
            "online methods (ppo, grpo, rloo) run on one process or several under DDP (--num-processes, "
            "configs/accelerate/ddp.yaml), not under FSDP or DeepSpeed yet"
        )
    config.check_processes(acc.num_processes)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
    train, held_source = config.prompt_sources()
    rows, held = split_rows(
        load_prompts(**train),
        load_prompts(**held_source) if held_source else [],
        config.eval_split,
        config.seed,
    )
    encode = lambda r: (encode_prompts(tokenizer, r, config), reward_rows(r))  # noqa: E731
    return acc, tokenizer, encode(rows), encode(held), ckpt


def check_response_length(config: OnlineConfig) -> None:
    """Refuse a ``--response-length`` past the policy's context, from its config alone (no weights
    loaded, nothing allocated: the sampler's cache for ``10**12`` positions asked for terabytes).

    Raises:
        ConfigError: naming response_length, the context, the config key that holds it and what fits.
        ModelError: the model cannot be found.
    """
    from prefalign.generation import context_entry
    from prefalign.models import load_config

    context = context_entry(load_config(config.model, trust_remote_code=config.trust_remote_code))
    if context is not None and config.response_length >= context[1]:
        key, length = context
        raise ConfigError(
            f"response_length: {config.response_length} new tokens pass the context of {config.model} "
            f"({length} tokens, {key} in its config); at most {length - 1} fit after a one-token prompt"
        )


def load_policy(config: OnlineConfig, model: nn.Module | None) -> nn.Module:
    """The policy to train (``model``, or loaded as configured) with the model's own dropout off: the ratio
    needs the same function in every pass (sampling, old, update). With ``--lora-r`` it is wrapped with LoRA
    adapters on ``--lora-targets`` (a peft model: only the adapters train), whose ``--lora-dropout`` acts in
    the update passes only (the others run in eval mode)."""
    from prefalign.models import apply_lora
    from prefalign.models import load_policy as load

    lora = config.lora_settings()
    policy = model if model is not None else load(
        config.model, dtype=config.dtype, trust_remote_code=config.trust_remote_code
    )  # fmt: skip
    if lora is not None and not hasattr(policy, "peft_config"):
        policy = apply_lora(policy, lora)
    for name, sub in policy.named_modules():
        if isinstance(sub, nn.Dropout) and "lora_dropout" not in name:
            sub.p = 0.0
    return policy


def load_reference(config: OnlineConfig, device: Any) -> nn.Module | None:
    """The frozen reference model (``--ref-model``, by default the starting policy's weights); ``None``
    with LoRA and no ``--ref-model``: the reference is then the policy with its adapter switched off (one
    copy of the base weights in memory, :func:`reference_logprobs`)."""
    from prefalign.models import load_reference as load

    if config.lora_r and not config.ref_model:
        return None
    kwargs = {"dtype": config.dtype, "trust_remote_code": config.trust_remote_code}
    return load(config.ref_model or config.model, **kwargs).to(device)


def check_vocabulary(source: Any, tokenizer: Any) -> Any:
    """Mark a reward model that shares the policy's vocabulary (``same_vocab``: it then scores the
    sampled token ids without a decode/re-encode round trip); returns ``source``."""
    from prefalign.rewards import ModelReward

    if isinstance(source, ModelReward):
        source.same_vocab = source.tokenizer.get_vocab() == tokenizer.get_vocab()
    return source


def build_run(run_class: type, config: OnlineConfig, acc: Any, module: nn.Module, prompts: tuple,
              held: tuple, **parts: Any) -> Any:  # fmt: skip
    """A ``run_class`` run: the optimiser and schedule over ``module``'s trainable parameters, prepared by
    the accelerator; ``parts`` are the run's other fields (reference, source, tokenizer, ...)."""
    iterations = config.total_iterations(len(prompts[0]))
    optimizer = make_optimizer([p for p in module.parameters() if p.requires_grad], config)
    scheduler = make_scheduler(optimizer, config, iterations * config.ppo_epochs * config.minibatches)
    module, optimizer = acc.prepare(module, optimizer)
    return run_class(
        config=config, accelerator=acc, module=module, optimizer=optimizer, scheduler=scheduler,
        prompts=prompts, eval_prompts=held, iterations=iterations, **parts,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# one iteration


def rollout_for(
    run: OnlineRun,
    prompt_ids: list[list[int]],
    rows: list[dict[str, Any]],
    seed: int,
    for_update: bool = False,
    group: int = 1,
) -> tuple[Rollout, dict[str, float]]:
    """Sample, score and re-score under the reference; returns the rollout and the phase timings. ``rows``
    are what the reward sees of each prompt (:func:`reward_rows`), prompt-major in groups of ``group``.
    ``for_update`` keeps the sampler's hidden states and entropies (unless --recompute-logprobs)."""
    config = run.config
    t0 = time.perf_counter()
    keep = for_update and not config.recompute_logprobs
    out = sample(run.unwrapped.policy, run.tokenizer, prompt_ids, config, seed, return_hidden=keep)
    t1 = time.perf_counter()
    scores, raw = score(run.source, rows, out, config.missing_eos_penalty)
    t2 = time.perf_counter()
    rollout = Rollout(out, scores, raw, rows=rows, group=group, shared=group > 1 and shares_prompts(config))
    policy = run.unwrapped.policy
    if reference_is_policy(run):  # (before the first update: the sampler's log-probs are the reference's)
        rollout.ref_logprobs = out.logprobs.cpu().clone()
    else:
        rollout.ref_logprobs = reference_logprobs(run.reference, out, config, policy, group).cpu()
    return rollout, {
        "time/generate": t1 - t0,
        "time/score": t2 - t1,
        "time/forward": time.perf_counter() - t2,
    }


def reference_is_policy(run: OnlineRun) -> bool:
    """Whether the reference computes the policy's function now: in a fresh run before its first update,
    when the reference is the starting policy. That holds for the LoRA policy with its adapter off while
    every LoRA ``B`` is still zero (``W x + s B A x`` is then ``W x`` exactly; DoRA's rescaling is not
    exact, so not for DoRA), and for a reference model whose parameters and buffers equal the policy's.
    The sampler's log-probs are then the reference's to the same rounding as the old policy's (no top-k or
    top-p in online sampling), and the reference pass of that iteration is skipped. Checked on the weights
    once per run (not assumed from the options: a policy given from Python may differ from ``--model``)."""
    if run.reference_same is None:  # (set to False by the first update and by a resume)
        fresh = run.state["step"] == 0 and run.saved_step < 0
        run.reference_same = fresh and _same_weights(run.unwrapped.policy, run.reference)
    return run.reference_same


def _same_weights(policy: nn.Module, reference: nn.Module | None) -> bool:
    """:func:`reference_is_policy`'s check of the weights (see there)."""
    with torch.no_grad():
        if reference is None:  # the LoRA policy with its adapter off
            params = dict(policy.named_parameters())
            if any("lora_magnitude_vector" in n for n in params):
                return False
            ups = [p for n, p in params.items() if "lora_B" in n or "lora_embedding_B" in n]
            return bool(ups) and not any(bool(p.any()) for p in ups)
        if type(policy) is not type(reference):
            return False
        ours = dict(policy.state_dict(keep_vars=True))
        theirs = dict(reference.state_dict(keep_vars=True))
        return ours.keys() == theirs.keys() and all(
            ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours
        )


def sample_iteration(run: OnlineRun, it: int, repeats: int = 1) -> tuple[Rollout, dict[str, float]]:
    """This process's share of iteration ``it``'s prompts, each ``repeats`` times in a row (a group),
    sampled with the iteration's seed, scored and re-scored under the reference."""
    config, acc = run.config, run.accelerator
    ids, texts = run.prompts
    chosen = iteration_prompts(len(ids), config.rollout_batch, config.seed, it)
    mine = [i for i in chosen[acc.process_index :: acc.num_processes] for _ in range(repeats)]
    seed = (config.seed * 1_000_003 + it) * 64 + acc.process_index
    return rollout_for(run, [ids[i] for i in mine], [texts[i] for i in mine], seed, True, repeats)


def sample_means(run: OnlineRun, rollout: Rollout, sums: dict[str, Tensor]) -> dict[str, float]:
    """Means over every process's samples of per-sample sums (one all-reduce), and the token-level mean
    ``objective/entropy`` of the sampling distribution."""
    mask = rollout.mask
    totals = sum_over_processes(
        run.accelerator,
        float(len(rollout)),
        float(mask.sum()),
        float((rollout.entropy * mask).sum()),
        *(float(v) for v in sums.values()),
    )
    n, tokens, entropy = totals[:3]
    out = {k: v / n for k, v in zip(sums, totals[3:], strict=True)}
    return {**out, "objective/entropy": entropy / max(tokens, 1.0)}


def held_out_scores(run: OnlineRun) -> dict[str, float]:
    """Mean score and sequence KL to the reference of responses sampled for the held-out prompts (fixed
    sampling seed); the online evaluation (the offline methods' is the loss of held-out examples,
    :func:`prefalign.train.loop.held_out_metrics`)."""
    ids, texts = run.eval_prompts
    acc = run.accelerator
    mine = list(range(acc.process_index, len(ids), acc.num_processes))
    if not ids:
        return {}
    seed = run.config.seed + 10**9 + acc.process_index
    rollout, _ = rollout_for(run, [ids[i] for i in mine], [texts[i] for i in mine], seed)
    kl = ((rollout.out.logprobs - rollout.ref_logprobs) * rollout.mask).sum(-1)
    n, s, k = sum_over_processes(acc, float(len(rollout)), float(rollout.raw_scores.sum()), float(kl.sum()))
    return {"eval/scores": s / n, "eval/kl": k / n}


def run_iteration(run: OnlineRun, it: int) -> dict[str, float]:
    """One iteration (0-based ``it``) of any online method: sample (``run.repeats`` per prompt), score,
    old log-probs, the method's targets, the update; returns the iteration's metrics."""
    config, acc = run.config, run.accelerator
    start = time.perf_counter()
    rollout, timing = sample_iteration(run, it, run.repeats)
    t0 = time.perf_counter()
    first = [
        m
        for rows in minibatch_plan(len(rollout), config.minibatches, config.seed, it, 0, rollout.group)
        for m in micro_plan(rollout, rows, config.micro_batch_tokens)
    ]
    if config.recompute_logprobs:  # in the first update pass's micro-batches: the same arithmetic
        old_pass(run.unwrapped, rollout, first, acc.device, config.temperature)
    else:
        sampler_pass(run.unwrapped, rollout, first, acc.device, config.temperature)
    timing["time/forward"] += time.perf_counter() - t0
    run.minibatch_stats = []
    bad = nonfinite_rollout(run, rollout)
    if bad:
        nonfinite(run, bad)  # (stops the run unless --skip-nonfinite)
    batch, extra = run.targets(rollout, it)
    log_completions(run, rollout, run.sample_fields(rollout, batch), it)  # --log-completions
    t0 = time.perf_counter()
    if bad:  # skipped: no update; the schedule moves on as if it had run
        stats = {}
        for _ in range(config.ppo_epochs * config.minibatches):
            run.scheduler.step()
    else:
        stats = update(run, rollout, batch, it)
    timing["time/update"] = time.perf_counter() - t0
    skipped = run.state.get("nonfinite_skipped", 0)
    return {
        **run.iteration_metrics(rollout, extra),
        **stats,
        **timing,
        **({"nonfinite_skipped": skipped} if skipped else {}),
        "lr": run.scheduler.get_last_lr()[0],
        "time/iteration": time.perf_counter() - start,
    }


def known_lse(run: OnlineRun, rollout: Rollout, micro: Any) -> Tensor | None:
    """The sampler's log-normalisers of ``micro``'s response positions while the update's forward still
    computes the sampler's function: before this iteration's first optimiser step (its first minibatch),
    without LoRA dropout (the update's passes would then differ from sampling); else ``None``."""
    if rollout.lse is None or run.minibatch_stats or run.config.lora_dropout > 0:
        return None
    return micro.take(rollout.lse)


def nonfinite_rollout(run: OnlineRun, rollout: Rollout) -> str | None:
    """What is not finite in the iteration's samples over every process (scores, the per-token log-ratio
    to the reference that every KL is made of), or ``None``."""
    mask = rollout.mask.bool()
    ratio = rollout.logprobs - rollout.ref_logprobs
    scores, kl = sum_over_processes(
        run.accelerator,
        float((~torch.isfinite(rollout.scores)).sum()),
        float((~torch.isfinite(ratio) & mask).sum()),
    )
    parts = [f"{int(scores)} scores"] * (scores > 0) + [f"the KL of {int(kl)} response tokens"] * (kl > 0)
    return " and ".join(parts) or None


def update(run: OnlineRun, rollout: Rollout, batch: dict[str, Tensor], it: int) -> dict[str, float]:
    """``ppo_epochs`` passes over the rollout, one optimiser step per shuffled minibatch (split into
    token-budget micro-batches); returns the statistics' means over the minibatches."""
    config = run.config
    run.minibatch_stats = []
    run.reference_same = False  # (the policy is about to move away from the reference)
    run.module.train()
    for epoch in range(config.ppo_epochs):
        for rows in minibatch_plan(len(rollout), config.minibatches, config.seed, it, epoch, rollout.group):
            micros = micro_plan(rollout, rows, config.micro_batch_tokens)
            run.minibatch_stats.append(run.minibatch_step(rollout, batch, rows, micros))
    return mean_stats(run.minibatch_stats)


# --------------------------------------------------------------------------------------------------
# the outer loop


def resume(run: OnlineRun) -> bool:
    """Load the checkpoint found by :func:`prepare` under --resume; False when starting from scratch."""
    ckpt = run.resume_from
    if ckpt is None:
        return False
    extra = run.extra_modules()
    run.state = load_checkpoint(ckpt, run.unwrapped.policy, run.optimizer, run.scheduler, extra=extra)
    run.after_resume()
    run.saved_step = run.state["step"]
    run.reference_same = False
    log.info("resumed from %s (iteration %d)", ckpt, run.state["step"])
    return True


def train_run(run: OnlineRun, callback: Any = None) -> dict[str, Any]:
    """The outer loop of every online method: the run folder made ready, resume, then the steps of
    :func:`prefalign.train.driver.train_steps` (iterations, metrics, evaluation, checkpoints, the
    callback, a progress bar), the final policy and ``summary.json``.

    ``callback(iteration, policy)`` runs on the main process every ``eval_every`` iterations and after the
    last one.
    """
    start = time.perf_counter()
    config, acc = run.config, run.accelerator
    output = begin_run(config, acc)
    resumed = resume(run)
    run.scaler = LossScaler(config.mixed_precision, acc.device, run.state)  # (fp16's loss scale, resumed)
    if resumed and acc.is_main_process:
        truncate_completions(output, run.state["step"])
    run.callback = callback
    run.writer = open_metrics(config, acc, run.state["step"] if resumed else None)
    try:
        last, final_eval = train_steps(run)
    finally:
        run.writer.close()
    step = run.state["step"]
    save_run_model(acc, run.module, run.unwrapped.policy, run.tokenizer, output, step, run.saved_step)
    summary = {
        "steps": step,
        "train_prompts": len(run.prompts[0]),
        "eval_prompts": len(run.eval_prompts[0]),
        "final": last,
        "eval": final_eval,
        "eval_start": run.start_eval,
        "wall_s": round(time.perf_counter() - start, 3),
        "settings": config_to_dict(config),
    }
    if acc.is_main_process:
        run.save_extra(output)
        write_summary(output, summary)
        write_model_card(output, config, summary)
    return summary
