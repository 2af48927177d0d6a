"""Dynamic programming on a known MDP: policy evaluation, policy iteration, value iteration.

Sutton & Barto (2nd ed.), chapter 4: iterative policy evaluation (section 4.1, Figure 4.1), policy
iteration (4.3) and value iteration (4.4). Terminal states keep value 0 throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prefalign.rl.mdp import MDP


@dataclass(frozen=True)
class DPResult:
    """Outcome of policy or value iteration.

    Attributes:
        policy: greedy policy with respect to ``v``, shape ``(S, A)`` (tied actions share probability).
        v: state values, shape ``(S,)``.
        iterations: policy-improvement steps (policy iteration) or sweeps (value iteration).
    """

    policy: np.ndarray
    v: np.ndarray
    iterations: int


def _sweep_in_place(mdp: MDP, P_pi: np.ndarray, R_pi: np.ndarray, v: np.ndarray) -> np.ndarray:
    """One Gauss-Seidel sweep in state order (each backup sees the ones made before it)."""
    for s in range(mdp.n_states):
        if not mdp.terminal[s]:
            v[s] = R_pi[s] + mdp.gamma * P_pi[s] @ v
    return v


def iterative_policy_evaluation(
    mdp: MDP,
    policy: np.ndarray,
    sweeps: int | None = None,
    tol: float = 1e-10,
    in_place: bool = False,
    v0: np.ndarray | None = None,
    max_sweeps: int = 100_000,
) -> np.ndarray:
    """Apply the Bellman expectation backup ``v <- R_pi + gamma P_pi v`` sweep after sweep.

    With the default synchronous sweeps (every state backed up from the previous sweep's values),
    ``sweeps=k`` from ``v0 = 0`` gives exactly the ``k``-th table of Sutton & Barto's Figure 4.1.

    Args:
        mdp: the model.
        policy: ``pi[s, a]``, shape ``(S, A)``.
        sweeps: run exactly this many sweeps; ``None`` runs until the largest change is below ``tol``.
        tol: convergence threshold on ``max_s |v_new(s) - v(s)|`` when ``sweeps`` is None.
        in_place: update ``v`` state by state within a sweep (faster convergence, section 4.1).
        v0: initial values, shape ``(S,)``; zeros by default. Terminal entries are forced to 0.
        max_sweeps: give up (``RuntimeError``) after this many sweeps without convergence.

    Returns:
        ``v``, shape ``(S,)``.
    """
    mrp = mdp.induced_mrp(policy)
    v = np.zeros(mdp.n_states) if v0 is None else np.array(v0, dtype=float)
    v[mdp.terminal] = 0.0
    limit = sweeps if sweeps is not None else max_sweeps
    for _ in range(limit):
        old = v.copy()
        v = _sweep_in_place(mdp, mrp.P, mrp.R, v) if in_place else mrp.bellman(v)
        if sweeps is None and np.max(np.abs(v - old)) < tol:
            return v
    if sweeps is None:
        raise RuntimeError(f"policy evaluation did not converge to tol={tol} in {max_sweeps} sweeps")
    return v


def policy_iteration(mdp: MDP, policy: np.ndarray | None = None, max_iterations: int = 1000) -> DPResult:
    """Alternate exact evaluation and greedy improvement until the policy stops changing.

    Starts from the uniform random policy unless ``policy`` is given. The greedy step shares
    probability among tied actions, so a stable policy is detected exactly (no flip-flop between
    equally good actions, the bug noted in Sutton & Barto exercise 4.4).

    Returns:
        ``DPResult`` with the optimal policy and ``v*``.
    """
    pi = mdp.uniform_policy() if policy is None else mdp.check_policy(policy)
    for it in range(1, max_iterations + 1):
        v = mdp.evaluate(pi)
        new = mdp.greedy(v)
        if np.allclose(new, pi, atol=1e-12):
            return DPResult(new, v, it)
        pi = new
    raise RuntimeError(f"policy iteration did not stabilise in {max_iterations} iterations")


def value_iteration(mdp: MDP, tol: float = 1e-10, max_sweeps: int = 100_000) -> DPResult:
    """Bellman optimality backups ``v <- max_a [R(s, a) + gamma sum_s' P(s'|s, a) v(s')]``.

    Synchronous sweeps from ``v = 0`` until the largest change is below ``tol``; the policy is
    greedy in the final values.

    Returns:
        ``DPResult`` with ``v`` within about ``tol * gamma / (1 - gamma)`` of ``v*``.
    """
    v = np.zeros(mdp.n_states)
    for sweep in range(1, max_sweeps + 1):
        new = mdp.q_values(v).max(axis=1)
        delta = np.max(np.abs(new - v))
        v = new
        if delta < tol:
            return DPResult(mdp.greedy(v), v, sweep)
    raise RuntimeError(f"value iteration did not converge to tol={tol} in {max_sweeps} sweeps")
