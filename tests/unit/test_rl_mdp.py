"""Markov chains, MRPs and MDPs against hand arithmetic and David Silver's student examples."""

from __future__ import annotations

import numpy as np
import pytest

from prefalign.rl import MDP, MRP, MarkovChain, greedy_policy, random_walk, student_mdp, student_mrp


def test_two_state_chain_stationary_distribution():
    """mu P = mu with P = [[0.9, 0.1], [0.5, 0.5]]: 0.1 mu0 = 0.5 mu1, so mu = (5/6, 1/6)."""
    chain = MarkovChain(np.array([[0.9, 0.1], [0.5, 0.5]]))
    np.testing.assert_allclose(chain.stationary_distribution(), [5 / 6, 1 / 6], atol=1e-12)


def test_chain_sampling_follows_the_transitions_and_stops():
    """A deterministic cycle 0 -> 1 -> 2 -> 0 visits states in order; stopping at 2 ends there."""
    chain = MarkovChain(np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=float))
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(chain.sample_states(0, rng, max_steps=4), [0, 1, 2, 0, 1])
    np.testing.assert_array_equal(chain.sample_states(0, rng, stop=[2]), [0, 1, 2])


def test_student_mrp_values_at_gamma_1_are_exact_81sts():
    """Solving v = R + P v by hand over the six live states gives denominators of 81:
    C3 = -2 + 0.6*10 + 0.4*Pub, Pub = 1 + 0.2 C1 + 0.4 C2 + 0.4 C3, ... =>
    C1 = -1016/81 (-12.54), C2 = 118/81 (1.46), C3 = 350/81 (4.32), Pass = 10, Pub = 65/81 (0.80),
    FB = -1826/81 (-22.54), Sleep = 0. Check: 4 + 0.4 * 65/81 = (324 + 26)/81 = 350/81.
    The slides print these rounded to -13, 1.5, 4.3, 10, 0.8, -23."""
    v = student_mrp(1.0).values()
    expected = np.array([-1016, 118, 350, 810, 65, -1826, 0]) / 81
    np.testing.assert_allclose(v, expected, atol=1e-12)
    np.testing.assert_allclose(np.round(v[[2, 3, 4]], 1), [4.3, 10.0, 0.8])


def test_student_mrp_values_at_gamma_0_9_match_the_slides():
    """Silver lecture 2, gamma = 0.9: C1 -5.0, C2 0.9, C3 4.1, Pass 10, Pub 1.9, FB -7.6, Sleep 0."""
    v = student_mrp(0.9).values()
    np.testing.assert_allclose(v, [-5.0, 0.9, 4.1, 10.0, 1.9, -7.6, 0.0], atol=0.05)
    mrp = student_mrp(0.9)
    np.testing.assert_allclose(mrp.bellman(v), v, atol=1e-12)  # v is the Bellman fixed point


def test_student_mdp_random_policy_values_are_exact_13ths():
    """Uniform policy, gamma 1: C3 = 0.5(10) + 0.5(1 + 0.2 C1 + 0.4 C2 + 0.4 C3), C2 = 0.5(0) + 0.5(-2 + C3),
    C1 = 0.5(-1 + FB) + 0.5(-2 + C2), FB = 0.5(-1 + FB) + 0.5(0 + C1). Solving: FB = -30/13 (-2.3),
    C1 = -17/13 (-1.3), C2 = 35/13 (2.7), C3 = 96/13 (7.4). Check C2: 0.5 (-2 + 96/13) = 35/13."""
    mdp = student_mdp()
    v = mdp.evaluate(mdp.uniform_policy())
    np.testing.assert_allclose(v, np.array([-30, -17, 35, 96, 0]) / 13, atol=1e-12)


