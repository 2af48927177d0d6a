"""GRPO and RLOO on tiny models: the ratio at the first update, learning a synthetic reward, groups with
equal rewards, several weighted reward sources, exact resume and reward errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefalign.train import grpo, online, rloo
from prefalign.train.loop import read_metrics

COMMANDS = {"grpo": (grpo.GRPOConfig, grpo.train), "rloo": (rloo.RLOOConfig, rloo.train)}


def config(command: str, workdir: Path, model: Path, output: str, **overrides):
    settings = dict(
        model=str(model), prompts=str(workdir / "prompts.jsonl"), output=str(workdir / output),
        reward=["synthetic_rewards:share_of_e"], raw=True, rollout_batch=4, num_generations=4,
        response_length=10, progress=False, lr=5e-3, seed=0,
    )  # fmt: skip
    return COMMANDS[command][0](**{**settings, **overrides})


@pytest.mark.parametrize(("command", "lora_r"), [("grpo", 0), ("rloo", 0), ("grpo", 4), ("rloo", 4)])
def test_the_first_update_has_ratio_exactly_one(on_path, tiny_model_dir, command, lora_r):
    """One pass, one minibatch: the old log-probs are the detached current ones, so every ratio is
    exp(0) = 1 to the bit and the clip never acts, in both commands, with and without LoRA (adapters made
    non-zero first, so that the adapted policy is not its base)."""
    from prefalign.testing import perturb_adapters

    cfg = config(command, on_path, tiny_model_dir, f"ratio-{command}{lora_r}", iterations=1, lora_r=lora_r)
    run = grpo.setup(cfg, run_class=grpo.GroupRun if command == "grpo" else rloo.RLOORun)
    if lora_r:
        perturb_adapters(run.unwrapped.policy)
    run.run_iteration(0)
    (first,) = run.minibatch_stats
    assert first["policy/ratio_mean"] == 1.0
    assert first["policy/clip_ratio_low"] == first["policy/clip_ratio_high"] == 0.0
    assert first["policy/grad_norm"] > 0


def test_recomputed_old_logprobs_give_ratio_one_then_move(on_path, tiny_model_dir):
    """Two passes over two minibatches with --recompute-logprobs: the first minibatch's ratio is exactly 1
    (old pass in the same micro-batches), later ones moved."""
    cfg = config("grpo", on_path, tiny_model_dir, "ratio-2", iterations=1, ppo_epochs=2, minibatches=2,
                 recompute_logprobs=True)  # fmt: skip
    run = grpo.setup(cfg)
    run.run_iteration(0)
    assert run.minibatch_stats[0]["policy/ratio_mean"] == 1.0
    assert len(run.minibatch_stats) == 4
    assert any(s["policy/ratio_mean"] != 1.0 for s in run.minibatch_stats[1:])


@pytest.mark.parametrize("command", ["grpo", "rloo"])
def test_a_synthetic_reward_rises(on_path, tiny_model_dir, command):
    """The share-of-e score (about 0.5 for the random tiny model) climbs by more than 1 within 30
    iterations of 4 prompts x 4 samples; the final policy is saved as a Hugging Face folder."""
    summary = COMMANDS[command][1](
        config(command, on_path, tiny_model_dir, f"rise-{command}", iterations=30, lr_schedule="constant")
    )
    scores = [
        r["objective/scores"] for r in read_metrics(on_path / f"rise-{command}") if "objective/scores" in r
    ]
    early, late = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert late > early + 1.0, (early, late)
    kls = [r["objective/kl"] for r in read_metrics(on_path / f"rise-{command}") if "objective/kl" in r]
    assert abs(kls[0]) < 1e-4, kls[0]  # iteration 1 samples from the reference itself: log-ratio 0
    assert summary["final"]["objective/kl"] == kls[-1] > 0.1, kls
    assert (on_path / f"rise-{command}" / "model.safetensors").exists()
    assert (on_path / f"rise-{command}" / "config.json").exists()


def test_groups_with_equal_rewards_are_counted(on_path, tiny_model_dir, prefixes):
    """Prompts starting with "The" score 1 whatever the response: those groups have std 0 (advantages 0),
    and frac_reward_zero_std is their share of the iteration's groups."""
    cfg = config("grpo", on_path, tiny_model_dir, "flat", iterations=2, reward=["synthetic_rewards:flat_for_the"],
                 rollout_batch=8)  # fmt: skip
    grpo.train(cfg)
    got = [r["frac_reward_zero_std"] for r in read_metrics(on_path / "flat") if "frac_reward_zero_std" in r]
    expected = [
        sum(
            (prefixes * 4)[i].startswith("The") for i in online.iteration_prompts(len(prefixes) * 4, 8, 0, it)
        )
        / 8
        for it in range(2)
    ]
    assert got == pytest.approx(expected)


