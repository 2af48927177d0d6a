"""The config machinery: field docstrings become --help, YAML sets defaults, flags override, unknown keys fail."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from prefalign.cli import build_parser
from prefalign.config import ConfigError, add_config_arguments, build_config, config_from_args, field_docs
from prefalign.train.dpo import DPOConfig

REPO = Path(__file__).resolve().parents[2]


def test_field_docs_include_inherited_fields():
    docs = field_docs(DPOConfig)
    assert docs["beta"] == "Strength of the implicit KL penalty toward the reference model."
    assert docs["lr"] == "Peak learning rate."  # from TrainConfig


def test_help_text_comes_from_field_docstrings(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["dpo", "--help"])
    out = capsys.readouterr().out
    assert "Strength of the implicit KL penalty toward the reference model. (default: 0.1)" in " ".join(
        out.split()
    )
    assert "--precompute-ref" in out and "--lora-r" in out


def test_yaml_sets_defaults_and_flags_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\ndata: d\noutput: o\nbeta: 0.3\nbatch-size: 4\nreport_to: [tensorboard]\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, DPOConfig)
    cfg = config_from_args(DPOConfig, parser.parse_args(["--config", str(path), "--beta", "0.5"]))
    assert cfg.beta == 0.5 and cfg.batch_size == 4 and cfg.report_to == ["tensorboard"]
    assert cfg.precompute_ref is True
    cfg = config_from_args(
        DPOConfig, parser.parse_args(["--config", str(path), "--no-precompute-ref", "--max-steps", "3"])
    )
    assert cfg.precompute_ref is False and cfg.max_steps == 3 and cfg.beta == 0.3


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: m\ndata: d\noutput: o\nbetta: 1\n", "unknown key(s) betta"),
        ("model: m\ndata: d\noutput: o\nbatch_size: many\n", "batch_size: expected int, got 'many'"),
        ("model: m\ndata: d\n", "missing required option(s): --output"),
        ("- just\n- a list\n", "expected a mapping"),
        ("model: m\ndata: d\noutput: o\nlr: -1\n", "lr must be > 0, got -1.0"),
    ],
)
def test_config_mistakes_are_named(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        build_config(DPOConfig, path)
    assert message in str(err.value)


def test_example_config_is_valid():
    cfg = build_config(DPOConfig, REPO / "configs" / "dpo.yaml", {"data": "x.jsonl", "output": "runs/x"})
    assert cfg.model == "smollm2" and cfg.loss_type == "sigmoid"


def test_example_ppo_config_is_valid():
    from prefalign.train.ppo import PPOConfig

    cfg = build_config(PPOConfig, REPO / "configs" / "ppo.yaml", {"prompts": "p.jsonl", "output": "runs/x"})
    assert cfg.reward == "sentiment" and cfg.raw and cfg.shared_value_head and cfg.iterations == 30


def _all_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, (*path, name))


def test_every_commands_help_is_formatted_whole():
    """A field docstring with a % ("about 15% right") once made argparse print its own internals in place
    of `prefalign tasks arithmetic --help`: every command's help must format without that."""
    parsers = list(_all_parsers(build_parser()))
    assert len(parsers) > 15
    for path, parser in parsers:
        text = parser.format_help()
        assert "option_strings" not in text, path
    tasks = dict(parsers)[("tasks", "arithmetic")].format_help()
    assert "about 15% right" in " ".join(tasks.split())
