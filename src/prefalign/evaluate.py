"""Evaluate a policy the way the DPO paper's controlled-sentiment experiment does (Rafailov et al. 2023,
section 6.1): sample a continuation of every test prompt, score it with the ground-truth reward, and
measure how far the policy has moved from the reference by the sequence-level KL divergence.

The KL estimate is the paper's (its footnote to Figure 2): for samples ``y ~ pi(.|x)``,

    KL(pi || pi_ref)(x) ~= sum over the response tokens t of  log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t),

a single-sample Monte-Carlo estimate of the sequence KL (unbiased; the mean over prompts is reported).
Sampling is at temperature 1 with no top-k or top-p, so the samples come from ``pi`` itself, and uses a
fixed seed, so two policies evaluated on the same prompts draw from the same random stream.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

RewardFn = Callable[[Sequence[str], Sequence[str]], list[float]]
"""``reward(prompts, completions) -> scores``, e.g. a :class:`prefalign.rewards.RewardSource`."""


def sequence_kl(policy_logps: Tensor, reference_logps: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence KL estimate ``[B]``: the masked sum over response tokens of the log-ratio.

    Args:
        policy_logps: ``[B, R]`` log-probs of the sampled tokens under the policy that sampled them.
        reference_logps: ``[B, R]`` log-probs of the same tokens under the reference model.
        mask: ``[B, R]`` 1 on response tokens (up to and including the stop token).

    Returns:
        ``[B]`` float32: ``sum_t mask_t * (policy_t - reference_t)``.
    """
    return ((policy_logps.float() - reference_logps.float()) * mask.float()).sum(-1)


