"""Textbook problems as exact models, each with a way to sample episodes.

* ``gridworld_4x4``: Sutton & Barto Example 4.1 (episodic, reward -1 per step, gamma 1).
* ``gridworld_5x5``: Sutton & Barto Example 3.5 / Figure 3.2 (A -> A' pays +10, B -> B' pays +5).
* ``random_walk``: Sutton & Barto Example 6.2 (five states, +1 on the right end).
* ``student_mrp`` / ``student_mdp``: David Silver's RL course, lecture 2.

Models sample episodes through ``MRP.sample_episode`` / ``MDP.sample_episode``; the ``*_START``
constants name the usual start states.
"""

from __future__ import annotations

import numpy as np

from prefalign.rl.mdp import MDP, MRP, Episode

# Sutton & Barto's order for the gridworld actions.
GRID_ACTIONS: tuple[str, ...] = ("up", "down", "right", "left")
GRID_ARROWS: tuple[str, ...] = ("↑", "↓", "→", "←")
_MOVES = ((-1, 0), (1, 0), (0, 1), (0, -1))


def _grid_step(rows: int, cols: int, s: int, a: int) -> tuple[int, bool]:
    """Deterministic move on a grid; returns (next state, bumped into the edge)."""
    r, c = divmod(s, cols)
    dr, dc = _MOVES[a]
    r2, c2 = r + dr, c + dc
    if 0 <= r2 < rows and 0 <= c2 < cols:
        return r2 * cols + c2, False
    return s, True


def gridworld_4x4() -> MDP:
    """Example 4.1: a 4x4 grid, states numbered row by row, corners 0 and 15 terminal.

    Every move costs -1; moves off the grid leave the state unchanged. gamma = 1 (undiscounted,
    episodic). Under the equiprobable random policy ``v_pi`` is 0, -14, -20, -22 along the first row.
    """
    rows = cols = 4
    S, A = rows * cols, len(GRID_ACTIONS)
    P = np.zeros((S, A, S))
    for s in range(S):
        for a in range(A):
            P[s, a, _grid_step(rows, cols, s, a)[0]] = 1.0
    R = np.full((S, A), -1.0)
    return MDP(P, R, gamma=1.0, terminal=[0, S - 1], actions=GRID_ACTIONS)


# Figure 3.2: the special states and where they send the agent.
GRID5_A, GRID5_A_PRIME, GRID5_B, GRID5_B_PRIME = 1, 21, 3, 13


def gridworld_5x5(gamma: float = 0.9) -> MDP:
    """Example 3.5 / Figure 3.2: a continuing 5x5 grid with two teleporting states.

    From A (row 0, column 1) every action moves to A' (row 4, column 1) with reward +10; from B
    (row 0, column 3) every action moves to B' (row 2, column 3) with reward +5. Other moves off the grid
    cost -1 and leave the state unchanged; all other moves pay 0. No terminal states.
    """
    rows = cols = 5
    S, A = rows * cols, len(GRID_ACTIONS)
    P = np.zeros((S, A, S))
    R = np.zeros((S, A))
    for s in range(S):
        for a in range(A):
            if s == GRID5_A:
                nxt, r = GRID5_A_PRIME, 10.0
            elif s == GRID5_B:
                nxt, r = GRID5_B_PRIME, 5.0
            else:
                nxt, bumped = _grid_step(rows, cols, s, a)
                r = -1.0 if bumped else 0.0
            P[s, a, nxt] = 1.0
            R[s, a] = r
    return MDP(P, R, gamma=gamma, actions=GRID_ACTIONS)


RANDOM_WALK_START = 3


def random_walk(n: int = 5) -> MRP:
    """Example 6.2: states ``0 | 1..n | n + 1`` with both ends terminal; start in the middle.

    Each step moves left or right with probability 1/2. Stepping into the right end pays +1, every
    other transition 0; gamma = 1. The true values of states 1..n are ``k / (n + 1)``, so 1/6 .. 5/6
    for the book's five states A..E.
    """
    S = n + 2
    P = np.zeros((S, S))
    R = np.zeros((S, S))
    for s in range(1, n + 1):
        P[s, s - 1] = P[s, s + 1] = 0.5
    P[0, 0] = P[S - 1, S - 1] = 1.0
    R[n, n + 1] = 1.0
    names = ["left"] + [chr(ord("A") + i) for i in range(n)] + ["right"]
    return MRP(P, R, gamma=1.0, terminal=[0, S - 1], states=names)


