"""Plots and the HTML/Markdown report of `prefalign demo`.

Everything here reads what the demo wrote to its run folder (``summary.json``, ``samples/*.jsonl`` and each
method's ``metrics.jsonl``), so a report can be redrawn from a finished run. The HTML file is
self-contained: plots are PNGs embedded as base64 data URIs, no script, no external style sheet.
"""

from __future__ import annotations

import base64
import html
import importlib.metadata
import io
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

METHOD_LABELS = {
    "reference": "reference (pi_ref)",
    "preferred-ft": "Preferred-FT",
    "dpo": "DPO",
    "ppo": "RLHF-PPO (learned reward)",
    "ppo-gt": "PPO-GT (true reward)",
}

PACKAGES = ("prefalign", "torch", "transformers", "accelerate", "vaderSentiment", "numpy", "matplotlib")


# --------------------------------------------------------------------------------------------------
# numbers


def family(method: str) -> str:
    """``dpo`` for DPO runs (``dpo``, ``dpo-beta*``), ``ppo`` for PPO on the learned reward
    (``ppo``, ``ppo-kl*``), else the method itself."""
    if method == "dpo" or method.startswith("dpo-beta"):
        return "dpo"
    if method == "ppo" or method.startswith("ppo-kl"):
        return "ppo"
    return method


def interval(point: dict[str, Any], key: str = "reward") -> tuple[float, float]:
    """The point's 95% interval of ``key`` (``reward`` or ``kl``); a point without one (a summary written
    before intervals were recorded) counts as its value alone."""
    ci = point.get(f"{key}_ci")
    return (ci[0], ci[1]) if ci else (point[key], point[key])


def dominated(point: dict[str, Any], by: Sequence[dict[str, Any]]) -> bool:
    """True when some point of ``by`` has no more KL and a reward interval wholly above ``point``'s: better
    beyond the noise of both evaluations, not by a difference their intervals cannot tell apart."""
    return any(q["kl"] <= point["kl"] and interval(q)[0] > interval(point)[1] for q in by)


def matched(point: dict[str, Any], by: Sequence[dict[str, Any]]) -> bool:
    """True when some point of ``by`` has no more KL and at least as much mean reward (noise ignored)."""
    return any(q["kl"] <= point["kl"] and q["reward"] >= point["reward"] for q in by)


def frontier_sentence(points: Sequence[dict[str, Any]]) -> str:
    """One sentence, computed from the (KL, reward) points and their intervals, saying whether DPO's frontier
    dominates PPO's.

    A frontier dominates the other when every checkpoint of the other is beaten by one of its checkpoints
    with no more KL and a 95% reward interval wholly above (:func:`dominated`). Where the means favour one
    side but the intervals overlap, the sentence says the difference is within noise.
    """
    dpo = [p for p in points if family(p["method"]) == "dpo"]
    ppo = [p for p in points if family(p["method"]) == "ppo"]
    if not dpo or not ppo:
        return "DPO and PPO were not both run, so their frontiers cannot be compared here."
    best_d = max(dpo, key=lambda p: p["reward"])
    best_p = max(ppo, key=lambda p: p["reward"])
    detail = (
        f"best DPO reward {_with_ci(best_d)} at KL {best_d['kl']:.2f} vs best PPO reward "
        f"{_with_ci(best_p)} at KL {best_p['kl']:.2f}"
    )
    beaten = sum(dominated(p, dpo) for p in ppo)
    if beaten == len(ppo):
        return (
            f"Here DPO's frontier dominates PPO's: each of the {len(ppo)} PPO checkpoints is beaten by a DPO "
            f"checkpoint with no more KL and a reward interval wholly above its own ({detail})."
        )
    if all(dominated(p, ppo) for p in dpo):
        return (
            f"Here PPO's frontier dominates DPO's: each of the {len(dpo)} DPO checkpoints is beaten by a PPO "
            f"checkpoint with no more KL and a reward interval wholly above its own ({detail})."
        )
    noisy = sum(matched(p, dpo) and not dominated(p, dpo) for p in ppo)
    return (
        f"Here neither frontier dominates the other beyond noise: {beaten} of {len(ppo)} PPO checkpoints are "
        f"beaten by a DPO checkpoint with no more KL and a reward interval wholly above; {noisy} more are "
        f"matched in mean reward only, within the 95% intervals ({detail})."
    )


