"""prefalign DPO vs TRL's DPOTrainer, side by side in one run, on the same weights and data.

Both sides: the bundled SmolLM2-135M-Instruct (float32), the same 64 conversational pairs from
``shared/bench/make_pairs.py 64 --chat``, batch 8, beta 0.1, lr 1e-6, linear decay, no warm-up, max
length 256, one epoch, float32, no gradient checkpointing. TRL runs from its own virtual environment
(``--peers``, default ``~/.cache/peers``) so it never becomes a prefalign dependency.

Each run is a fresh process, timed from start to exit (model loading included); peak RSS is that
process tree's maximum resident set. Prints per-run figures and the ratios prefalign / TRL.

Usage:
    python benchmarks/dpo_vs_trl.py [--pairs 64] [--peers ~/.cache/peers] [--variants default,frozen-ref,checkpointing]
                                    [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PREFALIGN_SHARED", REPO.parent / "shared"))

MEASURE = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
wall = time.perf_counter() - t
print(json.dumps({"rc": proc.returncode, "wall_s": wall,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "stdout": proc.stdout[-4000:], "stderr": proc.stderr[-4000:]}))
"""


def measured(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``cmd`` in a fresh measuring process; its RUSAGE_CHILDREN holds only this run's peak RSS."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{result['stderr']}")
    return result


def prepare(workdir: Path, n_pairs: int) -> tuple[Path, Path]:
    from prefalign.models import fetch_builtin

    model_dir = fetch_builtin("smollm2")
    pairs = workdir / "pairs.jsonl"
    text = subprocess.run(
        [sys.executable, str(SHARED / "bench" / "make_pairs.py"), str(n_pairs), "--chat"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pairs.write_text(text)
    return model_dir, pairs


def run_trl(peers: Path, model_dir: Path, pairs: Path) -> dict:
    res = measured(
        [
            str(peers / "bin" / "python"),
            str(SHARED / "bench" / "trl_dpo.py"),
            str(model_dir),
            str(pairs),
            "8",
        ],
        env={**os.environ, "TRL_BF16": "0", "TRL_GC": "0"},
    )
    m = re.search(r"train_s=([\d.]+) steps=(\d+)", res["stdout"])
    losses = re.search(r"losses \[([^\]]*)\]", res["stdout"])
    res["train_s"], res["steps"] = float(m.group(1)), int(m.group(2))
    res["first_loss"] = float(losses.group(1).split(",")[0]) if losses else float("nan")
    return res


def run_prefalign(model_dir: Path, pairs: Path, out: Path, extra: list[str]) -> dict:
    cmd = [
        str(Path(sys.executable).with_name("prefalign")),
        "dpo",
        "--model",
        str(model_dir),
        "--data",
        str(pairs),
        "--output",
        str(out),
        "--batch-size",
        "8",
        "--beta",
        "0.1",
        "--lr",
        "1e-6",
        "--lr-schedule",
        "linear",
        "--max-length",
        "256",
        "--epochs",
        "1",
        "--no-progress",
        *extra,
    ]
    res = measured(cmd)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    res["train_s"] = sum(m["step_s"] for m in metrics if "step_s" in m)
    res["steps"] = summary["steps"]
    res["first_loss"] = metrics[0]["loss"]
    return res


VARIANTS = {
    "default": [],
    "frozen-ref": ["--no-precompute-ref"],
    "checkpointing": ["--gradient-checkpointing"],
}


def median_run(runs: list[dict]) -> dict:
    """The run with the median whole-run time (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: r["wall_s"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["all_wall_s"] = [round(r["wall_s"], 1) for r in runs]
    chosen["max_peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--peers", type=Path, default=Path.home() / ".cache" / "peers")
    parser.add_argument("--variants", default="default,frozen-ref")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per side, interleaved; the median is reported"
    )
    parser.add_argument("--skip-trl", action="store_true", help="only run prefalign (no ratios)")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir, pairs = prepare(work, args.pairs)
        for rep in range(args.repeat):
            if not args.skip_trl:
                runs.setdefault("trl", []).append(run_trl(args.peers, model_dir, pairs))
            for name in args.variants.split(","):
                out = work / f"{name}-{rep}"
                runs.setdefault(f"prefalign-{name}", []).append(
                    run_prefalign(model_dir, pairs, out, VARIANTS[name])
                )
    rows = {name: median_run(r) for name, r in runs.items()}
    print(f"{'run':<24}{'whole run s':>12}{'s/step':>9}{'peak RSS MB':>13}{'first loss':>12}  all runs (s)")
    for name, r in rows.items():
        print(
            f"{name:<24}{r['wall_s']:>12.1f}{r['train_s'] / r['steps']:>9.2f}{r['max_peak_rss_mb']:>13.0f}"
            f"{r['first_loss']:>12.4f}  {r['all_wall_s']}"
        )
    if "trl" in rows:
        trl = rows["trl"]
        for name, r in rows.items():
            if name != "trl":
                print(
                    f"{name}: time ratio {r['wall_s'] / trl['wall_s']:.2f}x, "
                    f"memory ratio {r['max_peak_rss_mb'] / trl['max_peak_rss_mb']:.2f}x (prefalign / TRL, medians of "
                    f"whole-run time, highest peak RSS)"
                )


if __name__ == "__main__":
    main()
