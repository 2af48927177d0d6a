"""PPO and A2C for gymnasium environments with discrete or continuous (Gaussian) actions.

The algorithm follows Schulman et al. 2017 ("Proximal Policy Optimization Algorithms") with the
implementation details catalogued by Huang et al. 2022 ("The 37 Implementation Details of PPO",
the CleanRL blog post): vectorised environments, GAE (Schulman et al. 2016), per-minibatch advantage
normalisation, clipped surrogate, optionally clipped value loss, entropy bonus, global gradient-norm
clipping, linear learning-rate annealing, orthogonal initialisation. A2C (Mnih et al. 2016) is the
same loop with one gradient step per rollout, where the surrogate's ratio is 1 and its gradient is
the plain policy gradient ``-A grad log pi``. The defaults are rl-zoo3's tuned PPO settings for
CartPole-v1 (Raffin et al.; 8 envs x 32 steps, 20 epochs, gamma 0.98, lambda 0.8, lr 1e-3 annealed,
no entropy bonus) with two changes: minibatches of 128 instead of one of 256 (on seeds 0-9 every run
then reached a deterministic 475 within 24,576 env steps, against 8,192-65,536 with 256, and in less
total wall time), and a constant clip range of 0.2 instead of an annealed one. ``objective="kl"`` swaps
the clipped surrogate for the paper's other one, the KL penalty with an adaptive coefficient (section 4).

Episode boundaries with gymnasium >= 1.0 vector envs (autoreset mode ``NEXT_STEP``): the step that
ends an episode returns the episode's final observation, and the *next* call to ``step`` ignores the
action and returns the reset observation with reward 0. So in the rollout buffer

* a step that ends an episode has ``done = 1`` (no bootstrapping past it);
* if it was truncated (time limit) rather than terminated, the final state is not absorbing: its value
  ``V(s_final)`` is added to the reward as ``gamma * V(s_final)`` (Pardo et al. 2018). ``s_final`` is
  the observation stored at the next row (or the one after the rollout), whose value was computed
  anyway;
* the following reset step is not a transition of the MDP: its mask is 0 and it enters no loss, no
  advantage normalisation and no statistics.

Speed on a CPU: the networks are so small that every tensor operation costs its fixed overhead, not
its arithmetic, so the code keeps the number of operations per step low without changing the maths.
The actor's and critic's hidden layers run together as batched matmuls (:class:`ActorCritic`), all
parameters live in one flat vector updated by a written-out Adam (:class:`FlatAdam`, the same
update as ``torch.optim.Adam``) and clipped with one norm, a rollout is converted to tensors once, and
the entropy is kept out of autograd when its coefficient is 0.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from torch import Tensor, nn
from tqdm import tqdm

from prefalign.config import ConfigError, check_output_folder, config_to_dict
from prefalign.losses import gae, ppo_kl_penalty_loss, ppo_policy_loss, ppo_value_loss, whiten


@dataclass
class PPOConfig:
    """Train an actor-critic on a gymnasium environment with PPO (or A2C) and evaluate it."""

    env: str = "CartPole-v1"
    """Gymnasium environment id (discrete or Box action space)."""
    seed: int = 0
    """Seed for torch, the training envs and the evaluation envs."""
    total_steps: int = 100_000
    """Budget of environment steps (all vectorised envs together)."""
    output: str = "runs/ppo"
    """Folder for summary.json and metrics.jsonl."""
    algo: str = "ppo"
    """ppo, or a2c (one gradient step on the whole rollout; epochs and minibatch_size unused)."""
    num_envs: int = 8
    """Parallel environments."""
    rollout_steps: int = 32
    """Steps per environment between updates (batch = num_envs * rollout_steps)."""
    epochs: int = 20
    """Passes over each rollout."""
    minibatch_size: int = 128
    """Transitions per gradient step (128: two per default rollout of 256)."""
    lr: float = 1e-3
    """Adam learning rate (linearly annealed to 0 when anneal_lr)."""
    anneal_lr: bool = True
    """Anneal the learning rate linearly to 0 over total_steps."""
    gamma: float = 0.98
    """Discount factor."""
    gae_lambda: float = 0.8
    """GAE lambda."""
    clip: float = 0.2
    """PPO ratio clip range epsilon."""
    objective: str = "clip"
    """Policy surrogate: clip (L^CLIP) or kl (L^KLPEN: -A ratio + kl_coef KL(old || new); Schulman et al. 2017, section 4)."""
    kl_coef: float = 1.0
    """Initial KL coefficient beta of the kl objective."""
    kl_target: float | None = 0.01
    """kl objective: after each update beta doubles if the KL exceeded 1.5 x this and halves if it fell below it / 1.5; None keeps beta fixed."""
    value_clip: float | None = None
    """Clip range for the value loss around the rollout's values; None disables it."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus."""
    vf_coef: float = 0.5
    """Weight of the value loss."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip."""
    norm_adv: bool = True
    """Normalise advantages within each minibatch."""
    hidden: int = 64
    """Width of the two tanh hidden layers of the actor and of the critic."""
    eval_every: int = 8192
    """Deterministic evaluation every this many env steps (0: only at the end)."""
    eval_episodes: int = 10
    """Episodes per deterministic evaluation."""
    target_return: float | None = None
    """Stop once an evaluation's mean return reaches this (e.g. 475 for CartPole-v1); None: use the budget."""
    vectorization: str = "auto"
    """auto (the env's native vector version if it has one, else sync), sync, or async."""
    threads: int = 1
    """torch CPU threads (small networks are fastest on one)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if self.algo not in ("ppo", "a2c"):
            raise ConfigError(f"algo must be ppo or a2c, got {self.algo!r}")
        for name in ("total_steps", "num_envs", "rollout_steps", "epochs", "minibatch_size", "eval_episodes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.gamma <= 1 or not 0 <= self.gae_lambda <= 1:
            raise ConfigError(f"gamma and gae_lambda must be in [0, 1], got {self.gamma}, {self.gae_lambda}")
        if self.lr <= 0 or self.clip <= 0:
            raise ConfigError(f"lr and clip must be > 0, got {self.lr}, {self.clip}")
        if self.objective not in ("clip", "kl"):
            raise ConfigError(f"objective must be clip or kl, got {self.objective!r}")
        if self.kl_coef < 0 or (self.kl_target is not None and self.kl_target <= 0):
            raise ConfigError(f"kl_coef must be >= 0 and kl_target > 0, got {self.kl_coef}, {self.kl_target}")
        if self.vectorization not in ("auto", "sync", "async"):
            raise ConfigError(f"vectorization must be auto, sync or async, got {self.vectorization!r}")
        if self.env not in gym.envs.registry:
            raise ConfigError(
                f"env {self.env!r} is not a registered gymnasium environment (for example CartPole-v1, "
                "Acrobot-v1, Pendulum-v1)"
            )
        check_output_folder(self.output)


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
EVAL_SEED_OFFSET = 10_000
"""``train`` evaluates on episodes seeded ``seed + EVAL_SEED_OFFSET + i``, apart from the training envs' seeds."""


