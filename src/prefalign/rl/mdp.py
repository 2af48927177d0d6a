"""Markov chains, Markov reward processes and Markov decision processes, solved exactly.

Notation follows David Silver's RL course (lecture 2) and Sutton & Barto, *Reinforcement Learning: An
Introduction* (2nd ed., 2018), as used in the lecture (``seed/lecture-dpo.txt``):

* ``P[s, s']`` (chain, MRP) or ``P[s, a, s']`` (MDP) are transition probabilities;
* ``R[s]`` (MRP) or ``R[s, a]`` (MDP) is the expected reward of leaving ``s`` (Silver's ``R_s^a =
  E[R_{t+1} | S_t = s, A_t = a]``). A reward that depends on the next state may be given instead as
  ``R[s, s']`` or ``R[s, a, s']``; the expectation is then taken over ``P``, and episode sampling uses
  the per-transition reward.
* ``terminal`` marks absorbing states whose value is 0 by definition. Transitions out of them are
  ignored, so ``gamma = 1`` is allowed for episodic problems provided every non-terminal state can
  reach a terminal one.

Bellman expectation equation of an MRP: ``v = R + gamma P v``, solved directly as
``v_N = (I - gamma P_NN)^-1 R_N`` over the non-terminal states ``N``. A policy ``pi[s, a]`` turns an MDP
into the MRP ``P_pi[s, s'] = sum_a pi[s, a] P[s, a, s']``, ``R_pi[s] = sum_a pi[s, a] R[s, a]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Episode:
    """One sampled trajectory ``s_0, r_1, s_1, r_2, ..., r_T, s_T``.

    Attributes:
        states: visited states, shape ``(T + 1,)``; ``states[-1]`` is the state after the last reward.
        rewards: ``rewards[t]`` is ``r_{t+1}``, received on leaving ``states[t]``; shape ``(T,)``.
        actions: ``actions[t]`` taken in ``states[t]``, shape ``(T,)``; ``None`` for chains and MRPs.
        terminated: True when ``states[-1]`` is terminal (its value is 0), False when the episode was
            cut off after ``max_steps`` (its value must be bootstrapped).
    """

    states: np.ndarray
    rewards: np.ndarray
    actions: np.ndarray | None = None
    terminated: bool = True

    def __len__(self) -> int:
        return len(self.rewards)


def _check_stochastic(P: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(P)) or np.any(P < 0):
        raise ValueError(f"{what}: probabilities must be finite and >= 0")
    sums = P.sum(axis=-1)
    bad = np.argwhere(np.abs(sums - 1.0) > 1e-6)
    if len(bad):
        idx = tuple(int(i) for i in bad[0])
        raise ValueError(f"{what}: row {idx if len(idx) > 1 else idx[0]} sums to {sums[idx]:.6g}, not 1")


def _check_gamma(gamma: float) -> float:
    gamma = float(gamma)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    return gamma


def _terminal_mask(terminal: np.ndarray | Sequence[int] | None, n_states: int) -> np.ndarray:
    if terminal is None:
        return np.zeros(n_states, dtype=bool)
    arr = np.asarray(terminal)
    if arr.dtype == bool:
        if arr.shape != (n_states,):
            raise ValueError(f"terminal mask has shape {arr.shape}, expected ({n_states},)")
        return arr.copy()
    idx = arr.astype(int).ravel()
    if np.any((idx < 0) | (idx >= n_states)):
        raise ValueError(f"terminal state indices {idx.tolist()} out of range [0, {n_states})")
    mask = np.zeros(n_states, dtype=bool)
    mask[idx] = True
    return mask


def _check_terminal_reachable(P: np.ndarray, terminal: np.ndarray) -> None:
    """For gamma = 1: every non-terminal state must reach a terminal state with positive probability.

    Args:
        P: ``(S, S)`` adjacency (any positive entry is an edge).
        terminal: ``(S,)`` boolean mask.
    """
    reach = terminal.copy()
    edges = P > 0
    while True:
        new = reach | (edges & reach[None, :]).any(axis=1)
        if np.array_equal(new, reach):
            break
        reach = new
    if not reach.all():
        stuck = np.flatnonzero(~reach).tolist()
        raise ValueError(
            f"gamma = 1 but no terminal state is reachable from state(s) {stuck}: values would be infinite"
        )


def _sample_next(cum: np.ndarray, rng: np.random.Generator) -> int:
    """Draw an index from a cumulative distribution ``cum`` (last entry 1)."""
    return int(min(np.searchsorted(cum, rng.random(), side="right"), len(cum) - 1))


class MarkovChain:
    """A finite Markov chain ``<S, P>``.

    Args:
        P: transition matrix, shape ``(S, S)``, rows summing to 1.
        states: optional state names (used for printing only).
    """

    def __init__(self, P: np.ndarray, states: Sequence[str] | None = None) -> None:
        P = np.asarray(P, dtype=float)
        if P.ndim != 2 or P.shape[0] != P.shape[1]:
            raise ValueError(f"P must be square (S, S), got shape {P.shape}")
        _check_stochastic(P, "P")
        self.P = P
        self.n_states = P.shape[0]
        self.states = list(states) if states is not None else [str(i) for i in range(self.n_states)]
        if len(self.states) != self.n_states:
            raise ValueError(f"{len(self.states)} state names for {self.n_states} states")
        self._cum = np.cumsum(P, axis=1)

    def stationary_distribution(self) -> np.ndarray:
        """The distribution ``mu`` with ``mu P = mu`` and ``sum(mu) = 1``, shape ``(S,)``.

        Unique when the chain is irreducible; otherwise one of the stationary distributions (the
        least-squares solution of the stacked linear system).
        """
        n = self.n_states
        A = np.vstack([self.P.T - np.eye(n), np.ones((1, n))])
        b = np.zeros(n + 1)
        b[-1] = 1.0
        mu, *_ = np.linalg.lstsq(A, b, rcond=None)
        mu = np.clip(mu, 0.0, None)
        return mu / mu.sum()

    def sample_states(
        self,
        start: int,
        rng: np.random.Generator,
        max_steps: int = 1000,
        stop: np.ndarray | Sequence[int] | None = None,
    ) -> np.ndarray:
        """Sample ``s_0 = start, s_1, ...`` until a state in ``stop`` or ``max_steps`` transitions.

        Returns:
            Visited states, shape ``(T + 1,)``.
        """
        stop_mask = _terminal_mask(stop, self.n_states)
        states = [int(start)]
        for _ in range(max_steps):
            if stop_mask[states[-1]]:
                break
            states.append(_sample_next(self._cum[states[-1]], rng))
        return np.asarray(states)


class MRP:
    """A Markov reward process ``<S, P, R, gamma>``.

    Args:
        P: transitions, shape ``(S, S)``.
        R: expected reward on leaving each state, shape ``(S,)``; or per transition, shape ``(S, S)``.
        gamma: discount factor in ``[0, 1]``.
        terminal: boolean mask ``(S,)`` or list of terminal state indices (value 0).
        states: optional state names.

    Raises:
        ValueError: rows not summing to 1, wrong shapes, gamma outside [0, 1], or gamma = 1 with a
            non-terminal state from which no terminal state is reachable.
    """

    def __init__(
        self,
        P: np.ndarray,
        R: np.ndarray,
        gamma: float,
        terminal: np.ndarray | Sequence[int] | None = None,
        states: Sequence[str] | None = None,
    ) -> None:
        self.chain = MarkovChain(P, states)
        self.P = self.chain.P
        self.n_states = self.chain.n_states
        self.states = self.chain.states
        R = np.asarray(R, dtype=float)
        S = self.n_states
        if R.shape == (S, S):
            self.R_transition: np.ndarray | None = R
            R = (self.P * R).sum(axis=1)
        elif R.shape == (S,):
            self.R_transition = None
        else:
            raise ValueError(f"R must have shape ({S},) or ({S}, {S}), got {R.shape}")
        self.R = R
        self.gamma = _check_gamma(gamma)
        self.terminal = _terminal_mask(terminal, S)
        if self.gamma == 1.0:
            _check_terminal_reachable(self.P, self.terminal)

    def values(self) -> np.ndarray:
        """Exact state values ``v = (I - gamma P)^-1 R`` over non-terminal states; 0 at terminals.

        Returns:
            ``v``, shape ``(S,)``.
        """
        v = np.zeros(self.n_states)
        live = ~self.terminal
        P_nn = self.P[np.ix_(live, live)]
        A = np.eye(int(live.sum())) - self.gamma * P_nn
        v[live] = np.linalg.solve(A, self.R[live])
        return v

    def bellman(self, v: np.ndarray) -> np.ndarray:
        """One Bellman expectation backup ``R + gamma P v`` (0 at terminals), shape ``(S,)``."""
        out = self.R + self.gamma * self.P @ v
        out[self.terminal] = 0.0
        return out

    def sample_episode(self, start: int, rng: np.random.Generator, max_steps: int = 10_000) -> Episode:
        """Sample an episode from ``start`` until a terminal state or ``max_steps`` transitions.

        Rewards are the per-transition rewards when ``R`` was given as ``(S, S)``, else ``R[s]``.
        """
        states = self.chain.sample_states(start, rng, max_steps, stop=self.terminal)
        s, s_next = states[:-1], states[1:]
        rewards = self.R_transition[s, s_next] if self.R_transition is not None else self.R[s]
        return Episode(states, np.asarray(rewards, dtype=float), None, bool(self.terminal[states[-1]]))


def greedy_policy(q: np.ndarray, tol: float = 1e-9) -> np.ndarray:
    """The greedy policy of action values, sharing probability equally among tied best actions.

    Args:
        q: action values, shape ``(S, A)``.
        tol: actions within ``tol`` of the best count as tied (so floating-point noise does not
            pick one arbitrarily).

    Returns:
        ``pi``, shape ``(S, A)``, each row uniform over ``argmax_a q[s, a]``.
    """
    best = q.max(axis=1, keepdims=True)
    ties = (q >= best - tol).astype(float)
    return ties / ties.sum(axis=1, keepdims=True)


class MDP:
    """A finite Markov decision process ``<S, A, P, R, gamma>``.

    Args:
        P: transitions, shape ``(S, A, S)``.
        R: expected reward of taking ``a`` in ``s``, shape ``(S, A)``; or per transition ``(S, A, S)``.
        gamma: discount factor in ``[0, 1]``.
        terminal: boolean mask ``(S,)`` or list of terminal state indices (value 0).
        states: optional state names.
        actions: optional action names.

    Raises:
        ValueError: rows not summing to 1, wrong shapes, gamma outside [0, 1], or gamma = 1 with a
            non-terminal state from which no terminal state is reachable under any actions.
    """

    def __init__(
        self,
        P: np.ndarray,
        R: np.ndarray,
        gamma: float,
        terminal: np.ndarray | Sequence[int] | None = None,
        states: Sequence[str] | None = None,
        actions: Sequence[str] | None = None,
    ) -> None:
        P = np.asarray(P, dtype=float)
        if P.ndim != 3 or P.shape[0] != P.shape[2]:
            raise ValueError(f"P must have shape (S, A, S), got {P.shape}")
        _check_stochastic(P, "P")
        S, A, _ = P.shape
        R = np.asarray(R, dtype=float)
        if R.shape == (S, A, S):
            self.R_transition: np.ndarray | None = R
            R = (P * R).sum(axis=2)
        elif R.shape == (S, A):
            self.R_transition = None
        else:
            raise ValueError(f"R must have shape ({S}, {A}) or ({S}, {A}, {S}), got {R.shape}")
        self.P, self.R = P, R
        self.n_states, self.n_actions = S, A
        self.gamma = _check_gamma(gamma)
        self.terminal = _terminal_mask(terminal, S)
        self.states = list(states) if states is not None else [str(i) for i in range(S)]
        self.actions = list(actions) if actions is not None else [str(i) for i in range(A)]
        if len(self.states) != S or len(self.actions) != A:
            raise ValueError(
                f"got {len(self.states)} state / {len(self.actions)} action names for P {P.shape}"
            )
        if self.gamma == 1.0:
            _check_terminal_reachable(P.max(axis=1), self.terminal)
        self._cum = np.cumsum(P, axis=2)

    def uniform_policy(self) -> np.ndarray:
        """The equiprobable random policy, shape ``(S, A)``."""
        return np.full((self.n_states, self.n_actions), 1.0 / self.n_actions)

    def check_policy(self, policy: np.ndarray) -> np.ndarray:
        """Validate a stochastic policy matrix ``(S, A)`` and return it as floats."""
        policy = np.asarray(policy, dtype=float)
        if policy.shape != (self.n_states, self.n_actions):
            raise ValueError(
                f"policy must have shape ({self.n_states}, {self.n_actions}), got {policy.shape}"
            )
        _check_stochastic(policy, "policy")
        return policy

    def induced_mrp(self, policy: np.ndarray) -> MRP:
        """The MRP of following ``policy``: ``P_pi = sum_a pi P``, ``R_pi = sum_a pi R``.

        Raises:
            ValueError: for gamma = 1 when the policy never reaches a terminal state from some state.
        """
        policy = self.check_policy(policy)
        P_pi = np.einsum("sa,sat->st", policy, self.P)
        R_pi = (policy * self.R).sum(axis=1)
        return MRP(P_pi, R_pi, self.gamma, self.terminal, self.states)

    def evaluate(self, policy: np.ndarray) -> np.ndarray:
        """Exact ``v_pi``, shape ``(S,)``, by solving the induced MRP's Bellman equation."""
        return self.induced_mrp(policy).values()

    def q_values(self, v: np.ndarray) -> np.ndarray:
        """Action values ``q(s, a) = R(s, a) + gamma sum_s' P(s'|s, a) v(s')``; 0 at terminals.

        Args:
            v: state values, shape ``(S,)``.

        Returns:
            ``q``, shape ``(S, A)``.
        """
        q = self.R + self.gamma * self.P @ np.asarray(v, dtype=float)
        q[self.terminal] = 0.0
        return q

    def greedy(self, v: np.ndarray, tol: float = 1e-9) -> np.ndarray:
        """The greedy policy with respect to ``v`` (ties share probability), shape ``(S, A)``."""
        return greedy_policy(self.q_values(v), tol)

    def sample_episode(
        self,
        start: int,
        policy: np.ndarray,
        rng: np.random.Generator,
        max_steps: int = 10_000,
    ) -> Episode:
        """Sample states, actions and rewards following ``policy`` from ``start``."""
        policy = self.check_policy(policy)
        pi_cum = np.cumsum(policy, axis=1)
        states, actions, rewards = [int(start)], [], []
        for _ in range(max_steps):
            s = states[-1]
            if self.terminal[s]:
                break
            a = _sample_next(pi_cum[s], rng)
            s2 = _sample_next(self._cum[s, a], rng)
            r = self.R_transition[s, a, s2] if self.R_transition is not None else self.R[s, a]
            states.append(s2)
            actions.append(a)
            rewards.append(float(r))
        return Episode(
            np.asarray(states),
            np.asarray(rewards, dtype=float),
            np.asarray(actions, dtype=int),
            bool(self.terminal[states[-1]]),
        )
