"""Pure tensor math for preference optimisation and policy-gradient RL.

No models, no I/O: every function maps tensors to tensors, so each can be checked against numbers
worked out by hand. Shapes use ``B`` for batch, ``T`` for time/tokens and ``V`` for vocabulary.

Sources: Rafailov et al. 2023 (DPO), Azar et al. 2023 (IPO), Chowdhury et al. 2024 (robust DPO),
Mitchell 2023 (conservative DPO), Zhao et al. 2023 (SLiC hinge), Meng et al. 2024 (SimPO),
Hong et al. 2024 (ORPO), Ethayarajh et al. 2024 (KTO),
Schulman et al. 2016 (GAE) and 2017 (PPO), Ziegler et al. 2019 (RLHF), Schulman 2020 ("Approximating
KL divergence", the k1/k2/k3 estimators).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# --------------------------------------------------------------------------------------------------
# helpers


def masked_mean(x: Tensor, mask: Tensor | None = None, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1.

    Args:
        x: values, any shape.
        mask: 0/1 tensor broadcastable to ``x``; ``None`` means every position counts.
        dim: reduce over this dimension only; ``None`` reduces everything to a scalar.

    Returns:
        Token-level mean: every counted position weighs the same, whichever row it is in (the PPO-RLHF
        convention; Huang et al. 2024, "The N Implementation Details of RLHF with PPO"). An all-zero
        mask gives 0 rather than NaN.
    """
    if mask is None:
        return x.mean() if dim is None else x.mean(dim)
    mask = mask.to(x.dtype).expand_as(x)
    total = (x * mask).sum() if dim is None else (x * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1.0)


