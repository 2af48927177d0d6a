"""prefalign's sampler against Hugging Face ``generate``, grouped as GRPO samples: G responses per prompt.

One process, one float32 SmolLM2-135M-Instruct, the same prompt token ids on both sides:

- prefalign: ``prefalign.generation.generate(model, tokenizer, ids, SamplingSettings(max_new_tokens=R,
  temperature=1.0, seed=0, stop_ids=()))`` with each prompt's ids repeated G times consecutively (the
  layout a GRPO rollout hands it). Where ``generate`` takes ``share_prompts`` it is timed both ways
  (``share_prompts=True``: each prompt's prefix computed once per group; False: once per row).
- Hugging Face: ``model.generate(input_ids, attention_mask, do_sample=True, temperature=1.0, top_k=0,
  top_p=1.0, max_new_tokens=R, min_new_tokens=R, num_return_sequences=G)`` on the left-padded batch of
  the U unique prompts (HF expands each prompt G times itself), pad token = the tokenizer's (EOS if none).

Stop tokens are ignored on both sides (``stop_ids=()``, ``min_new_tokens=R``), so every row makes exactly R
tokens and both sides do the same work whatever they sample. Shapes (``--shape``): ``long``, 4 prompts
of ``shared/bench/long_prompts.py`` (about 140 tokens) x 8 samples, 48 tokens (``grpo_vs_trl.py --shape
long``); ``short``, 8 of TRL's short prefixes x 4 samples, 32 tokens (``--shape short``). Each way is run
once to warm up, then ``--repeat`` times, interleaved, ``torch.manual_seed(0)`` before every run; best and
median seconds, tokens per second and the time ratio against HF are printed.

Usage:
    python benchmarks/sampler_vs_hf.py [--shape long,short] [--repeat 3] [--quick] [--json PATH]

``--quick`` is a smoke run: one timed repeat of 4 new tokens per shape.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_vs_trl import long_prompts, trl_prompts  # noqa: E402


@dataclass(frozen=True)
class Shape:
    prompts: int
    generations: int
    tokens: int


SHAPES = {"long": Shape(4, 8, 48), "short": Shape(8, 4, 32)}


def prompt_texts(shape: str) -> list[str]:
    return (
        long_prompts(64)[: SHAPES[shape].prompts]
        if shape == "long"
        else trl_prompts()[: SHAPES[shape].prompts]
    )


def left_padded(ids: list[list[int]], pad_id: int):
    import torch

    width = max(len(p) for p in ids)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
    return input_ids, mask


def runners(model, tok, ids: list[list[int]], groups: int, tokens: int) -> dict:
    """name -> a function that samples once and returns the number of generated tokens."""
    import torch

    from prefalign.generation import SamplingSettings, generate

    settings = SamplingSettings(max_new_tokens=tokens, temperature=1.0, seed=0, stop_ids=())
    repeated = [p for p in ids for _ in range(groups)]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model.generation_config.pad_token_id = pad_id
    input_ids, mask = left_padded(ids, pad_id)

    def ours(**kw):
        def run() -> int:
            out = generate(model, tok, repeated, settings, **kw)
            return int(out.response_mask.sum())

        return run

    def hf() -> int:
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                num_return_sequences=groups,
                pad_token_id=pad_id,
            )
        return int(out[:, input_ids.shape[1] :].numel())

    out = {}
    if "share_prompts" in inspect.signature(generate).parameters:
        out["prefalign share_prompts=True"] = ours(share_prompts=True)
        out["prefalign share_prompts=False"] = ours(share_prompts=False)
    else:
        out["prefalign"] = ours()
    out["hf generate"] = hf
    return out


def bench(model, tok, shape: str, tokens: int, repeat: int) -> dict:
    import torch

    from prefalign.data import encode_prompt

    s = SHAPES[shape]
    ids = [encode_prompt(tok, t, raw=True) for t in prompt_texts(shape)]
    ways = runners(model, tok, ids, s.generations, tokens)
    times: dict[str, list[float]] = {name: [] for name in ways}
    made: dict[str, int] = {}
    for rep in range(repeat + 1):  # round 0 warms every way up
        for name, run in ways.items():
            torch.manual_seed(0)
            t = time.perf_counter()
            made[name] = run()
            if rep:
                times[name].append(time.perf_counter() - t)
    expected = s.prompts * s.generations * tokens
    for name, n in made.items():
        if n != expected:
            print(f"warning: {name} made {n} tokens, expected {expected}")
    return {
        "shape": shape,
        "prompts": s.prompts,
        "generations": s.generations,
        "tokens": tokens,
        "prompt_tokens": [len(p) for p in ids],
        "runs": {
            name: {
                "best_s": min(t),
                "median_s": statistics.median(t),
                "all_s": [round(x, 3) for x in t],
                "tok_s": expected / statistics.median(t),
            }
            for name, t in times.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="long,short", help="comma-separated: long, short")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each way, after a warm-up")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, 4 new tokens")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    shapes = args.shape.split(",")
    for name in shapes:
        if name not in SHAPES:
            parser.error(f"unknown shape {name!r} (choose from {', '.join(SHAPES)})")

    import torch

    from prefalign.models import load_policy, load_tokenizer

    tok, model = load_tokenizer("smollm2"), load_policy("smollm2", dtype="float32")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, SmolLM2-135M float32")
    results = []
    for shape in shapes:
        tokens = 4 if args.quick else SHAPES[shape].tokens
        r = bench(model, tok, shape, tokens, 1 if args.quick else args.repeat)
        results.append(r)
        mean_prompt = statistics.fmean(r["prompt_tokens"])
        print(
            f"\nshape {shape}: {r['prompts']} prompts (mean {mean_prompt:.1f} tokens) x {r['generations']} "
            f"samples, {tokens} new tokens each (stop tokens ignored)"
        )
        hf = r["runs"]["hf generate"]
        print(f"  {'':<32}{'best s':>9}{'median s':>10}{'tok/s':>9}{'/ HF time':>11}  all (s)")
        for name, run in r["runs"].items():
            print(
                f"  {name:<32}{run['best_s']:>9.2f}{run['median_s']:>10.2f}{run['tok_s']:>9.0f}"
                f"{run['median_s'] / hf['median_s']:>10.2f}x  {run['all_s']}"
            )
    if len(results) and "prefalign" in results[0]["runs"]:
        print("\n(generate() has no share_prompts parameter yet: prefalign timed one way)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
