"""Execute the lecture chapters (jupytext py:percent files) into notebooks with their outputs and figures.

    python docs/run_lecture.py                    # every chapter -> build/lecture/*.ipynb
    python docs/run_lecture.py 01 07 --out DIR    # chapters whose names start with 01 or 07

Each chapter runs in a fresh Jupyter kernel (this interpreter's ``python3`` kernel, from ``ipykernel``)
with ``docs/lecture`` as its working directory. Needs the ``docs`` extra: ``pip install -e '.[docs]'``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LECTURE = ROOT / "docs" / "lecture"


def chapters(prefixes: list[str] | None = None) -> list[Path]:
    """The chapter files in order, optionally only those whose names start with one of ``prefixes``."""
    found = sorted(LECTURE.glob("[0-9][0-9]_*.py"))
    if prefixes:
        found = [p for p in found if any(p.name.startswith(x) for x in prefixes)]
    return found


def execute(chapter: Path, out_dir: Path, timeout: int = 1200) -> Path:
    """Run ``chapter`` top to bottom in a new kernel; write ``<out_dir>/<name>.ipynb``. Raises on a failing cell."""
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    nb = jupytext.read(chapter)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(LECTURE)}}
    )
    client.execute()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{chapter.stem}.ipynb"
    nbformat.write(nb, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chapters", nargs="*", help="name prefixes of the chapters to run (default: all)")
    parser.add_argument("--out", default=str(ROOT / "build" / "lecture"), help="folder for the .ipynb files")
    args = parser.parse_args(argv)
    selected = chapters(args.chapters)
    if not selected:
        parser.error(f"no chapter in {LECTURE} matches {args.chapters}")
    for chapter in selected:
        start = time.perf_counter()
        print(f"running {chapter.name} ...", flush=True)
        target = execute(chapter, Path(args.out))
        print(f"  wrote {target} ({time.perf_counter() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
