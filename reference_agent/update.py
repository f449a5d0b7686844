"""One gradient step of K stacked runs: TD losses, penalties, hand-derived backward, Adam.

    y      = r + γ (1 − terminated) max_a' Q_target(s', a')        (no gradient through y; the
                                                                    replay buffer holds max_a' Q_target)
    L_k    = mean_b (Q_k(s_b, a_b) − y_b)²                          (MSE TD loss of run k)
    θ_k   ← Adam(θ_k, ∂/∂θ_k [L_k + Σ_i λ δ^i R(θ_k,i)])             (Teo et al. 2023, eq. 3)

``td_gradients`` is the step before Adam: ``td_forward`` (the online network, the TD error and
``dL/dQ``; the target network's values come from the replay buffer, see ``replay``), the
singular penalties (``singular_terms``: Gram matrices, ``eigh``, weights) and ``td_backward``
(the gradients, the singular penalty's feature gradients and the parameter penalties). Eagerly,
torch's fused Adam kernel follows. With ``compile=True`` the whole step, Adam included
(``adam_step``, the same formula written out), is compiled by inductor (``CompiledStep``), which
fuses the element-wise work, Adam's with the gradients', into a few C++ loops around the matrix
products and LAPACK calls and runs them from a C++ wrapper. That costs a one-off compilation
(cached on disk) and makes an update faster on the CPU (docs/performance.md); results agree with
the eager step to float32 rounding (tests/test_engine.py). A compiled step works through the runs in chunks
of ``CHUNK_RUNS`` (``over_chunks``), unrolled in one graph: a chunk's activations stay in the
core's cache between the kernels that read them, where K runs' activations at once do not. A
compiled step whose plain ``eigh`` fails (or gives non-finite values) changes nothing and is redone
eagerly with the library's fallbacks.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from reference_agent.config import DQNConfig, Reg
from reference_agent.penalties import StackedPenalty, param_penalties, singular_terms
from reference_agent.replay import Batch
from reference_agent.stacked import RowGrad, StackedQ, mlp_backward, mlp_forward

COMPILE_OPTIONS: dict[str, str | int | bool | Callable[..., Any]] = {"cpp_wrapper": True}
"""Inductor options: the compiled graph's wrapper in C++ instead of Python (measured: the update
at K = 1 in about 0.65× the time of the Python wrapper's, docs/performance.md)."""


class _ExpectedProxyFallback(logging.Filter):
    """Drops inductor's notice that a LAPACK op (``eigh``) of a C++-wrapped graph is called
    through its proxy executor: expected for the singular penalty, and nothing a user can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "missing a c-shim implementation" not in record.getMessage()


logging.getLogger("torch._inductor.ir").addFilter(_ExpectedProxyFallback())

CHUNK_RUNS = 4
"""Runs per chunk of a compiled step (``python -m bench.bench_engine chunks``, docs/performance.md:
the paper's LunarLander batch of 19 runs in 0.70× the time of one unchunked graph; in an earlier
run of the same command, chunks of 2 gained 2 % more and took 50 s to compile)."""


def run_chunks(k: int, size: int) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` of near-equal chunks of at most ``size`` of ``k`` runs."""
    n = math.ceil(k / size)
    bounds, start = [], 0
    for i in range(n):
        stop = start + k // n + (1 if i < k % n else 0)
        bounds.append((start, stop))
        start = stop
    return tuple(bounds)


def stack_key(cfg: DQNConfig) -> tuple[bool, str, str, tuple[str, ...]]:
    """Where a run goes in its batch's stack (``sorted`` by this key, stable): the runs with the
    singular penalty first, those with the same schedule, variant and layers side by side, so that
    they share the compiled step's chunks (``CHUNK_RUNS``). A chunk with singular runs gathers
    their features, calls ``eigh`` once per layer and scatters the gradients back, whatever their
    number: the update of CartPole's 24 runs with none/l2/l2init/singular in turn took 497 and 473
    µs per run spread over the 6 chunks, 391 and 417 with the 6 singular runs in two
    (docs/performance.md). A run's results do not depend on its place in the stack."""
    return (cfg.reg is not Reg.singular, cfg.reg_every.value, cfg.reg_variant.value, tuple(cfg.reg_layers))


Runs = tuple[tuple[int, ...], ...]
"""Per layer, the runs whose singular penalty is added at a step (``Schedule.singular_runs``)."""