def masked_var(x: Tensor, mask: Tensor | None = None, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over masked positions (Bessel-corrected when ``unbiased``)."""
    var = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    if unbiased:
        n = torch.tensor(float(x.numel())) if mask is None else mask.to(x.dtype).expand_as(x).sum()
        var = var * n / (n - 1).clamp(min=1.0)
    return var


def whiten(x: Tensor, mask: Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Standardise ``x`` to unit variance (and zero mean when ``shift_mean``) over masked positions.

    ``(x - mean) / sqrt(var + eps)``; with ``shift_mean=False`` the mean is added back, which is how
    RLHF implementations whiten rewards without changing their sign. Masked-out positions are
    returned as they were computed (callers mask them again).

    Args:
        x: any shape.
        mask: 0/1, broadcastable to ``x``.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


# --------------------------------------------------------------------------------------------------
# sequence log-probabilities


def token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """``log softmax(logits)[target]`` per position without a full-vocabulary log-softmax tensor.

    Args:
        logits: ``[..., V]``.
        targets: ``[...]`` integer ids (must be valid indices; mask them before calling).

    Returns:
        ``[...]`` log-probabilities: the target's logit minus the logsumexp over the vocabulary.
    """
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked.float() - torch.logsumexp(
        logits.float() if logits.dtype != torch.float32 else logits, dim=-1
    )


def sequence_logps(logits: Tensor, labels: Tensor, ignore_index: int = -100, average: bool = False) -> Tensor:
    """Sum (or mean) over counted tokens of ``log p(label)``.

    Args:
        logits: ``[B, T, V]``; HF convention: ``logits[:, t]`` predicts ``labels[:, t + 1]``.
        labels: ``[B, T]`` aligned with the input ids; ``ignore_index`` marks uncounted positions
            (prompt, padding).
        average: return the mean over counted tokens instead of the sum (SimPO, IPO length control).

    Returns:
        ``[B]`` float32. Only ``[B, T]`` intermediates are built: the label logit is gathered and the
        logsumexp subtracted, never a second ``[B, T, V]`` log-softmax.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not align")
    logits = logits[:, :-1]
    labels = labels[:, 1:]
    mask = labels != ignore_index
    safe = labels.masked_fill(~mask, 0)
    per_token = token_logps(logits, safe) * mask
    total = per_token.sum(-1)
    if average:
        return total / mask.sum(-1).clamp(min=1)
    return total


# --------------------------------------------------------------------------------------------------
# the DPO family


@dataclass
class DPOOutput:
    """Per-example DPO-family results, all ``[B]``.

    Attributes:
        losses: the loss of each pair (take ``.mean()`` for the batch loss).
        chosen_rewards: implicit rewards ``beta * (policy - reference)`` of the chosen completions, detached.
        rejected_rewards: the same for the rejected completions, detached.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


# Each loss maps (logits, beta, label_smoothing, margin) to per-example losses, where for every type but
# SimPO ``logits = h`` is the difference of log-ratios (chosen minus rejected), and for SimPO
# ``logits = pc - pr`` (the reference is not used).
LossFn = Callable[[Tensor, float, float, float], Tensor]


def _sigmoid(h: Tensor, beta: float, eps: float, margin: float) -> Tensor:
    """DPO (Rafailov et al. 2023): ``-log sigmoid(beta * h)``."""
    return -F.logsigmoid(beta * h)


def _cdpo(h: Tensor, beta: float, eps: float, margin: float) -> Tensor:
    """Conservative DPO: labels flipped with probability ``eps``; a cross-entropy with smoothed targets."""
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


def _robust(h: Tensor, beta: float, eps: float, margin: float) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024): an unbiased loss under label-flip noise of rate ``eps``."""
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


def _ipo(h: Tensor, beta: float, eps: float, margin: float) -> Tensor:
    """IPO (Azar et al. 2023): squared distance of ``h`` to ``1 / (2 beta)``."""
    return (h - 1 / (2 * beta)) ** 2


def _hinge(h: Tensor, beta: float, eps: float, margin: float) -> Tensor:
    """SLiC-HF hinge (Zhao et al. 2023): ``relu(1 - beta * h)``."""
    return torch.relu(1 - beta * h)


def _simpo(d: Tensor, beta: float, eps: float, margin: float) -> Tensor:
    """SimPO (Meng et al. 2024): ``-log sigmoid(beta * (pc - pr) - margin)`` on length-averaged logps."""
    return -F.logsigmoid(beta * d - margin)


DPO_LOSSES: dict[str, LossFn] = {
    "sigmoid": _sigmoid,
    "cdpo": _cdpo,
    "robust": _robust,
    "ipo": _ipo,
    "hinge": _hinge,
    "simpo": _simpo,
}
"""Name -> per-example loss. A new variant is one function here plus one test."""

REFERENCE_FREE_LOSSES = frozenset({"simpo"})
"""Loss types that never look at the reference model."""


def check_dpo_args(loss_type: str, beta: float, label_smoothing: float) -> None:
    """Raise ``ValueError`` naming the bad value (shared by the loss and the DPO config)."""
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(DPO_LOSSES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    margin: float = 0.0,
    reference_free: bool = False,
) -> DPOOutput:
    """The DPO family of preference losses on sequence log-probabilities.

    With ``h = (pc - rc) - (pr - rr)`` (policy minus reference log-ratio, chosen minus rejected):

    - ``sigmoid``: ``-logsigmoid(beta h)``
    - ``cdpo``: ``-(1-e) logsigmoid(beta h) - e logsigmoid(-beta h)``
    - ``robust``: ``(-(1-e) logsigmoid(beta h) + e logsigmoid(-beta h)) / (1 - 2e)``
    - ``ipo``: ``(h - 1/(2 beta))^2``
    - ``hinge``: ``relu(1 - beta h)``
    - ``simpo``: ``-logsigmoid(beta (pc - pr) - margin)`` (pass length-averaged logps; reference unused)

    ``e`` is ``label_smoothing``. ``margin`` is used by SimPO only (its gamma).

    Args:
        policy_chosen_logps: ``[B]`` log pi(y_w | x) under the policy.
        policy_rejected_logps: ``[B]`` log pi(y_l | x).
        ref_chosen_logps: ``[B]`` under the reference model; ignored (may be ``None``) when
            ``reference_free`` or for reference-free loss types.
        ref_rejected_logps: ``[B]``.
        beta: inverse temperature of the implicit reward, > 0.
        loss_type: a key of :data:`DPO_LOSSES`.
        label_smoothing: assumed label-flip rate ``e`` in [0, 0.5) (``cdpo``/``robust``).
        margin: SimPO's target reward margin gamma.
        reference_free: treat the reference log-probs as 0 (an implicit uniform reference).

    Returns:
        :class:`DPOOutput` with ``[B]`` losses and detached rewards ``beta (policy - reference)``
        (for SimPO, ``beta * policy``).

    Raises:
        ValueError: unknown ``loss_type``, ``beta <= 0``, or ``label_smoothing`` outside [0, 0.5).
    """
    check_dpo_args(loss_type, beta, label_smoothing)
    if reference_free or loss_type in REFERENCE_FREE_LOSSES or ref_chosen_logps is None:
        if ref_chosen_logps is None and not (reference_free or loss_type in REFERENCE_FREE_LOSSES):
            raise ValueError(f"loss_type {loss_type!r} needs reference log-probs (or reference_free=True)")
        ref_chosen_logps = torch.zeros_like(policy_chosen_logps)
        ref_rejected_logps = torch.zeros_like(policy_rejected_logps)
    assert ref_rejected_logps is not None
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    losses = DPO_LOSSES[loss_type](h, beta, label_smoothing, margin)
    return DPOOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_ratio).detach(),
        rejected_rewards=(beta * rejected_ratio).detach(),
    )


