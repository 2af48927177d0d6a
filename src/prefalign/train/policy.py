"""The policy (and its critic) as an online update trains it: a rollout's rows cut into shuffled
minibatches and token-budget micro-batches, their forward pass, and the pass that scores the samples
under the policy before any update (the "old" log-probs of the importance ratio)."""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from prefalign.generation import position_ids_from_mask
from prefalign.losses import token_logps
from prefalign.memory import release_freed_memory
from prefalign.train.optim import clip_gradients
from prefalign.train.precision import LossScaler
from prefalign.train.processes import sum_over_processes

if TYPE_CHECKING:
    from prefalign.train.online import Rollout

log = logging.getLogger(__name__)


def minibatch_plan(
    n: int, minibatches: int, seed: int, iteration: int, epoch: int, group: int = 1
) -> list[list[int]]:
    """Shuffled, near-equal minibatches of ``range(n)`` for one update pass, fixed by (seed, iteration,
    epoch) so that a resumed run repeats them. Rows that come in groups of ``group`` (the samples of one
    prompt, prompt-major) are shuffled group by group and a group stays in one minibatch, where there are
    at least as many groups as minibatches."""
    groups = n // group if group > 1 and n % group == 0 else 0
    if groups < max(minibatches, 1):
        order = np.random.default_rng([seed, 7919, iteration, epoch]).permutation(n)
        return [part.tolist() for part in np.array_split(order, minibatches)]
    order = np.random.default_rng([seed, 7919, iteration, epoch]).permutation(groups)
    return [
        [g * group + j for g in part.tolist() for j in range(group)]
        for part in np.array_split(order, minibatches)
    ]


def micro_plan(rollout: Rollout, rows: list[int], budget: int) -> list[list[int]]:
    """Split ``rows`` (in order) so that rows x (prompt + response width) stays within ``budget``; in the
    shared-prompt layout (:mod:`prefalign.train.sharing`), so that each packed row holds at most ``budget``
    tokens."""
    if rollout.shared:
        from prefalign.train.sharing import shared_micro_plan

        out = rollout.out
        return shared_micro_plan(
            out.prompt_mask.sum(-1), out.response_mask.sum(-1), rows, rollout.group, budget
        )
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
    """Rows of a rollout cut to their own widths: ``input_ids``/``attention_mask`` ``[b, P' + R']``; or,
    in the shared-prompt layout, ``shared`` (the rows packed group by group) and no padded inputs."""

    rows: list[int]
    input_ids: Tensor | None
    attention_mask: Tensor | None
    response_ids: Tensor
    mask: Tensor
    width: int
    shared: Any = None

    def take(self, x: Tensor) -> Tensor:
        """The rows and response columns of a rollout tensor ``[N, R]``."""
        return x[self.rows, : self.width]