def over_chunks(fn: Callable[..., Any], bounds: tuple[tuple[int, int], ...]) -> Callable[..., Any]:
    """``fn(*args, runs)`` on each chunk of runs (rows ``start:stop`` of every tensor argument:
    each has the runs on dim 0; ``runs`` renumbered within the chunk), its outputs (tensors with
    the runs on dim 0) concatenated along the runs."""
    if len(bounds) == 1:
        return fn

    def chunked(*args: Any, runs: Runs) -> Any:
        outs = [
            fn(
                *tree_map(lambda x, a=a, b=b: x[a:b] if isinstance(x, torch.Tensor) else x, args),
                runs=tuple(tuple(r - a for r in layer if a <= r < b) for layer in runs),
            )
            for a, b in bounds
        ]
        flat = [tree_flatten(out) for out in outs]
        leaves = [torch.cat(parts) for parts in zip(*(leaves for leaves, _ in flat), strict=True)]
        return tree_unflatten(leaves, flat[0][1])

    return chunked


def td_forward(
    params: Sequence[torch.Tensor],
    obs: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    next_value: torch.Tensor,
    terminated: torch.Tensor,
    gamma: float,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The online network's features, ``dL/dQ`` ``(K, B, n_actions)`` and the statistics
    ``(K, 3)``: TD loss, mean Q(s, a), mean target y; ``next_value``: ``max_a' Q_target(s', a')``
    of each transition (``Batch.next_value``)."""
    y = rewards + gamma * torch.rsub(terminated, 1.0) * next_value
    features = mlp_forward(params, obs)
    index = actions.unsqueeze(2)
    q_sa = features[-1].gather(2, index).squeeze(2)
    err = q_sa - y
    grad_q = torch.zeros_like(features[-1]).scatter(2, index, (err * (2.0 / err.shape[1])).unsqueeze(2))
    stats = torch.stack((err.square().mean(dim=1), q_sa.mean(dim=1), y.mean(dim=1)), dim=1)
    return features, grad_q, stats


def td_backward(
    params: Sequence[torch.Tensor],
    init: Sequence[torch.Tensor],
    obs: torch.Tensor,
    features: Sequence[torch.Tensor],
    grad_q: torch.Tensor,
    feature_grads: Sequence[RowGrad | None],
    coefs: dict[str, torch.Tensor],
    mask: torch.Tensor,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The gradient of TD loss + penalties per parameter tensor, and the parameter penalties
    per run and tensor ``(K, n_params)``; ``feature_grads``: the singular penalties' gradients on
    the features (``singular_terms``)."""
    grads = mlp_backward(params, obs, features, grad_q, feature_grads)
    units, penalty_grads = param_penalties(params, init, coefs, mask)
    return [g if extra is None else g + extra for g, extra in zip(grads, penalty_grads, strict=True)], units


def td_gradients(
    params: Sequence[torch.Tensor],
    init: Sequence[torch.Tensor],
    obs: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    next_value: torch.Tensor,
    terminated: torch.Tensor,
    gamma: float,
    coefs: dict[str, torch.Tensor],
    mask: torch.Tensor,
    singular_coefs: torch.Tensor,
    *,
    runs: Runs,
    robust: bool = False,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """``td_forward``, ``singular_terms`` for the runs ``runs`` and ``td_backward``: the
    gradients, the statistics ``(K, 3)``, the parameter penalties ``(K, n_params)`` and the
    singular penalties ``(K, n_layers)``."""
    features, grad_q, stats = td_forward(params, obs, actions, rewards, next_value, terminated, gamma)
    feature_units, feature_grads = singular_terms(features, singular_coefs, runs, robust)
    grads, units = td_backward(params, init, obs, features, grad_q, feature_grads, coefs, mask)
    return grads, stats, units, feature_units


def summary(stats: torch.Tensor, units: torch.Tensor, feature_units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The update's statistics ``(K, 4)`` (TD loss, mean Q, mean target, penalty) and every
    penalty term ``(K, n_params + n_layers)`` (``StackedPenalty.record``), from ``td_gradients``'
    statistics, parameter penalties and singular penalties."""
    terms = torch.cat((units, feature_units), dim=1)
    return torch.cat((stats, terms.sum(dim=1, keepdim=True)), dim=1), terms


def adam_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    step: torch.Tensor,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    ok: torch.Tensor | None = None,
) -> None:
    """One Adam step in place (Kingma & Ba 2015; ``torch.optim.Adam`` without weight decay, as its
    fused kernel computes it), with t = step + 1:

        m ← β1 m + (1 − β1) g,    v ← β2 v + (1 − β2) g²,
        θ ← θ − lr / (1 − β1^t) · m / (√v / √(1 − β2^t) + ε),    step ← t.

    Tensor code for the compiled step, where inductor fuses it with the gradients. ``ok`` (a 0-dim
    bool tensor): where it is false nothing changes (a step whose eigendecomposition failed)."""
    beta1, beta2 = betas
    t = step + 1
    step_size = lr / (1 - beta1**t)
    bias2_sqrt = (1 - beta2**t).sqrt()
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        m_new = m.lerp(g, 1 - beta1)
        v_new = v * beta2 + (1 - beta2) * g * g
        p_new = p - step_size * m_new / (v_new.sqrt() / bias2_sqrt + eps)
        if ok is not None:
            m_new, v_new, p_new = (torch.where(ok, new, old) for new, old in ((m_new, m), (v_new, v), (p_new, p)))
        m.copy_(m_new)
        v.copy_(v_new)
        p.copy_(p_new)
    step.copy_(t if ok is None else torch.where(ok, t, step))


class BatchedUpdate:
    """``update(step, batch) -> (K, 4)`` statistics (TD loss, mean Q, mean target, penalty) after
    one gradient step of every run of ``online``.

    ``optimizer`` is a ``torch.optim.Adam`` over the stacked parameters that holds the state
    (created at once, so that interventions and checkpoints find it before the first step) in the
    format ``torch.optim.Adam`` saves; its parameters share one ``step`` tensor (they always take
    the same steps), and the update steps them itself: eagerly with the fused Adam kernel, compiled
    with ``adam_step``. Load a saved state with ``load_optimizer_state``."""

    def __init__(
        self,
        online: StackedQ,
        penalty: StackedPenalty,
        *,
        lr: float,
        gamma: float,
        compile: bool = False,
    ) -> None:
        self.online, self.penalty, self.gamma = online, penalty, gamma
        self.optimizer = torch.optim.Adam(online.params(), lr=lr, fused=True)
        device = online.params()[0].device
        self._step_count = torch.zeros((), dtype=torch.float32, device=device)
        for p in online.params():
            self.optimizer.state[p] = {
                "step": self._step_count,
                "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": torch.zeros_like(p),
            }
        self._link_state()
        self._use(compile)

    def load_optimizer_state(self, state_dict: dict[str, Any]) -> None:
        """``optimizer.load_state_dict``, the parameters' step tensors shared again afterwards."""
        self.optimizer.load_state_dict(state_dict)
        self._step_count = self.optimizer.state[self.online.params()[0]]["step"]
        self._link_state()

    def _link_state(self) -> None:
        """One ``step`` tensor for all parameters, and the moments' lists the steps pass to Adam
        (the tensors are only ever changed in place, except by ``load_optimizer_state``)."""
        states = [self.optimizer.state[p] for p in self.online.params()]
        for s in states:
            s["step"] = self._step_count
        self._exp_avgs = [s["exp_avg"] for s in states]
        self._exp_avg_sqs = [s["exp_avg_sq"] for s in states]

    def __call__(self, step: int, batch: Batch) -> torch.Tensor:
        if batch.next_value is None:
            raise ValueError("the update needs the next-state values of the batch (Batch.next_value)")
        params = self.online.params()
        schedule = self.penalty.schedule(step)
        runs = schedule.singular_runs
        args = (
            params,
            self.penalty.init,
            batch.obs,
            batch.actions,
            batch.rewards,
            batch.next_value,
            batch.terminated,
            self.gamma,
            self.penalty.param_coefs,
            schedule.mask,
            self.penalty.singular_coefs,
        )
        with torch.no_grad():
            out = None
            if self._compiled is not None:
                try:
                    out = self._compiled_step(args, runs)
                except torch._inductor.exc.InductorError as err:  # no working C++ compiler here
                    warnings.warn(f"inductor failed ({err}); the engine continues without compiling", stacklevel=2)
                    self._use(False)
            if out is None:  # eager, or a compiled step that failed and changed nothing
                grads, stats, units, feature_units = td_gradients(*args, runs=runs, robust=any(runs))
                self._fused_adam(params, grads)
                out = summary(stats, units, feature_units)
            stats, units = out
            self.penalty.record(schedule.active, units)
        return stats

    def _compiled_step(self, args: tuple[Any, ...], runs: Runs) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The compiled step (gradients and Adam), or None where its plain ``eigh`` failed or was
        not finite (then it changed nothing)."""
        assert self._compiled is not None
        try:
            stats, units, *ok = self._compiled(args, self._exp_avgs, self._exp_avg_sqs, self._step_count, runs)
        except RuntimeError as err:  # LAPACK's failure (a compiled graph raises it as RuntimeError)
            if not any(runs) or isinstance(err, torch._inductor.exc.InductorError):
                raise  # no eigh in this step's graph: the error is not LAPACK's
            return None
        return (stats, units) if not ok or bool(ok[0]) else None

    def _fused_adam(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """torch's fused Adam kernel on the stacked parameters (the eager step)."""
        group = self.optimizer.param_groups[0]
        self._step_count.add_(1)
        beta1, beta2 = group["betas"]
        torch._fused_adam_(
            params,
            grads,
            self._exp_avgs,
            self._exp_avg_sqs,
            [],
            [self._step_count] * len(params),
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            amsgrad=False,
            maximize=False,
        )

    def _use(self, compile: bool) -> None:
        """The compiled step (``CompiledStep`` with the optimizer's lr, betas and eps as constants
        of the graph: the engine never changes them), or None: eager."""
        if not compile:
            self._compiled: CompiledStep | None = None
            return
        group = self.optimizer.param_groups[0]
        self._compiled = CompiledStep(
            run_chunks(self.online.k, CHUNK_RUNS),
            lr=group["lr"],
            betas=tuple(group["betas"]),
            eps=group["eps"],
        )


class CompiledStep:
    """``td_gradients`` in chunks of runs (``over_chunks``), ``adam_step`` and ``summary`` as one
    inductor-compiled graph per singular-penalty schedule ``runs`` (and γ and parameter-penalty
    kinds), called on its flat tensor inputs: ``(args, exp_avgs, exp_avg_sqs, step, runs) ->
    (statistics (K, 4), terms[, ok])``, ``args`` as ``td_gradients`` takes them; ``ok`` (with an
    ``eigh`` in the graph): its values were finite, else the step changed nothing.

    Each schedule is traced once to an FX graph (``make_fx`` on fake tensors) and compiled by
    ``torch._inductor.standalone_compile``, specialized to the inputs' shapes and strides, which
    the compiled graph checks on every call (a mismatch raises). Later calls go straight to the
    compiled graph, without ``torch.compile``'s per-call frame evaluation and guards: about 70 of
    the 265 µs of an update at K = 1 (docs/performance.md). The engine's inputs fit: the stacked
    parameters, moments and step count are the same tensors for the whole run, every minibatch has
    the same shapes and layout. Inductor's CPU vector instruction sets are taken from the CPU's
    flags (``cpp.vec_isa_ok``) instead of being probed by building and loading a test library in
    ten subprocesses, about 1.1 s per process (a build that fails raises ``InductorError``, and
    the engine goes on eagerly)."""

    def __init__(
        self, bounds: tuple[tuple[int, int], ...], *, lr: float, betas: tuple[float, float], eps: float
    ) -> None:
        self._gradients = over_chunks(td_gradients, bounds)
        self._hyper: dict[str, Any] = {"lr": lr, "betas": betas, "eps": eps}
        self._graphs: dict[tuple[Runs, float, tuple[str, ...]], Callable[..., Any]] = {}

    def __call__(
        self,
        args: tuple[Any, ...],
        exp_avgs: list[torch.Tensor],
        exp_avg_sqs: list[torch.Tensor],
        step: torch.Tensor,
        runs: Runs,
    ) -> Sequence[torch.Tensor]:
        params, init, obs, actions, rewards, next_value, terminated, gamma, coefs, mask, singular_coefs = args
        # the tensors of (args, exp_avgs, exp_avg_sqs, step) in pytree order, listed by hand
        # (``_compile`` checks the order): a tree_flatten of them costs about 27 µs per call
        flat = [
            *params,
            *init,
            obs,
            actions,
            rewards,
            next_value,
            terminated,
            *coefs.values(),
            mask,
            singular_coefs,
            *exp_avgs,
            *exp_avg_sqs,
            step,
        ]
        key = (runs, gamma, tuple(coefs))
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._compile((args, exp_avgs, exp_avg_sqs, step), flat, runs)
        return graph(*flat)

    def _compile(self, inputs: Any, flat: list[torch.Tensor], runs: Runs) -> Callable[..., Any]:
        """The compiled graph of one schedule for ``inputs`` (``(args, exp_avgs, exp_avg_sqs,
        step)``), called with ``flat``, their tensors; their other leaves (γ) are constants."""
        leaves, spec = tree_flatten(inputs)
        at = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        if len(at) != len(flat) or any(leaves[i] is not t for i, t in zip(at, flat, strict=True)):
            # a bug, not LAPACK's failure: not a RuntimeError, which the update would take for one
            raise AssertionError("CompiledStep: the flat inputs do not follow the inputs' pytree order")

        constants = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]  # γ

        def train_step(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
            values = list(constants)
            for i, t in zip(at, tensors, strict=True):
                values[i] = t
            args, exp_avgs, exp_avg_sqs, step = tree_unflatten(values, spec)
            grads, stats, units, feature_units = self._gradients(*args, runs=runs)
            ok = torch.isfinite(feature_units).all() if any(runs) else None
            adam_step(args[0], grads, exp_avgs, exp_avg_sqs, step, ok=ok, **self._hyper)
            out = summary(stats, units, feature_units)
            return out if ok is None else (*out, ok)

        graph = make_fx(train_step, tracing_mode="fake")(*flat)
        options = {"config_patches": {**COMPILE_OPTIONS, "cpp.vec_isa_ok": True}}
        return torch._inductor.standalone_compile(
            graph, list[Any](flat), dynamic_shapes="from_example_inputs", options=options
        )
