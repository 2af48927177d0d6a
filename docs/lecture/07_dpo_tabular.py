# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 7. DPO, checked exactly: your language model is secretly a reward model
#
# **Slides followed** (part 04, *direct preference optimization (dpo)*): "overview" and "Secret behind
# DPO", which start from the RLHF formulas of part 03 ("Reward model": the Bradley-Terry model and the
# KL-penalised reward). The derivation is Rafailov et al. 2023, *Direct Preference Optimization: Your
# Language Model is Secretly a Reward Model*, sections 4 and 5.
#
# RLHF maximises reward while staying close to the reference (SFT) model:
#
# $$\max_\pi\; \mathbb E_{x,\,y\sim\pi(\cdot\mid x)}\big[r(x, y)\big] - \beta\, \mathrm{KL}\big(\pi(\cdot\mid x)\,\|\,\pi_{\text{ref}}(\cdot\mid x)\big)
# \quad\text{("R(x, y) = r(x, y) - } \beta\,\text{KL" on the slides)}.$$
#
# For each prompt this objective has a closed-form maximiser,
#
# $$\pi^*(y\mid x) = \frac{1}{Z(x)}\,\pi_{\text{ref}}(y\mid x)\,\exp\!\big(r(x, y)/\beta\big),\qquad
# Z(x) = \sum_y \pi_{\text{ref}}(y\mid x)\exp\!\big(r(x, y)/\beta\big),$$
#
# because for any $\pi$, $\;\mathbb E_\pi[r] - \beta\,\mathrm{KL}(\pi\|\pi_{\text{ref}}) = \beta\log Z(x) -
# \beta\,\mathrm{KL}(\pi\|\pi^*)$. Solved for the reward, $r(x, y) = \beta\log\frac{\pi^*(y\mid x)}{\pi_{\text{ref}}(y\mid x)} + \beta\log Z(x)$:
# the policy *is* a reward model, up to a per-prompt constant that cancels in the Bradley-Terry
# probability $p(y_1 \succ y_2) = \sigma(r(x, y_1) - r(x, y_2))$. Putting the policy's implicit reward
# into the reward model's loss gives the DPO loss (the `sigmoid` loss of `prefalign.losses.dpo_loss`):
#
# $$\mathcal L_{\text{DPO}} = -\log\sigma\Big(\beta\log\frac{\pi_\theta(y_w\mid x)}{\pi_{\text{ref}}(y_w\mid x)} - \beta\log\frac{\pi_\theta(y_l\mid x)}{\pi_{\text{ref}}(y_l\mid x)}\Big).$$
#
# This chapter checks all of it numerically on a problem small enough to solve exactly: 3 prompts, 5
# possible responses each, a known reward table, a random reference policy. A policy is a table of logits;
# no language model is loaded.

# %%
import math

import numpy as np
import torch
from _lecture import plt, show, table

from prefalign.losses import dpo_loss, ppo_policy_loss

torch.manual_seed(0)
torch.set_num_threads(1)
X, K, BETA = 3, 5, 0.5
gen = torch.Generator().manual_seed(0)
reward = torch.randn(X, K, generator=gen, dtype=torch.float64)  # r(x, y), the "true" reward
ref_logits = 0.5 * torch.randn(X, K, generator=gen, dtype=torch.float64)
log_ref = torch.log_softmax(ref_logits, dim=-1)  # log pi_ref(y|x)
pi_ref = log_ref.exp()

log_Z = torch.logsumexp(log_ref + reward / BETA, dim=-1)  # [X]
log_star = log_ref + reward / BETA - log_Z[:, None]  # log pi*(y|x), the closed form
pi_star = log_star.exp()
print("reward r(x, y):\n", reward.numpy().round(2))
print("pi_ref:\n", pi_ref.numpy().round(3))
print("pi* = pi_ref exp(r / beta) / Z:\n", pi_star.numpy().round(3))


def objective(log_pi: torch.Tensor) -> torch.Tensor:
    """E_pi[r] - beta KL(pi || pi_ref), per prompt: [X, K] log-probs -> [X]."""
    pi = log_pi.exp()
    return (pi * reward).sum(-1) - BETA * (pi * (log_pi - log_ref)).sum(-1)


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per prompt, [X]."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


