"""Batched sampling with a KV cache from any causal LM, returning tokens, text and per-token log-probs.

The loop is written out (rather than calling ``model.generate``) because RLHF needs what it keeps:
the log-probability of every sampled token under the policy's own distribution, a response mask that
covers exactly the generated tokens up to and including the stop token, and left-padded prompts with
position ids that start at 0 on each prompt's first real token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from prefalign.data import DataError, end_of_turn_id
from prefalign.losses import token_logps

log = logging.getLogger(__name__)

MIN_TEMPERATURE = 1e-5
"""Temperatures below this sample greedily (argmax of the raw logits).

Dividing float32 logits by a temperature near 0 overflows to ``inf`` (``1e-45`` does it to any logit
larger than ~4e-7 in size), and ``softmax`` of ``inf - inf`` is NaN. At 1e-5 logits of any realistic
size (below 1e33) stay finite, and a temperature that small already picks the top token whenever the
runner-up trails by more than ~1e-3, so calling everything below it greedy changes nothing a user could
want."""


@dataclass
class GenerationOutput:
    """What :func:`generate` returns, row ``i`` for ``prompts[i]``.

    Attributes:
        prompt_ids: ``[B, P]`` prompts, left padded with the pad id.
        prompt_mask: ``[B, P]`` 1 on real prompt tokens.
        response_ids: ``[B, R]`` generated tokens, right padded with the pad id.
        response_mask: ``[B, R]`` 1 on generated tokens up to and including the stop token.
        logprobs: ``[B, R]`` float32 log-prob of each generated token under the distribution that
            sampled it (temperature, top-k and top-p applied; the raw logits when decoding greedily);
            0 where ``response_mask`` is 0. At temperature 1 with no filtering this is ``log pi(a_t|s_t)``
            of the policy itself, which :func:`response_logprobs` recomputes from a fresh forward pass.
        finished: ``[B]`` bool, True where the row ended with a stop token (False: hit the length cap).
        texts: decoded responses, special tokens removed.
        hidden: ``[B, R, H]`` (only with ``return_hidden``) the input of the output layer at the position
            that predicted each response token: the final hidden state a value head on the policy's
            trunk reads, so a critic's values come without another transformer pass.
        entropy: ``[B, R]`` (only with ``return_hidden``) entropy of the sampling distribution at each
            response position.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    logprobs: Tensor
    finished: Tensor
    texts: list[str]
    hidden: Tensor | None = None
    entropy: Tensor | None = None

    def rows(self, index: slice | Tensor | list[int]) -> GenerationOutput:
        """The rows ``index`` of every field (a batch of the same layout)."""
        if isinstance(index, slice):
            texts = self.texts[index]
        else:
            texts = [self.texts[int(i)] for i in index]
        return GenerationOutput(
            self.prompt_ids[index],
            self.prompt_mask[index],
            self.response_ids[index],
            self.response_mask[index],
            self.logprobs[index],
            self.finished[index],
            texts,
            None if self.hidden is None else self.hidden[index],
            None if self.entropy is None else self.entropy[index],
        )

    def sequences(self) -> tuple[Tensor, Tensor]:
        """Prompt and response joined: ``(input_ids [B, P+R], attention_mask [B, P+R])``.

        Feed these (with :func:`position_ids_from_mask`) to a model to score the responses again;
        the response token at column ``P + t`` is predicted by the logits at column ``P + t - 1``.
        """
        return sequence_ids(self.prompt_ids, self.prompt_mask, self.response_ids, self.response_mask)


def sequence_ids(
    prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Concatenate left-padded prompts ``[B, P]`` and right-padded responses ``[B, R]``.

    Returns:
        ``input_ids [B, P+R]`` and ``attention_mask [B, P+R]`` (1 on real prompt and response tokens).
    """
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask.to(response_mask.dtype), response_mask], dim=1)
    return input_ids, attention_mask


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids ``[B, T]`` that count real tokens from 0, so left padding does not shift them.

    Padding positions get 0 (they are masked anyway). For a row ``[0, 0, 1, 1, 1]`` this is
    ``[0, 0, 0, 1, 2]``.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def stop_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """Tokens that end a response: the tokenizer's EOS, the chat template's end-of-turn token, and the
    model's ``generation_config.eos_token_id`` (which may be a list)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    with contextlib.suppress(DataError):  # no template and no EOS: the other sources may still give one
        ids.add(int(end_of_turn_id(tokenizer)))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(i) for i in (gen_eos if isinstance(gen_eos, list | tuple) else [gen_eos]))
    return sorted(ids)


