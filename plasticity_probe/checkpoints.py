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

Hostile files are bounded before anything is materialized: the sizes a zip archive declares for
its members, and every tensor's claimed size, are checked against ``max_bytes`` (default
``MAX_BYTES``, 2 GiB), and a tensor that claims more elements than its stored data holds (an
expanded or overlapping-strided tensor) is refused. The reference agent's checkpoint carries a
SHA-256 ``checksum`` of its content, verified on load.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import pickle
import struct
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from plasticity_probe import metrics as M
from plasticity_probe.report import LayerRecord, Report

__all__ = [
    "AGENT_FORMAT",
    "MAX_BYTES",
    "CheckpointError",
    "LoadedCheckpoint",
    "content_digest",
    "load_checkpoint",
    "mlp_from_state_dict",
    "safe_torch_load",
    "verify_digest",
    "weight_layers",
    "weight_report",
]

AGENT_FORMAT = "plasticity-probe/dqn-checkpoint"
MAX_BYTES = 2 * 1024**3
"""Default cap on what one checkpoint may make us allocate (declared zip sizes, tensor sizes)."""
MAX_SVD_DIM = 4096
"""Largest smaller side of a weight matrix whose ranks ``weight_report`` computes (an SVD of
4096 × 4096 takes seconds; of 30,000 × 30,000, tens of minutes)."""
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


def _digest_parts(obj: Any) -> Iterator[bytes | memoryview]:
    if isinstance(obj, Mapping):
        yield b"{"
        for key in sorted(obj, key=repr):
            yield repr(key).encode()
            yield from _digest_parts(obj[key])
        yield b"}"
    elif isinstance(obj, list | tuple):
        yield b"["
        for item in obj:
            yield from _digest_parts(item)
        yield b"]"
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        if t.numel() == 1 and t.stride(0) != 1:  # "contiguous" with any stride; the byte view needs 1
            t = t.clone(memory_format=torch.contiguous_format)
        yield f"tensor {obj.dtype} {tuple(obj.shape)}".encode()
        yield t.view(torch.uint8).numpy().data
    else:
        yield f"{type(obj).__name__} {obj!r}".encode()


def content_digest(obj: Any) -> str:
    """SHA-256 (hex) of a checkpoint's content: nested dicts, lists, tensors (dtype, shape and
    bytes) and plain values. Equal before ``torch.save`` and after ``torch.load``."""
    h = hashlib.sha256()
    for part in _digest_parts(obj):
        h.update(part)
    return h.hexdigest()


def verify_digest(data: Mapping[str, Any], what: str) -> None:
    """Check ``data["checksum"]`` against the digest of everything else in ``data``."""
    stored = data.get("checksum")
    actual = content_digest({k: v for k, v in data.items() if k != "checksum"})
    if stored != actual:
        raise CheckpointError(
            f"{what}: checksum mismatch, the file is corrupt (changed after it was written); its content is not used"
        )


def _check_tensors(obj: Any, what: str, max_bytes: int, total: list[int]) -> None:
    """Refuse tensors claiming more elements than their data holds, and a total past the cap."""
    if isinstance(obj, Mapping):
        for v in obj.values():
            _check_tensors(v, what, max_bytes, total)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _check_tensors(v, what, max_bytes, total)
    elif isinstance(obj, torch.Tensor):
        stored = obj.untyped_storage().nbytes()
        claimed = obj.numel() * obj.element_size()
        if claimed > stored:
            raise CheckpointError(
                f"{what}: a tensor of shape {tuple(obj.shape)} claims {claimed:,} bytes but its data holds "
                f"{stored:,} (an expanded or strided tensor); refused before materializing it"
            )
        total[0] += claimed
        if total[0] > max_bytes:
            raise CheckpointError(f"{what}: its tensors need more than the {_size(max_bytes)} limit (max_bytes)")


def _size(n: int) -> str:
    return f"{n / 1024**3:.3g} GiB" if n >= 1024**3 else f"{n / 1024**2:.3g} MiB"


def _check_zip(archive: zipfile.ZipFile, what: str, max_bytes: int) -> None:
    """Declared uncompressed sizes of the members within the cap (zipfile never inflates a
    member past its declared size)."""
    declared = sum(info.file_size for info in archive.infolist())
    if declared > max_bytes:
        raise CheckpointError(
            f"{what}: its zip members would inflate to {_size(declared)}, more than the {_size(max_bytes)} limit"
        )


def safe_torch_load(source: Path | io.BytesIO, what: str) -> Any:
    """``torch.load(weights_only=True)`` on the CPU, its errors as one ``CheckpointError`` line
    naming ``what``: refused when the file needs arbitrary unpickling, or truncated or corrupt."""
    try:
        if isinstance(source, Path):  # a file object: torch would pick a loader by the file name
            with source.open("rb") as f:
                return torch.load(f, map_location="cpu", weights_only=True)
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).split("\n")[0] if str(err) else "unsafe pickle content"
        detail = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
        raise CheckpointError(
            f"refused {what}: it needs arbitrary unpickling, which can run code "
            f"({detail or reason}); only weights_only-loadable files are read"
        ) from None
    except MemoryError:
        raise CheckpointError(f"{what}: not enough memory to load it") from None
    except Exception as err:  # torch raises many types on damaged files (RuntimeError, IndexError…)
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
        if "checksum" in data:  # version 3 on; older files carry none
            verify_digest(data, str(path))
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