@dataclass
class EvalResult:
    """One evaluation of one policy on the test prompts.

    Attributes:
        records: one dict per sample: ``prompt``, ``prompt_index`` (its position among the test prompts),
            ``completion``, ``reward``, ``kl`` (the sequence KL estimate), ``tokens`` (response length)
            and ``finished`` (ended with a stop token).
        reward: mean of the records' ``reward``.
        kl: mean of the records' ``kl``.
        seconds: wall time of the evaluation (sampling, reference pass, scoring).
        reward_ci: 95% bootstrap interval ``[low, high]`` of ``reward`` (:func:`bootstrap_interval`,
            resampling prompts with all their samples).
        kl_ci: the same for ``kl``.
    """

    records: list[dict[str, Any]]
    reward: float
    kl: float
    seconds: float
    reward_ci: list[float] = field(default_factory=lambda: [math.nan, math.nan])
    kl_ci: list[float] = field(default_factory=lambda: [math.nan, math.nan])

    def write(self, path: str | Path) -> None:
        """Write the records as JSON lines (one per sample)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("".join(json.dumps(r) + "\n" for r in self.records))


def mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else float("nan")


BOOTSTRAP_RESAMPLES = 2000
"""Resamples behind every interval the evaluation reports."""


def bootstrap_interval(
    values: Sequence[float],
    groups: Sequence[Any] | None = None,
    level: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> list[float]:
    """Percentile bootstrap interval of the mean of ``values`` (Efron and Tibshirani 1993, ch. 13).

    The resampled units are the groups: with several samples per prompt, a resample draws prompts with
    replacement and keeps all the samples of each, so the interval reflects how the mean varies over
    prompts as well as over samples. Each resample's mean weighs every sample the same (as the reported
    mean does).

    Args:
        values: one number per sample.
        groups: the group of each sample (e.g. its prompt's index); None: every sample is its own group.
        level: coverage of the interval, in (0, 1).
        resamples: bootstrap resamples drawn.
        seed: the resampling's seed (the same data always gives the same interval).

    Returns:
        ``[low, high]``: the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the resampled
        means; ``[v, v]`` for a single group of value ``v``; NaNs for no values.
    """
    import numpy as np

    if not values:
        return [math.nan, math.nan]
    x = np.asarray(values, dtype=np.float64)
    keys = list(range(len(x))) if groups is None else list(groups)
    index = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    g = np.array([index[k] for k in keys])
    sums = np.bincount(g, weights=x, minlength=len(index))
    counts = np.bincount(g, minlength=len(index)).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(index), size=(resamples, len(index)))
    means = sums[draws].sum(1) / counts[draws].sum(1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return [float(low), float(high)]


def result_from_records(records: list[dict[str, Any]], seconds: float = 0.0) -> EvalResult:
    """An :class:`EvalResult` whose means and intervals are those of ``records`` (how every reported number
    is made); samples are grouped by ``prompt_index`` (or by ``prompt`` in records without it)."""
    groups = [r.get("prompt_index", r.get("prompt")) for r in records]
    rewards, kls = [r["reward"] for r in records], [r["kl"] for r in records]
    return EvalResult(
        records,
        mean(rewards),
        mean(kls),
        seconds,
        reward_ci=bootstrap_interval(rewards, groups),
        kl_ci=bootstrap_interval(kls, groups),
    )


def evaluate_policy(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    reward: RewardFn,
    max_new_tokens: int = 32,
    seed: int = 0,
    batch_size: int = 64,
    raw: bool = True,
    progress: bool = False,
    samples_per_prompt: int = 1,
) -> EvalResult:
    """Sample continuations of each prompt from ``policy`` and score reward and KL to ``reference``.

    Args:
        policy: the model to evaluate (its train/eval mode is restored afterwards).
        reference: the frozen reference model ``pi_ref``.
        tokenizer: the tokenizer of both models.
        prompts: ``B`` prompt texts.
        reward: the ground-truth reward of (prompt, completion) pairs.
        max_new_tokens: length cap of each continuation.
        seed: sampling seed (same seed and prompts give the same random stream for every policy).
        batch_size: prompts sampled (and scored under the reference) together.
        raw: encode prompts as plain text (no chat template).
        progress: show a progress bar over sampling batches.
        samples_per_prompt: continuations sampled per prompt (``K``); the records hold ``K`` rows per
            prompt, prompt by prompt, and the intervals resample prompts with their ``K`` samples.

    Returns:
        An :class:`EvalResult`, records in the order of ``prompts`` (``K`` consecutive rows each).
    """
    from prefalign.data import encode_prompt
    from prefalign.generation import SamplingSettings, generate, response_logprobs

    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    index = [i for i in range(len(prompts)) for _ in range(samples_per_prompt)]
    prompts = [prompts[i] for i in index]

    start = time.perf_counter()
    ids = [encode_prompt(tokenizer, p, raw=raw) for p in prompts]
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, seed=seed)
    out = generate(policy, tokenizer, ids, settings, batch_size=batch_size, progress=progress)
    device = next(reference.parameters()).device
    ref_logps = response_logprobs(reference, out.rows(slice(None)), batch_size=batch_size)
    kl = sequence_kl(out.logprobs.to(device), ref_logps, out.response_mask.to(device)).cpu()
    scores = reward(list(prompts), out.texts)
    tokens = out.response_mask.sum(-1).cpu()
    records = [
        {
            "prompt": p,
            "prompt_index": i,
            "completion": text,
            "reward": float(s),
            "kl": float(k),
            "tokens": int(n),
            "finished": bool(f),
        }
        for i, p, text, s, k, n, f in zip(
            index,
            prompts,
            out.texts,
            scores,
            kl.tolist(),
            tokens.tolist(),
            out.finished.cpu().tolist(),
            strict=True,
        )
    ]
    return result_from_records(records, time.perf_counter() - start)


def read_samples(path: str | Path) -> list[dict[str, Any]]:
    """The records of a samples file written by :meth:`EvalResult.write`."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || pi_ref) for a reward without ties: ``log n - (n - 1) / n`` (Stiennon et al. 2020,
    appendix; an upper bound in general), in nats."""
    return math.log(n) - (n - 1) / n


@torch.no_grad()
def best_of_n(
    reference: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    n: int,
    selector: RewardFn,
    reward: RewardFn,
    max_new_tokens: int = 32,
    seed: int = 0,
    batch_size: int = 64,
    raw: bool = True,
    samples_per_prompt: int = 1,
) -> EvalResult:
    """Best-of-n from the reference: ``n`` samples per prompt, keep the one ``selector`` scores highest.

    The KL of each record is the analytic :func:`best_of_n_kl` (best-of-n's own log-probabilities are not
    tractable); ``reward`` is the ground truth of the kept sample. With ``samples_per_prompt`` K, each
    prompt gets K kept samples (K x n drawn), as :func:`evaluate_policy` gives K samples per prompt.
    """
    index = [i for i in range(len(prompts)) for _ in range(samples_per_prompt)]
    prompts = [prompts[i] for i in index]
    from prefalign.data import encode_prompt
    from prefalign.generation import SamplingSettings, generate

    start = time.perf_counter()
    expanded = [p for p in prompts for _ in range(n)]
    ids = [encode_prompt(tokenizer, p, raw=raw) for p in expanded]
    settings = SamplingSettings(max_new_tokens=max_new_tokens, seed=seed)
    out = generate(reference, tokenizer, ids, settings, batch_size=batch_size)
    picks = selector(expanded, out.texts)
    records = []
    for i, p in enumerate(prompts):
        group = range(i * n, (i + 1) * n)
        j = max(group, key=lambda k: picks[k])
        records.append(
            {
                "prompt": p,
                "prompt_index": index[i],
                "completion": out.texts[j],
                "selector": picks[j],
                "kl": best_of_n_kl(n),
            }
        )
    for r, s in zip(records, reward(list(prompts), [r["completion"] for r in records]), strict=True):
        r["reward"] = float(s)
    return result_from_records(records, time.perf_counter() - start)
