"""prefalign's PPO iteration against a plain PPO-GT loop, side by side on the same weights and settings.

The plain loop is ``shared/bench/ppo_plain.py``: Hugging Face ``generate``, a value head on the policy's
trunk, VADER reward, 16 prompts x 32 new tokens per iteration, KL coefficient 0.05, 2 epochs of 2
minibatches, AdamW at a constant learning rate. prefalign runs

    prefalign ppo --model smollm2 --reward sentiment --raw --shared-value-head --rollout-batch 16
        --response-length 32 --ppo-epochs 2 --minibatches 2 --kl-coef 0.05 --lr-schedule constant

on the 128 training prompts of the plain script. Both are fresh processes; time per iteration is the
mean over the iterations after the first (warm-up), split into generate / score / reference+old/value
forward / update; peak RSS is the process's maximum resident set. A third measurement samples the same
16 prompts x 32 tokens (stop tokens ignored, so each makes exactly 512) with prefalign's sampler (its lean
decoder), with the same sampler over transformers' own KV-cache forward (``lean=False``: what the lean
decoder buys), and with Hugging Face ``generate``, in one process, interleaved, and reports tokens per second.

Usage:
    python benchmarks/ppo_iteration.py [--iterations 4] [--repeat 1] [--python PYTHON]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PREFALIGN_SHARED", REPO.parent / "shared"))
sys.path.insert(0, str(Path(__file__).parent))
from dpo_vs_trl import measured  # noqa: E402

SUBJECTS = ["This movie", "The film", "The acting", "The plot of this movie", "The ending", "The soundtrack",
            "This sequel", "The cast", "The script", "The special effects", "The story", "The main character",
            "The cinematography", "The dialogue", "The pacing", "The villain", "The romance", "The second half",
            "The opening scene", "The twist"]  # fmt: skip
VERBS = ["was", "is", "felt", "seemed", "turned out", "really", "made me", "left me"]


def train_prompts() -> list[str]:
    """The plain script's training prompts (its shuffle, its split)."""
    prompts = [f"{s} {v}" for s in SUBJECTS for v in VERBS]
    random.Random(0).shuffle(prompts)
    return prompts[32:]


def run_plain(python: str, model_dir: Path, iterations: int, lr: float) -> dict:
    res = measured([python, str(SHARED / "bench" / "ppo_plain.py"), str(model_dir), str(iterations), str(lr)])
    rows = re.findall(r"gen ([\d.]+)s update ([\d.]+)s total ([\d.]+)s", res["stdout"])
    gen, upd, tot = (statistics.mean(float(r[i]) for r in rows[1:]) for i in range(3))
    return {**res, "per_iter": tot, "generate": gen, "update": upd, "other": tot - gen - upd}


def run_ours(workdir: Path, iterations: int, lr: float) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    prompts = workdir / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in train_prompts()))
    out = workdir / "ours"
    cmd = [sys.executable, "-m", "prefalign", "ppo", "--model", "smollm2", "--prompts", str(prompts),
           "--output", str(out), "--reward", "sentiment", "--raw", "--shared-value-head",
           "--rollout-batch", "16", "--response-length", "32", "--ppo-epochs", "2", "--minibatches", "2",
           "--kl-coef", "0.05", "--lr", str(lr), "--lr-schedule", "constant", "--iterations", str(iterations),
           "--no-progress"]  # fmt: skip
    res = measured(cmd)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/iteration" in r][1:]
    mean = lambda k: statistics.mean(r[k] for r in rows)  # noqa: E731
    return {
        **res,
        "per_iter": mean("time/iteration"),
        "generate": mean("time/generate"),
        "update": mean("time/update"),
        "other": mean("time/iteration") - mean("time/generate") - mean("time/update"),
        "forward": mean("time/forward"),
    }


