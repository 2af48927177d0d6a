"""One dataclass per command: YAML sets defaults, command-line flags override, unknown keys are errors.

Each config field carries a one-line docstring (a string literal right after the field). That line is
the flag's ``--help`` text, so the dataclass is the only place an option is described.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import tempfile
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value or file is invalid; the message says which and why."""


def field_docs(cls: type) -> dict[str, str]:
    """Map each field of dataclass ``cls`` (and its bases) to the docstring written under it."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _resolve_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """Strip ``Optional``: returns (inner type, is_optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(name: str, tp: Any, value: Any) -> Any:
    """Convert a YAML or argv value to the field's declared type, or raise ConfigError."""
    inner, optional = _base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{name}: a value is required")
    origin = typing.get_origin(inner)
    try:
        if inner is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if inner is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if inner is float:
            return float(value)
        if inner is str:
            return str(value)
        if origin in (list, tuple):
            (item_tp, *_) = typing.get_args(inner) or (str,)
            items = value.split(",") if isinstance(value, str) else list(value)
            return [_coerce(name, item_tp, v) for v in items if v != ""]
        if origin is dict or inner is dict:
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {getattr(inner, '__name__', inner)}, got {value!r}") from None
    return value


def build_config(
    cls: type[T], yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> T:
    """Make a ``cls`` instance from an optional YAML file plus overrides (overrides win).

    Raises:
        ConfigError: unknown keys, wrong types, missing required fields, or a failed ``__post_init__``.
    """
    hints = _resolve_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of option names to values")
        not_text = [k for k in loaded if not isinstance(k, str)]
        if not_text:
            raise ConfigError(f"{path}: option names must be text, got {not_text[0]!r}")
        loaded = {k.replace("-", "_"): v for k, v in loaded.items()}
        unknown = sorted(set(loaded) - names)
        if unknown:
            raise ConfigError(
                f"{path}: unknown key(s) {', '.join(unknown)} (valid: {', '.join(sorted(names))})"
            )
        values.update(loaded)
    for key, value in (overrides or {}).items():
        if key not in names:
            raise ConfigError(f"unknown option {key!r} for {cls.__name__}")
        values[key] = value
    values = {k: _coerce(k, hints[k], v) for k, v in values.items()}
    missing = [
        f.name
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if f.name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        flags = ", ".join("--" + m.replace("_", "-") for m in missing)
        raise ConfigError(f"missing required option(s): {flags}")
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--flag`` per field of ``cls`` (help text from the field's docstring), plus ``--config``.

    Defaults are left unset (``argparse.SUPPRESS``) so that only flags the user typed override YAML.
    """
    docs = field_docs(cls)
    hints = _resolve_types(cls)
    parser.set_defaults(config_class=cls)
    parser.add_argument(
        "--config", default=None, metavar="YAML", help="YAML file of defaults; flags override it."
    )
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        flag = "--" + f.name.replace("_", "-")
        inner, _ = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = docs.get(f.name, "")
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            help_text += " (required)"
        elif default is not None and default != "":
            help_text += f" (default: {default})"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        if inner is bool:
            parser.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag, dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text
            )


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build ``cls`` from a namespace filled by :func:`add_config_arguments`."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    overrides = {k: v for k, v in vars(args).items() if k in names}
    return build_config(cls, getattr(args, "config", None), overrides)


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain dict of a config dataclass, for YAML/JSON dumps."""
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (readable back by :func:`build_config`)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def check_output_folder(output: str | Path) -> None:
    """Refuse an output folder that is a file or lies under one (checked before any work starts)."""
    path = Path(output)
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                where = "is a file" if folder == path else f"lies under the file {folder}"
                raise ConfigError(f"output {output} {where}; give a folder")
            return


def check_device(device: str | None, field: str = "device") -> None:
    """Refuse a device this machine does not have, before any model is loaded.

    None (cuda if available, else cpu) and ``cpu`` always pass; ``cuda``/``cuda:N`` need CUDA (and GPU
    ``N``), ``mps`` needs Apple's Metal backend.

    Raises:
        ConfigError: naming ``field``, the value and what is missing.
    """
    if device is None:
        return
    import torch  # only here: the config layer stays light to import

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{field}: {device!r} is not a device (cpu, cuda, cuda:1, mps)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"{field}: {device!r} asked for, but CUDA is not available here; use cpu or leave it unset"
            )
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ConfigError(f"{field}: {device!r} asked for, but this machine has {count} CUDA device(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{field}: {device!r} asked for, but MPS is not available here; use cpu")


def check_output_file(path: str | Path, field: str = "output") -> None:
    """Refuse an output file that cannot be written, before any work is done.

    A folder, a path under a file, a folder that cannot be created or written, or a file that exists
    but is read-only are refused. Nothing is created: the writability of the nearest existing folder is
    probed with a temporary file that is removed at once (``os.access`` says yes to root everywhere).

    Raises:
        ConfigError: naming ``field``, the path and why.
    """
    target = Path(path).expanduser()
    if target.is_dir():
        raise ConfigError(
            f"{field}: {path} is a folder; give a file path such as {Path(path) / 'samples.jsonl'}"
        )
    if target.exists():
        try:
            with target.open("a"):
                return
        except OSError as err:
            raise ConfigError(f"{field}: {path} cannot be written ({err.strerror or err})") from None
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{field}: {path} lies under {parent}, which is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise ConfigError(
            f"{field}: {path} cannot be written: folder {parent} is not writable ({err.strerror or err})"
        ) from None
