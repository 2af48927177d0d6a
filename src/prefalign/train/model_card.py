"""The model card of a run's final model folder: ``README.md`` in the Hugging Face convention.

A YAML header (``base_model``, ``library_name``, ``tags`` naming the method, ``datasets`` for a hub data
set), then the method, the data, the resolved settings, the final metrics and how to load the model. A
LoRA run's ``adapter/`` folder gets a card of its own (``library_name: peft``). ``prefalign models list
--runs DIR`` reads these headers back (:func:`prefalign.models.commands.run_models`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

from prefalign.config import config_to_dict

METHODS = {
    "sft": "supervised fine-tuning (the first stage of RLHF): the likelihood of demonstration completions",
    "reward": "a Bradley-Terry reward model trained on preference pairs (a scalar head on the policy)",
    "dpo": "Direct Preference Optimisation (Rafailov et al. 2023) on preference pairs",
    "orpo": "ORPO (Hong et al. 2024): the chosen completion's NLL plus an odds-ratio term, no reference",
    "kto": "KTO (Ethayarajh et al. 2024) on unpaired desirable / undesirable completions",
    "ppo": "PPO against a reward with a KL penalty to the reference (RLHF; Ouyang et al. 2022)",
    "grpo": "GRPO (Shao et al. 2024): PPO without a critic, advantages relative to a group of samples",
    "rloo": "RLOO (Ahmadian et al. 2024): REINFORCE with a leave-one-out baseline",
}
"""What each method is, in one line of the card."""

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def method_of(config: Any) -> str:
    """The command that trained with ``config``: ``DPOConfig`` -> ``dpo``."""
    return type(config).__name__.removesuffix("Config").lower()


def _tags(config: Any) -> list[str]:
    method = method_of(config)
    tags = ["prefalign", method]
    loss = getattr(config, "loss_type", None)
    if method == "dpo" and loss not in (None, "sigmoid"):
        tags.append(loss)
    return tags


def _data(config: Any) -> tuple[str, list[str]]:
    """The card's data paragraph and the hub data sets among the sources."""
    lines, hub = [], []
    for name, split, subset in (
        ("data", "data_split", "data_subset"),
        ("eval_data", "eval_data_split", None),
        ("prompts", "prompts_split", "prompts_subset"),
        ("eval_prompts", "eval_prompts_split", None),
    ):
        source = getattr(config, name, None)
        if source is None:
            continue
        where = [f"split `{getattr(config, split)}`" if getattr(config, split, None) else ""]
        where.append(
            f"subset `{getattr(config, subset)}`" if subset and getattr(config, subset, None) else ""
        )
        extra = ", ".join(w for w in where if w)
        lines.append(f"- {name.replace('_', ' ')}: `{source}`" + (f" ({extra})" if extra else ""))
        if _HUB_ID.match(str(source)) and not Path(str(source)).exists():
            hub.append(str(source))
    if getattr(config, "columns", ""):
        lines.append(f"- columns renamed: `{config.columns}`")
    return "\n".join(lines) or "- (given in Python)", sorted(set(hub))


def _metrics(summary: dict[str, Any]) -> str:
    rows = []
    for group in ("final", "eval"):
        for key, value in (summary.get(group) or {}).items():
            if isinstance(value, (int, float)) and not key.startswith("_"):
                shown = f"{value:.6g}" if isinstance(value, float) and math.isfinite(value) else str(value)
                rows.append(f"| {group} | `{key}` | {shown} |")
    return "\n".join(["| | metric | value |", "| --- | --- | --- |", *rows]) if rows else "(none logged)"


def _usage(root: str, method: str, adapter: bool) -> str:
    if adapter:
        return (
            "```python\nfrom peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
            f'model = AutoPeftModelForCausalLM.from_pretrained("{root}/adapter")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{root}")\n```\n\n'
            "The merged weights (adapter folded in) are the parent folder's, loadable with transformers alone."
        )
    auto = "AutoModelForSequenceClassification" if method == "reward" else "AutoModelForCausalLM"
    return (
        f"```python\nfrom transformers import {auto}, AutoTokenizer\n\n"
        f'model = {auto}.from_pretrained("{root}")\ntokenizer = AutoTokenizer.from_pretrained("{root}")\n```'
    )


def model_card(config: Any, summary: dict[str, Any], adapter: bool = False) -> str:
    """The text of ``README.md`` for the final model of a run with ``config`` and ``summary``."""
    method = method_of(config)
    kind = "orpo" if getattr(config, "loss_type", None) == "orpo" else method
    data, hub = _data(config)
    header: dict[str, Any] = {
        "base_model": str(config.model),
        "library_name": "peft" if adapter else "transformers",
        "tags": _tags(config),
    }
    if hub:
        header["datasets"] = hub
    if method != "reward":
        header["pipeline_tag"] = "text-generation"
    settings = yaml.safe_dump(config_to_dict(config), sort_keys=False).strip()
    return "\n".join([
        "---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
        f"# {Path(str(config.output)).name}: `{config.model}` trained with prefalign {method}", "",
        f"**Method.** {METHODS.get(kind, method)}.", "",
        f"Trained for {summary.get('steps', '?')} {'iterations' if 'train_prompts' in summary else 'steps'}"
        f" from `{config.model}`" + (" with a LoRA adapter (this folder)." if adapter else "."), "",
        "## Data", "", data, "",
        "## Settings", "", f"As resolved (`prefalign {method} --config config.yaml` reruns them):", "",
        "```yaml", settings, "```", "",
        "## Final metrics", "", _metrics(summary), "",
        "## Use", "", _usage(str(config.output), method, adapter), "",
    ])  # fmt: skip


def write_model_card(output: Path, config: Any, summary: dict[str, Any]) -> None:
    """``README.md`` in the final model folder ``output`` (and in ``output/adapter`` for a LoRA run);
    call it on the main process once the summary is known."""
    output = Path(output)
    (output / "README.md").write_text(model_card(config, summary), encoding="utf-8")
    if (output / "adapter" / "adapter_config.json").is_file():
        (output / "adapter" / "README.md").write_text(
            model_card(config, summary, adapter=True), encoding="utf-8"
        )
