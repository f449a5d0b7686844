"""``probe analyze`` as a function: plasticity reports of every network of a checkpoint.

* Reference-agent checkpoint: the Q-networks are rebuilt from the config; activation metrics on
  the stored probe batch (or ``obs``), and the TD-loss Hessian with ``hessian=True``.
* Any other checkpoint: weight metrics per layer; when the weights form a chain of linear layers
  the MLP is rebuilt (ReLU assumed, and said so) so that ``obs`` gives activation metrics;
  ``model="module:factory"`` supplies the architecture instead.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import plasticity_probe as pp
from plasticity_probe.checkpoints import (
    MAX_BYTES,
    CheckpointError,
    LoadedCheckpoint,
    load_checkpoint,
    mlp_from_state_dict,
    safe_torch_load,
    weight_report,
)
from plasticity_probe.probe import DEFAULT_METRICS
from reference_agent.config import DQNConfig
from reference_agent.engine import td_loss
from reference_agent.network import QNetwork, check_architecture
from reference_agent.replay import Batch


@dataclass
class Analysis:
    path: Path
    kind: str
    reports: dict[str, pp.Report]
    notes: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "networks": {k: json.loads(r.to_json()) for k, r in self.reports.items()},
            "notes": self.notes,
            "metadata": {k: v for k, v in self.metadata.items() if isinstance(v, int | float | str | bool | None)},
        }


def load_observations(path: Path) -> torch.Tensor:
    """A (N, obs_dim) float array from ``.npy`` (no pickles) or ``.pt`` (weights_only; a tensor
    or a dict with ``obs``)."""
    if not path.exists():
        raise CheckpointError(f"--obs: {path}: no such file")
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise CheckpointError(f"--obs: {path} is not a plain .npy array ({err})") from None
        obs = torch.from_numpy(np.asarray(array, dtype=np.float32))
    elif path.suffix == ".pt":
        data = safe_torch_load(path, f"--obs {path}")
        found = data.get("obs") if isinstance(data, dict) else data
        if not isinstance(found, torch.Tensor):
            raise CheckpointError(f"--obs: {path} holds no tensor (or dict with 'obs')")
        if found.numel() * found.element_size() > found.untyped_storage().nbytes():
            raise CheckpointError(
                f"--obs: {path} holds an expanded or strided tensor; give the observations themselves"
            )
        obs = found.float()
    else:
        raise CheckpointError(f"--obs: {path} must be a .npy or .pt file")
    if obs.ndim != 2 or obs.shape[0] == 0:
        raise CheckpointError(f"--obs: expected a (N, obs_dim) array, got shape {tuple(obs.shape)}")
    if not bool(torch.isfinite(obs).all()):
        raise CheckpointError(f"--obs: {path} holds NaN or Inf")
    return obs


def load_factory(spec: str) -> nn.Module:
    """``package.module:factory`` → ``factory()``, which must return an ``nn.Module``. The module
    is looked up in the current directory first, as ``python -m`` does (a console script's
    ``sys.path`` does not hold it)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model expects module:factory, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"--model: cannot import {module_name!r} ({err}); run from its directory or set PYTHONPATH"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"--model: {spec} is not a callable")
    try:
        model = factory()
    except Exception as err:  # the user's code: report it in one line
        raise ValueError(f"--model: {spec}() failed: {type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model: {spec}() returned {type(model).__name__}, not an nn.Module")
    return model


def _check_obs(obs: torch.Tensor, n_inputs: int, net: str) -> None:
    if obs.shape[1] != n_inputs:
        raise CheckpointError(f"--obs has {obs.shape[1]} features per sample but network {net!r} expects {n_inputs}")


def _first_linear_inputs(model: nn.Module) -> int | None:
    first = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
    return first.in_features if first is not None else None


