"""`prefalign demo --preset smoke`: the whole pipeline on a tiny random model, and the report's structure.

The demo runs once per module (about 20 s on two CPU cores); the tests read what it wrote. The numbers
of the table are recomputed from ``samples/*.jsonl``, rewards with VADER from the texts themselves.
"""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import pytest

from prefalign.cli import main
from prefalign.demo import config_for_preset, load_demo_prompts

METHODS = ("reference", "preferred-ft", "dpo", "ppo")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Run the smoke preset once; returns (run folder, terminal output)."""
    out = tmp_path_factory.mktemp("demo") / "run"
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["demo", "--preset", "smoke", "--output", str(out), "--no-progress"])
    assert code == 0
    return out, buffer.getvalue()


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_smoke_writes_every_output(smoke):
    run = smoke[0]
    for name in ("report.html", "report.md", "summary.json", "config.yaml", "plots/frontier.png"):
        assert (run / name).is_file(), name
    for method in ("preferred-ft", "dpo", "reward-model", "ppo"):
        assert (run / "runs" / method / "metrics.jsonl").is_file(), method
        assert (run / "runs" / method / "summary.json").is_file(), method
    assert (run / "plots" / "dpo_curves.png").is_file() and (run / "plots" / "ppo_curves.png").is_file()


def test_dpo_and_ppo_start_from_the_reference(smoke):
    """DPO's first step, with the policy still equal to the reference, has loss ln 2 and zero implicit
    rewards; PPO's first iteration samples from the reference, so its KL is 0. A run that started from
    another model, or scored the reference differently, would miss both."""
    run = smoke[0]

    def rows(method: str) -> list[dict]:
        return [
            json.loads(line) for line in (run / "runs" / method / "metrics.jsonl").read_text().splitlines()
        ]

    dpo = [r for r in rows("dpo") if "loss" in r][0]
    assert dpo["step"] == 1 and dpo["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert dpo["rewards/chosen"] == pytest.approx(0, abs=1e-6) and dpo["rewards/margins"] == pytest.approx(
        0, abs=1e-6
    )
    ppo = [r for r in rows("ppo") if "objective/kl" in r][0]
    assert ppo["step"] == 1 and ppo["objective/kl"] == pytest.approx(0, abs=1e-4)


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
        # the smoke preset's 16 test prompts, K samples each
        assert len(rows) == 16 * summary["config"]["eval_samples"]
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
    k = _summary(run)["config"]["eval_samples"]
    for path in (run / "samples").glob("*.jsonl"):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["prompt"] for r in rows] == [p for p in test[:16] for _ in range(k)], path.name
        assert [r["prompt_index"] for r in rows] == [i for i in range(16) for _ in range(k)], path.name


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
        "95% bootstrap interval (2,000 resamples of the prompts",
    ):
        assert needle in text, needle


def test_markdown_report_and_terminal_table_show_the_numbers(smoke):
    run, printed = smoke
    summary = _summary(run)
    md = (run / "report.md").read_text()
    for m in summary["methods"]:
        r_half = (m["reward_ci"][1] - m["reward_ci"][0]) / 2
        k_half = (m["kl_ci"][1] - m["kl_ci"][0]) / 2
        reward, kl = f"{m['reward']:+.3f} ±{r_half:.3f}", f"{m['kl']:.2f} ±{k_half:.2f}"
        assert f"| {m['method']} | {m['checkpoint']} | {reward} | {kl} |" in md
        assert re.search(
            rf"^{re.escape(m['method'])}\s+{m['checkpoint']}\s+{re.escape(reward)}\s", printed, re.M
        )
    for name in ("frontier", "dpo_curves", "ppo_curves"):
        assert f"(plots/{name}.png)" in md
    assert summary["conclusion"] in md and summary["conclusion"] in printed


def test_conclusion_states_what_the_points_show(smoke):
    """Worked out here from the points themselves: a PPO checkpoint is beaten when some DPO checkpoint has
    no more KL and a 95% reward interval wholly above its own; the sentence names the count and the best
    point of each, with its interval's half width. Every point carries its intervals, around its mean."""
    summary = _summary(smoke[0])
    for p in summary["points"]:
        assert p["reward_ci"][0] <= p["reward"] <= p["reward_ci"][1], p
        assert p["kl_ci"][0] <= p["kl"] <= p["kl_ci"][1], p
    dpo = [p for p in summary["points"] if p["method"] == "dpo"]
    ppo = [p for p in summary["points"] if p["method"] == "ppo"]

    def beats(a, b):
        return a["kl"] <= b["kl"] and a["reward_ci"][0] > b["reward_ci"][1]

    beaten = sum(any(beats(d, p) for d in dpo) for p in ppo)
    reverse = all(any(beats(p, d) for p in ppo) for d in dpo)
    text = summary["conclusion"]
    for name, points in (("DPO", dpo), ("PPO", ppo)):
        best = max(points, key=lambda p: p["reward"])
        half = (best["reward_ci"][1] - best["reward_ci"][0]) / 2
        assert f"best {name} reward {best['reward']:.3f} ±{half:.3f} at KL {best['kl']:.2f}" in text, text
    if beaten == len(ppo):
        assert text.startswith(f"Here DPO's frontier dominates PPO's: each of the {len(ppo)} PPO checkpoints")
    elif reverse:
        assert text.startswith(f"Here PPO's frontier dominates DPO's: each of the {len(dpo)} DPO checkpoints")
    else:
        assert f"beyond noise: {beaten} of {len(ppo)} PPO checkpoints are beaten" in text, text
    held_out = summary["reward_model"]  # a share of whole pairs
    assert held_out["heldout_pairs"] > 0
    correct = held_out["heldout_accuracy"] * held_out["heldout_pairs"]
    assert correct == pytest.approx(round(correct), abs=1e-9)


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