def is_greedy_temperature(temperature: float) -> bool:
    """Whether ``temperature`` means greedy decoding: 0 or anything below :data:`MIN_TEMPERATURE`."""
    return temperature < MIN_TEMPERATURE


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
"""Config attributes that hold a causal LM's context length, in the order they are looked up."""


def context_length(model: Any) -> int | None:
    """The most positions ``model`` was built for (its config's ``max_position_embeddings`` or the
    equivalent of other families, :data:`CONTEXT_KEYS`); None when the config says nothing. ``model`` may
    also be a config itself (:func:`prefalign.models.load_config`, no weights loaded)."""
    entry = context_entry(model)
    return None if entry is None else entry[1]


def context_entry(model: Any) -> tuple[str, int] | None:
    """``(key, length)``: which config attribute of :data:`CONTEXT_KEYS` holds the context of ``model``
    (a model or its config), and its value; None when the config says nothing."""
    from transformers import PretrainedConfig

    config = model if isinstance(model, PretrainedConfig) else getattr(model, "config", None)
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return key, value
    return None


def cap_prompts(
    prompts: Sequence[Sequence[int]], context: int | None, max_new_tokens: int
) -> list[Sequence[int]]:
    """Cut every prompt longer than ``context`` to its last ``context`` tokens, with one warning.

    The *end* of a prompt is kept because that is what the response continues: a chat template's
    assistant header and the user's last words are there (the rule :func:`prefalign.data.truncate_pair`
    applies to preference prompts too). Also warns, once, when a prompt plus ``max_new_tokens`` passes the
    context: positions beyond it were never trained (rotary models drift, models with learned position
    embeddings fail).
    """
    if context is None:
        return list(prompts)
    cut = sum(len(p) > context for p in prompts)
    if cut:
        log.warning(
            "cut %d of %d prompts to their last %d tokens: the model's context is %d tokens",
            cut,
            len(prompts),
            context,
            context,
        )
        prompts = [p[-context:] if len(p) > context else p for p in prompts]
    longest = max((len(p) for p in prompts), default=0)
    if longest + max_new_tokens > context:
        over = sum(len(p) + max_new_tokens > context for p in prompts)
        log.warning(
            "%d of %d prompts plus max_new_tokens=%d pass the model's context of %d tokens (longest prompt: "
            "%d tokens); the response tokens past it come from positions the model was never trained on",
            over,
            len(prompts),
            max_new_tokens,
            context,
            longest,
        )
    return list(prompts)


def check_settings(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0 <= temperature < math.inf:  # also refuses NaN
        raise ValueError(
            f"temperature must be >= 0 and finite (below {MIN_TEMPERATURE:g} means greedy), got {temperature}"
        )
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 means off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 means off), got {top_p}")


@dataclass(frozen=True)
class SamplingSettings:
    """How :func:`generate` samples each response: one bundle, checked when it is made.

    Raises:
        ValueError: a setting out of range (``max_new_tokens < 1``, a negative or non-finite temperature,
            ``top_k < 0``, ``top_p`` outside ``(0, 1]``).
    """

    max_new_tokens: int = 64
    """Length cap of each response."""
    temperature: float = 1.0
    """Divides the logits before sampling; 0 (or anything below :data:`MIN_TEMPERATURE`) means greedy."""
    top_k: int = 0
    """Sample among the ``top_k`` most likely tokens (0: off); ``top_k=1`` is greedy."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1: off)."""
    do_sample: bool = True
    """False means greedy decoding (argmax of the raw logits)."""
    seed: int | None = None
    """Seeds a private ``torch.Generator``, so the same seed gives the same samples for the same prompts
    and batch size; None uses the global RNG."""
    stop_ids: tuple[int, ...] | None = None
    """Tokens that end a response (any sequence of ids); None: :func:`stop_token_ids` of the tokenizer
    and model."""

    def __post_init__(self) -> None:
        check_settings(self.max_new_tokens, self.temperature, self.top_k, self.top_p)
        if self.stop_ids is not None:
            object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))

    @property
    def greedy(self) -> bool:
        """Whether responses are decoded greedily (``do_sample`` off or a temperature that means greedy)."""
        return not self.do_sample or is_greedy_temperature(self.temperature)


