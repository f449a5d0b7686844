"""The run directory and its files, written atomically.

Layout of ``OUT/<run-name>/`` (see docs/file-formats.md)::

    config.json        the DQNConfig, package versions, seed
    status.json        {"state": running|finished|interrupted|diverged|failed, "step", "message", …}
    metrics.jsonl      one JSON object per line: {"step", "kind": train_episode|update|eval, …}
    plasticity.jsonl   long rows: {"step", "network", "layer", "index", "metric", "value"}
    interventions.jsonl one record per intervention (step, kind, units reset per layer, dormant before/after)
    checkpoint.pt      see reference_agent.checkpoint
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

CONFIG = "config.json"
STATUS = "status.json"
METRICS = "metrics.jsonl"
PLASTICITY = "plasticity.jsonl"
INTERVENTIONS = "interventions.jsonl"
CHECKPOINT = "checkpoint.pt"


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through ``write(file)`` into a temporary file beside ``path``, fsync, then rename
    over ``path``: readers see the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2, sort_keys=True) + "\n"), mode="w")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a JSONL file; a torn last line (a crash mid-write) is skipped."""
    if not path.exists():
        return
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep only records with ``step <= max_step`` (on resume: drop what came after the checkpoint)."""
    if not path.exists():
        return
    kept = [r for r in read_jsonl(path) if r.get("step", 0) <= max_step]
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept)), mode="w")
