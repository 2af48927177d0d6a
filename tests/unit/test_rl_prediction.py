"""Model-free prediction: hand-worked updates and the random walk of Sutton & Barto Example 6.2."""

from __future__ import annotations

import numpy as np
import pytest

from prefalign.rl import (
    Episode,
    discounted_returns,
    gradient_mc_linear,
    mc_prediction,
    random_walk,
    semi_gradient_td0_linear,
    td0_prediction,
    td_vs_mc_rms,
)
from prefalign.rl.envs import RANDOM_WALK_START, sample_random_walk

# States 0 -> 1 -> 0 -> 2 (terminal), rewards 1, 2, 3.
LOOP = Episode(states=np.array([0, 1, 0, 2]), rewards=np.array([1.0, 2.0, 3.0]))


def test_discounted_returns():
    """gamma 0.5: G2 = 3, G1 = 2 + 0.5*3 = 3.5, G0 = 1 + 0.5*3.5 = 2.75; a bootstrap of 8 adds
    0.5^(3-t) * 8 = 1, 2, 4 to G0, G1, G2."""
    np.testing.assert_allclose(discounted_returns(LOOP.rewards, 0.5), [2.75, 3.5, 3.0])
    np.testing.assert_allclose(discounted_returns(LOOP.rewards, 0.5, bootstrap=8.0), [3.75, 5.5, 7.0])


def test_first_visit_and_every_visit_mc_differ_on_a_revisit():
    """gamma 1: G0 = 6, G1 = 5, G2 = 3. State 0 is visited at t = 0 and t = 2: first-visit V(0) = 6,
    every-visit V(0) = (6 + 3)/2 = 4.5. V(1) = 5 either way; the terminal state keeps v0 = 0."""
    first = mc_prediction([LOOP], 3, first_visit=True)
    every = mc_prediction([LOOP], 3, first_visit=False)
    assert first.shape == (2, 3)
    np.testing.assert_allclose(first[-1], [6.0, 5.0, 0.0])
    np.testing.assert_allclose(every[-1], [4.5, 5.0, 0.0])


def test_constant_alpha_mc_update():
    """alpha 0.5 from 0, every visit in time order: V(0) <- 0 + 0.5 (6 - 0) = 3, V(1) <- 0.5*5 = 2.5,
    then V(0) <- 3 + 0.5 (3 - 3) = 3."""
    v = mc_prediction([LOOP], 3, alpha=0.5, first_visit=False)[-1]
    np.testing.assert_allclose(v, [3.0, 2.5, 0.0])


def test_td0_update_by_hand():
    """alpha 0.5, gamma 1, V = 1 everywhere: t=0: V(0) += 0.5 (1 + V(1) - V(0)) = 1 + 0.5 = 1.5;
    t=1: V(1) += 0.5 (2 + 1.5 - 1) = 2.25; t=2: last step of a terminated episode, target 3:
    V(0) += 0.5 (3 - 1.5) = 2.25. The terminal state's own estimate (1) is never used."""
    v = td0_prediction([LOOP], 3, alpha=0.5, v0=1.0)[-1]
    np.testing.assert_allclose(v, [2.25, 2.25, 1.0])


def test_truncated_episode_bootstraps_from_the_last_state():
    """A cut-off episode 0 -> 1 with reward 1 and V(1) = 4: TD target 1 + 4 = 5, MC return 1 + 4 = 5;
    with alpha 1 both set V(0) = 5 (a terminated episode would give 1)."""
    cut = Episode(np.array([0, 1]), np.array([1.0]), terminated=False)
    v0 = np.array([0.0, 4.0])
    assert td0_prediction([cut], 2, alpha=1.0, v0=v0)[-1][0] == 5.0
    assert mc_prediction([cut], 2, alpha=1.0, v0=v0)[-1][0] == 5.0


def test_linear_methods_with_one_hot_features_equal_the_tabular_ones():
    """phi(s) = e_s makes phi^T w = w[s] and the gradient e_s, so w follows the tabular updates exactly."""
    eps = sample_random_walk(30, np.random.default_rng(3))
    phi = np.eye(7)
    w0 = np.full(7, 0.5)
    np.testing.assert_allclose(
        semi_gradient_td0_linear(eps, phi, alpha=0.1, w0=w0), td0_prediction(eps, 7, alpha=0.1, v0=w0)
    )
    np.testing.assert_allclose(
        gradient_mc_linear(eps, phi, alpha=0.1, w0=w0),
        mc_prediction(eps, 7, alpha=0.1, first_visit=False, v0=w0),
    )


def test_gradient_mc_linear_single_update_by_hand():
    """The lecture's w <- w - alpha (phi^T w - G) phi with phi(0) = (1, 2), w = (0.5, 0.5), G = 3,
    alpha 0.1: phi^T w = 1.5, error -1.5, w <- (0.5, 0.5) + 0.15 (1, 2) = (0.65, 0.8)."""
    ep = Episode(np.array([0, 1]), np.array([3.0]))
    phi = np.array([[1.0, 2.0], [0.0, 0.0]])
    w = gradient_mc_linear([ep], phi, alpha=0.1, w0=np.array([0.5, 0.5]))[-1]
    np.testing.assert_allclose(w, [0.65, 0.8])


def test_semi_gradient_td_with_state_aggregation_converges_near_the_true_values():
    """Aggregating A,B | C | D,E into three groups, TD with a small step still orders the groups
    correctly and puts the middle group at 0.5 = v(C) within 0.05."""
    groups = np.zeros((7, 3))
    groups[[1, 2], 0] = groups[3, 1] = groups[[4, 5], 2] = 1.0
    eps = sample_random_walk(2000, np.random.default_rng(0))
    w = semi_gradient_td0_linear(eps, groups, alpha=0.01)[-1]
    assert w[0] < w[1] < w[2]
    assert w[1] == pytest.approx(0.5, abs=0.05)


def test_sample_average_mc_converges_to_the_random_walk_values():
    """First-visit MC with sample means over 1000 episodes: each estimate is within 0.05 of k/6."""
    eps = sample_random_walk(1000, np.random.default_rng(0))
    v = mc_prediction(eps, 7)[-1]
    np.testing.assert_allclose(v[1:6], np.arange(1, 6) / 6, atol=0.05)


def test_td_beats_mc_on_the_random_walk_after_100_episodes():
    """Figure 6.2 (right): averaged over 100 runs, TD(0) with alpha 0.05 has a lower RMS error after 100
    episodes than constant-alpha MC with any of alpha 0.01 .. 0.04. All start at V = 0.5, whose RMS
    error is sqrt(mean((0.5 - k/6)^2)) = sqrt((1/9 + 1/36 + 0 + 1/36 + 1/9) / 5) = sqrt(1/18) = 0.2357."""
    curves = td_vs_mc_rms(random_walk(), RANDOM_WALK_START, runs=100, episodes=100, td_alphas=[0.05], seed=0)
    for curve in curves.values():
        assert curve[0] == pytest.approx(np.sqrt(1 / 18))
    td = curves["TD alpha=0.05"][100]
    best_mc = min(curves[f"MC alpha={a:g}"][100] for a in (0.01, 0.02, 0.03, 0.04))
    assert td < best_mc
    assert td < 0.06
