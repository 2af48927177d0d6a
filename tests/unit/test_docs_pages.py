"""The documentation's command pages are generated from the parsers and config dataclasses, for every command."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

from prefalign.cli import COMMANDS
from prefalign.config import field_docs
from prefalign.train.dpo import DPOConfig

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture(scope="module")
def build_site():
    sys.path.insert(0, str(DOCS))
    try:
        spec = importlib.util.spec_from_file_location("build_site", DOCS / "build_site.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(DOCS))


def test_dpo_page_has_one_row_per_config_field_with_its_docstring(build_site):
    page = build_site.command_page("dpo")
    docs = field_docs(DPOConfig)
    for f in dataclasses.fields(DPOConfig):
        rows = [
            line
            for line in page.splitlines()
            if line.startswith(f"| `--{f.name.replace('_', '-')}`")
            or line.startswith(f"| `--{f.name.replace('_', '-')} /")
        ]
        assert len(rows) == 1, f.name
        assert docs[f.name] in rows[0].replace("\\|", "|")
    assert "| `--beta` | `float` | `0.1` |" in page
    assert "| `--model` | `str` | **required** |" in page
    assert "`--precompute-ref / --no-precompute-ref`" in page


def test_every_command_gets_a_page_and_commands_without_a_config_show_their_help(build_site):
    for name in COMMANDS:
        page = build_site.command_page(name)
        assert page.startswith(f"# prefalign {name}")
        assert "Options (from `" in page or "usage: prefalign" in page, name
    models = build_site.command_page("models")
    assert "## `prefalign models list`" in models and "usage: prefalign models fetch" in models


def test_rl_subcommands_each_match_their_config(build_site):
    page = build_site.command_page("rl")
    for sub, cls in (
        ("gridworld", "GridworldConfig"),
        ("random-walk", "RandomWalkConfig"),
        ("ppo", "PPOConfig"),
    ):
        section = page.split(f"## `prefalign rl {sub}`")[1].split("## `")[0]
        assert f"{cls}`):" in section, sub
