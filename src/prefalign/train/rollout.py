"""One online iteration's samples: the prompts of each iteration, sampling from the policy, scoring with
the reward source, and the reference's log-probs of what was sampled (:class:`Rollout` holds it all).
:mod:`prefalign.train.online` turns a rollout into advantages and updates."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from prefalign.generation import GenerationOutput, SamplingSettings, generate, response_logprobs
from prefalign.losses import KL_ESTIMATORS
from prefalign.train.options import OnlineConfig

# --------------------------------------------------------------------------------------------------
# prompts


def encode_prompts(tokenizer: Any, rows: list[dict[str, Any]], config: OnlineConfig) -> list[list[int]]:
    """Token ids of each prompt (as `prefalign generate` encodes them), cut from the left."""
    from prefalign.data import encode_prompt

    return [encode_prompt(tokenizer, r["prompt"], raw=config.raw)[-config.max_prompt_length :] for r in rows]


def reward_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a reward sees of each prompt row: ``prompt`` (text, or messages as given) and every other
    column of the file (``None`` where a row lacks one), each row still knowing where it was read."""
    from prefalign.data import located, location
    from prefalign.rewards import data_columns

    names = data_columns(rows)
    return [located({"prompt": r["prompt"], **{k: r.get(k) for k in names}}, location(r)) for r in rows]


def check_reward_data(source: Any, config: OnlineConfig, prompts: tuple, held: tuple) -> None:
    """Before any model is loaded or sampled from: ``source`` takes every column of the training and
    held-out prompts and finds what it needs there (an accuracy reward, each row's ``answer``)."""
    from prefalign.rewards import check_reward_data as check

    name = lambda s: Path(s).name if Path(s).exists() else s  # noqa: E731
    check(source, prompts[1], name(config.prompts))
    if held[1]:
        check(source, held[1], name(config.eval_prompts or config.prompts))


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
        rows: what the reward saw of each response's prompt (the prompt and its columns).
        group: samples per prompt (rows ``g * group`` to ``g * group + group - 1`` share prompt ``g``).
        shared: the forward passes run each group's prompt once (:mod:`prefalign.train.sharing`).
        ref_logprobs: ``[N, R]`` log-probs under the reference model (0 off the response mask).
        logprobs: ``[N, R]`` log-probs under the policy before this iteration's update ("old").
        values: ``[N, R]`` the critic's values before the update (PPO only).
        entropy: ``[N, R]`` the policy's entropy at each response position.
        lse: ``[N, R]`` the sampling distribution's log-normaliser at each response position (NaN off
            the mask; :func:`prefalign.train.policy.sampler_lse`), or ``None``.
    """

    out: GenerationOutput
    scores: Tensor
    raw_scores: Tensor
    rows: list[dict[str, Any]] = field(default_factory=list)
    group: int = 1
    shared: bool = False
    ref_logprobs: Tensor | None = None
    logprobs: Tensor | None = None
    values: Tensor | None = None
    entropy: Tensor | None = None
    lse: Tensor | None = None

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
    settings = SamplingSettings(
        max_new_tokens=config.response_length, temperature=config.temperature, seed=seed
    )
    return generate(
        policy,
        tokenizer,
        prompt_ids,
        settings,
        batch_size=config.generation_batch,
        progress=False,
        return_hidden=return_hidden,
        share_prompts=shares_prompts(config),
    )


def shares_prompts(config: OnlineConfig) -> bool:
    """Whether the samples of a prompt share its prefill and its packed forward passes (--share-prompts,
    an option of the group methods; PPO samples each prompt once)."""
    return bool(getattr(config, "share_prompts", False))


def score(
    source: Any, rows: list[dict[str, Any]], out: GenerationOutput, penalty: float
) -> tuple[Tensor, Tensor]:
    """``(scores, raw_scores)``, both ``[N]`` float32: the source's scores of the responses to ``rows``
    (:func:`reward_rows`: the prompt and its columns, passed as ``source(prompts, completions,
    **columns)``), and those less ``penalty`` where a response never reached a stop token. A reward model
    sharing the policy's vocabulary scores the sampled token ids themselves (no decode/re-encode round
    trip)."""
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
        columns = {k: [r[k] for r in rows] for k in (rows[0] if rows else {}) if k != "prompt"}
        raw = torch.tensor(source([r["prompt"] for r in rows], out.texts, **columns), dtype=torch.float32)
    return raw - penalty * (~out.finished).float().cpu(), raw


def reference_logprobs(
    reference: nn.Module | None,
    out: GenerationOutput,
    config: OnlineConfig,
    policy: nn.Module | None = None,
    group: int = 1,
) -> Tensor:
    """Reference log-probs of the sampled tokens at the sampling temperature, in token-budget batches;
    with no ``reference``, those of the LoRA ``policy`` with its adapter switched off. Groups of ``group``
    samples of one prompt run their prompt once (:mod:`prefalign.train.sharing`) when the config shares
    prompts."""
    from contextlib import nullcontext

    from prefalign.generation import is_greedy_temperature
    from prefalign.models import adapter_disabled

    model = reference if reference is not None else policy
    with adapter_disabled(policy) if reference is None else nullcontext():
        if group > 1 and shares_prompts(config):
            from prefalign.train.sharing import shared_response_logprobs

            t = 1.0 if is_greedy_temperature(config.temperature) else config.temperature
            return shared_response_logprobs(
                model, out.prompt_ids, out.prompt_mask, out.response_ids, out.response_mask,
                group, t, config.micro_batch_tokens * 2,
            )  # fmt: skip
        rows = max(
            1, config.micro_batch_tokens // max(1, out.prompt_ids.shape[1] + out.response_ids.shape[1])
        )
        return response_logprobs(model, out, temperature=config.temperature, batch_size=rows * 2)


def sequence_kl(rollout: Rollout, kind: str = "k1") -> Tensor:
    """``[N]`` sum over response tokens of the per-token KL estimate (k1: log pi - log ref)."""
    d = (rollout.logprobs - rollout.ref_logprobs) * rollout.mask
    return (KL_ESTIMATORS[kind](d) * rollout.mask).sum(-1)