def sample_random_walk(n_episodes: int, rng: np.random.Generator, n: int = 5) -> list[Episode]:
    """``n_episodes`` episodes of the random walk, each starting in the centre state."""
    mrp = random_walk(n)
    start = (n + 1) // 2
    return [mrp.sample_episode(start, rng) for _ in range(n_episodes)]


STUDENT_STATES: tuple[str, ...] = ("C1", "C2", "C3", "Pass", "Pub", "FB", "Sleep")


def student_mrp(gamma: float = 1.0) -> MRP:
    """Silver's student MRP: three classes, the pub, Facebook, pass, and sleep (terminal).

    Rewards on leaving: classes -2, Pass +10, Pub +1, FB -1, Sleep 0. At gamma = 1 the values are
    C1 -13, C2 1.5, C3 4.3, Pass 10, Pub 0.8, FB -23 (rounded as in the slides).
    """
    C1, C2, C3, PASS, PUB, FB, SLEEP = range(7)
    P = np.zeros((7, 7))
    P[C1, [C2, FB]] = 0.5, 0.5
    P[C2, [C3, SLEEP]] = 0.8, 0.2
    P[C3, [PASS, PUB]] = 0.6, 0.4
    P[PASS, SLEEP] = 1.0
    P[PUB, [C1, C2, C3]] = 0.2, 0.4, 0.4
    P[FB, [FB, C1]] = 0.9, 0.1
    P[SLEEP, SLEEP] = 1.0
    R = np.array([-2.0, -2.0, -2.0, 10.0, 1.0, -1.0, 0.0])
    return MRP(P, R, gamma, terminal=[SLEEP], states=STUDENT_STATES)


STUDENT_MDP_STATES: tuple[str, ...] = ("FB", "C1", "C2", "C3", "Sleep")
# Each state offers two actions; their names differ by state (action index 0, action index 1).
STUDENT_MDP_ACTIONS: dict[str, tuple[str, str]] = {
    "FB": ("Facebook", "Quit"),
    "C1": ("Facebook", "Study"),
    "C2": ("Sleep", "Study"),
    "C3": ("Pub", "Study"),
    "Sleep": ("-", "-"),
}


def student_mdp(gamma: float = 1.0) -> MDP:
    """Silver's student MDP: two actions per state (see ``STUDENT_MDP_ACTIONS``), Sleep terminal.

    FB: Facebook (-1, stay) or Quit (0, to C1). C1: Facebook (-1, to FB) or Study (-2, to C2).
    C2: Sleep (0, to Sleep) or Study (-2, to C3). C3: Pub (+1, then C1/C2/C3 with 0.2/0.4/0.4) or
    Study (+10, to Sleep). Under the uniform random policy at gamma 1 the values are
    FB -2.3, C1 -1.3, C2 2.7, C3 7.4; the optimal values are 6, 6, 8, 10.
    """
    FB, C1, C2, C3, SLEEP = range(5)
    P = np.zeros((5, 2, 5))
    R = np.zeros((5, 2))
    P[FB, 0, FB], R[FB, 0] = 1.0, -1.0
    P[FB, 1, C1], R[FB, 1] = 1.0, 0.0
    P[C1, 0, FB], R[C1, 0] = 1.0, -1.0
    P[C1, 1, C2], R[C1, 1] = 1.0, -2.0
    P[C2, 0, SLEEP], R[C2, 0] = 1.0, 0.0
    P[C2, 1, C3], R[C2, 1] = 1.0, -2.0
    P[C3, 0, [C1, C2, C3]], R[C3, 0] = (0.2, 0.4, 0.4), 1.0
    P[C3, 1, SLEEP], R[C3, 1] = 1.0, 10.0
    P[SLEEP, :, SLEEP] = 1.0
    return MDP(P, R, gamma, terminal=[SLEEP], states=STUDENT_MDP_STATES, actions=("action 0", "action 1"))