def _with_ci(point: dict[str, Any]) -> str:
    low, high = interval(point)
    return f"{point['reward']:.3f} ±{(high - low) / 2:.3f}"


def environment(device: str = "cpu") -> dict[str, Any]:
    """The machine and the versions of the packages that produced the numbers."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch_threads": _torch_threads(),
        "device": device,
        "packages": versions,
    }
    if device.startswith("cuda"):
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def method_rows(summary: dict[str, Any]) -> list[list[str]]:
    """The table of methods: name, checkpoint, mean reward, mean KL, training time, training samples."""
    rows = []
    rm = summary.get("reward_model") or {}
    for m in summary["methods"]:
        train_s = f"{m['train_s']:.0f}"
        if family(m["method"]) == "ppo" and rm:
            train_s += f" (+{rm['wall_s']:.0f} reward model)"
        rows.append(
            [
                m["method"],
                m["checkpoint"],
                _plus_minus(m, "reward", "+.3f", ".3f"),
                _plus_minus(m, "kl", ".2f", ".2f"),
                train_s,
                str(m["training_samples"]),
            ]
        )
    return rows


TABLE_HEADER = [
    "method",
    "checkpoint",
    "mean reward (95% CI)",
    "mean KL (95% CI)",
    "train s",
    "training samples",
]


def _plus_minus(row: dict[str, Any], key: str, fmt: str, half_fmt: str) -> str:
    """``value ±half-width`` of the row's 95% interval (the interval need not be symmetric: its half
    width is shown), or the value alone where none was recorded."""
    if not row.get(f"{key}_ci"):
        return format(row[key], fmt)
    low, high = row[f"{key}_ci"]
    return f"{format(row[key], fmt)} ±{format((high - low) / 2, half_fmt)}"


def terminal_table(summary: dict[str, Any]) -> str:
    """The methods table as aligned plain text, with the conclusion under it."""
    rows = [TABLE_HEADER, *method_rows(summary)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    rm = summary.get("reward_model")
    if rm and rm.get("heldout_accuracy") is not None:
        lines.append(
            f"reward model held-out accuracy: {rm['heldout_accuracy']:.3f} on {rm['heldout_pairs']} pairs"
        )
    lines.append(summary["conclusion"])
    lines.append(f"total wall time: {summary['wall_s']:.0f} s")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# plots


def _figure_png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


FAMILIES = (("dpo", "Blues"), ("ppo-kl", "Oranges"), ("ppo", "Reds"), ("best-of-", "Purples"))
"""Colour maps of the method families a sweep draws several runs of (matched by name prefix, in order)."""
SINGLE_COLOURS = {"preferred-ft": "tab:olive", "ppo-gt": "tab:gray", "grpo": "tab:green", "rloo": "tab:cyan"}


def _method_colours(methods: Sequence[str]) -> dict[str, Any]:
    """One colour per method: a sweep's runs in shades of their family's colour map (DPO blue, PPO red,
    its KL sweep orange, Best-of-N purple), the other methods in colours of their own."""
    import matplotlib

    colours: dict[str, Any] = {"reference": "black"}
    family_of: dict[str, list[str]] = {}
    for m in methods:
        if m in colours:
            continue
        if m in SINGLE_COLOURS:
            colours[m] = SINGLE_COLOURS[m]
            continue
        prefix = next((f for f, _ in FAMILIES if m.startswith(f)), None)  # (ppo-gt has its own colour)
        family_of.setdefault(prefix or m, []).append(m)
    fallback = iter(matplotlib.colormaps["tab10"].colors)
    maps = dict(FAMILIES)
    for prefix, members in family_of.items():
        if prefix not in maps:
            for m in members:
                colours[m] = next(fallback, "tab:brown")
            continue
        cmap = matplotlib.colormaps[maps[prefix]]
        for j, m in enumerate(members):
            colours[m] = cmap(0.95 - 0.4 * j / max(1, len(members) - 1)) if len(members) > 1 else cmap(0.75)
    return colours


def frontier_plot(points: Sequence[dict[str, Any]]) -> bytes:
    """Reward vs KL: each method's checkpoints joined in training order, a sweep's runs in shades of one
    colour, Best-of-N as lone diamonds; the legend beside the axes so that it hides no point."""
    plt = _pyplot()
    by_method: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        by_method.setdefault(p["method"], []).append(p)
    many = len(by_method) > 6
    fig, ax = plt.subplots(figsize=(8.6, 5.0) if many else (6.4, 4.4))
    colours = _method_colours(list(by_method))
    start = by_method.get("reference", [])[:1]
    for method, pts in by_method.items():
        pts = sorted(pts, key=lambda p: p.get("step", 0))
        if method != "reference" and not method.startswith("best-of-") and pts[0].get("step", 0) > 0:
            pts = start + pts  # training starts at the reference
        label = METHOD_LABELS.get(method, method)
        xerr, yerr = _error_bars(pts, "kl"), _error_bars(pts, "reward")
        xs, ys = [p["kl"] for p in pts], [p["reward"] for p in pts]
        if method == "reference":
            ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt="*", markersize=13, color="black", capsize=3,
                        label=label, zorder=3)  # fmt: skip
            continue
        fmt = "D" if method.startswith("best-of-") else "-o"
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt=fmt, color=colours[method], capsize=2.5, markersize=5,
                    elinewidth=0.8, alpha=0.9, label=label)  # fmt: skip
    ax.set_xlabel("sequence KL(pi || pi_ref), nats (mean over test prompts)")
    ax.set_ylabel("mean reward (VADER compound)")
    ax.set_title("Reward vs KL along training (95% bootstrap intervals; lines start at the reference)")
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.legend(fontsize=8)
    png = _figure_png(fig)
    plt.close(fig)
    return png


def _error_bars(points: Sequence[dict[str, Any]], key: str) -> list[list[float]]:
    """Matplotlib's ``[[below], [above]]`` distances from each point's value to its interval's ends (never
    negative: an exact value, such as Best-of-N's analytic KL, has an interval of zero width that float
    rounding can put a hair to either side of the value)."""
    ends = [interval(p, key) for p in points]
    return [[max(0.0, p[key] - lo) for p, (lo, _) in zip(points, ends, strict=True)],
            [max(0.0, hi - p[key]) for p, (_, hi) in zip(points, ends, strict=True)]]  # fmt: skip


CURVES = {
    "dpo": [("loss", "DPO loss"), ("rewards/margins", "reward margin"), ("rewards/accuracies", "accuracy")],
    "ppo": [
        ("objective/scores", "reward-model score"),
        ("objective/kl", "KL"),
        ("kl_coef", "KL coefficient"),
    ],
}


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curves_plot(run_dir: Path, kind: str, methods: Sequence[str]) -> bytes | None:
    """Training curves of every run of ``kind`` (dpo or ppo) from its metrics.jsonl; ``None`` if none."""
    runs = {m: read_metrics(run_dir / "runs" / m) for m in methods if family(m) == kind}
    runs = {m: rows for m, rows in runs.items() if rows}
    if not runs:
        return None
    plt = _pyplot()
    panels = CURVES[kind]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for method, rows in runs.items():
            for prefix, style in (("", "-"), ("val/", "o--")):
                xs = [r["step"] for r in rows if isinstance(r.get(prefix + key), (int, float))]
                ys = [r[prefix + key] for r in rows if isinstance(r.get(prefix + key), (int, float))]
                if xs:
                    ax.plot(xs, ys, style, label=f"{method}{' held-out' if prefix else ''}", markersize=4)
        ax.set_title(title)
        ax.set_xlabel("step" if kind == "dpo" else "iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    png = _figure_png(fig)
    plt.close(fig)
    return png


# --------------------------------------------------------------------------------------------------
# the report


def sample_comparison(run_dir: Path, summary: dict[str, Any], count: int = 4) -> list[dict[str, Any]]:
    """For the first ``count`` test prompts: the reference's continuation and each method's final one."""
    from prefalign.evaluate import read_samples

    finals = {m["method"]: m for m in summary["methods"]}
    ref = next((p for p in summary["points"] if p["method"] == "reference"), None)
    if ref is None:
        return []
    columns = {"reference": read_samples(run_dir / ref["samples"])}
    for method, m in finals.items():
        if method != "reference":
            columns[method] = read_samples(run_dir / f"samples/{method}-{m['checkpoint']}.jsonl")
    out = []
    for i, record in enumerate(columns["reference"][:count]):
        out.append(
            {
                "prompt": record["prompt"],
                "continuations": [
                    (method, rows[i]["completion"], rows[i]["reward"]) for method, rows in columns.items()
                ],
            }
        )
    return out


INTRO = (
    "The controlled-sentiment experiment of the DPO paper (Rafailov et al. 2023, section 6.1 and appendix "
    "C.1) at laptop scale. A policy continues the opening words of a movie review; the ground-truth reward "
    "is VADER's compound sentiment score of the continuation (Hutto & Gilbert 2014), in [-1, 1], a lexicon "
    "stand-in for the paper's sentiment classifier. Preferences are sampled from the reference policy "
    "(several continuations per training prompt, every pair ordered by the ground truth, ties dropped); "
    "DPO, Preferred-FT (supervised fine-tuning on the chosen completions: each training prompt's sample "
    "preferred over all its others) and the RLHF pipeline (a "
    "Bradley-Terry reward model on the same pairs, then PPO against it with a KL penalty) all learn from "
    "them. Each method is evaluated on held-out test prompts at several points of its training: mean reward "
    "and mean sequence-level KL(pi || pi_ref), the sum over the response tokens of the log-ratio of samples "
    "drawn from pi (temperature 1, fixed seed): an unbiased single-sample estimate, so a policy that has "
    "barely moved can show a slightly negative mean."
)


def report_sections(run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Everything both report formats show, as plain data plus PNG bytes."""
    methods = [m["method"] for m in summary["methods"]]
    images = {"frontier": frontier_plot(summary["points"])}
    for kind in ("dpo", "ppo"):
        png = curves_plot(run_dir, kind, methods)
        if png is not None:
            images[f"{kind}_curves"] = png
    return {
        "images": images,
        "rows": method_rows(summary),
        "samples": sample_comparison(run_dir, summary),
        "config": yaml.safe_dump(summary["config"], sort_keys=False),
        "environment": yaml.safe_dump(summary["environment"], sort_keys=False),
        "timings": summary["phases"],
    }


