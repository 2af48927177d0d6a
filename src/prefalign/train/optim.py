"""The optimiser, its learning-rate schedule, gradient clipping and the gradient buffers of a run."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from prefalign.train.options import TrainOptions
from prefalign.train.processes import sharded


def make_optimizer(params: list[nn.Parameter], config: TrainOptions) -> torch.optim.Optimizer:
    """AdamW (fused kernel where available) or RMSprop over the trainable parameters."""
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=config.lr, weight_decay=config.weight_decay)
    try:
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def lr_lambda(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimiser step ``step`` (0-based).

    Linear warm-up from 1/(warmup+1) to 1 over ``warmup`` steps, then constant, linear or cosine decay to 0
    at ``total``.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainOptions, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The warm-up and decay of :func:`lr_lambda` over ``total`` optimiser steps."""
    warmup = config.warmup_steps or int(config.warmup_ratio * total)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, total, warmup, config.lr_schedule)
    )


def contiguous_gradients(params: list[nn.Parameter]) -> int:
    """Give every parameter a zeroed ``.grad`` that is a view into one buffer per dtype and device; returns
    the number of elements.

    Gradients then stay allocated for the whole run (zeroed in place after each step) instead of being
    allocated piece by piece during each backward, in between the activations, which fragments the heap:
    on the DPO benchmark this lowers the peak resident set by about 80 MB at no cost in time.
    """
    groups: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
    for p in params:
        groups.setdefault((p.dtype, p.device), []).append(p)
    total = 0
    for (dtype, device), group in groups.items():
        flat = torch.zeros(sum(p.numel() for p in group), dtype=dtype, device=device)
        offset = 0
        for p in group:
            p.grad = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        total += offset
    return total


def clip_gradients(accelerator: Any, model: nn.Module, max_norm: float) -> float:
    """The gradient norm before clipping; gradients are scaled to ``max_norm`` when above it (0: never)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm and max_norm > 0 and (sharded(accelerator) or accelerator.scaler is not None):
        return float(accelerator.clip_grad_norm_(params, max_norm))  # (shards, or loss-scaled gradients)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if max_norm and max_norm > 0 and norm > max_norm:  # (below it, scaling by 1 would change nothing)
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)
