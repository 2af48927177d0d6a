"""Activation-memory savers for training: RMSNorm and SwiGLU that keep fewer tensors for backward.

Autograd through the stock RMSNorm keeps its input, the normalised input and the output; through the
SwiGLU MLP it keeps the gate, the up projection, ``silu(gate)`` and their product (the down
projection's input). The functions here keep only what the backward formula needs (RMSNorm: input and
``1/rms``; SwiGLU with its down projection: gate and up) and recompute the rest, about a third less
activation memory for a Llama-style decoder at the same numerics (to float rounding). The same idea as Liger Kernel's fused ops, written as plain PyTorch.

Only modules whose computation is known to match are patched (Llama, Mistral, Qwen2/3, SmolLM);
anything else is left as it is.
"""

from __future__ import annotations

import types
from typing import Any

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
        sig = torch.sigmoid(gate)
        grad_gate = grad * up * sig * (1 + gate * (1 - sig))
        return grad_gate, grad * gate * sig


class SwiGLUDownFunction(torch.autograd.Function):
    """``down(silu(gate) * up)`` for a bias-free ``down`` weight ``W``: keeps ``gate`` and ``up`` only.

    Through autograd the down projection would also keep its input ``h = silu(gate) * up`` (as large as
    ``gate``); here backward recomputes ``h`` from ``gate`` and ``up``: ``dW = g^T h``, ``dh = g W``, then
    the SwiGLU derivatives of :class:`SiluMulFunction`.
    """

    @staticmethod
    def forward(ctx: Any, gate: Tensor, up: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up, weight)
        return F.linear(F.silu(gate) * up, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        gate, up, weight = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        silu = gate * sig
        grad_w = None
        if ctx.needs_input_grad[2]:
            h = silu * up
            grad_w = grad.reshape(-1, grad.shape[-1]).t().mm(h.reshape(-1, h.shape[-1]))
            del h
        grad_h = grad.matmul(weight)
        grad_gate = grad_h * up * sig * (1 + gate * (1 - sig))
        return grad_gate, grad_h * silu, grad_w


class HeadTokenLogps(torch.autograd.Function):
    """``log softmax(hidden @ weight^T)[target]`` per row, a chunk of rows at a time.

    The vocabulary projection's output (rows x vocabulary, float32) is the largest tensor of a training
    step on a small model, and its backward needs two more of it. Here only ``chunk`` rows of logits exist
    at once: forward keeps ``hidden`` and the log-normaliser per row; backward recomputes each chunk's
    logits (one more pass of the projection, a few per cent of a step), with
    ``d logp / d logits = onehot(target) - softmax(logits)``.
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
        out, lse, _ = head_logps(hidden, weight, targets, chunk)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        for i in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[i : i + ctx.chunk]
            g = grad[i : i + ctx.chunk].float()
            probs = (F.linear(h, weight).float() - lse[i : i + ctx.chunk, None]).exp_()
            dlogits = probs.mul_(-g[:, None])  # -g * softmax, in place
            dlogits.scatter_add_(-1, targets[i : i + ctx.chunk, None], g[:, None])  # + g at the target
            dlogits = dlogits.to(hidden.dtype)
            if need_h:
                grad_h[i : i + ctx.chunk] = dlogits.mm(weight)
            if need_w:
                grad_w.addmm_(dlogits.t(), h)
        return grad_h, grad_w, None, None


def head_logps(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, entropy: bool = False
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Without gradients: per row, the log-prob of ``targets`` under ``hidden @ weight^T``, the
    log-normaliser, and (``entropy``) the distribution's entropy, ``chunk`` rows at a time. The
    arithmetic of :class:`HeadTokenLogps`' forward, so the two agree exactly on the same rows."""
    with torch.no_grad():
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        ent = torch.empty_like(out) if entropy else None
        for i in range(0, hidden.shape[0], chunk):
            logits = F.linear(hidden[i : i + chunk], weight).float()
            lse[i : i + chunk] = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(-1, targets[i : i + chunk].unsqueeze(-1)).squeeze(-1)
            out[i : i + chunk] = picked - lse[i : i + chunk]
            if ent is not None:  # H = lse - sum(p * logits)
                probs = (logits - lse[i : i + chunk, None]).exp_()
                ent[i : i + chunk] = lse[i : i + chunk] - (probs * logits).sum(-1)
    return out, lse, ent


HEAD_CHUNK = 128
"""Rows of logits :class:`HeadTokenLogps` holds at once (128 x 49,152 float32 = 24 MiB for SmolLM2)."""

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
    return down(SiluMulFunction.apply(gate, up))


def use_memory_efficient_layers(model: nn.Module) -> int:
    """Patch every recognised RMSNorm and SwiGLU MLP of ``model`` in place; returns how many were patched."""
    patched = 0
    for module in model.modules():
        name = type(module).__name__
        if name in RMSNORM_CLASSES and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rmsnorm_forward, module)
            patched += 1
        elif name in SWIGLU_CLASSES and type(getattr(module, "act_fn", None)).__name__ in (
            "SiLU",
            "SiLUActivation",
        ):
            module.forward = types.MethodType(_swiglu_forward, module)
            patched += 1
    return patched


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
    at the cost of a few milliseconds (measured on the DPO benchmark in BENCHMARKS.md).

    Returns:
        True when memory was released.
    """
    if _LIBC is None or not hasattr(_LIBC, "malloc_trim"):
        return False
    return bool(_LIBC.malloc_trim(0))
