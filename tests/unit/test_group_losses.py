"""GRPO / RLOO / DAPO / Dr. GRPO math in prefalign.losses against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from prefalign.losses import (
    aggregate_loss,
    clipped_surrogate,
    group_advantages,
    grpo_token_loss,
    rloo_advantages,
    rloo_rewards,
    rloo_sequence_loss,
)

REWARDS = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])  # two prompts x G = 3


def test_group_advantages_by_group_std():
    """Group 1: mean 2, Bessel std sqrt((1 + 0 + 1) / 2) = 1, so A = (-1, 0, 1) / (1 + 1e-4).
    Group 2: all 5, so every advantage is 0 (not NaN: std 0 + 1e-4)."""
    out = group_advantages(REWARDS, 3, scale="group")
    expected = torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / 1.0001
    torch.testing.assert_close(out, expected)


def test_group_advantages_by_batch_std_and_unscaled():
    """Batch mean 21/6 = 3.5; squared deviations 6.25 + 2.25 + 0.25 + 3 x 2.25 = 15.5; Bessel variance
    15.5 / 5 = 3.1, std sqrt(3.1) = 1.760682. Centred by the group means: (-1, 0, 1, 0, 0, 0), divided by
    1.760682 + 1e-4 under "batch", left as is under "none" (Dr. GRPO)."""
    centred = torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(REWARDS, 3, "batch"), centred / (math.sqrt(3.1) + 1e-4))
    torch.testing.assert_close(group_advantages(REWARDS, 3, "none"), centred)


def test_equal_rewards_give_zero_advantages_under_every_method():
    flat = torch.full((4,), 0.7)
    for scale in ("group", "batch", "none"):
        assert group_advantages(flat, 4, scale).abs().max() == 0
    assert rloo_advantages(flat, 4).abs().max() == 0


def test_rloo_leave_one_out():
    """Group (1, 2, 3): 1 - (2 + 3)/2 = -1.5, 2 - (1 + 3)/2 = 0, 3 - (1 + 2)/2 = 1.5; the group of fives
    gives 0. (Equivalently G/(G-1) = 3/2 times the centred rewards.)"""
    torch.testing.assert_close(rloo_advantages(REWARDS, 3), torch.tensor([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0]))


def test_bad_group_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of num_generations"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, scale="std")


def test_clipped_surrogate_with_separate_bounds():
    """epsilon 0.2, epsilon_high 0.28. Ratio 1.5, A = +1: min(1.5, 1.28) = 1.28, loss -1.28, upper clip.
    Ratio 0.5, A = -1: min(-0.5, -0.8) = -0.8, loss 0.8, lower clip. Ratio 1.5, A = -1: min(-1.5, -1.28)
    = -1.5, loss 1.5 (the pessimistic unclipped term; no clip). Ratio 1, A = 2: loss -2."""
    log_ratio = torch.log(torch.tensor([1.5, 0.5, 1.5, 1.0]))
    adv = torch.tensor([1.0, -1.0, -1.0, 2.0])
    loss, low, high = clipped_surrogate(log_ratio, adv, epsilon=0.2, epsilon_high=0.28)
    torch.testing.assert_close(loss, torch.tensor([-1.28, 0.8, 1.5, -2.0]))
    assert low.tolist() == [0.0, 1.0, 0.0, 0.0]
    assert high.tolist() == [1.0, 0.0, 0.0, 0.0]
    symmetric, _, _ = clipped_surrogate(log_ratio, adv, epsilon=0.2)
    assert symmetric[0].item() == pytest.approx(-1.2)


def test_grpo_token_loss_at_ratio_one_with_k3_kl():
    """logp = old: ratio 1, surrogate -A per token. ref = logp - 0.5, so d = 0.5 and
    k3 = exp(-0.5) - 1 + 0.5 = 0.606531 - 0.5 = 0.106531; with beta 0.1 each token's loss is
    -A + 0.0106531. The gradient of the surrogate at ratio 1 is -A d(logp) (REINFORCE)."""
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    loss, stats = grpo_token_loss(logp, logp.detach(), adv, ref_logprobs=logp.detach() - 0.5, beta=0.1)
    k3 = math.exp(-0.5) - 0.5
    torch.testing.assert_close(loss.detach(), torch.tensor([[-2.0, -2.0], [1.0, 1.0]]) + 0.1 * k3)
    torch.testing.assert_close(stats["kl"], torch.full((2, 2), k3))
    assert stats["ratio"].eq(1.0).all()
    loss.sum().backward()
    torch.testing.assert_close(
        logp.grad, torch.tensor([[-2.0, -2.0], [1.0, 1.0]]) + 0.1 * (1 - math.exp(-0.5))
    )


def test_loss_aggregations():
    """Per-token loss [[1, 2, 3], [4, pad, pad]] (mask [[1, 1, 1], [1, 0, 0]]):
    grpo = mean(6/3, 4/1) = 3; bnpo = 10/4 = 2.5; dr_grpo with max length 5 = 10/(2 x 5) = 1;
    dapo over a step of 8 tokens = 10/8 = 1.25 (over this batch's own 4 tokens: 2.5)."""
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate_loss(per_token, mask, "grpo").item() == pytest.approx(3.0)
    assert aggregate_loss(per_token, mask, "bnpo").item() == pytest.approx(2.5)
    assert aggregate_loss(per_token, mask, "dr_grpo", max_length=5).item() == pytest.approx(1.0)
    assert aggregate_loss(per_token, mask, "dr_grpo").item() == pytest.approx(10 / 6)
    assert aggregate_loss(per_token, mask, "dapo", num_tokens=8).item() == pytest.approx(1.25)
    assert aggregate_loss(per_token, mask, "dapo").item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="loss_type"):
        aggregate_loss(per_token, mask, "mean")


def test_rloo_reward_has_the_summed_k1_kl():
    """logp (-1, -2), ref (-1.5, -1.0): k1 = 0.5 + (-1.0) = -0.5 summed; score 1 - 0.1 x (-0.5) = 1.05.
    A masked token never counts."""
    out = rloo_rewards(
        torch.tensor([1.0]), torch.tensor([[-1.0, -2.0, 7.0]]), torch.tensor([[-1.5, -1.0, 0.0]]),
        torch.tensor([[1.0, 1.0, 0.0]]), beta=0.1,
    )  # fmt: skip
    torch.testing.assert_close(out, torch.tensor([1.05]))


def test_rloo_sequence_ratio():
    """Token log-ratios 0.1 and 0.2 (a padded third ignored) sum to 0.3: ratio e^0.3 = 1.3499 > 1.2, A = 2,
    so the loss is -2 x 1.2 = -2.4 with the upper clip acting; the second sequence at ratio 1 gives -A = 0.5."""
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.1, 0.2, 5.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss, stats = rloo_sequence_loss(logp, old, torch.tensor([2.0, -0.5]), mask, epsilon=0.2)
    torch.testing.assert_close(loss, torch.tensor([-2.4, 0.5]))
    assert stats["high"].tolist() == [1.0, 0.0]
    torch.testing.assert_close(stats["ratio"], torch.tensor([math.exp(0.3), 1.0]))
