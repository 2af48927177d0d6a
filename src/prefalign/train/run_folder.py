"""Run folders: refuse, resume or overwrite the run already in ``--output`` (comparing the settings of
a resumed run), clear it, and the run's metrics (``metrics.jsonl`` and the optional sinks), summary and
closing lines."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor

from prefalign.config import ConfigError, check_output_folder, config_to_dict, save_config
from prefalign.train.checkpoint import latest_checkpoint
from prefalign.train.options import SINKS, TrainOptions

RUN_FILES = (
    "config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "tensorboard", "adapter", "completions.jsonl",
    "inputs.json",
)  # fmt: skip
"""What a run leaves in its folder: a folder holding any of these holds a run."""

RESUMABLE_CHANGES = frozenset(
    {"max_steps", "epochs", "iterations", "resume", "overwrite", "skip_nonfinite", "progress", "report_to"}
    | {"save_every", "keep_checkpoints", "log_completions"}
)
"""Options a resumed run may change: the step budget, and how the run is shown and saved (nothing that
changes what a step computes)."""


def check_sinks(report_to: Sequence[str]) -> None:
    """Refuse a --report-to sink whose package is not installed (before any model is loaded)."""
    import importlib.util

    for sink in report_to:
        module = SINKS.get(sink, sink)
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"--report-to {sink} needs the package {module!r}, which is not installed: "
                f"pip install 'prefalign[{sink}]'"
            )


INPUTS = "inputs.json"
"""The run folder's record of its data files at the start (resolved path and SHA-256 of each)."""

DATA_FIELDS = ("data", "eval_data", "prompts", "eval_prompts")
"""Options naming data files whose content a resumed run must find unchanged."""

BUDGET = ("max_steps", "epochs", "iterations")
"""The options that set a run's length."""


class RunFinished(Exception):
    """``--resume`` of a run that already finished with this very budget: there is nothing to do, and
    nothing is touched (the command says so and exits 0). ``summary``: the run's ``summary.json``."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


def check_run_folder(config: TrainOptions) -> Path | None:
    """Check ``config.output`` before anything is loaded; returns the checkpoint to resume from, if any.

    Raises:
        ConfigError: a --report-to sink is not installed; the folder holds a run and neither ``--resume``
            nor ``--overwrite`` was given; ``--resume`` finds no checkpoint; or ``--resume`` with settings
            other than the step budget changed (the message names them), a data file's content included.
        RunFinished: ``--resume`` of a run that already finished with the same budget.
    """
    output = Path(config.output)
    check_output_folder(output)
    check_sinks(config.report_to)
    if config.resume:
        ckpt = latest_checkpoint(output)
        if ckpt is None:
            raise ConfigError(f"--resume: no checkpoint in {output / 'checkpoints'}, nothing to resume")
        changed = changed_settings(ckpt / "config.yaml", config) + changed_inputs(output, config)
        summary = None if changed else finished_summary(output, ckpt, config)
        if summary is not None:
            raise RunFinished(
                f"{output} already finished: {summary['steps']} steps of this budget "
                f"({', '.join(f'{k} {getattr(config, k)}' for k in BUDGET if hasattr(config, k))}); "
                "nothing to do (raise the budget to continue it)",
                summary,
            )
        if changed:
            raise ConfigError(
                f"--resume: {ckpt} was trained with other settings: {'; '.join(changed)}. "
                "Only the step budget (--max-steps, --epochs, --iterations) may change on resume; "
                "start a new run in another --output to change the rest"
            )
        return ckpt
    held = [name for name in RUN_FILES if (output / name).exists()]
    if held and not config.overwrite:
        raise ConfigError(
            f"{output} already holds a run ({', '.join(held)}): pass --resume to continue it, "
            "--overwrite to replace it, or another --output"
        )
    return None


def finished_summary(output: Path, ckpt: Path, config: Any) -> dict[str, Any] | None:
    """The run's summary when it finished at checkpoint ``ckpt`` with the budget ``config`` asks for
    (``summary.json`` of that step, the same --max-steps / --epochs / --iterations); else None."""
    try:
        summary = json.loads((output / "summary.json").read_text())
        saved = yaml.safe_load((ckpt / "config.yaml").read_text()) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(summary, dict) or summary.get("steps") != int(ckpt.name.split("-")[1]):
        return None
    new = yaml.safe_load(yaml.safe_dump(config_to_dict(config)))
    return summary if all(saved.get(k) == new.get(k) for k in BUDGET if k in new) else None


def input_files(config: Any) -> dict[str, dict[str, str]]:
    """``{option: {"path", "sha256"}}`` for each of :data:`DATA_FIELDS` that names a file (folders and
    hub datasets are not hashed)."""
    import hashlib

    out = {}
    for key in DATA_FIELDS:
        value = getattr(config, key, None)
        path = Path(value).expanduser() if isinstance(value, str) and value else None
        if path is not None and path.is_file():
            digest = hashlib.sha256()
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            out[key] = {"path": str(path.resolve()), "sha256": digest.hexdigest()}
    return out


def changed_inputs(output: Path, config: Any) -> list[str]:
    """``"key (the content of PATH changed since the run started)"`` for each data file recorded in the
    run's :data:`INPUTS` whose bytes differ now (a run without the record: nothing to compare)."""
    try:
        recorded = json.loads((output / INPUTS).read_text())
    except (OSError, ValueError):
        return []
    now = input_files(config)
    return [
        f"{key} (the content of {now[key]['path']} changed since the run started)"
        for key, old in recorded.items()
        if key in now and now[key]["path"] == old.get("path") and now[key]["sha256"] != old.get("sha256")
    ]