def test_student_mdp_q_values_and_induced_mrp():
    """With v* = (6, 6, 8, 10, 0): q*(C3, Pub) = 1 + 0.2*6 + 0.4*8 + 0.4*10 = 9.4, q*(C3, Study) = 10,
    q*(C1, Facebook) = -1 + 6 = 5, q*(C1, Study) = -2 + 8 = 6. The induced MRP of the uniform policy
    has R_pi(C3) = (1 + 10)/2 = 5.5 and P_pi(C3 -> Sleep) = 0.5."""
    mdp = student_mdp()
    q = mdp.q_values(np.array([6.0, 6.0, 8.0, 10.0, 0.0]))
    np.testing.assert_allclose(q[3], [9.4, 10.0])
    np.testing.assert_allclose(q[1], [5.0, 6.0])
    np.testing.assert_allclose(q[4], [0.0, 0.0])  # terminal
    mrp = mdp.induced_mrp(mdp.uniform_policy())
    assert mrp.R[3] == pytest.approx(5.5)
    assert mrp.P[3, 4] == pytest.approx(0.5)


def test_greedy_policy_splits_ties():
    q = np.array([[1.0, 3.0, 3.0], [0.0, -1.0, -2.0]])
    np.testing.assert_allclose(greedy_policy(q), [[0, 0.5, 0.5], [1, 0, 0]])


def test_random_walk_values_and_episodes():
    """True values 1/6..5/6; an episode starts in C (state 3), ends at a terminal, and pays +1 only
    when it ends on the right."""
    mrp = random_walk()
    np.testing.assert_allclose(mrp.values()[1:6], np.arange(1, 6) / 6, atol=1e-12)
    rng = np.random.default_rng(1)
    for _ in range(20):
        ep = mrp.sample_episode(3, rng)
        assert ep.states[0] == 3 and ep.terminated and ep.states[-1] in (0, 6)
        assert ep.rewards.sum() == (1.0 if ep.states[-1] == 6 else 0.0)
        assert np.all(np.abs(np.diff(ep.states)) == 1)


def test_mdp_episode_sampling_uses_the_policy():
    """Always Study in the student MDP: FB -> Quit is action 1, then C1 -> C2 -> C3 -> Sleep,
    rewards 0, -2, -2, +10."""
    mdp = student_mdp()
    always_1 = np.tile([0.0, 1.0], (5, 1))
    ep = mdp.sample_episode(0, always_1, np.random.default_rng(0))
    np.testing.assert_array_equal(ep.states, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(ep.rewards, [0, -2, -2, 10])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"P": [[0.5, 0.4], [0, 1]], "R": [0, 0], "gamma": 0.9}, "row 0 sums to 0.9"),
        ({"P": [[1, 0], [0, 1]], "R": [0, 0, 0], "gamma": 0.9}, "R must have shape"),
        ({"P": [[1, 0], [0, 1]], "R": [0, 0], "gamma": 1.5}, "gamma must be in"),
        ({"P": [[1, 0], [0, 1]], "R": [0, 0], "gamma": 1.0}, "no terminal state is reachable"),
        ({"P": [[1, 0], [0, 1]], "R": [0, 0], "gamma": 1.0, "terminal": [1]}, "from state(s) [0]"),
        ({"P": [[1, 0, 0], [0, 1, 0]], "R": [0, 0], "gamma": 0.5}, "P must be square"),
    ],
)
def test_mrp_rejects_invalid_inputs(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        MRP(**kwargs)


def test_mdp_rejects_invalid_inputs_and_improper_policies():
    """Two states, state 1 terminal; action 0 stays in 0, action 1 goes to 1. At gamma 1 the MDP is
    fine (state 1 is reachable) but a policy that always stays has infinite cost."""
    P = np.zeros((2, 2, 2))
    P[0, 0, 0] = P[0, 1, 1] = P[1, :, 1] = 1.0
    R = np.full((2, 2), -1.0)
    mdp = MDP(P, R, gamma=1.0, terminal=[1])
    assert mdp.evaluate(np.array([[0.0, 1.0], [0.5, 0.5]]))[0] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="no terminal state is reachable"):
        mdp.evaluate(np.array([[1.0, 0.0], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="policy must have shape"):
        mdp.evaluate(np.ones((2, 3)) / 3)
    with pytest.raises(ValueError, match=r"R must have shape \(2, 2\)"):
        MDP(P, np.zeros(2), gamma=0.9)
    with pytest.raises(ValueError, match="P must have shape"):
        MDP(np.ones((2, 2)) / 2, R, gamma=0.9)
    with pytest.raises(ValueError, match="out of range"):
        MDP(P, R, gamma=0.9, terminal=[5])
