"""Find and load models: one way to name a model everywhere, and the builtin model registry.

A model name (CLI ``--model``, a config field, a Python argument) is one of:

1. a local folder holding a Hugging Face checkpoint (``config.json`` plus ``*.safetensors``);
2. a builtin name from :data:`BUILTIN_MODELS` (``prefalign models list``), fetched and converted once
   into ``$PREFALIGN_CACHE/models/<name>`` (default cache ``~/.cache/prefalign``);
3. anything else is passed to transformers as a hub id (works where the hub is reachable).

Only this package knows how weights are found and loaded. Weights are read and written as safetensors
only, and ``trust_remote_code`` is off unless asked for. By responsibility:

- :mod:`prefalign.models.registry`: the builtin registry, its cache and GGUF conversion, resolving names;
- :mod:`prefalign.models.loading`: tokenizers, policies, references, reward and value models, precision,
  scalar heads, LoRA adapters;
- :mod:`prefalign.models.commands`: ``prefalign models list`` and ``prefalign models fetch``.

Every public name is importable from ``prefalign.models``.
"""

from __future__ import annotations

from prefalign.models.commands import (
    ModelsFetchConfig,
    add_commands,
)
from prefalign.models.loading import (
    CRITIC_ADAPTER,
    DTYPES,
    LoraSettings,
    adapter_active,
    adapter_disabled,
    add_critic_adapter,
    apply_lora,
    backbone_and_head,
    cpu_has_bf16,
    freeze,
    load_config,
    load_policy,
    load_reference,
    load_reward_model,
    load_tokenizer,
    load_value_model,
    own_trainable_memory,
    resolve_dtype,
    sequence_scores,
    token_scores,
)
from prefalign.models.registry import (
    BUILTIN_MODELS,
    BuiltinModel,
    ModelError,
    builtin_names,
    builtin_path,
    cache_dir,
    fetch_builtin,
    get_builtin,
    hub_reachable,
    is_cached,
    resolve_model,
    set_pad_token,
)

__all__ = [
    "BUILTIN_MODELS",
    "BuiltinModel",
    "DTYPES",
    "LoraSettings",
    "ModelError",
    "ModelsFetchConfig",
    "add_commands",
    "CRITIC_ADAPTER",
    "adapter_active",
    "adapter_disabled",
    "add_critic_adapter",
    "apply_lora",
    "backbone_and_head",
    "builtin_names",
    "builtin_path",
    "cache_dir",
    "cpu_has_bf16",
    "fetch_builtin",
    "freeze",
    "get_builtin",
    "hub_reachable",
    "is_cached",
    "load_config",
    "load_policy",
    "load_reference",
    "load_reward_model",
    "load_tokenizer",
    "load_value_model",
    "own_trainable_memory",
    "resolve_dtype",
    "resolve_model",
    "sequence_scores",
    "set_pad_token",
    "token_scores",
]
