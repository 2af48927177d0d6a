"""LoRA for the online methods (PPO with a shared value head, GRPO, RLOO) on the tiny model: one copy of
the base weights (the reference is the policy with its adapter off), only the adapters and the head
train, the run folder holds the adapter and the merged model, resume is bitwise, and two processes run."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import prefalign.models as models
from prefalign.config import ConfigError
from prefalign.models import adapter_disabled
from prefalign.testing import perturb_adapters
from prefalign.train import grpo, online, ppo
from prefalign.train.loop import read_metrics

FIXED_SAMPLES = """
import prefalign.train.online as online


def sample_iteration(run, it, repeats=1):
    # Every process samples the whole iteration (one batch, one seed) and keeps its contiguous block of
    # rows (whole groups): the samples are then the same however many processes share them.
    config, acc = run.config, run.accelerator
    ids, rows = run.prompts
    every = [i for i in online.iteration_prompts(len(ids), config.rollout_batch, config.seed, it)
             for _ in range(repeats)]
    policy = run.unwrapped.policy
    out = online.sample(policy, run.tokenizer, [ids[i] for i in every], config, it, return_hidden=True)
    n = len(every) // acc.num_processes
    keep = list(range(acc.process_index * n, (acc.process_index + 1) * n))
    out, mine = out.rows(keep), [rows[every[k]] for k in keep]
    scores, raw = online.score(run.source, mine, out, config.missing_eos_penalty)
    rollout = online.Rollout(out, scores, raw, rows=mine)
    rollout.ref_logprobs = online.reference_logprobs(run.reference, out, config, policy).cpu()
    return rollout, {"time/generate": 0.0, "time/score": 0.0, "time/forward": 0.0}


online.sample_iteration = sample_iteration


def share_of_e(prompts, completions, **columns):
    return [c.count("e") / max(len(c), 1) for c in completions]


def share_of_e_apart(prompts, completions, **columns):
    # share_of_e plus pi/10 for a group's second sample: the two never tie, whatever was sampled (a tied
    # group has advantages 0 and leaves only rounding in the gradient, which Adam turns into a full step)
    import math

    return [s + math.pi / 10 * (i % 2) for i, s in enumerate(share_of_e(prompts, completions))]