def sampler_speed(repeat: int = 3) -> dict:
    """Tokens/s of prefalign's sampler and of HF generate on 16 prompts x 32 forced tokens, interleaved."""
    import torch

    from prefalign.data import encode_prompt
    from prefalign.generation import SamplingSettings, generate
    from prefalign.models import load_policy, load_tokenizer

    tok, model = load_tokenizer("smollm2"), load_policy("smollm2")
    texts = train_prompts()[:16]
    ids = [encode_prompt(tok, t, raw=True) for t in texts]
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left")
    ours, stepped, hf = [], [], []
    for rep in range(repeat + 1):
        settings = SamplingSettings(max_new_tokens=32, temperature=1.0, seed=rep, stop_ids=())
        t = time.perf_counter()
        out = generate(model, tok, ids, settings)
        a = time.perf_counter() - t
        assert int(out.response_mask.sum()) == 16 * 32
        t = time.perf_counter()  # the same sampler over transformers' own KV-cache forward (HFStepper)
        plain = generate(model, tok, ids, settings, lean=False)
        c = time.perf_counter() - t
        assert int(plain.response_mask.sum()) == 16 * 32
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=32,
                           min_new_tokens=32, pad_token_id=tok.pad_token_id)  # fmt: skip
        b = time.perf_counter() - t
        if rep:  # the first round warms all three up
            ours.append(a)
            stepped.append(c)
            hf.append(b)
    return {
        "ours_tok_s": 512 / statistics.median(ours),
        "hf_step_tok_s": 512 / statistics.median(stepped),
        "hf_tok_s": 512 / statistics.median(hf),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--repeat", type=int, default=1, help="interleaved runs of each side")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the plain loop")
    args = parser.parse_args()
    from prefalign.models import fetch_builtin

    model_dir = fetch_builtin("smollm2")
    plain, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeat):
            plain.append(run_plain(args.python, model_dir, args.iterations, args.lr))
            print(
                f"plain: {plain[-1]['per_iter']:.2f} s/iter, peak {plain[-1]['peak_rss_mb']:.0f} MB",
                flush=True,
            )
            ours.append(run_ours(Path(tmp) / f"r{r}", args.iterations, args.lr))
            print(
                f"prefalign: {ours[-1]['per_iter']:.2f} s/iter, peak {ours[-1]['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    speed = sampler_speed()
    med = lambda runs, k: statistics.median(x[k] for x in runs)  # noqa: E731
    print(f"{'':10} {'s/iter':>8} {'generate':>9} {'update':>8} {'other':>7} {'peak MB':>8}")
    for name, runs in (("plain", plain), ("prefalign", ours)):
        print(f"{name:10} {med(runs, 'per_iter'):8.2f} {med(runs, 'generate'):9.2f} {med(runs, 'update'):8.2f} "
              f"{med(runs, 'other'):7.2f} {med(runs, 'peak_rss_mb'):8.0f}")  # fmt: skip
    print(f"prefalign forward (reference + critic) {med(ours, 'forward'):.2f} s/iter")
    print(f"ratio time per iteration: {med(ours, 'per_iter') / med(plain, 'per_iter'):.2f}x (goal <= 0.45x)")
    print(f"ratio peak memory: {med(ours, 'peak_rss_mb') / med(plain, 'peak_rss_mb'):.2f}x (goal <= 1.0x)")
    print(f"sampler: prefalign {speed['ours_tok_s']:.0f} tok/s, HF generate {speed['hf_tok_s']:.0f} tok/s, "
          f"{speed['ours_tok_s'] / speed['hf_tok_s']:.2f}x (goal >= 2x)")  # fmt: skip
    print(f"lean decoder: {speed['ours_tok_s']:.0f} tok/s against the same sampler over transformers' forward "
          f"{speed['hf_step_tok_s']:.0f} tok/s, {speed['ours_tok_s'] / speed['hf_step_tok_s']:.2f}x")  # fmt: skip
    print(json.dumps({"sampler": speed}))


if __name__ == "__main__":
    main()
