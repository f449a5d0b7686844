"""The batched engine: per-run cost of K runs in lockstep against the same K runs one after
another in the same process, the batched-update implementations compared, and the physical
limit (FLOPs of the paper preset, measured matmul throughput).

    python -m bench.bench_engine runs [--k 8 25] [--env CartPole-v1] [--steps 4000] [--compile]
                                      [--penalties none l2 l2init singular]
    python -m bench.bench_engine updates [--k 1 8 25]
    python -m bench.bench_engine chunks [--chunk 1 2 4 19]
    python -m bench.bench_engine limit

``runs``: wall time of whole runs, environments, evaluation, probing and checkpoints included
(learning starts and τ scaled to the run length; evaluation every 5,000 steps, probes every 5,000
and the Hessian every 10,000 as in the paper presets), one torch thread; the runs' penalties
cycle through ``--penalties`` (default: none, l2, l2init, singular).
The sequential and batched measurements alternate (``--rounds``) so that a shared machine's
load falls on both; the ratio is of the medians. Beside them, the floor of the batched run: the
work no batching shares, per run (``update_floor``: the update's matrix products and the singular
penalty's eigendecompositions, each timed alone on this machine; the probes and evaluations as the
batched run spent them): a batched engine with no other cost would reach the floor ratio. Below
the table, ``t(K) = V + F/K`` fitted to all the times (the sequential runs are K = 1): F, the cost
per step that a batch shares, and the best ratio an engine with that F can reach at each K.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, vmap

from bench.common import one_thread, time_per_call


def _configs(env_id: str, k: int, steps: int, penalties: list[str]) -> list:
    from reference_agent.config import DQNConfig, Reg
    from reference_agent.experiments.sweep import paper_lam, scale_steps

    regs = [Reg(p) for p in penalties]
    base = [
        DQNConfig(
            env_id=env_id,
            seed=i,
            reg=regs[i % len(regs)],
            lam=paper_lam(regs[i % len(regs)]),
            hessian_every=10_000,  # as the presets
        )
        for i in range(k)
    ]
    # learning starts, τ, log and checkpoint intervals scale with the run; evaluation, probing and
    # the Hessian keep the paper's intervals, so that they cost what they cost per step in the paper
    return [scale_steps(c, steps, keep=("eval_every", "probe_every", "hessian_every")) for c in base]


def _product_seconds(shape_a: tuple[int, ...], shape_b: tuple[int, ...]) -> float:
    """Time of one ``bmm`` of these shapes, or of its transposed form ``(Bᵀ Aᵀ)ᵀ`` where MKL is
    faster on that (the faster of the two: the floor assumes the best orientation)."""
    a, b = torch.randn(shape_a), torch.randn(shape_b)
    at, bt = a.transpose(1, 2).contiguous(), b.transpose(1, 2).contiguous()
    return min(time_per_call(lambda: torch.bmm(a, b), 200), time_per_call(lambda: torch.bmm(bt, at), 200))


def update_floor(cfgs: list, obs_dim: int, n_actions: int) -> float:
    """Seconds per run-update (averaged over the runs ``cfgs``) of the update's unavoidable work,
    each piece timed alone at the engine's chunk shapes: the matrix products of the forward pass,
    the weight gradients and the input gradients (the update without its element-wise work), and
    for each run with the singular penalty at that update, per penalized layer, its Gram matrix,
    ``eigh`` and the two products of ``2 Φ v vᵀ``."""
    from reference_agent.network import QNetwork
    from reference_agent.penalties import StackedPenalty
    from reference_agent.stacked import StackedQ
    from reference_agent.update import CHUNK_RUNS

    c, b = CHUNK_RUNS, cfgs[0].batch_size
    sizes = (obs_dim, *cfgs[0].hidden_sizes, n_actions)
    products = 0.0
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        products += _product_seconds((c, b, n_in), (c, n_in, n_out))  # forward
        products += _product_seconds((c, n_out, b), (c, b, n_in))  # weight gradient
        if i > 0:
            products += _product_seconds((c, b, n_out), (c, n_out, n_in))  # input gradient
    products /= c
    nets = [QNetwork(obs_dim, n_actions, cfg.hidden_sizes) for cfg in cfgs]
    penalty = StackedPenalty(cfgs, nets, StackedQ(nets).params(), torch.device("cpu"))
    singular = 0.0
    for layer, width in enumerate(sizes[1:]):
        share = sum(1 / every for every, coef in zip(penalty.every, penalty.singular[:, layer], strict=True) if coef)
        if share == 0:
            continue
        gram = torch.randn(1, width, b) @ torch.randn(1, b, width)
        one = _product_seconds((1, width, b), (1, b, width))  # Gram matrix
        one += time_per_call(partial(torch.linalg.eigh, gram), 200)
        one += _product_seconds((1, b, width), (1, width, 2)) + _product_seconds((1, b, 2), (1, 2, width))
        singular += share * one
    return products + singular / len(cfgs)


def _timed(method: Callable[..., object], spent: dict[str, float], name: str) -> Callable[..., object]:
    """``method``, adding the seconds of each call to ``spent[name]``."""

    def wrapper(*args: object, **kwargs: object) -> object:
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - start

    return wrapper


def bench_runs(env_id: str, ks: list[int], steps: int, rounds: int, compile: bool | None, penalties: list[str]) -> None:
    from unittest import mock

    import gymnasium as gym

    from reference_agent import engine, heap
    from reference_agent.engine import EngineOptions, train, train_batch
    from reference_agent.envs import make_env

    options = EngineOptions(compile=compile)
    env = make_env(env_id)
    space, actions = env.observation_space, env.action_space
    assert space.shape is not None and isinstance(actions, gym.spaces.Discrete)  # make_env checked both
    obs_dim, n_actions = int(space.shape[0]), int(actions.n)
    env.close()

    print(
        f"{env_id}, {steps} steps per run (learning starts, τ scaled; evaluation, probes, Hessian at the paper's "
        f"intervals), penalties {'/'.join(penalties)} in turn"
    )
    print("floor: the update's matrix products and eigendecompositions timed alone, plus the probes and")
    print("evaluations as the batched run spent them (the batched engine cannot do its runs in less)")
    print(
        "| K | sequential µs/run-step | batched µs/run-step | ratio "
        "| floor µs/run-step: update, probes, evaluation | floor ratio |"
    )
    print("|---|---|---|---|---|---|")
    points: list[tuple[int, float]] = []  # (K, seconds per run-step): the sequential runs are K = 1
    floor_of: dict[int, float] = {}
    for k in ks:
        cfgs = _configs(env_id, k, steps, penalties)
        seq, bat, floors = [], [], []  # floors: (update, probes, evaluation) seconds per run-step
        for _ in range(rounds):
            out = Path(tempfile.mkdtemp())
            spent = {"_probe": 0.0, "_evaluate": 0.0}
            try:
                start = time.perf_counter()
                for i, c in enumerate(cfgs):
                    train(c, out / f"s{i}", options=options)
                seq.append((time.perf_counter() - start) / (k * steps))
                cls = engine._Engine
                with (
                    mock.patch.object(cls, "_probe", _timed(cls._probe, spent, "_probe")),
                    mock.patch.object(cls, "_evaluate", _timed(cls._evaluate, spent, "_evaluate")),
                ):
                    start = time.perf_counter()
                    train_batch(cfgs, [out / f"b{i}" for i in range(k)], options=options)
                    bat.append((time.perf_counter() - start) / (k * steps))
            finally:
                shutil.rmtree(out)
            updates = steps - cfgs[0].learning_starts + 1
            with heap.train_heap():  # the engine's heap settings, under which its products run
                per_update = update_floor(cfgs, obs_dim, n_actions)
            work = (updates * k * per_update, spent["_probe"], spent["_evaluate"])
            floors.append(tuple(w / (k * steps) for w in work))
        s, b = statistics.median(seq), statistics.median(bat)
        parts = sorted(floors, key=sum)[(len(floors) - 1) // 2]  # the round of the (lower) median floor
        f = sum(parts)
        split = ", ".join(f"{x * 1e6:,.0f}" for x in parts)
        print(f"| {k} | {s * 1e6:,.0f} | {b * 1e6:,.0f} | {b / s:.2f}× | {f * 1e6:,.0f} ({split}) | {f / s:.2f}× |")
        points += [(1, s), (k, b)]
        floor_of[k] = f
    shared, per_run = shared_and_per_run(points)
    worst = max(abs(per_run + shared / k - t) / t for k, t in points)
    print(
        f"t(K) = V + F/K fitted to the {len(points)} times above: F = {shared * 1e6:,.0f} µs per step shared by "
        f"the batch, V = {per_run * 1e6:,.0f} µs per run-step (the fit is within {worst:.0%} of every time)"
    )
    if shared <= 0:
        print("no cost shared by the batch in these times (one-off costs, such as a first compilation, dominate)")
        return
    for k, f in floor_of.items():
        best = (f + shared / k) / (f + shared)
        print(f"K = {k}: an engine with this F and nothing per run beyond the floor reaches {best:.2f}×")


def shared_and_per_run(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares fit of ``t(K) = V + F/K`` to ``(K, t)``, the time per run-step of K runs in
    lockstep: ``(F, V)``, the time per step that a batch shares and the time each run adds.

    The ratio of K runs in lockstep to the same runs one by one is then ``(V + F/K) / (V + F)``,
    which grows with V; with V at its floor it is the best an engine with this F can reach, and a
    faster single run (a smaller F) raises it."""
    ks = np.array([k for k, _ in points], dtype=np.float64)
    times = np.array([t for _, t in points], dtype=np.float64)
    (shared, per_run), *_ = np.linalg.lstsq(np.stack((1.0 / ks, np.ones_like(ks)), axis=1), times, rcond=None)
    return float(shared), float(per_run)


