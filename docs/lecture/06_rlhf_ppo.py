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
# # 6. RLHF: a Bradley-Terry reward model, then PPO with a KL penalty
#
# **Slides followed** (part 03, *reinforcement learning from human feedback (rlhf)*): "overview",
# "Reward model training", "Reward model" and "Fine-tuning with rl - ppo". Methods: Christiano et al.
# 2017, Ziegler et al. 2019, Stiennon et al. 2020, Ouyang et al. 2022; the PPO machinery of chapter 5.
#
# RLHF (học tăng cường từ phản hồi của con người) has three stages: a pretrained (and instruction-tuned)
# language model, a **reward model** trained on human comparisons, and **fine-tuning with RL (PPO)**
# against that reward model. The slides take the reward model's objective from the **Bradley-Terry
# model** (mô hình Bradley-Terry), a probabilistic model for comparing two outcomes:
#
# $$p(y_1 \succ y_2 \mid x) = \frac{\exp r_\theta(x, y_1)}{\exp r_\theta(x, y_1) + \exp r_\theta(x, y_2)}
#   = \sigma\big(r_\theta(x, y_1) - r_\theta(x, y_2)\big),\qquad
#   L(r_\theta) = -\log\sigma\big(r_\theta(x, y_1) - r_\theta(x, y_2)\big).$$
#
# When that reward drives PPO, the authors add a KL divergence to the SFT model, so that the policy does
# not drift into text the reward model was never trained on:
#
# $$R(x, y) = r_\theta(x, y) - \beta\, \mathrm{KL}\big(\pi^{RL}_\phi(y\mid x)\,\|\,\pi^{SFT}(y\mid x)\big).$$
#
# This chapter loads the bundled SmolLM2-135M-Instruct three times (reward model, policy, reference) and
# trains each for a few minutes on a 2-core CPU. It runs under `make test-slow`, not `make test`.

# %%
import atexit
import math
import shutil
import tempfile
from pathlib import Path

import torch
from _lecture import plt, show, table

from prefalign.losses import bradley_terry_loss
from prefalign.testing import MOVIES, synthetic_pairs, write_jsonl
from prefalign.train.loop import read_metrics
from prefalign.train.ppo import PPOConfig
from prefalign.train.ppo import train as train_ppo
from prefalign.train.reward import RewardConfig
from prefalign.train.reward import train as train_reward

torch.manual_seed(0)
work = Path(tempfile.mkdtemp(prefix="prefalign-lecture-06-"))  # data and runs (0.5 GB models)
atexit.register(shutil.rmtree, work, ignore_errors=True)

# %% [markdown]
# ## The Bradley-Terry model, checked
#
# The two forms of the slide are the same function: dividing numerator and denominator by
# $\exp r(x, y_1)$ gives $1 / (1 + \exp(r_2 - r_1)) = \sigma(r_1 - r_2)$. The loss is the negative
# log-likelihood of the observed comparison; at equal rewards it is $\ln 2$ whatever the rewards are.

# %%
r1, r2 = torch.tensor([2.0, 0.3, -1.0]), torch.tensor([0.5, 0.3, 1.5])
softmax_form = r1.exp() / (r1.exp() + r2.exp())
sigmoid_form = torch.sigmoid(r1 - r2)
print(table([[float(a), float(b), float(p), float(q)] for a, b, p, q in zip(r1, r2, softmax_form, sigmoid_form, strict=True)],
            ["r(x, y1)", "r(x, y2)", "exp form", "sigmoid form"]))  # fmt: skip
torch.testing.assert_close(softmax_form, sigmoid_form)
assert math.isclose(float(bradley_terry_loss(r2[1:2], r2[1:2])), math.log(2), rel_tol=1e-6)
assert math.isclose(float(bradley_terry_loss(r1, r2)), float(-torch.log(sigmoid_form).mean()), rel_tol=1e-6)

# %% [markdown]
# ## Stage 2: a reward model trained on comparisons
#
# The comparisons here are synthetic but unambiguous: for a prompt asking for a short movie review, the
# preferred review uses positive words and the other one negative words
# (`prefalign.testing.synthetic_pairs`). The reward model is the language model's transformer with a
# newly initialised scalar head, read at the last token of prompt + response; 64 pairs train it, 32 other
# pairs measure its held-out accuracy. The command-line equivalent:
#
# ```
# prefalign reward --model smollm2 --data train.jsonl --eval-data eval.jsonl --output runs/rm \
#     --lr 3e-5 --batch-size 8 --epochs 1 --max-length 128 --lr-schedule constant
# ```

