"""Activation-memory savers for training: RMSNorm and SwiGLU that keep fewer tensors for backward.

Autograd through the stock RMSNorm keeps its input, the normalised input and the output; through the
SwiGLU MLP it keeps the gate, the up projection, ``silu(gate)`` and their product (the down
projection's input). The functions here keep only what the backward formula needs (RMSNorm: input and
``1/rms``; SwiGLU with its down projection: gate and up) and recompute the rest: 21% fewer saved
activation bytes per token on SmolLM2 (BENCHMARKS.md) at the same numerics (to float rounding). The same
idea as Liger Kernel's fused ops, written as plain PyTorch.

The vocabulary projection (:class:`HeadTokenLogps`) never holds the logits of all rows and the whole
vocabulary at once. The token embedding, the decoder's projections and the vocabulary projection can add
their weight gradients straight into ``.grad`` (:func:`accumulate_in_place`), which saves a fresh
gradient tensor and a second pass to add it, per weight and micro-batch.

The layers are swapped in one visible place, :class:`lean_layers` (a context manager that restores the
stock layers on exit; it lists what it covers and what each swap buys), and only modules whose
computation is known to match (Llama, Mistral, Qwen2/3, SmolLM); anything else is left as it is.
"""

from __future__ import annotations

import math
import types
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RMSNORM_CLASSES = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
SWIGLU_CLASSES = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})


