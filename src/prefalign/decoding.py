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

Decode steps (one new token per row) run the layer's products through :class:`DecodeWeights`: the
q/k/v projections as one product and the gate/up projections as one, each weight prepacked once per
stepper for the stepper's row count (MKL's packed GEMM where torch has it), a LoRA adapter folded into
its weight (``W + scaling * B A``: one product per projection instead of three). At 32 rows on two cores
that takes the decoder's products from about 63 to 46 ms a step and the output layer's from 13 to 10;
the prefill still calls the model's own modules. The packed copies live as long as the stepper (about
one copy of the weights, during sampling only).

Shared prompts (``groups``): when consecutive rows repeat one prompt (the G samples of a prompt in online
RL), a stepper built with ``groups=[g_0, g_1, ...]`` (the run lengths, summing to B) takes the U unique
prompts in its first call (the prefill, ``[U, P]``, returning ``[U, V]``) and the B rows in every later
call. The lean stepper keeps the prompt's keys/values once per group and reads them from every row of
the group; the HF stepper expands its cache to B rows after the prefill.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from prefalign.memory import RMSNORM_CLASSES, lora_adapters

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


class LinearParts(NamedTuple):
    """``x -> x (W + sum_j s_j B_j A_j)^T + b``: a linear map with low-rank terms (LoRA adapters)."""

    weight: Tensor
    bias: Tensor | None
    low_rank: list[tuple[Tensor, Tensor, float]]  # (B [out, r], A [r, in], scaling s)

    def into(self, out: Tensor) -> Tensor:
        """Writes the effective weight ``W + sum s B A`` into ``out`` (``[out, in]``) and returns it (no
        gradient: a weight for inference)."""
        with torch.no_grad():
            if len(self.low_rank) == 1:  # one pass: out = W + s B A
                b, a, scaling = self.low_rank[0]
                return torch.addmm(self.weight, b.to(out.dtype), a.to(out.dtype), alpha=scaling, out=out)
            out.copy_(self.weight)
            for b, a, scaling in self.low_rank:
                out.addmm_(b.to(out.dtype), a.to(out.dtype), alpha=scaling)
            return out


def linear_parts(module: Any) -> LinearParts | None:
    """The parts with which ``module`` maps ``x`` as it stands now: a plain ``nn.Linear`` (no low-rank
    terms); or a peft LoRA ``Linear`` over one, with its active plain-LoRA adapters as low-rank terms
    (none while adapters are disabled or merged: :func:`prefalign.memory.lora_adapters`). ``None`` for
    anything else: the caller then runs the module itself. Dropout is not applied: steppers run in eval
    mode."""
    if type(module) is torch.nn.Linear:
        return LinearParts(module.weight, module.bias, [])
    found = lora_adapters(module)
    if found is None:
        return None
    base, adapters = found
    return LinearParts(base.weight, base.bias, [(ad.b, ad.a, ad.scaling) for ad in adapters])


DECODE_COPY_LIMIT = 4 * 2**30
"""Models whose parameters take more bytes than this decode through their own modules: the prepacked
copy of :class:`DecodeWeights` (about one more copy of the weights while sampling) is made only below it."""


def _mkl_packing(weight: Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkl.is_available()
        and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
    )


class DecodeProduct:
    """``x W^T + b`` for inputs of a fixed row count: ``W`` prepacked by MKL (``cblas_sgemm_pack``) where
    torch has it (float32 on the CPU), else ``F.linear`` on ``W``. The packed product equals ``F.linear``
    (the same kernel without its per-call packing of ``W``), which at decode's few rows is a large share
    of the product's time."""

    def __init__(self, weight: Tensor, bias: Tensor | None, rows: int) -> None:
        self.rows, self.bias = rows, bias
        self.out_features = weight.shape[0]
        if _mkl_packing(weight):
            self.packed: Tensor | None = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows)
            # the original weight is read only for its shape (a call with other rows would use it: none)
            self.weight = torch.empty((), dtype=weight.dtype).expand(weight.shape)
        else:
            self.packed, self.weight = None, weight.detach()

    def __call__(self, x: Tensor) -> Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] != self.rows:
            raise ValueError(f"a product packed for {self.rows} rows was given {flat.shape[0]}")
        out = torch.ops.mkl._mkl_linear(flat, self.packed, self.weight, self.bias, self.rows)
        return out.view(*x.shape[:-1], self.out_features)


