"""Model-free prediction from sampled episodes: Monte-Carlo, TD(0), and linear function approximation.

Sutton & Barto (2nd ed.): first-visit / every-visit MC (section 5.1), constant-alpha MC and TD(0)
(6.1-6.2, Example 6.2), gradient MC and semi-gradient TD(0) with linear features (9.3-9.4). The
lecture's linear update is ``w <- w - alpha (phi(s)^T w - G) phi(s)``.

Each estimator takes a list of :class:`~prefalign.rl.mdp.Episode` and returns the estimate after every
episode (row 0 is the initial estimate), so learning curves come for free.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from prefalign.rl.mdp import MRP, Episode


def discounted_returns(rewards: np.ndarray, gamma: float, bootstrap: float = 0.0) -> np.ndarray:
    """``G_t = r_{t+1} + gamma r_{t+2} + ... + gamma^{T-t-1} r_T + gamma^{T-t} bootstrap``.

    Args:
        rewards: ``r_1 .. r_T``, shape ``(T,)``.
        gamma: discount factor.
        bootstrap: value of the state after the last reward (0 for a terminated episode).

    Returns:
        ``G``, shape ``(T,)``.
    """
    G = np.empty(len(rewards))
    acc = float(bootstrap)
    for t in range(len(rewards) - 1, -1, -1):
        acc = rewards[t] + gamma * acc
        G[t] = acc
    return G


def _init_values(v0: float | np.ndarray, n_states: int) -> np.ndarray:
    v = np.full(n_states, float(v0)) if np.isscalar(v0) else np.array(v0, dtype=float)
    if v.shape != (n_states,):
        raise ValueError(f"v0 must be a scalar or shape ({n_states},), got {v.shape}")
    return v


def mc_prediction(
    episodes: Sequence[Episode],
    n_states: int,
    gamma: float = 1.0,
    *,
    first_visit: bool = True,
    alpha: float | None = None,
    v0: float | np.ndarray = 0.0,
) -> np.ndarray:
    """Monte-Carlo prediction: move ``V(s_t)`` toward the observed return ``G_t``.

    With ``alpha=None`` the estimate is the sample mean of the returns seen so far (the update
    ``V += (G - V) / N(s)``); with a number it is constant-alpha MC, ``V += alpha (G - V)``. Truncated
    episodes (``terminated=False``) bootstrap their tail from the current estimate of the last state.

    Args:
        episodes: sampled episodes.
        n_states: number of states ``S``.
        gamma: discount factor.
        first_visit: count only the first visit to a state in each episode (else every visit).
        alpha: constant step size, or None for sample averages.
        v0: initial estimate, scalar or shape ``(S,)``.

    Returns:
        Estimates after each episode, shape ``(len(episodes) + 1, S)``; row 0 is ``v0``.
    """
    v = _init_values(v0, n_states)
    counts = np.zeros(n_states)
    history = [v.copy()]
    for ep in episodes:
        tail = 0.0 if ep.terminated else v[ep.states[-1]]
        G = discounted_returns(ep.rewards, gamma, tail)
        states = ep.states[:-1]
        seen: set[int] = set()
        for t, s in enumerate(states):
            s = int(s)
            if first_visit:
                if s in seen:
                    continue
                seen.add(s)
            counts[s] += 1
            step = (1.0 / counts[s]) if alpha is None else alpha
            v[s] += step * (G[t] - v[s])
        history.append(v.copy())
    return np.asarray(history)


def td0_prediction(
    episodes: Sequence[Episode],
    n_states: int,
    gamma: float = 1.0,
    *,
    alpha: float,
    v0: float | np.ndarray = 0.0,
) -> np.ndarray:
    """TD(0): after each step, ``V(s) += alpha (r + gamma V(s') - V(s))``, with ``V(terminal) = 0``.

    Args:
        episodes: sampled episodes; the value after a terminated episode's last step is 0.
        n_states: number of states ``S``.
        gamma: discount factor.
        alpha: step size.
        v0: initial estimate, scalar or shape ``(S,)``.

    Returns:
        Estimates after each episode, shape ``(len(episodes) + 1, S)``; row 0 is ``v0``.
    """
    v = _init_values(v0, n_states)
    history = [v.copy()]
    for ep in episodes:
        T = len(ep.rewards)
        for t in range(T):
            s, s2 = int(ep.states[t]), int(ep.states[t + 1])
            nxt = 0.0 if (ep.terminated and t == T - 1) else v[s2]
            v[s] += alpha * (ep.rewards[t] + gamma * nxt - v[s])
        history.append(v.copy())
    return np.asarray(history)


def _feature_matrix(features: np.ndarray) -> np.ndarray:
    phi = np.asarray(features, dtype=float)
    if phi.ndim != 2:
        raise ValueError(f"features must be a (S, d) matrix of phi(s) rows, got shape {phi.shape}")
    return phi


def gradient_mc_linear(
    episodes: Sequence[Episode],
    features: np.ndarray,
    gamma: float = 1.0,
    *,
    alpha: float,
    w0: np.ndarray | None = None,
) -> np.ndarray:
    """Gradient Monte-Carlo with ``v(s, w) = phi(s)^T w``: ``w <- w - alpha (phi^T w - G_t) phi``.

    Every visit is an update, applied in time order within each episode (section 9.3).

    Args:
        episodes: sampled episodes.
        features: ``phi``, shape ``(S, d)``; row ``s`` is the feature vector of state ``s``.
        gamma: discount factor.
        alpha: step size.
        w0: initial weights, shape ``(d,)``; zeros by default.

    Returns:
        Weights after each episode, shape ``(len(episodes) + 1, d)``.
    """
    phi = _feature_matrix(features)
    w = np.zeros(phi.shape[1]) if w0 is None else np.array(w0, dtype=float)
    history = [w.copy()]
    for ep in episodes:
        tail = 0.0 if ep.terminated else float(phi[ep.states[-1]] @ w)
        G = discounted_returns(ep.rewards, gamma, tail)
        for t, s in enumerate(ep.states[:-1]):
            x = phi[s]
            w -= alpha * (x @ w - G[t]) * x
        history.append(w.copy())
    return np.asarray(history)


def semi_gradient_td0_linear(
    episodes: Sequence[Episode],
    features: np.ndarray,
    gamma: float = 1.0,
    *,
    alpha: float,
    w0: np.ndarray | None = None,
) -> np.ndarray:
    """Semi-gradient TD(0): ``w <- w + alpha (r + gamma phi(s')^T w - phi(s)^T w) phi(s)`` (section 9.3).

    The target is treated as a constant (hence "semi"); the value after a terminated episode is 0.

    Returns:
        Weights after each episode, shape ``(len(episodes) + 1, d)``.
    """
    phi = _feature_matrix(features)
    w = np.zeros(phi.shape[1]) if w0 is None else np.array(w0, dtype=float)
    history = [w.copy()]
    for ep in episodes:
        T = len(ep.rewards)
        for t in range(T):
            x = phi[ep.states[t]]
            nxt = 0.0 if (ep.terminated and t == T - 1) else float(phi[ep.states[t + 1]] @ w)
            w += alpha * (ep.rewards[t] + gamma * nxt - x @ w) * x
        history.append(w.copy())
    return np.asarray(history)


def rms_error(history: np.ndarray, true_v: np.ndarray, states: np.ndarray | Sequence[int]) -> np.ndarray:
    """Root-mean-square error over ``states`` of each estimate in ``history``.

    Args:
        history: estimates, shape ``(E + 1, S)``.
        true_v: true values, shape ``(S,)``.
        states: the states averaged over (e.g. the non-terminal ones).

    Returns:
        Shape ``(E + 1,)``.
    """
    idx = np.asarray(states)
    return np.sqrt(np.mean((history[:, idx] - true_v[idx]) ** 2, axis=1))


def td_vs_mc_rms(
    mrp: MRP,
    start: int,
    *,
    runs: int = 100,
    episodes: int = 100,
    td_alphas: Sequence[float] = (0.05, 0.1, 0.15),
    mc_alphas: Sequence[float] = (0.01, 0.02, 0.03, 0.04),
    v0: float = 0.5,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Sutton & Barto Figure 6.2 (right): RMS error of TD(0) and constant-alpha MC, averaged over runs.

    Each run samples ``episodes`` episodes from ``start`` and feeds the same episodes to every method
    (common random numbers), starting from ``V = v0`` on non-terminal states.

    Returns:
        ``{"TD alpha=0.05": curve, "MC alpha=0.01": curve, ...}``, each curve of shape
        ``(episodes + 1,)``: the RMS error over non-terminal states after 0, 1, ... episodes.
    """
    rng = np.random.default_rng(seed)
    true_v = mrp.values()
    live = np.flatnonzero(~mrp.terminal)
    init = np.where(mrp.terminal, 0.0, v0)
    curves: dict[str, np.ndarray] = {}
    for _ in range(runs):
        eps = [mrp.sample_episode(start, rng) for _ in range(episodes)]
        for a in td_alphas:
            h = td0_prediction(eps, mrp.n_states, mrp.gamma, alpha=a, v0=init)
            key = f"TD alpha={a:g}"
            curves[key] = curves.get(key, 0.0) + rms_error(h, true_v, live) / runs
        for a in mc_alphas:
            h = mc_prediction(eps, mrp.n_states, mrp.gamma, alpha=a, first_visit=False, v0=init)
            key = f"MC alpha={a:g}"
            curves[key] = curves.get(key, 0.0) + rms_error(h, true_v, live) / runs
    return curves