# %% [markdown]
# ## 1. The closed form is the maximiser
#
# Three checks: the identity $J(\pi) = \beta\log Z - \beta\,\mathrm{KL}(\pi\|\pi^*)$ on random policies
# (so nothing beats $\pi^*$, and $J(\pi^*) = \beta\log Z$); and plain gradient ascent on $J$ over the
# logits, which must arrive at $\pi^*$ (tolerance $10^{-6}$ on each probability).

# %%
for _ in range(5):
    log_pi = torch.log_softmax(torch.randn(X, K, generator=gen, dtype=torch.float64), -1)
    assert torch.allclose(objective(log_pi), BETA * log_Z - BETA * kl(log_pi, log_star))
    assert (objective(log_pi) < objective(log_star)).all()
assert torch.allclose(objective(log_star), BETA * log_Z)

theta = ref_logits.clone().requires_grad_(True)
opt = torch.optim.LBFGS(
    [theta], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe"
)


def closure() -> torch.Tensor:
    opt.zero_grad()
    loss = -objective(torch.log_softmax(theta, -1)).sum()
    loss.backward()
    return loss


opt.step(closure)
argmax_pi = torch.softmax(theta.detach(), -1)
print(f"gradient ascent on J: max |pi - pi*| = {(argmax_pi - pi_star).abs().max():.1e}")
assert torch.allclose(argmax_pi, pi_star, atol=1e-6)

# %% [markdown]
# ## 2. Preferences from the Bradley-Terry model of $r$
#
# For each prompt, two different responses are drawn from $\pi_{\text{ref}}$ (as DPO's data comes from the
# SFT model), and $y_1$ is preferred with probability $\sigma(r(x, y_1) - r(x, y_2))$. We draw 4000 pairs per
# prompt. In the infinite-data limit the same data is a weight on every ordered pair,
# $w(y, y') \propto \pi_{\text{ref}}(y)\,\pi_{\text{ref}}(y')\,\sigma(r(y) - r(y'))$ for $y \ne y'$, with
# $y$ the chosen response.

# %%
PAIRS = 4000
xs, chosen, rejected = [], [], []
for x in range(X):
    n = 0
    while n < PAIRS:
        y1, y2 = torch.multinomial(pi_ref[x].float(), 2 * PAIRS, replacement=True, generator=gen).view(2, -1)
        keep = y1 != y2
        y1, y2 = y1[keep][: PAIRS - n], y2[keep][: PAIRS - n]
        first = torch.rand(len(y1), generator=gen, dtype=torch.float64) < torch.sigmoid(
            reward[x, y1] - reward[x, y2]
        )
        chosen.append(torch.where(first, y1, y2))
        rejected.append(torch.where(first, y2, y1))
        xs.append(torch.full((len(y1),), x))
        n += len(y1)
xs, chosen, rejected = torch.cat(xs), torch.cat(chosen), torch.cat(rejected)
agree = (reward[xs, chosen] > reward[xs, rejected]).double().mean()
print(f"{len(xs)} pairs; the chosen response has the higher true reward in {agree:.1%} of them")

# every ordered pair (x, y, y'), y != y', with its weight in the infinite-data limit
ex, ey, ey2 = (
    t.reshape(-1) for t in torch.meshgrid(torch.arange(X), torch.arange(K), torch.arange(K), indexing="ij")
)
off = ey != ey2
ex, ey, ey2 = ex[off], ey[off], ey2[off]
w = pi_ref[ex, ey] * pi_ref[ex, ey2] * torch.sigmoid(reward[ex, ey] - reward[ex, ey2])
w = w / w.view(X, -1).sum(-1).repeat_interleave(K * (K - 1))  # each prompt weighs 1


# %% [markdown]
# ## 3. DPO on the preferences
#
# The policy starts at the reference (logits = reference logits), so the first loss is exactly $\ln 2$ and
# the implicit rewards are 0. Each step computes the log-probabilities of the chosen and rejected responses
# under the policy and the reference and calls `prefalign.losses.dpo_loss`; Adam runs on the whole
# dataset. The expected-loss run uses the pair weights instead of samples.


# %%
def train_dpo(weighted: bool, steps: int = 600, lr: float = 0.05) -> tuple[torch.Tensor, list[float]]:
    theta = ref_logits.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    px, pc, pr = (ex, ey, ey2) if weighted else (xs, chosen, rejected)
    trace = []
    for step in range(steps):
        log_pi = torch.log_softmax(theta, -1)
        out = dpo_loss(log_pi[px, pc], log_pi[px, pr], log_ref[px, pc], log_ref[px, pr], beta=BETA)
        loss = (out.losses * w).sum() / X if weighted else out.losses.mean()
        if step == 0:
            assert math.isclose(out.losses.mean().item(), math.log(2), rel_tol=1e-12)
            assert out.chosen_rewards.abs().max() == 0
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        trace.append(kl(torch.log_softmax(theta.detach(), -1), log_star).mean().item())
    return torch.log_softmax(theta.detach(), -1), trace


