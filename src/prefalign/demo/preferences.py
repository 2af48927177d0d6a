"""The demo's prompts and its preference data: ``samples_per_prompt`` samples per train prompt from the
reference, every pair of them ordered by the ground truth (ties dropped), the pairs of the last
``heldout_prompts`` prompts held out."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefalign.config import ConfigError
from prefalign.demo.config import PROMPTS_FILE
from prefalign.demo.phase import Phase, digest, write_jsonl
from prefalign.demo.reference import sample

if TYPE_CHECKING:
    from prefalign.demo.run import Demo


def load_demo_prompts(path: str | Path | None) -> tuple[list[str], list[str]]:
    """Train and test prompt texts of a ``{"prompt", "split"}`` file (default: the bundled one)."""
    from prefalign.data import DataError, read_rows

    source = Path(path) if path else PROMPTS_FILE
    train, test = [], []
    for where, row in read_rows(source):
        if not isinstance(row, dict) or not str(row.get("prompt", "")).strip():
            raise DataError(f'{where}: expected a non-empty "prompt"')
        split = row.get("split", "train")
        if split not in ("train", "test"):
            raise DataError(f'{where}: "split" must be train or test, got {split!r}')
        (train if split == "train" else test).append(str(row["prompt"]))
    if not train or not test:
        raise DataError(f"{source}: needs prompts in both splits (train {len(train)}, test {len(test)})")
    return train, test


def preference_pairs(prompt: str, completions: list[str], scores: list[float]) -> tuple[list[dict], int]:
    """Every pair of ``completions`` ordered by ``scores`` (higher is chosen); ties are dropped.

    Returns:
        The pairs as ``{"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"}`` and the
        number of tied pairs dropped.
    """
    pairs, ties = [], 0
    for i in range(len(completions)):
        for j in range(i + 1, len(completions)):
            if scores[i] == scores[j]:
                ties += 1
                continue
            win, lose = (i, j) if scores[i] > scores[j] else (j, i)
            pairs.append(
                {
                    "prompt": prompt,
                    "chosen": completions[win],
                    "rejected": completions[lose],
                    "chosen_reward": scores[win],
                    "rejected_reward": scores[lose],
                }
            )
    return pairs, ties


def build(demo: Demo) -> dict[str, Any]:
    """Sample, score and pair: the preference data every method learns from (the ``preferences`` phase)."""
    c = demo.config
    prompts = list(demo.train_prompts)
    random.Random(c.seed).shuffle(prompts)
    prompts = prompts[: c.preference_prompts or len(prompts)]
    inputs = {"reference": demo.reference_key, "prompts": digest(prompts), "seed": c.seed}
    inputs |= {"samples_per_prompt": c.samples_per_prompt, "max_new_tokens": c.max_new_tokens}
    inputs |= {"heldout_prompts": c.heldout_prompts, "sample_batch_size": c.sample_batch_size}
    return demo.phase(
        "preferences", demo.out / "preferences", inputs, lambda phase: _build(demo, phase, prompts)
    )


def _build(demo: Demo, phase: Phase, prompts: list[str]) -> dict[str, Any]:
    c = demo.config
    k = c.samples_per_prompt
    expanded = [p for p in prompts for _ in range(k)]
    texts = sample(demo, expanded, c.seed)
    scores = demo.ground_truth(expanded, texts)
    write_jsonl(
        phase.folder / "samples.jsonl",
        [
            {"prompt": p, "completion": t, "reward": s}
            for p, t, s in zip(expanded, texts, scores, strict=True)
        ],
    )
    sets: dict[str, list[dict]] = {"train": [], "heldout": []}
    ties = empty = 0
    best: list[dict[str, Any]] = []
    for i, prompt in enumerate(prompts):
        group = list(zip(texts[i * k : (i + 1) * k], scores[i * k : (i + 1) * k], strict=True))
        kept = [(t, s) for t, s in group if t.strip()]
        empty += len(group) - len(kept)
        pairs, tied = preference_pairs(prompt, [t for t, _ in kept], [s for _, s in kept])
        ties += tied
        heldout = i >= len(prompts) - c.heldout_prompts
        sets["heldout" if heldout else "train"] += pairs
        if pairs and not heldout:  # the sample chosen over every other one of its prompt
            top = max(kept, key=lambda item: item[1])
            best.append({"prompt": prompt, "completion": top[0], "reward": top[1]})
    if not sets["train"] or not sets["heldout"]:
        raise ConfigError(
            f"preferences: {len(sets['train'])} training and {len(sets['heldout'])} held-out pairs after "
            f"dropping {ties} ties; sample more prompts (--preference-prompts) or longer continuations"
        )
    write_jsonl(phase.folder / "pairs-train.jsonl", sets["train"])
    write_jsonl(phase.folder / "pairs-heldout.jsonl", sets["heldout"])
    write_jsonl(phase.folder / "chosen-train.jsonl", best)
    return {
        "prompts": len(prompts),
        "samples": len(texts),
        "mean_reward": sum(scores) / len(scores),
        "pairs_train": len(sets["train"]),
        "chosen_train": len(best),
        "pairs_heldout": len(sets["heldout"]),
        "ties_dropped": ties,
        "empty_dropped": empty,
        "folder": str(phase.folder.relative_to(demo.out)),
    }
