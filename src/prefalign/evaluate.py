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
from dataclasses import dataclass
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
        records: one dict per prompt: ``prompt``, ``completion``, ``reward``, ``kl`` (the sequence KL
            estimate), ``tokens`` (response length) and ``finished`` (ended with a stop token).
        reward: mean of the records' ``reward``.
        kl: mean of the records' ``kl``.
        seconds: wall time of the evaluation (sampling, reference pass, scoring).
    """

    records: list[dict[str, Any]]
    reward: float
    kl: float
    seconds: float

    def write(self, path: str | Path) -> None:
        """Write the records as JSON lines (one per sample)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("".join(json.dumps(r) + "\n" for r in self.records))


def mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else float("nan")


def result_from_records(records: list[dict[str, Any]], seconds: float = 0.0) -> EvalResult:
    """An :class:`EvalResult` whose means are those of ``records`` (how every reported number is made)."""
    return EvalResult(
        records,
        mean([r["reward"] for r in records]),
        mean([r["kl"] for r in records]),
        seconds,
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
) -> EvalResult:
    """Sample one continuation of each prompt from ``policy`` and score reward and KL to ``reference``.

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

    Returns:
        An :class:`EvalResult`, records in the order of ``prompts``.
    """
    from prefalign.data import encode_prompt
    from prefalign.generation import SamplingSettings, generate, response_logprobs

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
            "completion": text,
            "reward": float(s),
            "kl": float(k),
            "tokens": int(n),
            "finished": bool(f),
        }
        for p, text, s, k, n, f in zip(
            prompts, out.texts, scores, kl.tolist(), tokens.tolist(), out.finished.cpu().tolist(), strict=True
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
) -> EvalResult:
    """Best-of-n from the reference: ``n`` samples per prompt, keep the one ``selector`` scores highest.

    The KL of each record is the analytic :func:`best_of_n_kl` (best-of-n's own log-probabilities are not
    tractable); ``reward`` is the ground truth of the kept sample.
    """
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
        records.append({"prompt": p, "completion": out.texts[j], "selector": picks[j], "kl": best_of_n_kl(n)})
    for r, s in zip(records, reward(list(prompts), [r["completion"] for r in records]), strict=True):
        r["reward"] = float(s)
    return result_from_records(records, time.perf_counter() - start)