"""


def ppo_config(workdir: Path, model: Path, output: str, **overrides) -> ppo.PPOConfig:
    settings = dict(
        model=str(model), prompts=str(workdir / "prompts.jsonl"), output=str(workdir / output),
        reward="synthetic_rewards:share_of_e", raw=True, rollout_batch=8, response_length=8,
        shared_value_head=True, progress=False, lr=5e-3, seed=0, lora_r=4, lora_alpha=8.0,
    )  # fmt: skip
    return ppo.PPOConfig(**{**settings, **overrides})


def grpo_config(workdir: Path, model: Path, output: str, **overrides) -> grpo.GRPOConfig:
    settings = dict(
        model=str(model), prompts=str(workdir / "prompts.jsonl"), output=str(workdir / output),
        reward=["synthetic_rewards:share_of_e"], raw=True, rollout_batch=4, num_generations=2,
        response_length=8, progress=False, lr=5e-3, seed=0, lora_r=4, lora_alpha=8.0,
    )  # fmt: skip
    return grpo.GRPOConfig(**{**settings, **overrides})


def test_only_the_adapter_and_the_head_train_on_one_copy_of_the_base(on_path, tiny_model_dir, monkeypatch):
    """PPO with --lora-r and --shared-value-head: one policy load, no reference load (the reference is the
    policy with its adapter off), every base weight still the file's after two iterations (and the very
    same tensors: nothing copied), every adapter matrix and the value head moved, and the reference
    log-probs those of the untouched base model."""
    loads = {"policy": 0}
    real = models.load_policy

    def counted(*args, **kwargs):
        loads["policy"] += 1
        return real(*args, **kwargs)

    def no_reference(*args, **kwargs):
        raise AssertionError("a LoRA run without --ref-model must not load a second model")

    monkeypatch.setattr(models, "load_policy", counted)
    monkeypatch.setattr(models, "load_reference", no_reference)
    run = ppo.setup(ppo_config(on_path, tiny_model_dir, "only-adapter", iterations=2, minibatches=2))
    assert loads["policy"] == 1 and run.reference is None
    policy = run.unwrapped.policy
    base = dict(policy.get_base_model().named_parameters())
    before = {k: v.detach().clone() for k, v in run.unwrapped.named_parameters()}
    ptrs = {k: v.data_ptr() for k, v in base.items()}
    trainable = {k for k, v in run.unwrapped.named_parameters() if v.requires_grad}
    assert trainable and all("lora_" in k or k.startswith("value_head.") for k in trainable)
    run.run_iteration(0)
    run.run_iteration(1)
    after = dict(run.unwrapped.named_parameters())
    for name, value in after.items():
        assert torch.equal(before[name], value.detach()) == (name not in trainable), name
    assert {k: v.data_ptr() for k, v in dict(policy.get_base_model().named_parameters()).items()} == ptrs
    plain = real(str(tiny_model_dir))
    file_weights = dict(plain.named_parameters())
    for name, value in base.items():
        if "lora_" in name:
            continue
        key = name.replace("base_layer.", "")
        torch.testing.assert_close(value.detach(), file_weights[key].detach(), atol=0, rtol=0)

    # adapter off: the base model's forward, to the bit; adapter on: another function
    ids = torch.tensor([[5, 17, 42, 9, 33, 8]])
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
        with adapter_disabled(policy):
            off = policy(input_ids=ids).logits
        on = policy(input_ids=ids).logits
    torch.testing.assert_close(off, expected, atol=0, rtol=0)
    assert (on - expected).abs().max() > 1e-4
    prompt_ids, rows = run.prompts
    rollout, _ = online.rollout_for(run, prompt_ids[:4], rows[:4], seed=5)
    fresh = online.reference_logprobs(plain, rollout.out, run.config)
    torch.testing.assert_close(rollout.ref_logprobs, fresh, atol=1e-6, rtol=0)


def test_the_lean_sampler_runs_the_adapted_layers(tiny_model_dir):
    """The lean decoder steps through a peft model's base, whose linear layers peft replaced: its
    log-probs equal the model's own forward with its cache (HF stepper) and a fresh forward, adapters on."""
    from prefalign.decoding import LeanStepper, make_stepper
    from prefalign.generation import SamplingSettings, generate, response_logprobs
    from prefalign.models import LoraSettings, apply_lora, load_tokenizer

    policy = apply_lora(models.load_policy(str(tiny_model_dir)), LoraSettings(r=4, alpha=8))
    perturb_adapters(policy)
    tok = load_tokenizer(str(tiny_model_dir))
    assert isinstance(make_stepper(policy, torch.ones(1, 4, dtype=torch.long)), LeanStepper)
    prompts = [[5, 17, 42], [9, 33], [8, 8, 8, 8]]
    settings = SamplingSettings(max_new_tokens=8, temperature=0.9, seed=1)
    lean = generate(policy, tok, prompts, settings)
    hf = generate(policy, tok, prompts, settings, lean=False)
    assert torch.equal(lean.response_ids, hf.response_ids)
    torch.testing.assert_close(lean.logprobs, hf.logprobs, atol=1e-5, rtol=0)
    fresh = response_logprobs(policy, lean, temperature=0.9)
    torch.testing.assert_close(lean.logprobs, fresh, atol=1e-5, rtol=0)


