"""Prefix-shared packing of preference pairs and the block attention that makes it cheap.

A pair ``(prompt, chosen, rejected)`` becomes one sequence ``prompt + chosen + rejected``: the prompt is
run once for both completions. The rejected completion's position ids restart where the prompt ends and
a mask keeps it from attending to the chosen tokens, so each completion sees exactly ``prompt + itself``,
as if run alone (the "prefix sharing" idea).

The pairs of a micro-batch are concatenated into one row, so the linear layers (almost all of the
compute) see no padding at all. Attention is the one operation where pairs must be kept apart; running
it over the whole row with a block-diagonal mask costs ``N^2`` for ``N`` packed tokens, and PyTorch's CPU
attention kernels are several times slower on one long masked row than on short blocks. So during a
packed forward the model's attention is swapped (through transformers' ``AttentionInterface``) for
:func:`_block_attention`, which gathers each pair's tokens into its own padded block, runs scaled
dot-product attention over ``[pairs, heads, longest pair, head_dim]`` with the per-pair mask, and
scatters the result back to the packed row. Works with every model whose attention goes through the
interface (all current transformers decoder models).
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prefalign.losses import token_logps

ATTENTION_NAME = "prefalign_blocks"


@dataclass
class BlockLayout:
    """Where each pair's tokens sit in the packed row and in the padded blocks.

    Attributes:
        gather: ``[B, L]`` packed position of each block slot (padding slots repeat a valid position).
        scatter: ``[N]`` flat slot index (``b * L + j``) of each packed token.
        mask: ``[B, 1, L, L]`` boolean, True where attention is allowed.
    """

    gather: Tensor
    scatter: Tensor
    mask: Tensor

    def to(self, device: torch.device) -> BlockLayout:
        return BlockLayout(self.gather.to(device), self.scatter.to(device), self.mask.to(device))


@dataclass
class Packed:
    """A micro-batch packed into one row, with the completions to score.

    For pairs (:func:`pack_pairs`) completion ``2i`` is the chosen and ``2i + 1`` the rejected one of pair
    i; for single sequences (:func:`pack_completions`) completion i is example i's counted tokens.

    Attributes:
        input_ids: ``[1, N]`` the examples back to back.
        position_ids: ``[1, N]``; for pairs the rejected completion continues from the prompt's end.
        layout: the per-example blocks for attention.
        keep: ``[K]`` positions whose hidden state predicts a counted token.
        targets: ``[K]`` the token each kept position predicts.
        segment: ``[K]`` which completion each target belongs to.
        lengths: ``[C]`` counted tokens per completion (for length-averaged log-probs).
        ends: ``[C]`` packed position of each completion's last token (where a reward model reads).
    """

    input_ids: Tensor
    position_ids: Tensor
    layout: BlockLayout
    keep: Tensor
    targets: Tensor
    segment: Tensor
    lengths: Tensor
    ends: Tensor


def pair_tokens(example: dict[str, Any]) -> int:
    """Tokens a pair costs in a packed row: the prompt once plus both completions."""
    return (
        len(example["prompt_input_ids"])
        + len(example["chosen_input_ids"])
        + len(example["rejected_input_ids"])
    )


def _layout(sizes: list[tuple[int, list[int]]]) -> BlockLayout:
    """Blocks for (prompt length, [completion lengths]) packed back to back: in each block every token
    attends causally to the prompt and to the earlier tokens of its own completion, never to another
    completion of the block (a pair is a block of two completions; a group of G samples, of G)."""
    width = max(p + sum(rs) for p, rs in sizes)
    slot = torch.arange(width)
    gather, scatter, masks = [], [], []
    start = 0
    for b, (p, rs) in enumerate(sizes):
        n = p + sum(rs)
        gather.append(start + torch.where(slot < n, slot, torch.zeros_like(slot)))
        scatter.append(b * width + torch.arange(n))
        # which part each slot belongs to: 0 the prompt, i the i-th completion, -1 padding
        part = torch.full((width,), -1, dtype=torch.long)
        part[:p] = 0
        edge = p
        for i, r in enumerate(rs, 1):
            part[edge : edge + r] = i
            edge += r
        valid = part >= 0
        same = (part[None, :] == part[:, None]) | (part[None, :] == 0)
        masks.append((slot[None, :] <= slot[:, None]) & valid[None, :] & same)
        start += n
    return BlockLayout(torch.stack(gather), torch.cat(scatter), torch.stack(masks)[:, None])


class _RowBuilder:
    """Accumulates the examples of one packed row and the completions to score in it."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.pos: list[int] = []
        self.sizes: list[tuple[int, list[int]]] = []
        self.keep: list[int] = []
        self.targets: list[int] = []
        self.segment: list[int] = []
        self.lengths: list[int] = []
        self.ends: list[int] = []

    def add_completion(self, keep: list[int], targets: list[int], end: int) -> None:
        """A completion scored from positions ``keep`` (each predicting the matching target)."""
        self.keep += keep
        self.targets += targets
        self.segment += [len(self.lengths)] * len(targets)
        self.lengths.append(len(targets))
        self.ends.append(end)

    def build(self) -> Packed:
        def longs(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.long)

        return Packed(
            input_ids=longs(self.ids)[None],
            position_ids=longs(self.pos)[None],
            layout=_layout(self.sizes),
            keep=longs(self.keep),
            targets=longs(self.targets),
            segment=longs(self.segment),
            lengths=longs(self.lengths),
            ends=longs(self.ends),
        )


