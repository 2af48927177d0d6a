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
"""

from __future__ import annotations

import inspect
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
            generated column); left padding is False.
    """

    def __init__(self, model: Any, key_mask: Tensor) -> None:
        self.model = model
        self.base = model.model
        self.key_mask = key_mask
        batch, max_len = key_mask.shape
        attn = self.base.layers[0].self_attn
        kv_heads = model.config.num_key_value_heads
        weight = attn.k_proj.weight
        shape = (len(self.base.layers), batch, kv_heads, max_len, attn.head_dim)
        self.k = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.v = torch.zeros_like(self.k)
        self.length = 0
        self.head = model.get_output_embeddings()

    def _mask(self, new: int) -> Tensor:
        """``[B, 1, new, end]``: causal over the cache plus the key mask; each query also sees itself, so
        a padding row attends somewhere (its output is never used) and nothing becomes NaN."""
        start, end = self.length, self.length + new
        rows = torch.arange(start, end, device=self.k.device)[:, None]
        cols = torch.arange(end, device=self.k.device)[None, :]
        causal = cols <= rows
        mask = causal[None] & self.key_mask[:, None, :end]
        return (mask | (cols == rows)[None])[:, None]

    def step(self, ids: Tensor, positions: Tensor) -> Tensor:
        """Feed ``ids [B, T]`` at ``positions [B, T]``; returns the logits ``[B, V]`` after the last one."""
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
            self.k[i, :, :, start:end] = k * cos + _rotate_half(k) * sin
            self.v[i, :, :, start:end] = v
            out = F.scaled_dot_product_attention(
                q,
                self.k[i, :, :, :end],
                self.v[i, :, :, :end],
                attn_mask=mask,
                scale=attn.scaling,
                enable_gqa=True,
            )
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, new, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        self.length = end
        return self.head(base.norm(hidden[:, -1:]))[:, -1].float()


class HFStepper:
    """The model's own ``forward`` with its KV cache (any causal LM, peft-wrapped ones included)."""

    def __init__(self, model: Any, key_mask: Tensor) -> None:
        self.model = model
        self.key_mask = key_mask.long()
        self.length = 0
        self.cache: Any = None
        self.cache_kw, keep = forward_kwargs(model)
        self.extra = {"logits_to_keep": 1} if keep else {}

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
        return out.logits[:, -1, :].float()


def _cache_of(out: Any) -> Any:
    for key in ("cache", "past_key_values"):
        value = out.get(key) if hasattr(out, "get") else getattr(out, key, None)
        if value is not None:
            return value
    raise RuntimeError(f"{type(out).__name__} returned no KV cache although use_cache=True")


def make_stepper(model: Any, key_mask: Tensor, lean: bool = True) -> LeanStepper | HFStepper:
    """The lean stepper where the architecture allows it (and ``lean``), else the model's forward. A peft
    (LoRA) model decodes leanly through its base model: peft replaced the base's linear layers with its
    own, whose forward adds the adapter, and the lean stepper calls those very modules (LoRA only: other
    peft methods, prompt tuning say, change the forward itself and use the HF stepper)."""
    peft = getattr(model, "peft_config", None)
    lora = peft is not None and all(c.peft_type == "LORA" for c in peft.values())
    base = model.get_base_model() if lora else model
    if lean and lean_supported(base):
        return LeanStepper(base, key_mask.bool())
    return HFStepper(model, key_mask)