@pytest.mark.parametrize("command", ["ppo", "grpo"])
def test_lora_resume_is_bitwise_and_the_folder_holds_adapter_and_merged_model(
    on_path, tiny_model_dir, command
):
    """4 iterations straight against 2, a checkpoint, --resume to 4: the same adapter, merged weights (and
    PPO's value head and KL coefficient) to the bit. ``adapter/`` loads with PeftModel.from_pretrained on
    the base and its merged weights are the folder's plain transformers model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    make = ppo_config if command == "ppo" else grpo_config
    train = ppo.train if command == "ppo" else grpo.train
    common = dict(lr_schedule="constant", minibatches=2, ppo_epochs=2)
    if command == "ppo":
        common.update(target_kl=0.5, kl_horizon=100)
    whole, parts = on_path / f"lora-whole-{command}", on_path / f"lora-parts-{command}"
    train(make(on_path, tiny_model_dir, whole.name, iterations=4, **common))
    train(make(on_path, tiny_model_dir, parts.name, iterations=2, save_every=2, **common))
    train(make(on_path, tiny_model_dir, parts.name, iterations=4, resume=True, **common))
    names = ["model.safetensors", "adapter/adapter_model.safetensors"]
    names += ["value_head.safetensors"] if command == "ppo" else []
    for name in names:
        a, b = load_file(whole / name), load_file(parts / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    keep = ("objective/scores", "objective/kl", "policy/ratio_mean" if command == "grpo" else "kl_coef")
    rows = lambda folder: [{k: r[k] for k in keep} for r in read_metrics(folder) if keep[0] in r]  # noqa: E731
    assert len(rows(whole)) == 4 and rows(parts) == rows(whole)

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    adapted = PeftModel.from_pretrained(base, str(whole / "adapter"))
    merged = AutoModelForCausalLM.from_pretrained(str(whole))
    ids = torch.tensor([[5, 17, 42, 9, 33, 8]])
    with torch.no_grad():
        a, b = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
        with adapted.disable_adapter():
            plain = adapted(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a - plain).abs().max() > 1e-4, "the adapter trained"


def test_a_separate_critic_is_a_second_adapter_on_the_same_base(on_path, tiny_model_dir, monkeypatch):
    """PPO with --lora-r and no --shared-value-head: no critic model is loaded (a second adapter, "critic",
    and its head on the policy's base weights); after two iterations the base is untouched and both
    adapters and the head moved; the critic's values are its own pass (not the policy's hidden states
    through the head); the policy's sampling runs the policy's adapter; resume is bitwise."""
    from prefalign.models import CRITIC_ADAPTER

    def no_critic_model(*args, **kwargs):
        raise AssertionError("a LoRA critic must not load a second model")

    monkeypatch.setattr(models, "load_value_model", no_critic_model)
    common = dict(shared_value_head=False, lr_schedule="constant", minibatches=2, ppo_epochs=2)
    run = ppo.setup(ppo_config(on_path, tiny_model_dir, "critic-adapter", iterations=2, **common))
    module = run.unwrapped
    assert module.critic_adapter == CRITIC_ADAPTER and module.value_model is None
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    trainable = {k for k, v in module.named_parameters() if v.requires_grad}
    assert any(f".{CRITIC_ADAPTER}." in k for k in trainable) and any(".default." in k for k in trainable)
    assert all("lora_" in k or k.startswith("value_head.") for k in trainable)
    run.run_iteration(0)
    run.run_iteration(1)
    for name, value in module.named_parameters():
        moved = not torch.equal(before[name], value.detach())
        if "lora_B" in name or name.startswith("value_head."):  # (A matrices may stay where B was zero)
            assert moved, name
        if name not in trainable:
            assert not moved, name
    prompt_ids, rows = run.prompts
    rollout, _ = online.rollout_for(run, prompt_ids[:2], rows[:2], seed=3, for_update=True)
    micro = online.make_micro(rollout, [0, 1], torch.device("cpu"))
    with torch.no_grad():
        hidden = module.hidden(micro)
        values = module.values_of(micro, hidden)
        through_policy = module.value_head(hidden).squeeze(-1)
    assert (values - through_policy).abs().max() > 1e-6
    from prefalign.generation import response_logprobs

    fresh = response_logprobs(module.policy, rollout.out)
    torch.testing.assert_close(rollout.out.logprobs, fresh, atol=1e-5, rtol=0)  # the policy's adapter samples

    ppo.train(ppo_config(on_path, tiny_model_dir, "critic-whole", iterations=4, **common))
    ppo.train(ppo_config(on_path, tiny_model_dir, "critic-parts", iterations=2, save_every=2, **common))
    ppo.train(ppo_config(on_path, tiny_model_dir, "critic-parts", iterations=4, resume=True, **common))
    for name in ("model.safetensors", "adapter/adapter_model.safetensors", "value_head.safetensors",
                 f"adapter/{CRITIC_ADAPTER}/adapter_model.safetensors"):  # fmt: skip
        a, b = load_file(on_path / "critic-whole" / name), load_file(on_path / "critic-parts" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    with pytest.raises(ConfigError, match="--value-model with --lora-r"):
        ppo_config(
            on_path, tiny_model_dir, "refused", shared_value_head=False, value_model=str(tiny_model_dir)
        )


def test_lora_targets_are_checked(on_path, tiny_model_dir):
    """--lora-targets picks the adapted modules; an empty list is refused."""
    cfg = grpo_config(on_path, tiny_model_dir, "targets", lora_targets="q_proj, v_proj")
    assert cfg.lora_settings().target_modules == ["q_proj", "v_proj"]
    policy = online.load_policy(cfg, None)
    adapted = {
        n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in policy.named_parameters() if "lora_A" in n
    }
    assert adapted == {"q_proj", "v_proj"}
    assert grpo_config(on_path, tiny_model_dir, "all").lora_settings().target_modules == "all-linear"
    with pytest.raises(ConfigError, match="lora_targets"):
        grpo_config(on_path, tiny_model_dir, "empty", lora_targets=" , ")


def test_lora_dropout_acts_in_the_update_passes_only(on_path, tiny_model_dir):
    """--lora-dropout 0.5 online: the LoRA dropout modules keep p = 0.5 (the model's own dropout is off);
    the old pass (--recompute-logprobs) runs without it, so it equals the sampler's log-probs; the update
    passes run with it, so the first minibatch's ratio is not 1, yet finite."""
    cfg = grpo_config(
        on_path, tiny_model_dir, "dropout", lora_dropout=0.5, iterations=1, recompute_logprobs=True
    )
    run = grpo.setup(cfg)
    policy = run.unwrapped.policy
    rates = {
        m.p for n, m in policy.named_modules() if isinstance(m, torch.nn.Dropout) and "lora_dropout" in n
    }
    assert rates == {0.5}
    perturb_adapters(policy)  # (zero-initialised B matrices would make the dropout invisible)
    ids, texts = run.prompts
    rollout, _ = online.rollout_for(run, [ids[0]] * 2, [texts[0]] * 2, seed=5, for_update=True, group=2)
    sampled = rollout.out.logprobs.clone()
    online.old_pass(run.unwrapped, rollout, [[0, 1]], torch.device("cpu"), 1.0)
    torch.testing.assert_close(rollout.logprobs * rollout.mask, sampled * rollout.mask, atol=1e-5, rtol=0)
    run.run_iteration(0)
    first = run.minibatch_stats[0]["policy/ratio_mean"]
    assert first != 1.0 and math.isfinite(first)


def test_a_two_process_lora_run_equals_a_one_process_run(workdir, tiny_model_dir):
    """GRPO with --lora-r on 2 processes (DDP over the adapter's parameters) against 1 process, on the same
    samples (a reward module that makes each process take its block of one shared batch of samples; by
    default each process samples its own share with its own seed): the same metrics and the same adapter
    up to float summation order, and the saved adapter and merged model are one set of weights (the
    merged model equals base + adapter)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    (workdir / "fixed_samples.py").write_text(FIXED_SAMPLES)
    args = [sys.executable, "-m", "prefalign", "grpo", "--model", str(tiny_model_dir), "--prompts"]
    args += [str(workdir / "prompts.jsonl"), "--reward", "fixed_samples:share_of_e_apart", "--raw"]
    args += ["--rollout-batch", "4", "--num-generations", "2", "--response-length", "6", "--ppo-epochs", "2"]
    args += ["--iterations", "2", "--lora-r", "4", "--lr", "1e-2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(workdir), "OMP_NUM_THREADS": "1"}
    for name, extra in (("lora-one", []), ("lora-two", ["--num-processes", "2"])):
        cmd = [*args, "--output", str(workdir / name), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=workdir, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    keep = ("objective/scores", "objective/kl", "policy/ratio_mean", "policy/grad_norm")
    one = [{k: r[k] for k in keep} for r in read_metrics(workdir / "lora-one") if keep[0] in r]
    two = [{k: r[k] for k in keep} for r in read_metrics(workdir / "lora-two") if keep[0] in r]
    assert len(one) == len(two) == 2
    for a, b in zip(one, two, strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)
    a = load_file(workdir / "lora-one" / "adapter" / "adapter_model.safetensors")
    b = load_file(workdir / "lora-two" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    out = workdir / "lora-two"
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(out / "adapter")
    )
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    ids = torch.tensor([[5, 17, 42, 9, 33, 8]])
    with torch.no_grad():
        torch.testing.assert_close(
            adapted(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5, rtol=0
        )
        with adapted.disable_adapter():
            assert (adapted(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max() > 1e-4


def test_before_the_first_update_the_sampler_gives_the_reference_log_probs(
    on_path, tiny_model_dir, monkeypatch
):
    """In a fresh run whose reference is the starting policy (LoRA with every B still zero; or a reference
    model with the policy's very weights), the reference pass of iteration 0 is skipped: its log-probs are
    the sampler's, equal to a fresh reference forward to 1e-5. Any other case runs the pass: an adapter
    that is not zero, a reference model that differs in one weight, any later iteration, a resumed run."""
    real = online.reference_logprobs
    calls = {"n": 0}

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(online, "reference_logprobs", counted)

    def check(run, expect_same: bool) -> None:
        prompt_ids, rows = run.prompts
        before = calls["n"]
        rollout, _ = online.rollout_for(run, prompt_ids[:4], rows[:4], seed=5)
        assert (calls["n"] == before) == expect_same
        fresh = real(run.reference, rollout.out, run.config, run.unwrapped.policy)  # (LoRA: adapter off)
        torch.testing.assert_close(rollout.ref_logprobs, fresh, atol=1e-5, rtol=0)
        if expect_same:
            assert torch.equal(rollout.ref_logprobs, rollout.out.logprobs)

    lora = grpo.setup(grpo_config(on_path, tiny_model_dir, "same-lora"))
    assert online.reference_is_policy(lora)
    check(lora, True)
    lora.run_iteration(0)  # (an update)
    assert not online.reference_is_policy(lora)
    check(lora, False)

    moved = grpo.setup(grpo_config(on_path, tiny_model_dir, "moved-lora"))
    perturb_adapters(moved.unwrapped.policy)
    check(moved, False)

    full = grpo.setup(grpo_config(on_path, tiny_model_dir, "same-full", lora_r=0))
    assert full.reference is not None
    check(full, True)
    resumed = grpo.setup(grpo_config(on_path, tiny_model_dir, "resumed-full", lora_r=0))
    resumed.state["step"] = 3  # (as after a resume)
    check(resumed, False)
    other = grpo.setup(grpo_config(on_path, tiny_model_dir, "other-full", lora_r=0))
    with torch.no_grad():
        next(other.reference.parameters()).view(-1)[0] += 1e-3
    check(other, False)
