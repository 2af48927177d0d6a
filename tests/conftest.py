"""Shared fixtures: tiny offline tokenizer and models, a preference-pair file, the online methods' prompts
and reward functions; every test file is marked by its folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ASSETS = Path(__file__).parent / "assets"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        folder = Path(str(item.fspath)).parent.name
        if folder in ("unit", "integration", "slow") and not any(
            m.name in ("unit", "integration", "slow") for m in item.iter_markers()
        ):
            item.add_marker(getattr(pytest.mark, folder))


@pytest.fixture(scope="session")
def tokenizer():
    from prefalign.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    from prefalign.testing import tiny_causal_lm

    return tiny_causal_lm(tokenizer=tokenizer)


@pytest.fixture
def assets() -> Path:
    return ASSETS


@pytest.fixture(scope="session")
def pairs(tmp_path_factory) -> Path:
    """16 synthetic preference pairs (``prefalign.testing.synthetic_pairs``, seed 0) in one JSONL file."""
    from prefalign.testing import synthetic_pairs, write_jsonl

    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", synthetic_pairs(16, seed=0))


# Opening words of reviews, the prompts of the online methods' tests (each used four times).
PREFIXES = [
    "The movie",
    "It was",
    "A film about",
    "I think",
    "Honestly the",
    "My friend said",
    "The plot",
    "Acting",
]

# Reward functions a tiny random model can be scored with, imported as `synthetic_rewards:<name>`.
SYNTHETIC_REWARDS = '''
def share_of_e(prompts, completions):
    """Ten times the share of the letter e in the response: a reward a tiny random model can learn fast
    (the scale keeps the signal above the KL penalty's noise at kl_coef 0.05)."""
    return [10 * c.count("e") / max(1, len(c)) for c in completions]

def length(prompts, completions):
    return [float(len(c)) for c in completions]

def flat_for_the(prompts, completions):
    """1 for every response to a prompt starting with "The" (equal rewards in those groups), else the
    response's position in the batch (all different)."""
    return [1.0 if p.startswith("The") else float(i) for i, p in enumerate(prompts)]

def position(prompts, completions):
    """The response's position in the batch: every group's rewards differ, whatever was sampled, so every
    GRPO/RLOO advantage is non-zero and every update moves the weights."""
    return [float(i) for i in range(len(completions))]

def wrong_count(prompts, completions):
    return [0.0]
'''


@pytest.fixture(scope="session")
def prefixes() -> list[str]:
    return list(PREFIXES)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder (one per test module) holding ``synthetic_rewards.py`` and ``prompts.jsonl`` (the prefixes
    four times); the online methods' runs write their outputs into it."""
    folder = tmp_path_factory.mktemp("online")
    (folder / "synthetic_rewards.py").write_text(SYNTHETIC_REWARDS)
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PREFIXES * 4))
    return folder


@pytest.fixture
def on_path(workdir, monkeypatch) -> Path:
    """``workdir``, importable: ``--reward synthetic_rewards:share_of_e`` finds its functions."""
    monkeypatch.syspath_prepend(str(workdir))
    return workdir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (width 64) + the ChatML tokenizer saved as a plain Hugging Face folder."""
    from prefalign.testing import tiny_causal_lm, tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny-model")
    tok = tiny_tokenizer()
    tiny_causal_lm(tokenizer=tok, hidden_size=64, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
