"""Loss library against hand-worked numbers and naive reference implementations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from prefalign.losses import (
    DPO_LOSSES,
    bradley_terry_loss,
    dpo_loss,
    entropy_from_logits,
    gae,
    kl_estimate,
    masked_mean,
    ppo_kl_penalty_loss,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_logps,
    whiten,
)

LN2 = math.log(2.0)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------- masked_mean / whiten


def test_masked_mean_counts_only_masked_tokens():
    """Row 0 counts 1 and 2, row 1 counts 10: (1 + 2 + 10) / 3 = 13/3, each token weighing the same."""
    x = torch.tensor([[1.0, 2.0, 99.0], [10.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(13 / 3)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), t(1.5, 10.0))
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_whiten_hand_example():
    """x = (1, 2, 3, [100 masked]): mean 2, unbiased var ((1+0+1)/2) = 1, so whitened (-1, 0, 1)."""
    x = t(1.0, 2.0, 3.0, 100.0)
    mask = t(1, 1, 1, 0)
    out = whiten(x, mask, eps=0.0)
    torch.testing.assert_close(out[:3], t(-1.0, 0.0, 1.0))
    kept = whiten(x, mask, shift_mean=False, eps=0.0)
    torch.testing.assert_close(kept[:3], t(1.0, 2.0, 3.0))


# ---------------------------------------------------------------- sequence_logps


def naive_sequence_logps(logits, labels, average=False):
    out = []
    for b in range(logits.shape[0]):
        total, count = 0.0, 0
        for s in range(logits.shape[1] - 1):
            lab = int(labels[b, s + 1])
            if lab == -100:
                continue
            total += float(torch.log_softmax(logits[b, s].double(), -1)[lab])
            count += 1
        out.append(total / max(count, 1) if average else total)
    return torch.tensor(out, dtype=torch.float64)


def test_sequence_logps_hand_example():
    """Uniform logits over V = 4: every counted token has log p = ln(1/4).
    Labels (-100, 1, 2, -100) count 2 tokens: sum = 2 ln(1/4) = -2.7725887, mean = ln(1/4)."""
    logits = torch.zeros(1, 4, 4)
    labels = torch.tensor([[-100, 1, 2, -100]])
    assert sequence_logps(logits, labels).item() == pytest.approx(2 * math.log(0.25))
    assert sequence_logps(logits, labels, average=True).item() == pytest.approx(math.log(0.25))


def test_sequence_logps_uses_shift():
    """logits[:, 0] puts all mass (ln p = 0 after a huge logit) on token 3, which is labels[:, 1]."""
    logits = torch.full((1, 2, 5), -1e4)
    logits[0, 0, 3] = 0.0
    labels = torch.tensor([[-100, 3]])
    assert sequence_logps(logits, labels).item() == pytest.approx(0.0, abs=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 3),
    tlen=st.integers(2, 7),
    v=st.integers(2, 11),
    seed=st.integers(0, 10_000),
    average=st.booleans(),
)
def test_sequence_logps_matches_naive_loop(b, tlen, v, seed, average):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, tlen, v, generator=g) * 3
    labels = torch.randint(0, v, (b, tlen), generator=g)
    labels[torch.rand(b, tlen, generator=g) < 0.3] = -100
    got = sequence_logps(logits, labels, average=average).double()
    torch.testing.assert_close(got, naive_sequence_logps(logits, labels, average), rtol=1e-5, atol=1e-5)


def test_sequence_logps_gradient_matches_log_softmax():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5))
    labels[0, :2] = -100
    sequence_logps(logits, labels).sum().backward()
    ref_logits = logits.detach().clone().requires_grad_(True)
    lp = (
        torch.log_softmax(ref_logits[:, :-1], -1)
        .gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1))
        .squeeze(-1)
    )
    (lp * (labels[:, 1:] != -100)).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad)


def test_sequence_logps_rejects_misaligned_shapes():
    with pytest.raises(ValueError, match="do not align"):
        sequence_logps(torch.zeros(1, 3, 4), torch.zeros(1, 4, dtype=torch.long))


# ---------------------------------------------------------------- DPO family


def test_dpo_loss_at_equal_policy_and_reference_is_ln2():
    """With policy == reference every log-ratio is 0, so h = 0 and -log sigmoid(0) = ln 2 whatever beta."""
    z = torch.zeros(3)
    out = dpo_loss(z - 5, z - 7, z - 5, z - 7, beta=0.37)
    torch.testing.assert_close(out.losses, torch.full((3,), LN2))
    torch.testing.assert_close(out.chosen_rewards, z)
    torch.testing.assert_close(out.rejected_rewards, z)


def test_dpo_sigmoid_hand_example():
    """pc=-1, pr=-3, rc=-2, rr=-2: chosen ratio 1, rejected ratio -1, h = 2; beta = 0.5 -> beta h = 1.
    loss = -log sigmoid(1) = log(1 + e^-1) = 0.3132617; rewards 0.5 and -0.5."""
    out = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5)
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-1)))
    assert out.chosen_rewards.item() == pytest.approx(0.5)
    assert out.rejected_rewards.item() == pytest.approx(-0.5)


def test_ipo_at_zero_margin_beta_01_is_25():
    """IPO: (h - 1/(2 beta))^2 at h = 0, beta = 0.1 is (0 - 5)^2 = 25."""
    z = torch.zeros(2)
    torch.testing.assert_close(dpo_loss(z, z, z, z, beta=0.1, loss_type="ipo").losses, torch.full((2,), 25.0))


def test_hinge_hand_example():
    """hinge: relu(1 - beta h); h = 2, beta = 0.25 -> 0.5; h = 8 -> relu(-1) = 0."""
    out = dpo_loss(t(2.0, 8.0), t(0.0, 0.0), t(0.0, 0.0), t(0.0, 0.0), beta=0.25, loss_type="hinge")
    torch.testing.assert_close(out.losses, t(0.5, 0.0))


def test_cdpo_hand_example():
    """cdpo, e = 0.1, beta h = 1: -(0.9) log sig(1) - 0.1 log sig(-1)
    = 0.9 * 0.3132617 + 0.1 * 1.3132617 = 0.4132617."""
    out = dpo_loss(t(2.0), t(0.0), t(0.0), t(0.0), beta=0.5, loss_type="cdpo", label_smoothing=0.1)
    assert out.losses.item() == pytest.approx(0.9 * 0.3132617 + 0.1 * 1.3132617, abs=1e-6)


def test_robust_hand_example_and_equals_sigmoid_at_zero_smoothing():
    """robust, e = 0.1, beta h = 1: (0.9 * 0.3132617 - 0.1 * 1.3132617) / 0.8 = 0.1882617."""
    out = dpo_loss(t(2.0), t(0.0), t(0.0), t(0.0), beta=0.5, loss_type="robust", label_smoothing=0.1)
    assert out.losses.item() == pytest.approx((0.9 * 0.3132617 - 0.1 * 1.3132617) / 0.8, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = torch.randn(4, 16, generator=g)
    torch.testing.assert_close(
        dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type="robust").losses,
        dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type="sigmoid").losses,
    )


def test_simpo_ignores_reference_and_uses_margin():
    """SimPO: -log sig(beta (pc - pr) - gamma); pc=-1, pr=-2, beta=2, gamma=1 -> -log sig(1) = 0.3132617.
    Rewards are beta * pc = -2 and beta * pr = -4, whatever the reference."""
    out = dpo_loss(t(-1.0), t(-2.0), t(100.0), t(-100.0), beta=2.0, loss_type="simpo", margin=1.0)
    assert out.losses.item() == pytest.approx(0.3132617, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(-2.0)
    assert out.rejected_rewards.item() == pytest.approx(-4.0)
    no_ref = dpo_loss(t(-1.0), t(-2.0), None, None, beta=2.0, loss_type="simpo", margin=1.0)
    torch.testing.assert_close(no_ref.losses, out.losses)


def test_reference_free_treats_reference_as_zero():
    """reference_free: h = pc - pr = 2 - 0; beta 0.5 -> -log sig(1)."""
    out = dpo_loss(t(2.0), t(0.0), t(50.0), t(-50.0), beta=0.5, reference_free=True)
    assert out.losses.item() == pytest.approx(0.3132617, abs=1e-6)


@pytest.mark.parametrize("loss_type", sorted(DPO_LOSSES))
def test_gradients_flow_only_through_policy_logps(loss_type):
    """The loss differentiates w.r.t. both policy inputs; the rewards it reports are detached, so logging
    them never keeps a graph alive; SimPO never touches the reference inputs."""
    pc, pr = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    rc, rr = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    out = dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type=loss_type, label_smoothing=0.1)
    assert out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    out.losses.sum().backward()
    assert pc.grad is not None and pc.grad.abs().sum() > 0
    assert pr.grad is not None and pr.grad.abs().sum() > 0
    if loss_type == "simpo":
        assert rc.grad is None and rr.grad is None


def test_dpo_loss_gradient_pushes_chosen_up_and_rejected_down():
    pc, pr = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    dpo_loss(pc, pr, torch.zeros(1), torch.zeros(1), beta=0.1).losses.sum().backward()
    # d/d pc of -log sig(beta h) at h = 0 is -beta * sig(0) = -0.05
    assert pc.grad.item() == pytest.approx(-0.05)
    assert pr.grad.item() == pytest.approx(0.05)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"loss_type": "nope"}, "nope"),
        ({"beta": 0.0}, "beta must be > 0, got 0.0"),
        ({"beta": -1.0}, "got -1.0"),
        ({"label_smoothing": 0.5}, "label_smoothing must be in \\[0, 0.5\\), got 0.5"),
        ({"label_smoothing": -0.1}, "got -0.1"),
    ],
)
def test_dpo_loss_rejects_invalid_arguments(kwargs, message):
    z = torch.zeros(2)
    with pytest.raises(ValueError, match=message):
        dpo_loss(z, z, z, z, **kwargs)


def test_dpo_loss_needs_reference_unless_reference_free():
    z = torch.zeros(2)
    with pytest.raises(ValueError, match="needs reference"):
        dpo_loss(z, z, None, None)


# ---------------------------------------------------------------- Bradley-Terry


def test_bradley_terry_hand_example():
    """r_w - r_l = (0, 1): losses ln 2 and log(1 + e^-1) = 0.3132617; mean 0.5032925.
    With margin 1 on both: differences (-1, 0) -> 1.3132617 and ln 2, mean 1.0032925."""
    rc, rr = t(1.0, 2.0), t(1.0, 1.0)
    assert bradley_terry_loss(rc, rr).item() == pytest.approx((LN2 + 0.3132617) / 2, abs=1e-6)
    assert bradley_terry_loss(rc, rr, margin=t(1.0, 1.0)).item() == pytest.approx(
        (1.3132617 + LN2) / 2, abs=1e-6
    )


# ---------------------------------------------------------------- GAE


def naive_gae(rewards, values, dones, next_value, gamma, lam):
    """Backward loop over Python floats, one row at a time."""
    adv = torch.zeros_like(rewards, dtype=torch.float64)
    for row in range(rewards.shape[0]):
        running, upcoming = 0.0, float(next_value[row])
        for step in reversed(range(rewards.shape[1])):
            nd = 1.0 - float(dones[row, step])
            delta = float(rewards[row, step]) + gamma * upcoming * nd - float(values[row, step])
            running = delta + gamma * lam * nd * running
            adv[row, step] = running
            upcoming = float(values[row, step])
    return adv


def test_gae_hand_example():
    """rewards (1, 1), values (0.5, 0.5), next_value 2, gamma 0.9, lam 0.8, no done:
    delta_1 = 1 + 0.9*2 - 0.5 = 2.3; delta_0 = 1 + 0.9*0.5 - 0.5 = 0.95;
    A_1 = 2.3; A_0 = 0.95 + 0.72 * 2.3 = 2.606; returns = A + 0.5 = (3.106, 2.8).
    With done at step 0: delta_0 = 1 - 0.5 = 0.5 and no carry, so A_0 = 0.5."""
    r, v = t(1.0, 1.0), t(0.5, 0.5)
    adv, ret = gae(r, v, t(0, 0), torch.tensor(2.0), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, t(2.606, 2.3))
    torch.testing.assert_close(ret, t(3.106, 2.8))
    adv, _ = gae(r, v, t(1, 0), torch.tensor(2.0), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, t(0.5, 2.3))


def test_gae_lambda_one_is_discounted_return_minus_value():
    """lam = 1, no dones: A_t = sum_k gamma^k r_{t+k} + gamma^{T-t} V_T - V_t."""
    r, v = t(1.0, 2.0, 3.0), t(0.1, 0.2, 0.3)
    adv, _ = gae(r, v, torch.zeros(3), torch.tensor(4.0), gamma=0.5, lam=1.0)
    expected0 = 1 + 0.5 * 2 + 0.25 * 3 + 0.125 * 4 - 0.1
    assert adv[0].item() == pytest.approx(expected0)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 4),
    steps=st.integers(1, 9),
    gamma=st.floats(0.0, 1.0),
    lam=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
)
def test_gae_matches_naive_loop_with_random_dones(rows, steps, gamma, lam, seed):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(rows, steps, generator=g)
    v = torch.randn(rows, steps, generator=g)
    d = (torch.rand(rows, steps, generator=g) < 0.3).float()
    nv = torch.randn(rows, generator=g)
    adv, ret = gae(r, v, d, nv, gamma, lam)
    torch.testing.assert_close(adv.double(), naive_gae(r, v, d, nv, gamma, lam), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret, adv + v)


# ---------------------------------------------------------------- PPO


def test_ppo_policy_loss_hand_example():
    """Three tokens, clip 0.2:
    1) ratio e^0 = 1, A = 1: max(-1, -1) = -1, not clipped.
    2) ratio e^{ln 1.5} = 1.5, A = 2: max(-3, -2.4) = -2.4, clipped (clip at 1.2).
    3) ratio 0.5, A = -1: max(0.5, 0.8) = 0.8, clipped (clip at 0.8).
    mean = (-1 - 2.4 + 0.8) / 3 = -0.8666667; clipfrac 2/3."""
    old = torch.zeros(3)
    new = torch.log(t(1.0, 1.5, 0.5))
    loss, stats = ppo_policy_loss(new, old, t(1.0, 2.0, -1.0), clip=0.2)
    assert loss.item() == pytest.approx(-2.6 / 3, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    expected_kl = 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3
    assert stats["approx_kl"].item() == pytest.approx(expected_kl, abs=1e-6)
    masked, _ = ppo_policy_loss(new, old, t(1.0, 2.0, -1.0), mask=t(1, 0, 1), clip=0.2)
    assert masked.item() == pytest.approx((-1 + 0.8) / 2, abs=1e-6)


def test_ppo_policy_loss_gradient_is_zero_where_clipped():
    new = torch.log(t(1.0, 1.5)).requires_grad_(True)
    loss, _ = ppo_policy_loss(new, torch.zeros(2), t(1.0, 2.0), clip=0.2)
    loss.backward()
    # token 0: d/dlp of -A e^lp / 2 = -0.5; token 1 clipped -> 0
    torch.testing.assert_close(new.grad, t(-0.5, 0.0))


def test_ppo_kl_penalty_loss_hand_example():
    """ratio 2 (log 2), A = 1, beta 0.5: -2 + 0.5 * (2 - 1 - ln 2) = -2 + 0.5 * 0.3068528 = -1.8465736."""
    loss, stats = ppo_kl_penalty_loss(torch.log(t(2.0)), t(0.0), t(1.0), beta=0.5)
    assert loss.item() == pytest.approx(-2 + 0.5 * (1 - LN2), abs=1e-6)
    assert stats["kl"].item() == pytest.approx(1 - LN2, abs=1e-6)


def test_ppo_value_loss_hand_example():
    """v = 3, old = 1, R = 0, clip 1: unclipped (3-0)^2 = 9; clipped v' = 2 -> 4; max 9; times 0.5 = 4.5.
    v = 0.5, old = 1, R = 3, clip 0.2: (0.5-3)^2 = 6.25; clipped v' = 0.8 -> 4.84; max 6.25 -> 3.125.
    Unclipped: 0.5 * mean(9, 6.25) = 3.8125."""
    assert ppo_value_loss(t(3.0), t(1.0), t(0.0), clip=1.0).item() == pytest.approx(4.5)
    assert ppo_value_loss(t(0.5), t(1.0), t(3.0), clip=0.2).item() == pytest.approx(3.125)
    assert ppo_value_loss(t(3.0, 0.5), t(1.0, 1.0), t(0.0, 3.0)).item() == pytest.approx(3.8125)
    # clipping takes the pessimistic (larger) term: v moved from old 1 to 1.5 toward R = 3 with clip 0.2
    # -> clipped 1.2 is further from R: (1.8)^2 = 3.24 > (1.5)^2 = 2.25 -> 0.5 * 3.24 = 1.62
    assert ppo_value_loss(t(1.5), t(1.0), t(3.0), clip=0.2).item() == pytest.approx(1.62)


def test_entropy_of_uniform_is_log_v():
    assert entropy_from_logits(torch.zeros(2, 8)).tolist() == pytest.approx([math.log(8)] * 2)


def test_entropy_on_random_logits_matches_torch_categorical():
    """Uniform logits cannot tell -sum p log p from, say, log V; random ones (large, so some
    probabilities underflow to 0) can."""
    logits = torch.randn(3, 5, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 8
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits), expected)


# ---------------------------------------------------------------- KL estimators


def test_kl_estimators_hand_example():
    """d = logp - logp_ref = ln 2: k1 = 0.6931472, k2 = 0.5 * 0.480453 = 0.2402265,
    k3 = exp(-ln 2) - 1 + ln 2 = 0.5 - 1 + 0.6931472 = 0.1931472."""
    lp, lr = torch.log(t(0.5)), torch.log(t(0.25))
    assert kl_estimate(lp, lr, "k1").item() == pytest.approx(LN2)
    assert kl_estimate(lp, lr, "k2").item() == pytest.approx(0.5 * LN2**2)
    assert kl_estimate(lp, lr, "k3").item() == pytest.approx(0.5 - 1 + LN2)
    with pytest.raises(ValueError, match="k9"):
        kl_estimate(lp, lr, "k9")


def test_kl_estimators_are_unbiased_where_claimed():
    """Samples from p = Categorical(0.7, 0.3) vs q = (0.4, 0.6): KL(p||q) = 0.7 ln(7/4) + 0.3 ln(1/2)."""
    p, q = t(0.7, 0.3), t(0.4, 0.6)
    true_kl = float((p * (p / q).log()).sum())
    g = torch.Generator().manual_seed(0)
    idx = torch.multinomial(p, 200_000, replacement=True, generator=g)
    for kind in ("k1", "k3"):
        est = kl_estimate(p.log()[idx], q.log()[idx], kind).mean().item()
        assert est == pytest.approx(true_kl, abs=5e-3), kind
    assert (kl_estimate(p.log()[idx], q.log()[idx], "k3") >= 0).all()


def test_logsigmoid_identity_used_in_docstrings():
    """-log sigmoid(1) = log(1 + e^-1) = 0.3132617 and -log sigmoid(-1) = 1.3132617."""
    assert -F.logsigmoid(torch.tensor(1.0)).item() == pytest.approx(0.3132617, abs=1e-6)
    assert -F.logsigmoid(torch.tensor(-1.0)).item() == pytest.approx(1.3132617, abs=1e-6)
