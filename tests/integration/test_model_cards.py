"""What a run leaves behind: a model card (README.md in the Hugging Face convention) in every final model
folder, and `prefalign models list --runs DIR` listing the runs' final models."""

from __future__ import annotations

import re

import pytest
import yaml

from prefalign.cli import main
from prefalign.testing import synthetic_pairs, write_jsonl
from prefalign.train import dpo, sft


def header(path):
    match = re.match(r"---\n(.*?)\n---\n", path.read_text(encoding="utf-8"), re.S)
    assert match, f"{path} has no YAML header"
    return yaml.safe_load(match.group(1)), path.read_text(encoding="utf-8")[match.end() :]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, pairs, tmp_path_factory):
    """A dpo run (full weights), an orpo run and an sft run with a LoRA adapter, one step each."""
    root = tmp_path_factory.mktemp("runs")
    common = dict(model=str(tiny_model_dir), max_length=64, batch_size=4, max_steps=1, progress=False)
    dpo.train(dpo.DPOConfig(data=str(pairs), output=str(root / "dpo"), **common))
    dpo.train(dpo.DPOConfig(data=str(pairs), output=str(root / "more" / "orpo"), loss_type="orpo", **common))
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in synthetic_pairs(8, seed=4)]
    demos = write_jsonl(root / "demos.jsonl", rows)
    sft.train(sft.SFTConfig(data=str(demos), output=str(root / "sft"), lora_r=4, save_every=1, **common))
    return root


def test_a_dpo_run_has_a_model_card_with_its_method_base_settings_and_metrics(runs, tiny_model_dir):
    meta, body = header(runs / "dpo" / "README.md")
    assert meta["base_model"] == str(tiny_model_dir)
    assert meta["library_name"] == "transformers"
    assert meta["tags"] == ["prefalign", "dpo"]
    assert "Direct Preference Optimisation" in body
    assert "beta: 0.1" in body and "loss_type: sigmoid" in body  # the resolved settings
    loss = re.search(r"\| final \| `loss` \| ([-\d.e]+) \|", body)
    assert loss and float(loss.group(1)) == pytest.approx(0.693147, abs=1e-5)  # ln 2 at step 1
    assert f'AutoModelForCausalLM.from_pretrained("{runs / "dpo"}")' in body
    meta, _ = header(runs / "more" / "orpo" / "README.md")
    assert meta["tags"] == ["prefalign", "dpo", "orpo"]


def test_an_sft_lora_run_has_a_transformers_card_and_a_peft_card_for_its_adapter(runs, tiny_model_dir):
    meta, body = header(runs / "sft" / "README.md")
    assert (meta["base_model"], meta["library_name"], meta["tags"]) == (
        str(tiny_model_dir),
        "transformers",
        ["prefalign", "sft"],
    )
    assert "supervised fine-tuning" in body and "lora_r: 4" in body
    meta, body = header(runs / "sft" / "adapter" / "README.md")
    assert meta["library_name"] == "peft" and meta["tags"] == ["prefalign", "sft"]
    assert f'AutoPeftModelForCausalLM.from_pretrained("{runs / "sft"}/adapter")' in body


def test_models_list_runs_shows_each_final_model_with_method_and_base(runs, tiny_model_dir, capsys):
    assert main(["models", "list", "--runs", str(runs)]) == 0
    out = capsys.readouterr().out
    listed = re.findall(r"^(\S+)\n    method: (\S+); base: (\S+); 1 steps", out, re.M)
    assert sorted(listed) == sorted([
        (str(runs / "dpo"), "dpo", str(tiny_model_dir)),
        (str(runs / "more" / "orpo"), "dpo+orpo", str(tiny_model_dir)),
        (str(runs / "sft"), "sft", str(tiny_model_dir)),
    ])  # fmt: skip
    assert "LoRA adapter in adapter/" in out.split(str(runs / "sft"))[1]
    assert "checkpoints" not in out
    assert main(["models", "list", "--runs", str(runs / "nowhere")]) == 2


def test_online_and_kto_configs_name_their_method_in_the_card(tmp_path):
    """The card's method comes from the config class (what `prefalign <command>` built): the online
    methods' cards (written by train/online.py) and kto's name theirs, with their prompts as data."""
    from prefalign.train.grpo import GRPOConfig
    from prefalign.train.kto import KTOConfig
    from prefalign.train.model_card import model_card

    grpo = GRPOConfig(model="org/base", prompts="org/prompts", prompts_split="train_gen", output=str(tmp_path / "g"),
                      reward=["sentiment"], rollout_batch=4, num_generations=4)  # fmt: skip
    meta, body = header_of(model_card(grpo, {"steps": 3, "train_prompts": 8, "final": {"loss": 0.5}}))
    assert meta["tags"] == ["prefalign", "grpo"] and meta["datasets"] == ["org/prompts"]
    assert "Trained for 3 iterations" in body and "split `train_gen`" in body
    kto = KTOConfig(model="m", data="d.jsonl", output=str(tmp_path / "k"))
    assert header_of(model_card(kto, {"steps": 1}))[0]["tags"] == ["prefalign", "kto"]


def header_of(text):
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    return yaml.safe_load(match.group(1)), text[match.end() :]
