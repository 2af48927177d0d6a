"""KL-penalty coefficient controllers for RLHF (Ziegler et al. 2019, "Fine-Tuning Language Models from
Human Preferences", section 2.2)."""

from __future__ import annotations


class FixedKLController:
    """A constant KL coefficient ``beta``."""

    def __init__(self, coef: float) -> None:
        if coef < 0:
            raise ValueError(f"KL coefficient must be >= 0, got {coef}")
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """No-op; returns the (unchanged) coefficient."""
        return self.value


class AdaptiveKLController:
    """Steer the observed KL toward ``target`` by proportional control of the coefficient.

    ``e = clip(KL / target - 1, -0.2, 0.2)`` and ``beta <- beta * (1 + e * n_steps / horizon)``: when the
    policy drifts further than the target the penalty grows, when it stays closer it shrinks, by at
    most 20% per ``horizon`` steps.

    Args:
        init_kl_coef: starting coefficient.
        target: desired KL(pi || ref) per sample (nats).
        horizon: number of samples over which the coefficient may change by the full 20%.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if init_kl_coef < 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                f"need init_kl_coef >= 0, target > 0 and horizon > 0; got {init_kl_coef}, {target}, {horizon}"
            )
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Adjust the coefficient after ``n_steps`` samples whose mean KL was ``current_kl``; returns it."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value