def _orthogonal(n_in: int, n_out: int, gain: float) -> Tensor:
    """An ``[n_in, n_out]`` weight for ``x @ W``, orthogonally initialised as ``nn.Linear(n_in, n_out)``'s would be."""
    return nn.init.orthogonal_(torch.empty(n_out, n_in), gain).T


class ActorCritic(nn.Module):
    """Separate actor and critic MLPs; categorical or diagonal-Gaussian (state-independent std) policy.

    Each network is ``obs -> hidden -> hidden -> out`` with tanh, orthogonally initialised (gain
    sqrt 2 for hidden layers, 0.01 for the actor's output, 1 for the critic's) with zero biases. The two
    share no weights, but their hidden layers have the same shapes, so each hidden layer stores the two
    weight matrices stacked, ``[2, n_in, n_out]`` (actor first), and computes both networks in one
    batched matmul: for networks this small the cost is per operation, not per multiply-add. Slice
    ``[0]`` is exactly the actor's layer and ``[1]`` the critic's.

    Args:
        obs_dim: flattened observation size.
        act_dim: number of discrete actions, or the Box action dimension.
        discrete: categorical (True) or Gaussian (False) policy.
        hidden: hidden width.
    """

    def __init__(self, obs_dim: int, act_dim: int, discrete: bool, hidden: int = 64) -> None:
        super().__init__()
        self.discrete = discrete
        g = math.sqrt(2.0)
        self.w1 = nn.Parameter(torch.stack([_orthogonal(obs_dim, hidden, g) for _ in range(2)]))
        self.b1 = nn.Parameter(torch.zeros(2, 1, hidden))
        self.w2 = nn.Parameter(torch.stack([_orthogonal(hidden, hidden, g) for _ in range(2)]))
        self.b2 = nn.Parameter(torch.zeros(2, 1, hidden))
        self.w_pi = nn.Parameter(_orthogonal(hidden, act_dim, 0.01))
        self.b_pi = nn.Parameter(torch.zeros(act_dim))
        self.w_v = nn.Parameter(_orthogonal(hidden, 1, 1.0))
        self.b_v = nn.Parameter(torch.zeros(1))
        self.log_std = None if discrete else nn.Parameter(torch.zeros(act_dim))

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """Actor output (logits ``[B, A]`` or Gaussian mean ``[B, act_dim]``) and ``V(s)`` ``[B]``."""
        h = torch.tanh(torch.baddbmm(self.b1, obs.expand(2, *obs.shape), self.w1))  # [2, B, hidden]
        h_pi, h_v = torch.tanh(torch.baddbmm(self.b2, h, self.w2)).unbind(0)
        return torch.addmm(self.b_pi, h_pi, self.w_pi), torch.addmm(self.b_v, h_v, self.w_v).squeeze(-1)

    def actor(self, obs: Tensor) -> Tensor:
        """The actor network alone: ``[B, obs_dim] -> [B, A]`` (logits or Gaussian mean)."""
        h = torch.tanh(torch.addmm(self.b1[0], obs, self.w1[0]))
        h = torch.tanh(torch.addmm(self.b2[0], h, self.w2[0]))
        return torch.addmm(self.b_pi, h, self.w_pi)

    def value(self, obs: Tensor) -> Tensor:
        """The critic network alone, ``V(s)``: ``[B, obs_dim] -> [B]``."""
        h = torch.tanh(torch.addmm(self.b1[1], obs, self.w1[1]))
        h = torch.tanh(torch.addmm(self.b2[1], h, self.w2[1]))
        return torch.addmm(self.b_v, h, self.w_v).squeeze(-1)

    def log_prob(self, out: Tensor, actions: Tensor) -> Tensor:
        """``log pi(a|s)`` ``[B]`` of ``actions`` from the actor's output ``out``.

        Categorical: ``log_softmax(logits)[a]``. Diagonal Gaussian with mean ``out`` and std
        ``exp(log_std)``: ``sum_i -(a_i - mu_i)^2 / (2 sigma_i^2) - log sigma_i - log(2 pi)/2``. Written
        out rather than through ``torch.distributions`` because the objects' overhead dominates for
        tiny networks.
        """
        if self.discrete:
            return torch.log_softmax(out, dim=-1).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
        log_std = self.log_std.expand_as(out)
        z = (actions - out) * torch.exp(-log_std)
        return (-0.5 * z**2 - log_std - _HALF_LOG_2PI).sum(-1)

    def entropy(self, out: Tensor) -> Tensor:
        """Entropy ``[B]`` of the policy at the actor's output ``out``.

        Categorical: ``-sum p log p``. Diagonal Gaussian: ``sum_i 1/2 + log(2 pi)/2 + log sigma_i``.
        """
        if self.discrete:
            logp_all = torch.log_softmax(out, dim=-1)
            return -(logp_all.exp() * logp_all).sum(-1)
        return (0.5 + _HALF_LOG_2PI + self.log_std.expand_as(out)).sum(-1)

    def log_prob_entropy(self, obs: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        """``log pi(a|s)`` and entropy for ``obs [B, obs_dim]``, ``actions [B]`` or ``[B, act_dim]``: ``[B]`` each."""
        out = self.actor(obs)
        return self.log_prob(out, actions), self.entropy(out)

    @torch.no_grad()
    def act(self, obs: Tensor, deterministic: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Sample (or take the mode of) the policy, with one forward pass for actor and critic.

        Returns:
            ``(actions [B] or [B, act_dim], log_probs [B], values [B])``.
        """
        out, value = self(obs)
        if deterministic:
            a = out.argmax(-1) if self.discrete else out
        elif self.discrete:
            a = torch.multinomial(torch.softmax(out, dim=-1), 1).squeeze(-1)
        else:
            a = out + torch.exp(self.log_std) * torch.randn_like(out)
        return a, self.log_prob(out, a), value


def make_envs(env_id: str, num_envs: int, vectorization: str = "auto") -> gym.vector.VectorEnv:
    """A gymnasium vector env in ``NEXT_STEP`` autoreset mode (the only mode the rollout handles)."""
    mode = None if vectorization == "auto" else vectorization
    envs = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode=mode)
    autoreset = envs.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
    if AutoresetMode(autoreset) != AutoresetMode.NEXT_STEP:
        raise ValueError(f"{env_id}: autoreset mode {autoreset} is not supported (need NEXT_STEP)")
    return envs


def _env_actions(actions: Tensor, space: gym.Space) -> np.ndarray:
    a = actions.numpy()
    if isinstance(space, gym.spaces.Box):
        return np.clip(a, space.low, space.high).astype(space.dtype)
    return a.astype(np.int64)


@dataclass
class Rollout:
    """One batch of experience, time first: every field is ``[T, N, ...]``.

    ``rewards`` already include ``gamma * V(s_final)`` on truncated steps; ``mask`` is 0 on reset
    steps (the step after an episode ended), which are not transitions of the MDP.
    """

    obs: Tensor
    actions: Tensor
    logprobs: Tensor
    values: Tensor
    rewards: Tensor
    dones: Tensor
    mask: Tensor
    next_value: Tensor  # [N]


class RolloutCollector:
    """Steps a vector env with a policy, tracking episode boundaries across rollouts."""

    def __init__(self, envs: gym.vector.VectorEnv, seed: int, gamma: float) -> None:
        self.envs, self.gamma = envs, gamma
        obs, _ = envs.reset(seed=seed)
        self.obs = torch.as_tensor(obs, dtype=torch.float32).reshape(envs.num_envs, -1)
        self.reset_next = np.zeros(envs.num_envs, dtype=bool)  # the coming step is a reset step
        self.ep_return = np.zeros(envs.num_envs)
        self.ep_length = np.zeros(envs.num_envs, dtype=int)
        self.finished: list[tuple[float, int]] = []  # (return, length) of episodes ended since last read

    def collect(self, model: ActorCritic, steps: int) -> Rollout:
        """Run ``steps`` vector steps; returns the rollout (see :class:`Rollout`).

        Per step only the policy's forward pass and the env step touch torch/numpy; everything is
        gathered in lists and numpy arrays and converted to tensors once at the end.
        """
        N = self.envs.num_envs
        obs_b, act_b, logp_b, val_b = [], [], [], []
        rew_b = np.zeros((steps, N), dtype=np.float32)
        term_b, trunc_b, mask_b = (np.zeros((steps, N), dtype=bool) for _ in range(3))
        space = self.envs.single_action_space
        with torch.no_grad():
            for t in range(steps):
                a, logp, value = model.act(self.obs)
                obs, r, term, trunc, _ = self.envs.step(_env_actions(a, space))
                rew_b[t] = r
                obs_b.append(self.obs)
                act_b.append(a)
                logp_b.append(logp)
                val_b.append(value)
                mask_b[t] = ~self.reset_next
                term_b[t], trunc_b[t] = term & mask_b[t], trunc & ~term & mask_b[t]
                self.reset_next = term_b[t] | trunc_b[t]
                self._track(r, mask_b[t], self.reset_next)
                # a copy: a vector env may hand back the same buffer at every step
                self.obs = torch.tensor(obs, dtype=torch.float32).reshape(N, -1)
            next_value = model.value(self.obs)
        values = torch.stack(val_b)
        # V(s_{t+1}) for every row: the value of the stored next observation (the final one when done).
        v_next = torch.cat([values[1:], next_value[None]], dim=0)
        rewards = torch.from_numpy(rew_b) + self.gamma * v_next * torch.from_numpy(trunc_b)
        return Rollout(
            obs=torch.stack(obs_b),
            actions=torch.stack(act_b),
            logprobs=torch.stack(logp_b),
            values=values,
            rewards=rewards,
            dones=torch.from_numpy(term_b | trunc_b).float(),
            mask=torch.from_numpy(mask_b).float(),
            next_value=next_value,
        )

    def _track(self, r: np.ndarray, valid: np.ndarray, done: np.ndarray) -> None:
        self.ep_return += np.where(valid, r, 0.0)
        self.ep_length += valid
        for i in np.flatnonzero(done):
            self.finished.append((float(self.ep_return[i]), int(self.ep_length[i])))
            self.ep_return[i], self.ep_length[i] = 0.0, 0


def advantages_and_returns(ro: Rollout, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """GAE over a rollout via ``prefalign.losses.gae`` (time on the last dimension): ``[T, N]`` each."""
    adv, ret = gae(ro.rewards.T, ro.values.T, ro.dones.T, ro.next_value, gamma, lam)
    return adv.T, ret.T


def adapt_kl_coef(beta: float, kl: float, target: float) -> float:
    """The adaptive KL coefficient of PPO's KL-penalty objective (Schulman et al. 2017, section 4).

    Returns ``2 beta`` if ``kl > 1.5 target``, ``beta / 2`` if ``kl < target / 1.5``, else ``beta``.
    """
    if kl > 1.5 * target:
        return beta * 2.0
    if kl < target / 1.5:
        return beta / 2.0
    return beta


def _minibatch_loss(
    model: ActorCritic, cfg: PPOConfig, beta: float, mb: tuple[Tensor, ...]
) -> tuple[Tensor, Tensor]:
    """The loss ``L^CLIP (or L^KLPEN) + vf_coef L^VF - ent_coef H`` of one minibatch, and its statistics.

    ``mb`` is ``(obs, actions, old_logprobs, old_values, advantages, returns)``. Without an entropy
    bonus (``ent_coef == 0``) the entropy is computed outside autograd: ``0 * H`` would still cost its
    backward pass and add exactly zero to every gradient.

    Returns:
        ``(loss, stats)``, stats ``[6]``: loss, policy loss, value loss, entropy, approx KL, clip fraction.
    """
    obs, act, old_logp, old_v, adv, ret = mb
    out, value = model(obs)
    logp = model.log_prob(out, act)
    a = whiten(adv) if cfg.norm_adv else adv
    if cfg.objective == "kl":
        pg_loss, pg_stats = ppo_kl_penalty_loss(logp, old_logp, a, beta=beta)
    else:
        pg_loss, pg_stats = ppo_policy_loss(logp, old_logp, a, clip=cfg.clip)
    v_loss = ppo_value_loss(value, old_v, ret, clip=cfg.value_clip)
    with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.ent_coef != 0):
        entropy = model.entropy(out).mean()
    loss = pg_loss + cfg.vf_coef * v_loss
    if cfg.ent_coef != 0:
        loss = loss - cfg.ent_coef * entropy
    clipfrac = pg_stats["clipfrac"] if "clipfrac" in pg_stats else torch.zeros(())
    stats = torch.stack((loss, pg_loss, v_loss, entropy, pg_stats["approx_kl"], clipfrac)).detach()
    return loss, stats


def update(
    model: ActorCritic,
    opt: FlatAdam | torch.optim.Optimizer,
    ro: Rollout,
    cfg: PPOConfig,
    gen: torch.Generator,
    kl_coef: float | None = None,
) -> dict[str, float]:
    """PPO epochs over one rollout (or one A2C step); returns mean statistics over gradient steps.

    Reset steps (mask 0) are dropped before minibatching, so they enter no loss, no advantage
    normalisation and no statistic; the remaining transitions are shuffled each epoch and split into
    minibatches of ``cfg.minibatch_size`` (the last one may be shorter; one of a single transition is
    skipped, since its advantage cannot be normalised). With ``cfg.objective == "kl"`` the policy loss
    is the KL-penalty surrogate with coefficient ``kl_coef`` (default ``cfg.kl_coef``).
    ``policy/kl`` is the mean k3 estimate of KL(old || new) over the rollout after the update.
    """
    beta = cfg.kl_coef if kl_coef is None else kl_coef
    adv, ret = advantages_and_returns(ro, cfg.gamma, cfg.gae_lambda)
    keep = ro.mask.reshape(-1) > 0
    flat = lambda x: x.reshape(-1, *x.shape[2:])[keep]  # noqa: E731
    data = tuple(flat(x) for x in (ro.obs, ro.actions, ro.logprobs, ro.values, adv, ret))
    obs, act, old_logp, old_v, _, ret = data
    n = obs.shape[0]
    epochs, size = (1, n) if cfg.algo == "a2c" else (cfg.epochs, cfg.minibatch_size)
    params = [p for group in opt.param_groups for p in group["params"]]
    names = ("loss", "policy/loss", "value/loss", "policy/entropy", "policy/approx_kl", "policy/clipfrac")
    stats: list[Tensor] = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        shuffled = [x[perm] for x in data]  # one gather per epoch; minibatches are slices of it
        for start in range(0, n - 1, size):
            loss, mb_stats = _minibatch_loss(
                model, cfg, beta, tuple(x[start : start + size] for x in shuffled)
            )
            opt.zero_grad(set_to_none=False)  # in place: flattened parameters' gradients are views
            loss.backward()
            clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            stats.append(mb_stats)
    means = torch.stack(stats).mean(0).tolist() if stats else [float("nan")] * len(names)
    result = dict(zip(names, means, strict=True))
    with torch.no_grad():
        d = model.log_prob(model.actor(obs), act) - old_logp
        result["policy/kl"] = float((torch.exp(d) - 1 - d).mean()) if n else float("nan")
    var_ret = ret.var() if n > 1 else torch.tensor(0.0)
    result["value/explained_variance"] = float(1 - (ret - old_v).var() / var_ret) if var_ret > 0 else 0.0
    return result


def evaluate(model: ActorCritic, env_id: str, episodes: int, seed: int) -> np.ndarray:
    """Returns of ``episodes`` deterministic episodes (policy mode), run side by side; shape ``[episodes]``.

    Episode ``i`` starts from ``reset(seed=seed + i)``.
    """
    envs = gym.vector.SyncVectorEnv([lambda: gym.make(env_id) for _ in range(episodes)])
    obs, _ = envs.reset(seed=[seed + i for i in range(episodes)])
    returns = np.zeros(episodes)
    running = np.ones(episodes, dtype=bool)
    while running.any():
        a, _, _ = model.act(
            torch.as_tensor(obs, dtype=torch.float32).reshape(episodes, -1), deterministic=True
        )
        obs, r, term, trunc, _ = envs.step(_env_actions(a, envs.single_action_space))
        returns += np.where(running, r, 0.0)
        running &= ~(term | trunc)
    envs.close()
    return returns


def flatten_parameters(model: nn.Module) -> nn.Parameter:
    """One vector holding all of ``model``'s parameters, whose tensors become views into it.

    The gradients are laid out the same way: each parameter's ``.grad`` is a view into the vector's
    ``.grad``, which backward accumulates into in place. An optimiser and a gradient-norm clip given the
    vector then treat the whole model as one tensor. The gradients must be zeroed in place, never set
    to ``None``.
    """
    params = list(model.parameters())
    flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params]))
    flat.grad = torch.zeros_like(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.data = flat.data[offset : offset + n].view_as(p)
        p.grad = flat.grad[offset : offset + n].view_as(p)
        offset += n
    return flat


def clip_grad_norm_(params: list[Tensor], max_norm: float) -> Tensor:
    """Scale the gradients of ``params`` in place so that their global L2 norm is at most ``max_norm``.

    ``torch.nn.utils.clip_grad_norm_``'s rule (multiply by ``min(1, max_norm / (norm + 1e-6))``) without
    its per-call grouping of tensors by device and type: on one flat parameter vector
    (:func:`flatten_parameters`) it is a handful of operations. Returns the norm before clipping.
    """
    grads = [p.grad for p in params if p.grad is not None]
    norms = [torch.linalg.vector_norm(g) for g in grads]
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef)
    return total


class FlatAdam:
    """Adam (Kingma & Ba 2015) on a model's parameters held as one flat vector (:func:`flatten_parameters`).

    The update of ``torch.optim.Adam``: with gradient ``g`` at step ``t``, ``m = b1 m + (1 - b1) g``,
    ``v = b2 v + (1 - b2) g^2`` and ``theta -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``,
    in the same operations, so the same numbers. Written out because PPO on a 64x64 MLP takes thousands
    of tiny steps, where ``torch.optim``'s per-call bookkeeping (hooks, parameter groups, per-tensor
    state) costs several times the arithmetic. Like torch's optimisers it reads
    ``param_groups[0]["lr"]`` at each step (for the learning-rate schedule) and offers ``zero_grad``
    (in place) and ``step``.
    """

    def __init__(
        self, model: nn.Module, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ):
        self.param = flatten_parameters(model)
        self.param_groups: list[dict[str, Any]] = [{"params": [self.param], "lr": lr}]
        self.betas, self.eps, self.t = betas, eps, 0
        self.m, self.v = torch.zeros_like(self.param), torch.zeros_like(self.param)

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the gradient vector in place (``set_to_none`` is accepted for the torch API and ignored)."""
        self.param.grad.zero_()

    def step(self) -> None:
        b1, b2 = self.betas
        self.t += 1
        g = self.param.grad
        with torch.no_grad():
            self.m.lerp_(g, 1 - b1)
            self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (self.v.sqrt() / math.sqrt(1 - b2**self.t)).add_(self.eps)
            self.param.addcdiv_(self.m, denom, value=-self.param_groups[0]["lr"] / (1 - b1**self.t))


def build(cfg: PPOConfig) -> tuple[gym.vector.VectorEnv, ActorCritic, FlatAdam]:
    """Seeded vector env, actor-critic sized for its spaces, and Adam (eps 1e-5, as in CleanRL/SB3) on
    the actor-critic's parameters as one flat vector (:class:`FlatAdam`)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    envs = make_envs(cfg.env, cfg.num_envs, cfg.vectorization)
    space = envs.single_action_space
    discrete = isinstance(space, gym.spaces.Discrete)
    if not discrete and not isinstance(space, gym.spaces.Box):
        raise ConfigError(f"{cfg.env}: action space {space} is neither Discrete nor Box")
    obs_dim = int(np.prod(envs.single_observation_space.shape))
    act_dim = int(space.n) if discrete else int(np.prod(space.shape))
    model = ActorCritic(obs_dim, act_dim, discrete, cfg.hidden)
    opt = FlatAdam(model, lr=cfg.lr, eps=1e-5)
    return envs, model, opt


def train(cfg: PPOConfig) -> dict[str, Any]:
    """Train, evaluate periodically, write ``summary.json``, ``metrics.jsonl`` and ``model.pt`` to ``cfg.output``.

    Sets torch's thread count to ``cfg.threads`` for the process.

    Returns:
        The summary: ``eval_return_mean``/``eval_return_std`` (last deterministic evaluation),
        ``env_steps`` (vector steps x envs, reset steps included), ``solved_steps`` (env steps at the
        first evaluation reaching ``target_return``, else None), ``wall_seconds`` (training and
        evaluations, from after ``build``: the span Stable-Baselines3's benchmark script times),
        ``setup_seconds`` (``build``: env, model, optimiser), and the config.
    """
    t_setup = time.perf_counter()
    out_dir = Path(cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    envs, model, opt = build(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    collector = RolloutCollector(envs, cfg.seed, cfg.gamma)
    batch = cfg.num_envs * cfg.rollout_steps
    n_updates = max(1, cfg.total_steps // batch)
    steps, solved, next_eval, last_eval = 0, None, cfg.eval_every or math.inf, (math.nan, math.nan)
    recent: list[float] = []
    kl_coef = cfg.kl_coef
    bar = tqdm(
        total=n_updates * batch,
        unit="step",
        disable=not cfg.progress,
        desc=f"{cfg.algo} {cfg.env}",
        mininterval=0.5,
    )
    t0 = time.perf_counter()
    with open(out_dir / "metrics.jsonl", "w") as log:
        for u in range(n_updates):
            if cfg.anneal_lr:
                opt.param_groups[0]["lr"] = cfg.lr * (1.0 - u / n_updates)
            ro = collector.collect(model, cfg.rollout_steps)
            steps += batch
            row: dict[str, Any] = {"env_steps": steps, "lr": opt.param_groups[0]["lr"]}
            row.update(update(model, opt, ro, cfg, gen, kl_coef))
            if cfg.objective == "kl":
                row["policy/kl_coef"] = kl_coef
                if cfg.kl_target is not None:
                    kl_coef = adapt_kl_coef(kl_coef, row["policy/kl"], cfg.kl_target)
            if collector.finished:
                rets = [r for r, _ in collector.finished]
                recent = (rets + recent)[:20]
                row["rollout/episodic_return"] = float(np.mean(rets))
                row["rollout/episodic_length"] = float(np.mean([n for _, n in collector.finished]))
                collector.finished.clear()
            if steps >= next_eval or u == n_updates - 1:
                evals = evaluate(model, cfg.env, cfg.eval_episodes, cfg.seed + EVAL_SEED_OFFSET)
                last_eval = (float(evals.mean()), float(evals.std()))
                row["val/return_mean"], row["val/return_std"] = last_eval
                next_eval += cfg.eval_every or math.inf
                if cfg.target_return is not None and last_eval[0] >= cfg.target_return:
                    solved = steps
            row["wall_seconds"] = time.perf_counter() - t0
            log.write(json.dumps(row) + "\n")
            bar.update(batch)
            bar.set_postfix(ret=f"{np.mean(recent):.1f}" if recent else "-", eval=f"{last_eval[0]:.1f}")
            if solved is not None:
                break
    wall = time.perf_counter() - t0
    bar.close()
    envs.close()
    summary = {
        "env": cfg.env, "algo": cfg.algo, "seed": cfg.seed, "env_steps": steps, "solved_steps": solved,
        "eval_return_mean": last_eval[0], "eval_return_std": last_eval[1], "eval_episodes": cfg.eval_episodes,
        "wall_seconds": wall, "setup_seconds": t0 - t_setup, "config": config_to_dict(cfg),
    }  # fmt: skip
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    torch.save(model.state_dict(), out_dir / "model.pt")
    return summary
