"""End-to-end DPO on a tiny random model: the invariants that catch real training-loop bugs."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from prefalign.cli import main
from prefalign.losses import DPO_LOSSES
from prefalign.testing import synthetic_pairs, tiny_causal_lm, tiny_tokenizer, write_jsonl
from prefalign.train import loop
from prefalign.train.dpo import DPOConfig, train
from prefalign.train.loop import read_metrics


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


def config(model_dir, pairs, out, **kw):
    base = dict(
        model=str(model_dir),
        data=str(pairs),
        output=str(out),
        lr=1e-3,
        max_length=64,
        batch_size=4,
        max_steps=2,
        progress=False,
    )
    return DPOConfig(**{**base, **kw})


def run_dpo_cli(model_dir, data, out, *extra):
    """`python -m prefalign dpo` in a fresh process (to see exactly what a user sees on stderr)."""
    cmd = [
        sys.executable,
        "-m",
        "prefalign",
        "dpo",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--output",
        str(out),
    ]
    return subprocess.run([*cmd, *extra], capture_output=True, text=True)


def final_weights(out):
    return load_file(str(out / "model.safetensors"))


def test_first_step_loss_is_ln2_with_zero_rewards_and_reference_frozen(model_dir, pairs, tmp_path):
    """Step 1 is computed before any update, with policy == reference: every log-ratio is 0, so the
    loss is -log sigmoid(0) = ln 2 and both implicit rewards are 0."""
    tok = tiny_tokenizer()
    reference = tiny_causal_lm(tokenizer=tok, hidden_size=64, seed=0).requires_grad_(False)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    policy = tiny_causal_lm(tokenizer=tok, hidden_size=64, seed=0)
    summary = train(
        config(model_dir, pairs, tmp_path, max_steps=3), model=policy, tokenizer=tok, reference=reference
    )
    first = read_metrics(tmp_path)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)
    for k, v in reference.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert summary["steps"] == 3
    assert not torch.equal(
        policy.model.embed_tokens.weight, before["model.embed_tokens.weight"]
    )  # it trained


def test_gradient_accumulation_matches_one_big_batch(model_dir, pairs, tmp_path):
    """Batch 2 x 4 accumulation steps and batch 8 x 1 (and a tiny micro-batch budget) give the same run.

    lr is 1e-4 here: Adam divides by sqrt(v), so where a gradient is ~0 a float-rounding difference in how
    the sum was split can move a weight by up to lr; at 1e-4 that stays inside the 1e-5 tolerance."""
    runs = {
        "2x4": dict(batch_size=2, grad_accum=4),
        "8x1": dict(batch_size=8, grad_accum=1),
        "8x1-micro": dict(batch_size=8, grad_accum=1, micro_batch_tokens=40),
    }
    for name, kw in runs.items():
        train(config(model_dir, pairs, tmp_path / name, max_steps=2, lr=1e-4, **kw))
    base_losses = [m["loss"] for m in read_metrics(tmp_path / "8x1")]
    base_weights = final_weights(tmp_path / "8x1")
    for name in ("2x4", "8x1-micro"):
        losses = [m["loss"] for m in read_metrics(tmp_path / name)]
        assert losses == pytest.approx(base_losses, rel=1e-6, abs=1e-5)
        for k, v in final_weights(tmp_path / name).items():
            torch.testing.assert_close(v, base_weights[k], rtol=1e-5, atol=1e-5)


def test_gradient_accumulation_matches_one_big_batch_on_a_partial_batch(model_dir, tmp_path):
    """13 pairs at 8 per step: step 2 holds the epoch's last 5 pairs, which 2 x 4 accumulation splits
    into chunks of 2, 2 and 1 (and no fourth): each pair must still weigh 1/5."""
    data = write_jsonl(tmp_path / "pairs13.jsonl", synthetic_pairs(13, seed=5))
    for name, kw in {"2x4": dict(batch_size=2, grad_accum=4), "8x1": dict(batch_size=8)}.items():
        train(config(model_dir, data, tmp_path / name, max_steps=2, lr=1e-4, **kw))
    keys = ("loss", "grad_norm")
    rows = {name: [[m[k] for k in keys] for m in read_metrics(tmp_path / name)] for name in ("2x4", "8x1")}
    assert rows["2x4"] == [pytest.approx(r, rel=1e-6, abs=1e-5) for r in rows["8x1"]]
    for k, v in final_weights(tmp_path / "8x1").items():
        torch.testing.assert_close(final_weights(tmp_path / "2x4")[k], v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("lora_r", "lora_dropout"), [(0, 0.0), (4, 0.0), (4, 0.3)])
def test_resumed_run_matches_uninterrupted_run(model_dir, pairs, tmp_path, monkeypatch, lora_r, lora_dropout):
    """Also with LoRA dropout, where the resumed run must restore the random generators to draw the same
    dropout masks."""
    kw = dict(
        max_steps=4,
        save_every=2,
        lr_schedule="linear",
        warmup_steps=1,
        lora_r=lora_r,
        lora_dropout=lora_dropout,
    )
    train(config(model_dir, pairs, tmp_path / "full", **kw))

    real_step = loop._one_step
    calls = {"n": 0}

    def crash_after_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "_one_step", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        train(config(model_dir, pairs, tmp_path / "resumed", **kw))
    monkeypatch.setattr(loop, "_one_step", real_step)
    checkpoint = tmp_path / "resumed" / "checkpoints" / "step-2"
    weights_file = "adapter_model.safetensors" if lora_r else "model.safetensors"
    for name in (weights_file, "tokenizer.json", "config.yaml", "state.pt"):
        assert (checkpoint / name).is_file(), name
    if not lora_r:
        AutoModelForCausalLM.from_pretrained(checkpoint)  # a checkpoint is a plain Hugging Face folder
    summary = train(config(model_dir, pairs, tmp_path / "resumed", resume=True, **kw))
    assert summary["steps"] == 4
    full, resumed = final_weights(tmp_path / "full"), final_weights(tmp_path / "resumed")
    for k, v in full.items():
        torch.testing.assert_close(resumed[k], v, rtol=1e-6, atol=1e-6)
    steps = [m["step"] for m in read_metrics(tmp_path / "resumed") if "loss" in m]
    assert steps == [1, 2, 3, 4]


def test_learns_a_preference_that_generalises_to_held_out_pairs(model_dir, tmp_path):
    """Chosen reviews use positive words, rejected negative ones: held-out implicit-reward accuracy > 0.9."""
    train_file = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(64, seed=1))
    eval_file = write_jsonl(tmp_path / "eval.jsonl", synthetic_pairs(32, seed=2))
    summary = train(
        config(
            model_dir,
            train_file,
            tmp_path / "run",
            eval_data=str(eval_file),
            max_steps=None,
            epochs=3,
            batch_size=8,
            lr=3e-3,
            beta=0.1,
            lr_schedule="constant",
        )
    )
    assert summary["eval"]["val/rewards/accuracies"] > 0.9
    assert summary["eval"]["val/rewards/margins"] > 0


def test_saved_model_loads_with_plain_transformers(model_dir, pairs, tmp_path):
    train(config(model_dir, pairs, tmp_path, max_steps=1))
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.num_hidden_layers == 2
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "config.yaml",
        "summary.json",
        "metrics.jsonl",
    ):
        assert (tmp_path / name).is_file(), name


def test_precomputed_reference_gives_the_same_run_as_a_frozen_copy(model_dir, pairs, tmp_path):
    """Precomputing is the default; --no-precompute-ref keeps a frozen copy and scores per batch."""
    assert DPOConfig(model="m", data="d", output="o").precompute_ref is True
    train(config(model_dir, pairs, tmp_path / "frozen", max_steps=3, precompute_ref=False))
    train(config(model_dir, pairs, tmp_path / "pre", max_steps=3))
    a = [m["loss"] for m in read_metrics(tmp_path / "frozen")]
    b = [m["loss"] for m in read_metrics(tmp_path / "pre")]
    assert a == pytest.approx(b, rel=1e-6, abs=1e-5)


@pytest.mark.parametrize("loss_type", sorted(DPO_LOSSES))
def test_cli_runs_every_loss_type(model_dir, pairs, tmp_path, loss_type):
    out = tmp_path / loss_type
    code = main(
        [
            "dpo",
            "--model",
            str(model_dir),
            "--data",
            str(pairs),
            "--output",
            str(out),
            "--loss-type",
            loss_type,
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--max-length",
            "64",
            "--label-smoothing",
            "0.1" if loss_type in ("cdpo", "robust") else "0",
            "--no-progress",
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and math.isfinite(summary["final"]["loss"])


def test_cli_lora_with_precomputed_reference_and_yaml_config(model_dir, pairs, tmp_path):
    """LoRA starts as the identity (B = 0), so the first loss is ln 2 whichever way the reference is made."""
    yaml_file = tmp_path / "dpo.yaml"
    yaml_file.write_text(
        f"model: {model_dir}\ndata: {pairs}\nmax_length: 64\nbatch_size: 4\nlora_r: 4\nlr: 0.01\n"
    )
    for name, extra in (("adapter-off", ["--no-precompute-ref"]), ("precomputed", [])):
        out = tmp_path / name
        code = main(
            [
                "dpo",
                "--config",
                str(yaml_file),
                "--output",
                str(out),
                "--max-steps",
                "2",
                "--no-progress",
                *extra,
            ]
        )
        assert code == 0
        assert read_metrics(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert (out / "adapter" / "adapter_config.json").is_file()
        AutoModelForCausalLM.from_pretrained(out)  # merged weights load plainly
    a = [m["loss"] for m in read_metrics(tmp_path / "adapter-off")]
    b = [m["loss"] for m in read_metrics(tmp_path / "precomputed")]
    assert a == pytest.approx(b, rel=1e-6, abs=1e-5)


def test_cli_reports_config_mistakes_without_traceback(model_dir, pairs, tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("betta: 0.2\n")
    cases = [
        (["--beta", "0"], "beta must be > 0"),
        (["--loss-type", "magic"], "unknown loss_type 'magic'"),
        (["--config", str(bad_yaml)], "unknown key(s) betta"),
    ]
    for extra, message in cases:
        proc = run_dpo_cli(model_dir, pairs, tmp_path / "x", *extra)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr
        assert "Traceback" not in proc.stderr


def test_cli_reports_bad_data_with_file_and_line(model_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "", "rejected": "c"}\n'
    )
    proc = run_dpo_cli(model_dir, data, tmp_path / "x")
    assert proc.returncode == 2
    assert "pairs.jsonl:2" in proc.stderr and "chosen" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_two_processes_train_exactly_like_one(model_dir, pairs, tmp_path):
    """DDP on two CPU processes (gloo), 4 pairs each, equals one process with batch 8: same losses,
    gradient norms, learning rates and final weights. Also checks that only one process writes files.
    (lr 1e-4 for the reason given in the accumulation test above.)"""
    common = [
        "--model",
        str(model_dir),
        "--data",
        str(pairs),
        "--max-steps",
        "3",
        "--lr",
        "1e-4",
        "--max-length",
        "64",
        "--no-progress",
    ]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "-m",
            "prefalign",
            "dpo",
            *common,
            "--output",
            str(tmp_path / "two"),
            "--batch-size",
            "4",
            "--micro-batch-tokens",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("done: 3 steps") == 1
    assert main(["dpo", *common, "--output", str(tmp_path / "one"), "--batch-size", "8"]) == 0
    keys = ("loss", "grad_norm", "lr", "rewards/margins")  # (accuracy at step 1 is the sign of ~1e-8 noise)
    one_m = [[m[k] for k in keys] for m in read_metrics(tmp_path / "one")]
    two_m = [[m[k] for k in keys] for m in read_metrics(tmp_path / "two")]
    assert len(two_m) == 3
    assert two_m == [pytest.approx(row, rel=1e-6, abs=1e-5) for row in one_m]
    for k, v in final_weights(tmp_path / "one").items():
        torch.testing.assert_close(final_weights(tmp_path / "two")[k], v, rtol=1e-5, atol=1e-5)


def test_rpo_adds_the_chosen_per_token_nll(model_dir, pairs, tmp_path):
    """With rpo_alpha a, the first loss is ln 2 + a * (mean over the step's pairs of the chosen
    completion's per-token NLL), the NLL computed here with a plain unpacked forward of the starting
    model (a sum-for-mean or wrong-token bug in the code's own ``nll/chosen`` would not match it)."""
    from transformers import AutoTokenizer

    from prefalign.data import encode_preferences, load_preferences

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    encoded = encode_preferences(tok, load_preferences(pairs), 64)
    first_batch = next(loop.step_batches(len(encoded), 4, 0))
    nlls = []
    with torch.no_grad():
        for i in first_batch:
            prompt, chosen = encoded[i]["prompt_input_ids"], encoded[i]["chosen_input_ids"]
            ids = torch.tensor([prompt + chosen])
            logps = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
            nlls.append(-logps[-len(chosen) :].mean().item())
    expected_nll = sum(nlls) / len(nlls)
    train(config(model_dir, pairs, tmp_path, max_steps=1, rpo_alpha=0.5))
    first = read_metrics(tmp_path)[0]
    assert first["nll/chosen"] == pytest.approx(expected_nll, rel=1e-6, abs=1e-5)
    assert first["loss"] == pytest.approx(math.log(2) + 0.5 * expected_nll, rel=1e-6, abs=1e-5)


def test_the_logged_lr_is_the_rate_the_step_used(model_dir, pairs, tmp_path):
    """Linear decay over 2 steps without warm-up: step 1 uses lr x 1, step 2 lr x (1 - 1/2). (It used to
    be read after the scheduler's step: 5e-4, then 0.)"""
    train(config(model_dir, pairs, tmp_path, max_steps=2, lr=1e-3, lr_schedule="linear"))
    assert [m["lr"] for m in read_metrics(tmp_path)] == pytest.approx([1e-3, 5e-4])


def test_a_run_shorter_than_an_epoch_scores_only_the_pairs_it_uses(model_dir, pairs, tmp_path):
    """Half an epoch of 16 pairs at batch 4: two steps, eight pairs; the precomputed reference table has
    those eight rows and NaN elsewhere (a pair without a reference would make the loss NaN, not wrong)."""
    from prefalign.train.dpo import build_objective, reference_pass, steps_examples
    from prefalign.train.loop import load_pairs, step_batches

    cfg = config(model_dir, pairs, tmp_path, epochs=0.5, max_steps=None)
    used = steps_examples(cfg, 16)
    stream = step_batches(16, 4, cfg.seed)
    assert used == sorted(next(stream) + next(stream)) and len(used) == 8
    assert steps_examples(config(model_dir, pairs, tmp_path, max_steps=None), 16) == list(range(16))
    tok = tiny_tokenizer()
    train_set, held = load_pairs(cfg, tok)
    model = tiny_causal_lm(tokenizer=tok, hidden_size=64)
    objective, _ = build_objective(cfg, train_set, held, model=model)
    scored = ~objective.ref_logps.isnan().any(-1)
    assert scored.nonzero().flatten().tolist() == used
    # each used pair gets, bit for bit, what a pass over all pairs gives it: the micro-batches are formed
    # over all pairs either way, so a resumed run with another --max-steps scores them identically
    full = reference_pass(model, train_set, cfg)
    assert torch.equal(objective.ref_logps[used], full[used])
