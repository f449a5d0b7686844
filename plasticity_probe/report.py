"""Per-layer records of plasticity metrics and their renderings (long rows, dict, JSON, table).

Long-row format (``Report.rows()``), one dict per (layer, metric)::

    {"layer": "net.0", "index": 1, "metric": "effective_rank", "value": 41.7}

Whole-network aggregates use ``layer = "network"`` and ``index = 0``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.table import Table
from rich.text import Text

from plasticity_probe.layers import SkippedModule

__all__ = ["NETWORK", "GroupRecord", "LayerRecord", "Report"]

NETWORK = "network"


@dataclass
class LayerRecord:
    """Metrics of one layer: module path, 1-based forward index, kind, sizes, metric values and
    the qualified names of the parameters counted with it."""

    name: str
    index: int
    kind: str
    n_params: int
    n_units: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    params: list[str] = field(default_factory=list)


@dataclass
class GroupRecord:
    """Parameters that belong to no layer (see ``plasticity_probe.layers.ParamGroup``): owning
    module, the forward index they are counted with, their names, why, and weight metrics."""

    name: str
    index: int
    n_params: int
    params: list[str]
    reason: str
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Report:
    """A plasticity report: one record per layer, whole-network aggregates, skipped modules,
    notes (e.g. why a condition number is undefined) and the parameter groups."""

    layers: list[LayerRecord]
    network: dict[str, float] = field(default_factory=dict)
    skipped: list[SkippedModule] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    groups: list[GroupRecord] = field(default_factory=list)

    def __getitem__(self, name: str) -> LayerRecord:
        for record in self.layers:
            if record.name == name:
                return record
        raise KeyError(f"no layer named {name!r}; layers: {[r.name for r in self.layers]}")

    def value(self, layer: str, metric: str) -> float:
        """One value; ``layer="network"`` for the aggregates."""
        if layer == NETWORK:
            return self.network[metric]
        return self[layer].metrics[metric]

    def rows(self) -> list[dict[str, Any]]:
        """Long format: one dict per (layer, metric) with keys layer, index, metric, value."""
        rows = [
            {"layer": r.name, "index": r.index, "metric": m, "value": v}
            for r in self.layers
            for m, v in r.metrics.items()
        ]
        rows += [{"layer": NETWORK, "index": 0, "metric": m, "value": v} for m, v in self.network.items()]
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [
                {
                    "name": r.name,
                    "index": r.index,
                    "kind": r.kind,
                    "n_params": r.n_params,
                    "n_units": r.n_units,
                    "metrics": dict(r.metrics),
                    "params": list(r.params),
                }
                for r in self.layers
            ],
            "groups": [asdict(g) for g in self.groups],
            "network": dict(self.network),
            "skipped": [{"name": s.name, "reason": s.reason} for s in self.skipped],
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        return cls(
            layers=[
                LayerRecord(**{**d, "metrics": {k: _none_to_nan(v) for k, v in d["metrics"].items()}})
                for d in data["layers"]
            ],
            network={k: _none_to_nan(v) for k, v in data.get("network", {}).items()},
            skipped=[SkippedModule(**s) for s in data.get("skipped", [])],
            notes=list(data.get("notes", [])),
            groups=[
                GroupRecord(**{**g, "metrics": {k: _none_to_nan(v) for k, v in g["metrics"].items()}})
                for g in data.get("groups", [])
            ],
        )

    def to_json(self, **kwargs: Any) -> str:
        """JSON text; NaN and Inf become ``null`` so the output is strict JSON."""
        return json.dumps(finite_or_none(self.to_dict()), **kwargs)

    def metric_names(self) -> list[str]:
        names: list[str] = []
        for r in self.layers:
            names += [m for m in r.metrics if m not in names]
        return names

    def table(self, title: str | None = None, *, rows: str = "layer") -> Table:
        """A rich table with one row per layer plus a ``network`` row (``rows="layer"``), or, for
        narrow terminals, one row per metric and one column per layer (``rows="metric"``)."""
        if rows not in ("layer", "metric"):
            raise ValueError(f"rows must be 'layer' or 'metric', got {rows!r}")
        metrics = self.metric_names()
        network_only = [m for m in self.network if m not in metrics]
        table = Table(title=Text(title) if title is not None else None, show_lines=False)  # names verbatim
        if rows == "metric":
            table.add_column("metric")
            for r in self.layers:
                table.add_column(Text(f"{r.index}: {r.name}"), justify="right")
            table.add_column(NETWORK, justify="right")
            for m in (*metrics, *network_only):
                table.add_row(Text(m), *(_fmt(r.metrics.get(m)) for r in self.layers), _fmt(self.network.get(m)))
            return table
        for col in ("l", "layer", "kind", "params", *metrics):
            header = col.replace("_", "\n")  # narrow columns: one word per line
            table.add_column(Text(header), justify="left" if col in ("layer", "kind") else "right")
        for r in self.layers:
            table.add_row(
                str(r.index), Text(r.name), Text(r.kind), str(r.n_params), *(_fmt(r.metrics.get(m)) for m in metrics)
            )
        if self.network:
            total = str(sum(r.n_params for r in self.layers))
            table.add_row("", NETWORK, "", total, *(_fmt(self.network.get(m)) for m in metrics))
            caption = "  ".join(f"{m} = {_fmt(self.network[m])}" for m in network_only)
            table.caption = Text(caption) if caption else None
        return table

    def table_width(self) -> int:
        """Roughly the width the one-row-per-layer table needs, in characters."""
        return 40 + 11 * len(self.metric_names())


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e6):
        return str(int(v))
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return f"{v:.4g}"


def _none_to_nan(v: float | None) -> float:
    return math.nan if v is None else v


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float, at any depth of dicts and lists, replaced by None
    (strict JSON has no NaN or Infinity)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite_or_none(v) for v in obj]
    return obj
