"""The training loop's ``callback(step, model)`` hook, through each trainer's ``train()``."""

from __future__ import annotations

import pytest
import torch

from prefalign.testing import synthetic_pairs, tiny_causal_lm, tiny_tokenizer, write_jsonl
from prefalign.train.dpo import DPOConfig
from prefalign.train.dpo import train as train_dpo
from prefalign.train.reward import RewardConfig
from prefalign.train.reward import train as train_reward
from prefalign.train.sft import SFTConfig
from prefalign.train.sft import train as train_sft


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("callback-data")
    pairs = synthetic_pairs(20, seed=3)
    write_jsonl(folder / "pairs.jsonl", pairs)
    write_jsonl(folder / "sft.jsonl", [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs])
    return folder


def _options(model_dir, data_file, tmp_path, **extra):
    return dict(
        model=str(model_dir),
        data=str(data_file),
        output=str(tmp_path / "run"),
        lr=1e-3,
        batch_size=4,
        max_length=64,
        progress=False,
        **extra,
    )


@pytest.mark.parametrize(
    ("eval_every", "expected"),
    [(2, [2, 4, 5]), (0, [5]), (5, [5])],
)
def test_dpo_callback_runs_every_eval_every_steps_and_after_the_last(
    tiny_model_dir, data, tmp_path, eval_every, expected
):
    """20 pairs at batch 4 are 5 steps: with eval_every=2 the hook sees steps 2 and 4, then the last
    step 5 once (not twice when 5 is itself a multiple); eval_every=0 means only after the last."""
    calls = []
    model = tiny_causal_lm(tokenizer=tiny_tokenizer(), hidden_size=64, seed=0)

    def hook(step: int, m: torch.nn.Module) -> None:
        calls.append((step, m, m.training))

    cfg = DPOConfig(**_options(tiny_model_dir, data / "pairs.jsonl", tmp_path, eval_every=eval_every))
    summary = train_dpo(cfg, model=model, callback=hook)
    assert [c[0] for c in calls] == expected
    assert summary["steps"] == 5
    assert all(m is model for _, m, _ in calls)  # the unwrapped policy itself, not a copy
    assert all(training for _, _, training in calls)  # the hook runs mid-training


def test_hook_sees_the_weights_of_its_step(tiny_model_dir, data, tmp_path):
    """The model passed at step k has had exactly k updates: its weights differ between calls, and
    the last call's weights are the saved final model's."""
    snapshots = []

    def hook(step: int, m: torch.nn.Module) -> None:
        snapshots.append(m.lm_head.weight.detach().clone())

    cfg = SFTConfig(**_options(tiny_model_dir, data / "sft.jsonl", tmp_path, eval_every=1, max_steps=3))
    train_sft(cfg, callback=hook)
    assert len(snapshots) == 3
    assert not torch.equal(snapshots[0], snapshots[1])
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    torch.testing.assert_close(final.lm_head.weight, snapshots[-1])


def test_reward_callback(tiny_model_dir, data, tmp_path):
    steps = []
    cfg = RewardConfig(**_options(tiny_model_dir, data / "pairs.jsonl", tmp_path, eval_every=3))
    train_reward(cfg, callback=lambda step, m: steps.append((step, m.config.num_labels)))
    assert steps == [(3, 1), (5, 1)]
