"""PPO's KL-penalty objective in prefalign.rl.ppo: the adaptive coefficient and its effect on an update."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from prefalign.config import ConfigError
from prefalign.rl.ppo import PPOConfig, RolloutCollector, adapt_kl_coef, build, train, update


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("kl", "expected"),
    [
        (0.02, 2.0),  # 0.02 > 1.5 * 0.01 = 0.015: double
        (0.015, 1.0),  # not above 0.015: keep
        (0.0067, 1.0),  # not below 0.01 / 1.5 = 0.00667: keep
        (0.006, 0.5),  # below 0.00667: halve
        (0.0, 0.5),
    ],
)
def test_adapt_kl_coef_follows_the_ppo_paper_rule(kl, expected):
    """Schulman et al. 2017, section 4, with d_targ = 0.01 and beta = 1."""
    assert adapt_kl_coef(1.0, kl, 0.01) == expected


def test_config_rejects_unknown_objective_and_bad_kl_settings():
    with pytest.raises(ConfigError, match="objective"):
        PPOConfig(objective="trpo")
    with pytest.raises(ConfigError, match="kl_coef"):
        PPOConfig(kl_coef=-1.0)
    with pytest.raises(ConfigError, match="kl_target"):
        PPOConfig(kl_target=0.0)


def test_a_large_kl_coefficient_keeps_the_updated_policy_close_to_the_old_one():
    """Same rollout, same model, same minibatch order: with beta = 0 the KL-penalty surrogate is the
    unclipped -A ratio and 20 epochs move the policy far; with beta = 100 the penalty holds it near the
    policy that collected the data. The clipped objective's KL lies in between the two."""
    cfg = PPOConfig(
        objective="kl", num_envs=4, rollout_steps=64, epochs=20, minibatch_size=64, lr=3e-3, progress=False
    )
    envs, model, _ = build(cfg)
    ro = RolloutCollector(envs, seed=0, gamma=cfg.gamma).collect(model, cfg.rollout_steps)
    envs.close()
    kls = {}
    for name, beta, objective in (("free", 0.0, "kl"), ("penalised", 100.0, "kl"), ("clip", 0.0, "clip")):
        m = copy.deepcopy(model)
        opt = torch.optim.Adam(m.parameters(), lr=cfg.lr)
        run_cfg = PPOConfig(**{**cfg.__dict__, "objective": objective})
        kls[name] = update(m, opt, ro, run_cfg, torch.Generator().manual_seed(0), kl_coef=beta)["policy/kl"]
    assert kls["penalised"] < 0.2 * kls["free"], kls
    assert kls["penalised"] < kls["clip"] < kls["free"], kls


def test_kl_objective_logs_and_adapts_its_coefficient(tmp_path):
    cfg = PPOConfig(
        objective="kl", kl_coef=1.0, kl_target=0.01, total_steps=2048, num_envs=4, rollout_steps=64,
        eval_every=0, eval_episodes=2, output=str(tmp_path), progress=False,
    )  # fmt: skip
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    coefs = [r["policy/kl_coef"] for r in rows]
    assert coefs[0] == 1.0
    for r, nxt in zip(rows, coefs[1:], strict=False):
        assert nxt == adapt_kl_coef(r["policy/kl_coef"], r["policy/kl"], 0.01)
    assert all(r["policy/kl"] >= 0 for r in rows)
