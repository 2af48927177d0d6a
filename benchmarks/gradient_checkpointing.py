"""Peak memory and time of `prefalign dpo` with and without --gradient-checkpointing, on a random model.

A random Llama (the SmolLM2 architecture; width, depth and the tiny test tokenizer set here, so nothing
is downloaded) and synthetic pairs with long completions, so that activations, which checkpointing
saves, are a visible part of the peak. Each run is a fresh process (model loading included), measured
as in ``dpo_vs_trl.py``: peak RSS of the process tree and wall time; the two runs alternate ``--repeat``
times and the first losses are printed (they must agree).

Usage:
    python benchmarks/gradient_checkpointing.py [--hidden 256] [--layers 8] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_vs_trl import measured  # noqa: E402


def prepare(workdir: Path, hidden: int, layers: int, pairs: int, repeat_text: int) -> tuple[Path, Path]:
    from prefalign.testing import synthetic_pairs, tiny_causal_lm, tiny_tokenizer, write_jsonl

    tok = tiny_tokenizer()
    model_dir = workdir / "model"
    tiny_causal_lm(tokenizer=tok, hidden_size=hidden, num_layers=layers, num_heads=8).save_pretrained(
        model_dir
    )
    tok.save_pretrained(model_dir)
    rows = [
        {
            **r,
            "chosen": " ".join([r["chosen"]] * repeat_text),
            "rejected": " ".join([r["rejected"]] * repeat_text),
        }
        for r in synthetic_pairs(pairs, seed=0)
    ]
    return model_dir, write_jsonl(workdir / "pairs.jsonl", rows)


def run(model_dir: Path, data: Path, out: Path, extra: list[str], steps: int) -> dict:
    cmd = [str(Path(sys.executable).with_name("prefalign")), "dpo", "--model", str(model_dir), "--data",
           str(data), "--output", str(out), "--batch-size", "8", "--max-length", "512", "--max-steps",
           str(steps), "--micro-batch-tokens", "8192", "--lr", "1e-5", "--no-progress", "--raw", *extra]  # fmt: skip
    res = measured(cmd)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    res["train_s"] = sum(m["step_s"] for m in metrics if "step_s" in m)
    res["first_loss"] = metrics[0]["loss"]
    res["last_loss"] = [m["loss"] for m in metrics if "loss" in m][-1]
    return res


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--repeat-text", type=int, default=12, help="completions are the synthetic ones x N")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir, data = prepare(work, args.hidden, args.layers, args.pairs, args.repeat_text)
        results: dict[str, list[dict]] = {"plain": [], "checkpointing": []}
        for i in range(args.repeat):
            for name, extra in (("plain", []), ("checkpointing", ["--gradient-checkpointing"])):
                results[name].append(run(model_dir, data, work / f"{name}-{i}", extra, args.steps))
        for name, runs in results.items():
            for r in runs:
                print(f"{name:14s} peak {r['peak_rss_mb']:7.0f} MB  wall {r['wall_s']:6.1f} s  "
                      f"train {r['train_s']:6.1f} s  first loss {r['first_loss']:.6f}  last {r['last_loss']:.6f}")  # fmt: skip


if __name__ == "__main__":
    main()
