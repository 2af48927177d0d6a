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
# # 2. MDPs, policies and q-values; policy evaluation, policy iteration, value iteration
#
# **Slides followed** (part 01): "markov decision process (mdp)", "policy", "Value function when
# having policy", "model", "Find optimal policy through value function", "Policy evaluation",
# "Policy iteration". Examples: David Silver's student MDP (RL course, lecture 2) and Sutton & Barto's
# gridworlds, Example 4.1 (the 4x4 grid, Figure 4.1) and Example 3.5 (the 5x5 grid, Figures 3.2 and 3.5).
#
# A **Markov decision process** (quá trình quyết định Markov) $\langle\mathcal S, \mathcal A,
# \mathcal P, \mathcal R, \gamma\rangle$ adds actions (hành động) to an MRP:
# $\mathcal P^a_{ss'} = p(s_{t+1} = s' \mid s_t = s, a_t = a)$, $\mathcal R^a_s = \mathbb E[r_{t+1}
# \mid s_t = s, a_t = a]$. A **policy** (chiến lược) is a distribution over actions in each state,
# $\pi(a \mid s) = P[A_t = a \mid S_t = s]$. A fixed policy turns the MDP back into an MRP
# ("Policy evaluation" slide):
#
# $$\mathcal P^\pi_{ss'} = \sum_a \pi(a\mid s)\,\mathcal P^a_{ss'},\qquad
# \mathcal R^\pi_s = \sum_a \pi(a\mid s)\,\mathcal R^a_s,\qquad
# v_\pi = (I - \gamma \mathcal P^\pi)^{-1}\mathcal R^\pi .$$
#
# The **action-value function** (hàm giá trị hành động) is
# $q_\pi(s, a) = \mathcal R^a_s + \gamma \sum_{s'} \mathcal P^a_{ss'} v_\pi(s')$, and the optimal
# policy (chiến lược tối ưu) is greedy in the optimal values:
# $\pi_*(s) = \arg\max_a q_*(s, a)$, with $v_*(s) = \max_\pi v_\pi(s)$.

# %%
import numpy as np
from _lecture import plt, show, table

from prefalign.rl import (
    gridworld_4x4,
    gridworld_5x5,
    iterative_policy_evaluation,
    policy_iteration,
    student_mdp,
    value_iteration,
)
from prefalign.rl.envs import GRID_ARROWS, STUDENT_MDP_ACTIONS, STUDENT_MDP_STATES

# %% [markdown]
# ## The student MDP
#
# Silver's slides give, at $\gamma = 1$, the values of the uniform random policy
# $v_\pi = (-2.3, -1.3, 2.7, 7.4)$ and the optimal values $v_* = (6, 6, 8, 10)$ for FB, C1, C2, C3, with
# the optimal action values $q_*$ FB: Facebook 5, Quit 6; C1: Facebook 5, Study 6; C2: Sleep 0,
# Study 8; C3: Pub 9.4, Study 10.

# %%
mdp = student_mdp(gamma=1.0)
v_random = mdp.evaluate(mdp.uniform_policy())
best = policy_iteration(mdp)
q_star = mdp.q_values(best.v)
rows = []
for s, name in enumerate(STUDENT_MDP_STATES[:-1]):
    a0, a1 = STUDENT_MDP_ACTIONS[name]
    rows.append(
        [name, float(v_random[s]), float(best.v[s]), f"{a0} {q_star[s, 0]:.1f}", f"{a1} {q_star[s, 1]:.1f}"]
    )
print(table(rows, ["state", "v_random", "v_*", "q_*(s, action 0)", "q_*(s, action 1)"]))
assert np.allclose(v_random[:4], [-2.3, -1.3, 2.7, 7.4], atol=0.05)
assert np.allclose(best.v[:4], [6, 6, 8, 10])
assert np.allclose(q_star[:4], [[5, 6], [5, 6], [0, 8], [9.4, 10]])
print(
    "optimal actions:",
    {
        n: STUDENT_MDP_ACTIONS[n][int(np.argmax(best.policy[s]))]
        for s, n in enumerate(STUDENT_MDP_STATES[:-1])
    },
)

# %% [markdown]
# ## Iterative policy evaluation on the 4x4 gridworld (Sutton & Barto, Example 4.1)
#
# Sixteen cells, the two shaded corners terminal, reward $-1$ per move, $\gamma = 1$. Instead of solving the
# linear system, apply the Bellman expectation backup sweep after sweep,
# $v_{k+1} = \mathcal R^\pi + \gamma \mathcal P^\pi v_k$ from $v_0 = 0$. Figure 4.1 prints
# $v_k$ for the equiprobable random policy at $k = 0, 1, 2, 3, 10, \infty$; its first row at $k = 2$
# reads $0, -1.7, -2.0, -2.0$, at $k = 3$ $0, -2.4, -2.9, -3.0$, and at $k = \infty$
# $0, -14, -20, -22$.

# %%
grid = gridworld_4x4()
pi = grid.uniform_policy()
sweeps = {k: iterative_policy_evaluation(grid, pi, sweeps=k) for k in (0, 1, 2, 3, 10)}
sweeps["inf"] = grid.evaluate(pi)
for k, v in sweeps.items():
    print(f"k = {k}:\n{np.array2string(v.reshape(4, 4), precision=1, suppress_small=True)}")
assert np.allclose(sweeps[2][:4], [0, -1.75, -2, -2])  # printed as -1.7 in the book
assert np.allclose(sweeps[3][:4], [0, -2.4375, -2.9375, -3.0])
assert np.allclose(
    sweeps["inf"].reshape(4, 4),
    [[0, -14, -20, -22], [-14, -18, -20, -20], [-20, -20, -18, -14], [-22, -20, -14, 0]],
)
converged = iterative_policy_evaluation(grid, pi)  # until the change is below 1e-10
assert np.allclose(converged, sweeps["inf"], atol=1e-8)