def warp_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Apply temperature, then top-k, then top-p (nucleus) filtering; removed tokens get ``-inf``.

    Args:
        logits: ``[B, V]``.
        temperature: divides the logits (> 0). Below :data:`MIN_TEMPERATURE` it is the limit as the
            temperature goes to 0: the largest logits are kept as they are, every other gets ``-inf`` (a
            point mass on the argmax; ties share it), never the NaN a division by ~0 gives.
        top_k: keep the ``top_k`` largest logits (0: keep all).
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``
            (Holtzman et al. 2020); the most likely token is always kept.

    Returns:
        ``[B, V]`` warped logits.
    """
    if is_greedy_temperature(temperature):
        scores = logits.masked_fill(logits < logits.amax(-1, keepdim=True), float("-inf"))
    else:
        scores = logits if temperature == 1.0 else logits / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        scores = _top_p_filter(scores, top_p)
    return scores


def _top_p_filter(scores: Tensor, top_p: float, first_k: int = 256) -> Tensor:
    """Nucleus filter of ``scores [B, V]`` without sorting the whole vocabulary when it can be avoided.

    The nucleus is a prefix of the tokens sorted by probability, so if the ``k`` most likely tokens
    already hold ``top_p`` of the mass, sorting those ``k`` gives the exact answer. ``k`` starts at
    ``first_k`` and grows 8x until that holds (or covers the vocabulary): a full sort of 49k logits costs
    tens of ms on a laptop CPU, ``topk(256)`` well under one.
    """
    vocab = scores.shape[-1]
    log_total = scores.logsumexp(-1, keepdim=True)
    k = first_k
    while True:
        if k * 4 >= vocab:  # topk over most of the vocabulary is slower than a sort
            top, index = torch.sort(scores, dim=-1, descending=True)
            probs = (top - log_total).exp()
            break
        top, index = torch.topk(scores, k, dim=-1)  # sorted, most likely first
        probs = (top - log_total).exp()
        if bool((probs.sum(-1) >= top_p).all()):
            break
        k *= 8
    remove = (probs.cumsum(-1) - probs) >= top_p  # mass of the strictly more likely tokens already enough
    remove[:, 0] = False
    kept = torch.full_like(scores, float("-inf"))
    return kept.scatter(-1, index, top.masked_fill(remove, float("-inf")))


SAMPLE_BLOCK = 256
"""Vocabulary entries per block of :func:`_sample`'s two-level search."""


def _last_positive(probs: Tensor) -> Tensor:
    """Index of the last entry of positive probability in each row of ``probs [B, n]``."""
    return probs.shape[-1] - 1 - (probs.flip(-1) > 0).to(torch.uint8).argmax(-1)


def _sample(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One draw per row of ``probs [B, V]`` (unnormalised, non-negative), with ``P(i) = p_i / sum(p)``.

    Inverse-CDF sampling: one uniform per row, placed on the row's cumulative sums (float64, so rounding
    cannot move a draw by more than ~1e-16 of the mass). It needs B random numbers per token where the
    exponential race (``argmax(p / E)``) needed B x V. The search runs in two levels: sums of blocks of
    :data:`SAMPLE_BLOCK` entries pick the block (one vectorised pass over the row), and only that block's
    cumulative sums are taken; a cumulative sum over the whole 49,152-entry row is a sequential scan that
    cost 6 ms per decode step of 32 rows on a CPU, the two levels well under one. A token of probability 0
    has an empty interval at either level and is never drawn.
    """
    rows, vocab = probs.shape
    u = torch.rand(rows, 1, generator=generator, dtype=torch.float64, device=probs.device)
    block = SAMPLE_BLOCK
    whole = vocab // block * block
    if whole < 4 * block:  # (a short row: one level)
        return _inverse_cdf(probs, u)
    sums = probs[:, :whole].reshape(rows, -1, block).sum(-1, dtype=torch.float64)
    if whole < vocab:  # the tail shorter than a block is a block of its own
        sums = torch.cat([sums, probs[:, whole:].sum(-1, keepdim=True, dtype=torch.float64)], dim=1)
    cdf = sums.cumsum(-1)
    target = u * cdf[:, -1:]
    chosen = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    chosen = torch.minimum(chosen, _last_positive(sums))  # (target rounded up to the total: ~1e-16)
    below = torch.where(chosen > 0, cdf.gather(-1, (chosen - 1).clamp(min=0)[:, None]).squeeze(-1), 0.0)
    start = chosen * block
    cols = start[:, None] + torch.arange(block, device=probs.device)
    inside = probs.gather(-1, cols.clamp(max=vocab - 1)).masked_fill(cols >= vocab, 0.0)
    local = torch.searchsorted(
        inside.cumsum(-1, dtype=torch.float64), (target.squeeze(-1) - below)[:, None], right=True
    ).squeeze(-1)
    # the block's own sums can round a hair below the block total the first level used
    local = torch.minimum(local, _last_positive(inside))
    return start + local


def _inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """One draw per row of ``probs`` for the uniforms ``u [B, 1]``, from the whole row's cumulative sums."""
    cdf = torch.cumsum(probs, -1, dtype=torch.float64)
    index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)
    return torch.minimum(index, _last_positive(probs))  # (u * total rounded up to the total: ~1e-16)


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