def log1m_exp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends (Maechler 2012, "Accurately computing
    log(1 - exp(-|a|))"): ``log(-expm1(x))`` near 0, ``log1p(-exp(x))`` far below it."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, beta: float = 0.1) -> DPOOutput:
    """ORPO (Hong et al. 2024): supervised NLL of the chosen completion plus an odds-ratio penalty.

    With length-averaged log-probs ``pc``, ``pr`` (so ``P = exp(p)`` is the per-token geometric-mean
    probability) and ``odds(P) = P / (1 - P)``::

        log_odds = (pc - log(1 - e^pc)) - (pr - log(1 - e^pr))
        loss     = -pc - beta * logsigmoid(log_odds)

    No reference model: the NLL term keeps the policy near the data, the odds term pushes the chosen
    completion's odds above the rejected one's. ``beta`` is the paper's lambda.

    Args:
        chosen_logps: ``[B]`` mean per-token log pi(y_w | x) over the completion's tokens, all < 0.
        rejected_logps: ``[B]`` the same for y_l.
        beta: weight of the odds-ratio term, > 0.

    Returns:
        :class:`DPOOutput`: ``[B]`` losses, and detached rewards ``beta * p`` (the log-probability
        reward ORPO reports; there is no reference).
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    log_odds = (chosen_logps - log1m_exp(chosen_logps)) - (rejected_logps - log1m_exp(rejected_logps))
    losses = -chosen_logps - beta * F.logsigmoid(log_odds)
    return DPOOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_logps).detach(),
        rejected_rewards=(beta * rejected_logps).detach(),
    )


def kto_reference_point(policy_logps: Tensor, reference_logps: Tensor) -> Tensor:
    """KTO's reference point ``z0``: the batch's mean log-ratio on mismatched prompt/completion pairs.

    An estimate of ``KL(pi || pi_ref)``, clamped at 0 and detached (no gradient flows through it).

    Args:
        policy_logps: ``[B]`` log pi(y_j | x_i) for completions paired with another example's prompt.
        reference_logps: ``[B]`` the same under the reference model.

    Returns:
        A scalar tensor >= 0.
    """
    return (policy_logps - reference_logps).mean().clamp(min=0).detach()


def kto_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    labels: Tensor,
    kl: Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """KTO (Ethayarajh et al. 2024): a prospect-theory loss on unpaired, labelled completions.

    With the log-ratio ``r = policy - reference`` and the reference point ``z0 = max(kl, 0)`` (detached)::

        desirable   (label True):  w_d * (1 - sigmoid(beta * (r - z0)))
        undesirable (label False): w_u * (1 - sigmoid(beta * (z0 - r)))

    Args:
        policy_logps: ``[B]`` summed log pi(y | x) of each completion.
        reference_logps: ``[B]`` the same under the reference model.
        labels: ``[B]`` booleans, True for a desirable completion.
        kl: the reference point, usually :func:`kto_reference_point` of the batch; clamped at 0 and detached.
        beta: inverse temperature of the implicit reward, > 0.
        desirable_weight: ``w_d`` (the paper's lambda_D), > 0.
        undesirable_weight: ``w_u`` (lambda_U), > 0.

    Returns:
        The mean loss over the batch (a scalar).
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not (desirable_weight > 0 and undesirable_weight > 0):
        raise ValueError(f"KTO weights must be > 0, got {desirable_weight} and {undesirable_weight}")
    z0 = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device).clamp(min=0).detach()
    r = policy_logps - reference_logps
    labels = labels.bool()
    value = torch.where(labels, torch.sigmoid(beta * (r - z0)), torch.sigmoid(beta * (z0 - r)))
    weight = torch.where(labels, desirable_weight, undesirable_weight).to(r.dtype)
    return (weight * (1 - value)).mean()