# ---- one batched update, three ways ---------------------------------------------------------
def _update_fns(k: int, sizes: tuple[int, ...], batch: int) -> dict[str, Callable[[], object]]:
    from reference_agent.network import QNetwork
    from reference_agent.stacked import StackedQ

    g = torch.Generator().manual_seed(0)
    obs = torch.randn(k, batch, sizes[0], generator=g)
    nobs = torch.randn(k, batch, sizes[0], generator=g)
    act = torch.randint(0, sizes[-1], (k, batch), generator=g)
    rew = torch.randn(k, batch, generator=g)
    term = torch.zeros(k, batch)
    nval = torch.randn(k, batch, generator=g)  # max_a' Q_target(s', a'), which the replay buffer holds
    nets = [QNetwork(sizes[0], sizes[-1], sizes[1:-1]) for _ in range(k)]

    # (a) hand-derived backward: the engine's update, eager and compiled (update.CompiledStep)
    from reference_agent.config import DQNConfig
    from reference_agent.penalties import StackedPenalty
    from reference_agent.replay import Batch
    from reference_agent.update import BatchedUpdate

    minibatch = Batch(obs=obs, actions=act, rewards=rew, next_obs=nobs, terminated=term, next_value=nval)
    engine_updates = {}
    for compiled in (False, True):
        online = StackedQ(nets)
        penalty = StackedPenalty([DQNConfig()] * k, nets, online.params(), torch.device("cpu"))
        update = BatchedUpdate(online, penalty, lr=1e-3, gamma=0.99, compile=compiled)
        engine_updates[compiled] = partial(update, 1, minibatch)

    # (b) the same batched matrix products, autograd backward
    params_b = [p.clone().requires_grad_() for p in online.params()]
    opt_b = torch.optim.Adam(params_b, lr=1e-3, fused=True)

    def mlp(x: torch.Tensor, ps: list[torch.Tensor]) -> torch.Tensor:
        n = len(ps) // 2
        for i in range(n):
            x = torch.baddbmm(ps[2 * i + 1].unsqueeze(1), x, ps[2 * i].transpose(1, 2))
            x = x.relu() if i < n - 1 else x
        return x

    def autograd_bmm() -> None:
        y = rew + 0.99 * (1 - term) * nval
        q_sa = mlp(obs, params_b).gather(2, act.unsqueeze(2)).squeeze(2)
        loss = (q_sa - y).square().mean(dim=1).sum()
        opt_b.zero_grad(set_to_none=True)
        loss.backward()
        opt_b.step()

    # (c) torch.func: vmap of functional_call over the stacked parameters, autograd backward
    net = nets[0]
    names = [n for n, _ in net.named_parameters()]
    params_c = {n: p.clone().requires_grad_() for n, p in zip(names, online.params(), strict=True)}
    opt_c = torch.optim.Adam(list(params_c.values()), lr=1e-3, fused=True)

    def one_loss(p: dict, o: torch.Tensor, v: torch.Tensor, a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        y = r + 0.99 * v
        q = functional_call(net, p, (o,)).gather(1, a.unsqueeze(1)).squeeze(1)
        return (q - y).square().mean()

    batched_loss = vmap(one_loss)

    def vmap_fc() -> None:
        loss = batched_loss(params_c, obs, nval, act, rew).sum()
        opt_c.zero_grad(set_to_none=True)
        loss.backward()
        opt_c.step()

    return {
        "hand-derived backward, compiled (the engine)": engine_updates[True],
        "hand-derived backward, eager (the engine)": engine_updates[False],
        "bmm + autograd": autograd_bmm,
        "vmap + functional_call": vmap_fc,
    }


def bench_updates(ks: list[int]) -> None:
    from reference_agent import heap

    torch.set_flush_denormal(True)  # as the engine does
    sizes = (8, 64, 64, 4)  # LunarLander, the paper's network
    print("one update (TD loss, backward, Adam), LunarLander sizes 8-64-64-4, batch 512, µs per run")
    with heap.train_heap():  # the engine's heap settings (reference_agent/heap.py)
        fns = {k: _update_fns(k, sizes, 512) for k in ks}
        names = list(fns[ks[0]])
        print("| implementation | " + " | ".join(f"K = {k}" for k in ks) + " |")
        print("|---|" + "---|" * len(ks))
        for name in names:
            cells = [f"{time_per_call(fns[k][name], max(5, 200 // k), warmup=5) / k * 1e6:,.0f}" for k in ks]
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


# ---- the paper's LunarLander batch: chunk sizes of the compiled step ---------------------------
def bench_chunks(sizes: list[int]) -> None:
    """One update of the paper's LunarLander grid for one seed (19 runs: the baseline and l2,
    l2init, singular × δ × frequency) with its penalties, eager and compiled with ``sizes`` runs
    per chunk (19: one unchunked graph), each in this process one after the other."""
    from reference_agent import heap, update
    from reference_agent.experiments.sweep import paper_lunarlander
    from reference_agent.network import QNetwork
    from reference_agent.penalties import StackedPenalty
    from reference_agent.replay import Batch
    from reference_agent.stacked import StackedQ

    torch.set_flush_denormal(True)
    cfgs = paper_lunarlander(1)
    k = len(cfgs)
    g = torch.Generator().manual_seed(0)
    batch = Batch(
        obs=torch.randn(k, 512, 8, generator=g),
        actions=torch.randint(0, 4, (k, 512), generator=g),
        rewards=torch.randn(k, 512, generator=g),
        next_obs=torch.randn(k, 512, 8, generator=g),
        terminated=torch.zeros(k, 512),
        next_value=torch.randn(k, 512, generator=g),
    )
    print(f"one update of the paper's LunarLander batch (K = {k}, penalties included; a step without")
    print("the target-only runs' penalty), µs per run (median of 5 rounds); compile: first call, s")
    print("| update | chunk | µs per run | compile (s) |")
    print("|---|---|---|---|")
    with heap.train_heap():
        for compiled, chunk in [(False, k), *((True, c) for c in sizes)]:
            nets = []
            for c in cfgs:
                torch.manual_seed(c.seed)
                nets.append(QNetwork(8, 4))
            online = StackedQ(nets)
            penalty = StackedPenalty(cfgs, nets, [p.clone() for p in online.params()], torch.device("cpu"))
            update.CHUNK_RUNS = chunk
            step = update.BatchedUpdate(online, penalty, lr=1e-3, gamma=0.99, compile=compiled)
            start = time.perf_counter()
            step(1, batch)
            first = time.perf_counter() - start
            per_run = time_per_call(partial(step, 1, batch), 40, warmup=5) / k * 1e6
            name = "compiled" if compiled else "eager"
            print(f"| {name} | {chunk if compiled else '—'} | {per_run:,.0f} | {first:.1f} |", flush=True)


# ---- the physical limit -----------------------------------------------------------------------
def update_flops(obs_dim: int, n_actions: int, hidden: tuple[int, ...] = (64, 64), batch: int = 512) -> int:
    """Multiply-adds ×2 of one update's matrix products: the online network's forward pass, the
    weight gradients and the input gradients of every layer but the first (the target network's
    values come from the replay buffer: ``value_flops``)."""
    sizes = (obs_dim, *hidden, n_actions)
    layer = [a * b for a, b in itertools.pairwise(sizes)]
    forward = 2 * batch * sum(layer)
    return 2 * forward + 2 * batch * sum(layer[1:])  # fwd online, dW, dX


def value_flops(cfg: object, obs_dim: int, n_actions: int) -> int:
    """Multiply-adds ×2 of the next-state values a run computes: each new transition once
    learning has started, and every stored transition at learning start and after each target
    update (every τ steps)."""
    sizes = (obs_dim, *cfg.hidden_sizes, n_actions)  # type: ignore[attr-defined]
    per_row = 2 * sum(a * b for a, b in itertools.pairwise(sizes))
    steps, start, tau = cfg.total_steps, cfg.learning_starts, cfg.target_update_period  # type: ignore[attr-defined]
    refreshed = sum(min(t, cfg.capacity) for t in [start, *range(start + (-start % tau) or tau, steps + 1, tau)])  # type: ignore[attr-defined]
    return per_row * (steps - start + 1 + refreshed)


def bench_limit() -> None:
    """The paper preset's work that no engine avoids, timed on this machine: the updates' matrix
    products (FLOPs at the measured float32 rate), the singular penalty's Gram matrices and
    products (FLOPs) and its ``eigh`` calls (each timed alone at its size), and the training
    steps of the environments (gymnasium's ``step`` alone, random actions). A lower bound: the
    evaluation episodes, probes, replay sampling and the element-wise work are left out."""
    import gymnasium as gym

    from reference_agent.experiments.sweep import PRESETS
    from reference_agent.network import QNetwork
    from reference_agent.penalties import StackedPenalty
    from reference_agent.stacked import StackedQ

    cfgs = PRESETS["paper"](2)
    dims = {"LunarLander-v3": (8, 4), "CartPole-v1": (4, 2), "MountainCar-v0": (2, 3)}
    total = 0.0
    eighs: dict[int, float] = {}  # matrix size: calls
    env_steps: dict[str, int] = {}
    for c in cfgs:
        obs_dim, n_actions = dims[c.env_id]
        updates = c.total_steps - c.learning_starts + 1
        total += updates * update_flops(obs_dim, n_actions, c.hidden_sizes, c.batch_size) + value_flops(
            c, obs_dim, n_actions
        )
        env_steps[c.env_id] = env_steps.get(c.env_id, 0) + c.total_steps
        net = QNetwork(obs_dim, n_actions, c.hidden_sizes)
        penalty = StackedPenalty([c], [net], StackedQ([net]).params(), torch.device("cpu"))
        calls = updates / int(penalty.every[0])
        for width, coef in zip((*c.hidden_sizes, n_actions), penalty.singular[0], strict=True):
            if coef:
                m = min(width, c.batch_size)
                eighs[m] = eighs.get(m, 0.0) + calls
                total += calls * (2 * c.batch_size * m * m + 2 * 2 * c.batch_size * m * 2)  # Gram, Φv, (Φv)vᵀ
    x, w = torch.randn(512, 64), torch.randn(64, 64)
    mm = 2 * 512 * 64 * 64 / time_per_call(lambda: x @ w, 2000)
    xb, wb = torch.randn(8, 512, 64), torch.randn(8, 64, 64)
    bmm = 8 * 2 * 512 * 64 * 64 / time_per_call(lambda: torch.bmm(xb, wb), 300)
    eigh_seconds = 0.0
    for m, calls in eighs.items():
        phi = torch.randn(1, 512, m).relu()
        gram = phi.transpose(1, 2) @ phi
        eigh_seconds += calls * time_per_call(partial(torch.linalg.eigh, gram), 300)
    env_seconds = 0.0
    rng = np.random.default_rng(0)
    for env_id, steps in env_steps.items():
        env = gym.make(env_id)
        env.reset(seed=0)
        n, start = 3000, time.perf_counter()
        for _ in range(n):
            _, _, terminated, truncated, _ = env.step(int(rng.integers(env.action_space.n)))  # type: ignore[attr-defined]
            if terminated or truncated:
                env.reset()
        env_seconds += steps * (time.perf_counter() - start) / n
        env.close()
    products = total / mm
    floor = products + eigh_seconds + env_seconds
    print(f"paper preset: {len(cfgs)} runs, {total / 1e12:.1f} TFLOP of update matrix products")
    print(f"measured float32 throughput, one thread: mm 512x64 @ 64x64 {mm / 1e9:.0f} GFLOP/s; ", end="")
    print(f"bmm of 8 such products {bmm / 1e9:.0f} GFLOP/s")
    print(f"physical limit of the updates: {products / 60:.1f} min on one core, {products / 120:.1f} min on two")
    print(
        f"with the singular penalty's {sum(eighs.values()) / 1e6:.2f} million eigh calls ({eigh_seconds / 60:.1f} min) "
        f"and {sum(env_steps.values()) / 1e6:.0f} million environment steps ({env_seconds / 60:.1f} min): "
        f"{floor / 60:.1f} min on one core, {floor / 120:.1f} min on two"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("part", choices=["runs", "updates", "chunks", "limit"])
    parser.add_argument("--k", type=int, nargs="+")
    parser.add_argument("--chunk", type=int, nargs="+", default=[19, 8, 4, 2, 1])
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--penalties", nargs="+", default=["none", "l2", "l2init", "singular"])
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="runs: compile the update (default: the engine's rule, runs of >= 20k updates)",
    )
    args = parser.parse_args()
    one_thread()
    if args.part == "runs":
        bench_runs(args.env, args.k or [8, 25], args.steps, args.rounds, args.compile, args.penalties)
    elif args.part == "updates":
        bench_updates(args.k or [1, 8, 25])
    elif args.part == "chunks":
        bench_chunks(args.chunk)
    else:
        bench_limit()


if __name__ == "__main__":
    main()
