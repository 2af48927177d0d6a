"""The demo's run folder follows the rules of every training command's ``--output``: a file is refused, a
folder holding another command's run is refused unless ``--overwrite``; a folder holding a demo run is
the demo's own, which a rerun completes (phases whose inputs are unchanged are skipped, :mod:`.phase`)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from prefalign.config import ConfigError, check_output_folder

if TYPE_CHECKING:
    from prefalign.demo.config import DemoConfig

DEMO_FILES = (
    "config.yaml",
    "summary.json",
    "report.html",
    "report.md",
    "plots",
    "samples",
    "runs",
    "preferences",
    "tiny-model",
    "prompts-train.jsonl",
    "seeds.json",
    "seeds.md",
)
"""What a demo run writes in its folder (``--overwrite`` of a demo run removes these, and only these)."""


def is_demo_run(output: Path) -> bool:
    """Whether ``output/config.yaml`` is a demo's: a mapping with the demo's own options ``preset`` and
    ``methods``, which no training command has (other keys may come and go between versions)."""
    try:
        saved = yaml.safe_load((output / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(saved, dict) and {"preset", "methods"} <= set(saved)


def prepare_demo_folder(config: DemoConfig) -> None:
    """Check ``config.output`` before anything is loaded, and clear it under ``--overwrite``.

    Raises:
        ConfigError: the output is a file or lies under one; or it holds another command's run (its
            ``config.yaml``, ``metrics.jsonl``, ``summary.json``, ``checkpoints``...) and ``--overwrite``
            was not given.
    """
    from prefalign.train.run_folder import RUN_FILES, clear_run

    output = Path(config.output)
    check_output_folder(output)
    if not output.is_dir():
        return
    if is_demo_run(output):
        if config.overwrite:  # start the demo afresh: every phase runs again
            for name in DEMO_FILES:
                path = output / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        return
    held = [name for name in RUN_FILES if (output / name).exists()]
    if not held:
        return
    if not config.overwrite:
        raise ConfigError(
            f"{output} already holds a run of another command ({', '.join(held)}): pass --overwrite to "
            "replace it, or another --output"
        )
    clear_run(output)
