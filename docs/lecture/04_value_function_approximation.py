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
# # 4. Linear value-function approximation
#
# **Slides followed** (part 01): "Value Function Approximation" and "Value Function Approximation –
# optimize weight". The experiment follows Sutton & Barto, chapter 9 (state aggregation on a random
# walk, Figures 9.1 and 9.2, and the TD fixed point of section 9.4); David Silver's lecture 6 (value
# function approximation) is the slides' source.
#
# Tables of $V(s)$ or $Q(s, a)$ do not scale to problems with very many states. Approximating
# $\hat v(s, w) \approx v_\pi(s)$ brings generalisation (tổng quát hóa: sensible values for states never
# seen), less memory (giảm bộ nhớ lưu trữ) and less computation (giảm tài nguyên tính toán). The weights
# minimise the mean squared error
#
# $$J(w) = \mathbb E_\pi\big[(\hat v(s, w) - v_\pi(s))^2\big],\qquad
# w \leftarrow w - \alpha\,(\hat v(s, w) - v_\pi(s))\,\nabla_w \hat v(s, w),$$
#
# (the factor 2 of the derivative folded into the step size $\alpha$). With a **feature vector**
# $\phi(s)$ (vector đặc trưng) and a linear value $\hat v(s, w) = \phi(s)^\top w$, the gradient is
# $\phi(s)$. The unknown $v_\pi(s)$ is replaced by a sample of it:
#
# * the return $G_t$ (**gradient Monte-Carlo**, the slide's update):
#   $w \leftarrow w - \alpha\,(\phi(s)^\top w - G_t)\,\phi(s)$ — step size × prediction error × feature value;
# * the one-step TD target $r + \gamma\,\phi(s')^\top w$ (**semi-gradient TD(0)**: the target depends on
#   $w$ too, but its gradient is ignored).
#
# **What they converge to.** Let $D$ be the diagonal matrix of how often each state is visited under
# $\pi$ (the on-policy distribution). Gradient MC converges to the minimiser of the weighted error,
# $w_{MC} = (\Phi^\top D \Phi)^{-1}\Phi^\top D\, v_\pi$ (least squares). Semi-gradient TD converges to
# the **TD fixed point**, where the expected update is zero:
# $\Phi^\top D\,(\mathcal R + \gamma \mathcal P \Phi w - \Phi w) = 0$, i.e.
# $w_{TD} = \big(\Phi^\top D (I - \gamma \mathcal P)\Phi\big)^{-1}\Phi^\top D\,\mathcal R$.
# When the features can represent $v_\pi$ the two coincide; when they cannot, TD's answer has a larger error.

# %%
import numpy as np
from _lecture import plt, show, table

from prefalign.rl import gradient_mc_linear, random_walk, semi_gradient_td0_linear

N_STATES, GROUPS = 12, 4
walk = random_walk(N_STATES)
start = (N_STATES + 1) // 2
true_v = walk.values()
live = np.flatnonzero(~walk.terminal)
assert np.allclose(true_v[live], np.arange(1, N_STATES + 1) / (N_STATES + 1))

# Expected visits per episode eta (the on-policy distribution, unnormalised): eta = h (I - P_NN)^-1.
P_nn = walk.P[np.ix_(live, live)]
h = (live == start).astype(float)
eta = h @ np.linalg.inv(np.eye(len(live)) - P_nn)
print(f"expected episode length {eta.sum():.1f} steps (exactly {start * (N_STATES + 1 - start)})")
assert np.isclose(eta.sum(), start * (N_STATES + 1 - start))