def make_micro(rollout: Rollout, rows: list[int], device: torch.device) -> Micro:
    out = rollout.out
    if rollout.shared:
        from prefalign.train.sharing import pack_rows

        shared = pack_rows(
            out.prompt_ids, out.prompt_mask, out.response_ids, out.response_mask, rows, rollout.group
        )
        w = shared.width
        return Micro(
            rows, None, None, out.response_ids[rows, :w].to(device),
            out.response_mask[rows, :w].float().to(device), w, shared,
        )  # fmt: skip
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
        if micro.shared is not None:
            from prefalign.train.sharing import packed_hidden

            return packed_hidden(self.policy, micro.shared, len(micro.rows))
        positions = position_ids_from_mask(micro.attention_mask)
        trunk = self.policy.get_decoder()
        hidden = trunk(
            input_ids=micro.input_ids, attention_mask=micro.attention_mask, position_ids=positions
        ).last_hidden_state
        return hidden[:, -(micro.width + 1) : -1]

    def forward(
        self,
        micro: Micro,
        temperature: float,
        with_values: bool = False,
        targets: Tensor | None = None,
        lse: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits ``[b, R', V]`` (divided by ``temperature``) that predict each response token, or with
        ``targets`` ``[b, R']`` the log-probabilities of those tokens (``lse``: their log-normalisers where
        already known, :func:`sampler_lse`); no values."""
        return self.head_output(self.hidden(micro), temperature, targets, lse), None

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

    def head_output(
        self, hidden: Tensor, temperature: float, targets: Tensor | None, lse: Tensor | None = None
    ) -> Tensor:
        """Logits from ``hidden`` (over temperature), or the log-probs of ``targets`` under them. Log-probs
        of a plain linear head are computed a chunk of rows at a time (no ``[b, R', V]`` tensor, nor its
        gradient, ever exists: :class:`prefalign.memory.HeadTokenLogps`); with ``lse`` (``[b, R']``, NaN
        where unknown) the forward computes only the targets' logits."""
        from prefalign.memory import HEAD_CHUNK, HeadTokenLogps, plain_lm_head

        head = plain_lm_head(self.policy) if targets is not None else None
        if head is None:
            logits = self.policy.get_output_embeddings()(hidden).float() / temperature
            return logits if targets is None else token_logps(logits, targets)
        flat = _rows_over_temperature(hidden, temperature)
        known = None if lse is None else lse.reshape(-1).to(flat.device)
        out = HeadTokenLogps.apply(flat, head.weight, targets.reshape(-1), HEAD_CHUNK, known)
        return out.view(targets.shape)


class PolicyWithValue(PolicyLogits):
    """The policy and its critic as one module (one optimiser, one DDP wrapper).

    The critic is either a separate sequence classifier (its own transformer; values from its scalar
    head at every position), a scalar head on the policy's own last hidden states (``shared``: one
    transformer pass gives both logits and values), or, for a LoRA policy, a second adapter
    (``critic_adapter``) on the same base weights with its own scalar head: a separate critic without a
    second model in memory (its pass runs the base with the critic's adapter in place of the policy's).
    """

    def __init__(
        self, policy: nn.Module, value_model: nn.Module | None = None, critic_adapter: str | None = None
    ) -> None:
        super().__init__(policy)
        self.value_model = value_model
        self.critic_adapter = critic_adapter
        if value_model is None:
            hidden = policy.get_output_embeddings().weight.shape[1]
            self.value_head = nn.Linear(hidden, 1).to(policy.get_output_embeddings().weight.dtype)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def forward(
        self,
        micro: Micro,
        temperature: float,
        with_values: bool = True,
        targets: Tensor | None = None,
        lse: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits ``[b, R', V]`` (divided by ``temperature``) that predict each response token (with
        ``targets``: the log-probs of those tokens, ``lse`` as in :meth:`PolicyLogits.forward`), and the
        values ``[b, R']`` of the states they are predicted from."""
        hidden = self.hidden(micro)
        logits = self.head_output(hidden, temperature, targets, lse)
        return logits, (self.values_of(micro, hidden) if with_values else None)

    @property
    def critic_reads_policy_hidden(self) -> bool:
        """True when the values are the head on the policy's own hidden states (the sampler's suffice)."""
        return self.value_model is None and self.critic_adapter is None

    def values_of(self, micro: Micro, hidden: Tensor | None) -> Tensor | None:
        """Values ``[b, R']``: the trunk head on ``hidden`` (the policy's hidden states), or the critic's
        own pass (a separate model, or the base with the critic's adapter)."""
        if self.critic_adapter is not None:
            from prefalign.models import adapter_active

            with adapter_active(self.policy, self.critic_adapter):
                own = PolicyLogits.hidden(self, micro)
            return self.value_head(own).squeeze(-1).float()
        if self.value_head is not None:
            return self.value_head(hidden).squeeze(-1).float()
        from prefalign.models import token_scores

        values = token_scores(self.value_model, micro.input_ids, micro.attention_mask)
        return values[:, -(micro.width + 1) : -1]


def sampler_lse(module: nn.Module, out: Any, temperature: float) -> Tensor | None:
    """``[N, R]`` the log-normaliser of the sampling distribution at each response position (NaN off the
    response mask), from what the sampler kept: ``log Z = logit(token) / T - log p(token)``, the token's
    logit from the sampler's hidden state (:func:`prefalign.memory.target_logits`, the update's
    arithmetic). Until the policy's first optimiser step after sampling, these are the update forward's
    log-normalisers too (to float rounding), and that forward then skips its pass over the vocabulary. ``None`` where that does not hold or cannot be read: no kept hidden
    states, a head that is not a plain linear layer, greedy sampling, or mixed precision (the update's
    logits are then rounded otherwise than the sampler's). LoRA dropout is the caller's to rule out."""
    from prefalign.generation import is_greedy_temperature
    from prefalign.memory import plain_lm_head, target_logits

    head = plain_lm_head(module.policy)
    if out.hidden is None or head is None or is_greedy_temperature(temperature):
        return None
    if torch.is_autocast_enabled(out.hidden.device.type) or out.hidden.dtype != torch.float32:
        return None
    with torch.no_grad():
        weight = head.weight
        flat = _rows_over_temperature(out.hidden.to(weight.device), temperature)
        picked = target_logits(flat, weight, out.response_ids.reshape(-1).to(weight.device))
        lse = picked.view(out.response_ids.shape).cpu() - out.logprobs.cpu()
        return lse.masked_fill(~out.response_mask.bool().cpu(), float("nan"))


def old_pass(
    module: nn.Module, rollout: Rollout, plans: list[list[int]], device: torch.device, temperature: float
) -> None:
    """Fill ``rollout.logprobs``, ``.values`` and ``.entropy`` before any update, micro-batch by
    micro-batch in the layout of the first update pass (same rows, same widths: the same arithmetic)."""
    shape = rollout.out.response_ids.shape
    rollout.logprobs = torch.zeros(shape)
    rollout.values = torch.zeros(shape)
    rollout.entropy = torch.zeros(shape)
    was_training = module.training
    module.eval()  # (LoRA dropout acts in the update passes only)
    with torch.no_grad():
        for rows in plans:
            micro = make_micro(rollout, rows, device)
            logprobs, entropy, values = module.old_outputs(micro, temperature)
            w = micro.width
            rollout.logprobs[rows, :w] = (logprobs * micro.mask).cpu()
            rollout.entropy[rows, :w] = (entropy * micro.mask).cpu()
            if values is not None:
                rollout.values[rows, :w] = (values * micro.mask).cpu()
    module.train(was_training)


def sampler_pass(
    module: nn.Module,
    rollout: Rollout,
    plans: list[list[int]],
    device: torch.device,
    temperature: float | None = None,
) -> None:
    """The cheap alternative to :func:`old_pass`: the sampler's log-probs and entropies are the old
    policy's already, a trunk value head reads the sampler's hidden states, and only a separate critic
    runs its own forward (in ``plans``' micro-batches); without a critic, ``rollout.values`` stays unset.
    With the sampling ``temperature``, also the log-normalisers ``rollout.lse`` (:func:`sampler_lse`)."""
    out = rollout.out
    rollout.logprobs = out.logprobs.cpu()
    rollout.entropy = out.entropy.cpu()
    rollout.lse = sampler_lse(module, out, temperature) if temperature is not None else None
    if module.value_head is None and getattr(module, "value_model", None) is None:
        return  # (no critic: GRPO, RLOO)
    with torch.no_grad():
        if module.critic_reads_policy_hidden:
            rollout.values = (module.value_head(out.hidden).squeeze(-1).float() * out.response_mask).cpu()
            return
        rollout.values = torch.zeros(out.response_ids.shape)
        was_training = module.training
        module.eval()
        for rows in plans:
            micro = make_micro(rollout, rows, device)
            values = module.values_of(micro, None)
            rollout.values[rows, : micro.width] = (values * micro.mask).cpu()
        module.train(was_training)


# --------------------------------------------------------------------------------------------------
# the update's optimiser step


def optimizer_step(
    run: Any, micros: list[list[int]], micro_loss: Any, scale: float, norm: float
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
    scaler = getattr(run, "scaler", None) or LossScaler("no", acc.device, run.state)
    sums: dict[str, Tensor] = {}
    for j, rows in enumerate(micros):
        sync = nullcontext() if j == len(micros) - 1 else acc.no_sync(run.module)
        with sync:
            loss, stats = micro_loss(rows)
            acc.backward(scaler.scale(loss * scale))
        sums = {k: sums.get(k, 0.0) + v for k, v in stats.items()}
    scaler.unscale(run.optimizer)  # (fp16: the norm, the clip and the step see the true gradients)
    grad_norm = clip_gradients(acc, run.module, run.config.max_grad_norm)
    totals = sum_over_processes(acc, *(float(v) for v in sums.values()))  # (every process decides alike)
    row = {k: v / max(norm, 1.0) for k, v in zip(sums, totals, strict=True)}
    row["policy/grad_norm"] = grad_norm
    overflow_allowed = {"policy/grad_norm"} if scaler.active else set()  # (fp16: the scaler skips the step)
    if all(math.isfinite(v) for k, v in row.items() if k not in overflow_allowed):
        stepped = scaler.step(run.optimizer, grad_norm)
        if scaler.active:
            row.update({"amp/skipped": float(not stepped), "amp/scale": scaler.metrics()["amp/scale"]})
    else:
        run.optimizer.zero_grad(set_to_none=True)
        nonfinite(run, ", ".join(f"{k} {v}" for k, v in row.items() if not math.isfinite(v)))
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)  # no gradients held through the next sampling phase
    release_freed_memory()
    return row


def nonfinite(run: Any, what: str) -> None:
    """A non-finite value in the iteration under way: counted in ``state["nonfinite_skipped"]`` under
    --skip-nonfinite (the caller skips), else a :class:`~prefalign.train.driver.DivergenceError` naming
    the iteration (``partial`` when an optimiser step of this iteration was already taken)."""
    from prefalign.train.driver import DivergenceError

    it = run.state["step"] + 1
    if run.config.skip_nonfinite:
        run.state["nonfinite_skipped"] = run.state.get("nonfinite_skipped", 0) + 1
        log.warning("iteration %d: not finite (%s): skipped", it, what)
        return
    raise DivergenceError(f"iteration {it}: not finite: {what}", partial=bool(run.minibatch_stats))


def mean_stats(rows: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each statistic over the minibatch rows of an update."""
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
