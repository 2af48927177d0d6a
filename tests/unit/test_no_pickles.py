"""No code path unpickles: ``torch.load`` always with ``weights_only=True``, and no ``pickle`` at all
(a crafted file in a run folder must not run code on ``--resume``)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "prefalign"


def _offences(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            if any(n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle") for n in names):
                found.append(f"line {node.lineno}: imports a pickle module")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
            base = node.func.value
            if isinstance(base, ast.Name) and base.id == "torch":
                safe = any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords
                )
                if not safe:
                    found.append(f"line {node.lineno}: torch.load without weights_only=True")
    return found


def test_the_scan_catches_what_it_looks_for():
    bad = "import pickle\nimport torch\ntorch.load('x')\ntorch.load('y', weights_only=False)\n"
    assert len(_offences(bad)) == 3
    assert _offences("import torch\ntorch.load('x', weights_only=True)\n") == []


def test_no_source_file_unpickles():
    offences = [
        f"{path.relative_to(SRC)}: {o}"
        for path in sorted(SRC.rglob("*.py"))
        for o in _offences(path.read_text())
    ]
    assert offences == []
