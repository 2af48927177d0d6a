"""Shared fixtures: tiny offline tokenizer and models; every test file is marked by its folder."""

from __future__ import annotations

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
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (width 64) + the ChatML tokenizer saved as a plain Hugging Face folder."""
    from prefalign.testing import tiny_causal_lm, tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny-model")
    tok = tiny_tokenizer()
    tiny_causal_lm(tokenizer=tok, hidden_size=64, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