# --------------------------------------------------------------------------------------------------
# reward model


def bradley_terry_loss(
    chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None
) -> Tensor:
    """Negative log-likelihood of the Bradley-Terry preference model.

    ``P(y_w > y_l) = sigmoid(r_w - r_l)``; loss ``= mean(-logsigmoid(r_w - r_l - margin))``. The
    optional per-pair ``margin`` is Llama 2's graded-preference margin (Touvron et al. 2023).

    Args:
        chosen_rewards: ``[B]`` scalar rewards of the preferred completions.
        rejected_rewards: ``[B]``.
        margin: ``[B]`` or ``None`` (zero).

    Returns:
        A scalar.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


# --------------------------------------------------------------------------------------------------
# advantage estimation and PPO


def gae(
    rewards: Tensor, values: Tensor, dones: Tensor, next_value: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), time on the last dimension.

    ``delta_t = r_t + gamma * V(s_{t+1}) * (1 - done_t) - V(s_t)`` and
    ``A_t = delta_t + gamma * lam * (1 - done_t) * A_{t+1}``, where ``V(s_{T})`` is ``next_value``.

    Args:
        rewards: ``[..., T]``.
        values: ``[..., T]`` value estimates of the states where each reward was received.
        dones: ``[..., T]``; 1 where the episode ended at step t (nothing is bootstrapped past it).
        next_value: ``[...]`` value of the state after the last step.
        gamma: discount factor.
        lam: GAE lambda (0 gives the one-step TD error, 1 the Monte-Carlo return minus V).

    Returns:
        ``(advantages, returns)``, both ``[..., T]``, with ``returns = advantages + values``. Computed
        without gradient.
    """
    with torch.no_grad():
        T = rewards.shape[-1]
        notdone = 1.0 - dones.to(rewards.dtype)
        advantages = torch.zeros_like(rewards)
        running = torch.zeros_like(rewards[..., 0])
        upcoming = next_value.to(rewards.dtype)
        for t in range(T - 1, -1, -1):
            delta = rewards[..., t] + gamma * upcoming * notdone[..., t] - values[..., t]
            running = delta + gamma * lam * notdone[..., t] * running
            advantages[..., t] = running
            upcoming = values[..., t]
        return advantages, advantages + values


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor | None = None,
    clip: float = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017), to be minimised.

    ``ratio = exp(logprobs - old_logprobs)``;
    ``loss = masked_mean(max(-A ratio, -A clip(ratio, 1 - clip, 1 + clip)))``.

    Args:
        logprobs: ``[...]`` log pi_theta(a|s) of the taken actions/tokens (with gradient).
        old_logprobs: ``[...]`` under the policy that collected the data.
        advantages: ``[...]``.
        mask: 0/1 ``[...]`` of counted positions (response tokens).
        clip: the clip range epsilon.

    Returns:
        ``(loss, stats)``: stats holds ``clipfrac`` (share of positions where the clipped term was
        taken) and ``approx_kl`` (``masked_mean(0.5 (logprobs - old)^2)``), both detached.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
        }
    return loss, stats


