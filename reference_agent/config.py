"""The reference DQN's configuration: the paper's settings, and where the paper is silent the
values of the authors' CS285-based code (see DESIGN.md, "What the paper leaves out")."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from plasticity_probe.regularizers import Variant


class Reg(str, Enum):
    """Which penalty to add to the TD loss (``none`` = the no-regularization baseline)."""

    none = "none"
    l2 = "l2"
    l2init = "l2init"
    singular = "singular"
    l1 = "l1"


class InterventionKind(str, Enum):
    """Which intervention to apply every ``intervention_every`` steps once learning starts."""

    none = "none"
    redo = "redo"
    shrink_perturb = "shrink-perturb"
    reset_last = "reset-last"


class RegEvery(str, Enum):
    """When to add the penalty: every update, or only on target-network updates (t mod τ = 0)."""

    update = "update"
    target = "target"


_ENUMS: dict[str, type[Enum]] = {e.__name__: e for e in (Reg, RegEvery, Variant, InterventionKind)}
_KIND_NAMES = {int: "an integer", float: "a number", str: "a string"}


def _scalar(value: Any, kind: type) -> int | float | str | None:
    """``value`` as ``kind`` (``int``: a whole-number float too; ``float``: an integer too), or
    None when it is not one (a bool is neither an integer nor a number here)."""
    if isinstance(value, bool):
        return None
    if kind is str:
        return value if isinstance(value, str) else None
    if kind is int:
        if isinstance(value, int):
            return value
        return int(value) if isinstance(value, float) and value.is_integer() else None
    return float(value) if isinstance(value, int | float) else None


class ConfigError(ValueError):
    """Invalid settings: ``problems`` are ``(field, message)`` pairs; the message names the fields,
    or, through ``message(name)``, the user's names for them (``--steps`` for ``total_steps``).
    A message may refer to another field as ``{field}``."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__(self.message())

    def message(self, name: Callable[[str], str] = str) -> str:
        return "invalid config: " + "; ".join(describe(f, m, name) for f, m in self.problems)


def describe(field_name: str, message: str, name: Callable[[str], str] = str) -> str:
    """``"<name(field)> <message>"``, with ``{other_field}`` in the message replaced by its name."""
    fields = {f.name: name(f.name) for f in dataclasses.fields(DQNConfig)}
    return f"{name(field_name)} {message.format(**fields)}"


