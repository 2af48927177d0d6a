"""The import direction of docs/architecture.md, checked on the sources with ``ast`` (nothing is imported).

Every top-level module or package of ``prefalign`` has a layer; a module imports prefalign modules of
strictly lower layers only (plus its own package and the root package's ``__version__``). Lazy imports
inside functions count like top-level ones: they are the same dependency, paid later.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"

# The layers, bottom up. Data flows one way (DESIGN.md): `data` makes batches, `train/<method>` turns a
# batch into a loss with `losses`, `train/` steps the optimiser; online methods add `generation` and
# `rewards` in front. Only `cli` knows about argv, and only `__main__` imports `cli`.
LAYERS: dict[str, int] = {
    # pure tensor maths, settings plumbing and in-process test helpers: no other prefalign module
    "losses": 0,
    "kl": 0,
    "config": 0,
    "memory": 0,
    "testing": 0,
    # readers/encoders, model loading, the process launcher, the RL foundations (numpy + losses)
    "decoding": 1,  # (reads LoRA layers through memory.lora_adapters)
    "data": 1,
    "models": 1,
    "launch": 1,
    "rl": 1,
    "tasks": 1,
    # what runs a model over data: packed forward passes, sampling
    "packing": 2,
    "generation": 2,
    # what scores samples: reward sources, evaluation
    "rewards": 3,
    "evaluate": 3,
    "generate_command": 3,
    "score_command": 4,
    "report": 4,
    "train": 5,
    "demo": 6,
    "cli": 7,
    "__main__": 8,
}

# The files of train/ that are one method each; everything else in train/ is shared mechanics (options,
# run folders, checkpoints, optimiser, the offline and online loops) and must not depend on a method.
TRAIN_METHODS = {"sft", "reward", "dpo", "kto", "orpo", "ppo", "grpo", "rloo"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def source_modules(root: Path) -> dict[str, Path]:
    """Every module under ``root/prefalign``, by dotted name."""
    return {module_name(p, root): p for p in sorted((root / "prefalign").rglob("*.py"))}


def imported(path: Path, name: str, modules: dict[str, Path]) -> Iterator[tuple[int, str]]:
    """(line, module) for every import in the file, relative ones resolved; ``from pkg import sub`` names
    the submodule when ``sub`` is one."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield node.lineno, sub if sub in modules else target


def edges(root: Path) -> list[tuple[str, int, str, str]]:
    """(file, line, importer, imported) for every prefalign-to-prefalign import under ``root``."""
    modules = source_modules(root)
    found = []
    for name, path in modules.items():
        for line, target in imported(path, name, modules):
            if target == "prefalign" or target.startswith("prefalign."):
                found.append((str(path.relative_to(root)), line, name, target))
    return found


def component(module: str) -> str:
    """``prefalign.train.dpo`` -> ``train``; the root package -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_violations(root: Path) -> list[str]:
    bad = []
    for file, line, src, dst in edges(root):
        a, b = component(src), component(dst)
        if b == "" or a == b or a not in LAYERS or b not in LAYERS:
            continue  # the root's __version__, a package's own modules, or unplaced (reported below)
        if LAYERS[b] >= LAYERS[a]:
            bad.append(f"{file}:{line}: {src} (layer {LAYERS[a]}) imports {dst} (layer {LAYERS[b]})")
    return bad


def train_violations(root: Path) -> list[str]:
    bad = []
    for file, line, src, dst in edges(root):
        shared = src.startswith("prefalign.train.") and src.split(".")[2] not in TRAIN_METHODS
        if shared and dst.startswith("prefalign.train.") and dst.split(".")[2] in TRAIN_METHODS:
            bad.append(f"{file}:{line}: shared {src} imports the method {dst}")
    return bad


def test_every_module_has_a_layer():
    unplaced = sorted({component(m) for m in source_modules(SRC)} - set(LAYERS) - {""})
    assert not unplaced, (
        f"new top-level modules {unplaced}: give each a layer in LAYERS (and docs/architecture.md)"
    )


def test_imports_point_down_the_layers():
    """losses/kl/config import no prefalign module; data, models and rl nothing above them (rl nothing from
    train, models or data); generation and rewards never train; train never demo or cli; only __main__
    imports cli."""
    assert layer_violations(SRC) == []


def test_shared_training_mechanics_do_not_depend_on_a_method():
    assert train_violations(SRC) == []


def test_the_import_graph_is_read():
    """The checks above see the imports that the layering is about (a parser that found nothing would pass
    them): the methods use losses and data, the generate command uses the model loader, the entry point uses cli."""
    pairs = {(component(s), component(d)) for _, _, s, d in edges(SRC)}
    assert {
        ("train", "losses"),
        ("train", "data"),
        ("generate_command", "models"),
        ("__main__", "cli"),
    } <= pairs
    assert ("prefalign.train.rloo", "prefalign.train.grpo") in {(s, d) for _, _, s, d in edges(SRC)}


def test_a_violation_is_reported_with_file_and_line(tmp_path):
    pkg = tmp_path / "prefalign"
    (pkg / "train").mkdir(parents=True)
    (pkg / "__init__.py").write_text('__version__ = "0"\n')
    (pkg / "train" / "__init__.py").write_text("")
    (pkg / "train" / "dpo.py").write_text("from prefalign.losses import dpo_loss\n")
    (pkg / "train" / "loop.py").write_text("from . import dpo\n")  # shared loop importing a method
    (pkg / "losses.py").write_text("import math\n\n\ndef f():\n    from prefalign.train.loop import x\n")
    assert layer_violations(tmp_path) == [
        "prefalign/losses.py:5: prefalign.losses (layer 0) imports prefalign.train.loop (layer 5)"
    ]
    assert train_violations(tmp_path) == [
        "prefalign/train/loop.py:1: shared prefalign.train.loop imports the method prefalign.train.dpo"
    ]