def _agent_reports(
    ckpt: LoadedCheckpoint, obs: torch.Tensor | None, hessian: bool, gradients: bool
) -> tuple[dict[str, pp.Report], list[str]]:
    assert ckpt.config is not None
    try:
        cfg = DQNConfig.from_dict(ckpt.config)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{ckpt.path}: its config is invalid ({err})") from None
    obs_dim, n_actions = check_architecture(ckpt.networks, cfg.hidden_sizes, str(ckpt.path))
    nets = {}
    for name, sd in ckpt.networks.items():
        net = QNetwork(obs_dim, n_actions, cfg.hidden_sizes)
        net.load_state_dict(sd)
        nets[name] = net
    notes = [f"reference-agent checkpoint at step {ckpt.metadata.get('step')}, {cfg.env_id}, reg {cfg.reg.value}"]
    pb = ckpt.probe_batch
    batch_obs = obs if obs is not None else (pb["obs"] if pb is not None else None)
    if obs is not None:
        _check_obs(obs, obs_dim, "online")
        notes.append(f"activation metrics on --obs ({obs.shape[0]} samples)")
    elif pb is not None:
        notes.append(f"activation metrics on the stored probe batch ({pb['obs'].shape[0]} transitions)")
    loss_fn: Callable[[], torch.Tensor] | None = None
    if hessian or gradients:
        if pb is None:
            flag = "--hessian" if hessian else "--gradients"
            raise CheckpointError(f"{flag} needs the checkpoint's probe batch (the TD loss); this one has none")
        batch = Batch(**pb)

        def loss_fn() -> torch.Tensor:
            return td_loss(nets["online"], nets["target"], batch, cfg.gamma)[0]

    reports = {}
    for name, net in nets.items():
        init = ckpt.init if name == "online" else None
        if batch_obs is None:
            reports[name] = weight_report(dict(net.state_dict()), init)
            continue
        metrics = [m for m in (*DEFAULT_METRICS, "weight_stable_rank") if init is not None or m != "distance_from_init"]
        probe = pp.Probe(net, probe_batch=batch_obs, metrics=metrics, init_state=init)
        online = loss_fn is not None and name == "online"
        reports[name] = probe.measure(
            loss_fn=loss_fn if online else None,
            gradients=gradients and online,
            hessian=hessian and online,
            hessian_kwargs={"trace_samples": 20},
        )
    if hessian:
        notes.append("online: Hessian of the TD loss (target network fixed) on the stored probe batch")
    if gradients:
        notes.append("online: gradients of the TD loss (target network fixed) on the stored probe batch")
    return reports, notes


def analyze(
    path: str | Path,
    *,
    obs: str | Path | None = None,
    model: str | None = None,
    hessian: bool = False,
    gradients: bool = False,
    max_bytes: int = MAX_BYTES,
) -> Analysis:
    """Plasticity reports of every network in the checkpoint at ``path``; ``max_bytes`` caps
    what the file may make us allocate (``load_checkpoint``)."""
    ckpt = load_checkpoint(path, max_bytes=max_bytes)
    observations = load_observations(Path(obs)) if obs is not None else None
    if ckpt.kind == "agent":
        reports, notes = _agent_reports(ckpt, observations, hessian, gradients)
        return Analysis(ckpt.path, ckpt.kind, reports, notes, ckpt.metadata)
    if hessian or gradients:
        flag = "--hessian" if hessian else "--gradients"
        raise CheckpointError(f"{flag} needs a loss: only reference-agent checkpoints (with a probe batch) have one")
    reports, notes = {}, [f"{ckpt.kind} checkpoint: weights only, layers in file order"]
    for name, sd in ckpt.networks.items():
        net: nn.Module | None = None
        if model is not None:
            net = load_factory(model)
            try:
                net.load_state_dict(sd)
            except RuntimeError as err:
                raise CheckpointError(f"--model does not match network {name!r}: {str(err).splitlines()[0]}") from None
        elif observations is not None:
            rebuilt = mlp_from_state_dict(sd)
            if rebuilt is None:
                notes.append(
                    f"{name}: not a chain of linear layers; give --model module:factory for activation metrics"
                )
            else:
                net = rebuilt[0]
                notes.append(f"{name}: rebuilt as an MLP from the weight shapes, ReLU between layers assumed")
        if net is None or observations is None:
            reports[name] = weight_report(sd)
            continue
        n_inputs = _first_linear_inputs(net)
        if n_inputs is not None:
            _check_obs(observations, n_inputs, name)
        reports[name] = pp.Probe(
            net, probe_batch=observations, metrics=[*DEFAULT_METRICS, "weight_stable_rank"]
        ).measure()
    return Analysis(ckpt.path, ckpt.kind, reports, notes, ckpt.metadata)


def diff(a: Analysis, b: Analysis) -> list[dict[str, Any]]:
    """Layer-by-layer comparison of two analyses: one row per (network, layer, metric) present in
    both, with both values and ``b − a``."""
    rows = []
    for net in a.reports.keys() & b.reports.keys():
        ra, rb = a.reports[net], b.reports[net]
        ia = {(r["layer"], r["metric"]): r for r in ra.rows()}
        for row in rb.rows():
            key = (row["layer"], row["metric"])
            if key in ia:
                va, vb = ia[key]["value"], row["value"]
                delta = vb - va if isinstance(va, int | float) and isinstance(vb, int | float) else math.nan
                rows.append(
                    {
                        "network": net,
                        "layer": row["layer"],
                        "index": row["index"],
                        "metric": row["metric"],
                        "a": va,
                        "b": vb,
                        "delta": delta,
                    }
                )
    return sorted(rows, key=lambda r: (r["network"], r["index"] or 10**9, r["metric"]))