def pack_shared(groups: list[tuple[list[int], list[list[int]]]]) -> Packed:
    """Pack groups of completions that share a prompt into one row: each group's prompt once, then its
    completions, each attending to the prompt and to itself only (position ids restart at the prompt's
    end for every completion), as if each ran alone after the prompt.

    A completion token ``c[k]`` is predicted by the hidden state before it: the prompt's last token for
    ``k = 0``, else ``c[k - 1]``. Completions are numbered in order over all groups.
    """
    row = _RowBuilder()
    for prompt, completions in groups:
        if not prompt:
            raise ValueError("a prompt is empty; nothing can predict its completions' first token")
        base, p = len(row.ids), len(prompt)
        row.ids += [*prompt, *(t for c in completions for t in c)]
        row.pos += range(p)
        row.sizes.append((p, [len(c) for c in completions]))
        last_prompt = base + p - 1
        start = base + p
        for toks in completions:
            row.pos += range(p, p + len(toks))
            keep = [last_prompt, *range(start, start + len(toks) - 1)][: len(toks)]
            row.add_completion(keep, list(toks), start + len(toks) - 1 if toks else last_prompt)
            start += len(toks)
    return row.build()


def pack_pairs(examples: list[dict[str, Any]]) -> Packed:
    """Pack encoded pairs (``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids``) into one row
    (:func:`pack_shared` with two completions per prompt): completion ``2i`` is pair i's chosen, ``2i + 1``
    its rejected."""
    groups = [
        (list(ex["prompt_input_ids"]), [list(ex["chosen_input_ids"]), list(ex["rejected_input_ids"])])
        for ex in examples
    ]
    try:
        return pack_shared(groups)
    except ValueError:
        raise ValueError(
            "pack_pairs: a pair has an empty prompt; nothing can predict its first token"
        ) from None


def pack_completions(examples: list[dict[str, Any]]) -> Packed:
    """Pack single sequences (``input_ids`` with aligned ``labels``, -100 where not counted) into one row.

    Each sequence keeps its own positions (from 0) and attends only to itself; completion i holds the
    counted tokens of example i (label ``t`` is predicted from position ``t - 1``).
    """
    row = _RowBuilder()
    for ex in examples:
        seq, labels = ex["input_ids"], ex["labels"]
        base = len(row.ids)
        counted = [t for t in range(1, len(seq)) if labels[t] != -100]
        row.ids += seq
        row.pos += range(len(seq))
        row.sizes.append((len(seq), []))
        row.add_completion([base + t - 1 for t in counted], [labels[t] for t in counted], base + len(seq) - 1)
    return row.build()


