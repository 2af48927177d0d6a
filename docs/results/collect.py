"""Copy a finished demo run's evidence into the repository: ``summary.json``, ``config.yaml``, the report
(``report.md``), its plots and every evaluation's samples (gzipped JSON lines), so that anyone can
recompute each point, rewards included, from the texts (``tests/unit/test_frontier_results.py`` does).

Usage: python docs/results/collect.py RUN_FOLDER docs/results/frontier
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
from pathlib import Path


def collect(run: Path, dest: Path) -> None:
    summary = json.loads((run / "summary.json").read_text())
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "samples").mkdir(parents=True)
    for name in ("summary.json", "config.yaml", "report.md"):
        shutil.copy2(run / name, dest / name)
    for plot in sorted((run / "plots").glob("*.png")):
        (dest / "plots").mkdir(exist_ok=True)
        shutil.copy2(plot, dest / "plots" / plot.name)
    for point in summary["points"]:
        source = run / point["samples"]
        with gzip.GzipFile(dest / f"{point['samples']}.gz", "wb", mtime=0) as out:  # (mtime 0: reproducible)
            out.write(source.read_bytes())
    print(
        f"{len(summary['points'])} points, {sum(1 for _ in (dest / 'samples').iterdir())} sample files -> {dest}"
    )


if __name__ == "__main__":
    collect(Path(sys.argv[1]), Path(sys.argv[2]))
