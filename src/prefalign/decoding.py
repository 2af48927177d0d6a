"""Steppers for the sampling loop: one call feeds new tokens and returns the next-token logits.

Two implementations behind one interface (``step(ids, positions) -> logits [B, V]``):

- :class:`HFStepper` calls the model's own ``forward`` with its KV cache: any causal LM works.
- :class:`LeanStepper` runs a Llama-family decoder (Llama, Qwen2, Mistral without sliding windows; the
  SmolLM2 family is Llama) layer by layer with the model's own modules and a preallocated KV cache:
  no cache concatenation, no per-step mask building beyond one boolean row, no framework dispatch.
  At batch sizes of a rollout (16 rows) the framework's per-step overhead is a large share of decoding
  on a CPU, so this is where sampling gets its speed. Its logits equal the model's ``forward`` to float
  rounding (tested against it, greedy tokens included).

Both feed the output layer through the model's own ``get_output_embeddings()`` module, so hooks on it
(the sampler's hidden-state tap) see every step.

Shared prompts (``groups``): when consecutive rows repeat one prompt (the G samples of a prompt in online
RL), a stepper built with ``groups=[g_0, g_1, ...]`` (the run lengths, summing to B) takes the U unique
prompts in its first call (the prefill, ``[U, P]``, returning ``[U, V]``) and the B rows in every later
call. The lean stepper keeps the prompt's keys/values once per group and reads them from every row of
the group; the HF stepper expands its cache to B rows after the prefill.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

LEAN_ARCHITECTURES = frozenset({"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"})


def lean_supported(model: Any) -> bool:
    """Whether :class:`LeanStepper` reproduces this model's forward (architecture and settings checked)."""
    if type(model).__name__ not in LEAN_ARCHITECTURES:
        return False
    config = model.config
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "rotary_emb") or not hasattr(base, "layers"):
        return False
    sliding = getattr(config, "sliding_window", None)
    if sliding and getattr(config, "use_sliding_window", type(model).__name__ == "MistralForCausalLM"):
        return False
    attn = base.layers[0].self_attn
    parts = ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")
    return all(hasattr(attn, p) for p in parts) and not hasattr(attn, "q_norm")