def features_aggregation(groups: int) -> np.ndarray:
    """phi(s): one-hot of the group of s (terminal states: all zeros, so their value is 0)."""
    phi = np.zeros((walk.n_states, groups))
    for k, s in enumerate(live):
        phi[s, k * groups // len(live)] = 1.0
    return phi


def fixed_points(phi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(w_MC, w_TD) from the formulas above, over the non-terminal states."""
    Phi, D, R = phi[live], np.diag(eta), walk.R[live]
    w_mc = np.linalg.solve(Phi.T @ D @ Phi, Phi.T @ D @ true_v[live])
    w_td = np.linalg.solve(Phi.T @ D @ (np.eye(len(live)) - walk.gamma * P_nn) @ Phi, Phi.T @ D @ R)
    return w_mc, w_td


def value_error(phi: np.ndarray, w: np.ndarray) -> float:
    """The slide's J(w): mean squared error under the on-policy distribution (RMS reported)."""
    mu = eta / eta.sum()
    return float(np.sqrt(mu @ (phi[live] @ w - true_v[live]) ** 2))


# %% [markdown]
# ## Features that can represent $v_\pi$: one-hot (the tabular case)
#
# With one feature per state, both fixed points are the true values, exactly.

# %%
onehot = np.zeros((walk.n_states, len(live)))
onehot[live, np.arange(len(live))] = 1.0
w_mc, w_td = fixed_points(onehot)
assert np.allclose(w_mc, true_v[live]) and np.allclose(w_td, true_v[live])
print("one-hot features: w_MC = w_TD = v_pi (max deviation", f"{np.max(np.abs(w_td - true_v[live])):.1e})")

# %% [markdown]
# ## State aggregation: 12 states in 4 groups of 3
#
# Each group shares one weight, so the approximation is a step function. Both methods learn from the same
# 6000 sampled episodes, gradient MC with $\alpha = 0.001$ and semi-gradient TD with $\alpha = 0.02$ (a
# move within a group has TD error 0, so TD learns only where episodes cross group boundaries and needs
# the larger step). The weights are averaged over the last 5000 episodes to take out the noise that a
# constant step size leaves. What remains is sampling noise: every return is 0 or 1, so all weights
# move together with the share of episodes that end on the right, whose standard deviation over 5000
# episodes is $0.5/\sqrt{5000} \approx 0.007$. The stated tolerance is 0.02, about three of those.

# %%
phi = features_aggregation(GROUPS)
w_mc, w_td = fixed_points(phi)
rng = np.random.default_rng(0)
episodes = [walk.sample_episode(start, rng) for _ in range(6000)]
hist_mc = gradient_mc_linear(episodes, phi, alpha=1e-3)
hist_td = semi_gradient_td0_linear(episodes, phi, alpha=2e-2)
learned_mc, learned_td = hist_mc[1000:].mean(0), hist_td[1000:].mean(0)
print(
    table(
        [
            [f"group {g + 1}", float(w_mc[g]), float(learned_mc[g]), float(w_td[g]), float(learned_td[g])]
            for g in range(GROUPS)
        ],
        ["", "w_MC (formula)", "gradient MC", "w_TD (formula)", "semi-gradient TD"],
    )
)
print(
    f"RMS value error: gradient-MC fixed point {value_error(phi, w_mc):.4f}, TD fixed point {value_error(phi, w_td):.4f}"
)
TOL = 0.02  # see above: about three standard deviations of the sampling noise
assert np.max(np.abs(learned_mc - w_mc)) < TOL
assert np.max(np.abs(learned_td - w_td)) < TOL
assert value_error(phi, w_mc) < value_error(phi, w_td)  # MC minimises the error; TD does not
assert np.max(np.abs(w_td - w_mc)) > 2 * TOL  # and the two answers really differ

# %% [markdown]
# TD's values are pulled toward the middle: each group's target bootstraps from its neighbours' shared
# values, so the outer groups inherit the inner groups' bias. In exchange TD learns from every step
# without waiting for the episode to end, and with lower variance (chapter 3). This trade-off returns in
# chapter 5 as GAE's $\lambda$.

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
x = np.arange(1, N_STATES + 1)
ax1.plot(x, true_v[live], "k-", label="true value v_pi")
ax1.step(x, phi[live] @ w_mc, where="mid", label="gradient-MC fixed point")
ax1.step(x, phi[live] @ w_td, where="mid", label="TD fixed point")
ax1.plot(x, phi[live] @ learned_mc, "C0.", label="gradient MC, learned")
ax1.plot(x, phi[live] @ learned_td, "C1x", label="semi-gradient TD, learned")
ax1.bar(x, eta / eta.max() * 0.25, color="grey", alpha=0.3, label="visit distribution (scaled)")
ax1.set_xlabel("state")
ax1.set_ylabel("value")
ax1.set_title("State aggregation, 4 groups of 3 states")
ax1.legend(fontsize=8)
for hist, name in ((hist_mc, "gradient MC"), (hist_td, "semi-gradient TD")):
    ax2.plot(np.arange(0, len(hist), 20), [value_error(phi, w) for w in hist[::20]], label=name)
ax2.axhline(value_error(phi, w_mc), color="C0", ls=":", lw=1)
ax2.axhline(value_error(phi, w_td), color="C1", ls=":", lw=1)
ax2.set_xlabel("episodes")
ax2.set_ylabel("RMS value error")
ax2.set_title("Learning curves (dotted: fixed points)")
ax2.legend()
show(fig, "04_state_aggregation")
