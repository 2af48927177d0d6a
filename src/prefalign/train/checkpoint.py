"""Checkpoints: written atomically with a manifest (size and SHA-256 of every file), refused when damaged
(falling back to the previous whole one), loaded for an exact resume (weights, optimiser, schedule and
every process's random generators), pruned; and the run's final model folder."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from prefalign.config import ConfigError, save_config
from prefalign.train.processes import sharded

log = logging.getLogger(__name__)


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


CHECKPOINT_NAME = re.compile(r"step-(\d+)")
"""A finished checkpoint folder's name; anything else under ``checkpoints/`` (``step-7.tmp``) is ignored."""

MANIFEST = "manifest.json"
"""Size and SHA-256 of every file of a checkpoint, written last: a checkpoint whose files do not match it
is refused."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)  # (hashlib releases the GIL on large blocks: other threads run meanwhile)
    return digest.hexdigest()


class _HashingWriter(io.RawIOBase):
    """A binary file that hashes what is written to it on a thread of its own: each block is queued to
    the hasher (in order) and written at once, so the checksum of a gigabyte of optimiser state costs
    about nothing beyond the write itself, instead of reading the file back. ``hexdigest()`` waits for
    the queue to drain."""

    def __init__(self, file: Any) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.file, self.digest = file, hashlib.sha256()
        self.hasher = ThreadPoolExecutor(max_workers=1)  # one worker: blocks are hashed in write order
        self.pending: list[Any] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        # A large block is a tensor's own storage, unchanged while the checkpoint is written; a small one
        # may be a buffer the serialiser reuses after this call returns, so it is hashed from a copy.
        block = view if view.nbytes >= 1 << 20 else bytes(view)
        self.pending.append(self.hasher.submit(self.digest.update, block))
        self.file.write(view)
        return view.nbytes

    def hexdigest(self) -> str:
        for done in self.pending:
            done.result()
        self.hasher.shutdown()
        return self.digest.hexdigest()


def _rng_state() -> dict[str, Any]:
    """Every random generator the loop touches, as plain JSON (no pickles)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": {"name": name, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    tokenizer: Any = None,
    config: Any = None,
    extra: dict[str, nn.Module] | None = None,
    rng_states: list[dict[str, Any]] | None = None,
) -> None:
    """Write a resumable checkpoint atomically (a temporary folder, then one rename).

    The folder is a Hugging Face model folder (``from_pretrained`` loads it; for a LoRA model it holds the
    adapter), plus the tokenizer, the resolved ``config.yaml``, ``state.pt`` (optimiser and scheduler
    state: tensors and plain values only, loaded with ``weights_only=True``), ``rng.json`` (every random
    generator's state, one entry per process: ``rng_states`` as gathered from all processes, by default
    this process's own), ``trainer_state.json`` and ``manifest.json`` (size and SHA-256 of each file,
    written last). LoRA checkpoints also keep ``trainable.safetensors``, the trainable weights under their
    in-memory names, which is what resuming reads. Each ``extra`` module (e.g. PPO's critic) is saved as
    ``<name>.safetensors``.
    """
    from concurrent.futures import ThreadPoolExecutor

    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with ThreadPoolExecutor(max_workers=1) as pool:
        model.save_pretrained(str(tmp), safe_serialization=True)
        # the weights are hashed on this pool's thread while the optimiser state is written (here) and
        # hashed (on the writer's own thread)
        hashed = {p: pool.submit(_sha256, p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        if hasattr(model, "peft_config"):
            save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        for name, module in (extra or {}).items():
            save_file(
                {k: v.detach().contiguous() for k, v in module.state_dict().items()},
                str(tmp / f"{name}.safetensors"),
            )
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if config is not None:
            save_config(config, tmp / "config.yaml")
        crc = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)  # (the manifest's SHA-256 covers it; 3x faster)
        try:
            with (tmp / "state.pt").open("wb") as f:
                writer = _HashingWriter(f)
                torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, writer)
        finally:
            torch.serialization.set_crc32_options(crc)
        (tmp / "rng.json").write_text(json.dumps({"processes": rng_states or [_rng_state()]}))
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        digests = {p: future.result() for p, future in hashed.items()}
        digests[tmp / "state.pt"] = writer.hexdigest()
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {
        str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": digests.get(p) or _sha256(p)}
        for p in files
    }
    (tmp / MANIFEST).write_text(json.dumps({"files": manifest}, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from (naming the damaged file), or ``None`` when it is whole."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"{folder}: no {MANIFEST} (an unfinished checkpoint, or one written by an older version)"
    except (ValueError, KeyError, TypeError):
        return f"{folder}/{MANIFEST}: damaged"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{path}: {size} bytes, expected {expected['bytes']} (truncated or replaced)"
        if _sha256(path) != expected["sha256"]:
            return f"{path}: checksum does not match the checkpoint's manifest (damaged or replaced)"
    return None


def checkpoint_folders(output: Path) -> list[Path]:
    """The finished ``checkpoints/step-N`` folders of a run, oldest first (``.tmp`` leftovers skipped)."""
    found = [
        p for p in (output / "checkpoints").glob("step-*") if CHECKPOINT_NAME.fullmatch(p.name) and p.is_dir()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output: Path) -> Path | None:
    """The newest whole checkpoint of the run in ``output``, or ``None``.

    A damaged checkpoint (a file missing, truncated or changed since it was written) is skipped with a
    warning naming the file, and the previous good one is used instead.
    """
    skipped: list[str] = []
    for folder in reversed(checkpoint_folders(output)):
        problem = checkpoint_problem(folder)
        if problem is None:
            for reason in skipped:
                log.warning("skipping a damaged checkpoint: %s; resuming from %s instead", reason, folder)
            return folder
        skipped.append(problem)
    if skipped:
        raise ConfigError(f"no usable checkpoint in {output / 'checkpoints'}: " + "; ".join(skipped))
    return None


def load_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, nn.Module] | None = None,
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns the loop state (step, ...).

    Raises:
        ConfigError: a file of the checkpoint is missing, truncated or changed (named in the message), or
            the checkpoint does not match the model.
    """
    from safetensors.torch import load_file

    problem = checkpoint_problem(folder)
    if problem is not None:
        raise ConfigError(f"cannot resume: {problem}")
    for name, module in (extra or {}).items():
        module.load_state_dict(load_file(str(folder / f"{name}.safetensors")))

    weights = _checkpoint_weights(folder)
    missing = set(trainable_state(model)) - set(weights)
    if missing:
        raise ConfigError(
            f"{folder}: checkpoint does not match the model (missing {sorted(missing)[:3]} ...)"
        )
    model.load_state_dict(weights, strict=False)
    try:
        blob = torch.load(folder / "state.pt", weights_only=True)
    except Exception as err:  # an unpickler error names only the class it refused
        raise ConfigError(
            f"{folder / 'state.pt'}: holds more than tensors and plain values, refused unread "
            f"(written by an older version, or crafted): {err.__class__.__name__}"
        ) from None
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    states = json.loads((folder / "rng.json").read_text())["processes"]
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank >= len(states):
        log.warning(
            "%s: saved by %d process(es); process %d starts from process 0's RNG", folder, len(states), rank
        )
    _set_rng_state(states[rank if rank < len(states) else 0])
    return json.loads((folder / "trainer_state.json").read_text())


def _checkpoint_weights(folder: Path) -> dict[str, Tensor]:
    """The trainable weights of a checkpoint: LoRA's ``trainable.safetensors``, else the model's
    ``model.safetensors`` or, for a model saved in shards, every shard its index names."""
    from safetensors.torch import load_file

    lora = folder / "trainable.safetensors"
    if lora.exists():
        return load_file(str(lora))
    if (folder / "model.safetensors").exists():
        return load_file(str(folder / "model.safetensors"))
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        raise ConfigError(f"{folder}: neither model.safetensors nor model.safetensors.index.json")
    weights: dict[str, Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        weights.update(load_file(str(folder / shard)))
    return weights


def prune_checkpoints(output: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (at least one is always kept: the newest)."""
    folders = checkpoint_folders(output)
    for old in folders[: max(0, len(folders) - max(1, keep))]:
        shutil.rmtree(old, ignore_errors=True)


MODEL_FILES = re.compile(
    r"(model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|config\.json"
    r"|generation_config\.json)"
)
"""The files ``save_pretrained`` writes for a plain (non-LoRA) model."""


def save_final_model(
    model: nn.Module,
    tokenizer: Any,
    output: Path,
    state_dict: dict[str, Tensor] | None = None,
    same_as: Path | None = None,
) -> None:
    """Save a plain Hugging Face folder (safetensors + config + tokenizer) loadable with ``from_pretrained``.

    A LoRA model is saved twice: the adapter in ``output/adapter`` and the merged weights at the root.
    ``state_dict``: the full weights when they were gathered from shards (FSDP, DeepSpeed ZeRO-3).
    ``same_as``: a checkpoint folder written from these very weights (the run's last step); its model
    files are hard-linked instead of written again (copied where the file system has no hard links).
    """
    # An earlier model's files are unlinked, never written over: one may be a hard link to a checkpoint's
    # weights, which writing it in place would change too (and its shards must not mix with these).
    stale = [p for p in output.iterdir() if MODEL_FILES.fullmatch(p.name)] if output.is_dir() else []
    if same_as is not None and state_dict is None and not hasattr(model, "peft_config"):
        linked = [p for p in sorted(same_as.iterdir()) if MODEL_FILES.fullmatch(p.name)]
        if any(p.name.endswith(".safetensors") for p in linked):
            for path in stale:
                path.unlink()
            for src in linked:
                dst = output / src.name
                try:
                    dst.hardlink_to(src)
                except OSError:
                    shutil.copy2(src, dst)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(output))
            return
    for path in stale:
        path.unlink()
    if hasattr(model, "peft_config"):
        model.save_pretrained(str(output / "adapter"), safe_serialization=True, state_dict=state_dict)
        model, state_dict = model.merge_and_unload(), None
    model.save_pretrained(str(output), safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(output))