CAPTIONS = {
    "frontier": "Mean test reward against mean sequence KL to the reference, checkpoints joined in training order.",
    "dpo_curves": "DPO training: loss, reward margin and preference accuracy of the implicit reward "
    "(lines: training batches; dashed: held-out pairs).",
    "ppo_curves": "PPO training: the reward model's score of the rollouts, their KL to the reference, and "
    "the KL coefficient.",
}


def _facts(summary: dict[str, Any]) -> list[str]:
    facts = []
    prefs = summary.get("preferences") or {}
    if prefs:
        facts.append(
            f"Preferences: {prefs['samples']} reference samples on {prefs['prompts']} training prompts, "
            f"mean reward {prefs['mean_reward']:+.3f}; {prefs['pairs_train']} training pairs and "
            f"{prefs['pairs_heldout']} held-out pairs ({prefs['ties_dropped']} tied pairs dropped)."
        )
    rm = summary.get("reward_model") or {}
    if rm.get("heldout_accuracy") is not None:
        facts.append(
            f"Reward model held-out accuracy: {rm['heldout_accuracy']:.3f} on {rm['heldout_pairs']} pairs "
            f"of prompts it never saw (training accuracy of the last batch {rm['train_accuracy']:.3f})."
        )
    for m in summary["methods"]:
        if m.get("heldout_loss") is not None:
            facts.append(
                f"What {m['method']} learned of the preferences: held-out loss {m['heldout_loss']:.3f} "
                f"(ln 2 = 0.693 before training) and implicit-reward accuracy {m['heldout_accuracy']:.3f} on "
                "pairs of prompts it never trained on."
            )
    widths = [interval(p)[1] - interval(p)[0] for p in summary["points"] if p.get("reward_ci")]
    if widths:
        k = (summary.get("config") or {}).get("eval_samples", 1)
        facts.append(
            f"Every point is a mean over the test prompts ({k} sample{'s' if k != 1 else ''} each) with a 95% "
            "bootstrap interval (2,000 resamples of the prompts, each with all its samples); reward "
            f"intervals are ±{min(widths) / 2:.3f} to ±{max(widths) / 2:.3f} wide here."
        )
    if any(m["method"].startswith("best-of-") for m in summary["methods"]):
        facts.append(
            "Best-of-N's KL is the analytic log N - (N-1)/N; its own log-probabilities are intractable."
        )
    env = summary["environment"]
    where = f"on {env['device']} ({env['torch_threads']} torch threads)"
    phases = summary.get("phases", {}).values()
    earlier = sum(1 for p in phases if p.get("skipped"))
    if earlier:  # a rerun: say what the whole run cost, not only this call
        total = sum(p["wall_s"] for p in phases)
        facts.append(
            f"The phases took {total:.0f} s in all {where}, {earlier} of them in an earlier invocation; "
            f"this one took {summary['wall_s']:.0f} s. Phase timings below."
        )
    else:
        facts.append(f"Total wall time {summary['wall_s']:.0f} s {where}; phase timings below.")
    return facts


