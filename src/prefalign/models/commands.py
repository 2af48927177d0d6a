"""`prefalign models list` and `prefalign models fetch NAME`."""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefalign.models.registry import (
    BUILTIN_MODELS,
    ModelError,
    builtin_names,
    builtin_path,
    cache_dir,
    fetch_builtin,
    get_builtin,
    is_cached,
)

log = logging.getLogger(__name__)


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


def card_header(folder: Path) -> dict[str, Any]:
    """The YAML header of a model card ``folder/README.md`` (empty where there is none, or no YAML)."""
    import yaml

    card = folder / "README.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    try:
        header = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        header = None
    return header if isinstance(header, dict) else {}


def run_models(root: Path) -> list[dict[str, Any]]:
    """The final models of the run folders under ``root`` (a folder holding ``config.yaml`` and a saved
    model; checkpoints are not final models): ``path``, ``method`` (the model card's tags), ``base`` (the
    card's ``base_model``, else config.yaml's ``model``), ``adapter`` (a LoRA adapter is there too) and
    ``steps`` (summary.json's, if any)."""
    import json

    import yaml

    found = []
    for config in sorted(root.rglob("config.yaml")):
        folder = config.parent
        if "checkpoints" in folder.relative_to(root).parts or not (folder / "config.json").is_file():
            continue
        header = card_header(folder)
        tags = [t for t in header.get("tags") or [] if t != "prefalign"]
        try:
            settings = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            settings = {}
        summary = folder / "summary.json"
        found.append({
            "path": str(folder),
            "method": "+".join(map(str, tags)) or "?",
            "base": str(header.get("base_model") or (settings.get("model") if isinstance(settings, dict) else None) or "?"),
            "adapter": (folder / "adapter" / "adapter_config.json").is_file(),
            "steps": json.loads(summary.read_text()).get("steps") if summary.is_file() else None,
        })  # fmt: skip
    return found


def _runs_list(root: Path) -> int:
    if not root.is_dir():
        raise ModelError(f"--runs {root}: no such folder")
    runs = run_models(root)
    if not runs:
        print(f"no final models under {root} (a run folder holds config.yaml and the saved model)")
    for run in runs:
        extra = "; LoRA adapter in adapter/" if run["adapter"] else ""
        steps = f"; {run['steps']} steps" if run["steps"] is not None else ""
        print(f"{run['path']}\n    method: {run['method']}; base: {run['base']}{steps}{extra}")
    return 0


def _models_list(args: argparse.Namespace) -> int:
    if getattr(args, "runs", None):
        return _runs_list(Path(args.runs))
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
    listing.add_argument(
        "--runs",
        metavar="DIR",
        default=None,
        help="List the final models of the run folders under DIR instead (their method and base model).",
    )
    listing.set_defaults(func=_models_list)
    docs = field_docs(ModelsFetchConfig)
    fetch = sub.add_parser("fetch", help=ModelsFetchConfig.__doc__)
    fetch.add_argument("name", metavar="NAME", help=docs["name"])
    fetch.add_argument(
        "--force", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=docs["force"]
    )
    fetch.set_defaults(func=_models_fetch)