def forward_kwargs(model: Any) -> tuple[str, bool]:
    """The KV-cache keyword of this transformers version and whether ``logits_to_keep`` is accepted."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LeanStepper:
    """A Llama-family decoder with a preallocated KV cache ``[layers, B, kv_heads, max_len, head_dim]``.

    Args:
        model: a model for which :func:`lean_supported` is True, in eval mode, under ``no_grad``.
        key_mask: ``[B, max_len]`` bool, True on the key positions that exist (prompt tokens, then every
            generated column); left padding is False. With ``groups``: ``[U, P + max_new]``, one row per
            group (its prompt's mask, then the generated columns).
        groups: run lengths of rows that share a prompt (``[4, 4, 2]``: rows 0-3 share one, 4-7 the next,
            8-9 the last); None: every row its own prompt. With groups the first :meth:`step` is the
            prefill of the U unique prompts (``[U, P]``; P, the prompt width, is taken from it) and
            returns ``[U, V]``; every later step feeds one token to each of the B rows. The prompt's
            keys/values are kept once per group (:attr:`prompt_k`, :attr:`prompt_v`
            ``[layers, U, kv_heads, P, head_dim]``) and the generated ones per row (:attr:`gen_k`,
            :attr:`gen_v` ``[layers, B, kv_heads, max_new, head_dim]``); a decode step attends to both
            with one softmax over the concatenated scores, reading a group's prompt cache once for all
            its rows (equal group sizes; uneven ones gather the prompt cache per row, a slower path).
    """

    def __init__(self, model: Any, key_mask: Tensor, groups: Sequence[int] | None = None) -> None:
        self.model = model
        self.base = model.model
        self.key_mask = key_mask
        batch, max_len = key_mask.shape
        attn = self.base.layers[0].self_attn
        self.kv_heads = model.config.num_key_value_heads
        self.head_dim = attn.head_dim
        weight = attn.k_proj.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.length = 0
        self.head = model.get_output_embeddings()
        self.groups = None if groups is None else [int(g) for g in groups]
        if self.groups is None:
            shape = (len(self.base.layers), batch, self.kv_heads, max_len, self.head_dim)
            self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.v = torch.zeros_like(self.k)
            return
        if len(self.groups) != batch or min(self.groups) < 1:
            raise ValueError(
                f"groups {self.groups} must give one size >= 1 for each of the {batch} key-mask rows"
            )
        self.batch = sum(self.groups)
        self.row_group = torch.repeat_interleave(
            torch.arange(batch, device=self.device), torch.tensor(self.groups, device=self.device)
        )
        self.equal = len(set(self.groups)) == 1
        self.prompt_width = 0
        self.prompt_k = self.prompt_v = self.gen_k = self.gen_v = torch.empty(0)
        self.prompt_keep = torch.empty(0, dtype=torch.bool)

    def _mask(self, new: int) -> Tensor:
        """``[B, 1, new, end]``: causal over the cache plus the key mask; each query also sees itself, so
        a padding row attends somewhere (its output is never used) and nothing becomes NaN."""
        start, end = self.length, self.length + new
        rows = torch.arange(start, end, device=self.device)[:, None]
        cols = torch.arange(end, device=self.device)[None, :]
        causal = cols <= rows
        mask = causal[None] & self.key_mask[:, None, :end]
        return (mask | (cols == rows)[None])[:, None]

    def _allocate_groups(self, width: int) -> None:
        """The caches of the grouped mode, once the prefill fixed the prompt width."""
        layers, units, max_len = len(self.base.layers), self.key_mask.shape[0], self.key_mask.shape[1]
        max_new = max_len - width
        if max_new < 0:
            raise ValueError(f"prefill of width {width} exceeds the key mask's {max_len} columns")
        shape = (layers, units, self.kv_heads, width, self.head_dim)
        self.prompt_k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.prompt_v = torch.zeros_like(self.prompt_k)
        shape = (layers, self.batch, self.kv_heads, max_new, self.head_dim)
        self.gen_k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.gen_v = torch.zeros_like(self.gen_k)
        self.prompt_width = width
        self.prompt_keep = self.key_mask[:, :width]  # [U, P]: False on a group's left padding

    def step(self, ids: Tensor, positions: Tensor) -> Tensor:
        """Feed ``ids [B, T]`` at ``positions [B, T]``; returns the logits ``[B, V]`` after the last one
        (with groups: the first call feeds and returns U rows, later ones one token per row of B)."""
        if self.groups is not None and self.length > 0:
            return self._shared_step(ids, positions)
        if self.groups is not None:
            self._allocate_groups(ids.shape[1])
            cache_k, cache_v = self.prompt_k, self.prompt_v
        else:
            cache_k, cache_v = self.k, self.v
        base = self.base
        hidden = base.embed_tokens(ids)
        cos, sin = base.rotary_emb(hidden, positions)
        cos, sin = cos[:, None], sin[:, None]
        batch, new = ids.shape
        start, end = self.length, self.length + new
        mask = self._mask(new)
        for i, layer in enumerate(base.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(batch, new, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(batch, new, -1, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(batch, new, -1, attn.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            cache_k[i, :, :, start:end] = k * cos + _rotate_half(k) * sin
            cache_v[i, :, :, start:end] = v
            out = F.scaled_dot_product_attention(
                q,
                cache_k[i, :, :, :end],
                cache_v[i, :, :, :end],
                attn_mask=mask,
                scale=attn.scaling,
                enable_gqa=True,
            )
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, new, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        self.length = end
        return self.head(base.norm(hidden[:, -1:]))[:, -1].float()

    def _shared_step(self, ids: Tensor, positions: Tensor) -> Tensor:
        """One decode step of the B rows over their group's prompt cache and their own generated one."""
        batch, new = ids.shape
        if batch != self.batch or new != 1:
            raise ValueError(
                f"after a grouped prefill each step feeds [{self.batch}, 1] ids, got {list(ids.shape)}"
            )
        base = self.base
        t = self.length - self.prompt_width  # column of this token in the generated cache
        if t >= self.gen_k.shape[3]:
            raise ValueError(
                f"the generated cache holds {self.gen_k.shape[3]} tokens; step {t + 1} is one too many"
            )
        hidden = base.embed_tokens(ids)
        cos, sin = base.rotary_emb(hidden, positions)
        cos, sin = cos[:, None], sin[:, None]
        for i, layer in enumerate(base.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(batch, 1, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(batch, 1, -1, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(batch, 1, -1, attn.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            self.gen_k[i, :, :, t : t + 1] = k * cos + _rotate_half(k) * sin
            self.gen_v[i, :, :, t : t + 1] = v
            out = self._attend(q * attn.scaling, i, t + 1)
            hidden = hidden + attn.o_proj(out[:, None])
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        self.length += 1
        return self.head(base.norm(hidden))[:, -1].float()

    def _attend(self, q: Tensor, layer: int, seen: int) -> Tensor:
        """Attention of one query per row (``q [B, Hq, 1, D]``, already scaled) over its group's prompt
        keys and its own ``seen`` generated keys; returns ``[B, Hq * D]`` (heads concatenated).

        Grouped-query heads are never repeated: query head ``h`` reads key/value head ``h // rep``, so the
        ``rep`` query heads of a key/value head, of all ``G`` rows of a group, form one ``[G * rep, D]``
        block against that group's ``[P, D]`` prompt keys."""
        batch, heads, _, dim = q.shape
        kv, width = self.kv_heads, self.prompt_width
        rep = heads // kv
        prompt_k, prompt_v = self.prompt_k[layer], self.prompt_v[layer]  # [U, kv, P, D]
        keep = self.prompt_keep
        if self.equal:
            units, size = prompt_k.shape[0], self.groups[0]
        else:  # uneven groups: each row its own copy of its group's prompt cache
            prompt_k = prompt_k.index_select(0, self.row_group)
            prompt_v = prompt_v.index_select(0, self.row_group)
            keep = keep.index_select(0, self.row_group)
            units, size = batch, 1
        q4 = q.reshape(batch, kv, rep, dim)
        gen_k = self.gen_k[layer, :, :, :seen]  # [B, kv, S, D]
        gen_v = self.gen_v[layer, :, :, :seen]
        scores_gen = torch.matmul(q4, gen_k.transpose(-1, -2))  # [B, kv, rep, S]
        q_units = q4.view(units, size, kv, rep, dim).transpose(1, 2).reshape(units, kv, size * rep, dim)
        scores_prompt = torch.matmul(q_units, prompt_k.transpose(-1, -2))  # [U, kv, G*rep, P]
        scores_prompt = scores_prompt.masked_fill(~keep[:, None, None, :], float("-inf"))
        scores = torch.cat(
            [
                scores_prompt.view(units, kv, size, rep, width),
                scores_gen.view(units, size, kv, rep, seen).transpose(1, 2),
            ],
            dim=-1,
        )  # [U, kv, G, rep, P + S]
        weights = scores.float().softmax(-1).to(q.dtype)
        out_prompt = torch.matmul(weights[..., :width].reshape(units, kv, size * rep, width), prompt_v)
        out_prompt = out_prompt.view(units, kv, size, rep, dim).transpose(1, 2)  # [U, G, kv, rep, D]
        w_gen = weights[..., width:].transpose(1, 2).reshape(batch, kv, rep, seen)
        out_gen = torch.matmul(w_gen, gen_v)  # [B, kv, rep, D]
        return (out_prompt.reshape(batch, kv, rep, dim) + out_gen).reshape(batch, heads * dim)


class HFStepper:
    """The model's own ``forward`` with its KV cache (any causal LM, peft-wrapped ones included).

    With ``groups`` (see :class:`LeanStepper`), ``key_mask`` has one row per group; the first step
    (the prefill of the U unique prompts) returns ``[U, V]`` and then the cache and the key mask are
    expanded to the B rows (a copy: this is the fallback path)."""

    def __init__(self, model: Any, key_mask: Tensor, groups: Sequence[int] | None = None) -> None:
        self.model = model
        self.key_mask = key_mask.long()
        self.length = 0
        self.cache: Any = None
        self.cache_kw, keep = forward_kwargs(model)
        self.extra = {"logits_to_keep": 1} if keep else {}
        self.row_group: Tensor | None = None
        if groups is not None:
            if len(groups) != key_mask.shape[0] or min(groups) < 1:
                raise ValueError(f"groups {list(groups)} must give one size >= 1 per key-mask row")
            self.row_group = torch.repeat_interleave(
                torch.arange(len(groups), device=key_mask.device),
                torch.tensor([int(g) for g in groups], device=key_mask.device),
            )

    def step(self, ids: Tensor, positions: Tensor) -> Tensor:
        end = self.length + ids.shape[1]
        kwargs = {self.cache_kw: self.cache} if self.cache is not None else {}
        out = self.model(
            input_ids=ids,
            attention_mask=self.key_mask[:, :end],
            position_ids=positions,
            use_cache=True,
            **self.extra,
            **kwargs,
        )
        self.cache = _cache_of(out)
        self.length = end
        if self.row_group is not None:  # the prefill of the unique prompts: expand to every row
            self.cache = _expand_cache(self.cache, self.row_group)
            self.key_mask = self.key_mask.index_select(0, self.row_group)
            self.row_group = None
        return out.logits[:, -1, :].float()


def _expand_cache(cache: Any, index: Tensor) -> Any:
    """Rows ``index`` of a KV cache (a transformers ``Cache`` or the legacy tuples of tensors)."""
    if hasattr(cache, "reorder_cache"):
        cache.reorder_cache(index)
        return cache
    if isinstance(cache, tuple | list):
        return type(cache)(_expand_cache(part, index) for part in cache)
    if isinstance(cache, Tensor):
        return cache.index_select(0, index.to(cache.device))
    raise TypeError(f"cannot expand a KV cache of type {type(cache).__name__} to the rows of its groups")


def _cache_of(out: Any) -> Any:
    for key in ("cache", "past_key_values"):
        value = out.get(key) if hasattr(out, "get") else getattr(out, key, None)
        if value is not None:
            return value
    raise RuntimeError(f"{type(out).__name__} returned no KV cache although use_cache=True")


def make_stepper(
    model: Any, key_mask: Tensor, lean: bool = True, groups: Sequence[int] | None = None
) -> LeanStepper | HFStepper:
    """The lean stepper where the architecture allows it (and ``lean``), else the model's forward. A peft
    (LoRA) model decodes leanly through its base model: peft replaced the base's linear layers with its
    own, whose forward adds the adapter, and the lean stepper calls those very modules (LoRA only: other
    peft methods, prompt tuning say, change the forward itself and use the HF stepper). ``groups``: rows
    that share a prompt (see :class:`LeanStepper`); ``key_mask`` then has one row per group."""
    peft = getattr(model, "peft_config", None)
    lora = peft is not None and all(c.peft_type == "LORA" for c in peft.values())
    base = model.get_base_model() if lora else model
    if lean and lean_supported(base):
        return LeanStepper(base, key_mask.bool(), groups)
    return HFStepper(model, key_mask, groups)
