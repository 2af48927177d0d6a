"""Phases of the demo: a folder, the inputs its results depend on, and a record written when it is
complete, so that a rerun skips every phase whose inputs are unchanged."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


def say(message: str) -> None:
    """A progress message on stderr that does not break a running progress bar."""
    tqdm.write(message, file=sys.stderr)


def digest(value: Any) -> str:
    """A short stable hash of JSON-able ``value``."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Phase:
    """One step of the pipeline, complete when ``folder/phase.json`` holds the hash of its inputs."""

    name: str
    folder: Path
    inputs: dict[str, Any]

    @property
    def key(self) -> str:
        return digest(self.inputs)

    @property
    def record_path(self) -> Path:
        return self.folder / "phase.json"

    def completed(self) -> dict[str, Any] | None:
        """The stored result if the phase ran to completion with these inputs, else ``None``."""
        if not self.record_path.is_file():
            return None
        record = json.loads(self.record_path.read_text())
        return record["result"] if record.get("key") == self.key else None

    def reset(self, run_dir: Path) -> None:
        """Remove the folder and the sample files a previous run of this phase wrote."""
        if self.record_path.is_file():
            old = json.loads(self.record_path.read_text()).get("result", {})
            for point in old.get("points", []):
                (run_dir / point["samples"]).unlink(missing_ok=True)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)

    def finish(self, result: dict[str, Any], wall_s: float) -> None:
        result = {**result, "wall_s": round(wall_s, 2)}
        record = {"name": self.name, "key": self.key, "inputs": self.inputs, "result": result}
        self.record_path.write_text(json.dumps(record, indent=2, default=str))


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` as JSON lines (creating the folder); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