# %% [markdown]
# ## Policy iteration and value iteration
#
# **Policy iteration** (the slides' "vòng lặp cải tiến", improvement loop): evaluate $\pi_i$, make it
# greedy, $\pi_{i+1}(s) = \arg\max_a q_{\pi_i}(s, a)$, and stop when the policy no longer changes.
# **Value iteration** folds the two into one backup,
# $v_{k+1}(s) = \max_a [\mathcal R^a_s + \gamma \sum_{s'} \mathcal P^a_{ss'} v_k(s')]$.
# On the 4x4 grid the greedy policy of the random policy's values is already optimal (Figure 4.1's last
# panel): following it already earns $v_*$, though policy iteration takes another round to find every
# tied optimal action and confirm that nothing changes.

# %%
pi_star = policy_iteration(grid)
vi = value_iteration(grid)
print("policy iteration: iterations =", pi_star.iterations, " v* =\n", pi_star.v.reshape(4, 4))
assert np.allclose(grid.evaluate(grid.greedy(sweeps["inf"])), pi_star.v)
assert np.allclose(grid.evaluate(grid.greedy(sweeps[3])), pi_star.v)  # already optimal after 3 sweeps
assert not np.allclose(grid.evaluate(grid.greedy(sweeps[2])), pi_star.v)  # but not after 2
assert np.allclose(
    pi_star.v.reshape(4, 4), [[0, -1, -2, -3], [-1, -2, -3, -2], [-2, -3, -2, -1], [-3, -2, -1, 0]]
)
assert np.allclose(vi.v, pi_star.v) and np.allclose(vi.policy, pi_star.policy)

# %% [markdown]
# ## The 5x5 gridworld (Sutton & Barto, Example 3.5, Figures 3.2 and 3.5)
#
# A continuing task with $\gamma = 0.9$: from A every action jumps to A' with reward $+10$, from B to B'
# with $+5$, moves off the grid cost $-1$. Figure 3.2 gives $v_\pi$ of the random policy (first row
# $3.3, 8.8, 4.4, 5.3, 1.5$) and Figure 3.5 the optimal values (first row $22.0, 24.4, 22.0, 19.4, 17.5$).

# %%
g5 = gridworld_5x5()
v5 = g5.evaluate(g5.uniform_policy())
fig32 = [
    [3.3, 8.8, 4.4, 5.3, 1.5],
    [1.5, 3.0, 2.3, 1.9, 0.5],
    [0.1, 0.7, 0.7, 0.4, -0.4],
    [-1.0, -0.4, -0.4, -0.6, -1.2],
    [-1.9, -1.3, -1.2, -1.4, -2.0],
]
fig35 = [
    [22.0, 24.4, 22.0, 19.4, 17.5],
    [19.8, 22.0, 19.8, 17.8, 16.0],
    [17.8, 19.8, 17.8, 16.0, 14.4],
    [16.0, 17.8, 16.0, 14.4, 13.0],
    [14.4, 16.0, 14.4, 13.0, 11.7],
]
assert np.allclose(v5.reshape(5, 5), fig32, atol=0.05)
opt5 = policy_iteration(g5)
assert np.allclose(opt5.v.reshape(5, 5), fig35, atol=0.05)
vi5 = value_iteration(g5)
assert np.allclose(vi5.v, opt5.v, atol=1e-8)
print("v_random:\n", np.round(v5.reshape(5, 5), 1), "\nv_*:\n", np.round(opt5.v.reshape(5, 5), 1))
print(f"policy iteration: {opt5.iterations} improvement steps; value iteration: {vi5.iterations} sweeps")


# %%
def draw_values(ax, v, n, title, policy=None, terminal=None):
    ax.imshow(v.reshape(n, n), cmap="viridis")
    bright = (v - v.min()) / (np.ptp(v) or 1.0) > 0.6
    for s in range(n * n):
        r, c = divmod(s, n)
        label = f"{v[s]:.1f}"
        if policy is not None and not (terminal is not None and terminal[s]):
            label += "\n" + "".join(GRID_ARROWS[a] for a in np.flatnonzero(policy[s] > 0))
        ax.text(c, r, label, ha="center", va="center", color="black" if bright[s] else "white", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)


fig, axes = plt.subplots(2, 4, figsize=(14, 7.5))
for ax, k in zip(axes[0], (1, 2, 3, "inf"), strict=True):
    draw_values(ax, sweeps[k], 4, f"4x4, random policy, k = {k}", grid.greedy(sweeps[k]), grid.terminal)
draw_values(axes[1, 0], pi_star.v, 4, "4x4, v* and pi*", pi_star.policy, grid.terminal)
draw_values(axes[1, 1], v5, 5, "5x5, random policy (Fig. 3.2)")
draw_values(axes[1, 2], opt5.v, 5, "5x5, v* and pi* (Fig. 3.5)", opt5.policy)
ks = np.arange(0, 400, 10)
axes[1, 3].semilogy(
    ks, [np.max(np.abs(iterative_policy_evaluation(grid, pi, sweeps=k) - sweeps["inf"])) for k in ks]
)
axes[1, 3].set_xlabel("sweeps k")
axes[1, 3].set_title("4x4: max |v_k - v_pi|", fontsize=10)
fig.tight_layout()
show(fig, "02_gridworlds")

# %% [markdown]
# The arrows in the first row are the greedy policies of each $v_k$: after three sweeps they are already
# optimal, long before the values converge, which is why policy iteration needs so few improvement steps.