# --------------------------------------------------------------------------------------------------
# block attention

_ACTIVE: contextvars.ContextVar[BlockLayout | None] = contextvars.ContextVar("prefalign_blocks", default=None)


def _block_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Attention over the packed row computed block by block (one block per pair).

    Args:
        query: ``[1, Hq, N, D]``; key, value: ``[1, Hkv, N, D]``.

    Returns:
        ``([1, N, Hq, D], None)``, the layout transformers' attention functions return.
    """
    layout = _ACTIVE.get()
    if layout is None:
        raise RuntimeError("prefalign block attention used outside packed_forward()")
    blocks, width = layout.gather.shape
    heads = query.shape[1]
    flat_gather = layout.gather.reshape(-1)

    def to_blocks(x: Tensor) -> Tensor:  # [1, H, N, D] -> [B, H, L, D]
        return (
            _ToBlocks.apply(x[0], flat_gather, layout.scatter).unflatten(1, (blocks, width)).transpose(0, 1)
        )

    q, k, v = to_blocks(query), to_blocks(key), to_blocks(value)
    # grouped-query attention: each key/value head serves a group of query heads (no repeated copies)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=layout.mask, dropout_p=dropout, scale=scaling, enable_gqa=k.shape[1] != heads
    )
    out = _FromBlocks.apply(out.transpose(1, 2).reshape(blocks * width, heads, -1), layout.scatter)
    return out.unsqueeze(0), None


class _ToBlocks(torch.autograd.Function):
    """``x[:, gather]`` for ``x`` of ``[H, N, D]``: each pair's tokens copied into its padded block.

    Backward reads each packed token's gradient back from its own slot (``scatter``) instead of adding up
    every slot (what indexing's generic backward does, several times slower on CPU). That is exact here:
    a padding slot repeats a valid token, but its gradient is zero, since padding keys are masked for
    every query and padding query rows are dropped on the way out (:class:`_FromBlocks`).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, gather: Tensor, scatter: Tensor) -> Tensor:
        ctx.save_for_backward(scatter)
        return x.index_select(1, gather)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (scatter,) = ctx.saved_tensors
        return grad.index_select(1, scatter), None, None


class _FromBlocks(torch.autograd.Function):
    """``x[scatter]`` for ``x`` of ``[B * L, H, D]``: the valid slots back in packed order; backward
    puts each token's gradient in its slot and zeros in the padding slots."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scatter: Tensor) -> Tensor:
        ctx.save_for_backward(scatter)
        ctx.slots = x.shape[0]
        return x.index_select(0, scatter)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (scatter,) = ctx.saved_tensors
        out = grad.new_zeros((ctx.slots, *grad.shape[1:]))
        return out.index_copy_(0, scatter, grad), None


def _register() -> None:
    """Make :func:`_block_attention` known to transformers under :data:`ATTENTION_NAME`; called by
    :func:`block_attention` when first used (nothing is registered at import)."""
    from transformers import AttentionInterface

    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, _block_attention)


def _configs(model: nn.Module) -> list[Any]:
    seen: dict[int, Any] = {}
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            seen.setdefault(id(config), config)
    return list(seen.values())


@contextmanager
def block_attention(model: nn.Module, layout: BlockLayout) -> Iterator[None]:
    """Within this context ``model``'s attention runs block by block according to ``layout`` (the
    attention function is registered with transformers on first use)."""
    _register()
    configs = _configs(model)
    previous = [c._attn_implementation for c in configs]
    token = _ACTIVE.set(layout)
    for c in configs:
        c._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        for c, old in zip(configs, previous, strict=True):
            c._attn_implementation = old
        _ACTIVE.reset(token)


def _replay_block_attention(model: nn.Module) -> Any:
    """A ``torch.utils.checkpoint`` ``context_fn``: a layer recomputed in the backward runs under the block
    layout its forward ran under (the backward runs after :func:`block_attention` has been left, and
    without this the recomputation would attend over the whole packed row)."""

    def context_fn() -> tuple[Any, Any]:
        layout = _ACTIVE.get()  # read when the forward runs
        return nullcontext(), block_attention(model, layout) if layout is not None else nullcontext()

    return context_fn


@contextmanager
def recompute_activations(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within this context every transformers model inside ``model`` keeps only its decoder layers'
    inputs in the forward and recomputes their activations in the backward (transformers' own activation
    checkpointing, non-reentrant, with :func:`block_attention` replayed in the recomputation); undone on
    exit. Less memory for about one more forward pass of time; the numbers are the same."""
    taken: list[tuple[str, nn.Module]] = []  # the outermost transformers models only
    for name, m in model.named_modules() if enabled else ():
        inside = any(not n or name.startswith(f"{n}.") for n, _ in taken)
        if getattr(m, "supports_gradient_checkpointing", False) and not inside:
            taken.append((name, m))
    models = [m for _, m in taken]
    for m in models:
        kwargs = {"use_reentrant": False, "context_fn": _replay_block_attention(m)}
        if hasattr(m, "activation_checkpointing_enable"):
            m.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # transformers < 5
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    try:
        yield
    finally:
        for m in models:
            (getattr(m, "activation_checkpointing_disable", None) or m.gradient_checkpointing_disable)()


