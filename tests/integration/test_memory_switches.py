"""Memory switches: --gradient-checkpointing recomputes the decoder layers' activations in the backward
(with the packed rows' block attention replayed) and gives the same loss, gradients and weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from prefalign.cli import main
from prefalign.data import encode_preferences, load_preferences
from prefalign.memory import lean_layers
from prefalign.packing import recompute_activations
from prefalign.testing import tiny_causal_lm, tiny_tokenizer
from prefalign.train.dpo import DPOConfig, DPOObjective
from prefalign.train.loop import read_metrics


def loss_and_grads(model, objective, examples, checkpointing):
    """One micro-batch's loss and gradients as the training loop computes them (inside the lean layers),
    and how many times the first layer's attention ran."""
    calls = []
    hook = model.model.layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
    model.zero_grad(set_to_none=True)
    params = [p for p in model.parameters() if p.requires_grad]
    with lean_layers(model, params), recompute_activations(model, checkpointing):
        model.train()
        loss, _ = objective.loss(examples)
        loss.backward()
    hook.remove()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)


@pytest.mark.parametrize("loss_type", ["orpo", "sigmoid"])
def test_recomputed_activations_give_the_same_loss_and_gradients(pairs, tmp_path, loss_type):
    """Packed pairs (block attention) under the lean layers: with checkpointing the first layer's
    attention runs twice (forward, then recomputed in the backward) instead of once, and the loss and
    every gradient are those of the plain run (to float rounding: the recomputation is the same
    arithmetic)."""
    tok = tiny_tokenizer()
    model = tiny_causal_lm(tokenizer=tok, hidden_size=64, seed=0)
    examples = encode_preferences(tok, load_preferences(pairs)[:6], 64)
    for i, ex in enumerate(examples):
        ex["index"] = i
    config = DPOConfig(model="m", data="d", output=str(tmp_path / "o"), loss_type=loss_type)
    reference = tiny_causal_lm(tokenizer=tok, hidden_size=64, seed=1).requires_grad_(False)
    objective = DPOObjective(model, config, reference=reference if loss_type == "sigmoid" else None)
    plain_loss, plain_grads, plain_calls = loss_and_grads(model, objective, examples, False)
    ckpt_loss, ckpt_grads, ckpt_calls = loss_and_grads(model, objective, examples, True)
    assert (plain_calls, ckpt_calls) == (1, 2)
    assert ckpt_loss == pytest.approx(plain_loss, rel=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert not model.model.gradient_checkpointing  # undone on exit


def test_cli_gradient_checkpointing_trains_to_the_same_weights(tiny_model_dir, pairs, tmp_path):
    """`prefalign dpo --gradient-checkpointing`: 2 steps end at the weights of the same run without it."""
    args = ["dpo", "--model", str(tiny_model_dir), "--data", str(pairs), "--max-length", "64", "--batch-size",
            "4", "--max-steps", "2", "--lr", "1e-4", "--no-progress"]  # fmt: skip
    assert main([*args, "--output", str(tmp_path / "plain")]) == 0
    assert main([*args, "--output", str(tmp_path / "ckpt"), "--gradient-checkpointing"]) == 0
    plain = load_file(str(tmp_path / "plain" / "model.safetensors"))
    ckpt = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    for k, v in plain.items():
        torch.testing.assert_close(ckpt[k], v, rtol=1e-5, atol=1e-6)
    losses = [[m["loss"] for m in read_metrics(tmp_path / name)] for name in ("plain", "ckpt")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


def test_an_online_run_with_gradient_checkpointing_matches_one_without(on_path, tiny_model_dir, monkeypatch):
    """GRPO, 2 iterations: the same sampled responses, losses and final weights with the switch on, and
    its updates did checkpoint (the checkpoint's context_fn ran: once per layer and forward with grad)."""
    import prefalign.packing as packing
    from prefalign.train import grpo

    checkpointed = []
    replay = packing._replay_block_attention

    def counting(model):
        inner = replay(model)
        return lambda: (checkpointed.append(1), inner())[1]

    monkeypatch.setattr(packing, "_replay_block_attention", counting)

    def run(name, **kw):
        cfg = grpo.GRPOConfig(
            model=str(tiny_model_dir), prompts=str(on_path / "prompts.jsonl"), output=str(on_path / name),
            reward=["synthetic_rewards:share_of_e"], raw=True, rollout_batch=4, num_generations=4,
            response_length=10, progress=False, lr=5e-3, seed=0, iterations=2, **kw,
        )  # fmt: skip
        grpo.train(cfg)
        return read_metrics(on_path / name), load_file(str(on_path / name / "model.safetensors"))

    plain_rows, plain = run("plain")
    assert not checkpointed
    ckpt_rows, ckpt = run("ckpt", gradient_checkpointing=True)
    assert checkpointed
    keys = [k for k in plain_rows[0] if k.startswith(("loss", "objective/scores")) or k == "policy/loss"]
    assert keys
    for a, b in zip(plain_rows, ckpt_rows, strict=True):
        assert [b.get(k) for k in keys] == pytest.approx([a.get(k) for k in keys], rel=1e-5, abs=1e-6)
    for k, v in plain.items():
        torch.testing.assert_close(ckpt[k], v, rtol=1e-4, atol=1e-5)


# ---- --mixed-precision ---------------------------------------------------------------------------


def dpo_run(model_dir, data, out, model_object=None, **kw):
    from prefalign.train.dpo import train

    base = dict(model=str(model_dir), data=str(data), output=str(out), max_length=64, batch_size=4,
                max_steps=2, lr=1e-4, progress=False)  # fmt: skip
    return train(DPOConfig(**{**base, **kw}), model=model_object)


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_autocast_first_loss_matches_float32_and_weights_stay_float32(tiny_model_dir, pairs, tmp_path, mode):
    """The first loss under autocast is float32's (ln 2 at policy = reference) within 2e-2: the policy's
    log-probs are taken with bf16 / fp16 matrix products (about 3 / 4 significant digits on sums of
    order -100 over tokens), the precomputed reference in float32. The products did run in half
    precision (a projection's output dtype during training), and the master weights, and so the saved
    model, stay float32. (torch's CPU autocast supports float16 here, so fp16 is tested, not skipped.)"""
    from transformers import AutoModelForCausalLM

    dtypes = set()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    dpo_run(tiny_model_dir, pairs, tmp_path / mode, mixed_precision=mode, model_object=model)
    dpo_run(tiny_model_dir, pairs, tmp_path / "fp32")
    first = {name: read_metrics(tmp_path / name)[0] for name in (mode, "fp32")}
    assert first["fp32"]["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert first[mode]["loss"] == pytest.approx(first["fp32"]["loss"], abs=2e-2)
    assert {"bf16": torch.bfloat16, "fp16": torch.float16}[mode] in dtypes
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert {v.dtype for v in load_file(str(tmp_path / mode / "model.safetensors")).values()} == {
        torch.float32
    }
    if mode == "fp16":
        assert first[mode]["amp/scale"] > 0 and first[mode]["amp/skipped_steps"] == 0


def test_fp16_overflowed_steps_are_skipped_and_counted(tiny_model_dir, pairs, tmp_path, monkeypatch):
    """With an infinite loss scale every scaled gradient overflows: both steps are skipped (counted in
    amp/skipped_steps, no divergence error) and the weights do not move."""
    import functools

    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(real, init_scale=float("inf")))
    dpo_run(tiny_model_dir, pairs, tmp_path / "run", mixed_precision="fp16")
    rows = [m for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert [m["amp/skipped_steps"] for m in rows] == [1, 2]
    start = load_file(str(next(tiny_model_dir.glob("*.safetensors"))))
    for k, v in load_file(str(tmp_path / "run" / "model.safetensors")).items():
        torch.testing.assert_close(v, start[k], rtol=0, atol=0)


def test_mixed_precision_is_refused_over_half_precision_weights(pairs, tmp_path):
    from prefalign.config import ConfigError

    with pytest.raises(ConfigError, match="float32 master weights"):
        DPOConfig(
            model="m", data=str(pairs), output=str(tmp_path / "a"), mixed_precision="bf16", dtype="bfloat16"
        )
    with pytest.raises(ConfigError, match="mixed_precision must be"):
        DPOConfig(model="m", data=str(pairs), output=str(tmp_path / "b"), mixed_precision="fp8")


def test_an_online_run_under_bf16_autocast_trains(on_path, tiny_model_dir):
    """GRPO samples, scores and updates under bf16 autocast (every pass, so the ratio's log-probs come
    from the same arithmetic): the first update's ratio is 1 and the losses are finite."""
    from prefalign.train import grpo

    cfg = grpo.GRPOConfig(
        model=str(tiny_model_dir), prompts=str(on_path / "prompts.jsonl"), output=str(on_path / "bf16"),
        reward=["synthetic_rewards:share_of_e"], raw=True, rollout_batch=4, num_generations=4,
        response_length=10, progress=False, lr=5e-3, seed=0, iterations=2, mixed_precision="bf16",
    )  # fmt: skip
    summary = grpo.train(cfg)
    rows = [m for m in read_metrics(on_path / "bf16") if "policy/loss" in m]
    assert summary["steps"] == 2 and len(rows) == 2
    assert rows[0]["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert all(torch.isfinite(torch.tensor([m["policy/loss"], m["policy/grad_norm"]])).all() for m in rows)


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_a_resumed_mixed_precision_run_matches_an_uninterrupted_one(
    tiny_model_dir, pairs, tmp_path, monkeypatch, mode
):
    """Stopped after step 2 and resumed, a run under autocast ends at the weights (and, fp16, logs the loss
    scales) of the uninterrupted run. Catches two bugs: a loss scale reset to its initial value on resume
    (from 2^20 the scale halves at step 4 here), and autocast's cache of cast weights outliving their
    in-place updates (the uninterrupted run would keep using step 1's half-precision copies)."""
    import functools

    from prefalign.train import loop

    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**20))
    kw = dict(mixed_precision=mode, max_steps=4, save_every=2)
    dpo_run(tiny_model_dir, pairs, tmp_path / "full", **kw)
    real_step, calls = loop._one_step, {"n": 0}

    def crash_after_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "_one_step", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        dpo_run(tiny_model_dir, pairs, tmp_path / "resumed", **kw)
    monkeypatch.setattr(loop, "_one_step", real_step)
    dpo_run(tiny_model_dir, pairs, tmp_path / "resumed", resume=True, **kw)
    scales = {
        n: [m.get("amp/scale") for m in read_metrics(tmp_path / n) if "loss" in m]
        for n in ("full", "resumed")
    }
    assert scales["resumed"] == scales["full"]
    full, resumed = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("full", "resumed"))
    for k, v in full.items():
        torch.testing.assert_close(resumed[k], v, rtol=1e-6, atol=1e-6)
