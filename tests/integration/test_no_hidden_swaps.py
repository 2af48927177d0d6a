"""No hidden swaps: the lean layers are on while a trainer trains and gone when ``train()`` returns (a
model handed in comes back with stock forwards and no ``_prefalign_*`` attributes), and importing the
packing module registers nothing with transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest
from torch import nn

from prefalign.testing import synthetic_pairs, tiny_causal_lm, tiny_tokenizer, write_jsonl
from prefalign.train import grpo
from prefalign.train.dpo import DPOConfig
from prefalign.train.dpo import train as train_dpo


def swapped(model: nn.Module) -> list[str]:
    """Modules whose forward is an instance attribute instead of their class's."""
    return [name for name, m in model.named_modules() if "forward" in m.__dict__]


def marked(model: nn.Module) -> list[str]:
    """Modules and parameters carrying a ``_prefalign_*`` attribute."""
    found = [f"{n}.{a}" for n, m in model.named_modules() for a in vars(m) if a.startswith("_prefalign")]
    found += [f"{n}.{a}" for n, p in model.named_parameters() for a in vars(p) if a.startswith("_prefalign")]
    return found


def assert_stock(model: nn.Module) -> None:
    assert swapped(model) == []
    assert marked(model) == []
    for m in model.modules():
        assert getattr(type(m), "forward", None) is not None
        assert m.forward.__func__ is type(m).forward  # the class's own forward, bound


def test_an_offline_trainer_hands_back_stock_layers(tiny_model_dir, tmp_path):
    """DPO on one process: during training the RMSNorms, MLPs, embedding and projections run lean and
    the weights take gradients in place (seen from the callback); afterwards nothing of that is left."""
    write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(8, seed=1))
    model = tiny_causal_lm(tokenizer=tiny_tokenizer(), hidden_size=64, seed=0)
    assert_stock(model)
    seen = []

    def hook(step: int, m: nn.Module) -> None:
        seen.append((len(swapped(m)), len(marked(m))))

    config = DPOConfig(
        model=str(tiny_model_dir), data=str(tmp_path / "pairs.jsonl"), output=str(tmp_path / "run"),
        batch_size=4, max_length=64, max_steps=2, eval_every=1, progress=False,
    )  # fmt: skip
    train_dpo(config, model=model, callback=hook)
    assert seen and all(n_swapped > 0 and n_marked > 0 for n_swapped, n_marked in seen), seen
    assert_stock(model)


def test_an_online_trainer_hands_back_stock_layers(on_path, tiny_model_dir):
    """GRPO: the same for the online loop (lean layers during training, none after)."""
    model = tiny_causal_lm(tokenizer=tiny_tokenizer(), hidden_size=64, seed=0)
    seen = []
    config = grpo.GRPOConfig(
        model=str(tiny_model_dir), prompts=str(on_path / "prompts.jsonl"), output=str(on_path / "lean"),
        reward=["synthetic_rewards:share_of_e"], raw=True, rollout_batch=2, num_generations=2,
        response_length=4, iterations=2, eval_every=1, progress=False,
    )  # fmt: skip
    grpo.train(config, model=model, callback=lambda step, m: seen.append(len(swapped(m))))
    assert seen and all(n > 0 for n in seen), seen
    assert_stock(model)


def test_an_error_during_training_still_restores_the_layers(tiny_model_dir, tmp_path, monkeypatch):
    """A step that fails (here: an exception from the objective) leaves the model stock too."""
    from prefalign.train import loop

    write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(8, seed=1))
    model = tiny_causal_lm(tokenizer=tiny_tokenizer(), hidden_size=64, seed=0)

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(loop, "_one_step", fail)
    config = DPOConfig(
        model=str(tiny_model_dir), data=str(tmp_path / "pairs.jsonl"), output=str(tmp_path / "run"),
        batch_size=4, max_length=64, max_steps=2, progress=False,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="boom"):
        train_dpo(config, model=model)
    assert_stock(model)


def test_importing_packing_registers_no_attention_function():
    """The block attention is registered with transformers when first used, not at import."""
    code = (
        "import prefalign.packing as p; from transformers import AttentionInterface as A; "
        "print(p.ATTENTION_NAME in A._global_mapping)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
