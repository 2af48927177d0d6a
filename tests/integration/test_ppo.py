"""PPO-RLHF on tiny models: the ratio at the first minibatch, learning a synthetic reward, the KL
penalty's pull, the adaptive controller, log-prob agreement, exact resume and reward errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefalign.testing import perturb_adapters
from prefalign.train import online
from prefalign.train.loop import read_metrics
from prefalign.train.ppo import PPOConfig, rollout_for, run_iteration, setup, train


def config(workdir: Path, model: Path, output: str, **overrides) -> PPOConfig:
    settings = dict(
        model=str(model),
        prompts=str(workdir / "prompts.jsonl"),
        output=str(workdir / output),
        reward="synthetic_rewards:share_of_e",
        raw=True,
        rollout_batch=8,
        response_length=10,
        shared_value_head=True,
        progress=False,
        lr=5e-3,
        seed=0,
    )
    return PPOConfig(**{**settings, **overrides})


@pytest.mark.parametrize(("recompute", "lora_r"), [(True, 0), (False, 0), (True, 4), (False, 4)])
def test_first_minibatch_ratio_is_one_and_sampled_logprobs_match(on_path, tiny_model_dir, recompute, lora_r):
    """Before the first optimiser step the policy is the one that sampled. With --recompute-logprobs the
    old pass used the very same micro-batches as the first update: ratio exactly 1, approx_kl and
    clipfrac exactly 0. By default the old log-probs are the sampler's (a KV-cached loop): the same to
    float rounding. Later minibatches move. And the sampler's log-probs equal a fresh forward's to 1e-4
    (with LoRA, adapters made non-zero first: the adapted policy's, to 1e-5)."""
    cfg = config(
        on_path, tiny_model_dir, f"ratio{recompute}{lora_r}", iterations=1, ppo_epochs=2, minibatches=2,
        temperature=0.8, recompute_logprobs=recompute, lora_r=lora_r,
    )  # fmt: skip
    run = setup(cfg)
    if lora_r:
        perturb_adapters(run.unwrapped.policy)
    ids, texts = run.prompts
    rollout, _ = rollout_for(run, ids[:8], texts[:8], seed=3)
    plans = [m for rows in online.minibatch_plan(8, 2, 0, 0, 0) for m in online.micro_plan(rollout, rows, 64)]
    online.old_pass(run.unwrapped, rollout, plans, torch.device("cpu"), cfg.temperature)
    torch.testing.assert_close(rollout.logprobs, rollout.out.logprobs, atol=1e-5 if lora_r else 1e-4, rtol=0)
    if lora_r:  # the adapter matters: its base weights alone (the reference) score the samples otherwise
        assert (rollout.ref_logprobs - rollout.logprobs).abs().max() > 1e-2

    run_iteration(run, 0)
    first = run.minibatch_stats[0]
    if recompute:
        assert first["policy/ratio_mean"] == 1.0
        assert first["policy/approx_kl"] == 0.0
    else:
        assert first["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
        assert first["policy/approx_kl"] < 1e-10
    assert first["policy/clipfrac"] == 0.0
    assert len(run.minibatch_stats) == 4
    assert any(s["policy/approx_kl"] > 1e-6 for s in run.minibatch_stats[1:])


def test_sampler_values_equal_a_fresh_pass(on_path, tiny_model_dir):
    """The trunk head's values read from the sampler's hidden states equal those of a fresh forward."""
    cfg = config(on_path, tiny_model_dir, "values", iterations=1)
    run = setup(cfg)
    with torch.no_grad():
        run.unwrapped.value_head.weight.normal_()
    ids, texts = run.prompts
    rollout, _ = rollout_for(run, ids[:8], texts[:8], seed=1, for_update=True)
    online.sampler_pass(run.unwrapped, rollout, [list(range(8))], torch.device("cpu"))
    cheap = rollout.values.clone()
    online.old_pass(run.unwrapped, rollout, [list(range(8))], torch.device("cpu"), cfg.temperature)
    torch.testing.assert_close(cheap, rollout.values, atol=1e-4, rtol=0)
    assert cheap.abs().sum() > 0


def test_a_synthetic_reward_rises_while_kl_stays_bounded(on_path, tiny_model_dir):
    """The score (about 0.5 for the random tiny model: one character in twenty is an e) climbs several
    fold within 30 iterations; the KL to the reference grows but stays below the 10 tokens x ln(384)
    nats that a policy ignoring the reference entirely could reach."""
    summary = train(config(on_path, tiny_model_dir, "rise", iterations=30, lr_schedule="constant"))
    rows = read_metrics(on_path / "rise")
    scores = [r["objective/scores"] for r in rows if "objective/scores" in r]
    early, late = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert late > early + 1.0, (early, late)
    kls = [r["objective/kl"] for r in rows if "objective/kl" in r]
    assert abs(kls[0]) < 1e-4, kls[0]  # iteration 1 samples from the reference itself: log-ratio 0
    assert summary["final"]["objective/kl"] == kls[-1] > 1.0, kls
    assert (on_path / "rise" / "model.safetensors").exists()
    assert (on_path / "rise" / "value_head.safetensors").exists()


def test_a_large_kl_coefficient_keeps_the_policy_near_the_reference(on_path, tiny_model_dir):
    """Same run, kl_coef 0 against 3: the penalty outweighs the score's gains, so the KL stays far lower
    (and so does the score)."""
    free = train(config(on_path, tiny_model_dir, "free", iterations=20, kl_coef=0.0, lr_schedule="constant"))
    held = train(config(on_path, tiny_model_dir, "held", iterations=20, kl_coef=3.0, lr_schedule="constant"))
    assert held["final"]["objective/kl"] < 0.5 * free["final"]["objective/kl"]
    assert free["final"]["objective/kl"] > 5.0


@pytest.mark.parametrize(("target", "direction"), [(1e-3, 1), (1e3, -1)])
def test_the_adaptive_controller_moves_the_coefficient_toward_its_target(
    on_path, tiny_model_dir, target, direction
):
    """KL far above a tiny target raises kl_coef every iteration after the first (whose KL is 0: the
    policy that sampled is the reference); far below a huge target lowers it every time."""
    train(
        config(on_path, tiny_model_dir, f"adaptive{direction}", iterations=6, target_kl=target, kl_horizon=80)
    )
    coefs = [r["kl_coef"] for r in read_metrics(on_path / f"adaptive{direction}") if "kl_coef" in r]
    assert coefs[0] == 0.05
    steps = [b - a for a, b in zip(coefs, coefs[1:], strict=False)]
    assert steps[0] < 0, "iteration 1 has KL 0, below any target"
    assert all(direction * s > 0 for s in steps[1:]), coefs


def test_resume_equals_an_uninterrupted_run(on_path, tiny_model_dir):
    """4 iterations straight, against 2 iterations, a checkpoint, then --resume to 4: same weights, value
    head, KL coefficient and metric rows (sampling seeds, prompt order and minibatches are fixed per
    iteration; optimiser state and the controller are restored)."""
    common = dict(lr_schedule="constant", target_kl=0.5, kl_horizon=100, minibatches=2, ppo_epochs=2)
    train(config(on_path, tiny_model_dir, "whole", iterations=4, **common))
    train(config(on_path, tiny_model_dir, "parts", iterations=2, save_every=2, **common))
    train(config(on_path, tiny_model_dir, "parts", iterations=4, resume=True, **common))
    for name in ("model.safetensors", "value_head.safetensors"):
        a, b = load_file(on_path / "whole" / name), load_file(on_path / "parts" / name)
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    keep = ("objective/scores", "objective/kl", "kl_coef", "policy/approx_kl")
    whole = [{k: r[k] for k in keep} for r in read_metrics(on_path / "whole") if "kl_coef" in r]
    parts = [{k: r[k] for k in keep} for r in read_metrics(on_path / "parts") if "kl_coef" in r]
    assert parts == whole


def test_the_completions_log_has_each_samples_rewards_kl_and_advantage(on_path, tiny_model_dir, caplog):
    """--log-completions 1: both iterations logged with all 8 samples; the means of the logged totals and
    sequence KLs are metrics.jsonl's objective/scores and objective/kl (0 at the first iteration, which
    samples from the reference itself); the advantages are finite; the terminal shows a best and a worst."""
    import json
    import logging

    with caplog.at_level(logging.INFO, logger="prefalign.train.completions"):
        train(config(on_path, tiny_model_dir, "logged", iterations=2, log_completions=1))
    rows = [json.loads(line) for line in (on_path / "logged" / "completions.jsonl").open()]
    metrics = {r["step"]: r for r in read_metrics(on_path / "logged") if "objective/scores" in r}
    assert [r["iteration"] for r in rows] == [1] * 8 + [2] * 8
    assert set(rows[0]) == {
        "iteration", "prompt", "completion", "reward", "reward/synthetic_rewards:share_of_e", "advantage", "kl"
    }  # fmt: skip
    for it in (1, 2):
        mine = [r for r in rows if r["iteration"] == it]
        assert sum(r["reward"] for r in mine) / 8 == pytest.approx(metrics[it]["objective/scores"], rel=1e-6)
        assert sum(r["kl"] for r in mine) / 8 == pytest.approx(
            metrics[it]["objective/kl"], rel=1e-5, abs=1e-7
        )
        assert all(r["reward"] == r["reward/synthetic_rewards:share_of_e"] for r in mine)
    assert all(abs(r["kl"]) < 1e-4 for r in rows[:8])
    assert any(r["advantage"] != 0 for r in rows) and all(abs(r["advantage"]) < 100 for r in rows)
    shown = [m for m in caplog.messages if m.startswith("iteration ")]
    assert len(shown) == 4 and shown[0].startswith("iteration 1 best: reward ")


def test_a_separate_value_model_trains_and_is_saved(on_path, tiny_model_dir):
    """Without a reward model the critic starts as a copy of the policy's weights with a new scalar head;
    two iterations of value updates move its trunk, and it is saved apart from the policy."""
    train(config(on_path, tiny_model_dir, "critic", iterations=2, shared_value_head=False))
    start = load_file(tiny_model_dir / "model.safetensors")
    critic = load_file(on_path / "critic" / "value_model" / "model.safetensors")
    policy = load_file(on_path / "critic" / "model.safetensors")
    trunk = sorted(set(start) & set(critic))
    assert len(trunk) >= len(start) - 1  # every weight of the policy but its vocabulary head
    assert any(not torch.equal(start[k], critic[k]) for k in trunk)
    assert any(not torch.equal(policy[k], critic[k]) for k in trunk)  # trained apart from the policy


def test_a_broken_reward_stops_the_cli_with_one_line_and_status_2(on_path, tiny_model_dir):
    result = subprocess.run(
        [sys.executable, "-m", "prefalign", "ppo", "--model", str(tiny_model_dir), "--prompts",
         str(on_path / "prompts.jsonl"), "--output", str(on_path / "broken"), "--reward",
         "synthetic_rewards:wrong_count", "--raw", "--iterations", "1", "--rollout-batch", "4",
         "--response-length", "4", "--no-progress", "--shared-value-head"],
        capture_output=True, text=True, cwd=on_path, env={"PYTHONPATH": str(on_path), "PATH": ""},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last
        == "prefalign ppo: error: reward synthetic_rewards:wrong_count: returned 1 scores for 4 completions"
    )
    assert "Traceback" not in result.stderr


def test_a_folder_holding_a_run_needs_resume_or_overwrite(on_path, tiny_model_dir):
    """A second run into the same --output is refused before any model loads; --overwrite replaces the
    run; --resume with other settings than the iteration budget names them."""
    from prefalign.config import ConfigError

    train(config(on_path, tiny_model_dir, "reuse", iterations=1))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(config(on_path, tiny_model_dir, "reuse", iterations=1))
    with pytest.raises(ConfigError, match="kl_coef"):
        train(config(on_path, tiny_model_dir, "reuse", iterations=2, resume=True, kl_coef=0.5))
    train(config(on_path, tiny_model_dir, "reuse", iterations=2, overwrite=True))
    assert [r["step"] for r in read_metrics(on_path / "reuse") if "kl_coef" in r] == [1, 2]


def test_a_temperature_too_small_to_sample_from_is_refused(on_path, tiny_model_dir):
    """1e-45 would divide the logits to infinity in the training passes (NaN losses): refused up front."""
    from prefalign.config import ConfigError

    with pytest.raises(ConfigError, match=r"temperature must be >= 1e-05"):
        config(on_path, tiny_model_dir, "cold", temperature=1e-45)
    assert config(on_path, tiny_model_dir, "warm", temperature=1e-5).temperature == 1e-5
