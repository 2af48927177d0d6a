"""`prefalign demo --preset smoke`: the whole pipeline on a tiny random model, and the report's structure.

The demo runs once per module (about 20 s on two CPU cores); the tests read what it wrote. The numbers
of the table are recomputed from ``samples/*.jsonl``, rewards with VADER from the texts themselves.
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
from pathlib import Path

import pytest

from prefalign.cli import main
from prefalign.demo import config_for_preset, load_demo_prompts
from prefalign.report import frontier_sentence

METHODS = ("reference", "preferred-ft", "dpo", "ppo")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Run the smoke preset once; returns (run folder, seconds, terminal output)."""
    out = tmp_path_factory.mktemp("demo") / "run"
    import contextlib
    import io

    buffer = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(buffer):
        code = main(["demo", "--preset", "smoke", "--output", str(out), "--no-progress"])
    assert code == 0
    return out, time.perf_counter() - start, buffer.getvalue()


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_smoke_runs_in_under_a_minute_and_writes_every_output(smoke):
    run, seconds, _ = smoke
    assert seconds < 60
    for name in ("report.html", "report.md", "summary.json", "config.yaml", "plots/frontier.png"):
        assert (run / name).is_file(), name
    for method in ("preferred-ft", "dpo", "reward-model", "ppo"):
        assert (run / "runs" / method / "metrics.jsonl").is_file(), method
        assert (run / "runs" / method / "summary.json").is_file(), method
    assert (run / "plots" / "dpo_curves.png").is_file() and (run / "plots" / "ppo_curves.png").is_file()


def test_every_point_is_the_mean_of_its_samples_file_with_vader_recomputed_from_the_text(smoke):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    run = smoke[0]
    summary = _summary(run)
    points = summary["points"]
    assert {p["method"] for p in points} == set(METHODS)
    assert sorted(p.name for p in (run / "samples").glob("*.jsonl")) == sorted(
        Path(p["samples"]).name for p in points
    )
    for p in points:
        assert set(p) >= {"method", "checkpoint", "reward", "kl", "samples"}
        assert p["samples"] == f"samples/{p['method']}-{p['checkpoint']}.jsonl"
        rows = [json.loads(line) for line in (run / p["samples"]).read_text().splitlines()]
        assert len(rows) == 16  # the smoke preset's test prompts
        rewards = [
            vader.polarity_scores(r["completion"])["compound"] if r["completion"].strip() else 0.0
            for r in rows
        ]
        assert [r["reward"] for r in rows] == pytest.approx(rewards, abs=1e-12)
        assert p["reward"] == pytest.approx(math.fsum(rewards) / len(rows), abs=1e-12)
        assert p["kl"] == pytest.approx(math.fsum(r["kl"] for r in rows) / len(rows), abs=1e-12)
    table = {m["method"]: m for m in summary["methods"]}
    for method in METHODS:
        last = [p for p in points if p["method"] == method][-1]
        assert (table[method]["reward"], table[method]["kl"]) == (last["reward"], last["kl"])


def test_at_least_three_points_along_each_training_and_the_reference_has_zero_kl(smoke):
    points = _summary(smoke[0])["points"]
    for method in ("preferred-ft", "dpo", "ppo"):
        steps = [p["step"] for p in points if p["method"] == method]
        assert len(steps) >= 3 and steps == sorted(steps), (method, steps)
    (ref,) = [p for p in points if p["method"] == "reference"]
    assert abs(ref["kl"]) < 1e-4  # samples from pi_ref scored under pi_ref: the log-ratio is 0 up to rounding


def test_all_methods_are_evaluated_on_the_same_prompts_in_the_same_order(smoke):
    run = smoke[0]
    _, test = load_demo_prompts(None)
    for path in (run / "samples").glob("*.jsonl"):
        prompts = [json.loads(line)["prompt"] for line in path.read_text().splitlines()]
        assert prompts == test[:16], path.name


def test_html_report_is_self_contained_with_decodable_embedded_pngs(smoke):
    run = smoke[0]
    text = (run / "report.html").read_text()
    sources = re.findall(r"<img[^>]*src='([^']*)'", text)
    assert len(sources) == 3  # frontier, DPO curves, PPO curves
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"(src|href)=['\"](?!data:)", text)  # nothing fetched from elsewhere
    summary = _summary(run)
    assert summary["conclusion"] in text.replace("&#x27;", "'")
    for needle in (
        "Rafailov",
        "Hutto",
        "VADER",
        "held-out accuracy",
        "Machine and versions",
        "preset: smoke",
    ):
        assert needle in text, needle


def test_markdown_report_and_terminal_table_show_the_numbers(smoke):
    run, _, printed = smoke
    summary = _summary(run)
    md = (run / "report.md").read_text()
    for m in summary["methods"]:
        row = f"| {m['method']} | {m['checkpoint']} | {m['reward']:+.3f} | {m['kl']:.2f} |"
        assert row in md
        assert re.search(
            rf"^{re.escape(m['method'])}\s+{m['checkpoint']}\s+{re.escape(format(m['reward'], '+.3f'))}\s",
            printed,
            re.M,
        )
    for name in ("frontier", "dpo_curves", "ppo_curves"):
        assert f"(plots/{name}.png)" in md
    assert summary["conclusion"] in md and summary["conclusion"] in printed


def test_conclusion_is_computed_from_the_points(smoke):
    summary = _summary(smoke[0])
    assert summary["conclusion"] == frontier_sentence(summary["points"])
    assert summary["reward_model"]["heldout_accuracy"] is not None


def test_rerun_skips_complete_phases_and_a_changed_setting_reruns_what_depends_on_it(smoke, capsys):
    run = smoke[0]
    stamps = {p: p.stat().st_mtime_ns for p in (run / "samples").glob("*.jsonl")}
    assert main(["demo", "--preset", "smoke", "--output", str(run), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "running" not in err
    assert (
        err.count("skipped") == 7
    )  # tiny-model, preferences, reference, preferred-ft, dpo, reward-model, ppo
    assert {p: p.stat().st_mtime_ns for p in (run / "samples").glob("*.jsonl")} == stamps
    assert (
        main(["demo", "--preset", "smoke", "--output", str(run), "--no-progress", "--dpo-lr", "0.002"]) == 0
    )
    err = capsys.readouterr().err
    assert re.findall(r"^\[(\S+)\] running", err, re.M) == ["dpo"]
    assert _summary(run)["config"]["dpo_lr"] == 0.002


def test_sft_step_becomes_the_reference(tmp_path):
    """With --sft the model is first fine-tuned on its own continuations; that model is the reference the
    preferences are sampled from and DPO starts from."""
    import yaml

    run = tmp_path / "run"
    args = ["demo", "--preset", "smoke", "--output", str(run), "--no-progress", "--sft", "--methods", "dpo"]
    assert main(args) == 0
    assert (run / "runs" / "sft" / "model.safetensors").is_file()
    dpo_config = yaml.safe_load((run / "runs" / "dpo" / "config.yaml").read_text())
    assert dpo_config["model"] == str(run / "runs" / "sft")
    assert [m["method"] for m in _summary(run)["methods"]] == ["reference", "dpo"]


def test_presets_and_flags():
    frontier = config_for_preset("frontier")
    assert {"dpo-sweep", "ppo-gt", "ppo-kl-sweep", "best-of-n"} <= set(frontier.methods)
    assert config_for_preset("smoke", dpo_lr=0.5).dpo_lr == 0.5
    assert config_for_preset().methods == ["preferred-ft", "dpo", "ppo"]
    assert config_for_preset().dpo_beta == 0.1