def _load_sb3(path: Path, archive: zipfile.ZipFile, max_bytes: int) -> LoadedCheckpoint:
    policy_info = archive.getinfo("policy.pth")
    if policy_info.file_size > max_bytes:
        raise CheckpointError(f"{path}: policy.pth would inflate to {_size(policy_info.file_size)}, past the limit")
    policy_bytes = io.BytesIO(archive.read("policy.pth"))
    with zipfile.ZipFile(policy_bytes) as inner:
        _check_zip(inner, f"{path}:policy.pth", max_bytes)
    policy_bytes.seek(0)
    policy = safe_torch_load(policy_bytes, f"{path}:policy.pth")
    _check_tensors(policy, f"{path}:policy.pth", max_bytes, [0])
    if not _is_state_dict(policy):
        raise CheckpointError(f"{path}: policy.pth is not a state dict")
    metadata: dict[str, Any] = {}
    if "data" in archive.namelist() and archive.getinfo("data").file_size <= max_bytes:
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


def _load_safetensors(path: Path, max_bytes: int) -> LoadedCheckpoint:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(
            f"{path} is a safetensors file; install the extra: pip install 'plasticity-probe[safetensors]'"
        ) from None
    if path.stat().st_size > max_bytes:  # safetensors tensors are dense slices of the file
        raise CheckpointError(f"{path}: {_size(path.stat().st_size)} is more than the {_size(max_bytes)} limit")
    try:
        return LoadedCheckpoint(path, "safetensors", {"model": load_file(str(path))})
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a valid safetensors file ({err})") from None


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n <= size - 8 and head[8:9] == b"{"


def load_checkpoint(path: str | Path, *, max_bytes: int = MAX_BYTES) -> LoadedCheckpoint:
    """Read any supported checkpoint safely; ``CheckpointError`` says why a file is refused.
    ``max_bytes`` caps what the file may make us allocate (see the module docstring)."""
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
                _check_zip(archive, str(path), max_bytes)
                names = archive.namelist()
                if "policy.pth" in names:
                    return _load_sb3(path, archive, max_bytes)
                if not any(n.endswith("data.pkl") for n in names):
                    raise CheckpointError(f"{path} is a zip archive but neither a torch checkpoint nor an SB3 model")
                bad = archive.testzip()  # every member's CRC-32: a flipped bit in any torch file
                if bad is not None:
                    raise CheckpointError(f"{path} is corrupt: member {bad} fails its CRC-32 check")
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as err:
            raise CheckpointError(f"{path} is a truncated or corrupt zip archive ({err})") from None
        data = safe_torch_load(path, str(path))
        _check_tensors(data, str(path), max_bytes, [0])
        loaded = _from_torch_object(path, data)
    elif _looks_like_safetensors(head, size):
        loaded = _load_safetensors(path, max_bytes)
    elif head[:1] == b"\x80":  # a legacy (non-zip) torch/pickle file
        if size > max_bytes:
            raise CheckpointError(f"{path}: {_size(size)} is more than the {_size(max_bytes)} limit")
        data = safe_torch_load(path, str(path))
        _check_tensors(data, str(path), max_bytes, [0])
        loaded = _from_torch_object(path, data)
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
    distance ``‖θ − θ_0‖₂`` when ``init`` is given. Ranks are skipped (with a note) for matrices
    whose smaller side exceeds ``MAX_SVD_DIM``: their SVD would take minutes."""
    records = []
    notes: list[str] = []
    all_params: list[torch.Tensor] = []
    for index, (name, tensors) in enumerate(weight_layers(state_dict).items(), start=1):
        # parameters only: BatchNorm's running statistics are buffers, not weights
        kept = {k: t for k, t in tensors.items() if not k.startswith("running") and t.is_floating_point()}
        params = list(kept.values())
        all_params += params
        values = {"weight_magnitude": M.weight_magnitude(params), "mean_abs_weight": M.mean_abs_weight(params)}
        w = tensors.get("weight")
        if w is not None and w.ndim >= 2:
            matrix = w.reshape(w.shape[0], -1)
            if min(matrix.shape) <= MAX_SVD_DIM:
                values["weight_stable_rank"] = M.stable_rank(matrix)
                values["weight_effective_rank"] = M.effective_rank(matrix)
            else:
                notes.append(f"{name}: weight ranks skipped, {tuple(matrix.shape)} is past the SVD limit {MAX_SVD_DIM}")
        if init is not None:
            prefix = "" if name == "(root)" else name + "."
            pairs = [(t, init.get(prefix + k)) for k, t in kept.items()]
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
    return Report(records, network, notes=notes)


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
