"""What was sampled: the online methods' samples written to ``completions.jsonl`` (``--log-completions``).

Every ``--log-completions`` iterations (and at the first), each sample of the iteration, from every
process, becomes one JSON line in the run folder's ``completions.jsonl``:

- ``iteration`` (1-based, as ``step`` in ``metrics.jsonl``), ``prompt`` (text, or messages as given) and
  ``completion`` (text);
- ``reward``: the reward source's total (the weighted sum when several combine), whose mean over the
  iteration is ``objective/scores`` of ``metrics.jsonl``; ``reward/<source>``: each source's own score;
- ``advantage``: what the update weighs the sample by (GRPO and RLOO: the sequence's; PPO: the whitened
  GAE advantage of its first response token); PPO adds ``kl``, the sequence's KL to the reference (the
  sum over its tokens of log pi - log ref, whose mean is ``objective/kl``).

The main process writes the file and prints two of the samples (the best and the worst) on the terminal.
A resumed run first drops the lines past its checkpoint (:func:`truncate_completions`).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from torch import Tensor

from prefalign.train.run_folder import json_safe, truncate_jsonl

FILE = "completions.jsonl"

log = logging.getLogger(__name__)


def due(every: int, step: int) -> bool:
    """Whether the 1-based iteration ``step`` is logged: the first one and every ``every``-th (0: none)."""
    return every > 0 and (step == 1 or step % every == 0)


def sample_records(run: Any, rollout: Any, fields: dict[str, Tensor], step: int) -> list[dict[str, Any]]:
    """One record per sample of this process's ``rollout``: iteration, prompt, completion, the total
    reward, each source's reward, and the per-sample ``fields`` (``[N]`` tensors: advantage, kl)."""
    source = run.source
    parts = getattr(source, "components", None) or {source.name: rollout.raw_scores.tolist()}
    total = rollout.raw_scores.tolist()
    columns = {name: t.detach().float().cpu().tolist() for name, t in fields.items()}
    records = []
    for i, text in enumerate(rollout.out.texts):
        record = {
            "iteration": step,
            "prompt": rollout.rows[i]["prompt"] if rollout.rows else None,
            "completion": text,
            "reward": total[i],
            **{f"reward/{name}": float(values[i]) for name, values in parts.items()},
            **{name: values[i] for name, values in columns.items()},
        }
        records.append(json_safe(record))
    return records


def log_completions(run: Any, rollout: Any, fields: dict[str, Tensor], it: int) -> None:
    """At the due iterations: every process's samples of iteration ``it`` (0-based) appended to
    ``completions.jsonl`` by the main process, two of them shown (every process calls this alike)."""
    step = it + 1
    if not due(run.config.log_completions, step) or run.writer is None:  # (None: no run folder begun)
        return
    records = sample_records(run, rollout, fields, step)
    acc = run.accelerator
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        records = gather_object(records)
    if not acc.is_main_process:
        return
    with (Path(run.config.output) / FILE).open("a") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    run.writer.table(step, "completions", records)  # (TensorBoard, W&B: when those sinks are on)
    ranked = sorted(records, key=lambda r: r["reward"] if isinstance(r["reward"], float) else -math.inf)
    for label, record in (("best", ranked[-1]), ("worst", ranked[0])):
        log.info("iteration %d %s: %s", step, label, show(record))


def show(record: dict[str, Any], width: int = 60) -> str:
    """One line for the terminal: the reward, the advantage, the prompt and the completion, cut short."""
    prompt = record["prompt"] if isinstance(record["prompt"], str) else record["prompt"][-1]["content"]
    cut = lambda text: repr(text if len(text) <= width else text[: width - 3] + "...")  # noqa: E731
    adv, reward = record.get("advantage"), record["reward"]
    return (
        (f"reward {reward:.3f}" if isinstance(reward, float) else f"reward {reward}")
        + (f", advantage {adv:+.3f}" if isinstance(adv, float) else "")
        + f": {cut(prompt)} -> {cut(record['completion'])}"
    )


def truncate_completions(output: Path, step: int) -> None:
    """Drop the lines of ``completions.jsonl`` past iteration ``step`` (and a half-written last line)
    before a resumed run appends its own, so no iteration appears twice."""
    truncate_jsonl(output / FILE, "iteration", step)
