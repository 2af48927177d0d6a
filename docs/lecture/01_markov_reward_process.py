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
# # 1. Markov chains, Markov reward processes, return and value
#
# **Slides followed** (part 01, *introduction to reinforcement learning*): "Markov Process hay Markov
# Chain" (Markov process, or Markov chain), "Markov Reward Process (MRP)", "return", "Value function".
# The running example is the *student MRP* of David Silver's RL course, lecture 2 (Markov decision
# processes), which the slides cite; notation follows Sutton & Barto, *Reinforcement Learning: An
# Introduction* (2nd ed., 2018), chapter 3.
#
# A **Markov process** (quá trình Markov) is a sequence of random states with the Markov property
# (tính chất Markov: the future depends on the present state only, "memoryless random process"). It is a
# pair $\langle \mathcal S, \mathcal P\rangle$: a finite set of states (tập trạng thái) and a transition
# matrix (phép chuyển đổi trạng thái) $\mathcal P_{ss'} = p(s_{t+1} = s' \mid s_t = s)$.
#
# A **Markov reward process** (MRP) adds a reward function (hàm phần thưởng)
# $\mathcal R_s = \mathbb E[r_{t+1} \mid s_t = s]$ and a discount factor (khấu hao)
# $\gamma \in [0, 1]$. The **return** (Gt, "tổng giá trị các phần thưởng khấu hao") is
#
# $$G_t = R_{t+1} + \gamma R_{t+2} + \gamma^2 R_{t+3} + \dots = \sum_{k=0}^\infty \gamma^k R_{t+k+1},$$
#
# and the **state-value function** (hàm giá trị trạng thái) is its expectation,
# $v(s) = \mathbb E[G_t \mid S_t = s]$. Splitting off the first reward gives the **Bellman equation**
#
# $$v(s) = \mathcal R_s + \gamma \sum_{s' \in \mathcal S} \mathcal P_{ss'}\, v(s'),
# \qquad\text{in matrix form}\qquad v = \mathcal R + \gamma \mathcal P v
# \;\Rightarrow\; v = (I - \gamma \mathcal P)^{-1} \mathcal R .$$
#
# (The slides write the reward of the step as $R_t$; we use Sutton & Barto's $R_{t+1}$, the reward
# received on leaving $S_t$. It is the same quantity.)

# %%
import numpy as np
from _lecture import plt, show, table

from prefalign.rl import discounted_returns, student_mrp
from prefalign.rl.envs import STUDENT_STATES

mrp = student_mrp(gamma=0.9)
print("states:", STUDENT_STATES)
print("P =")
print(np.array2string(mrp.P, precision=1, suppress_small=True))
print("R =", mrp.R)

# %% [markdown]
# ## Sampled episodes and their returns
#
# Silver's lecture samples episodes from C1 and computes their returns with $\gamma = 1/2$. For
# C1 C2 C3 Pass Sleep: $G_1 = -2 - 2\cdot\tfrac12 - 2\cdot\tfrac14 + 10\cdot\tfrac18 = -2.25$; for
# C1 FB FB C1 C2 Sleep: $-2 - \tfrac12 - \tfrac14 - \tfrac28 - \tfrac2{16} = -3.125$.

# %%
idx = {name: i for i, name in enumerate(STUDENT_STATES)}
for names, expected in [
    ("C1 C2 C3 Pass Sleep", -2.25),
    ("C1 FB FB C1 C2 Sleep", -3.125),
]:
    states = [idx[n] for n in names.split()]
    rewards = mrp.R[states[:-1]]  # the reward of leaving each state but the last
    G = discounted_returns(rewards, gamma=0.5)
    print(f"{names:<24} G_1 = {G[0]:+.3f}")
    assert np.isclose(G[0], expected), (names, G[0])

rng = np.random.default_rng(0)
for _ in range(3):
    ep = mrp.sample_episode(idx["C1"], rng)
    print(
        " ".join(STUDENT_STATES[s] for s in ep.states),
        f"  G_1 (gamma 0.9) = {discounted_returns(ep.rewards, 0.9)[0]:+.2f}",
    )

# %% [markdown]
# ## The Bellman equation solved exactly
#
# `MRP.values()` solves $(I - \gamma \mathcal P)\,v = \mathcal R$ over the non-terminal states (Sleep
# is terminal: its value is 0 by definition). Silver's slides give, rounded,
# $v = (-5.0, 0.9, 4.1, 10, 1.9, -7.6, 0)$ at $\gamma = 0.9$ and
# $v = (-13, 1.5, 4.3, 10, 0.8, -23, 0)$ at $\gamma = 1$ (C1, C2, C3, Pass, Pub, FB, Sleep); the
# slides round C1 and FB at $\gamma = 1$ to whole numbers (exactly they are $-1016/81 = -12.54$ and
# $-1826/81 = -22.54$), so each value is checked to the precision the slides print it with.
# With $\gamma = 0$ the value is just the immediate reward.