def packed_token_logps(model: nn.Module, packed: Packed, temperature: float = 1.0) -> Tensor:
    """Log-probability ``[K]`` of every counted token in ``packed`` under ``model``, its logits divided by
    ``temperature``.

    The vocabulary projection runs only on the ``K`` kept positions (``logits_to_keep``), and
    log-probabilities are gathered without a full log-softmax. Gradients flow when enabled.
    """
    from prefalign.memory import HEAD_CHUNK, HeadTokenLogps, hidden_instead_of_logits, plain_lm_head

    device = next(model.parameters()).device
    head = plain_lm_head(model)
    with (
        block_attention(model, packed.layout.to(device)),
        hidden_instead_of_logits(head) if head is not None else nullcontext(),
    ):
        out = model(
            input_ids=packed.input_ids.to(device),
            position_ids=packed.position_ids.to(device),
            logits_to_keep=packed.keep.to(device),
            use_cache=False,
        )
    targets = packed.targets.to(device)
    scores = out.logits[0] if temperature == 1.0 else out.logits[0] / temperature
    if head is not None:  # out.logits holds the final hidden states at the kept positions: (h / T) W = hW / T
        return HeadTokenLogps.apply(scores, head.weight, targets, HEAD_CHUNK)
    return token_logps(scores, targets)


def packed_logps(model: nn.Module, packed: Packed, average: bool = False) -> Tensor:
    """Log-probability of every completion in ``packed`` under ``model`` (:func:`packed_token_logps`
    summed per completion).

    Returns:
        ``[C]`` log-probabilities, one per completion (for pairs: chosen and rejected of pair i at ``2i`` and
        ``2i + 1``); sums, or means over tokens when ``average``.
    """
    per_token = packed_token_logps(model, packed)
    device = per_token.device
    sums = torch.zeros(packed.lengths.numel(), dtype=per_token.dtype, device=device)
    sums = sums.index_add(0, packed.segment.to(device), per_token)
    return sums / packed.lengths.to(device).clamp(min=1) if average else sums


def packed_scores(model: nn.Module, packed: Packed) -> Tensor:
    """A scalar-head model's score at the last token of every completion (the reward of each).

    Args:
        model: a sequence classifier with one output (``prefalign.models.load_reward_model``).

    Returns:
        ``[C]`` float32 scores.
    """
    from prefalign.models import backbone_and_head

    device = next(model.parameters()).device
    backbone, head = backbone_and_head(model)
    with block_attention(model, packed.layout.to(device)):
        hidden = backbone(
            input_ids=packed.input_ids.to(device),
            position_ids=packed.position_ids.to(device),
            use_cache=False,
        ).last_hidden_state
    return head(hidden[0, packed.ends.to(device)]).squeeze(-1).float()