def _same(old: Any, new: Any) -> bool:
    """Equal settings, or two spellings of one existing path (``./runs/x``, ``runs/x``, absolute)."""
    if old == new:
        return True
    if isinstance(old, str) and isinstance(new, str) and old and new:
        a, b = Path(old).expanduser(), Path(new).expanduser()
        return (a.exists() or b.exists()) and a.resolve() == b.resolve()
    return False


def changed_settings(saved: Path, config: Any) -> list[str]:
    """``"key (old -> new)"`` for each setting of ``config`` that differs from the YAML file ``saved``,
    except those in :data:`RESUMABLE_CHANGES` (no file: nothing to compare). An option the saved file
    does not name (it came with a later version) counts as changed only when it is not at its default."""
    if not saved.is_file():
        return []
    old = yaml.safe_load(saved.read_text()) or {}
    new = yaml.safe_load(yaml.safe_dump(config_to_dict(config)))  # the same round trip as the saved one
    defaults = yaml.safe_load(yaml.safe_dump(_defaults(config)))
    for k in set(new) - set(old):
        if k in defaults and defaults[k] == new[k]:
            old[k] = new[k]
    keys = sorted((set(old) | set(new)) - RESUMABLE_CHANGES)
    return [f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in keys if not _same(old.get(k), new.get(k))]


def _defaults(config: Any) -> dict[str, Any]:
    """The default of each option of ``config`` that has one."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def clear_run(output: Path) -> None:
    """Delete what a previous run left in ``output`` (``--overwrite``); other files are left alone."""
    for name in RUN_FILES:
        path = output / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def begin_run(config: TrainOptions, accelerator: Any) -> Path:
    """Make the run folder ready, the same way for every command: once every process has checked it
    (:func:`check_run_folder`, before anything was loaded), the main process creates it, clears the old
    run under ``--overwrite`` and writes ``config.yaml``; every process waits for that. Returns the folder."""
    output = Path(config.output)
    accelerator.wait_for_everyone()  # every process has checked the folder before the main one writes
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        if config.overwrite:
            clear_run(output)
        save_config(config, output / "config.yaml")
        if not config.resume:  # (a resumed run keeps the record of its start)
            (output / INPUTS).write_text(json.dumps(input_files(config), indent=1))
    accelerator.wait_for_everyone()
    return output


def open_metrics(config: TrainOptions, accelerator: Any, resumed_step: int | None) -> MetricsWriter:
    """The run's metrics writer (main process only writes). A resumed run first drops the records past
    its checkpoint's step (:func:`truncate_metrics`), then appends."""
    output = Path(config.output)
    if resumed_step is not None and accelerator.is_main_process:
        truncate_metrics(output, resumed_step)
    accelerator.wait_for_everyone()
    return MetricsWriter(
        output,
        config.report_to,
        config=config_to_dict(config),
        append=resumed_step is not None,
        enabled=accelerator.is_main_process,
    )


