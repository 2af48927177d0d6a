"""Run folders, checkpoints and resume: a reused folder, a damaged checkpoint or a changed setting is
refused with a message that names it; nothing is silently replaced or repeated."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from prefalign.cli import main
from prefalign.config import ConfigError, field_docs
from prefalign.testing import synthetic_pairs, write_jsonl
from prefalign.train import checkpoint, loop
from prefalign.train.dpo import DPOConfig, train
from prefalign.train.loop import TrainConfig, latest_checkpoint, prune_checkpoints, read_metrics


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


def steps_of(out: Path) -> list[int]:
    return [m["step"] for m in read_metrics(out) if "loss" in m]


def cli(model_dir, pairs, out, *extra):
    common = ["--model", str(model_dir), "--data", str(pairs), "--output", str(out), "--max-length", "64"]
    return main(["dpo", *common, "--batch-size", "4", "--no-progress", *extra])


def test_a_folder_holding_a_run_is_refused_unless_resume_or_overwrite(tiny_model_dir, pairs, tmp_path):
    """A second run into a used folder used to replace its model and metrics but keep its checkpoints."""
    out = tmp_path / "run"
    train(config(tiny_model_dir, pairs, out, max_steps=3, save_every=1, keep_checkpoints=3))
    with pytest.raises(ConfigError, match="already holds a run.*--resume.*--overwrite"):
        train(config(tiny_model_dir, pairs, out, max_steps=1))
    assert cli(tiny_model_dir, pairs, out, "--max-steps", "1") == 2
    assert steps_of(out) == [1, 2, 3]  # untouched

    train(config(tiny_model_dir, pairs, out, max_steps=1, overwrite=True))
    assert steps_of(out) == [1]
    assert [p.name for p in loop.checkpoint_folders(out)] == ["step-1"]  # the old run's step-2, step-3 gone
    assert json.loads((out / "summary.json").read_text())["steps"] == 1


def test_a_folder_with_only_other_files_is_not_a_run(tiny_model_dir, pairs, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    write_jsonl(out / "my-data.jsonl", synthetic_pairs(16, seed=0))
    assert train(config(tiny_model_dir, pairs, out, max_steps=1))["steps"] == 1
    assert (out / "my-data.jsonl").is_file()


def test_resume_refuses_changed_settings_and_names_them(tiny_model_dir, pairs, tmp_path):
    out = tmp_path / "run"
    train(config(tiny_model_dir, pairs, out, max_steps=1))
    with pytest.raises(ConfigError) as err:
        train(config(tiny_model_dir, pairs, out, max_steps=2, resume=True, lr=2e-3, beta=0.2))
    assert "beta (0.1 -> 0.2)" in str(err.value) and "lr (0.001 -> 0.002)" in str(err.value)
    assert "max_steps" not in str(err.value)
    summary = train(config(tiny_model_dir, pairs, out, max_steps=2, resume=True))  # a larger budget is fine
    assert summary["steps"] == 2
    assert steps_of(out) == [1, 2]


def test_resume_with_nothing_to_resume_is_an_error(tiny_model_dir, pairs, tmp_path):
    assert cli(tiny_model_dir, pairs, tmp_path / "empty", "--resume", "--max-steps", "1") == 2
    assert not (tmp_path / "empty" / "summary.json").exists()


def test_a_checkpoint_is_written_at_the_end_by_default(tiny_model_dir, pairs, tmp_path):
    train(config(tiny_model_dir, pairs, tmp_path, max_steps=2))
    assert [p.name for p in loop.checkpoint_folders(tmp_path)] == ["step-2"]
    assert TrainConfig.save_every > 0
    help_text = field_docs(TrainConfig)["save_every"]
    assert "only at the end" not in help_text and "after the last step" in help_text


def test_resume_after_a_kill_does_not_repeat_metric_rows(tiny_model_dir, pairs, tmp_path):
    """Killed after step 3 with a checkpoint at step 2: the resumed run starts at 3 again, and rows
    3.. are written once (the killed run's row 3 is cut), so the steps read 1, 2, 3, 4."""
    train(config(tiny_model_dir, pairs, tmp_path, max_steps=3, save_every=2))
    shutil.rmtree(tmp_path / "checkpoints" / "step-3")  # as if killed before the final checkpoint
    train(config(tiny_model_dir, pairs, tmp_path, max_steps=4, save_every=2, resume=True))
    assert steps_of(tmp_path) == [1, 2, 3, 4]


def test_leftover_tmp_folders_are_ignored_and_keep_zero_is_refused(tiny_model_dir, pairs, tmp_path):
    train(config(tiny_model_dir, pairs, tmp_path, max_steps=1))
    (tmp_path / "checkpoints" / "step-7.tmp").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-1"
    prune_checkpoints(tmp_path, 0)
    assert latest_checkpoint(tmp_path).name == "step-1"  # the newest checkpoint is never pruned
    with pytest.raises(ConfigError, match="keep_checkpoints must be >= 1"):
        config(tiny_model_dir, pairs, tmp_path, keep_checkpoints=0)


@pytest.mark.parametrize("damaged", ["model.safetensors", "state.pt", "trainer_state.json"])
def test_a_truncated_checkpoint_is_refused_naming_the_file_and_the_previous_one_used(
    tiny_model_dir, pairs, tmp_path, caplog, damaged
):
    train(config(tiny_model_dir, pairs, tmp_path, max_steps=2, save_every=1))
    path = tmp_path / "checkpoints" / "step-2" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(tmp_path).name == "step-1"
    assert f"step-2/{damaged}" in caplog.text and "step-1 instead" in caplog.text
    summary = train(config(tiny_model_dir, pairs, tmp_path, max_steps=2, save_every=1, resume=True))
    assert summary["steps"] == 2 and steps_of(tmp_path) == [1, 2]

    for step in (1, 2):  # nothing whole left: refused, naming the file
        path = tmp_path / "checkpoints" / f"step-{step}" / damaged
        path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(ConfigError, match=f"step-2/{damaged}.*step-1/{damaged}"):
        latest_checkpoint(tmp_path)


class _Payload:
    """Unpickling this runs ``Path.touch`` on the marker: what a crafted ``state.pt`` could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_crafted_state_file_is_not_unpickled(tiny_model_dir, pairs, tmp_path):
    """Even with a manifest rewritten to match, ``state.pt`` is read with ``weights_only=True``: the
    payload is refused and never runs."""
    out = tmp_path / "run"
    train(config(tiny_model_dir, pairs, out, max_steps=1))
    folder = out / "checkpoints" / "step-1"
    marker = tmp_path / "pwned"
    (folder / "state.pt").write_bytes(pickle.dumps({"optimizer": _Payload(marker)}))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["state.pt"] = {
        "bytes": (folder / "state.pt").stat().st_size,
        "sha256": checkpoint._sha256(folder / "state.pt"),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="step-1/state.pt: holds more than tensors"):
        train(config(tiny_model_dir, pairs, out, max_steps=2, resume=True))
    assert not marker.exists()


def test_a_checkpoint_saved_in_shards_is_resumed_through_its_index(tmp_path):
    """Large models are saved as model-0000k-of-0000n.safetensors plus an index; resuming reads them all."""
    import functools

    import torch

    from prefalign.testing import tiny_causal_lm, tiny_tokenizer

    def parts(seed):
        model = tiny_causal_lm(tokenizer=tiny_tokenizer(), hidden_size=64, seed=seed)
        optimizer = loop.make_optimizer(list(model.parameters()), config("m", "d", tmp_path))
        return model, optimizer, loop.make_scheduler(optimizer, config("m", "d", tmp_path), 10)

    model, optimizer, scheduler = parts(0)
    model.save_pretrained = functools.partial(model.save_pretrained, max_shard_size="100KB")
    folder = tmp_path / "checkpoints" / "step-3"
    loop.save_checkpoint(folder, model, optimizer, scheduler, {"step": 3})
    assert not (folder / "model.safetensors").exists() and (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    fresh, optimizer, scheduler = parts(1)
    assert loop.load_checkpoint(folder, fresh, optimizer, scheduler) == {"step": 3}
    for name, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], value, rtol=0, atol=0)


def test_final_model_shares_the_last_checkpoint_weights(tiny_model_dir, pairs, tmp_path):
    """The final model folder links the last checkpoint's weight file instead of writing it again; it
    loads as a Hugging Face model, and an earlier model's shards in the folder do not survive."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    (out / "model.safetensors.index.json").write_text("{}")
    train(config(tiny_model_dir, pairs, out, max_steps=2))
    final, saved = out / "model.safetensors", out / "checkpoints" / "step-2" / "model.safetensors"
    assert final.stat().st_ino == saved.stat().st_ino  # one file, two names (same file system)
    assert not (out / "model-00001-of-00002.safetensors").exists()
    assert not (out / "model.safetensors.index.json").exists()
    assert loop.checkpoint_problem(saved.parent) is None
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, tensor in load_file(str(final)).items():
        torch.testing.assert_close(model.state_dict()[name], tensor)


def test_an_option_newer_than_the_saved_run_counts_only_off_its_default(tmp_path):
    """A run saved before an option existed (here: its config.yaml lacks log_every) resumes when the
    option is at its default, and is refused naming it when it is not."""
    import yaml

    from prefalign.config import save_config
    from prefalign.train.run_folder import changed_settings

    saved = tmp_path / "config.yaml"
    save_config(DPOConfig(model="m", data="d", output=str(tmp_path / "o")), saved)
    old = yaml.safe_load(saved.read_text())
    del old["log_every"]
    saved.write_text(yaml.safe_dump(old))
    assert changed_settings(saved, DPOConfig(model="m", data="d", output=str(tmp_path / "o"))) == []
    changed = changed_settings(saved, DPOConfig(model="m", data="d", output=str(tmp_path / "o"), log_every=2))
    assert changed == ["log_every (None -> 2)"]
