"""ORPO (Hong et al. 2024) as `prefalign dpo --loss-type orpo`: reference-free, length-averaged
log-probs, chosen NLL plus beta times the odds-ratio term."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefalign.config import ConfigError
from prefalign.train import dpo, loop
from prefalign.train.dpo import DPOConfig, train
from prefalign.train.loop import read_metrics


def config(model_dir, pairs, out, **kw):
    base = dict(model=str(model_dir), data=str(pairs), output=str(out), lr=1e-3, max_length=64,
                batch_size=4, max_steps=1, progress=False, loss_type="orpo", beta=0.25)  # fmt: skip
    return DPOConfig(**{**base, **kw})


def mean_logp(model, prompt, completion):
    """Length-averaged log pi(completion | prompt) by a plain, unpacked forward."""
    ids = torch.tensor([prompt + completion])
    logps = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
    return logps[-len(completion) :].mean().item()


def test_first_orpo_loss_is_the_hand_worked_value_and_no_reference_is_used(
    tiny_model_dir, pairs, tmp_path, monkeypatch
):
    """For each pair of the first step, with pc, pr the length-averaged log-probs of the starting model:
    log_odds = (pc - ln(1 - e^pc)) - (pr - ln(1 - e^pr)), loss = -pc - beta * ln sigmoid(log_odds);
    the first logged loss is the mean over the step's 4 pairs (beta 0.25). No reference model is loaded
    and no reference pass runs."""
    from prefalign.data import encode_preferences, load_preferences

    def forbidden(*a, **k):
        raise AssertionError("orpo must not load or run a reference")

    import prefalign.models as models

    monkeypatch.setattr(models, "load_reference", forbidden)
    monkeypatch.setattr(dpo, "reference_pass", forbidden)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    encoded = encode_preferences(tok, load_preferences(pairs), 64)
    expected, nlls = [], []
    with torch.no_grad():
        for i in next(loop.step_batches(len(encoded), 4, 0)):
            ex = encoded[i]
            pc = mean_logp(model, ex["prompt_input_ids"], ex["chosen_input_ids"])
            pr = mean_logp(model, ex["prompt_input_ids"], ex["rejected_input_ids"])
            log_odds = (pc - math.log1p(-math.exp(pc))) - (pr - math.log1p(-math.exp(pr)))
            log_sigmoid = -math.log1p(math.exp(-log_odds))
            expected.append(-pc - 0.25 * log_sigmoid)
            nlls.append(-pc)
    train(config(tiny_model_dir, pairs, tmp_path))
    first = read_metrics(tmp_path)[0]
    assert first["loss"] == pytest.approx(sum(expected) / 4, rel=1e-6, abs=1e-5)
    assert first["nll/chosen"] == pytest.approx(sum(nlls) / 4, rel=1e-6, abs=1e-5)
    assert first["rewards/chosen"] == pytest.approx(-0.25 * sum(nlls) / 4, rel=1e-6, abs=1e-5)


def test_orpo_raises_the_chosen_odds_over_a_short_run(tiny_model_dir, pairs, tmp_path):
    train(config(tiny_model_dir, pairs, tmp_path, max_steps=8, lr=3e-3))
    rows = read_metrics(tmp_path)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]


def test_orpo_refuses_options_it_has_no_use_for(pairs, tmp_path):
    with pytest.raises(ConfigError, match="rpo_alpha"):
        config("m", pairs, tmp_path / "a", rpo_alpha=0.5)
    with pytest.raises(ConfigError, match="ref_model"):
        config("m", pairs, tmp_path / "b", ref_model="other")
    with pytest.raises(ConfigError, match="beta"):
        config("m", pairs, tmp_path / "c", beta=0.0)
