"""`prefalign generate` end to end on a tiny model folder: files in, JSON lines or text out, clean errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import prefalign.data
from prefalign.cli import main
from prefalign.testing import tiny_causal_lm, tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    tok = tiny_tokenizer()
    tiny_causal_lm(tokenizer=tok, seed=0).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prompts_file_to_jsonl(model_dir, assets, tmp_path):
    out = tmp_path / "out" / "samples.jsonl"
    args = ["generate", "--model", str(model_dir), "--prompts", str(assets / "prompts.jsonl")]
    args += ["--num-samples", "2", "--max-new-tokens", "6", "--seed", "0", "--batch-size", "4"]
    assert main([*args, "--output", str(out)]) == 0
    rows = _read(out)
    prompts = [json.loads(line)["prompt"] for line in (assets / "prompts.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [p for p in prompts for _ in range(2)]
    assert [r["sample"] for r in rows] == [0, 1] * len(prompts)
    for r in rows:
        assert set(r) == {"prompt", "sample", "response", "num_tokens", "finished", "logprob"}
        assert 1 <= r["num_tokens"] <= 6 and r["logprob"] <= 0 and isinstance(r["response"], str)
    again = tmp_path / "again.jsonl"
    assert main([*args, "--output", str(again)]) == 0
    assert again.read_text() == out.read_text()  # same seed, same prompts, same batch size: same samples


def test_single_prompt_prints_the_greedy_response(model_dir, capsys, caplog):
    """With temperature 0 the printed text is exactly the Python API's greedy response to the templated
    prompt; the model-loading time is logged."""
    from prefalign.generation import generate
    from prefalign.models import load_policy, load_tokenizer

    tok = load_tokenizer(str(model_dir))
    expected = generate(
        load_policy(str(model_dir)),
        tok,
        [prefalign.data.encode_prompt(tok, "The movie was")],
        max_new_tokens=8,
        do_sample=False,
    ).texts[0]
    caplog.set_level("INFO")
    args = ["generate", "--model", str(model_dir), "--prompt", "The movie was", "--max-new-tokens", "8"]
    assert main([*args, "--temperature", "0"]) == 0
    assert capsys.readouterr().out == expected.strip() + "\n"
    assert "loaded model" in caplog.text


def test_several_prompts_print_under_headers(model_dir, assets, capsys):
    args = ["generate", "--model", str(model_dir), "--prompts", str(assets / "prompts.jsonl")]
    assert main([*args, "--max-new-tokens", "3", "--num-samples", "2", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("### Write a short review of the movie. [sample 1/2]") == 1
    assert out.count("### Was the movie good? [sample 2/2]") == 1  # messages: the last message is shown


def test_raw_skips_the_chat_template(model_dir, monkeypatch, tmp_path):
    seen: list[bool] = []
    real = prefalign.data.encode_prompt

    def spy(tokenizer, prompt, raw=False):
        seen.append(raw)
        return real(tokenizer, prompt, raw=raw)

    monkeypatch.setattr(prefalign.data, "encode_prompt", spy)
    base = ["generate", "--model", str(model_dir), "--prompt", "Hi", "--max-new-tokens", "2"]
    assert main([*base, "--output", str(tmp_path / "a.jsonl")]) == 0
    assert main([*base, "--raw", "--output", str(tmp_path / "b.jsonl")]) == 0
    assert seen == [False, True]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "give exactly one of --prompt TEXT or --prompts FILE"),
        (["--prompt", "a", "--prompts", "p.jsonl"], "give exactly one of"),
        (["--prompt", "a", "--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--prompt", "a", "--num-samples", "0"], "num_samples must be >= 1"),
    ],
)
def test_bad_options_exit_2_with_the_reason(model_dir, capsys, extra, message):
    assert main(["generate", "--model", str(model_dir), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_prompt_file_names_file_and_line(model_dir, tmp_path, capsys):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": 3}\n')
    assert main(["generate", "--model", str(model_dir), "--prompts", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "prompts.jsonl:2" in err and "Traceback" not in err


def test_missing_model_folder_is_a_clean_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "prefalign", "generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "nope: no such model folder" in proc.stderr and "Traceback" not in proc.stderr
