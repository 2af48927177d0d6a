"""`prefalign generate` end to end on a tiny model folder: files in, JSON lines or text out, clean errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
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


def test_a_prompts_other_columns_travel_to_score(model_dir, tmp_path):
    """tasks -> generate -> score --reward accuracy: each response keeps its prompt's answer, so the
    held-out accuracy of a model is two commands."""
    problems, samples, scored = tmp_path / "math.jsonl", tmp_path / "samples.jsonl", tmp_path / "scored.jsonl"
    assert main(["tasks", "arithmetic", "--n", "3", "--seed", "0", "--output", str(problems)]) == 0
    args = ["generate", "--model", str(model_dir), "--prompts", str(problems), "--num-samples", "2"]
    assert main([*args, "--max-new-tokens", "4", "--seed", "0", "--output", str(samples)]) == 0
    answers = [r["answer"] for r in _read(problems)]
    rows = _read(samples)
    assert [r["answer"] for r in rows] == [a for a in answers for _ in range(2)]
    assert main(["score", "--data", str(samples), "--output", str(scored), "--reward", "accuracy"]) == 0
    out = _read(scored)
    assert [r["answer"] for r in out] == [r["answer"] for r in rows]
    assert all(r["reward"] in (0.0, 1.0) for r in out)  # a random tiny model's words, scored against them


def test_single_prompt_prints_the_greedy_response(model_dir, capsys, caplog):
    """With temperature 0 the printed text is exactly the Python API's greedy response to the templated
    prompt; the model-loading time is logged."""
    from prefalign.generation import SamplingSettings, generate
    from prefalign.models import load_policy, load_tokenizer

    tok = load_tokenizer(str(model_dir))
    expected = generate(
        load_policy(str(model_dir)),
        tok,
        [prefalign.data.encode_prompt(tok, "The movie was")],
        SamplingSettings(max_new_tokens=8, do_sample=False),
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


# ---- prompts past the context, outputs that cannot be written, devices that are not there ----------


@pytest.fixture(scope="module")
def short_context_dir(tmp_path_factory) -> Path:
    """The tiny model saved with a context of 32 positions."""
    folder = tmp_path_factory.mktemp("tiny-short-context")
    tok = tiny_tokenizer()
    model = tiny_causal_lm(tokenizer=tok, seed=0)
    model.config.max_position_embeddings = 32
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def test_a_prompt_line_far_past_the_context_is_cut_with_a_warning(short_context_dir, tmp_path, caplog):
    """A 200 kB line used to reach the model whole: attention over ~10^5 positions asks for hundreds of
    GB. Now it is cut to the context's last 32 tokens, one warning counts the cut prompts, another says
    that prompt + --max-new-tokens passes the context, and both prompts get responses."""
    prompts = tmp_path / "prompts.jsonl"
    long = "the movie was good and " * 9000
    prompts.write_text(json.dumps({"prompt": long}) + "\n" + json.dumps({"prompt": "Hi"}) + "\n")
    out = tmp_path / "out.jsonl"
    caplog.set_level("INFO")
    args = ["generate", "--model", str(short_context_dir), "--prompts", str(prompts), "--raw"]
    assert main([*args, "--max-new-tokens", "4", "--temperature", "0", "--output", str(out)]) == 0
    rows = _read(out)
    assert [len(r["prompt"]) for r in rows] == [len(long), 2]  # the record keeps the prompt as given
    assert all(1 <= r["num_tokens"] <= 4 for r in rows)
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "cut 1 of 2 prompts to their last 32 tokens: the model's context is 32 tokens" in messages
    assert any("plus max_new_tokens=4 pass the model's context of 32 tokens" in m for m in messages)


def test_temperature_1e_45_prints_the_greedy_response(model_dir, capsys):
    base = ["generate", "--model", str(model_dir), "--prompt", "The movie was", "--max-new-tokens", "8"]
    assert main([*base, "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert main([*base, "--temperature", "1e-45", "--seed", "3"]) == 0
    assert capsys.readouterr().out == greedy


@pytest.fixture
def no_model_loading(monkeypatch):
    """Any attempt to find or load a model fails the test."""
    import prefalign.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although the command should have stopped before")

    for name in ("resolve_model", "load_policy", "load_tokenizer"):
        monkeypatch.setattr(prefalign.models, name, refuse)


@pytest.mark.parametrize("where", ["folder", "under_a_file", "unwritable"])
def test_an_output_that_cannot_be_written_is_refused_before_the_model_loads(
    tmp_path, capsys, no_model_loading, where
):
    (tmp_path / "notes.txt").write_text("a file")
    output, reason = {
        "folder": (tmp_path, "is a folder"),
        "under_a_file": (tmp_path / "notes.txt" / "out.jsonl", "which is a file, not a folder"),
        # /proc takes no new files, not even from root (for whom os.access says yes to everything)
        "unwritable": (Path("/proc/prefalign-test/out.jsonl"), "folder /proc is not writable"),
    }[where]
    args = ["generate", "--model", "tiny-random", "--prompt", "Hi", "--output", str(output)]
    start = time.perf_counter()
    assert main(args) == 2
    assert time.perf_counter() - start < 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"prefalign generate: error: output: {output}") and reason in err


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "--model", "tiny-random", "--prompt", "Hi"],
        ["score", "--data", "rows.jsonl", "--output", "out.jsonl", "--reward", "sentiment"],
        ["demo", "--preset", "smoke"],
    ],
    ids=["generate", "score", "demo"],
)
def test_device_cuda_without_cuda_is_refused_before_any_model(monkeypatch, capsys, no_model_loading, command):
    """Every command with a --device option (GenerateConfig, ScoreConfig, DemoConfig) checks it first."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*command, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "device: 'cuda' asked for, but CUDA is not available here" in err and "Traceback" not in err