log_dpo_exact, trace_exact = train_dpo(weighted=True, steps=1500, lr=0.1)
log_dpo_sampled, trace_sampled = train_dpo(weighted=False)

# %% [markdown]
# **Checks.** (a) DPO on the expected loss converges to $\pi^*$: every probability within $10^{-4}$.
# (b) Its implicit reward $\hat r(x, y) = \beta\log\frac{\pi_\theta(y\mid x)}{\pi_{\text{ref}}(y\mid x)}$
# recovers $r$ up to a per-prompt constant: every difference $\hat r(x, y) - \hat r(x, y')$ within
# $10^{-3}$ of $r(x, y) - r(x, y')$, and the constant is $-\beta\log Z(x)$. (c) With 4000 sampled pairs
# per prompt the answer carries sampling noise: each response pair is compared a few hundred times, so the
# reward differences are known to about $\pm 0.1$-$0.2$; the stated tolerances are 0.5 on reward
# differences and 0.05 on probabilities.


# %%
def reward_differences(log_pi: torch.Tensor) -> torch.Tensor:
    """All differences r_hat(x, y) - r_hat(x, y') of the implicit reward, [X, K, K]."""
    r_hat = BETA * (log_pi - log_ref)
    return r_hat[:, :, None] - r_hat[:, None, :]


true_diff = reward[:, :, None] - reward[:, None, :]
err_exact = (reward_differences(log_dpo_exact) - true_diff).abs().max().item()
err_sampled = (reward_differences(log_dpo_sampled) - true_diff).abs().max().item()
print(
    table(
        [
            [
                "DPO, expected loss",
                (log_dpo_exact.exp() - pi_star).abs().max().item(),
                err_exact,
                kl(log_dpo_exact, log_star).max().item(),
            ],
            [
                "DPO, 4000 sampled pairs/prompt",
                (log_dpo_sampled.exp() - pi_star).abs().max().item(),
                err_sampled,
                kl(log_dpo_sampled, log_star).max().item(),
            ],
        ],
        ["", "max |pi - pi*|", "max reward-difference error", "max KL(pi || pi*)"],
    )
)
assert torch.allclose(log_dpo_exact.exp(), pi_star, atol=1e-4)
assert err_exact < 1e-3
offset = BETA * (log_dpo_exact - log_ref) - reward  # should be -beta log Z(x) for every y
assert torch.allclose(offset, -BETA * log_Z[:, None].expand(X, K), atol=1e-3)
assert torch.allclose(log_dpo_sampled.exp(), pi_star, atol=0.05)
assert err_sampled < 0.5

# %% [markdown]
# ## 4. Where PPO lands on the same problem
#
# RLHF with PPO (chapter 5's clipped objective, chapter 6's setting) samples responses from the policy,
# scores them with the reward minus the KL penalty to the reference,
# $R(x, y) = r(x, y) - \beta\,(\log\pi_{\text{old}}(y\mid x) - \log\pi_{\text{ref}}(y\mid x))$, and
# maximises the clipped surrogate (`prefalign.losses.ppo_policy_loss`) with advantage $R$ minus its mean
# per prompt. Each response is a one-step episode. The expected gradient of this procedure is the
# gradient of the KL-regularised objective, so its fixed point is $\pi^*$ again; what it gets there with
# is samples from its own policy and the true reward, where DPO used a fixed preference dataset. Without
# the KL penalty ($\beta = 0$) the same loop collapses onto the best response of each prompt.
# Checks: with the penalty, every probability within 0.01 of $\pi^*$ (150 iterations of 1024 samples,
# 4 epochs of minibatches of 256, learning rate annealed to 0); without it, the best response of every
# prompt gets probability above 0.95 and the regularised objective is lower.


