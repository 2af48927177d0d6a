"""KL controllers (Ziegler et al. 2019) against hand-worked updates."""

import pytest

from prefalign.kl import AdaptiveKLController, FixedKLController


def test_fixed_controller_never_moves():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 1000) == 0.05 and ctl.value == 0.05


def test_adaptive_controller_hand_example():
    """target 6, horizon 10000, coef 0.2.
    KL 9: e = clip(9/6 - 1) = clip(0.5) = 0.2; 256 steps -> 0.2 * (1 + 0.2 * 256/10000) = 0.201024.
    KL 5.4: e = 0.9 - 1 = -0.1; 1000 steps -> 0.201024 * (1 - 0.01) = 0.19901376."""
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10_000)
    assert ctl.update(9.0, 256) == pytest.approx(0.201024)
    assert ctl.update(5.4, 1000) == pytest.approx(0.19901376)
    assert ctl.value == pytest.approx(0.19901376)


def test_adaptive_controller_clips_large_errors_downward():
    """KL 0: e = clip(-1) = -0.2; horizon 100, 100 steps -> coef * 0.8."""
    ctl = AdaptiveKLController(1.0, target=1.0, horizon=100)
    assert ctl.update(0.0, 100) == pytest.approx(0.8)


@pytest.mark.parametrize("args", [(-1.0, 1.0, 10), (1.0, 0.0, 10), (1.0, 1.0, 0)])
def test_adaptive_controller_validates(args):
    with pytest.raises(ValueError):
        AdaptiveKLController(*args)
