"""What the lecture chapters share: plotting that works headless as a script and inline in Jupyter.

Run as a script (``python docs/lecture/01_markov_reward_process.py``), a chapter draws with the Agg
backend and writes nothing unless ``PREFALIGN_LECTURE_FIGURES`` names a folder, where its figures are
saved as PNG files. Opened as a notebook, the figures appear inline.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import matplotlib

IN_NOTEBOOK = "ipykernel" in sys.modules
if not IN_NOTEBOOK:
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

FIGURES_ENV = "PREFALIGN_LECTURE_FIGURES"
"""Environment variable: folder where running chapters save their figures (unset: not saved)."""


def show(fig: matplotlib.figure.Figure, name: str) -> None:
    """Show ``fig`` inline in a notebook, save it as ``<name>.png`` when asked to, then release it."""
    folder = os.environ.get(FIGURES_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(folder) / f"{name}.png", dpi=100, bbox_inches="tight")
    if IN_NOTEBOOK:
        plt.show()
    else:
        plt.close(fig)


def _fmt(c: object) -> str:
    if not isinstance(c, float):
        return str(c)
    return f"{c:.3f}" if c == 0 or 1e-3 <= abs(c) < 1e4 else f"{c:.2e}"


def table(rows: list[list[object]], header: list[str]) -> str:
    """A small Markdown table (printed by the chapters, readable as plain text too)."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join(
        [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]]
    )
