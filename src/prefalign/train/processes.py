"""The processes a run spans: the Accelerate accelerator, sharding, seeding, and sums over processes."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import Tensor


def make_accelerator() -> Any:
    """An Accelerate ``Accelerator`` for however the process was launched (plain, ``accelerate launch``,
    ``torchrun``): one CPU, one GPU, or many with DDP/FSDP/DeepSpeed."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:  # no dataloader goes through prepare(), so DeepSpeed cannot infer these
        ds = plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = 1  # its bookkeeping only: prefalign packs its own batches
        ds["gradient_accumulation_steps"] = 1  # one engine step per prefalign optimiser step
    return accelerator


def sharded(accelerator: Any) -> bool:
    """True under FSDP or DeepSpeed (``--launch-config``): the weights or optimiser state are split over
    the processes. Then the final model is gathered before saving; mid-run checkpoints (and so
    ``--resume``) are not written, since the optimiser state would need every process's shard."""
    return distributed_type(accelerator) in ("FSDP", "DEEPSPEED")


def distributed_type(accelerator: Any) -> str:
    """Accelerate's ``DistributedType`` name (``NO``, ``MULTI_GPU``, ``FSDP``, ``DEEPSPEED``, ...)."""
    kind = getattr(accelerator, "distributed_type", None)
    return getattr(kind, "name", str(kind))


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def sum_over_processes(accelerator: Any, *values: float | Tensor) -> list[float]:
    """Each of ``values`` (numbers or 0-d tensors) summed over every process, as floats: one all-reduce
    in float64, or none on one process."""
    if accelerator.num_processes == 1 or not values:
        return [float(v) for v in values]
    device = accelerator.device
    vec = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device).reshape(()) for v in values])
    return accelerator.reduce(vec, reduction="sum").cpu().tolist()
