"""Safe loading of checkpoints, recognised by content, never by file name.

Formats read:

* the reference agent's checkpoint (``format == "plasticity-probe/dqn-checkpoint"``): online and
  target networks, θ_0, probe batch, config;
* a plain ``torch.save(state_dict)`` (CleanRL's ``.cleanrl_model`` is one), or a dict holding
  state dicts (``{"model": …}``, Lightning's ``{"state_dict": …}``);
* a Stable-Baselines3 ``.zip``: ``policy.pth`` is read with ``weights_only=True``; the ``data``
  entry is parsed as JSON and only its plain values are kept (its ``:serialized:`` pickles are
  never decoded);
* safetensors files (the ``safetensors`` extra).

Every torch load uses ``weights_only=True``. A file that would need arbitrary unpickling is
refused with the reason; there is no unsafe fallback.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import pickle
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from plasticity_probe import metrics as M
from plasticity_probe.report import LayerRecord, Report

__all__ = [
    "AGENT_FORMAT",
    "CheckpointError",
    "LoadedCheckpoint",
    "load_checkpoint",
    "mlp_from_state_dict",
    "weight_layers",
    "weight_report",
]

AGENT_FORMAT = "plasticity-probe/dqn-checkpoint"
StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A file that cannot be read as a checkpoint; the message says why in one line."""


@dataclass
class LoadedCheckpoint:
    """Networks (name → state dict) and whatever else the file holds."""

    path: Path
    kind: str
    networks: dict[str, StateDict]
    init: StateDict | None = None
    config: dict[str, Any] | None = None
    probe_batch: dict[str, torch.Tensor] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def _torch_load(source: Path | io.BytesIO, what: str) -> Any:
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).split("\n")[0] if str(err) else "unsafe pickle content"
        detail = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
        raise CheckpointError(
            f"refused {what}: it needs arbitrary unpickling, which can run code "
            f"({detail or reason}); only weights_only-loadable files are read"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, struct.error) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{what} is truncated or corrupt ({first})") from None


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _from_torch_object(path: Path, data: Any) -> LoadedCheckpoint:
    if isinstance(data, Mapping) and data.get("format") == AGENT_FORMAT:
        return LoadedCheckpoint(
            path,
            "agent",
            {"online": dict(data["online"]), "target": dict(data["target"])},
            init=dict(data["init"]),
            config=dict(data["config"]),
            probe_batch=data.get("probe_batch"),
            metadata={"step": data.get("step"), "versions": data.get("versions", {})},
        )
    if _is_state_dict(data):
        return LoadedCheckpoint(path, "state_dict", {"model": dict(data)})
    if isinstance(data, Mapping):
        nets = {str(k): dict(v) for k, v in data.items() if _is_state_dict(v)}
        if nets:
            plain = {str(k): v for k, v in data.items() if isinstance(v, int | float | str | bool)}
            return LoadedCheckpoint(path, "state_dict", nets, metadata=plain)
    raise CheckpointError(f"{path} holds no state dict (found {type(data).__name__})")


def _load_sb3(path: Path, archive: zipfile.ZipFile) -> LoadedCheckpoint:
    policy = _torch_load(io.BytesIO(archive.read("policy.pth")), f"{path}:policy.pth")
    if not _is_state_dict(policy):
        raise CheckpointError(f"{path}: policy.pth is not a state dict")
    metadata: dict[str, Any] = {}
    if "data" in archive.namelist():
        try:
            data = json.loads(archive.read("data"))
            metadata = {k: v for k, v in data.items() if isinstance(v, int | float | str | bool)}
            policy_class = data.get("policy_class", {})
            if isinstance(policy_class, dict) and isinstance(policy_class.get("__module__"), str):
                metadata["policy_class"] = policy_class["__module__"]
        except (json.JSONDecodeError, UnicodeDecodeError):
            metadata = {}
    groups: dict[str, StateDict] = {}
    for key, value in policy.items():
        prefix, _, rest = key.partition(".")
        groups.setdefault(prefix, {})[rest] = value
    if set(groups) >= {"q_net", "q_net_target"}:  # DQN: two Q-networks
        nets = {"q_net": groups["q_net"], "q_net_target": groups["q_net_target"]}
    else:
        nets = {"policy": dict(policy)}
    return LoadedCheckpoint(path, "sb3", nets, metadata=metadata)


def _load_safetensors(path: Path) -> LoadedCheckpoint:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(
            f"{path} is a safetensors file; install the extra: pip install 'plasticity-probe[safetensors]'"
        ) from None
    try:
        return LoadedCheckpoint(path, "safetensors", {"model": load_file(str(path))})
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a valid safetensors file ({err})") from None


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n <= size - 8 and head[8:9] == b"{"


