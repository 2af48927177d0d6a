"""The least time this machine's float32 arithmetic and memory traffic allow for each online benchmark.

First it measures the machine: the float32 matmul rate (GFLOP/s) of ``torch.nn.functional.linear`` at
the shapes SmolLM2-135M uses, ``(rows x 576) @ (576 x 1536)``, ``(rows x 576) @ (576 x 576)``,
``(rows x 1536) @ (1536 x 576)`` and ``(rows x 576) @ (576 x 49152)`` for rows in {16, 32, 512, 2048}
(16 and 32 are the decode batch shapes: one new token per sequence), best of ``--repeat`` timings after
a warm-up, at torch's default thread count; and the memory bandwidth (GB/s), best of repeats, of reading a
512 MB float32 tensor (``x.sum()``) and of copying it (read + write bytes counted).

Then, from the model's config (layers L, hidden H, intermediate I, query width Hq = heads x head_dim,
key/value width Hkv, vocabulary V), it counts the work each benchmark cannot avoid:

- ``forward_flops(tokens, context, logits_tokens) = tokens x (2 x P + 4 x L x Hq x context)
  + 2 x H x V x logits_tokens``, with P the non-embedding matmul weights (per layer the q, k, v, o
  projections and the three MLP matrices), ``context`` the mean number of key positions a token attends
  to (itself included; scores and the weighted sum of values are 2 x Hq FLOPs per key each), and
  ``logits_tokens`` the positions whose output-layer logits are needed. Backward = 2 x forward.
- A forward pass over a batch takes ``max(compute, weight bytes / bandwidth)`` where compute adds, for
  each matmul kind, its FLOPs over the rate measured at that kind's shape for the batch's row count
  (the largest measured row count not above it; the smallest measured one below that); attention
  FLOPs use the ``576 x 576`` rate. Weight bytes are every matmul weight plus the output layer (tied to
  the embedding here, so counted once), float32. Forward + backward: 3 x both terms.
- One prompt of p tokens with responses of R_k tokens, forward for log-probs: the last response token
  is never fed (its output predicts past the end). Shared (the work that must be done): the prompt's
  p positions once, then R_k - 1 positions per response attending to the prompt's keys; logits at the
  last prompt position once and at every fed response position: ``1 + sum(R_k - 1)``. Unshared (for
  information: what a batch that repeats the prompt once per sample does): each sample is its own
  sequence of p + R_k - 1 positions, logits at its R_k positions that predict response tokens.
- Sampling G responses of R tokens to each of U prompts (N = U x G rows): a prefill of the prompts (once
  per prompt shared, G times unshared; logits only at the last prompt position), then R - 1 decode steps
  (the prefill's logits give the first token). Step j feeds one token per row, each attending p + j keys;
  it takes ``max(compute at N rows, (weight bytes + KV cache bytes read) / bandwidth)``, the KV cache
  being 2 x L x Hkv x 4 bytes a position: shared, each prompt's positions are read once per group (the
  G queries of a group can read one copy) and each row's own response positions; unshared, every row
  reads all its p + j positions. Responses are taken to run to the length cap (as they mostly do with
  the VADER reward and no stop in sight).
- The optimiser: one AdamW step reads parameters, gradients and both moments and writes parameters and
  both moments: 7 x 4 bytes per trainable parameter, over the bandwidth, added after the backward.
- Rewards (VADER), tokenisation, logging, data movement between steps and model loading count as zero.

Benchmarks (per step or iteration, and for the benchmark's default number of them):

- GRPO short (``grpo_vs_trl.py --shape short``): 8 prompts x 4 samples, TRL's short prefixes, 32
  tokens, beta 0.04: sampling + reference forward + policy forward/backward + one AdamW step (one
  pass per batch, so old log-probs are the sampler's). 8 steps.
- GRPO long (``--shape long``): 4 prompts x 8 samples of ``long_prompts.py`` (mean prompt length
  measured with the tokenizer), 48 tokens. 6 steps.
- PPO (``ppo_iteration.py``): 16 prompts x 32 tokens (one sample per prompt, so nothing to share),
  reference forward, 2 epochs of forward/backward over the batch in 2 minibatches (4 AdamW steps); the
  old log-probs and, with the shared value head, the old values come from the sampling pass. 4
  iterations.
- DPO (``dpo_vs_trl.py``): the 64 conversational pairs of ``make_pairs.py 64 --chat`` tokenised as
  prefalign does (``encode_preference``, max length 256), batches of 8: reference forward (prefalign
  precomputes it: the same FLOPs once per pair) and policy forward/backward over chosen and rejected
  (sharing: the prompt once per pair), one AdamW step per batch. One epoch of 8 steps.

Usage:
    python benchmarks/floor.py [--quick] [--repeat 5] [--json PATH]

``--quick`` measures fewer shapes (rows 16, 32, 512) once each and bandwidth on 64 MB: a smoke run, its
rates rough. The machine should otherwise be idle: the floors scale with the measured rates.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_vs_trl import SHARED  # noqa: E402

FLOAT = 4  # bytes
KINDS = {  # matmul kind -> (in, out): the shapes the model's linear layers have
    "576x1536": (576, 1536),
    "576x576": (576, 576),
    "1536x576": (1536, 576),
    "576x49152": (576, 49152),
}
ROWS = (16, 32, 512, 2048)
QUICK_ROWS = (16, 32, 512)


# --------------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------------


def machine_facts() -> dict:
    import torch

    cpu = platform.processor() or "unknown"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("unknown", "x86_64", ""):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        "simd": simd,
        "python": platform.python_version(),
    }


def _best(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure_matmul(rows: tuple[int, ...], repeat: int) -> dict[str, dict[int, float]]:
    """GFLOP/s of ``F.linear(x [rows, in], w [out, in])`` (the model's own op), best of ``repeat``."""
    import torch
    import torch.nn.functional as F

    rates: dict[str, dict[int, float]] = {}
    with torch.no_grad():
        for kind, (fan_in, fan_out) in KINDS.items():
            w = torch.randn(fan_out, fan_in) * 0.02
            rates[kind] = {}
            for m in rows:
                x = torch.randn(m, fan_in)
                t = _best(lambda x=x, w=w: F.linear(x, w), repeat)
                rates[kind][m] = 2 * m * fan_in * fan_out / t / 1e9
    return rates


def measure_bandwidth(megabytes: int, repeat: int) -> dict[str, float]:
    """GB/s of reading (``x.sum()``) and of copying (read + write bytes) a float32 tensor."""
    import torch

    n = megabytes * 2**20 // FLOAT
    x = torch.rand(n)
    y = torch.empty_like(x)
    nbytes = n * FLOAT
    read = nbytes / _best(lambda: x.sum(), repeat) / 1e9
    copy = 2 * nbytes / _best(lambda: y.copy_(x), repeat) / 1e9
    return {"read_gb_s": read, "copy_gb_s": copy, "megabytes": megabytes}


# --------------------------------------------------------------------------------------------------
# The model's arithmetic
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    layers: int = 30
    hidden: int = 576
    intermediate: int = 1536
    heads: int = 9
    kv_heads: int = 3
    head_dim: int = 64
    vocab: int = 49152
    tied: bool = True

    @classmethod
    def from_config(cls, path: Path) -> ModelShape:
        c = json.loads((path / "config.json").read_text())
        return cls(
            layers=c["num_hidden_layers"],
            hidden=c["hidden_size"],
            intermediate=c["intermediate_size"],
            heads=c["num_attention_heads"],
            kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
            head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
            vocab=c["vocab_size"],
            tied=bool(c.get("tie_word_embeddings", False)),
        )

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_matmuls(self) -> list[tuple[str, int, int]]:
        """(measured kind, in, out) of each linear layer of one decoder layer."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_width, self.kv_width
        return [
            ("576x576", h, q),  # q
            ("576x576", h, kv),  # k
            ("576x576", h, kv),  # v
            ("576x576", q, h),  # o
            ("576x1536", h, i),  # gate
            ("576x1536", h, i),  # up
            ("1536x576", i, h),  # down
        ]

    @property
    def matmul_params(self) -> int:
        """Non-embedding matmul weights (P)."""
        return self.layers * sum(a * b for _, a, b in self.layer_matmuls())

    @property
    def trainable_params(self) -> int:
        norms = (2 * self.layers + 1) * self.hidden
        return self.matmul_params + self.vocab * self.hidden * (1 if self.tied else 2) + norms

    @property
    def weight_bytes(self) -> int:
        """Bytes one forward pass reads: every matmul weight and the output layer, float32."""
        return (self.matmul_params + self.vocab * self.hidden) * FLOAT

    @property
    def kv_bytes_per_position(self) -> int:
        return 2 * self.layers * self.kv_width * FLOAT

    def forward_flops(self, tokens: float, context: float, logits_tokens: float) -> float:
        """FLOPs of a forward pass over ``tokens`` positions attending to ``context`` keys each on average,
        with output-layer logits at ``logits_tokens`` positions."""
        per_token = 2 * self.matmul_params + 4 * self.layers * self.q_width * context
        return tokens * per_token + 2 * self.hidden * self.vocab * logits_tokens


@dataclass
class Work:
    """A forward pass's extent: positions fed, key positions attended (summed over them), logit rows."""

    tokens: float = 0.0
    keys: float = 0.0
    logits: float = 0.0

    def __add__(self, other: Work) -> Work:
        return Work(self.tokens + other.tokens, self.keys + other.keys, self.logits + other.logits)

    def __mul__(self, k: float) -> Work:
        return Work(self.tokens * k, self.keys * k, self.logits * k)


def sequence_work(p: float, responses: list[int], shared: bool) -> Work:
    """Forward for the log-probs of ``responses`` (lengths R_k) to one prompt of ``p`` tokens."""
    if shared:
        fed = [r - 1 for r in responses]
        return Work(
            p + sum(fed),
            p * (p + 1) / 2 + sum(f * p + f * (f + 1) / 2 for f in fed),
            1 + sum(fed),
        )
    lengths = [p + r - 1 for r in responses]
    return Work(sum(lengths), sum(n * (n + 1) / 2 for n in lengths), sum(responses))


class Floor:
    """Times of forward passes, decode steps and optimiser steps at this machine's measured rates."""

    def __init__(self, model: ModelShape, rates: dict[str, dict[int, float]], bandwidth: float):
        self.model, self.rates, self.bandwidth = model, rates, bandwidth

    def rate(self, kind: str, rows: float) -> float:
        """GFLOP/s of ``kind`` at the largest measured row count <= rows (else the smallest)."""
        table = self.rates[kind]
        below = [m for m in table if m <= rows]
        return table[max(below) if below else min(table)] * 1e9

    def compute_s(self, work: Work) -> float:
        m = self.model
        t = sum(
            2 * work.tokens * a * b * m.layers / self.rate(kind, work.tokens)
            for kind, a, b in m.layer_matmuls()
        )
        t += 4 * m.layers * m.q_width * work.keys / self.rate("576x576", work.tokens)
        if work.logits:
            t += 2 * m.hidden * m.vocab * work.logits / self.rate("576x49152", work.logits)
        return t

    def flops(self, work: Work) -> float:
        context = work.keys / work.tokens if work.tokens else 0.0
        return self.model.forward_flops(work.tokens, context, work.logits)

    def forward_s(self, work: Work, passes: int = 1) -> float:
        """``passes`` = 1: a forward; 3: forward + backward."""
        return passes * max(self.compute_s(work), self.model.weight_bytes / self.bandwidth)

    def decode_s(self, work: Work, kv_positions: float) -> float:
        traffic = self.model.weight_bytes + kv_positions * self.model.kv_bytes_per_position
        return max(self.compute_s(work), traffic / self.bandwidth)

    def optimizer_s(self, steps: int) -> float:
        return steps * 7 * FLOAT * self.model.trainable_params / self.bandwidth


def _mean(values: list[float]) -> float:
    return statistics.fmean(values)


def rl_step(
    floor: Floor,
    prompt_lengths: list[int],
    prompts: int,
    generations: int,
    response: int,
    shared: bool,
    update_passes: int = 1,
    optimizer_steps: int = 1,
    reference: bool = True,
) -> dict[str, dict[str, float]]:
    """Floor of one on-policy step: sample, reference forward, ``update_passes`` forward+backward passes.

    Per-prompt counts are averaged over ``prompt_lengths`` (the benchmark's prompts) and scaled to
    ``prompts`` prompts per step."""
    n_rows = prompts * generations
    share = shared and generations > 1
    avg = lambda fn: _mean([fn(p) for p in prompt_lengths]) * prompts  # noqa: E731
    # prefill: the prompt once per group (shared) or once per row, logits at its last position only
    prefill = Work(
        avg(lambda p: p * (1 if share else generations)),
        avg(lambda p: p * (p + 1) / 2 * (1 if share else generations)),
        prompts if share else n_rows,
    )
    parts: dict[str, dict[str, float]] = {}

    def add(name: str, seconds: float, flops: float) -> None:
        parts[name] = {"s": seconds, "gflop": flops / 1e9}

    add("sampling: prefill", floor.forward_s(prefill), floor.flops(prefill))
    decode_s = decode_flops = 0.0
    mean_p = _mean(prompt_lengths)  # decode counts are linear in p: the mean length gives the mean
    for j in range(1, response):
        step = Work(n_rows, n_rows * (mean_p + j), n_rows)
        kv = prompts * mean_p + n_rows * j if share else n_rows * (mean_p + j)
        decode_s += floor.decode_s(step, kv)
        decode_flops += floor.flops(step)
    add(f"sampling: decode x{response - 1}", decode_s, decode_flops)
    seq = Work()
    for p in prompt_lengths:
        seq = seq + sequence_work(p, [response] * generations, share)
    seq = seq * (prompts / len(prompt_lengths))
    if reference:
        add("reference forward", floor.forward_s(seq), floor.flops(seq))
    add(
        "update: forward+backward" + (f" x{update_passes}" if update_passes > 1 else ""),
        update_passes * floor.forward_s(seq, passes=3),
        update_passes * 3 * floor.flops(seq),
    )
    add(f"update: AdamW x{optimizer_steps}", floor.optimizer_s(optimizer_steps), 0.0)
    return parts


def dpo_epoch(floor: Floor, pairs: list[tuple[int, int, int]], batch: int, shared: bool) -> dict:
    """Floor of one DPO epoch: per batch a reference forward and a policy forward+backward, one AdamW step."""
    ref_s = upd_s = flops = 0.0
    for i in range(0, len(pairs), batch):
        work = Work()
        for p, c, r in pairs[i : i + batch]:
            work = work + sequence_work(p, [c, r], shared)
        ref_s += floor.forward_s(work)
        upd_s += floor.forward_s(work, passes=3)
        flops += floor.flops(work)
    steps = -(-len(pairs) // batch)
    return {
        "reference forward": {"s": ref_s, "gflop": flops / 1e9},
        "update: forward+backward": {"s": upd_s, "gflop": 3 * flops / 1e9},
        f"update: AdamW x{steps}": {"s": floor.optimizer_s(steps), "gflop": 0.0},
    }


# --------------------------------------------------------------------------------------------------
# The benchmarks' data
# --------------------------------------------------------------------------------------------------


def benchmark_data() -> dict:
    """Token counts of each benchmark's prompts (and DPO's pairs), tokenised as prefalign does."""
    from grpo_vs_trl import long_prompts, trl_prompts
    from ppo_iteration import train_prompts
    from prefalign.data import encode_preference, encode_prompt
    from prefalign.models import load_tokenizer

    tok = load_tokenizer("smollm2")
    raw = lambda texts: [len(encode_prompt(tok, t, raw=True)) for t in texts]  # noqa: E731
    rows = subprocess.run(
        [sys.executable, str(SHARED / "bench" / "make_pairs.py"), "64", "--chat"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pairs = []
    for line in rows.splitlines():
        enc = encode_preference(tok, json.loads(line), max_length=256)
        pairs.append(
            (
                len(enc["prompt_input_ids"]),
                len(enc["chosen_input_ids"]),
                len(enc["rejected_input_ids"]),
            )
        )
    return {
        "grpo_short": raw(trl_prompts()),
        "grpo_long": raw(long_prompts(64)),
        "ppo": raw(train_prompts()),
        "dpo": pairs,
    }


def floors(floor: Floor, data: dict) -> dict:
    out = {}
    specs = {
        "grpo_short": dict(
            title="GRPO short (grpo_vs_trl.py --shape short)", prompts=8, generations=4, response=32, steps=8
        ),
        "grpo_long": dict(
            title="GRPO long (grpo_vs_trl.py --shape long)", prompts=4, generations=8, response=48, steps=6
        ),
        "ppo": dict(
            title="PPO iteration (ppo_iteration.py)",
            prompts=16,
            generations=1,
            response=32,
            steps=4,
            update_passes=2,
            optimizer_steps=4,
        ),
    }
    for name, spec in specs.items():
        lengths = data[name]
        kw = {k: spec[k] for k in ("update_passes", "optimizer_steps") if k in spec}
        row = {
            "title": spec["title"],
            "shape": f"{spec['prompts']} prompts x {spec['generations']} samples, prompt "
            f"{_mean(lengths):.1f} tokens (mean of {len(lengths)}), {spec['response']} response tokens",
            "steps": spec["steps"],
        }
        for mode, shared in (("shared", True), ("unshared", False)):
            parts = rl_step(
                floor, lengths, spec["prompts"], spec["generations"], spec["response"], shared, **kw
            )
            row[mode] = parts
        out[name] = row
    pairs = data["dpo"]
    out["dpo"] = {
        "title": "DPO epoch (dpo_vs_trl.py)",
        "shape": f"{len(pairs)} pairs, batch 8, prompt {_mean([p for p, _, _ in pairs]):.1f} tokens, chosen "
        f"{_mean([c for _, c, _ in pairs]):.1f}, rejected {_mean([r for _, _, r in pairs]):.1f} (means)",
        "steps": -(-len(pairs) // 8),
        "per": "epoch",
        "shared": dpo_epoch(floor, pairs, 8, True),
        "unshared": dpo_epoch(floor, pairs, 8, False),
    }
    for row in out.values():
        for mode in ("shared", "unshared"):
            total = sum(v["s"] for v in row[mode].values())
            gflop = sum(v["gflop"] for v in row[mode].values())
            if row.get("per") == "epoch":  # DPO parts are for the whole epoch
                row[mode]["per step"] = {"s": total / row["steps"], "gflop": gflop / row["steps"]}
                row[mode]["whole benchmark"] = {"s": total, "gflop": gflop}
            else:
                row[mode]["per step"] = {"s": total, "gflop": gflop}
                row[mode]["whole benchmark"] = {"s": total * row["steps"], "gflop": gflop * row["steps"]}
    return out


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a fast smoke run: fewer shapes, one timing")
    parser.add_argument("--repeat", type=int, default=5, help="timings per shape (the best counts)")
    parser.add_argument("--json", type=Path, default=None, help="also write everything as JSON here")
    args = parser.parse_args()
    repeat = 1 if args.quick else args.repeat
    rows = QUICK_ROWS if args.quick else ROWS

    from prefalign.models import fetch_builtin

    facts = machine_facts()
    print(
        f"machine: {facts['cpu']} ({', '.join(facts['simd']) or 'no AVX2'}), torch {facts['torch']}, "
        f"{facts['threads']} threads, python {facts['python']}"
        + (" [--quick: rough rates]" if args.quick else "")
    )
    model = ModelShape.from_config(fetch_builtin("smollm2"))
    rates = measure_matmul(rows, repeat)
    bw = measure_bandwidth(64 if args.quick else 512, max(repeat, 2))
    bandwidth = max(bw["read_gb_s"], bw["copy_gb_s"]) * 1e9
    print(f"float32 matmul GFLOP/s, F.linear(x [rows, in], w [out, in]), best of {repeat}:")
    print(f"  {'in x out':<12}" + "".join(f"{f'rows {m}':>11}" for m in rows))
    for kind, table in rates.items():
        print(f"  {kind:<12}" + "".join(f"{table[m]:>11.1f}" for m in rows))
    print(f"  decode-shaped (32 x 576) @ (576 x 1536): {rates['576x1536'][32]:.1f} GFLOP/s")
    print(
        f"memory bandwidth ({bw['megabytes']} MB float32): read (x.sum()) {bw['read_gb_s']:.1f} GB/s, copy "
        f"{bw['copy_gb_s']:.1f} GB/s (read + write); the floors use {bandwidth / 1e9:.1f} GB/s"
    )
    print(
        f"model: {model.layers} layers, hidden {model.hidden}, intermediate {model.intermediate}, "
        f"{model.heads}/{model.kv_heads} heads x {model.head_dim}, vocab {model.vocab}; P (non-embedding "
        f"matmul weights) {model.matmul_params / 1e6:.1f} M, weights read per pass "
        f"{model.weight_bytes / 1e6:.0f} MB, trainable {model.trainable_params / 1e6:.1f} M"
    )
    print(
        f"  forward_flops per token, no logits, context 1: {model.forward_flops(1, 1, 0) / 1e6:.0f} MFLOP; "
        f"output layer per logit row: {model.forward_flops(0, 0, 1) / 1e6:.0f} MFLOP"
    )
    floor = Floor(model, rates, bandwidth)
    results = floors(floor, benchmark_data())
    for row in results.values():
        print()
        print(f"{row['title']}: {row['shape']}")
        print(f"  {'':<34}{'floor s':>10}{'GFLOP':>10}   {'unshared s':>10}{'GFLOP':>10}")
        for part in row["shared"]:
            a, b = row["shared"][part], row["unshared"][part]
            label = f"whole benchmark ({row['steps']} steps)" if part == "whole benchmark" else part
            if row.get("per") == "epoch" and part not in ("per step", "whole benchmark"):
                label += " (epoch)"
            print(f"  {label:<34}{a['s']:>10.2f}{a['gflop']:>10.1f}   {b['s']:>10.2f}{b['gflop']:>10.1f}")
    print(
        "\nfloor: the prompt once per group and logits only where needed; unshared: the prompt once per "
        "sample (for information)."
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": facts,
                    "quick": args.quick,
                    "matmul_gflop_s": rates,
                    "bandwidth": bw,
                    "bandwidth_used_gb_s": bandwidth / 1e9,
                    "model": {
                        **asdict(model),
                        "matmul_params": model.matmul_params,
                        "trainable_params": model.trainable_params,
                        "weight_bytes": model.weight_bytes,
                    },
                    "benchmarks": results,
                },
                indent=2,
            )
        )
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
