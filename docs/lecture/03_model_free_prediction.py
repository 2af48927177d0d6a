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
# # 3. Model-free prediction: Monte-Carlo and TD(0) on the random walk
#
# **Slides followed** (part 01): "Policy evaluation" (its two model-free methods), "Policy Evaluation –
# Monte Carlos", "Policy Evaluation – temporal difference (TD(0))". The experiment is Sutton & Barto's
# Example 6.2 (the random walk) and its Figure 6.2; David Silver's lecture 4 (model-free prediction)
# covers the same ground.
#
# Without the model ($\mathcal P$, $\mathcal R$), values are learned from sampled episodes (chạy giả lập,
# simulation runs) of the policy.
#
# **Monte-Carlo** (MC) waits for the end of an episode, computes the return
# $G_t = R_{t+1} + \gamma R_{t+2} + \dots$ and moves the estimate toward it:
#
# $$V(s_t) \leftarrow V(s_t) + \alpha\,(G_t - V(s_t)),$$
#
# with $\alpha = 1/N(s)$ this is the running mean of the returns ($V_\pi(s) = \text{mean}(G_t)$ on the slide).
# Its limits (hạn chế), as the slides list them: it must wait for the episode to end, episodes must
# terminate, and it needs many of them. Its advantages (ưu điểm): no Markov assumption, no model.
#
# **Temporal difference**, TD(0), estimates $G_t$ by looking one step ahead (nhìn về phía trước 1 bước):
#
# $$V(s_t) \leftarrow V(s_t) + \alpha\,\big(r_{t+1} + \gamma V(s_{t+1}) - V(s_t)\big).$$
#
# **The random walk**: states A B C D E between two terminal ends, start in C, step left or right with
# probability 1/2, reward +1 for leaving on the right and 0 otherwise, $\gamma = 1$. So $v(s)$ is the
# probability of leaving on the right: $1/6, 2/6, \dots, 5/6$.

# %%
import numpy as np
from _lecture import plt, show, table

from prefalign.rl import mc_prediction, random_walk, rms_error, td0_prediction, td_vs_mc_rms
from prefalign.rl.envs import RANDOM_WALK_START

walk = random_walk()
true_v = walk.values()
print("states:", walk.states, "\ntrue values:", np.round(true_v, 4))
assert np.allclose(true_v[1:-1], np.arange(1, 6) / 6)
live = np.flatnonzero(~walk.terminal)
v0 = np.where(walk.terminal, 0.0, 0.5)

# %% [markdown]
# ## One run of TD(0) (Figure 6.2, left)
#
# All estimates start at 0.5. After the first episode only one value has moved: every transition but the
# last has reward 0 and $V(s_{t+1}) = V(s_t) = 0.5$, so its TD error is 0; the last one moves A to
# $0.5 + 0.1\,(0 - 0.5) = 0.45$ or E to $0.5 + 0.1\,(1 + 0 - 0.5) = 0.55$.

# %%
rng = np.random.default_rng(1)
episodes = [walk.sample_episode(RANDOM_WALK_START, rng) for _ in range(100)]
td = td0_prediction(episodes, walk.n_states, alpha=0.1, v0=v0)
changed = np.flatnonzero(~np.isclose(td[1], td[0]))
print(
    "first episode:",
    " ".join(walk.states[s] for s in episodes[0].states),
    "-> changed:",
    [walk.states[s] for s in changed],
)
assert len(changed) == 1 and np.isclose(abs(td[1, changed[0]] - 0.5), 0.05)
assert np.isclose(td[1, changed[0]], 0.45 if walk.states[changed[0]] == "A" else 0.55)
print(
    table([[k] + [float(x) for x in td[k, live]] for k in (0, 1, 10, 100)], ["episodes"] + walk.states[1:-1])
)

# %% [markdown]
# ## Monte-Carlo with sample averages converges to the true values
#
# With $\alpha = 1/N(s)$ (first-visit), the estimate is the mean of independent returns, so its error
# shrinks like $1/\sqrt{N}$. After 3000 episodes each state has been visited in well over a thousand of
# them; the RMS error should be about 0.01.

# %%
many = [walk.sample_episode(RANDOM_WALK_START, rng) for _ in range(3000)]
mc_mean = mc_prediction(many, walk.n_states, first_visit=True, v0=v0)
mc_err = rms_error(mc_mean, true_v, live)
print(
    f"first-visit MC, sample averages: RMS error after 100 / 1000 / 3000 episodes: {mc_err[100]:.4f} / {mc_err[1000]:.4f} / {mc_err[-1]:.4f}"
)
assert mc_err[-1] < 0.02

# %% [markdown]
# ## TD versus constant-alpha MC (Figure 6.2, right)
#
# The RMS error over the five states, averaged over 100 runs of 100 episodes, for several step sizes.
# The book's observation: TD(0) learns faster than MC on this problem at every step size tried, and
# with $\alpha = 0.05$ ends lowest. Large step sizes learn fast and then plateau at a higher error
# (the estimate keeps chasing the most recent returns).

# %%
curves = td_vs_mc_rms(walk, RANDOM_WALK_START, runs=100, episodes=100, seed=0)
start = np.sqrt(np.mean((0.5 - true_v[live]) ** 2))  # sqrt(1/18) = 0.2357
for name, c in curves.items():
    assert np.isclose(c[0], start), name
best_mc = min(c[-1] for n, c in curves.items() if n.startswith("MC"))
print(
    table(
        [[n, float(c[10]), float(c[-1])] for n, c in curves.items()],
        ["method", "RMS after 10", "RMS after 100"],
    )
)
assert curves["TD alpha=0.05"][-1] < best_mc
assert curves["TD alpha=0.15"][10] < curves["MC alpha=0.04"][10]  # TD's bigger steps learn fastest early

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
x = np.arange(1, 6)
for k in (0, 1, 10, 100):
    ax1.plot(x, td[k, live], marker="o", label=f"after {k} episodes")
ax1.plot(x, true_v[live], "k--", label="true values")
ax1.set_xticks(x, walk.states[1:-1])
ax1.set_ylabel("estimated value")
ax1.set_title("TD(0), alpha = 0.1, one run")
ax1.legend()
for name, c in curves.items():
    ax2.plot(c, label=name, ls="-" if name.startswith("TD") else "--")
ax2.set_xlabel("episodes")
ax2.set_ylabel("RMS error, averaged over 100 runs")
ax2.set_title("TD(0) vs constant-alpha MC")
ax2.legend(fontsize=8)
show(fig, "03_random_walk")

# %% [markdown]
# The same experiment from the command line: `prefalign rl random-walk --output runs/rw`.