def test_a_phase_two_methods_share_runs_once_and_counts_as_this_invocations(tmp_path):
    """PPO and Best-of-N both use the reward model: it trains once, and the record of a fresh run says
    so (it once read as skipped, and the report then said a phase came from an earlier invocation)."""
    run = tmp_path / "run"
    args = ["demo", "--preset", "smoke", "--output", str(run), "--no-progress", "--methods", "ppo,best-of-n"]
    assert main(args) == 0
    phases = _summary(run)["phases"]
    assert "best-of-2" in phases and phases["reward-model"]["skipped"] is False
    assert not any(p["skipped"] for p in phases.values())
    assert "earlier invocation" not in (run / "report.md").read_text()


def test_presets_and_flags():
    frontier = config_for_preset("frontier")
    assert {"dpo-sweep", "ppo-gt", "ppo-kl-sweep", "best-of-n"} <= set(frontier.methods)
    assert config_for_preset("smoke", dpo_lr=0.5).dpo_lr == 0.5
    assert config_for_preset().methods == ["preferred-ft", "dpo", "ppo"]
    assert config_for_preset().dpo_beta == 0.1


# ---- the run folder: the same rules as every training command's --output ------------------------------


@pytest.fixture
def other_run(tmp_path) -> Path:
    """A folder holding another command's run (an SFT run's config, metrics and summary)."""
    folder = tmp_path / "sft-run"
    folder.mkdir()
    (folder / "config.yaml").write_text("model: tiny\ndata: pairs.jsonl\noutput: sft-run\nlr: 0.001\n")
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n')
    (folder / "summary.json").write_text('{"steps": 1}\n')
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_holding_another_commands_run_is_refused(other_run, capsys):
    """The demo used to overwrite the SFT run's config.yaml and summary.json and exit 0. Now it is refused
    as every training command refuses it: one line, exit 2, nothing in the folder touched."""
    before = _files(other_run)
    assert main(["demo", "--preset", "smoke", "--output", str(other_run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(
        f"prefalign demo: error: {other_run} already holds a run of another command "
        "(config.yaml, metrics.jsonl, summary.json): pass --overwrite to replace it"
    ), err
    assert _files(other_run) == before


def test_an_output_that_is_a_file_is_refused(tmp_path, capsys):
    """A FileExistsError traceback before; now the line every command gives."""
    afile = tmp_path / "afile"
    afile.write_text("notes")
    for output, why in ((afile, "is a file"), (afile / "run", f"lies under the file {afile}")):
        assert main(["demo", "--preset", "smoke", "--output", str(output), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err == f"prefalign demo: error: output {output} {why}; give a folder\n", err
    assert afile.read_text() == "notes"


class _Stop(Exception):
    """Raised by the first phase in the tests below: what matters is the folder it finds."""


def _stop_at_first_phase(monkeypatch) -> list[Path]:
    """Make the demo stop where its first phase would start; returns the folders listed at that moment."""
    seen: list[Path] = []

    def first_phase(demo):
        seen.extend(sorted(p.name for p in demo.out.iterdir()))
        raise _Stop

    monkeypatch.setattr("prefalign.demo.reference.build_smoke_model", first_phase)
    return seen


def test_overwrite_replaces_another_commands_run(other_run, monkeypatch):
    """With --overwrite the other run's files are removed (others left alone) and the demo's config written."""
    (other_run / "notes.txt").write_text("mine")
    seen = _stop_at_first_phase(monkeypatch)
    with pytest.raises(_Stop):
        main(["demo", "--preset", "smoke", "--output", str(other_run), "--no-progress", "--overwrite"])
    assert seen == ["config.yaml", "notes.txt"]
    assert "preset: smoke" in (other_run / "config.yaml").read_text()


def test_overwrite_of_a_demo_run_starts_it_afresh_and_a_rerun_keeps_it(smoke, tmp_path, monkeypatch):
    """A demo's own folder is not refused: a plain rerun finds every phase where it was (the rerun test
    above skips them all), --overwrite removes the demo's outputs so every phase runs again."""
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(smoke[0], run)
    (run / "notes.txt").write_text("mine")
    seen = _stop_at_first_phase(monkeypatch)
    with pytest.raises(_Stop):
        main(["demo", "--preset", "smoke", "--output", str(run), "--no-progress"])
    assert {"runs", "samples", "summary.json", "preferences", "tiny-model"} <= set(seen)
    seen.clear()
    with pytest.raises(_Stop):
        main(["demo", "--preset", "smoke", "--output", str(run), "--no-progress", "--overwrite"])
    assert seen == ["config.yaml", "notes.txt"]


def test_what_dpo_learned_of_the_preferences_is_reported(smoke):
    """DPO's held-out loss and implicit-reward accuracy come from its run's final evaluation on the held-out
    pairs (the run folder's summary.json) and are stated in the report beside its reward."""
    run = smoke[0]
    summary = _summary(run)
    (dpo,) = [m for m in summary["methods"] if m["method"] == "dpo"]
    final_eval = json.loads((run / "runs" / "dpo" / "summary.json").read_text())["eval"]
    assert dpo["heldout_loss"] == final_eval["val/loss"]
    assert dpo["heldout_accuracy"] == final_eval["val/rewards/accuracies"]
    assert not any("heldout_loss" in m for m in summary["methods"] if m["method"] == "ppo")
    text = (run / "report.md").read_text()
    assert f"What dpo learned of the preferences: held-out loss {dpo['heldout_loss']:.3f}" in text


def test_seeds_repeat_the_experiment_and_report_the_spread(tmp_path, capsys):
    """--seeds 3,4: two complete runs in seed-3 and seed-4 whose preferences differ (another seed draws other
    samples), and seeds.json holding each method's final point per seed with the mean and spread across
    them, worked out here from the two runs' own summaries."""
    out = tmp_path / "seeds"
    assert main(["demo", "--preset", "smoke", "--seeds", "3,4", "--output", str(out), "--no-progress"]) == 0
    runs = {s: _summary(out / f"seed-{s}") for s in (3, 4)}
    assert runs[3]["config"]["seed"] == 3 and runs[4]["config"]["seed"] == 4
    assert runs[3]["preferences"] != runs[4]["preferences"]
    result = json.loads((out / "seeds.json").read_text())
    assert result["seeds"] == [3, 4]
    for m in runs[3]["methods"]:
        rewards = [
            next(x for x in runs[s]["methods"] if x["method"] == m["method"])["reward"] for s in (3, 4)
        ]
        entry = result["methods"][m["method"]]
        assert [entry["per_seed"][str(s)]["reward"] for s in (3, 4)] == rewards
        assert entry["reward"]["mean"] == pytest.approx(sum(rewards) / 2)
        assert entry["reward"]["std"] == pytest.approx(abs(rewards[0] - rewards[1]) / 2**0.5)
    printed = capsys.readouterr().out
    assert "| dpo |" in printed and "reward mean ± sd" in printed
