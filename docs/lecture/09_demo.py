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
# # 9. The demo: DPO against RLHF on controlled sentiment
#
# **Slides followed** (part 04): "Demo". The experiment is the DPO paper's controlled sentiment
# generation (Rafailov et al. 2023, section 6.1 and appendix C.1) at laptop scale: continue the opening of
# a movie review so that the review turns positive, while staying close to the reference model. Every
# method trades reward against KL divergence from the reference (phân kỳ KL), so each is drawn as a curve
# of (KL, reward) points along its training: the *reward-KL frontier*.
#
# - **Ground truth.** VADER's compound sentiment of the continuation, in [-1, 1] (Hutto & Gilbert 2014):
#   a lexicon stand-in for the paper's sentiment classifier, which runs offline.
# - **Preferences, as in the paper.** 4 continuations per training prompt from the reference; every pair
#   of them (6 per prompt) ordered by the ground truth, ties dropped.
# - **Methods.** Preferred-FT (SFT on each prompt's preferred continuation); DPO; RLHF = a Bradley-Terry
#   reward model on the same pairs (chapter 6) then PPO against it with the KL penalty.
# - **Evaluation.** On held-out prompts with a fixed sampling seed: the mean ground-truth reward and the
#   mean sequence-level $\mathrm{KL}(\pi\,\|\,\pi_{\text{ref}}) \approx \frac1N\sum_i \sum_t
#   \big(\log\pi(y_{i,t}\mid\cdot) - \log\pi_{\text{ref}}(y_{i,t}\mid\cdot)\big)$ of samples $y_i \sim \pi$.
#
# ## Running it
#
# ```
# make demo                                   # = prefalign demo --output runs/demo (SmolLM2, < 25 min on 2 cores)
# prefalign demo --preset frontier            # the DPO beta sweep, PPO-GT, target-KL sweep, Best-of-N, GRPO, RLOO (hours on a CPU)
# prefalign demo --preset smoke --output /tmp/smoke   # a tiny random model and a few prompts, for tests
# ```
#
# The run folder holds `report.html` (one self-contained file: open it in a browser), `report.md`,
# `summary.json`, `samples/<method>-<checkpoint>.jsonl` (one line per evaluated sample) and each method's
# own run folder under `runs/`. Rerunning the command skips the phases whose results are complete.
#
# This chapter runs the **smoke** preset (a tiny random model, seconds) to show how to read the output and
# how to check it: the table is nothing but means over the sample files.

# %%
import atexit
import json
import math
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

from _lecture import plt, show, table

from prefalign.demo import config_for_preset, run_demo
from prefalign.rewards import vader_scores

work = Path(tempfile.mkdtemp(prefix="prefalign-lecture-09-"))
atexit.register(shutil.rmtree, work, ignore_errors=True)
summary = run_demo(config_for_preset("smoke", output=str(work / "demo"), progress=False))
run = work / "demo"
print(sorted(p.name for p in run.iterdir()))

# %% [markdown]
# ## The table, recomputed from the samples
#
# `summary.json` has one entry in `points` per evaluated (method, checkpoint): its mean reward, its mean
# KL and the samples file they came from. Recompute both from the file, the rewards with VADER from the
# texts themselves: they must agree.

# %%
rows = []
for point in summary["points"]:
    samples = [json.loads(line) for line in (run / point["samples"]).read_text().splitlines()]
    rewards = vader_scores([s["completion"] for s in samples])
    reward = sum(rewards) / len(rewards)
    kl = sum(s["kl"] for s in samples) / len(samples)
    assert math.isclose(reward, point["reward"], abs_tol=1e-6), point
    assert math.isclose(kl, point["kl"], abs_tol=1e-6), point
    rows.append([point["method"], point["checkpoint"], reward, kl, len(samples)])
print(table(rows, ["method", "checkpoint", "reward (VADER)", "KL (nats)", "samples"]))

# %% [markdown]
# The reference is its own starting point, so its KL is exactly 0: its samples are scored by the same
# model twice. Every trained method starts there too.

# %%
reference = [p for p in summary["points"] if p["method"] == "reference"]
assert len(reference) == 1 and abs(reference[0]["kl"]) < 1e-6
print("conclusion drawn from the numbers:", summary["conclusion"])

# %% [markdown]
# ## The frontier
#
# One colour per method, its points joined in training order. On the real model (`make demo`) DPO's
# curve is the one to compare with PPO's: the paper's Figure 2 (left) finds DPO's frontier above PPO's,
# and the report says in one sentence whether that holds in your run. The smoke model is random, so its
# points mean nothing beyond checking the plumbing.

# %%
curves = defaultdict(list)
for p in summary["points"]:
    curves[p["method"]].append((p["kl"], p["reward"]))
fig, ax = plt.subplots(figsize=(6, 4))
for method, pts in curves.items():
    ax.plot([k for k, _ in pts], [r for _, r in pts], "o-", label=method)
ax.set_xlabel("KL(pi || pi_ref), nats per sequence")
ax.set_ylabel("mean VADER reward")
ax.set_title("Reward vs KL (smoke preset)")
ax.legend()
show(fig, "09_demo_frontier")
