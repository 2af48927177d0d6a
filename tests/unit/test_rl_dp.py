"""Dynamic programming against Sutton & Barto's tables (Example 4.1 / Figure 4.1, Figure 3.2 / 3.5)."""

from __future__ import annotations

import numpy as np
import pytest

from prefalign.rl import (
    gridworld_4x4,
    gridworld_5x5,
    iterative_policy_evaluation,
    policy_iteration,
    student_mdp,
    value_iteration,
)
from prefalign.rl.envs import GRID5_A, GRID5_B

# Figure 4.1, right-hand column: v_pi of the equiprobable random policy (exact integers).
V_RANDOM_4X4 = np.array(
    [[0, -14, -20, -22], [-14, -18, -20, -20], [-20, -20, -18, -14], [-22, -20, -14, 0]], dtype=float
)


def test_example_4_1_random_policy_values_are_the_book_integers():
    mdp = gridworld_4x4()
    pi = mdp.uniform_policy()
    np.testing.assert_allclose(mdp.evaluate(pi).reshape(4, 4), V_RANDOM_4X4, atol=1e-10)
    v_iter = iterative_policy_evaluation(mdp, pi, tol=1e-12)
    np.testing.assert_allclose(v_iter.reshape(4, 4), V_RANDOM_4X4, atol=1e-9)


def test_example_4_1_sweep_1_and_2():
    """Sweep 1 from v0 = 0: every live state gets -1 + 0 = -1. Sweep 2, state 1 (top row, second cell):
    up bumps (stays, -1), down -> 5 (-1), right -> 2 (-1), left -> terminal (0), so
    v2 = -1 + (-1 - 1 - 1 + 0)/4 = -1.75; an interior state sees four -1 neighbours: -1 + (-1) = -2."""
    mdp = gridworld_4x4()
    pi = mdp.uniform_policy()
    v1 = iterative_policy_evaluation(mdp, pi, sweeps=1).reshape(4, 4)
    np.testing.assert_array_equal(v1, np.where(V_RANDOM_4X4 == 0, 0.0, -1.0))
    v2 = iterative_policy_evaluation(mdp, pi, sweeps=2).reshape(4, 4)
    a, b = -1.75, -2.0
    np.testing.assert_array_equal(v2, [[0, a, b, b], [a, b, b, b], [b, b, b, a], [b, b, a, 0]])


def test_example_4_1_sweep_3():
    """Sweep 3, state 1: -1 + (v2(1) + v2(5) + v2(2) + v2(0))/4 = -1 + (-1.75 - 2 - 2 + 0)/4 = -2.4375;
    state 5: -1 + (v2(1) + v2(9) + v2(6) + v2(4))/4 = -1 + (-1.75 - 2 - 2 - 1.75)/4 = -2.875;
    state 2: -1 + (-2 - 2 - 2 - 1.75)/4 = -2.9375; state 3: -1 + (-2 - 2 - 2 - 2)/4 = -3.
    The book prints these as -2.4, -2.9, -2.9, -3.0."""
    mdp = gridworld_4x4()
    v3 = iterative_policy_evaluation(mdp, mdp.uniform_policy(), sweeps=3).reshape(4, 4)
    a, b, c, d = -2.4375, -2.875, -2.9375, -3.0
    np.testing.assert_array_equal(v3, [[0, a, c, d], [a, b, d, c], [c, d, b, a], [d, c, a, 0]])


def test_example_4_1_sweep_10_matches_the_book_to_one_decimal():
    """Figure 4.1, k = 10: 0 -6.1 -8.4 -9.0 / -6.1 -7.7 -8.4 -8.4 / -8.4 -8.4 -7.7 -6.1 / -9.0 -8.4 -6.1 0."""
    mdp = gridworld_4x4()
    v10 = iterative_policy_evaluation(mdp, mdp.uniform_policy(), sweeps=10).reshape(4, 4)
    book = [[0, -6.1, -8.4, -9.0], [-6.1, -7.7, -8.4, -8.4], [-8.4, -8.4, -7.7, -6.1], [-9.0, -8.4, -6.1, 0]]
    np.testing.assert_allclose(v10, book, atol=0.05)
    assert v10[0, 1] == pytest.approx(-6.1380, abs=1e-4)