# %%
train_file = write_jsonl(work / "pairs.jsonl", synthetic_pairs(64, seed=1))
eval_file = write_jsonl(work / "pairs_eval.jsonl", synthetic_pairs(32, seed=2))
rm_config = RewardConfig(
    model="smollm2", data=str(train_file), eval_data=str(eval_file), output=str(work / "rm"),
    lr=3e-5, batch_size=8, epochs=1, max_length=128, lr_schedule="constant", progress=False,
)  # fmt: skip
rm_summary = train_reward(rm_config)
rm_metrics = [m for m in read_metrics(rm_config.output) if "loss" in m]
accuracy = rm_summary["eval"]["val/rewards/accuracies"]
print(f"held-out accuracy {accuracy:.2f}, margin {rm_summary['eval']['val/rewards/margins']:.2f}")
assert accuracy >= 0.8, accuracy

# %% [markdown]
# ## Stage 3: PPO against the reward model, with the KL penalty
#
# The policy starts from SmolLM2 itself (here the "SFT" model of the slide) and so does the frozen
# reference. Each iteration samples one review for each of 8 prompts, scores it with the reward model and
# gives every response token the reward $-\beta\,\mathrm{KL}_t$ (the per-token log-ratio
# $\log\pi^{RL} - \log\pi^{SFT}$ of the sampled token) plus the reward model's score at the last token:
# summed over the response, exactly the slide's $R(x, y)$. GAE, the clipped surrogate and a value head on
# the policy's trunk do the rest (chapter 5). The command line:
#
# ```
# prefalign ppo --model smollm2 --reward-model runs/rm --prompts prompts.jsonl --output runs/ppo \
#     --shared-value-head --rollout-batch 8 --response-length 24 --kl-coef 0.05 --lr 1e-5 --iterations 8
# ```

# %%
prompts = [{"prompt": f"Write a short review of the movie {m}."} for m in MOVIES]
write_jsonl(work / "prompts.jsonl", prompts[:12])
write_jsonl(work / "prompts_eval.jsonl", prompts[12:])
ppo_config = PPOConfig(
    model="smollm2", reward_model=rm_config.output, prompts=str(work / "prompts.jsonl"),
    eval_prompts=str(work / "prompts_eval.jsonl"), output=str(work / "ppo"), shared_value_head=True,
    rollout_batch=8, response_length=24, kl_coef=0.05, lr=1e-5, iterations=8, ppo_epochs=2,
    lr_schedule="constant", progress=False,
)  # fmt: skip
ppo_summary = train_ppo(ppo_config)
rows = [m for m in read_metrics(ppo_config.output) if "objective/scores" in m]
print(table([[m["step"], m["objective/scores"], m["objective/kl"], m["objective/rlhf_reward"], m["policy/clipfrac"]]
             for m in rows], ["iteration", "RM score", "KL (nats)", "R = score - beta KL", "clipfrac"]))  # fmt: skip

# %% [markdown]
# What must hold, whatever the sampled text:
#
# - at the first iteration the policy *is* the reference, so its KL is 0 up to float rounding (and so is
#   the held-out KL before training);
# - the logged $R$ is the score minus $\beta$ times the summed per-token KL (k1 estimator), per iteration;
# - after training the policy has moved away from the reference: its held-out KL is positive.
#
# Whether the reward model's score rises within 8 short iterations is another matter: here each
# iteration sees 8 of 12 prompts, and the score differs more between prompts (movies) than PPO moves it
# in so few steps, so the curve is noisy. The demo (chapter 9) trains long enough for the trend to show.

# %%
assert abs(rows[0]["objective/kl"]) < 1e-3
assert abs(ppo_summary["eval_start"]["eval/kl"]) < 1e-3
for m in rows:
    assert math.isclose(m["objective/rlhf_reward"], m["objective/scores"] - m["kl_coef"] * m["objective/kl"],
                        rel_tol=1e-4, abs_tol=1e-4)  # fmt: skip
before, after = ppo_summary["eval_start"], ppo_summary["eval"]
print(f"held-out RM score {before['eval/scores']:.3f} -> {after['eval/scores']:.3f}, "
      f"KL {before['eval/kl']:.4f} -> {after['eval/kl']:.3f}")  # fmt: skip
assert after["eval/kl"] > 0.01

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
ax1.plot([m["step"] for m in rm_metrics], [m["loss"] for m in rm_metrics], "o-", label="Bradley-Terry loss")
ax1.plot(
    [m["step"] for m in rm_metrics], [m["rewards/accuracies"] for m in rm_metrics], "s-", label="accuracy"
)
ax1.axhline(math.log(2), color="grey", ls=":", label="ln 2")
ax1.set_xlabel("optimiser step")
ax1.set_title("Reward model on comparisons")
ax1.legend()
ax2.plot([m["step"] for m in rows], [m["objective/scores"] for m in rows], "o-", label="RM score")
ax2.plot([m["step"] for m in rows], [m["objective/kl"] for m in rows], "s-", label="KL to the reference")
ax2.plot(
    [m["step"] for m in rows], [m["objective/rlhf_reward"] for m in rows], "^-", label="R = score - beta KL"
)
ax2.set_xlabel("PPO iteration")
ax2.set_title("PPO against the reward model")
ax2.legend()
show(fig, "06_rlhf_ppo")