def _upcast(x: Tensor) -> Tensor:
    """Half precision is normalised in float32 (as the stock layer does); float32/64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class RMSNormFunction(torch.autograd.Function):
    """``y = w * x / rms(x)`` with ``rms(x) = sqrt(mean(x^2) + eps)`` over the last dimension.

    Backward, with ``n = x / rms`` and ``g_n = g * w``: ``dx = (g_n - n * mean(g_n * n)) / rms`` and
    ``dw = sum(g * n)`` over all leading dimensions.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x32 = _upcast(x)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        x, weight, rstd = ctx.saved_tensors
        normed = _upcast(x) * rstd
        grad_w = (_upcast(grad) * normed).reshape(-1, normed.shape[-1]).sum(0).to(weight.dtype)
        grad_n = _upcast(grad * weight)
        grad_x = rstd * (grad_n - normed * (grad_n * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_w, None


class SiluMulFunction(torch.autograd.Function):
    """``silu(gate) * up``; backward recomputes ``sigmoid(gate)`` instead of storing ``silu(gate)``.

    ``d/d gate = g * up * s * (1 + gate * (1 - s))`` with ``s = sigmoid(gate)``; ``d/d up = g * silu(gate)``.
    """

    @staticmethod
    def forward(ctx: Any, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        gate, up = ctx.saved_tensors
        return _silu_grad(grad * up, gate), grad * F.silu(gate)


def _silu_grad(grad_silu: Tensor, gate: Tensor) -> Tensor:
    """``grad_silu * s * (1 + gate * (1 - s))``, ``s = sigmoid(gate)``, in one fused kernel (the same
    formula term by term took eight passes over the tensor: 16 ms against 2 ms at 1080 x 1536)."""
    return torch.ops.aten.silu_backward(grad_silu, gate)


class SwiGLUDownFunction(torch.autograd.Function):
    """``down(silu(gate) * up)`` for a bias-free ``down`` weight ``W`` (optionally with a LoRA adapter
    ``s (h A^T) B^T`` on it, no dropout): keeps ``gate`` and ``up`` only (and the adapter's rank-sized
    ``h A^T``).

    Through autograd the down projection would also keep its input ``h = silu(gate) * up`` (as large as
    ``gate``); here backward recomputes ``h`` from ``gate`` and ``up``: ``dW = g^T h``, ``dh = g W`` (plus
    ``s (g B) A``; ``dA = s (g B)^T h``, ``dB = s g^T (h A^T)``), then the SwiGLU derivatives of
    :class:`SiluMulFunction`.
    """

    @staticmethod
    def forward(
        ctx: Any, gate: Tensor, up: Tensor, weight: Tensor,
        a: Tensor | None = None, b: Tensor | None = None, scaling: float = 1.0,
    ) -> Tensor:  # fmt: skip
        h = F.silu(gate) * up
        out = F.linear(h, weight)
        low = None
        if a is not None:
            low = h.matmul(a.t())
            out.view(-1, out.shape[-1]).addmm_(low.reshape(-1, low.shape[-1]), b.t(), alpha=scaling)
        ctx.save_for_backward(gate, up, weight, a, b, low)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        gate, up, weight, a, b, low = ctx.saved_tensors
        silu = F.silu(gate)
        g = grad.reshape(-1, grad.shape[-1])
        need_w = ctx.needs_input_grad[2]
        lora = a is not None
        need_h = need_w or (lora and ctx.needs_input_grad[3])
        h = (silu * up).reshape(-1, gate.shape[-1]) if need_h else None
        grad_w = _weight_grad(weight, g, h) if need_w else None
        grad_h = g.matmul(weight.to(grad.dtype))  # (autocast: half-precision products, float32 weights)
        grad_a = grad_b = None
        if lora:
            g_low = g.mm(b.to(g.dtype)).mul_(ctx.scaling)
            grad_h.addmm_(g_low, a.to(g.dtype))
            grad_a = g_low.t().mm(h) if ctx.needs_input_grad[3] else None
            if ctx.needs_input_grad[4]:
                grad_b = g.t().mm(low.reshape(-1, low.shape[-1])).mul_(ctx.scaling)
        del h
        grad_h = grad_h.view(gate.shape)
        return _silu_grad(grad_h * up, gate), grad_h * silu, grad_w, grad_a, grad_b, None


GRAD_IN_PLACE = "_prefalign_grad_in_place"
"""Attribute set on parameters whose gradient the functions below may add straight into ``.grad``."""


def accumulate_in_place(params: list[nn.Parameter]) -> None:
    """Let the vocabulary projection, the token embedding and the decoder's projections (as swapped by
    :class:`lean_layers`, which marks and unmarks the parameters) add their weight gradients straight into these parameters'
    ``.grad`` (when it exists) instead of returning fresh tensors for autograd to add: for SmolLM2's tied
    embedding alone that is two 113 MB temporaries per micro-batch, zero-filled, then added twice. Only
    for single-process training that keeps ``.grad`` allocated: DDP's reducer waits for each parameter's
    gradient to arrive through autograd, so it must not be used there."""
    for p in params:
        setattr(p, GRAD_IN_PLACE, True)


def _in_place_target(weight: Tensor) -> Tensor | None:
    grad = weight.grad if getattr(weight, GRAD_IN_PLACE, False) else None
    return grad if grad is not None and grad.shape == weight.shape else None


def _weight_grad(weight: Tensor, grad_out: Tensor, inputs: Tensor) -> Tensor | None:
    """``grad_out^T @ inputs`` (2-D), added into ``weight.grad`` (returning ``None``) where allowed.

    Under autocast (``--mixed-precision``) the product runs in the half precision of ``grad_out`` and is
    added into the float32 gradient (a gradient returned instead is cast by autograd)."""
    inputs = inputs.to(grad_out.dtype)  # (a no-op without autocast)
    into = _in_place_target(weight)
    if into is None:
        return grad_out.t().mm(inputs)
    if into.dtype != grad_out.dtype:
        into.add_(grad_out.t().mm(inputs).to(into.dtype))
    else:
        into.addmm_(grad_out.t(), inputs)
    return None


class LinearFunction(torch.autograd.Function):
    """A bias-free ``x @ weight^T`` whose weight gradient, under :func:`accumulate_in_place`, is
    accumulated into ``weight.grad`` by the matrix product itself (no fresh gradient, then a second pass
    to add it); the saved tensors are those of ``F.linear``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = grad.matmul(weight.to(grad.dtype)) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(weight, grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1]))
        return grad_x, grad_w


class LoRALinearFunction(torch.autograd.Function):
    """``x W^T + b + s (x_d A^T) B^T`` (a LoRA adapter over a linear layer; ``x_d`` is ``x`` after the
    adapter's dropout, or ``x`` itself) with no elementwise pass over the output: the adapter's product
    is added into the base product by the matrix product itself (``addmm_``), and backward adds the
    adapter's share of the input gradient the same way. Through autograd the same layer takes an extra
    output-sized product, scaling and sum in each direction. Keeps ``x``, ``x_d`` and the rank-sized
    ``x_d A^T``; a frozen ``W`` gets no gradient (nor any in-place accumulation)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        x_d: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        a: Tensor,
        b: Tensor,
        scaling: float,
    ) -> Tensor:
        low = x_d.matmul(a.t())  # [..., r]
        out = F.linear(x, weight, bias)
        flat = out.view(-1, out.shape[-1])
        flat.addmm_(low.reshape(-1, low.shape[-1]), b.t(), alpha=scaling)
        ctx.save_for_backward(x, x_d, weight, a, b, low)
        ctx.scaling, ctx.has_bias, ctx.same = scaling, bias is not None, x_d is x
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, x_d, weight, a, b, low = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        low = low.reshape(-1, low.shape[-1])
        need_x, need_xd, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:6]
        g_low = g.mm(b.to(g.dtype)).mul_(s)  # d loss / d (x_d A^T): [n, r]
        grad_x = grad_xd = None
        if need_x:
            grad_x = g.mm(weight.to(g.dtype))
            if ctx.same:  # no dropout: the adapter's input is x itself
                grad_x.addmm_(g_low, a.to(g.dtype))
            grad_x = grad_x.view(*grad.shape[:-1], -1)
        if need_xd and not ctx.same:
            grad_xd = g_low.mm(a.to(g.dtype)).view(*grad.shape[:-1], -1)
        grad_w = _weight_grad(weight, g, x.reshape(-1, x.shape[-1])) if need_w else None
        grad_bias = g.sum(0) if need_bias and ctx.has_bias else None
        grad_a = g_low.t().mm(x_d.reshape(-1, x_d.shape[-1])) if need_a else None
        grad_b = g.t().mm(low).mul_(s) if need_b else None
        return grad_x, grad_xd, grad_w, grad_bias, grad_a, grad_b, None


class HeadTokenLogps(torch.autograd.Function):
    """``log softmax(hidden @ weight^T)[target]`` per row, a slice of the vocabulary at a time.

    The vocabulary projection's output (rows x vocabulary, float32) is the largest tensor of a training
    step on a small model, and its backward needs two more of it. Here only ``chunk`` columns of logits
    exist at once: forward keeps ``hidden`` and the log-normaliser per row (an online log-sum-exp over the
    slices); backward recomputes each slice's logits (one more pass of the projection, a few per cent of a
    step), with ``d logp / d logits = onehot(target) - softmax(logits)``, and writes each slice of the
    weight gradient once (into ``weight.grad`` directly under :func:`accumulate_in_place`).
    """

    @staticmethod
    def forward(
        ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, lse: Tensor | None = None
    ) -> Tensor:
        if lse is None:
            out, lse, _ = head_logps(hidden, weight, targets, chunk)
        else:  # the rows' log-normalisers are known: only their target logits are computed (NaN: unknown)
            out, lse = known_lse_logps(hidden, weight, targets, chunk, lse)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        into = _in_place_target(weight) if need_w else None
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.empty_like(weight) if need_w and into is None else None
        g = grad.float()[:, None]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        for start in range(0, weight.shape[0], ctx.chunk):
            w = weight[start : start + ctx.chunk]
            probs = (F.linear(hidden, w).float() - lse[:, None]).exp_()
            dlogits = probs.mul_(-g)  # -g * softmax, in place
            hit = (targets >= start) & (targets < start + w.shape[0])
            dlogits[rows[hit], targets[hit] - start] += g[hit, 0]  # + g at the target
            dlogits = dlogits.to(hidden.dtype)
            if need_h:
                grad_h.addmm_(dlogits, w)
            if into is not None:
                into[start : start + w.shape[0]].addmm_(dlogits.t(), hidden)
            elif grad_w is not None:
                torch.mm(dlogits.t(), hidden, out=grad_w[start : start + w.shape[0]])
        return grad_h, grad_w, None, None, None


def target_logits(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """``(hidden @ weight^T)[row, targets[row]]`` per row in float32, one dot product each (no pass over the
    vocabulary): the arithmetic by which the sampler's log-normalisers are read and the update's target
    logits are computed, so that equal hidden states give equal numbers."""
    return torch.einsum("nh,nh->n", hidden, weight.index_select(0, targets)).float()


def known_lse_logps(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, lse: Tensor
) -> tuple[Tensor, Tensor]:
    """Without gradients: :func:`head_logps`' log-probs and log-normalisers where each row's
    log-normaliser ``lse`` is already known (the sampler's, for the same weights), so only the target's
    logit is computed (a dot product per row, not a pass over the vocabulary); rows whose ``lse`` is NaN
    get the full computation."""
    with torch.no_grad():
        picked = target_logits(hidden, weight, targets)
        lse = lse.to(picked.dtype).clone()
        unknown = torch.isnan(lse).nonzero().squeeze(-1)
        if len(unknown):
            _, lse[unknown], _ = head_logps(hidden[unknown], weight, targets[unknown], chunk)
        return picked - lse, lse


def head_logps(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, entropy: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Without gradients: per row, the log-prob of ``targets`` under ``hidden @ weight^T``, the
    log-normaliser, and (``entropy``) the distribution's entropy, ``chunk`` vocabulary entries at a time
    with a running log-sum-exp. The arithmetic of :class:`HeadTokenLogps`' forward, and each row's
    numbers do not depend on the other rows, so any two passes over the same row agree exactly."""
    with torch.no_grad():
        n = hidden.shape[0]
        top = torch.full((n,), -math.inf, device=hidden.device)
        total = torch.zeros(n, device=hidden.device)
        picked = torch.zeros(n, device=hidden.device)
        weighted = torch.zeros(n, device=hidden.device) if entropy else None
        rows = torch.arange(n, device=hidden.device)
        for start in range(0, weight.shape[0], chunk):
            logits = F.linear(hidden, weight[start : start + chunk]).float()
            new_top = torch.maximum(top, logits.amax(-1))
            rescale = (top - new_top).exp_()  # exp(-inf) = 0 on the first slice
            exps = (logits - new_top[:, None]).exp_()
            total = total.mul_(rescale).add_(exps.sum(-1))
            if weighted is not None:  # sum of exp(logit - top) * logit, for the entropy
                weighted = weighted.mul_(rescale).add_((exps * logits).sum(-1))
            top = new_top
            hit = (targets >= start) & (targets < start + logits.shape[1])
            picked[hit] = logits[rows[hit], targets[hit] - start]
        lse = top + total.log()
        ent = lse - weighted / total if weighted is not None else None
    return picked - lse, lse, ent


HEAD_CHUNK = 4096
"""Vocabulary entries :class:`HeadTokenLogps` projects at once (a 384-row micro-batch: 6 MiB of float32
logits, where the whole 49,152-entry SmolLM2 vocabulary would take 72 MiB, plus as much again in backward)."""


class EmbeddingFunction(torch.autograd.Function):
    """``weight[ids]`` whose weight gradient, under :func:`accumulate_in_place`, is added row by row into
    ``weight.grad`` (no vocabulary-sized temporary); otherwise the usual dense gradient. Rows of
    ``padding_idx`` get no gradient, as with ``nn.Embedding``."""

    @staticmethod
    def forward(ctx: Any, ids: Tensor, weight: Tensor, padding_idx: int | None) -> Tensor:
        ctx.save_for_backward(ids, weight)
        ctx.padding_idx = padding_idx
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor | None, None]:
        ids, weight = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None
        flat_ids, rows = ids.reshape(-1), grad.reshape(-1, weight.shape[1])
        if ctx.padding_idx is not None:
            keep = flat_ids != ctx.padding_idx
            flat_ids, rows = flat_ids[keep], rows[keep]
        into = _in_place_target(weight)
        if into is not None:
            into.index_add_(0, flat_ids, rows.to(into.dtype))
            return None, None, None
        return None, torch.zeros_like(weight).index_add_(0, flat_ids, rows.to(weight.dtype)), None


FUSED_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
"""Model types whose logits are exactly ``lm_head(final hidden state)`` (no scaling or soft-capping)."""


def plain_lm_head(model: nn.Module) -> nn.Linear | None:
    """The model's bias-free linear vocabulary projection, if its logits are nothing more than that;
    ``None`` otherwise (unknown architectures, LoRA on the head). Looks through DDP and PEFT wrappers."""
    inner = getattr(model, "module", model)
    config = getattr(inner, "config", None)
    if getattr(config, "model_type", None) not in FUSED_HEAD_TYPES:
        return None
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    return head if type(head) is nn.Linear and head.bias is None else None


class hidden_instead_of_logits:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Within the block, ``head`` returns its input: the model's ``logits`` output is then the final
    hidden state at the kept positions, to be projected by :class:`HeadTokenLogps`. The model is still
    called as a whole (so DDP and hooks see an ordinary forward)."""

    def __init__(self, head: nn.Module) -> None:
        self.head = head

    def __enter__(self) -> None:
        self.head.forward = _identity  # type: ignore[method-assign]

    def __exit__(self, *exc: Any) -> None:
        del self.head.forward


def _identity(x: Tensor) -> Tensor:
    return x


def _rmsnorm_forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def _swiglu_forward(self: nn.Module, x: Tensor) -> Tensor:
    gate, up, down = self.gate_proj(x), self.up_proj(x), self.down_proj
    if type(down) is nn.Linear and down.bias is None:  # not a LoRA-wrapped or biased projection
        return SwiGLUDownFunction.apply(gate, up, down.weight)
    found = _one_adapter(down, gate)
    if found is not None and found[1] is not None and found[1].dropout is None and found[0].bias is None:
        base, adapter = found  # (a LoRA down projection without dropout: h recomputed in backward too)
        return SwiGLUDownFunction.apply(gate, up, base.weight, adapter.a, adapter.b, adapter.scaling)
    return down(SiluMulFunction.apply(gate, up))


class LoRAAdapter(NamedTuple):
    """One plain LoRA adapter of a layer: ``x -> scaling * (dropout(x) A^T) B^T``."""

    a: Tensor
    b: Tensor
    scaling: float
    dropout: nn.Module | None
    """``None`` where dropout does nothing now (identity, p = 0 or eval mode)."""


def lora_adapters(module: nn.Module) -> tuple[nn.Linear, list[LoRAAdapter]] | None:
    """For a peft LoRA ``Linear`` over a plain ``nn.Linear``: its base layer and the adapters acting on
    it now (none while adapters are disabled or merged into the base). ``None`` for any other module, or
    where an active adapter is not plain LoRA (DoRA or another variant, a bias on A or B, a transposed
    base): the caller then runs the module's own forward. The one reading of peft's layer state, for
    training (:func:`_lora_linear_forward`) and for decoding (:func:`prefalign.decoding.linear_parts`)."""
    if not _is_lora_linear(module) or getattr(module, "fan_in_fan_out", False):
        return None
    base = module.base_layer
    if module.disable_adapters or module.merged:
        return base, []
    adapters = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if (
            name in getattr(module, "lora_variant", {})
            or getattr(module, "use_dora", {}).get(name)
            or getattr(module, "lora_bias", {}).get(name)
        ):
            return None
        a, b = module.lora_A[name], module.lora_B[name]
        if type(a) is not nn.Linear or type(b) is not nn.Linear or a.bias is not None or b.bias is not None:
            return None
        dropout = module.lora_dropout[name]
        idle = isinstance(dropout, nn.Identity) or (
            isinstance(dropout, nn.Dropout) and (dropout.p == 0 or not dropout.training)
        )
        adapters.append(
            LoRAAdapter(a.weight, b.weight, float(module.scaling[name]), None if idle else dropout)
        )
    return base, adapters


def _one_adapter(module: nn.Module, x: Tensor) -> tuple[nn.Linear, LoRAAdapter | None] | None:
    """The lean training path's view of a LoRA layer about to run on ``x``: ``(base, None)`` with its
    adapters off, ``(base, adapter)`` with one plain adapter in ``x``'s dtype, else ``None`` (several
    adapters, other dtypes, autocast, anything :func:`lora_adapters` declines)."""
    found = lora_adapters(module)
    if found is None or torch.is_autocast_enabled(x.device.type):
        return None
    base, adapters = found
    if not adapters:
        return base, None
    if len(adapters) != 1:
        return None
    adapter = adapters[0]
    if not (x.dtype == adapter.a.dtype == adapter.b.dtype == base.weight.dtype):
        return None
    return base, adapter


def _lora_linear_forward(self: nn.Module, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    found = None if args or kwargs else _one_adapter(self, x)
    if found is None:
        return type(self).forward(self, x, *args, **kwargs)
    base, adapter = found
    if adapter is None:
        return base(x)
    x_d = x if adapter.dropout is None else adapter.dropout(x)
    return LoRALinearFunction.apply(x, x_d, base.weight, base.bias, adapter.a, adapter.b, adapter.scaling)


def _embedding_forward(self: nn.Embedding, ids: Tensor) -> Tensor:
    return EmbeddingFunction.apply(ids, self.weight, self.padding_idx)


def _linear_forward(self: nn.Linear, x: Tensor) -> Tensor:
    return LinearFunction.apply(x, self.weight)


def _is_lora_linear(module: nn.Module) -> bool:
    """A peft LoRA ``Linear`` (not a subclass for quantised bases) over a plain ``nn.Linear``."""
    return (
        type(module).__name__ == "Linear"
        and type(module).__module__.startswith("peft.tuners.lora")
        and type(getattr(module, "base_layer", None)) is nn.Linear
    )


def _patch_targets(model: nn.Module) -> list[tuple[nn.Module, Any]]:
    """The modules :class:`lean_layers` swaps, each with its lean forward (see its docstring)."""
    targets: list[tuple[nn.Module, Any]] = []
    inner = getattr(model, "module", model)
    embedding = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
    if (
        getattr(getattr(inner, "config", None), "model_type", None) in FUSED_HEAD_TYPES
        and type(embedding) is nn.Embedding
        and embedding.max_norm is None
        and not embedding.scale_grad_by_freq
        and not embedding.sparse
    ):
        targets.append((embedding, _embedding_forward))
        head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
        for module in inner.modules():  # the decoder's projections (not the vocabulary head)
            if type(module) is nn.Linear and module.bias is None and module is not head:
                targets.append((module, _linear_forward))
    for module in model.modules():
        name = type(module).__name__
        if _is_lora_linear(module):  # (any architecture: the function is the layer's own arithmetic)
            targets.append((module, _lora_linear_forward))
        elif name in RMSNORM_CLASSES and hasattr(module, "variance_epsilon"):
            targets.append((module, _rmsnorm_forward))
        elif name in SWIGLU_CLASSES and type(getattr(module, "act_fn", None)).__name__ in (
            "SiLU",
            "SiLUActivation",
        ):
            targets.append((module, _swiglu_forward))
    return targets


class lean_layers:  # noqa: N801 - a context manager, like torch.no_grad
    """Within the block, ``model``'s layers run through the lean functions of this module; on the way
    out (also on an error or Ctrl-C) every module has its stock forward again and no parameter keeps a
    ``_prefalign_*`` attribute. Both training loops enter it in one place,
    :func:`prefalign.train.driver.train_steps`.

    What is swapped (the module's ``forward``, as an instance attribute, removed on exit):

    - every RMSNorm of the classes in :data:`RMSNORM_CLASSES` (:class:`RMSNormFunction`: keeps the input
      and ``1/rms`` for backward);
    - every SwiGLU MLP of the classes in :data:`SWIGLU_CLASSES` (:class:`SwiGLUDownFunction`: keeps gate
      and up only);
    - in a model of :data:`FUSED_HEAD_TYPES`, the token embedding (:class:`EmbeddingFunction`) and every
      bias-free ``nn.Linear`` but the vocabulary head (:class:`LinearFunction`): the same numbers, with
      weight gradients that can go straight into ``.grad``;
    - in any model, every peft LoRA ``Linear`` over a plain linear layer (:class:`LoRALinearFunction`: the
      adapter's product added into the base product, no output-sized elementwise passes; a SwiGLU's
      LoRA down projection goes through :class:`SwiGLUDownFunction` with its adapter, so ``h`` is not
      kept). With its adapters off it runs the base layer alone; where the lean path does not apply
      at call time (several active adapters, DoRA, autocast) the module runs its own forward;

    and ``grads_in_place`` parameters are marked for :func:`accumulate_in_place` (single-process runs
    that keep ``.grad`` allocated). With ``release_every = k``, every k-th decoder layer (the first
    included) returns freed memory to the OS (:func:`release_freed_memory`) after its forward while
    gradients are being recorded: the forward's temporaries, freed between the activations it keeps,
    otherwise stay in glibc's heap until the step ends. The online methods use k = 6: GRPO with LoRA at
    the short benchmark shape peaked at 3.13 GB without it, 2.42 GB with it (2.33 GB at k = 1), for a
    few per cent more time in the update (the released pages are faulted in again). What it buys, as BENCHMARKS.md records for SmolLM2: 21% fewer saved
    activation bytes per token from RMSNorm/SwiGLU (611 -> 486 MB for 405 tokens; the SwiGLU change took
    the DPO benchmark's peak from 3.76 to 3.74 GB); weight gradients added in place took one DPO step's
    three micro-batches from 3.46 to 3.03 s (peak of that script 2134 -> 1869 MB), and the decoder
    projections through :class:`LinearFunction` from 3.03 to 2.81 s per step.

    Attributes:
        patched: how many modules were swapped (while inside the block).
    """

    def __init__(
        self, model: nn.Module, grads_in_place: list[nn.Parameter] | tuple = (), release_every: int = 0
    ) -> None:
        self.model = model
        self.grads_in_place = list(grads_in_place)
        self.release_every = release_every
        self._saved: list[tuple[nn.Module, Any]] = []
        self._hooks: list[Any] = []
        self.patched = 0

    def __enter__(self) -> lean_layers:
        for module, forward in _patch_targets(self.model):
            self._saved.append((module, module.__dict__.get("forward")))
            module.forward = types.MethodType(forward, module)
        self.patched = len(self._saved)
        accumulate_in_place(self.grads_in_place)
        if self.release_every > 0:
            layers = [m for m in self.model.modules() if type(m).__name__.endswith("DecoderLayer")]
            for layer in layers[:: self.release_every]:
                self._hooks.append(layer.register_forward_hook(_release_while_training))
        return self

    def __exit__(self, *exc: Any) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for module, previous in reversed(self._saved):
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        self._saved = []
        for p in self.grads_in_place:
            if hasattr(p, GRAD_IN_PLACE):
                delattr(p, GRAD_IN_PLACE)


def _release_while_training(module: nn.Module, args: Any, output: Any) -> None:
    if torch.is_grad_enabled():
        release_freed_memory()


def _libc() -> Any:
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def release_freed_memory() -> bool:
    """Hand memory that glibc keeps after tensors are freed back to the OS (Linux; a no-op elsewhere).

    After the first large block is freed, glibc serves later tensors from its heap, which it rarely
    shrinks: a training step's activations and gradients stay in the resident set after they die, and the
    next step's peak stacks on top of them. ``malloc_trim`` after each optimiser step returns those pages
    at the cost of a few milliseconds. The online methods (PPO, GRPO, RLOO) call it: their gradients and
    sampling buffers come and go each iteration. The offline loop does not: with its gradients kept in
    one buffer the peak is the same without it, and the next step would fault the pages back in (with it,
    the DPO benchmark's whole run took 39.9 s instead of 38.5 s at the same peak, BENCHMARKS.md).

    Returns:
        True when memory was released.
    """
    if _LIBC is None or not hasattr(_LIBC, "malloc_trim"):
        return False
    return bool(_LIBC.malloc_trim(0))