# %%
slides = {  # as printed on the slides; the tolerance is half a unit of the last printed digit
    0.9: ([-5.0, 0.9, 4.1, 10, 1.9, -7.6, 0], 0.05),
    1.0: ([-13, 1.5, 4.3, 10, 0.8, -23, 0], [0.5, 0.05, 0.05, 0.5, 0.05, 0.5, 0.5]),
}
exact = {}
for gamma, (expected, tol) in slides.items():
    exact[gamma] = student_mrp(gamma).values()
    assert np.all(np.abs(exact[gamma] - expected) <= np.asarray(tol) + 1e-9), (gamma, exact[gamma])
assert np.isclose(exact[1.0][0], -1016 / 81) and np.isclose(exact[1.0][5], -1826 / 81)
exact[0.0] = student_mrp(0.0).values()
assert np.allclose(exact[0.0][:-1], mrp.R[:-1])
print(
    table(
        [[s] + [float(exact[g][i]) for g in (0.0, 0.9, 1.0)] for i, s in enumerate(STUDENT_STATES)],
        ["state", "v (gamma 0)", "v (gamma 0.9)", "v (gamma 1)"],
    )
)

# %% [markdown]
# The Bellman equation holds state by state. Check it at C3 with $\gamma = 0.9$:
# $v(\text{C3}) = -2 + 0.9\,(0.6\, v(\text{Pass}) + 0.4\, v(\text{Pub}))$.

# %%
v = exact[0.9]
rhs = -2 + 0.9 * (0.6 * v[idx["Pass"]] + 0.4 * v[idx["Pub"]])
print(f"v(C3) = {v[idx['C3']]:.4f},  R + gamma P v at C3 = {rhs:.4f}")
assert np.isclose(v[idx["C3"]], rhs)

# %% [markdown]
# ## The Bellman equation solved iteratively
#
# The inverse costs $O(n^3)$; for large problems one iterates the **Bellman backup**
# $v_{k+1} = \mathcal R + \gamma \mathcal P v_k$ instead. For $\gamma < 1$ the backup is a
# $\gamma$-contraction in the max norm, so $\lVert v_k - v\rVert_\infty \le \gamma^k \lVert v_0 - v \rVert_\infty$:
# the error falls at least geometrically. At $\gamma = 1$ it still converges here, because every
# state eventually reaches Sleep, but more slowly (the rate is set by the largest eigenvalue of
# $\mathcal P$ restricted to the non-terminal states, 0.956 here: FB's self-loop of 0.9 and its way back
# through C1 keep episodes going for a long time).

# %%
errors: dict[float, list[float]] = {}
for gamma in (0.9, 1.0):
    m = student_mrp(gamma)
    vk = np.zeros(m.n_states)
    errs = []
    for _ in range(600):
        errs.append(float(np.max(np.abs(vk - exact[gamma]))))
        vk = m.bellman(vk)
    errors[gamma] = errs
    print(f"gamma {gamma}: max error after 50 sweeps {errs[50]:.2e}, after 600 sweeps {errs[-1]:.2e}")
e0 = errors[0.9][0]
assert all(e <= 0.9**k * e0 + 1e-12 for k, e in enumerate(errors[0.9])), "the backup must contract by gamma"
assert errors[1.0][-1] < 1e-6

live = ~student_mrp(1.0).terminal
rho = max(abs(np.linalg.eigvals(student_mrp(1.0).P[np.ix_(live, live)])))
rate = errors[1.0][300] / errors[1.0][299]
print(f"spectral radius of P over non-terminal states: {rho:.4f}; observed error ratio per sweep: {rate:.4f}")
assert abs(rate - rho) < 1e-3

# %% [markdown]
# A Monte-Carlo check closes the loop: the mean of sampled returns from C1 approaches $v(\text{C1})$
# (chapter 3 turns this into an algorithm).

# %%
returns = [discounted_returns(mrp.sample_episode(idx["C1"], rng).rewards, 0.9)[0] for _ in range(4000)]
mc = float(np.mean(returns))
stderr = float(np.std(returns) / np.sqrt(len(returns)))
print(f"mean of 4000 sampled returns from C1: {mc:.3f} +- {stderr:.3f}  (exact {v[idx['C1']]:.3f})")
assert abs(mc - v[idx["C1"]]) < 4 * stderr

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
x = np.arange(len(STUDENT_STATES))
for k, gamma in enumerate((0.0, 0.9, 1.0)):
    ax1.bar(x + (k - 1) * 0.27, exact[gamma], width=0.27, label=f"gamma = {gamma:g}")
ax1.set_xticks(x, STUDENT_STATES)
ax1.axhline(0, color="black", lw=0.5)
ax1.set_ylabel("v(s)")
ax1.set_title("Student MRP: exact values")
ax1.legend()
for gamma, errs in errors.items():
    ax2.semilogy(errs, label=f"iterative, gamma = {gamma:g}")
ax2.semilogy(0.9 ** np.arange(600) * e0, "k--", lw=0.8, label="gamma^k bound (0.9)")
ax2.set_xlabel("Bellman backups k")
ax2.set_ylabel("max |v_k - v|")
ax2.set_ylim(1e-12, 100)
ax2.set_title("Iterative solution converges to the exact one")
ax2.legend()
show(fig, "01_student_mrp")

# %% [markdown]
# **Try it**: change a transition probability of `student_mrp` (for example make the pub send you back to
# class less often) and see which values move. Any `MRP(P, R, gamma, terminal)` you build works the same way.
