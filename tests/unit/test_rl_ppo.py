"""PPO/A2C: episode boundaries under gymnasium 1.x autoreset, the update, and short end-to-end runs."""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

from prefalign.config import ConfigError
from prefalign.rl.ppo import (
    ActorCritic,
    PPOConfig,
    Rollout,
    RolloutCollector,
    advantages_and_returns,
    make_envs,
    train,
    update,
)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny networks run fastest on one thread (and the test machine is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class CountEnv(gym.Env):
    """Observation = steps taken in the episode; reward 1 per step; the episode ends after ``length``
    steps, by termination or (``terminate=False``) by truncation."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, length: int = 3, terminate: bool = True) -> None:
        self.length, self.terminate, self.t = length, terminate, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        end = self.t >= self.length
        return np.array([self.t], np.float32), 1.0, end and self.terminate, end and not self.terminate, {}


class StubModel:
    """Always action 0 with log-prob 0; V(s) = 10 + obs."""

    def act(self, obs, deterministic=False):
        return torch.zeros(len(obs), dtype=torch.long), torch.zeros(len(obs)), self.value(obs)

    def value(self, obs):
        return 10.0 + obs[:, 0]


def _rollout(terminate: bool, gamma: float = 0.5) -> Rollout:
    envs = gym.vector.SyncVectorEnv([lambda: CountEnv(3, terminate)])
    return RolloutCollector(envs, seed=0, gamma=gamma).collect(StubModel(), steps=6)


def test_installed_gymnasium_uses_next_step_autoreset():
    """The rollout logic assumes NEXT_STEP: the step after an episode end returns reward 0 and the
    reset observation. If a gymnasium upgrade changed the default this fails first."""
    envs = gym.vector.SyncVectorEnv([lambda: CountEnv(1)])
    envs.reset(seed=0)
    _, r, term, _, _ = envs.step(np.array([0]))
    assert r[0] == 1.0 and term[0]
    obs, r, term, trunc, _ = envs.step(np.array([0]))
    assert r[0] == 0.0 and not term[0] and not trunc[0] and obs[0, 0] == 0.0
    assert envs.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP


def test_terminated_episode_boundaries():
    """Episodes of 3 steps in 6 vector steps: t = 0, 1, 2 real (done at 2), t = 3 the reset step
    (mask 0, reward 0), t = 4, 5 real. Observations 0, 1, 2, 3 (final), 0, 1; next_value = V(2) = 12."""
    ro = _rollout(terminate=True)
    np.testing.assert_array_equal(ro.obs[:, 0, 0], [0, 1, 2, 3, 0, 1])
    np.testing.assert_array_equal(ro.mask[:, 0], [1, 1, 1, 0, 1, 1])
    np.testing.assert_array_equal(ro.dones[:, 0], [0, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(ro.rewards[:, 0], [1, 1, 1, 0, 1, 1])
    assert ro.next_value[0] == 12.0


def test_truncated_episode_bootstraps_from_the_final_observation():
    """Same episodes cut by a time limit: the last step's reward becomes 1 + gamma V(final obs = 3)
    = 1 + 0.5 * 13 = 7.5, and the step still counts as done (nothing beyond is bootstrapped)."""
    ro = _rollout(terminate=False)
    np.testing.assert_array_equal(ro.rewards[:, 0], [1, 1, 7.5, 0, 1, 1])
    np.testing.assert_array_equal(ro.dones[:, 0], [0, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(ro.mask[:, 0], [1, 1, 1, 0, 1, 1])


def test_gae_returns_do_not_cross_the_episode_boundary():
    """lambda = 1 gives discounted returns, gamma 0.5. Truncated: R2 = 7.5, R1 = 1 + 0.5*7.5 = 4.75,
    R0 = 1 + 0.5*4.75 = 3.375; second episode R5 = 1 + 0.5 V(2) = 1 + 6 = 7, R4 = 1 + 0.5*7 = 4.5.
    The reset step (t = 3) and the next episode's values (V(0) = 10) never reach R0..R2."""
    ro = _rollout(terminate=False)
    adv, ret = advantages_and_returns(ro, gamma=0.5, lam=1.0)
    np.testing.assert_allclose(ret[[0, 1, 2, 4, 5], 0], [3.375, 4.75, 7.5, 4.5, 7.0])
    np.testing.assert_allclose(adv[:, 0], ret[:, 0] - ro.values[:, 0])


@pytest.mark.parametrize("vectorization", ["auto", "sync"])
def test_cartpole_reset_steps_are_masked(vectorization):
    """CartPole pays 1 per real step, so (before any truncation, impossible in 100 steps of 4 envs)
    rewards equal the mask exactly: every reset step has reward 0 and mask 0. Random init means
    several episodes end within 100 steps, so reset steps do occur."""
    envs = make_envs("CartPole-v1", 4, vectorization)
    torch.manual_seed(0)
    model = ActorCritic(4, 2, discrete=True, hidden=8)
    collector = RolloutCollector(envs, seed=0, gamma=0.99)
    ro = collector.collect(model, 100)
    assert (ro.mask == 0).sum() >= 4
    torch.testing.assert_close(ro.rewards, ro.mask)
    lengths = [n for _, n in collector.finished]
    assert sum(lengths) + collector.ep_length.sum() == int(ro.mask.sum())


def _two_action_rollout(masked_reward: float) -> Rollout:
    """16 steps of one env with observation 0: valid steps alternate actions 0/1 with rewards 0/1;
    four masked steps take action 0 with a huge reward. Every step is its own episode (done = 1)."""
    T = 16
    actions = torch.tensor([i % 2 for i in range(T)])
    rewards = actions.float().clone()
    mask = torch.ones(T)
    mask[:4], actions[:4], rewards[:4] = 0.0, 0, masked_reward
    return Rollout(
        obs=torch.zeros(T, 1, 1), actions=actions[:, None], logprobs=torch.full((T, 1), float(np.log(0.5))),
        values=torch.zeros(T, 1), rewards=rewards[:, None], dones=torch.ones(T, 1), mask=mask[:, None],
        next_value=torch.zeros(1),
    )  # fmt: skip


@pytest.mark.parametrize("algo", ["ppo", "a2c"])
def test_update_raises_the_probability_of_the_rewarded_action_and_ignores_masked_steps(algo):
    """Valid steps reward action 1 (A > 0) over action 0; the masked steps would favour action 0 by a
    reward of 100 if they leaked into the loss. pi(1|s) starts at 1/2 (zero output layer) and must grow."""
    torch.manual_seed(0)
    model = ActorCritic(1, 2, discrete=True, hidden=8)
    torch.nn.init.zeros_(model.actor[-1].weight)
    cfg = PPOConfig(algo=algo, epochs=4, minibatch_size=16, lr=0.01, progress=False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    stats = update(
        model, opt, _two_action_rollout(masked_reward=100.0), cfg, torch.Generator().manual_seed(0)
    )
    p1 = model.log_prob_entropy(torch.zeros(1, 1), torch.tensor([1]))[0].exp().item()
    assert p1 > 0.5
    assert {
        "loss",
        "policy/loss",
        "value/loss",
        "policy/entropy",
        "policy/approx_kl",
        "policy/clipfrac",
    } <= set(stats)


def test_orthogonal_init_scales_the_output_layers():
    """Policy head gain 0.01 (near-uniform initial policy), value head gain 1, biases 0."""
    torch.manual_seed(0)
    model = ActorCritic(4, 2, discrete=True)
    assert model.actor[-1].weight.norm() < 0.03
    assert 0.5 < model.critic[-1].weight.norm() < 1.5
    assert all(
        float(m.bias.detach().abs().max()) == 0.0 for m in model.modules() if isinstance(m, torch.nn.Linear)
    )
    probs = torch.softmax(model.actor(torch.randn(5, 4)), dim=-1)
    torch.testing.assert_close(probs, torch.full((5, 2), 0.5), atol=0.02, rtol=0)


def test_gaussian_policy_log_prob_sums_over_action_dimensions():
    """With mean 0 (zeroed head) and log std 0, log N(a; 0, 1) = -a^2/2 - ln(2 pi)/2 per dimension:
    for a = (1, 0): -0.5 - 0.9189 + (-0.9189) = -2.3379; entropy 2 (1/2 + ln(2 pi)/2) = 2.8379.
    With std (2, 1/2) the log-prob and entropy must match torch.distributions.Normal."""
    model = ActorCritic(3, 2, discrete=False, hidden=8)
    torch.nn.init.zeros_(model.actor[-1].weight)
    a = torch.tensor([[1.0, 0.0]])
    logp, ent = model.log_prob_entropy(torch.zeros(1, 3), a)
    assert logp.item() == pytest.approx(-0.5 - np.log(2 * np.pi), abs=1e-5)
    assert ent.item() == pytest.approx(1 + np.log(2 * np.pi), abs=1e-5)
    with torch.no_grad():
        model.log_std.copy_(torch.tensor([np.log(2.0), np.log(0.5)]))
    a = torch.tensor([[1.0, -0.3], [0.2, 0.7]])
    logp, ent = model.log_prob_entropy(torch.zeros(2, 3), a)
    ref = torch.distributions.Normal(torch.zeros(2, 2), torch.tensor([2.0, 0.5]).expand(2, 2))
    torch.testing.assert_close(logp, ref.log_prob(a).sum(-1))
    torch.testing.assert_close(ent, ref.entropy().sum(-1))


def test_discrete_log_prob_and_entropy_match_categorical():
    torch.manual_seed(0)
    model = ActorCritic(4, 3, discrete=True, hidden=8)
    torch.nn.init.normal_(model.actor[-1].weight)
    obs, a = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    logp, ent = model.log_prob_entropy(obs, a)
    ref = torch.distributions.Categorical(logits=model.actor(obs))
    torch.testing.assert_close(logp, ref.log_prob(a))
    torch.testing.assert_close(ent, ref.entropy())


def test_short_cartpole_run_writes_summary_and_metrics(tmp_path):
    cfg = PPOConfig(
        total_steps=1024, num_envs=4, rollout_steps=32, epochs=2, eval_every=512, output=str(tmp_path)
    )
    summary = train(PPOConfig(**{**cfg.__dict__, "progress": False}))
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["env_steps"] == summary["env_steps"] == 1024
    assert saved["eval_episodes"] == 10 and 8 <= saved["eval_return_mean"] <= 500
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1024 // 128
    assert sum("val/return_mean" in r for r in rows) == 2  # at 512 and 1024
    assert rows[0]["lr"] == pytest.approx(1e-3) and rows[-1]["lr"] < rows[0]["lr"]


def test_pendulum_continuous_actions_smoke(tmp_path):
    """A Gaussian policy on Pendulum-v1 (Box action in [-2, 2]) trains and evaluates; returns are
    negative costs, at worst about -16.3 per step x 200 steps."""
    summary = train(
        PPOConfig(
            env="Pendulum-v1", total_steps=512, num_envs=2, rollout_steps=64, epochs=2, minibatch_size=64,
            gamma=0.9, eval_every=0, eval_episodes=2, output=str(tmp_path), progress=False,
        )
    )  # fmt: skip
    assert -3300 < summary["eval_return_mean"] < 0
    assert summary["config"]["env"] == "Pendulum-v1"


def test_config_validation():
    with pytest.raises(ConfigError, match="algo must be ppo or a2c"):
        PPOConfig(algo="dqn")
    with pytest.raises(ConfigError, match="num_envs must be >= 1"):
        PPOConfig(num_envs=0)
