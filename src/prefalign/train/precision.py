"""Mixed precision (``--mixed-precision bf16|fp16``): autocast over float32 master weights.

The weights, their gradients and the optimiser state stay float32; inside :func:`autocast` the forward
passes (training, evaluation, sampling, old and reference log-probs: everything the outer loop runs)
compute the autocast-eligible operations (matrix products) in bfloat16 or float16. fp16's narrow range
needs a loss scale: :class:`LossScaler` multiplies the loss before the backward, unscales the gradients
before clipping, and skips a step whose gradients overflowed (counted in ``amp/skipped_steps``), halving
the scale; the scale is part of the run's state, so a resumed run continues exactly. This is not
``--dtype bfloat16``, which casts the weights themselves (no float32 copy at all).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor


def flushing_subnormals() -> bool:
    """Whether this thread reads subnormal floats as zero (the smallest positive float32, doubled, is 0)."""
    smallest = torch.ones(1, dtype=torch.int32).view(torch.float32)
    return bool((smallest * 2.0 == 0).item())


def flush_subnormals() -> None:
    """From here on, subnormal floats (below 1.2e-38 in float32) are read and written as zero, in this
    thread and in every thread it starts later: torch's intra-op threads inherit the mode when their pool
    is first created, so call it first thing in a script, before any parallel torch work (later, it
    reaches the calling thread only). It stays on for the process; :func:`subnormals_flushed` is the
    scoped form the command line and the training runs use.

    x86 CPUs compute on subnormal operands in microcode, 10-100x slower than on normal ones. They appear
    when a loss's gradient underflows: DPO at beta 5 gives pairs margins of tens of nats, sigmoid(-margin)
    falls below 1e-38, and every matrix product of that step's backward then runs on subnormals (one such
    step took 53 s instead of 5 here). A value that small carries nothing a float32 update can use."""
    torch.set_flush_denormal(True)


@contextmanager
def subnormals_flushed() -> Iterator[None]:
    """:func:`flush_subnormals` for the duration of the block; the calling thread gets its previous mode
    back after it (other code in the process, such as a test's float checks, may rely on IEEE subnormals).
    Threads the block started keep the mode."""
    was = flushing_subnormals()
    flush_subnormals()
    try:
        yield
    finally:
        if not was:
            torch.set_flush_denormal(False)


MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``--mixed-precision`` values and the autocast dtype of each."""


def autocast(mode: str, device: torch.device) -> Any:
    """The autocast context of ``mode`` on ``device`` (a no-op for ``no``).

    Its cache of cast weights is off: the context spans many optimiser steps (the whole run), and a
    cached half-precision copy would outlive the in-place update of its float32 weight (a resumed run,
    starting with an empty cache, then differs from an uninterrupted one)."""
    dtype = MIXED_PRECISION[mode]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=False)


class LossScaler:
    """fp16's dynamic loss scale around one optimiser step (inactive for ``no`` and ``bf16``).

    Args:
        mode: the ``--mixed-precision`` value.
        device: where the gradients live.
        state: the run's state dict; the scale is kept in ``state["grad_scaler"]`` (checkpointed with it)
            and the count of skipped steps in ``state["amp_skipped_steps"]``.
    """

    def __init__(self, mode: str, device: torch.device, state: dict[str, Any]) -> None:
        self.active = mode == "fp16"
        self.state = state
        self.scaler = torch.amp.GradScaler(device.type) if self.active else None
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])

    def scale(self, loss: Tensor) -> Tensor:
        """``loss`` times the current scale (unchanged when inactive)."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale(self, optimizer: Any) -> None:
        """Divide the gradients by the scale in place (before clipping and the gradient norm)."""
        if self.scaler is not None:
            self.scaler.unscale_(_inner(optimizer))

    def step(self, optimizer: Any, grad_norm: float) -> bool:
        """Step ``optimizer`` unless the gradients overflowed (``grad_norm``, of the unscaled gradients,
        is not finite: the scaler then skips the step and halves the scale); returns whether it stepped."""
        if self.scaler is None:
            optimizer.step()
            return True
        self.scaler.step(_inner(optimizer))  # (skips the step when unscale found an inf or a NaN)
        self.scaler.update()
        self.state["grad_scaler"] = self.scaler.state_dict()
        if not math.isfinite(grad_norm):
            self.state["amp_skipped_steps"] = self.state.get("amp_skipped_steps", 0) + 1
            return False
        return True

    def metrics(self) -> dict[str, float]:
        """``amp/scale`` and ``amp/skipped_steps`` (so far) for fp16; nothing otherwise."""
        if self.scaler is None:
            return {}
        return {
            "amp/scale": self.scaler.get_scale(),
            "amp/skipped_steps": self.state.get("amp_skipped_steps", 0),
        }


def _inner(optimizer: Any) -> Any:
    """The torch optimiser inside Accelerate's wrapper (the scaler keys its bookkeeping by it)."""
    return getattr(optimizer, "optimizer", optimizer)