class _HiddenTap:
    """Keeps the last position's input of the output layer on every forward (a forward hook)."""

    def __init__(self, model: Any) -> None:
        self.last: Tensor | None = None
        self.handle = model.get_output_embeddings().register_forward_hook(self)

    def __call__(self, module: Any, args: tuple[Tensor, ...], output: Tensor) -> None:
        self.last = args[0][:, -1, :].detach()


def prompt_groups(prompts: Sequence[Sequence[int]]) -> list[int]:
    """Lengths of the runs of consecutive identical prompts: ``[a, a, a, b, c, c]`` gives ``[3, 1, 2]``.

    Online RL lists the G samples of each prompt in a row (prompt-major), so its runs are the groups
    that can share one prefill."""
    sizes: list[int] = []
    previous: list[int] | None = None
    for prompt in prompts:
        ids = [int(i) for i in prompt]
        if sizes and ids == previous:
            sizes[-1] += 1
        else:
            sizes.append(1)
            previous = ids
    return sizes


def _entropy(scores: Tensor) -> Tensor:
    """Entropy of softmax(scores) per row; ``-inf`` scores (filtered tokens) count as probability 0."""
    logp = scores.log_softmax(-1)
    return -(logp.exp() * logp.masked_fill(torch.isinf(scores), 0.0)).sum(-1)


def _decode(
    model: Any,
    prompts: Sequence[Sequence[int]],
    pad_id: int,
    settings: SamplingSettings,
    generator: torch.Generator | None,
    tap: _HiddenTap | None,
    lean: bool = True,
    share_prompts: bool = True,
) -> tuple[Tensor, ...]:
    """One batch of the sampling loop; ``settings.stop_ids`` already resolved. With ``share_prompts``
    and some run of identical consecutive prompts (:func:`prompt_groups`), only the unique prompts are
    prefilled and the stepper shares their KV cache across each run; the prefill's logits and hidden
    state are repeated to every row before the first token is sampled.

    Returns:
        prompt_ids [b, P], prompt_mask [b, P], response_ids [b, R], response_mask [b, R],
        logprobs [b, R], finished [b], and with a ``tap`` also hidden [b, R, H], entropy [b, R].
    """
    from prefalign.decoding import make_stepper

    device = next(model.parameters()).device
    stops = torch.as_tensor(settings.stop_ids, dtype=torch.long, device=device)
    max_new_tokens, greedy = settings.max_new_tokens, settings.greedy
    groups = prompt_groups(prompts) if share_prompts else [1] * len(prompts)
    if max(groups) > 1:
        starts = [0, *itertools.accumulate(groups)][:-1]
        unique_ids, unique_mask = _left_pad([prompts[i] for i in starts], pad_id, device)
        index = torch.repeat_interleave(
            torch.arange(len(groups), device=device), torch.tensor(groups, device=device)
        )
        prompt_ids, prompt_mask = unique_ids.index_select(0, index), unique_mask.index_select(0, index)
        key_mask = torch.cat([unique_mask, unique_mask.new_ones(len(groups), max_new_tokens)], dim=1)
        stepper = make_stepper(model, key_mask, lean=lean, groups=groups)
        logits = stepper.step(unique_ids, position_ids_from_mask(unique_mask)).index_select(0, index)
        if tap is not None:
            tap.last = tap.last.index_select(0, index)
    else:
        prompt_ids, prompt_mask = _left_pad(prompts, pad_id, device)
        key_mask = torch.cat([prompt_mask, prompt_mask.new_ones(len(prompts), max_new_tokens)], dim=1)
        stepper = make_stepper(model, key_mask, lean=lean)
        logits = stepper.step(prompt_ids, position_ids_from_mask(prompt_mask))
    batch = prompt_ids.shape[0]
    position = prompt_mask.sum(-1, keepdim=True)  # next position id of each row: its prompt length
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens: list[Tensor] = []
    logps: list[Tensor] = []
    masks: list[Tensor] = []
    hidden: list[Tensor] = []
    entropy: list[Tensor] = []
    for step in range(max_new_tokens):
        if greedy:
            token = logits.argmax(-1).masked_fill(done, pad_id)
            logp = token_logps(logits, token)
            step_entropy = _entropy(logits) if tap is not None else None
        else:  # one log-softmax serves the draw, the token's log-prob and the entropy
            logits = warp_logits(logits, settings.temperature, settings.top_k, settings.top_p)
            log_probs = logits.float().log_softmax(-1)
            probs = log_probs.exp()
            token = _sample(probs, generator).masked_fill(done, pad_id)
            logp = log_probs.gather(-1, token[:, None]).squeeze(-1)
            # (a filtered token has p = 0 and log p = -inf: 0 * -inf is NaN, counted as 0)
            step_entropy = -(probs * log_probs).nan_to_num_(0.0).sum(-1) if tap is not None else None
        if tap is not None:
            hidden.append(tap.last * (~done)[:, None])
            entropy.append(step_entropy.masked_fill(done, 0.0))
        tokens.append(token)
        logps.append(logp.masked_fill(done, 0.0))
        masks.append((~done).long())
        done = done | torch.isin(token, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = stepper.step(token[:, None], position)
        position = position + 1
    extra = (torch.stack(hidden, 1), torch.stack(entropy, 1)) if tap is not None else ()
    return (
        prompt_ids,
        prompt_mask,
        torch.stack(tokens, 1),
        torch.stack(masks, 1),
        torch.stack(logps, 1),
        done,
        *extra,
    )


def response_logits(model: Any, out: GenerationOutput, temperature: float = 1.0) -> Tensor:
    """Logits ``[B, R, V]`` (divided by ``temperature``) that predict each response token of ``out``.

    One forward pass over ``prompt + response``; the vocabulary projection runs only over the last
    ``R + 1`` positions where the model accepts ``logits_to_keep``. Gradients flow when enabled. A
    temperature below :data:`MIN_TEMPERATURE` is greedy decoding, whose recorded log-probs are those of
    the raw logits (see :func:`generate`), so the logits are returned undivided.
    """
    input_ids, attention_mask = out.sequences()
    width = out.response_ids.shape[1]
    from prefalign.decoding import forward_kwargs

    _, keep_kw = forward_kwargs(model)
    extra = {"logits_to_keep": width + 1} if keep_kw else {}
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        **extra,
    ).logits
    logits = logits[:, -(width + 1) : -1, :].float()
    return logits / temperature if temperature != 1.0 and not is_greedy_temperature(temperature) else logits


