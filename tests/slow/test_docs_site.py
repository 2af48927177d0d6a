"""The documentation site builds offline, and headless Chromium renders its lecture figures and a command page.

Needs the `docs` extra (`make docs-setup`, which `make test-slow` runs) and Debian's `chromium` package:
`apt-get update && apt-get install -y chromium`. Without Chromium this test fails; it does not skip.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from prefalign.train.dpo import DPOConfig

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_HELP = "headless Chromium is needed: apt-get update && apt-get install -y chromium"


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.srcs.append(dict(attrs).get("src") or "")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail(CHROMIUM_HELP)


def run_chromium(*args: str, cwd: Path) -> str:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def decode_png(src: str, page: Path) -> np.ndarray:
    """The pixels of an <img> source: a data: URL or a file next to the page."""
    import matplotlib.image

    if src.startswith("data:image/png;base64,"):
        data = base64.b64decode(src.split(",", 1)[1])
    else:
        target = (page.parent / src).resolve()
        assert target.is_file(), f"{page.name}: image {src} does not exist"
        data = target.read_bytes()
    return matplotlib.image.imread(io.BytesIO(data), format="png")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """Chapters 1 and 7 executed (the others shown without outputs), then the whole site built."""
    tmp = tmp_path_factory.mktemp("docs")
    for cmd in (
        [sys.executable, "docs/run_lecture.py", "01", "07", "--out", str(tmp / "lecture")],
        [sys.executable, "docs/build_site.py", "--lecture", str(tmp / "lecture"), "--work", str(tmp / "pages"),
         "--out", str(tmp / "site")],
    ):  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return tmp / "site"


def test_lecture_page_renders_its_figures_in_chromium(site):
    page = site / "lecture" / "07_dpo_tabular.html"
    dom = run_chromium("--virtual-time-budget=10000", "--dump-dom", page.as_uri(), cwd=site)
    assert "DPO, checked exactly" in dom and "not executed" not in dom
    parser = _Images()
    parser.feed(dom)
    figures = [
        decode_png(src, page)
        for src in parser.srcs
        if src.startswith("data:image/png") or src.endswith(".png")
    ]
    assert figures, "no figure in the rendered lecture page"
    for pixels in figures:
        assert pixels.shape[0] > 200 and pixels.shape[1] > 200
        assert pixels.std() > 0.05, "a blank figure"
    assert "max |pi - pi*|" in dom  # the chapter's printed output is on the page too
    assert 'class="MathJax' in dom and "Math Processing Error" not in dom  # formulas typeset offline
    shot = site.parent / "lecture.png"
    run_chromium("--window-size=1200,2400", f"--screenshot={shot}", page.as_uri(), cwd=site)
    assert decode_png(shot.name, shot).std() > 0.05


def test_command_page_lists_the_options_from_the_config_dataclass(site):
    page = site / "commands" / "dpo.html"
    dom = run_chromium("--virtual-time-budget=10000", "--dump-dom", page.as_uri(), cwd=site)
    rows = re.findall(r"<tr>(.*?)</tr>", dom, flags=re.S)
    beta = [r for r in rows if "--beta" in r]
    assert beta and "Strength of the implicit KL penalty" in beta[0] and "0.1" in beta[0]
    assert len(rows) - 1 >= len(dataclasses.fields(DPOConfig))  # one row per option, plus the header


def test_site_has_every_page(site):
    from prefalign.cli import COMMANDS

    for name in COMMANDS:
        assert (site / "commands" / f"{name}.html").is_file(), name
    assert "dpo_loss" in (site / "api" / "prefalign.losses.html").read_text()
    assert "Side-by-side comparisons" in (site / "benchmarks.html").read_text()  # from BENCHMARKS.md
    for chapter in (ROOT / "docs" / "lecture").glob("[0-9][0-9]_*.py"):
        assert (site / "lecture" / f"{chapter.stem}.html").is_file(), chapter.name