# %%
def train_ppo(
    beta: float, iters: int = 150, batch: int = 1024, epochs: int = 4, minibatch: int = 256, lr: float = 0.05
) -> tuple[torch.Tensor, list[float]]:
    g = torch.Generator().manual_seed(1)
    theta = ref_logits.clone().float().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / (iters * epochs * (batch // minibatch)))
    ref = log_ref.float()
    trace = []
    for _ in range(iters):
        with torch.no_grad():
            old = torch.log_softmax(theta, -1)
            x = torch.randint(0, X, (batch,), generator=g)
            y = torch.multinomial(old.exp()[x], 1, generator=g).squeeze(-1)
            R = reward[x, y].float() - beta * (old[x, y] - ref[x, y])
            baseline = torch.zeros(X).index_add_(0, x, R) / torch.bincount(x, minlength=X).clamp(min=1)
            adv = R - baseline[x]
        for _ in range(epochs):
            perm = torch.randperm(batch, generator=g)
            for i in perm.split(minibatch):
                logp = torch.log_softmax(theta, -1)[x[i], y[i]]
                loss, _ = ppo_policy_loss(logp, old[x[i], y[i]], adv[i], clip=0.2)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        trace.append(kl(torch.log_softmax(theta.detach().double(), -1), log_star).mean().item())
    return torch.log_softmax(theta.detach().double(), -1), trace


log_ppo, trace_ppo = train_ppo(BETA)
log_ppo_nokl, _ = train_ppo(0.0)
ppo_err = (log_ppo.exp() - pi_star).abs().max().item()
print(f"PPO with KL penalty: max |pi - pi*| = {ppo_err:.1e}, KL(pi || pi*) = {kl(log_ppo, log_star).numpy()}")
print(
    f"objective J: pi* {objective(log_star).numpy().round(3)}, PPO {objective(log_ppo).numpy().round(3)}, "
    f"PPO without KL {objective(log_ppo_nokl).numpy().round(3)}"
)
assert ppo_err < 0.01
assert (log_ppo_nokl.exp().max(-1).values > 0.95).all()  # beta = 0: (almost) deterministic
assert (log_ppo_nokl.argmax(-1) == reward.argmax(-1)).all()  # ... on the best response
assert (objective(log_ppo_nokl) < objective(log_ppo)).all()  # and worse for the regularised objective

# %%
fig, grid = plt.subplots(2, 3, figsize=(15, 8))
axes = list(grid[0]) + list(grid[1])
policies = {
    "pi_ref": log_ref, "pi* (closed form)": log_star, "DPO (expected loss)": log_dpo_exact,
    "DPO (sampled pairs)": log_dpo_sampled, "PPO + KL": log_ppo, "PPO, beta = 0": log_ppo_nokl,
}  # fmt: skip
width = 0.8 / len(policies)
for x in range(X):
    ax = axes[x]
    for j, (name, lp) in enumerate(policies.items()):
        ax.bar(np.arange(K) + (j - len(policies) / 2 + 0.5) * width, lp[x].exp().numpy(), width, label=name)
    ax.set_xticks(range(K), [f"y{k}\nr={reward[x, k]:.1f}" for k in range(K)], fontsize=8)
    ax.set_title(f"prompt x{x}")
axes[0].set_ylabel("probability")
axes[0].legend(fontsize=7)
ax = axes[X]
iu = torch.triu_indices(K, K, 1)
for lp, name, m in ((log_dpo_exact, "expected loss", "o"), (log_dpo_sampled, "sampled pairs", "x")):
    ax.scatter(
        true_diff[:, iu[0], iu[1]].ravel(),
        reward_differences(lp)[:, iu[0], iu[1]].ravel(),
        marker=m,
        label=name,
    )
lim = float(true_diff.abs().max()) * 1.1
ax.plot([-lim, lim], [-lim, lim], "k--", lw=0.8)
ax.set_xlabel("true r(x,y) - r(x,y')")
ax.set_ylabel("implicit reward difference")
ax.set_title("DPO recovers reward differences")
ax.legend(fontsize=8)
ax = axes[X + 1]
for trace, name in (
    (trace_exact, "DPO, expected loss"),
    (trace_sampled, "DPO, sampled pairs"),
    (trace_ppo, "PPO + KL"),
):
    ax.semilogy(np.linspace(0, 1, len(trace)), np.maximum(trace, 1e-14), label=name)
ax.set_xlabel("fraction of training")
ax.set_ylabel("mean KL(pi || pi*) (floored at 1e-14)")
ax.set_title("Distance to the optimum")
ax.legend(fontsize=8)
ax = axes[X + 2]
for j, (name, lp) in enumerate(policies.items()):
    ax.bar(np.arange(X) + (j - len(policies) / 2 + 0.5) * width, objective(lp).numpy(), width, label=name)
ax.set_xticks(range(X), [f"x{x}" for x in range(X)])
ax.set_ylabel("E[r] - beta KL(pi || pi_ref)")
ax.set_title("The KL-regularised objective")
fig.tight_layout()
show(fig, "07_dpo_tabular")

# %% [markdown]
# **Reading the figure.** DPO never samples from its policy and never sees a reward: from preferences
# alone it lands on the same policy as the KL-regularised RL objective, and its log-ratio reproduces the
# reward's differences. Its only error is the dataset's sampling noise. PPO needs the reward itself and
# fresh samples at every step, and its noise shrinks with its batch size and learning-rate schedule.
# Without the KL term, RL ignores the reference and collapses, which is what the penalty in RLHF, and the
# $\beta$ in DPO, are there to prevent.

# %% [markdown]
# ## 5. The DPO family, and two relatives without pairs or without a reference
#
# The derivation above fixes what DPO optimises; the variants change the loss applied to the same
# log-ratios, or drop one of DPO's ingredients. With $h = \beta\,[(\log\pi - \log\pi_{\text{ref}})(y_w) -
# (\log\pi - \log\pi_{\text{ref}})(y_l)]$, $p$ a length-averaged log-probability and $r = \log\pi(y\mid x) -
# \log\pi_{\text{ref}}(y\mid x)$:
#
# | variant | loss of one example | data | reference | prefalign |
# | --- | --- | --- | --- | --- |
# | DPO (Rafailov et al. 2023) | $-\log\sigma(h)$ | pairs | yes | `dpo --loss-type sigmoid` |
# | cDPO / robust DPO (Chowdhury et al. 2024) | label-smoothed / unbiased mix of $-\log\sigma(\pm h)$ | pairs | yes | `--loss-type cdpo`, `robust` |
# | IPO (Azar et al. 2023) | $(h/\beta - 1/(2\beta))^2$ | pairs | yes | `--loss-type ipo` |
# | hinge / SLiC (Zhao et al. 2023) | $\max(0, 1 - h)$ | pairs | yes | `--loss-type hinge` |
# | SimPO (Meng et al. 2024) | $-\log\sigma(\beta (p_w - p_l) - \gamma)$ | pairs | no | `--loss-type simpo` |
# | ORPO (Hong et al. 2024) | $-p_w - \beta\log\sigma\big(\log\tfrac{e^{p_w}}{1 - e^{p_w}} - \log\tfrac{e^{p_l}}{1 - e^{p_l}}\big)$ | pairs | no | `--loss-type orpo` |
# | KTO (Ethayarajh et al. 2024) | $w_D(1 - \sigma(\beta(r - z_0)))$ if desirable, $w_U(1 - \sigma(\beta(z_0 - r)))$ if not | single labelled completions | yes | `kto` |
#
# KTO's reference point $z_0$ is the batch's mean log-ratio on mismatched prompt/completion pairs, an
# estimate of $\mathrm{KL}(\pi\,\|\,\pi_{\text{ref}})$, clamped at 0 and held constant in the gradient. At the
# start of training ($\pi = \pi_{\text{ref}}$) every log-ratio is 0, which pins each loss to a number a
# test can check: DPO's is $\ln 2$, KTO's is $w/2$ for each example, and ORPO's depends only on the
# policy's own probabilities, since it has no reference.

# %%
from prefalign.losses import kto_loss, orpo_loss  # noqa: E402

zero, half = torch.zeros(4), torch.full((1,), math.log(0.5))
start = {
    "DPO": dpo_loss(zero, zero, zero, zero, beta=0.1).losses.mean().item(),
    "KTO (w_D = 1, w_U = 1.5, two of each)": kto_loss(
        zero, zero, torch.tensor([True, True, False, False]), 0.0, 0.1, 1.0, 1.5
    ).item(),
    "ORPO (p_w = p_l = ln 0.5)": orpo_loss(half, half, 0.1).losses.mean().item(),
}
for name, value in start.items():
    print(f"{name:40s} first loss {value:.6f}")
assert abs(start["DPO"] - math.log(2)) < 1e-6
assert abs(start["KTO (w_D = 1, w_U = 1.5, two of each)"] - (2 * 0.5 + 2 * 0.75) / 4) < 1e-6
assert abs(start["ORPO (p_w = p_l = ln 0.5)"] - (math.log(2) + 0.1 * math.log(2))) < 1e-6  # odds 1:1
