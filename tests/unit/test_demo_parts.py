"""The demo's pieces: the bundled prompts, preference pairs, the KL estimate, the frontier sentence."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from prefalign.demo import PROMPTS_FILE, Phase, load_demo_prompts, preference_pairs, steps_between_evals
from prefalign.evaluate import (
    best_of_n_kl,
    bootstrap_interval,
    evaluate_policy,
    result_from_records,
    sequence_kl,
)
from prefalign.report import _error_bars, frontier_plot, frontier_sentence

ROOT = Path(__file__).resolve().parents[2]


def test_bundled_prompts_are_300_distinct_movie_review_openings_with_a_fixed_split():
    rows = [json.loads(line) for line in PROMPTS_FILE.read_text().splitlines()]
    prompts = [r["prompt"] for r in rows]
    assert len(prompts) >= 300 and len(set(prompts)) == len(prompts)
    assert all(2 <= len(p.split()) <= 8 for p in prompts)
    train, test = load_demo_prompts(None)
    assert len(test) >= 64 and len(train) + len(test) == len(prompts)
    assert not set(train) & set(test)
    assert test == [r["prompt"] for r in rows if r["split"] == "test"]  # the split is in the file


def test_prompts_ship_in_the_wheel():
    """setuptools only packages non-Python files that package-data names."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    assert '"assets/*.jsonl"' in section


def test_four_samples_give_six_pairs_ordered_by_reward_and_ties_are_dropped():
    pairs, ties = preference_pairs("p", ["a", "b", "c", "d"], [0.5, -0.2, 0.9, 0.1])
    assert ties == 0 and len(pairs) == 6
    assert all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {
        ("a", "b"), ("c", "a"), ("a", "d"), ("c", "b"), ("d", "b"), ("c", "d"),
    }  # fmt: skip
    pairs, ties = preference_pairs("p", ["a", "b", "c", "d"], [0.0, 0.0, 0.3, 0.0])
    assert ties == 3 and sorted(p["rejected"] for p in pairs) == ["a", "b", "d"]


@pytest.mark.parametrize(
    ("steps", "evals", "every"), [(10, 3, 4), (9, 3, 3), (4, 3, 1), (40, 3, 14), (30, 3, 10), (7, 1, 7)]
)
def test_eval_spacing(steps, evals, every):
    """The training loop evaluates at multiples of eval_every and at the last step: 10 steps every 4 gives
    4, 8, 10; 4 steps need every step (every 2 would give only 2, 4)."""
    assert steps_between_evals(steps, evals) == every
    points = len([s for s in range(1, steps + 1) if s % every == 0 or s == steps])
    assert points >= min(evals, steps)


def test_sequence_kl_sums_the_log_ratio_over_response_tokens_only():
    """Row 0: (-1 - -2) + (-0.5 - -0.25) = 1 - 0.25 = 0.75; its third token is padding (mask 0)."""
    policy = torch.tensor([[-1.0, -0.5, -9.0], [-0.1, -0.2, -0.3]])
    ref = torch.tensor([[-2.0, -0.25, 0.0], [-0.1, -0.2, -0.3]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(sequence_kl(policy, ref, mask), torch.tensor([0.75, 0.0]))


def test_best_of_n_kl():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)


def test_evaluate_policy_kl_matches_a_naive_forward_pass(tokenizer, tiny_model):
    """KL of samples from pi = sum over their tokens of log pi - log pi_ref, here by one full forward pass
    per sample and model (no KV cache, no padding), on the same samples (same seed, same batch)."""
    from prefalign.data import encode_prompt
    from prefalign.generation import SamplingSettings, generate
    from prefalign.testing import tiny_causal_lm

    reference = tiny_causal_lm(tokenizer=tokenizer, seed=1)
    prompts = ["The film opens with", "I went into this movie"]
    result = evaluate_policy(
        tiny_model, reference, tokenizer, prompts, lambda p, c: [len(x) for x in c], max_new_tokens=6, seed=0
    )
    ids = [encode_prompt(tokenizer, p, raw=True) for p in prompts]
    out = generate(tiny_model, tokenizer, ids, SamplingSettings(max_new_tokens=6, seed=0), batch_size=64)
    assert out.texts == [r["completion"] for r in result.records]
    for i, record in enumerate(result.records):
        response = out.response_ids[i][out.response_mask[i].bool()].tolist()
        full = torch.tensor([ids[i] + response])
        total = 0.0
        for model, sign in ((tiny_model, 1.0), (reference, -1.0)):
            logps = model(full).logits[0, len(ids[i]) - 1 : -1].log_softmax(-1)
            total += sign * logps.gather(1, full[0, len(ids[i]) :, None]).sum().item()
        assert record["kl"] == pytest.approx(total, abs=1e-4)
        assert record["reward"] == len(record["completion"])
    assert result.kl == pytest.approx(sum(r["kl"] for r in result.records) / 2)
    same = evaluate_policy(reference, reference, tokenizer, prompts, lambda p, c: [0.0] * 2, max_new_tokens=6)
    assert abs(same.kl) < 1e-4


def test_result_means():
    r = result_from_records([{"reward": 1.0, "kl": 2.0}, {"reward": 0.0, "kl": 4.0}])
    assert (r.reward, r.kl) == (0.5, 3.0)


def test_bootstrap_interval_hand_examples():
    """Two prompts scoring 0 and 1: a resample of 2 prompts has mean 0, 1/2 or 1 with probabilities
    1/4, 1/2, 1/4, so its 2.5% and 97.5% quantiles are 0 and 1. A constant has a zero-width interval."""
    assert bootstrap_interval([0.0, 1.0]) == [0.0, 1.0]
    assert bootstrap_interval([0.3] * 5) == pytest.approx([0.3, 0.3])
    assert all(math.isnan(x) for x in bootstrap_interval([]))


def test_bootstrap_resamples_prompts_with_all_their_samples():
    """Samples [0, 0, 0, 1]. As four independent units, a resample's mean is k/4 with k ~ Binomial(4, 1/4):
    P(k >= 3) = 4 (1/4)^3 (3/4) + (1/4)^4 = 0.051 > 2.5% but P(k = 4) = 0.004 < 2.5%, so the 97.5% quantile
    is 0.75. Grouped as prompt a = [0, 0, 0] and prompt b = [1], a resample of the 2 prompts draws (b, b)
    with probability 1/4 (mean 1): the upper end is 1. The grouping comes from ``prompt_index``."""
    values = [0.0, 0.0, 0.0, 1.0]
    assert bootstrap_interval(values) == [0.0, 0.75]
    assert bootstrap_interval(values, groups=["a", "a", "a", "b"]) == [0.0, 1.0]
    records = [{"prompt_index": i, "reward": v, "kl": 1.0} for i, v in zip([0, 0, 0, 1], values, strict=True)]
    result = result_from_records(records)
    assert result.reward == 0.25 and result.reward_ci == [0.0, 1.0]
    assert result.kl_ci == pytest.approx([1.0, 1.0])


def test_several_samples_per_prompt_are_recorded_prompt_by_prompt(tokenizer, tiny_model):
    """K = 3: three rows per prompt, in prompt order, with their prompt's index; the rows of a prompt
    are different draws (the random stream advances), and the means are over all six samples."""
    prompts = ["The film opens with", "I went into this movie"]
    result = evaluate_policy(
        tiny_model, tiny_model, tokenizer, prompts, lambda p, c: [float(len(x)) for x in c], max_new_tokens=8,
        samples_per_prompt=3,
    )  # fmt: skip
    assert [r["prompt_index"] for r in result.records] == [0, 0, 0, 1, 1, 1]
    assert [r["prompt"] for r in result.records] == [prompts[0]] * 3 + [prompts[1]] * 3
    assert len({r["completion"] for r in result.records[:3]}) > 1
    assert result.reward == pytest.approx(sum(len(r["completion"]) for r in result.records) / 6)
    low, high = result.reward_ci
    assert low <= result.reward <= high


def _pt(method, kl, reward, half=0.01):
    return {"method": method, "kl": kl, "reward": reward, "reward_ci": [reward - half, reward + half]}


def test_frontier_sentence_says_which_way_it_falls():
    dpo = [_pt("dpo", 1.0, 0.4), _pt("dpo", 3.0, 0.6)]
    ppo = [_pt("ppo", 2.0, 0.3), _pt("ppo", 4.0, 0.5)]
    assert frontier_sentence(dpo + ppo).startswith("Here DPO's frontier dominates PPO's")
    worse = [_pt("dpo", 2.0, 0.2), _pt("dpo", 5.0, 0.45)]
    assert frontier_sentence(worse + ppo).startswith("Here PPO's frontier dominates DPO's")
    mixed = [_pt("dpo", 1.0, 0.4), _pt("dpo", 5.0, 0.45)]
    assert "beyond noise: 1 of 2 PPO checkpoints are beaten" in frontier_sentence(mixed + ppo)
    assert "not both run" in frontier_sentence(dpo)
    # beta-sweep runs count as DPO, target-KL runs as PPO; PPO-GT is neither
    sweep = [_pt("dpo-beta5", 0.5, 0.9), _pt("ppo-kl6", 1.0, 0.8), _pt("ppo-gt", 0.1, 1.0)]
    assert frontier_sentence(sweep).startswith("Here DPO's frontier dominates")


def test_a_difference_inside_the_intervals_is_called_noise():
    """DPO 0.45 ±0.1 at KL 1 against PPO 0.40 ±0.1 at KL 2: the means favour DPO, but the intervals
    [0.35, 0.55] and [0.30, 0.50] overlap, so DPO does not dominate; the sentence counts it as matched
    within the intervals. With half widths of 0.01 the same means separate and DPO dominates."""
    text = frontier_sentence([_pt("dpo", 1.0, 0.45, half=0.1), _pt("ppo", 2.0, 0.40, half=0.1)])
    assert text.startswith("Here neither frontier dominates the other beyond noise: 0 of 1 PPO")
    assert "1 more are matched in mean reward only" in text
    assert "best DPO reward 0.450 ±0.100 at KL 1.00" in text
    assert frontier_sentence([_pt("dpo", 1.0, 0.45), _pt("ppo", 2.0, 0.40)]).startswith(
        "Here DPO's frontier dominates PPO's"
    )


def test_an_exact_value_whose_interval_rounds_past_it_draws_no_negative_error_bar():
    """Best-of-N's KL is analytic: its interval has zero width, and float rounding can put its ends a
    hair above the value (a frontier run once failed at the plot on 0.6362943611198907 > ...906)."""
    kl = 0.6362943611198906
    point = {**_pt("best-of-4", kl, 0.3), "kl_ci": [0.6362943611198907] * 2}
    below, above = _error_bars([point], "kl")
    assert below == [0.0] and above == [pytest.approx(1e-16, abs=1e-15)]
    assert frontier_plot([_pt("reference", 0.0, 0.2), point]).startswith(b"\x89PNG")


def test_the_kl_sweep_moves_its_coefficient_within_a_laptop_run(tmp_path, monkeypatch):
    """Each ppo-kl run hands the trainer a controller horizon of one iteration's rollouts: with the
    trainer's 10000-sample default a 24-iteration run of 16 rollouts moves its coefficient under 1%, and
    targets 2, 6 and 12 gave three identical runs."""
    from prefalign.demo import methods
    from prefalign.demo.config import config_for_preset
    from prefalign.kl import AdaptiveKLController

    seen = {}
    monkeypatch.setattr(
        methods, "online", lambda demo, name, kind, prefs, learned, options: seen.update({name: options})
    )
    demo = type("D", (), {"config": config_for_preset("frontier")})()
    for name, run in methods.method_runs(demo, "ppo-kl-sweep", prefs={}):
        run(name)
    assert sorted(seen) == ["ppo-kl0.25", "ppo-kl1", "ppo-kl4"]
    assert {o["kl_horizon"] for o in seen.values()} == {16}
    # a KL of 1 nat held for 24 iterations: the three targets end at clearly different coefficients
    ends = []
    for o in seen.values():
        ctl = AdaptiveKLController(0.05, o["target_kl"], o["kl_horizon"])
        for _ in range(24):
            ctl.update(1.0, 16)
        ends.append(ctl.value)
    assert max(ends) / min(ends) > 100
    # the main PPO run keeps its fixed coefficient: no target, no horizon
    seen.clear()
    for name, run in methods.method_runs(demo, "ppo", prefs={}):
        run(name)
    assert seen["ppo"]["target_kl"] is None and "kl_horizon" not in seen["ppo"]


def test_phase_is_complete_only_with_the_same_inputs(tmp_path):
    phase = Phase("x", tmp_path / "x", {"lr": 1e-6})
    assert phase.completed() is None
    phase.reset(tmp_path)
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "x-step-1.jsonl").write_text("{}\n")
    phase.finish({"points": [{"samples": "samples/x-step-1.jsonl"}]}, 1.5)
    assert phase.completed()["wall_s"] == 1.5
    changed = Phase("x", tmp_path / "x", {"lr": 2e-6})
    assert changed.completed() is None
    changed.reset(tmp_path)  # a rerun removes the old samples of this phase
    assert not (tmp_path / "samples" / "x-step-1.jsonl").exists()


def test_a_resumed_run_reports_what_all_its_phases_cost():
    """A rerun that skips complete phases took seconds itself; the report gives the phases' sum as well."""
    from prefalign.report import _facts

    env = {"device": "cpu", "torch_threads": 2}
    phases = {"dpo": {"wall_s": 600.0, "skipped": True}, "ppo": {"wall_s": 400.4, "skipped": False}}
    resumed = _facts({"points": [], "methods": [], "wall_s": 410.0, "environment": env, "phases": phases})[-1]
    assert resumed.startswith("The phases took 1000 s in all on cpu") and "1 of them in an earlier" in resumed
    assert "this one took 410 s" in resumed
    phases["dpo"]["skipped"] = False
    fresh = _facts({"points": [], "methods": [], "wall_s": 1001.0, "environment": env, "phases": phases})[-1]
    assert fresh.startswith("Total wall time 1001 s on cpu")
