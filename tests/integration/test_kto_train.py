"""`prefalign kto` end to end on the tiny model: the hand-worked first loss, learning, exact resume, the
reference point z0 on mismatched pairs, and the command line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from prefalign.cli import main
from prefalign.config import ConfigError
from prefalign.data import encode_unpaired, load_unpaired
from prefalign.testing import synthetic_pairs, tiny_causal_lm, tiny_tokenizer, write_jsonl
from prefalign.train import kto, loop
from prefalign.train.kto import KTOConfig, train
from prefalign.train.loop import read_metrics


def config(model_dir, data, out, **kw):
    base = dict(model=str(model_dir), data=str(data), output=str(out), lr=1e-3, max_length=64,
                batch_size=4, max_steps=2, progress=False)  # fmt: skip
    return KTOConfig(**{**base, **kw})


def test_first_loss_at_policy_equal_to_reference_is_half_the_mean_weight(tiny_model_dir, pairs, tmp_path):
    """Step 1 runs before any update with policy == reference: every log-ratio r is 0 and so is z0 (the
    mismatched pairs' mean log-ratio), so an example scores w * (1 - sigmoid(0)) = w / 2. With weights
    w_d = 1 and w_u = 3, the first step's 4 rows (pairs unpaired into a desirable and an undesirable
    row each, in the loop's order) score (n_d * 1 + n_u * 3) / 2 / 4; both rewards and kl are 0, and the
    reference does not change."""
    tok = tiny_tokenizer()
    reference = tiny_causal_lm(tokenizer=tok, hidden_size=64, seed=0).requires_grad_(False)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    policy = tiny_causal_lm(tokenizer=tok, hidden_size=64, seed=0)
    rows = load_unpaired(pairs)
    labels = [rows[i]["label"] for i in next(loop.step_batches(len(rows), 4, 0))]
    n_d = sum(labels)
    assert 0 < n_d < 4  # both kinds in the step (else this test would not tell the weights apart)
    cfg = config(tiny_model_dir, pairs, tmp_path, desirable_weight=1.0, undesirable_weight=3.0, max_steps=3)
    train(cfg, model=policy, tokenizer=tok, reference=reference)
    first = read_metrics(tmp_path)[0]
    assert first["loss"] == pytest.approx((n_d * 1.0 + (4 - n_d) * 3.0) / 2 / 4, abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "kl"):
        assert first[key] == pytest.approx(0.0, abs=1e-6), key
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert not torch.equal(policy.model.embed_tokens.weight, before["model.embed_tokens.weight"])


def test_z0_is_the_clamped_mean_log_ratio_of_rolled_pairs(tiny_model_dir, pairs):
    """z0 from prepare_step equals, by hand: the mean over i of log pi(c_i | p_{i+1}) - log pi_ref(...)
    (plain forwards), clamped at 0; here the policy is a different random model, so z0 is not trivially 0
    unless the mean is negative (then the clamp must give exactly 0). Tolerance 5e-5: each log-prob is a
    float32 sum of order -100 over a packed (here) or a plain (by hand) forward, which round apart at ~1e-5."""
    tok = tiny_tokenizer()
    reference = tiny_causal_lm(tokenizer=tok, hidden_size=64, seed=0).eval()
    policy = tiny_causal_lm(tokenizer=tok, hidden_size=64, seed=7).eval()
    examples = encode_unpaired(tok, load_unpaired(pairs)[:5], 64)
    for i, ex in enumerate(examples):
        ex["index"] = i

    def logp(model, prompt, completion):
        ids = torch.tensor([prompt + completion])
        lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
        return lp[-len(completion) :].sum().item()

    with torch.no_grad():
        ratios = [
            logp(policy, examples[(i + 1) % 5]["prompt_input_ids"], ex["completion_input_ids"])
            - logp(reference, examples[(i + 1) % 5]["prompt_input_ids"], ex["completion_input_ids"])
            for i, ex in enumerate(examples)
        ]
    objective = kto.KTOObjective(policy, config("m", pairs, "o"), reference)
    objective.prepare_step(examples)
    assert float(objective.z0) == pytest.approx(max(0.0, sum(ratios) / 5), abs=5e-5)
    negated = kto.KTOObjective(reference, config("m", pairs, "o"), policy)  # the mean log-ratio flips sign
    negated.prepare_step(examples)
    assert float(negated.z0) == pytest.approx(max(0.0, -sum(ratios) / 5), abs=5e-5)
    assert min(float(objective.z0), float(negated.z0)) == 0.0


def test_a_short_run_lowers_the_held_out_loss_and_opens_the_reward_gap(tiny_model_dir, tmp_path):
    """Desirable completions use positive words, undesirable ones negative: after training, the held-out
    loss is below its starting value 0.5 (w / 2 at policy = reference) and desirable completions out-score
    undesirable ones."""
    train_file = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(48, seed=1))
    eval_file = write_jsonl(tmp_path / "eval.jsonl", synthetic_pairs(16, seed=2))
    summary = train(config(tiny_model_dir, train_file, tmp_path / "run", eval_data=str(eval_file),
                           max_steps=None, epochs=2, batch_size=8, lr=3e-3, lr_schedule="constant"))  # fmt: skip
    assert summary["eval"]["val/loss"] < 0.45
    assert summary["eval"]["val/rewards/margins"] > 0
    assert summary["eval"]["val/rewards/chosen"] > summary["eval"]["val/rewards/rejected"]


def test_resumed_run_matches_uninterrupted_run(tiny_model_dir, pairs, tmp_path, monkeypatch):
    kw = dict(max_steps=4, save_every=2, lr_schedule="linear", warmup_steps=1)
    train(config(tiny_model_dir, pairs, tmp_path / "full", **kw))
    real_step = loop._one_step
    calls = {"n": 0}

    def crash_after_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "_one_step", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_model_dir, pairs, tmp_path / "resumed", **kw))
    monkeypatch.setattr(loop, "_one_step", real_step)
    summary = train(config(tiny_model_dir, pairs, tmp_path / "resumed", resume=True, **kw))
    assert summary["steps"] == 4
    full = load_file(str(tmp_path / "full" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    for k, v in full.items():
        torch.testing.assert_close(resumed[k], v, rtol=1e-6, atol=1e-6)
    full_losses = [m["loss"] for m in read_metrics(tmp_path / "full")]
    assert [m["loss"] for m in read_metrics(tmp_path / "resumed")] == pytest.approx(full_losses, rel=1e-6)


def test_cli_trains_on_unpaired_rows_and_refuses_bad_weights(tiny_model_dir, tmp_path, capsys):
    rows = [{"prompt": f"Review {i}:", "completion": " great" if i % 2 else " awful", "label": bool(i % 2)}
            for i in range(8)]  # fmt: skip
    data = write_jsonl(tmp_path / "kto.jsonl", rows)
    args = ["kto", "--model", str(tiny_model_dir), "--data", str(data), "--max-length", "32",
            "--batch-size", "4", "--max-steps", "1", "--no-progress", "--raw"]  # fmt: skip
    assert main([*args, "--output", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["train_examples"] == 8 and summary["steps"] == 1
    assert main([*args, "--output", str(tmp_path / "bad"), "--undesirable-weight", "0"]) == 2
    assert "undesirable_weight must be > 0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="beta"):
        config("m", data, tmp_path / "c", beta=0)


def test_the_example_config_is_valid():
    from pathlib import Path

    from prefalign.config import build_config

    repo = Path(__file__).resolve().parents[2]
    cfg = build_config(KTOConfig, repo / "configs" / "kto.yaml", {"data": "x.jsonl", "output": "runs/x"})
    assert (cfg.model, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight) == ("smollm2", 0.1, 1.0, 1.0)


def test_two_processes_with_uneven_shares_sum_z0_without_hanging(tiny_model_dir, tmp_path):
    """21 rows, 8 per step over 2 processes (batch 2 x 2 accumulation each): the last step's 5 rows split
    3 / 2, so the processes run different numbers of chunks; z0's sum over processes is taken once per
    step on both, so the run ends instead of hanging. Step 1 (policy = reference) scores 1/2 per row."""
    import subprocess
    import sys

    rows = [{"prompt": f"Review {i}:", "completion": " great" if i % 3 else " awful", "label": bool(i % 3)}
            for i in range(21)]  # fmt: skip
    data = write_jsonl(tmp_path / "kto.jsonl", rows)
    two = subprocess.run(
        [sys.executable, "-m", "prefalign", "kto", "--num-processes", "2", "--model", str(tiny_model_dir),
         "--data", str(data), "--output", str(tmp_path / "two"), "--batch-size", "2", "--grad-accum", "2",
         "--max-steps", "3", "--lr", "1e-3", "--max-length", "32", "--raw", "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    metrics = [m for m in read_metrics(tmp_path / "two") if "loss" in m]
    assert len(metrics) == 3
    assert metrics[0]["loss"] == pytest.approx(0.5, abs=1e-6) and metrics[0]["kl"] == pytest.approx(
        0.0, abs=1e-6
    )
    assert all(m["kl"] >= 0 for m in metrics)


def test_lora_uses_the_policy_with_its_adapter_off_as_reference(tiny_model_dir, pairs, tmp_path, monkeypatch):
    """With LoRA no second model is loaded: the reference is the policy with its adapter switched off, so
    step 1 (the adapter's B = 0) scores exactly 1/2 per row with z0 = 0, and later steps move away."""
    import prefalign.models as models

    def no_reference(*a, **k):
        raise AssertionError("a LoRA run must not load a reference copy")

    monkeypatch.setattr(models, "load_reference", no_reference)
    train(config(tiny_model_dir, pairs, tmp_path, lora_r=4, max_steps=3, lr=1e-2))
    rows = read_metrics(tmp_path)
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6) and rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[-1]["loss"] != pytest.approx(0.5, abs=1e-4)