def ppo_kl_penalty_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor | None = None,
    beta: float = 0.01,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's adaptive-KL-penalty objective (Schulman et al. 2017, section 4), to be minimised.

    ``loss = masked_mean(-A ratio + beta * KL)`` with the per-sample KL(old || new) estimate
    ``k3 = exp(new - old) - 1 - (new - old)`` (unbiased, non-negative; Schulman 2020).

    Returns:
        ``(loss, stats)`` with ``kl`` (the masked mean penalty term before ``beta``) and ``approx_kl``.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    kl = ratio - 1 - log_ratio
    loss = masked_mean(-advantages * ratio + beta * kl, mask)
    with torch.no_grad():
        stats = {"kl": masked_mean(kl, mask), "approx_kl": masked_mean(0.5 * log_ratio**2, mask)}
    return loss, stats


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor | None = None, clip: float | None = None
) -> Tensor:
    """Value-function loss, optionally clipped around the values at collection time.

    ``0.5 * masked_mean(max((v - R)^2, (clip(v, old - c, old + c) - R)^2))``; with ``clip=None`` just
    ``0.5 * masked_mean((v - R)^2)``.

    Args:
        values: ``[...]`` current predictions (with gradient).
        old_values: ``[...]`` predictions when the data was collected.
        returns: ``[...]`` targets.
        mask: 0/1 ``[...]``.
        clip: clip range ``c`` or ``None``.
    """
    loss = (values - returns) ** 2
    if clip is not None:
        clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        loss = torch.maximum(loss, (clipped - returns) ** 2)
    return 0.5 * masked_mean(loss, mask)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution at each position: ``[..., V] -> [...]``."""
    logz = torch.logsumexp(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return logz - (probs * logits).sum(-1)


# --------------------------------------------------------------------------------------------------
# KL estimators

KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {
    "k1": lambda d: d,
    "k2": lambda d: 0.5 * d**2,
    "k3": lambda d: torch.expm1(-d) + d,
}
"""Per-sample estimators of KL(pi || ref) from ``d = logp - logp_ref`` with samples drawn from pi."""


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman 2020).

    With ``d = logprobs - ref_logprobs``: ``k1 = d`` (unbiased, can be negative), ``k2 = d^2 / 2``
    (biased, low variance), ``k3 = exp(-d) - 1 + d`` (unbiased and non-negative).

    Args:
        logprobs: ``[...]`` log pi of the sampled tokens.
        ref_logprobs: ``[...]`` log ref of the same tokens.
        kind: ``"k1"``, ``"k2"`` or ``"k3"``.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; choose one of {', '.join(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[kind](logprobs - ref_logprobs)


# --------------------------------------------------------------------------------------------------
# critic-free online methods: GRPO (Shao et al. 2024), RLOO (Ahmadian et al. 2024), DAPO (Yu et al.
# 2025), Dr. GRPO (Liu et al. 2025)

GROUP_SCALES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def _groups(rewards: Tensor, num_generations: int) -> Tensor:
    if rewards.dim() != 1 or num_generations < 2 or rewards.numel() % num_generations:
        raise ValueError(
            f"rewards must be 1-D with a multiple of num_generations >= 2 entries, got shape "
            f"{tuple(rewards.shape)} and num_generations {num_generations}"
        )
    return rewards.view(-1, num_generations)


def group_advantages(
    rewards: Tensor, num_generations: int, scale: str = "group", eps: float = 1e-4
) -> Tensor:
    """GRPO's advantages (Shao et al. 2024): each reward against the others of its prompt's group.

    ``A_i = (r_i - mean_group) / (std_group + eps)`` with the Bessel-corrected std (``scale="group"``);
    ``scale="batch"`` divides by the Bessel-corrected std of all the batch's rewards instead (plus
    ``eps``); ``scale="none"`` only centres (Dr. GRPO, Liu et al. 2025). A group whose rewards are all
    equal has advantages 0 under every scale.

    Args:
        rewards: ``[P * G]`` in prompt-major order (the ``G`` samples of prompt 0, then of prompt 1, ...).
        num_generations: ``G >= 2``.
        scale: ``"group"``, ``"batch"`` or ``"none"``.

    Returns:
        ``[P * G]`` advantages.
    """
    if scale not in GROUP_SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(GROUP_SCALES)}")
    grouped = _groups(rewards, num_generations)
    centred = (grouped - grouped.mean(-1, keepdim=True)).reshape(-1)
    if scale == "group":
        return centred / (grouped.std(-1).repeat_interleave(num_generations) + eps)
    if scale == "batch":
        return centred / (rewards.std() + eps)
    return centred


def rloo_advantages(rewards: Tensor, num_generations: int) -> Tensor:
    """RLOO's leave-one-out advantages (Ahmadian et al. 2024; Kool et al. 2019):
    ``A_i = r_i - (sum_{j != i} r_j) / (G - 1)``, the baseline of each sample being the mean reward of
    the other samples of its prompt (so it does not depend on ``r_i``: unbiased).

    Args:
        rewards: ``[P * G]`` in prompt-major order.
        num_generations: ``G >= 2``.

    Returns:
        ``[P * G]``; each group's advantages sum to 0.
    """
    grouped = _groups(rewards, num_generations)
    others = (grouped.sum(-1, keepdim=True) - grouped) / (num_generations - 1)
    return (grouped - others).reshape(-1)


def clipped_surrogate(
    log_ratio: Tensor, advantages: Tensor, epsilon: float = 0.2, epsilon_high: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate with separate lower and upper clip (DAPO's clip-higher, Yu et al. 2025),
    elementwise and to be minimised: ``-min(ratio A, clip(ratio, 1 - epsilon, 1 + epsilon_high) A)``.

    GRPO passes token log-ratios ``[B, T]`` with ``advantages[:, None]``; RLOO passes one summed
    log-ratio per sequence ``[B]`` (a sequence-level ratio).

    Args:
        log_ratio: ``log pi_theta - log pi_old``, any shape.
        advantages: broadcastable to ``log_ratio``.
        epsilon: lower clip; ``epsilon_high`` the upper one (default: ``epsilon``).

    Returns:
        ``(loss, low, high)``: the elementwise loss, and 0/1 tensors marking where the clip acted at
        the lower bound (ratio < 1 - epsilon with A < 0) and at the upper one (ratio > 1 + epsilon_high
        with A > 0).
    """
    high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(log_ratio)
    adv = advantages.expand_as(ratio)
    loss = -torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - epsilon, 1.0 + high) * adv)
    with torch.no_grad():
        low_clip = ((ratio < 1.0 - epsilon) & (adv < 0)).float()
        high_clip = ((ratio > 1.0 + high) & (adv > 0)).float()
    return loss, low_clip, high_clip


