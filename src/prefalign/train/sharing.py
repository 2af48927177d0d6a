"""A group's prompt paid once in the forward passes of the online methods.

GRPO and RLOO sample ``G`` responses to each prompt; the rollout holds them prompt-major (rows ``g * G``
to ``g * G + G - 1`` answer prompt ``g``). With prompt sharing on, the reference pass, the old pass and
every update pass run a micro-batch as one packed row in which each group is its prompt once, then its
responses, each response attending to the prompt and to itself only (:func:`prefalign.packing.pack_shared`,
the prefix-shared layout of DPO's pairs, widened to ``G`` completions). A response's tokens therefore see
exactly what they see in a row of their own: the per-token log-probs, values and losses are those of
separate sequences to float rounding, at the cost of the prompt once per group instead of ``G`` times
and with no padding.

The rows of a micro-batch keep their order (the tensors of the update index them so); the packed
positions of their response tokens are mapped back to ``[rows, width]`` through ``slots``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prefalign.packing import Packed, pack_shared


@dataclass
class SharedRows:
    """Rows of a rollout packed group by group: the packed row, and where each of its predicted tokens
    goes in a ``[len(rows), width]`` tensor (``slots``: flat index ``row * width + column``)."""

    packed: Packed
    slots: Tensor
    width: int


def group_runs(rows: list[int], group: int) -> list[tuple[int, list[int]]]:
    """``rows`` gathered by the prompt they answer (``row // group``), groups in order of first appearance,
    rows of a group in their order in ``rows``: ``[(group id, rows), ...]``."""
    runs: dict[int, list[int]] = {}
    for r in rows:
        runs.setdefault(r // group, []).append(r)
    return list(runs.items())


def shared_micro_plan(
    prompt_lengths: Tensor, response_lengths: Tensor, rows: list[int], group: int, budget: int
) -> list[list[int]]:
    """Split ``rows`` (in order) into micro-batches whose packed rows hold at most ``budget`` tokens: a
    response costs its length, and its prompt once per micro-batch its group appears in (a group larger
    than the budget is split, each part with its own copy of the prompt). A single response longer than
    the budget is a micro-batch of its own."""
    out: list[list[int]] = []
    current: list[int] = []
    seen: set[int] = set()
    tokens = 0
    for r in rows:
        g = r // group
        cost = int(response_lengths[r]) + (0 if g in seen else int(prompt_lengths[r]))
        if current and tokens + cost > budget:
            out.append(current)
            current, seen, tokens = [], set(), 0
            cost = int(response_lengths[r]) + int(prompt_lengths[r])
        current.append(r)
        seen.add(g)
        tokens += cost
    if current:
        out.append(current)
    return out


def pack_rows(
    prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
    rows: list[int], group: int,
) -> SharedRows:  # fmt: skip
    """The rollout rows ``rows`` (left-padded prompts ``[N, P]``, right-padded responses ``[N, R]`` with
    their masks) as one packed row, each group's prompt once (:func:`pack_shared`)."""
    position = {r: i for i, r in enumerate(rows)}
    lengths = response_mask.sum(-1)
    width = max(1, int(lengths[rows].max()))
    groups: list[tuple[list[int], list[list[int]]]] = []
    slots: list[int] = []
    for _, members in group_runs(rows, group):
        first = members[0]
        prompt = prompt_ids[first][prompt_mask[first].bool()].tolist()
        responses = [response_ids[r, : int(lengths[r])].tolist() for r in members]
        groups.append((prompt, responses))
        for r in members:
            slots += [position[r] * width + t for t in range(int(lengths[r]))]
    return SharedRows(pack_shared(groups), torch.tensor(slots, dtype=torch.long), width)


def packed_hidden(model: nn.Module, shared: SharedRows, rows: int) -> Tensor:
    """The final hidden states ``[rows, width, H]`` of ``model``'s decoder at the positions that predict
    each response token (zeros where a row has no token), from one packed forward with block attention.
    Gradients flow when enabled."""
    from prefalign.packing import block_attention

    packed = shared.packed
    device = next(model.parameters()).device
    with block_attention(model, packed.layout.to(device)):
        hidden = model.get_decoder()(
            input_ids=packed.input_ids.to(device),
            position_ids=packed.position_ids.to(device),
            use_cache=False,
        ).last_hidden_state[0]
    kept = hidden.index_select(0, packed.keep.to(device))
    full = kept.new_zeros(rows * shared.width, kept.shape[-1])
    return full.index_copy(0, shared.slots.to(device), kept).view(rows, shared.width, -1)


def shared_response_logprobs(
    model: nn.Module,
    prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
    group: int, temperature: float, budget: int,
) -> Tensor:  # fmt: skip
    """Log-probs ``[N, R]`` of the response tokens under ``model`` at ``temperature`` (0 off the mask),
    without gradients, in packed micro-batches of at most ``budget`` tokens with each group's prompt once."""
    from prefalign.packing import packed_token_logps

    n, width = response_ids.shape
    out = torch.zeros(n, width)
    rows = list(range(n))
    plan = shared_micro_plan(prompt_mask.sum(-1), response_mask.sum(-1), rows, group, budget)
    with torch.no_grad():
        for part in plan:
            shared = pack_rows(prompt_ids, prompt_mask, response_ids, response_mask, part, group)
            if shared.packed.targets.numel() == 0:
                continue
            per_token = packed_token_logps(model, shared.packed, temperature).float().cpu()
            block = torch.zeros(len(part) * shared.width)
            block.index_copy_(0, shared.slots, per_token)
            out[part, : shared.width] = block.view(len(part), shared.width)
    return out
