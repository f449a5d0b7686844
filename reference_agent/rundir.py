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

import errno
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from reference_agent.config import DQNConfig

CONFIG = "config.json"
STATUS = "status.json"
METRICS = "metrics.jsonl"
PLASTICITY = "plasticity.jsonl"
INTERVENTIONS = "interventions.jsonl"
CHECKPOINT = "checkpoint.pt"
LOCK = ".lock"
TMP_SUFFIX = ".tmp"


class LockedError(RuntimeError):
    """Another process is writing this directory."""


@contextmanager
def lock(directory: Path, what: str = "run directory") -> Iterator[None]:
    """Hold ``directory/.lock`` (an OS file lock, released when the process exits, also when it
    is killed) while writing the directory; a second writer gets ``LockedError`` at once."""
    directory.mkdir(parents=True, exist_ok=True)
    file_lock = FileLock(directory / LOCK, blocking=False)
    try:
        file_lock.acquire()
    except Timeout:
        raise LockedError(f"{directory}: another process is writing this {what} (lock {LOCK} held)") from None
    try:
        yield
    finally:
        file_lock.release()


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the temporary files an interrupted ``atomic_write`` left (a process killed mid-write
    cannot clean up). Only safe under ``lock``: no other writer can be using them."""
    stale = [p for p in directory.glob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through ``write(file)`` into a temporary file beside ``path``, fsync, then rename
    over ``path``: readers see the old file or the new one, never a partial one. A full disk or
    another write error raises ``OSError`` naming ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        reason = os.strerror(err.errno) if err.errno else str(err)
        if err.errno == errno.ENOSPC:
            reason += " (the previous file is kept)"
        failure = OSError(f"cannot write {path}: {reason}")
        failure.errno = err.errno
        raise failure from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """Strict JSON (NaN or Inf is an error, never written)."""
    text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text), mode="w")


def read_json(path: Path) -> Any:
    """A JSON file; ``ValueError`` naming the file when it is not valid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None


def read_config(run_dir: Path) -> DQNConfig:
    """The run's ``config.json``; ``ValueError`` naming the file when it holds no valid config."""
    path = run_dir / CONFIG
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise ValueError(f"{path} holds no config")
    try:
        return DQNConfig.from_dict(data["config"])
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _step(r: dict[str, Any]) -> bool:
    return isinstance(r.get("step"), int) and not isinstance(r["step"], bool) and r["step"] >= 0


def valid_metric(r: dict[str, Any]) -> bool:
    """A ``metrics.jsonl`` record as the agent writes it: an integer step, a known ``kind`` and
    numbers where readers use them."""
    kind = r.get("kind")
    if not _step(r):
        return False
    if kind == "eval":
        return _number(r.get("return_mean")) and math.isfinite(r["return_mean"])
    if kind == "update":
        return all(_number(r.get(k)) for k in ("loss", "q_mean", "target_mean"))
    return kind == "train_episode"


def valid_plasticity(r: dict[str, Any]) -> bool:
    """A ``plasticity.jsonl`` row: integer step and index, string layer and metric, numeric or
    null value."""
    return (
        _step(r)
        and isinstance(r.get("layer"), str)
        and isinstance(r.get("metric"), str)
        and isinstance(r.get("index"), int)
        and (r.get("value") is None or _number(r.get("value")))
    )


def valid_intervention(r: dict[str, Any]) -> bool:
    """An ``interventions.jsonl`` record: integer step, string kind, integer unit counts."""
    counts = (r.get("units"), r.get("units_reset"))
    return (
        _step(r)
        and isinstance(r.get("kind"), str)
        and all(isinstance(c, int) and not isinstance(c, bool) for c in counts)
    )


VALIDATORS: dict[str, Callable[[dict[str, Any]], bool]] = {
    METRICS: valid_metric,
    PLASTICITY: valid_plasticity,
    INTERVENTIONS: valid_intervention,
}


@dataclass
class Records:
    """The valid records of a JSONL file, and the numbers (1-based) of the lines skipped."""

    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: list[int] = field(default_factory=list)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    def problem(self) -> str | None:
        """One line describing the skipped lines, or None."""
        if not self.bad_lines:
            return None
        shown = ", ".join(map(str, self.bad_lines[:5])) + (", …" if len(self.bad_lines) > 5 else "")
        return f"{self.path}: skipped {len(self.bad_lines)} malformed record(s) (line {shown})"


def read_jsonl(path: Path) -> Records:
    """Records of a run's JSONL file. A line that is not a JSON object in the file's format (a
    torn last line after a crash, a hand edit, bytes that are not UTF-8) is skipped and its
    number kept in ``bad_lines``."""
    out = Records(path)
    if not path.exists():
        return out
    valid = VALIDATORS.get(path.name, lambda r: True)
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                record = None
            if isinstance(record, dict) and valid(record):
                out.records.append(record)
            else:
                out.bad_lines.append(number)
    return out


def truncate_jsonl(path: Path, max_step: int) -> Records:
    """Keep only valid records with ``step <= max_step`` (on resume: drop what came after the
    checkpoint, and malformed lines); returns what was read."""
    read = read_jsonl(path)
    if path.exists():
        kept = [r for r in read.records if r["step"] <= max_step]
        atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept)), mode="w")
    return read