def grpo_token_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO's per-token loss: the token-level clipped surrogate plus ``beta`` times the k3 estimate of
    KL(pi || ref), ``exp(ref - logp) - (ref - logp) - 1`` (Shao et al. 2024, eq. 3-4).

    Args:
        logprobs: ``[B, T]`` of the sampled tokens under the policy being trained (with gradient).
        old_logprobs: ``[B, T]`` under the policy that sampled.
        advantages: ``[B]``, one per sequence, shared by its tokens.
        ref_logprobs: ``[B, T]`` under the reference (needed when ``beta > 0``).

    Returns:
        ``(per_token_loss [B, T], stats)``: stats (detached, ``[B, T]``) ``kl`` (k3), ``low`` and ``high``
        (where the clip acted), ``ratio``. Aggregate the loss with :func:`aggregate_loss`.
    """
    loss, low, high = clipped_surrogate(logprobs - old_logprobs, advantages[:, None], epsilon, epsilon_high)
    kl = torch.zeros_like(loss)
    if ref_logprobs is not None:
        kl = KL_ESTIMATORS["k3"](logprobs - ref_logprobs)
        if beta:
            loss = loss + beta * kl
    ratio = torch.exp(logprobs - old_logprobs).detach()
    return loss, {"kl": kl.detach(), "low": low, "high": high, "ratio": ratio}


def aggregate_loss(
    per_token: Tensor, mask: Tensor, loss_type: str = "grpo", max_length: int | None = None,
    num_tokens: float | None = None,
) -> Tensor:  # fmt: skip
    """Reduce a per-token loss ``[B, T]`` to a scalar, by GRPO-family convention.

    - ``grpo``: the mean over sequences of each sequence's token mean (Shao et al. 2024; long responses
      weigh less per token);
    - ``bnpo``: the token sum over the batch's tokens (a token-level mean);
    - ``dr_grpo``: the token sum over ``B * max_length`` (a constant: no length bias; Liu et al. 2025);
    - ``dapo``: the token sum over ``num_tokens``, the tokens of the whole accumulated optimiser step on
      every process (Yu et al. 2025); by default this batch's.

    Args:
        per_token: ``[B, T]``.
        mask: ``[B, T]`` 0/1 response mask.
        loss_type: one of :data:`LOSS_TYPES`.
        max_length: the completion length cap (``dr_grpo``; default ``T``).
        num_tokens: the step's token count (``dapo``).
    """
    mask = mask.to(per_token.dtype)
    total = (per_token * mask).sum()
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return total / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return total / (per_token.shape[0] * (max_length or per_token.shape[1]))
    if loss_type == "dapo":
        return total / max(float(mask.sum() if num_tokens is None else num_tokens), 1.0)
    raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")


def rloo_rewards(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, beta: float) -> Tensor:
    """RLOO's KL-regularised sequence reward (Ahmadian et al. 2024): ``score - beta * sum_t k1_t`` with
    ``k1_t = log pi(y_t) - log ref(y_t)`` over the response tokens (the KL in the reward, not the loss).

    Args:
        scores: ``[B]``; logprobs, ref_logprobs, mask: ``[B, T]``.
    """
    return scores - beta * ((logprobs - ref_logprobs) * mask).sum(-1)


def rloo_sequence_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """RLOO's per-sequence loss: the clipped surrogate on the sequence-level ratio
    ``exp(sum_t (logp_t - old_t))`` (one importance weight per response, REINFORCE-style).

    Args:
        logprobs, old_logprobs, mask: ``[B, T]``; advantages: ``[B]``.

    Returns:
        ``(loss [B], stats)`` with ``low``, ``high`` and ``ratio`` per sequence (detached).
    """
    log_ratio = ((logprobs - old_logprobs) * mask).sum(-1)
    loss, low, high = clipped_surrogate(log_ratio, advantages, epsilon, epsilon_high)
    return loss, {"low": low, "high": high, "ratio": torch.exp(log_ratio).detach()}
