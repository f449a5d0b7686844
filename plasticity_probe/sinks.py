"""Writers for reports and scalars: JSONL, CSV and TensorBoard.

Every sink has ``write(step, report, **tags)`` for a :class:`~plasticity_probe.report.Report`
and ``write_scalars(step, values, **tags)`` for other numbers, and is a context manager.
JSONL and CSV append to one file per run and flush after every write, so a crash loses at most
the write in progress. Row format (JSONL: one object per line; CSV: these columns)::

    step, <tags…>, layer, index, metric, value        # reports (long rows)
    step, <tags…>, metric, value                      # scalars

NaN and Inf are written as ``null`` in JSONL (at any depth of a record) and as ``nan``/``inf`` in CSV.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from plasticity_probe.report import Report, finite_or_none

__all__ = ["CsvSink", "JsonlSink", "TensorBoardSink"]


class _FileSink:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = self.path.open("a", encoding="utf-8", newline="")

    def write(self, step: int, report: Report, **tags: Any) -> None:
        self._write_rows([{"step": step, **tags, **row} for row in report.rows()])

    def write_scalars(self, step: int, values: Mapping[str, float], **tags: Any) -> None:
        self._write_rows([{"step": step, **tags, "metric": k, "value": v} for k, v in values.items()])

    def _write_rows(self, rows: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> _FileSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class JsonlSink(_FileSink):
    """Appends one JSON object per row to ``path``; ``write_record`` appends any dict."""

    def _write_rows(self, rows: list[dict[str, Any]]) -> None:
        self._file.write("".join(json.dumps(finite_or_none(r), allow_nan=False) + "\n" for r in rows))
        self._file.flush()

    def write_record(self, record: Mapping[str, Any]) -> None:
        self._write_rows([dict(record)])


class CsvSink(_FileSink):
    """Appends rows to a CSV file; the header is taken from the first row written to a new file.
    Later rows must have the same keys (a missing key is written empty)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self._writer: csv.DictWriter[str] | None = None
        if self.path.stat().st_size > 0:
            with self.path.open(encoding="utf-8", newline="") as f:
                header = next(csv.reader(f), None)
            if header:
                self._writer = csv.DictWriter(self._file, fieldnames=header, extrasaction="raise")

    def _write_rows(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        if self._writer is None:
            self._writer = csv.DictWriter(self._file, fieldnames=list(rows[0]), extrasaction="raise")
            self._writer.writeheader()
        self._writer.writerows(rows)
        self._file.flush()


class TensorBoardSink:
    """Writes scalars ``<prefix><layer>/<metric>`` to TensorBoard event files in ``logdir``.
    Needs the ``tensorboard`` extra (``pip install 'plasticity-probe[tensorboard]'``)."""

    def __init__(self, logdir: str | Path, prefix: str = "plasticity/") -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError("TensorBoardSink needs tensorboard: pip install 'plasticity-probe[tensorboard]'") from err
        self.prefix = prefix
        self._writer = SummaryWriter(log_dir=str(logdir))

    def write(self, step: int, report: Report, **tags: Any) -> None:
        group = "".join(f"{v}/" for v in tags.values())
        for row in report.rows():
            self._writer.add_scalar(f"{self.prefix}{group}{row['layer']}/{row['metric']}", row["value"], step)
        self._writer.flush()

    def write_scalars(self, step: int, values: Mapping[str, float], **tags: Any) -> None:
        group = "".join(f"{v}/" for v in tags.values())
        for k, v in values.items():
            self._writer.add_scalar(f"{group}{k}", v, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> TensorBoardSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