@dataclass
class DQNConfig:
    """Every field is a ``probe train`` option (``--total-steps`` for ``total_steps``…)."""

    env_id: str = "CartPole-v1"
    """Gymnasium environment id; discrete actions and a flat observation vector."""
    seed: int = 0
    """Seeds the network initialization, ε-greedy, replay sampling and environment resets."""
    total_steps: int = 100_000
    """Environment steps to train for (the paper: 100,000)."""
    learning_rate: float = 1e-3
    """Adam learning rate, constant (the paper: 1e-3)."""
    batch_size: int = 512
    """Minibatch size of each gradient step (authors' code: 512)."""
    gamma: float = 0.99
    """Discount factor γ."""
    buffer_size: int = 0
    """Replay capacity; 0 means ``total_steps`` (the authors' buffer holds every transition)."""
    learning_starts: int = 20_000
    """First environment step with a gradient step (authors' code: 20,000)."""
    target_update_period: int = 1000
    """τ: hard copy of the online network into the target network every τ steps."""
    eps_start: float = 1.0
    """ε of ε-greedy at step 0."""
    eps_end: float = 0.02
    """ε after the decay."""
    eps_fraction: float = 0.1
    """Fraction of ``total_steps`` over which ε falls linearly from ``eps_start`` to ``eps_end``."""
    hidden_sizes: tuple[int, ...] = (64, 64)
    """Widths of the hidden layers of the Q-network MLP (ReLU)."""
    reg: Reg = Reg.none
    """Penalty added to the TD loss: none, l2, l2init, singular, l1."""
    lam: float = 0.01
    """λ, overall strength of the penalty (the paper: 0.01; 0.001 for singular)."""
    delta: float = 1.25
    """δ, per-layer growth: layer l weighted δ^l (the paper's best: 1.25; 1 = constant)."""
    reg_every: RegEvery = RegEvery.update
    """Add the penalty every update, or only when t mod τ = 0 (target updates)."""
    reg_variant: Variant = Variant.paper
    """Penalty formula: paper (the equations) or authors (their code: unsquared weight-only l2/l2init
    with their indexing, singular on the penultimate features without δ)."""
    reg_layers: tuple[str, ...] = ()
    """Layers to penalize, by module path (empty: all; "net.2": the penultimate layer only, as
    the authors' code did for singular with delta 1). Indices l stay those of the full network."""
    intervention: InterventionKind = InterventionKind.none
    """Intervention every intervention_every steps after learning starts: none, redo (reset τ-dormant
    units (τ = redo_tau) on the step's minibatch; Sokar et al. 2023), shrink-perturb (θ ← 0.8 θ + 0.01
    θ_fresh; Ash & Adams 2020) or reset-last (re-initialize the output layer; Nikishin et al. 2022);
    Adam's state of the changed entries is reset."""
    intervention_every: int = 1000
    """Steps between interventions, counted from learning_starts (the ReDo paper: 1000)."""
    redo_tau: float = 0.025
    """τ of --intervention redo: units with normalized score ≤ τ are reset (the ReDo paper: 0.025 in
    its default setting, 0.1 otherwise, e.g. at a replay ratio of 1 as here)."""
    eval_every: int = 5000
    """Evaluate the greedy policy every this many steps."""
    eval_episodes: int = 5
    """Episodes per evaluation, on a separate environment."""
    probe_every: int = 5000
    """Plasticity report on the fixed probe batch every this many steps (0: never)."""
    probe_batch_size: int = 512
    """Transitions in the fixed probe batch, drawn from the buffer when learning starts."""
    hessian_every: int = 0
    """TD-loss Hessian λ_max/λ_min on the probe batch every this many steps (0: never)."""
    log_every: int = 1000
    """Average and log TD loss, Q-values and target values every this many steps."""
    checkpoint_every: int = 10_000
    """Write the checkpoint every this many steps (and at the end or on interruption)."""
    threads: int = 1
    """torch intra-op threads."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form tags recorded in config.json (e.g. the sweep a run belongs to)."""

    def __post_init__(self) -> None:
        types = [(name, message) for name in TYPED if (message := self._coerce(name)) is not None]
        if types:  # the value checks below need the types
            raise ConfigError(types)
        problems: list[tuple[str, str]] = []
        for name in (
            "total_steps",
            "batch_size",
            "target_update_period",
            "eval_episodes",
            "log_every",
            "checkpoint_every",
            "threads",
            "eval_every",
            "intervention_every",
        ):
            if getattr(self, name) < 1:
                problems.append((name, "must be >= 1"))
        for name in ("learning_starts", "buffer_size", "probe_every", "hessian_every", "probe_batch_size"):
            if getattr(self, name) < 0:
                problems.append((name, "must be >= 0"))
        for name in ("eps_start", "eps_end", "eps_fraction", "gamma"):
            if not 0 <= getattr(self, name) <= 1:  # NaN fails every comparison
                problems.append((name, "must lie in [0, 1]"))
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            problems.append(("learning_rate", "must be a finite number > 0"))
        if not (math.isfinite(self.lam) and self.lam >= 0):
            problems.append(("lam", "must be a finite number >= 0"))
        if not (math.isfinite(self.delta) and self.delta > 0):
            problems.append(("delta", "must be a finite number > 0"))
        if not (math.isfinite(self.redo_tau) and self.redo_tau >= 0):
            problems.append(("redo_tau", "must be a finite number >= 0"))
        if not self.hidden_sizes or min(self.hidden_sizes) < 1:
            problems.append(("hidden_sizes", "must be positive widths"))
        if problems:
            raise ConfigError(problems)

    def _coerce(self, name: str) -> str | None:
        """Set field ``name`` to its type (``TYPED``), or return what is wrong with its value. An
        integer field takes a float that is a whole number (JSON writes ``1e5`` as a float); a float
        field takes an integer; nothing takes a bool but a bool field."""
        value, kind = getattr(self, name), TYPED[name]
        if isinstance(kind, type) and issubclass(kind, Enum):
            try:
                setattr(self, name, kind(value))
            except ValueError:
                return f"must be one of {', '.join(m.value for m in kind)}, not {value!r}"
            return None
        if kind in (int, float, str):
            coerced = _scalar(value, kind)
            if coerced is None:
                return f"must be {_KIND_NAMES[kind]}, not {value!r}"
            setattr(self, name, coerced)
            return None
        item = int if name == "hidden_sizes" else str
        items = [_scalar(v, item) for v in value] if isinstance(value, list | tuple) else None
        if items is None or any(v is None for v in items):
            return f"must be a list of {'integers' if item is int else 'strings'}, not {value!r}"
        setattr(self, name, tuple(items))
        return None

    def warnings(self) -> list[tuple[str, str]]:
        """Settings that are valid but probably not meant: ``(field, message)`` pairs."""
        if self.learning_starts >= self.total_steps:
            return [
                (
                    "learning_starts",
                    f"{self.learning_starts:,} >= {{total_steps}} {self.total_steps:,}: the run never takes a "
                    "gradient step (no learning, no plasticity reports)",
                )
            ]
        return []

    @property
    def capacity(self) -> int:
        return self.buffer_size or self.total_steps

    def updates_by(self, step: int) -> int:
        """Gradient steps a run has taken by environment step ``step`` (steps count from 1; one
        gradient step per environment step from ``learning_starts``)."""
        return max(0, step - max(self.learning_starts, 1) + 1)

    @property
    def run_name(self) -> str:
        """``<env>__<reg>[_lam…_d…_<every>][_<intervention>-every<n>]__s<seed>``: unique per
        configuration and seed."""
        if self.reg is Reg.none:
            reg = "none"
        else:
            reg = f"{self.reg.value}_lam{self.lam:g}_d{self.delta:g}_{self.reg_every.value}"
            if self.reg_variant is Variant.authors:
                reg += "_authors"
            if self.reg_layers:
                reg += "_layers-" + "+".join(self.reg_layers)
        if self.intervention is not InterventionKind.none:
            reg += f"_{self.intervention.value}-every{self.intervention_every}"
            if self.intervention is InterventionKind.redo and self.redo_tau != 0.025:
                reg += f"-tau{self.redo_tau:g}"
        return f"{self.env_id}__{reg}__s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["reg"] = self.reg.value
        d["reg_every"] = self.reg_every.value
        d["reg_variant"] = self.reg_variant.value
        d["intervention"] = self.intervention.value
        d["hidden_sizes"] = list(self.hidden_sizes)
        d["reg_layers"] = list(self.reg_layers)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DQNConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if data.get("reg_squared") is False:
            raise ValueError("reg_squared=False was replaced by reg_variant='authors' (which is not the same penalty)")
        unknown.discard("reg_squared")
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return cls(**{k: v for k, v in data.items() if k in names})


def _field_type(annotation: str) -> type:
    scalars: dict[str, type] = {"int": int, "float": float, "str": str}
    return scalars.get(annotation) or _ENUMS.get(annotation) or tuple


TYPED: dict[str, type] = {f.name: _field_type(str(f.type)) for f in dataclasses.fields(DQNConfig) if f.name != "extra"}
"""Each field's type (``int``, ``float``, ``str``, an enum, or ``tuple`` for the tuples of
``hidden_sizes`` and ``reg_layers``), checked and coerced by ``DQNConfig.__post_init__``."""


def epsilon(step: int, cfg: DQNConfig) -> float:
    """Linear ε schedule: ``eps_start`` at step 0 to ``eps_end`` at ``eps_fraction·total_steps``,
    constant afterwards."""
    horizon = cfg.eps_fraction * cfg.total_steps
    if horizon <= 0:
        return cfg.eps_end
    frac = min(step / horizon, 1.0)
    return cfg.eps_start + frac * (cfg.eps_end - cfg.eps_start)