def save_run_checkpoint(
    accelerator: Any,
    output: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    tokenizer: Any,
    config: Any,
    extra: dict[str, nn.Module] | None = None,
) -> bool:
    """Checkpoint a run at ``state["step"]`` as ``output/checkpoints/step-N``: every process's random
    generators are gathered, the main process writes and prunes to ``config.keep_checkpoints``, and
    every process waits for it. Returns False (nothing written) under FSDP or DeepSpeed, see
    :func:`~prefalign.train.processes.sharded`."""
    if sharded(accelerator):
        return False
    rng_states = [_rng_state()]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        rng_states = gather_object(rng_states)  # every process's generators, in process order
    if accelerator.is_main_process:
        save_checkpoint(
            output / "checkpoints" / f"step-{state['step']}",
            model,
            optimizer,
            scheduler,
            state,
            tokenizer,
            config,
            extra=extra,
            rng_states=rng_states,
        )
        prune_checkpoints(output, config.keep_checkpoints)
    accelerator.wait_for_everyone()
    return True


def save_run_model(
    accelerator: Any,
    wrapped: nn.Module,
    model: nn.Module,
    tokenizer: Any,
    output: Path,
    step: int,
    saved_step: int,
) -> None:
    """The run's final model folder at ``output`` (every process calls it: under FSDP or DeepSpeed the
    weights of ``wrapped``, the prepared model, are gathered first; the main process writes ``model``,
    the unwrapped one). When the newest checkpoint is of the last step, its weight files are linked."""
    full = accelerator.get_state_dict(wrapped) if sharded(accelerator) else None  # all processes
    last = output / "checkpoints" / f"step-{step}"
    same = last if saved_step == step and full is None and last.is_dir() else None
    if accelerator.is_main_process:
        save_final_model(model, tokenizer, output, full, same_as=same)