def response_logprobs(
    model: Any, out: GenerationOutput, temperature: float = 1.0, batch_size: int | None = None
) -> Tensor:
    """Log-probs ``[B, R]`` of the sampled response tokens under ``model`` at ``temperature``.

    The fresh-forward counterpart of ``out.logprobs``: for the model that sampled (temperature only, no
    top-k/top-p) the two agree to float rounding. Used for the reference model's log-probs (KL) and the
    old policy's. No gradient; 0 off the response mask.
    """
    size = batch_size or out.response_ids.shape[0]
    parts = []
    with torch.no_grad():
        for i in range(0, out.response_ids.shape[0], size):
            part = out.rows(slice(i, i + size))
            logits = response_logits(model, part, temperature)
            parts.append(token_logps(logits, part.response_ids) * part.response_mask)
    return torch.cat(parts)


def _pad_to3(x: Tensor, width: int) -> Tensor:
    """Right-pad ``[b, r, H]`` with zeros to ``[b, width, H]``."""
    return F.pad(x, (0, 0, 0, width - x.shape[1])) if x.shape[1] < width else x


def _pad_to(x: Tensor, width: int, value: float, left: bool) -> Tensor:
    extra = width - x.shape[1]
    if extra == 0:
        return x
    return F.pad(x, (extra, 0) if left else (0, extra), value=value)


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    settings: SamplingSettings | None = None,
    *,
    batch_size: int | None = None,
    progress: bool | None = None,
    return_hidden: bool = False,
    lean: bool = True,
    share_prompts: bool = True,
) -> GenerationOutput:
    """Sample responses to token-id prompts with a KV cache, in batches.

    A prompt longer than the model's context (:func:`context_length`) is cut to its last tokens, with a
    warning (:func:`cap_prompts`). Each batch is left padded; position ids count real tokens only, so a
    prompt's continuation does not depend on how much padding its batch needed (greedy batched output
    equals unbatched). A row stops at its first stop token; later columns are padding with mask 0. The
    model runs in eval mode under ``torch.no_grad`` and its previous train/eval mode is restored.

    Args:
        model: a causal LM (transformers or peft) taking ``input_ids, attention_mask, position_ids``
            and a KV cache.
        tokenizer: gives the pad id (EOS if there is none) and the text decoding.
        prompts: ``B`` lists of token ids (e.g. from :func:`prefalign.data.encode_prompt`), each non-empty.
        settings: length cap, temperature, top-k, top-p, greedy or not, seed and stop tokens
            (:class:`SamplingSettings`); None: its defaults.
        batch_size: prompts per forward batch; None means all at once.
        progress: show a progress bar over batches; None shows one when there are several batches.
        return_hidden: also return each response position's final hidden state and the sampling
            distribution's entropy (``hidden``, ``entropy``; for a critic on the policy's trunk).
        lean: decode Llama-family models with :class:`prefalign.decoding.LeanStepper` (the same
            numbers, faster); False, or any other architecture, uses the model's own forward.
        share_prompts: within each batch, rows that repeat the prompt of the row before (the G samples
            of a prompt that online RL lists in a row) share one prefill: only the unique prompts go
            through the model, and decoding reads each unique prompt's KV cache once for its whole run
            (the lean stepper keeps it once per run; the model's-forward path copies it to every row).
            The random draws stay per row in the same order, so the results equal ``share_prompts=False``
            to float rounding (the prefill runs at another batch size); False prefills every row.

    Returns:
        A :class:`GenerationOutput`. ``logprobs`` are under the distribution that sampled (the warped
        one), the convention PPO's importance ratio needs: the old, reference and training passes apply
        the same temperature (:func:`response_logprobs`).

    Raises:
        ValueError: no prompts, or an empty prompt.
    """
    settings = SamplingSettings() if settings is None else settings
    if len(prompts) == 0:
        raise ValueError("generate() got no prompts")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty (0 tokens); every prompt needs at least one token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer has neither a pad nor an EOS token to pad with")
    device = next(model.parameters()).device
    prompts = cap_prompts(prompts, context_length(model), settings.max_new_tokens)
    if settings.stop_ids is None:
        settings = dataclasses.replace(settings, stop_ids=tuple(stop_token_ids(tokenizer, model)))
    generator = (
        torch.Generator(device=device).manual_seed(settings.seed) if settings.seed is not None else None
    )
    size = batch_size or len(prompts)
    chunks = [prompts[i : i + size] for i in range(0, len(prompts), size)]
    show = len(chunks) > 1 if progress is None else progress
    was_training = model.training
    model.eval()
    tap = _HiddenTap(model) if return_hidden else None
    try:
        with torch.no_grad():
            parts = [
                _decode(model, chunk, pad_id, settings, generator, tap, lean, share_prompts)
                for chunk in tqdm(chunks, desc="generating", unit="batch", disable=not show)
            ]
    finally:
        if tap is not None:
            tap.handle.remove()
        model.train(was_training)
    return _join(parts, tokenizer, pad_id)


