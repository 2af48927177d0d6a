"""Loading policies, references, reward and value models, tokenizers and LoRA adapters; precision; the
scalar heads of reward and value models."""

from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
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

from prefalign.models.registry import (
    ModelError,
    _check_safetensors,
    _is_local,
    _load_errors,
    resolve_model,
    set_pad_token,
)

log = logging.getLogger(__name__)


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""Names accepted for ``dtype`` (plus ``"auto"``: whatever the checkpoint's config says)."""


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


CRITIC_ADAPTER = "critic"
"""Name of PPO's critic adapter beside the policy's own (``default``) on one LoRA model."""


def add_critic_adapter(model: Any, settings: LoraSettings) -> None:
    """Give the LoRA model ``model`` a second adapter, :data:`CRITIC_ADAPTER`, on the same layers and base
    weights (PPO's separate critic without a second model); the policy's adapter stays the active one, and
    both train."""
    from peft import LoraConfig

    first = model.peft_config["default"]
    model.add_adapter(
        CRITIC_ADAPTER,
        LoraConfig(
            r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
            target_modules=first.target_modules, task_type=first.task_type,
        ),
    )  # fmt: skip
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)


@contextlib.contextmanager
def adapter_active(model: torch.nn.Module, name: str) -> Any:
    """Context in which every LoRA layer of ``model`` computes with the adapter ``name`` instead of the
    active one; which parameters train is left as it is (peft's ``set_adapter`` would freeze the others)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = [m._active_adapter for m in layers]
    for m in layers:
        m._active_adapter = [name]
    try:
        yield
    finally:
        for m, value in zip(layers, before, strict=True):
            m._active_adapter = value


@contextlib.contextmanager
def adapter_disabled(model: torch.nn.Module) -> Any:
    """Context in which a LoRA model computes with its base weights (a no-op for other models). Which
    parameters train is as before afterwards (peft re-enabling its adapters would freeze all but the
    active one: PPO's critic adapter among them)."""
    inner = getattr(model, "module", model)  # unwrap DistributedDataParallel
    if not hasattr(inner, "disable_adapter"):
        yield
        return
    trains = [(p, p.requires_grad) for p in inner.parameters()]
    try:
        with inner.disable_adapter():
            yield
    finally:
        for p, flag in trains:
            p.requires_grad_(flag)
