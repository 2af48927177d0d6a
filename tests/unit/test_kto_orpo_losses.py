"""KTO and ORPO against numbers worked out by hand (sigma(1) = 0.7310586, sigma(3) = 0.9525741)."""

from __future__ import annotations

import math

import pytest
import torch

from prefalign.losses import kto_loss, kto_reference_point, log1m_exp, orpo_loss

SIG1 = 1 / (1 + math.exp(-1))  # 0.7310586
SIG3 = 1 / (1 + math.exp(-3))  # 0.9525741


def test_kto_at_equal_policy_and_reference_is_half_the_weight():
    """r = 0 and z0 = 0: every example scores 1 - sigma(0) = 1/2, times its weight;
    mean of (1 * 0.5, 3 * 0.5) = 1.0."""
    zeros = torch.zeros(2)
    loss = kto_loss(zeros, zeros, torch.tensor([True, False]), 0.0, beta=0.3, undesirable_weight=3.0)
    assert loss.item() == pytest.approx(1.0, abs=1e-7)


def test_kto_hand_example_with_a_reference_point():
    """beta 2, z0 0.5, r = [1, -1], labels [desirable, undesirable], w_u 1.5:
    desirable 1 - sigma(2 (1 - 0.5)) = 1 - sigma(1) = 0.2689414;
    undesirable 1.5 (1 - sigma(2 (0.5 + 1))) = 1.5 (1 - sigma(3)) = 0.0711389; mean 0.1700401."""
    policy = torch.tensor([-3.0, -6.0])
    reference = torch.tensor([-4.0, -5.0])
    loss = kto_loss(policy, reference, torch.tensor([1, 0]), 0.5, beta=2.0, undesirable_weight=1.5)
    expected = ((1 - SIG1) + 1.5 * (1 - SIG3)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.1700401, abs=1e-7)


def test_kto_reference_point_is_clamped_and_carries_no_gradient():
    """The mismatched pairs' mean log-ratio: (0.5 + 1.5) / 2 = 1.0; a negative mean is clamped to 0.
    The loss's gradient reaches the policy's log-probs but never the KL term."""
    policy_kl = torch.tensor([-1.5, -2.5], requires_grad=True)
    z0 = kto_reference_point(policy_kl, torch.tensor([-2.0, -4.0]))
    assert z0.item() == pytest.approx(1.0) and not z0.requires_grad
    assert kto_reference_point(torch.tensor([-3.0]), torch.tensor([-2.0])).item() == 0.0
    policy = torch.tensor([-1.0], requires_grad=True)
    kl = torch.tensor(0.2, requires_grad=True)
    kto_loss(policy, torch.tensor([-1.0]), torch.tensor([True]), kl, beta=1.0).backward()
    assert kl.grad is None
    # d/dr (1 - sigma(r - z0)) = -sigma'(r - z0) = -sigma(-0.2) sigma(0.2) at r = 0
    s = 1 / (1 + math.exp(-0.2))
    assert policy.grad.item() == pytest.approx(-s * (1 - s), abs=1e-6)


def test_kto_refuses_bad_settings():
    z = torch.zeros(1)
    with pytest.raises(ValueError, match="beta"):
        kto_loss(z, z, torch.tensor([True]), 0.0, beta=0.0)
    with pytest.raises(ValueError, match="weights"):
        kto_loss(z, z, torch.tensor([True]), 0.0, desirable_weight=-1.0)


def test_orpo_hand_example():
    """Chosen P = 0.5 (odds 1), rejected P = 0.2 (odds 0.25): log odds ratio ln 4;
    logsigmoid(ln 4) = ln(4/5) = -0.2231436. With beta 0.1: ln 2 + 0.1 * 0.2231436 = 0.7154615."""
    out = orpo_loss(torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.2])), beta=0.1)
    assert out.losses.item() == pytest.approx(math.log(2) + 0.1 * math.log(5 / 4), abs=1e-6)
    assert out.losses.item() == pytest.approx(0.7154615, abs=1e-6)
    torch.testing.assert_close(out.chosen_rewards, 0.1 * torch.log(torch.tensor([0.5])))


def test_orpo_at_equal_odds_is_the_nll_plus_beta_ln2():
    """Equal chosen and rejected log-probs: log odds ratio 0, logsigmoid(0) = -ln 2."""
    p = torch.tensor([-0.3, -2.0])
    out = orpo_loss(p, p, beta=0.25)
    torch.testing.assert_close(out.losses, -p + 0.25 * math.log(2))


def test_log1m_exp_is_accurate_at_both_ends():
    """log(1 - e^x): at x = -1e-8 it is log(1e-8) (naive log1p(-exp(x)) loses it in float32);
    at x = -30 it is -e^-30 (naive log(-expm1(x)) rounds to 0)."""
    x = torch.tensor([-1e-8, -0.5, -30.0], dtype=torch.float32)
    want = torch.tensor(
        [math.log(-math.expm1(-1e-8)), math.log(1 - math.exp(-0.5)), math.log1p(-math.exp(-30))],
        dtype=torch.float64,
    )
    torch.testing.assert_close(log1m_exp(x).double(), want, rtol=1e-5, atol=0)