def _fused(modules: Sequence[Any], rows: int) -> DecodeProduct | None:
    """One :class:`DecodeProduct` for ``modules`` applied to the same input (outputs concatenated)."""
    parts = [linear_parts(m) for m in modules]
    if any(p is None for p in parts):
        return None
    bias = None
    if any(p.bias is not None for p in parts):
        bias = torch.cat([p.weight.new_zeros(p.weight.shape[0]) if p.bias is None else p.bias for p in parts])
    if len(parts) == 1 and not parts[0].low_rank:
        return DecodeProduct(parts[0].weight, bias, rows)
    weight = parts[0].weight.new_empty(sum(p.weight.shape[0] for p in parts), parts[0].weight.shape[1])
    start = 0
    for p in parts:
        p.into(weight[start : start + p.weight.shape[0]])
        start += p.weight.shape[0]
    return DecodeProduct(weight, bias, rows)


class DecodeWeights:
    """The products of a Llama-family decoder's decode step, per layer: ``qkv`` (q, k and v projections
    as one product, output split by :attr:`qkv_sizes`), ``o``, ``gate_up`` (gate and up as one, split in
    halves) and ``down``; and ``head``, the output layer (``None`` where it is not a plain linear layer
    or has forward pre-hooks). Built by :meth:`build`, which returns ``None`` when any projection is not a
    linear map it can read (:func:`linear_parts`)."""

    def __init__(
        self,
        layers: list[tuple[DecodeProduct, ...]],
        qkv_sizes: list[int],
        head: DecodeProduct | None,
        fused_norms: bool = False,
    ) -> None:
        self.layers, self.qkv_sizes, self.head = layers, qkv_sizes, head
        self.fused_norms = fused_norms
        """Whether every RMSNorm is one of the classes whose formula ``F.rms_norm`` computes."""

    @classmethod
    def build(cls, model: Any, rows: int) -> DecodeWeights | None:
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        if weight_bytes > DECODE_COPY_LIMIT:
            return None  # (the copy would cost more memory than the speed is worth: modules it is)
        with torch.no_grad():
            layers = []
            for layer in model.model.layers:
                attn, mlp = layer.self_attn, layer.mlp
                if not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                    return None
                products = (
                    _fused([attn.q_proj, attn.k_proj, attn.v_proj], rows),
                    _fused([attn.o_proj], rows),
                    _fused([mlp.gate_proj, mlp.up_proj], rows),
                    _fused([mlp.down_proj], rows),
                )
                if any(p is None for p in products):
                    return None
                layers.append(products)
            attn = model.model.layers[0].self_attn
            sizes = [attn.q_proj, attn.k_proj, attn.v_proj]
            qkv_sizes = [int(linear_parts(m).weight.shape[0]) for m in sizes]
            head_module = model.get_output_embeddings()
            head = None
            if type(head_module) is torch.nn.Linear and not head_module._forward_pre_hooks:
                head = DecodeProduct(head_module.weight, head_module.bias, rows)
            norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
            fused_norms = hasattr(F, "rms_norm") and all(
                type(m).__name__ in RMSNORM_CLASSES and hasattr(m, "variance_epsilon") for m in norms
            )
        return cls(layers, qkv_sizes, head, fused_norms)


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
        fast_decode: run decode steps through :class:`DecodeWeights` (built at the first one); False:
            through the model's modules, as the prefill does.
    """

    def __init__(
        self, model: Any, key_mask: Tensor, groups: Sequence[int] | None = None, fast_decode: bool = True
    ) -> None:
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
        self.fast: DecodeWeights | None = None  # built at the first decode step (fast_decode)
        self.fast_decode = fast_decode
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
        fast = self._fast(batch) if new == 1 and self.length > 0 else None
        for i, layer in enumerate(base.layers):
            attn = layer.self_attn
            q, k, v = self._qkv(i, layer, self._norm(layer.input_layernorm, hidden, fast), fast, cos, sin)
            cache_k[i, :, :, start:end] = k
            cache_v[i, :, :, start:end] = v
            out = F.scaled_dot_product_attention(
                q,
                cache_k[i, :, :, :end],
                cache_v[i, :, :, :end],
                attn_mask=mask,
                scale=attn.scaling,
                enable_gqa=True,
            )
            hidden = self._rest(i, layer, hidden, out.transpose(1, 2).reshape(batch, new, -1), fast)
        self.length = end
        return self._logits(self._norm(base.norm, hidden[:, -1:], fast), fast)[:, -1].float()

    def _fast(self, rows: int) -> DecodeWeights | None:
        """The decode step's weights (:class:`DecodeWeights`), built on the first call; none under
        autocast (its products follow autocast's casting rules, the packed ones would not)."""
        if torch.is_autocast_enabled(self.device.type):
            return None
        if self.fast is None and self.fast_decode:
            self.fast = DecodeWeights.build(self.model, rows)
            self.fast_decode = self.fast is not None
        return self.fast

    def _qkv(
        self, i: int, layer: Any, x: Tensor, fast: DecodeWeights | None, cos: Tensor, sin: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Queries and keys (rotary positions applied) and values ``[B, heads, new, head_dim]`` of layer
        ``i`` for its normed input ``x``. The fast path rotates queries and keys as one tensor."""
        attn = layer.self_attn
        batch, new = x.shape[:2]
        if fast is None:
            q, k, v = (
                p(x).view(batch, new, -1, attn.head_dim).transpose(1, 2)
                for p in (attn.q_proj, attn.k_proj, attn.v_proj)
            )
            return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v
        q_width, k_width, _ = fast.qkv_sizes
        out = fast.layers[i][0](x)
        qk = out[..., : q_width + k_width].view(batch, new, -1, attn.head_dim).transpose(1, 2)
        qk = qk * cos + _rotate_half(qk) * sin
        heads = q_width // attn.head_dim
        v = out[..., q_width + k_width :].view(batch, new, -1, attn.head_dim).transpose(1, 2)
        return qk[:, :heads], qk[:, heads:], v

    @staticmethod
    def _norm(norm: Any, hidden: Tensor, fast: DecodeWeights | None) -> Tensor:
        """An RMSNorm layer on ``hidden``: in the fast path as one fused ``F.rms_norm`` (the same
        formula), else the layer's own forward."""
        if fast is None or not fast.fused_norms:
            return norm(hidden)
        return F.rms_norm(hidden, hidden.shape[-1:], norm.weight, norm.variance_epsilon)

    def _rest(
        self, i: int, layer: Any, hidden: Tensor, attended: Tensor, fast: DecodeWeights | None
    ) -> Tensor:
        """The residual stream after layer ``i``'s output projection (of ``attended``) and its MLP."""
        if fast is None:
            hidden = hidden + layer.self_attn.o_proj(attended)
            return hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        _, o, gate_up, down = fast.layers[i]
        hidden = hidden + o(attended)
        gate, up = gate_up(self._norm(layer.post_attention_layernorm, hidden, fast)).chunk(2, -1)
        return hidden + down(layer.mlp.act_fn(gate) * up)

    def _logits(self, normed: Tensor, fast: DecodeWeights | None) -> Tensor:
        """The output layer on ``normed``; its forward hooks (the sampler's hidden-state tap) run either
        way."""
        if fast is None or fast.head is None:
            return self.head(normed)
        logits = fast.head(normed)
        for hook in self.head._forward_hooks.values():
            replaced = hook(self.head, (normed,), logits)
            logits = logits if replaced is None else replaced
        return logits

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
        fast = self._fast(batch)
        for i, layer in enumerate(base.layers):
            attn = layer.self_attn
            q, k, v = self._qkv(i, layer, self._norm(layer.input_layernorm, hidden, fast), fast, cos, sin)
            self.gen_k[i, :, :, t : t + 1] = k
            self.gen_v[i, :, :, t : t + 1] = v
            out = self._attend(q * attn.scaling, i, t + 1)
            hidden = self._rest(i, layer, hidden, out[:, None], fast)
        self.length += 1
        return self._logits(self._norm(base.norm, hidden, fast), fast)[:, -1].float()

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