def write_report(run_dir: str | Path, summary: dict[str, Any]) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and the plots (``plots/*.png``) into ``run_dir``."""
    run_dir = Path(run_dir)
    sections = report_sections(run_dir, summary)
    (run_dir / "plots").mkdir(exist_ok=True)
    for name, png in sections["images"].items():
        (run_dir / "plots" / f"{name}.png").write_bytes(png)
    paths = {"md": run_dir / "report.md", "html": run_dir / "report.html"}
    paths["md"].write_text(render_markdown(summary, sections))
    paths["html"].write_text(render_html(summary, sections))
    return paths


def render_markdown(summary: dict[str, Any], sections: dict[str, Any]) -> str:
    lines = [
        "# prefalign demo: controlled sentiment, DPO vs RLHF-PPO",
        "",
        INTRO,
        "",
        f"**{summary['conclusion']}**",
        "",
    ]
    lines += [f"- {fact}" for fact in _facts(summary)] + [""]
    lines += ["| " + " | ".join(TABLE_HEADER) + " |", "|" + " --- |" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in sections["rows"]] + [""]
    for name in sections["images"]:
        lines += [f"![{name}](plots/{name}.png)", "", CAPTIONS[name], ""]
    lines += ["## Sample continuations (same test prompts, same sampling seed)", ""]
    for item in sections["samples"]:
        lines.append(f"**{item['prompt']}** ...")
        lines += [f"- {method} ({reward:+.2f}): {text!r}" for method, text, reward in item["continuations"]]
        lines.append("")
    lines += ["## Phase timings (s)", ""]
    lines += [f"- {name}: {t['wall_s']}{' (skipped, from an earlier run)' if t['skipped'] else ''}"
              for name, t in sections["timings"].items()]  # fmt: skip
    lines += ["", "## Configuration", "", "```yaml", sections["config"].rstrip(), "```", ""]
    lines += ["## Machine and versions", "", "```yaml", sections["environment"].rstrip(), "```", ""]
    return "\n".join(lines)


STYLE = (
    "body{font-family:sans-serif;max-width:960px;margin:2em auto;padding:0 1em;line-height:1.45}"
    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
    "img{max-width:100%}pre{background:#f6f6f6;padding:8px;overflow:auto}.c{font-weight:bold}"
)


def render_html(summary: dict[str, Any], sections: dict[str, Any]) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>prefalign demo report</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>prefalign demo: controlled sentiment, DPO vs RLHF-PPO</h1>",
        f"<p>{esc(INTRO)}</p>",
        f"<p class='c'>{esc(summary['conclusion'])}</p>",
        "<ul>" + "".join(f"<li>{esc(f)}</li>" for f in _facts(summary)) + "</ul>",
        "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in TABLE_HEADER) + "</tr>",
        *["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in sections["rows"]],
        "</table>",
    ]
    for name, png in sections["images"].items():
        data = base64.b64encode(png).decode()
        parts.append(f"<figure><img alt='{name}' src='data:image/png;base64,{data}'>")
        parts.append(f"<figcaption>{esc(CAPTIONS[name])}</figcaption></figure>")
    parts.append("<h2>Sample continuations (same test prompts, same sampling seed)</h2>")
    for item in sections["samples"]:
        parts.append(f"<p><b>{esc(item['prompt'])}</b> ...</p><table>")
        parts += [
            f"<tr><td>{esc(m)}</td><td>{r:+.2f}</td><td>{esc(t)}</td></tr>"
            for m, t, r in item["continuations"]
        ]
        parts.append("</table>")
    parts.append("<h2>Phase timings (s)</h2><ul>")
    parts += [
        f"<li>{esc(n)}: {t['wall_s']}{' (skipped)' if t['skipped'] else ''}</li>"
        for n, t in sections["timings"].items()
    ]
    parts.append("</ul>")
    parts.append(f"<h2>Configuration</h2><pre>{esc(sections['config'])}</pre>")
    parts.append(f"<h2>Machine and versions</h2><pre>{esc(sections['environment'])}</pre></body></html>")
    return "\n".join(parts)