def truncate_jsonl(path: Path, key: str, step: int) -> None:
    """Drop the records of the JSON-lines file ``path`` whose ``key`` is past ``step`` (and a half-written
    last line) before a resumed run appends its own, so that no step appears twice."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get(key, 0) <= step:
            kept.append(line + "\n")
    path.write_text("".join(kept))


def truncate_metrics(output: Path, step: int) -> None:
    """Drop the ``metrics.jsonl`` records after ``step`` (:func:`truncate_jsonl`)."""
    truncate_jsonl(output / "metrics.jsonl", "step", step)


class MetricsWriter:
    """Flat metric dicts as JSON lines in ``metrics.jsonl``, optionally mirrored to TensorBoard and W&B."""

    def __init__(
        self,
        output: Path,
        report_to: Sequence[str] = (),
        config: dict[str, Any] | None = None,
        append: bool = False,
        enabled: bool = True,
    ) -> None:
        self.path = output / "metrics.jsonl"
        self._file = self.path.open("a" if append else "w") if enabled else None
        self._tb = None
        self._wandb = None
        if not enabled:  # not the main process: write nothing
            return
        try:
            if "tensorboard" in report_to:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(output / "tensorboard"))
            if "wandb" in report_to:
                import wandb

                self._wandb = wandb.init(dir=str(output), config=config or {})
        except ImportError as err:
            self._file.close()
            raise ConfigError(
                f"--report-to needs a package that is not installed ({err.name}): "
                "pip install 'prefalign[tensorboard]' or 'prefalign[wandb]'"
            ) from None

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if self._file is None:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(record, step=step)

    def table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None:
        """Rows of text and numbers (the sampled completions) shown as a table where a sink can: a markdown
        table in TensorBoard's text tab, a ``wandb.Table`` in W&B (metrics.jsonl has no tables; the caller
        keeps its own file)."""
        if not rows or (self._tb is None and self._wandb is None):
            return
        columns = list(rows[0])
        cells = [[_cell(r.get(c)) for c in columns] for r in rows]
        if self._tb is not None:
            escape = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
            lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
            lines += ["| " + " | ".join(escape(v) for v in row) + " |" for row in cells]
            self._tb.add_text(name, "\n".join(lines), step)
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Table(columns=columns, data=cells)}, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _cell(v: Any) -> Any:
    """A table cell: numbers and text as they are, anything else (a list of messages) as JSON text."""
    return v if v is None or isinstance(v, (str, int, float, bool)) else json.dumps(v, ensure_ascii=False)


def _plain(v: Any) -> Any:
    if isinstance(v, Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float written as a string (JSON has no NaN or Infinity)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return _plain(value)


def read_metrics(output: str | Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl``."""
    path = Path(output) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_summary(output: Path, summary: dict[str, Any]) -> None:
    """Write ``summary.json`` (non-finite numbers as strings); call it on the main process."""
    (output / "summary.json").write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False))


def report_done(summary: dict[str, Any], output: str, keys: Sequence[str] = (), unit: str = "steps") -> None:
    """Print a run's closing line (and the chosen final/eval metrics) once, from the main process.

    ``keys`` picks the metrics shown, by full name or by the part after the first ``/``; ``unit`` names
    what ``summary["steps"]`` counts (an online method's iterations).
    """
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    print(f"done: {summary['steps']} {unit} in {summary['wall_s']:.1f} s; model saved to {output}")
    final = {**summary.get("final", {}), **summary.get("eval", {})}
    shown = {
        k: v
        for k, v in final.items()
        if isinstance(v, float) and (not keys or k.split("/", 1)[-1] in keys or k in keys)
    }
    if shown:
        print("  " + "  ".join(f"{k}={v:.4g}" for k, v in shown.items()))
