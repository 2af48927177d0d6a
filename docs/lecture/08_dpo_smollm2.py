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
# # 8. DPO on the bundled SmolLM2
#
# **Slides followed** (part 04, *direct preference optimization (dpo)*): "overview", "Secret behind DPO"
# and "Demo". Chapter 7 checked DPO where everything is known exactly; here the same loss trains a real
# causal language model, SmolLM2-135M-Instruct (bundled with prefalign), on preference pairs. Method:
# Rafailov et al. 2023.
#
# DPO trains the language model (mô hình ngôn ngữ) directly on what people prefer, without a separate
# reward model and without RL: with $\pi_{\text{ref}}$ the model before training,
#
# $$\mathcal L_{\text{DPO}} = -\log\sigma\big(\hat r(x, y_w) - \hat r(x, y_l)\big),\qquad
# \hat r(x, y) = \beta\log\frac{\pi_\theta(y\mid x)}{\pi_{\text{ref}}(y\mid x)},$$
#
# where $\log\pi(y\mid x)$ is the sum of the completion's token log-probabilities. $\hat r$ is the
# *implicit reward*: after training it should rank held-out pairs the way the preferences do.
#
# This chapter loads a 135M-parameter model twice (policy and reference) and trains for 4 steps: about two
# minutes on a 2-core CPU. It runs under `make test-slow`, not `make test`.

# %%
import atexit
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from _lecture import plt, show, table

from prefalign.models import load_policy, load_reference, load_tokenizer
from prefalign.testing import synthetic_pairs, write_jsonl
from prefalign.train.dpo import DPOConfig, reference_pass, train
from prefalign.train.loop import load_pairs, read_metrics

torch.manual_seed(0)
work = Path(tempfile.mkdtemp(prefix="prefalign-lecture-08-"))  # data and the run (a 0.5 GB model)
atexit.register(shutil.rmtree, work, ignore_errors=True)  # removed when the script or kernel exits

# %% [markdown]
# ## Preference pairs
#
# A small synthetic dataset with an unambiguous preference: for a prompt asking for a movie review, the
# chosen review uses positive words and the rejected one negative words (`prefalign.testing.synthetic_pairs`).
# 32 pairs train, 16 different ones are held out. Each row is `{"prompt", "chosen", "rejected"}`, here
# as chat messages; the same files work with the command line.

# %%
train_file = write_jsonl(work / "train.jsonl", synthetic_pairs(32, seed=1, chat=True))
eval_file = write_jsonl(work / "eval.jsonl", synthetic_pairs(16, seed=2, chat=True))
for row in synthetic_pairs(3, seed=1):
    print(f"prompt:   {row['prompt']}\n  chosen:   {row['chosen']}\n  rejected: {row['rejected']}")

# %% [markdown]
# ## Training with `prefalign.train.dpo`
#
# The command-line equivalent is
#
# ```
# prefalign dpo --model smollm2 --data train.jsonl --eval-data eval.jsonl --output runs/dpo \
#     --beta 0.1 --lr 5e-6 --batch-size 8 --epochs 1 --max-length 256 --lr-schedule constant
# ```
#
# At the first step the policy equals the reference, so every implicit reward is 0 and the loss is exactly
# $-\log\sigma(0) = \ln 2$.

# %%
config = DPOConfig(
    model="smollm2",
    data=str(train_file),
    eval_data=str(eval_file),
    output=str(work / "run"),
    beta=0.1,
    lr=5e-6,
    batch_size=8,
    epochs=1,
    max_length=256,
    lr_schedule="constant",
    progress=False,
)
summary = train(config)
metrics = read_metrics(config.output)
print(
    table(
        [
            [m["step"], m["loss"], m["rewards/chosen"], m["rewards/rejected"], m["rewards/accuracies"]]
            for m in metrics
            if "loss" in m
        ],
        ["step", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies"],
    )
)
print("held-out:", {k: round(v, 4) for k, v in summary["eval"].items()})
first = metrics[0]
assert math.isclose(first["loss"], math.log(2), abs_tol=1e-5)
assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/rejected"]) < 1e-5
assert summary["eval"]["val/rewards/accuracies"] > 0.8

# %% [markdown]
# ## The implicit reward on held-out pairs
#
# Score each held-out completion under the trained policy and under the reference, and take
# $\beta(\log\pi_\theta - \log\pi_{\text{ref}})$. The mean margin must match what training reported for the
# held-out set, and the chosen completion should get the higher reward in most pairs.

# %%
tokenizer = load_tokenizer("smollm2")
_, held = load_pairs(config, tokenizer)
policy = load_policy(config.output)
reference = load_reference("smollm2")
logp_policy = reference_pass(policy, held, config)  # [n, 2]: chosen, rejected
logp_ref = reference_pass(reference, held, config)
r_hat = config.beta * (logp_policy - logp_ref)
margins = (r_hat[:, 0] - r_hat[:, 1]).numpy()
print(f"{len(held)} held-out pairs: accuracy {np.mean(margins > 0):.2f}, mean margin {margins.mean():.4f}")
assert math.isclose(margins.mean(), summary["eval"]["val/rewards/margins"], rel_tol=1e-3, abs_tol=1e-4)
assert np.mean(margins > 0) > 0.8

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
steps = [m["step"] for m in metrics if "loss" in m]
ax1.plot(steps, [m["loss"] for m in metrics if "loss" in m], "o-", label="loss")
ax1.axhline(math.log(2), color="grey", ls=":", label="ln 2")
ax1.plot(steps, [m["rewards/margins"] for m in metrics if "loss" in m], "s-", label="rewards/margins")
ax1.set_xlabel("optimiser step")
ax1.set_title("DPO on SmolLM2-135M (training batches)")
ax1.legend()
ax2.scatter(r_hat[:, 1], r_hat[:, 0])
lim = float(r_hat.abs().max()) * 1.1
ax2.plot([-lim, lim], [-lim, lim], "k--", lw=0.8)
ax2.set_xlabel("implicit reward of the rejected review")
ax2.set_ylabel("implicit reward of the chosen review")
ax2.set_title("Held-out pairs: above the diagonal = ranked right")
show(fig, "08_dpo_smollm2")