# ---- sizes that cannot be generated: refused before the model loads, nothing written ---------------


@pytest.fixture
def no_weights_loading(monkeypatch):
    """Loading the weights fails the test (finding the model and reading its config and tokenizer is fine)."""
    import prefalign.models

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded although the command should have stopped before")

    monkeypatch.setattr(prefalign.models, "load_policy", refuse)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--max-new-tokens", "1000000000000"],
            "max_new_tokens: 1000000000000 new tokens after a prompt of 2 tokens pass the model's context of "
            "32 tokens (max_position_embeddings in its config); at most 30 fit",
        ),
        (["--max-new-tokens", "31"], "at most 30 fit"),  # one past the context
        (
            ["--num-samples", "1000000000", "--max-new-tokens", "8"],
            "num_samples: 1000000000 responses of up to 10 tokens would hold about 2,477 GiB in memory",
        ),
        (["--num-samples", "2000000", "--max-new-tokens", "10"], "2000000 responses of up to 12 tokens"),
    ],
)
def test_sizes_past_the_context_or_memory_are_refused_before_the_weights_load(
    short_context_dir, tmp_path, capsys, no_weights_loading, extra, message
):
    """--max-new-tokens 10^12 used to try to allocate terabytes, --num-samples 10^9 ended in MemoryError
    after 104 s. Now one line, exit 2, within seconds, before the weights load, and no output file."""
    out = tmp_path / "out.jsonl"
    args = ["generate", "--model", str(short_context_dir), "--prompt", "Hi", "--raw", "--output", str(out)]
    start = time.perf_counter()
    assert main([*args, *extra]) == 2
    assert time.perf_counter() - start < 10
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("prefalign generate: error: ") and message in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_the_longest_response_that_fits_is_accepted(short_context_dir, tmp_path):
    """The bound is exact: "Hi" (2 tokens raw) plus 30 new tokens is the 32-position context."""
    out = tmp_path / "out.jsonl"
    args = ["generate", "--model", str(short_context_dir), "--prompt", "Hi", "--raw", "--output", str(out)]
    assert main([*args, "--max-new-tokens", "30", "--temperature", "0"]) == 0
    assert 1 <= _read(out)[0]["num_tokens"] <= 30