def test_several_weighted_sources_and_the_beta_alias(on_path, tiny_model_dir):
    """--reward twice with --reward-weights 1,0.5: each source is logged as reward/<source> and the score
    is their weighted sum; --beta sets kl_coef."""
    out = on_path / "weighted"
    result = subprocess.run(
        [sys.executable, "-m", "prefalign", "rloo", "--model", str(tiny_model_dir), "--prompts",
         str(on_path / "prompts.jsonl"), "--output", str(out), "--reward", "synthetic_rewards:share_of_e",
         "--reward", "synthetic_rewards:length", "--reward-weights", "1,0.5", "--beta", "0.3", "--raw",
         "--iterations", "1", "--rollout-batch", "2", "--num-generations", "2", "--response-length", "4",
         "--no-progress"],
        capture_output=True, text=True, cwd=on_path, env={"PYTHONPATH": str(on_path), "PATH": ""},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (row,) = [r for r in read_metrics(out) if "reward_std" in r]
    e, n = row["reward/synthetic_rewards:share_of_e"], row["reward/synthetic_rewards:length"]
    assert n > 0
    assert row["objective/scores"] == pytest.approx(e + 0.5 * n)
    assert row["kl_coef"] == 0.3
    assert json.loads((out / "summary.json").read_text())["settings"]["kl_coef"] == 0.3


@pytest.mark.parametrize("command", ["grpo", "rloo"])
def test_resume_equals_an_uninterrupted_run(on_path, tiny_model_dir, command):
    """4 iterations straight, against 2, a checkpoint, then --resume to 4: same weights and metric rows
    (two passes over two minibatches, so the sampler's old log-probs and the optimiser state matter)."""
    common = dict(lr_schedule="constant", minibatches=2, ppo_epochs=2, log_completions=1)
    train = COMMANDS[command][1]
    train(config(command, on_path, tiny_model_dir, f"whole-{command}", iterations=4, **common))
    train(config(command, on_path, tiny_model_dir, f"parts-{command}", iterations=2, save_every=2, **common))
    train(config(command, on_path, tiny_model_dir, f"parts-{command}", iterations=4, resume=True, **common))
    a = load_file(on_path / f"whole-{command}" / "model.safetensors")
    b = load_file(on_path / f"parts-{command}" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    keep = ("objective/scores", "objective/kl", "reward_std", "policy/ratio_mean")
    whole = [{k: r[k] for k in keep} for r in read_metrics(on_path / f"whole-{command}") if "reward_std" in r]
    parts = [{k: r[k] for k in keep} for r in read_metrics(on_path / f"parts-{command}") if "reward_std" in r]
    assert len(whole) == 4
    assert parts == whole
    logged = (on_path / f"whole-{command}" / "completions.jsonl").read_text()
    assert (on_path / f"parts-{command}" / "completions.jsonl").read_text() == logged
    assert [json.loads(line)["iteration"] for line in logged.splitlines()] == [
        i for i in (1, 2, 3, 4) for _ in range(16)
    ]


@pytest.mark.parametrize("command", ["grpo", "rloo"])
def test_sharing_the_prompt_changes_nothing_but_float_rounding(on_path, tiny_model_dir, command):
    """4 iterations, two passes over two minibatches (so the sampler's old log-probs, the reference's and
    the update's all meet in the ratio), with each group's prompt paid once and without: the same samples,
    the same metrics and weights to float rounding, and the first minibatch's ratio is 1."""
    common = dict(lr_schedule="constant", minibatches=2, ppo_epochs=2, iterations=4, lr=1e-3)
    train = COMMANDS[command][1]
    keep = ("objective/scores", "objective/kl", "reward_std", "policy/ratio_mean", "policy/loss")
    rows, weights = {}, {}
    for share in (True, False):
        out = f"share-{command}-{share}"
        train(config(command, on_path, tiny_model_dir, out, share_prompts=share, **common))
        rows[share] = [{k: r[k] for k in keep} for r in read_metrics(on_path / out) if "reward_std" in r]
        weights[share] = load_file(on_path / out / "model.safetensors")
    assert len(rows[True]) == 4
    for a, b in zip(rows[True], rows[False], strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    # Adam divides each step by the gradient's own size, so a weight whose gradient is near zero can move
    # by a good share of lr (1e-3) on rounding alone: the bound is lr / 10 on any weight, and nearly every
    # weight agrees to 1e-6
    for key, value in weights[True].items():
        diff = (value - weights[False][key]).abs()
        assert diff.max() < 1e-4 and (diff > 1e-6).float().mean() < 1e-2, (key, diff.max())
    cfg = config(command, on_path, tiny_model_dir, f"share-ratio-{command}", iterations=1, minibatches=2,
                 ppo_epochs=2, lr=1e-3)  # fmt: skip
    run = grpo.setup(cfg, run_class=grpo.GroupRun if command == "grpo" else rloo.RLOORun)
    run.run_iteration(0)
    assert run.minibatch_stats[0]["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("command", ["grpo", "rloo"])
def test_the_completions_log_holds_every_sample_of_the_logged_iterations(on_path, tiny_model_dir, command):
    """--log-completions 2 over 3 iterations logs iterations 1 and 2 (the first, then every second), each
    with all 4 x 4 samples. Per iteration the mean of the totals is metrics.jsonl's objective/scores;
    each source's field is its score of the logged completion and the total their weighted sum; GRPO's
    advantages are the group advantages of the logged rewards, RLOO's (leave-one-out) sum to 0 in a group."""
    from prefalign.losses import group_advantages

    name = f"logged-{command}"
    COMMANDS[command][1](
        config(command, on_path, tiny_model_dir, name, iterations=3, log_completions=2,
               reward=["synthetic_rewards:share_of_e", "synthetic_rewards:length"], reward_weights=[1.0, 0.1])
    )  # fmt: skip
    rows = [json.loads(line) for line in (on_path / name / "completions.jsonl").open()]
    metrics = {r["step"]: r for r in read_metrics(on_path / name) if "objective/scores" in r}
    assert sorted({r["iteration"] for r in rows}) == [1, 2]
    for it in (1, 2):
        mine = [r for r in rows if r["iteration"] == it]
        assert len(mine) == 16
        assert sum(r["reward"] for r in mine) / 16 == pytest.approx(metrics[it]["objective/scores"], rel=1e-6)
        for r in mine:
            text = r["completion"]
            e = 10 * text.count("e") / max(1, len(text))
            assert r["reward/synthetic_rewards:share_of_e"] == pytest.approx(e)
            assert r["reward/synthetic_rewards:length"] == len(text)
            assert r["reward"] == pytest.approx(e + 0.1 * len(text))
        assert all(len({r["prompt"] for r in mine[g : g + 4]}) == 1 for g in range(0, 16, 4))
        advantages = torch.tensor([r["advantage"] for r in mine])
        if command == "grpo":
            expected = group_advantages(torch.tensor([r["reward"] for r in mine]), 4, "group")
            torch.testing.assert_close(advantages, expected, atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(advantages.view(4, 4).sum(-1), torch.zeros(4), atol=1e-4, rtol=0)
        assert advantages.abs().sum() > 0


@pytest.mark.parametrize("command", ["grpo", "rloo"])
def test_a_broken_reward_stops_the_cli_with_one_line_and_status_2(on_path, tiny_model_dir, command):
    result = subprocess.run(
        [sys.executable, "-m", "prefalign", command, "--model", str(tiny_model_dir), "--prompts",
         str(on_path / "prompts.jsonl"), "--output", str(on_path / f"broken-{command}"), "--reward",
         "synthetic_rewards:wrong_count", "--raw", "--iterations", "1", "--rollout-batch", "2",
         "--num-generations", "2", "--response-length", "4", "--no-progress"],
        capture_output=True, text=True, cwd=on_path, env={"PYTHONPATH": str(on_path), "PATH": ""},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last
        == f"prefalign {command}: error: reward synthetic_rewards:wrong_count: returned 1 scores for 4 completions"
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["grpo", "rloo", "ppo"])
def test_the_samplers_log_normalisers_change_nothing_but_float_rounding(
    on_path, tiny_model_dir, monkeypatch, command
):
    """The first minibatch of each iteration reads the sampling distribution's log-normalisers off the
    sampler (no pass over the vocabulary in its forward); later minibatches, after a step, compute their
    own. Three iterations of two passes over two minibatches, with and without that: the same metrics and
    weights to float rounding."""
    from prefalign.train import ppo

    real = online.known_lse
    used = []

    def counted(run, rollout, micro):
        got = real(run, rollout, micro)
        used.append(got is not None)
        return got

    common = dict(lr_schedule="constant", minibatches=2, ppo_epochs=2, iterations=3, lr=1e-3)
    keep = ("objective/scores", "objective/kl", "policy/ratio_mean", "policy/loss")
    rows, weights = {}, {}
    for known in (True, False):
        monkeypatch.setattr(online, "known_lse", counted if known else lambda *a: None)
        out = f"lse-{command}-{known}"
        if command == "ppo":
            ppo.train(ppo.PPOConfig(
                model=str(tiny_model_dir), prompts=str(on_path / "prompts.jsonl"), output=str(on_path / out),
                reward="synthetic_rewards:share_of_e", raw=True, rollout_batch=8, response_length=10,
                shared_value_head=True, progress=False, seed=0, **common,
            ))  # fmt: skip
        else:
            COMMANDS[command][1](config(command, on_path, tiny_model_dir, out, **common))
        rows[known] = [
            {k: r[k] for k in keep if k in r} for r in read_metrics(on_path / out) if "policy/loss" in r
        ]
        weights[known] = load_file(on_path / out / "model.safetensors")
    assert any(used) and not all(used)  # (the first minibatches used it, the later ones could not)
    assert len(rows[True]) == 3
    for a, b in zip(rows[True], rows[False], strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    for key, value in weights[True].items():  # (the bound of the sharing test above, for the same reason)
        diff = (value - weights[False][key]).abs()
        assert diff.max() < 1e-4 and (diff > 1e-6).float().mean() < 1e-2, (key, diff.max())