def test_in_place_sweeps_converge_to_the_same_values_in_fewer_sweeps():
    """Section 4.1: the in-place version uses new values as soon as they exist; same fixed point.
    After 3 in-place sweeps state 1 is already lower than the synchronous -2.4375."""
    mdp = gridworld_4x4()
    pi = mdp.uniform_policy()
    v = iterative_policy_evaluation(mdp, pi, in_place=True, tol=1e-12)
    np.testing.assert_allclose(v.reshape(4, 4), V_RANDOM_4X4, atol=1e-9)
    assert iterative_policy_evaluation(mdp, pi, sweeps=3, in_place=True)[1] < -2.4375


def test_example_4_1_optimal_values_are_minus_the_distance_to_a_corner():
    """Reward -1 per step, so v*(s) = -(Manhattan distance to the nearest terminal corner)."""
    mdp = gridworld_4x4()
    rows, cols = np.divmod(np.arange(16), 4)
    dist = np.minimum(rows + cols, (3 - rows) + (3 - cols))
    for result in (policy_iteration(mdp), value_iteration(mdp)):
        np.testing.assert_allclose(result.v, -dist, atol=1e-9)
    # From state 1 the only optimal move is left, into the corner.
    np.testing.assert_array_equal(policy_iteration(mdp).policy[1], [0, 0, 0, 1])


# Figure 3.2 (right): v_pi of the random policy, gamma 0.9, one decimal.
V_RANDOM_5X5 = [
    [3.3, 8.8, 4.4, 5.3, 1.5],
    [1.5, 3.0, 2.3, 1.9, 0.5],
    [0.1, 0.7, 0.7, 0.4, -0.4],
    [-1.0, -0.4, -0.4, -0.6, -1.2],
    [-1.9, -1.3, -1.2, -1.4, -2.0],
]
# Figure 3.5 (middle): v*, one decimal.
V_STAR_5X5 = [
    [22.0, 24.4, 22.0, 19.4, 17.5],
    [19.8, 22.0, 19.8, 17.8, 16.0],
    [17.8, 19.8, 17.8, 16.0, 14.4],
    [16.0, 17.8, 16.0, 14.4, 13.0],
    [14.4, 16.0, 14.4, 13.0, 11.7],
]


def test_figure_3_2_random_policy_values_to_one_decimal():
    mdp = gridworld_5x5()
    v = mdp.evaluate(mdp.uniform_policy()).reshape(5, 5)
    np.testing.assert_allclose(v, V_RANDOM_5X5, atol=0.05 + 1e-9)


def test_figure_3_2_optimal_values_and_v_star_of_a():
    """The optimal loop from A: +10 to A', then four moves up back to A (reward 0), so
    v*(A) = 10 + 0.9^5 v*(A) = 10 / (1 - 0.9^5) = 24.4194... From B the jump pays +5 to B', which is
    four moves from A: v*(B) = 5 + 0.9 * 0.9^4 v*(A) = 5 + 0.59049 * 24.4194 = 19.4194."""
    pi_result = policy_iteration(gridworld_5x5())
    vi_result = value_iteration(gridworld_5x5())
    expected_a = 10 / (1 - 0.9**5)
    assert pi_result.v[GRID5_A] == pytest.approx(expected_a, abs=1e-9)
    assert vi_result.v[GRID5_A] == pytest.approx(expected_a, abs=1e-9)
    np.testing.assert_allclose(pi_result.v.reshape(5, 5), V_STAR_5X5, atol=0.05 + 1e-9)
    assert pi_result.v[GRID5_B] == pytest.approx(5 + 0.9**5 * expected_a, abs=1e-9)


def test_policy_iteration_and_value_iteration_agree():
    for mdp in (gridworld_4x4(), gridworld_5x5(), student_mdp()):
        pi, vi = policy_iteration(mdp), value_iteration(mdp)
        np.testing.assert_allclose(pi.v, vi.v, atol=1e-8)
        np.testing.assert_array_equal(pi.policy, vi.policy)


def test_student_mdp_optimum():
    """Silver lecture 2: v* = FB 6, C1 6, C2 8, C3 10; the optimal policy is Quit, Study, Study, Study."""
    result = policy_iteration(student_mdp())
    np.testing.assert_allclose(result.v, [6, 6, 8, 10, 0], atol=1e-12)
    np.testing.assert_array_equal(result.policy[:4], [[0, 1]] * 4)


def test_policy_evaluation_gives_up_when_it_cannot_converge():
    mdp = gridworld_5x5()
    with pytest.raises(RuntimeError, match="did not converge"):
        iterative_policy_evaluation(mdp, mdp.uniform_policy(), max_sweeps=5)