def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Read any supported checkpoint safely; ``CheckpointError`` says why a file is refused."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty")
    with path.open("rb") as f:
        head = f.read(16)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                if "policy.pth" in names:
                    return _load_sb3(path, archive)
        except zipfile.BadZipFile:
            raise CheckpointError(f"{path} is a truncated or corrupt zip archive") from None
        if not any(n.endswith("data.pkl") for n in names):
            raise CheckpointError(f"{path} is a zip archive but neither a torch checkpoint nor an SB3 model")
        loaded = _from_torch_object(path, _torch_load(path, str(path)))
    elif _looks_like_safetensors(head, size):
        loaded = _load_safetensors(path)
    elif head[:1] == b"\x80":  # a legacy (non-zip) torch/pickle file
        loaded = _from_torch_object(path, _torch_load(path, str(path)))
    else:
        raise CheckpointError(f"{path} is not a checkpoint (not torch, Stable-Baselines3 or safetensors)")
    for net, sd in loaded.networks.items():
        for key, tensor in sd.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(f"{path}: {net} parameter {key} holds NaN or Inf")
    return loaded


def weight_layers(state_dict: StateDict) -> dict[str, StateDict]:
    """Group a state dict by module path (``net.0.weight`` → layer ``net.0``), in file order;
    only floating-point tensors; buffers such as BatchNorm running stats are kept with their
    module."""
    layers: dict[str, StateDict] = {}
    for key, tensor in state_dict.items():
        if not tensor.is_floating_point():
            continue
        module, _, name = key.rpartition(".")
        layers.setdefault(module or "(root)", {})[name] = tensor
    return layers


def weight_report(state_dict: StateDict, init: StateDict | None = None) -> Report:
    """Weight-only metrics per layer (file order, since no forward pass is available):
    weight magnitude, mean |w|, stable and effective rank of the weight matrix, and the
    distance ``‖θ − θ_0‖₂`` when ``init`` is given."""
    records = []
    all_params: list[torch.Tensor] = []
    for index, (name, tensors) in enumerate(weight_layers(state_dict).items(), start=1):
        params = [t for k, t in tensors.items() if k in ("weight", "bias") or not k.startswith("running")]
        params = [t for t in params if t.is_floating_point()]
        all_params += params
        values = {"weight_magnitude": M.weight_magnitude(params), "mean_abs_weight": M.mean_abs_weight(params)}
        w = tensors.get("weight")
        if w is not None and w.ndim >= 2:
            matrix = w.reshape(w.shape[0], -1)
            values["weight_stable_rank"] = M.stable_rank(matrix)
            values["weight_effective_rank"] = M.effective_rank(matrix)
        if init is not None:
            prefix = "" if name == "(root)" else name + "."
            pairs = [(t, init.get(prefix + k)) for k, t in tensors.items() if t.is_floating_point()]
            squared = 0.0
            for t, p0 in pairs:
                if p0 is None or p0.shape != t.shape:
                    break
                squared += float(((t.double() - p0.double()) ** 2).sum())
            else:
                values["distance_from_init"] = math.sqrt(squared)
        kind = "linear" if w is not None and w.ndim == 2 else "conv" if w is not None and w.ndim > 2 else "other"
        records.append(LayerRecord(name, index, kind, sum(t.numel() for t in params), None, values))
    network = {"weight_magnitude": M.weight_magnitude(all_params), "mean_abs_weight": M.mean_abs_weight(all_params)}
    return Report(records, network)


def mlp_from_state_dict(state_dict: StateDict) -> tuple[nn.Sequential, dict[str, str]] | None:
    """Rebuild a chain of linear layers with ReLU between them (an assumption the caller must
    state) when the state dict is exactly such a chain; returns the model and the map from its
    layer names to the checkpoint's, or None when it is not a chain."""
    layers = weight_layers(state_dict)
    shapes = []
    for name, tensors in layers.items():
        w = tensors.get("weight")
        if w is None or w.ndim != 2 or set(tensors) - {"weight", "bias"}:
            return None
        shapes.append((name, w.shape[1], w.shape[0], "bias" in tensors))
    if not shapes or any(a[2] != b[1] for a, b in itertools.pairwise(shapes)):
        return None
    modules: list[nn.Module] = []
    names: dict[str, str] = {}
    for i, (name, n_in, n_out, bias) in enumerate(shapes):
        if i:
            modules.append(nn.ReLU())
        names[str(len(modules))] = name
        modules.append(nn.Linear(n_in, n_out, bias=bias))
    model = nn.Sequential(*modules)
    with torch.no_grad():
        for idx, name in names.items():
            layer = model[int(idx)]
            for k, t in layers[name].items():
                getattr(layer, k).copy_(t)
    return model, names