def _join(parts: list[tuple[Tensor, ...]], tokenizer: Any, pad_id: int) -> GenerationOutput:
    """The batches of :func:`_decode` as one :class:`GenerationOutput`, padded to common widths."""
    width_p = max(p[0].shape[1] for p in parts)
    width_r = max(p[2].shape[1] for p in parts)
    prompt_ids = torch.cat([_pad_to(p[0], width_p, pad_id, left=True) for p in parts])
    prompt_mask = torch.cat([_pad_to(p[1], width_p, 0, left=True) for p in parts])
    response_ids = torch.cat([_pad_to(p[2], width_r, pad_id, left=False) for p in parts])
    response_mask = torch.cat([_pad_to(p[3], width_r, 0, left=False) for p in parts])
    logprobs = torch.cat([_pad_to(p[4], width_r, 0.0, left=False) for p in parts])
    finished = torch.cat([p[5] for p in parts])
    hidden = entropy = None
    if len(parts[0]) > 6:  # a hidden-state tap was on
        hidden = torch.cat([_pad_to3(p[6], width_r) for p in parts])
        entropy = torch.cat([_pad_to(p[7], width_r, 0.0, left=False) for p in parts])
    texts = [
        tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
        for ids, mask in zip(response_ids.cpu(), response_mask.cpu(), strict=True)
    ]
    return GenerationOutput(
        prompt_ids, prompt_mask, response_ids, response_mask, logprobs, finished, texts, hidden, entropy
    )
