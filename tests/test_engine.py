"""The batched engine against independent ground truth: per-run ``nn.Module``s with autograd and
``pp.SuccessiveRegularizer``; a run alone equals the same run inside a batch; batches resume."""

from __future__ import annotations

import itertools
import json
import os
import signal
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._pytree import tree_flatten

import plasticity_probe as pp
from reference_agent import rundir
from reference_agent.config import DQNConfig
from reference_agent.engine import UNCONVERGED, EngineOptions, RunState, batch_key, td_loss, train, train_batch
from reference_agent.network import QNetwork
from reference_agent.penalties import StackedPenalty
from reference_agent.replay import Batch
from reference_agent.stacked import StackedQ
from reference_agent.update import BatchedUpdate, over_chunks, run_chunks, td_gradients

PENALTIES = [
    dict(reg="none"),
    dict(reg="l2", lam=0.01, delta=1.25),
    dict(reg="l2init", lam=0.01, delta=0.75),
    dict(reg="l1", lam=0.01, delta=1.0),
    dict(reg="singular", lam=0.001, delta=1.25),
    dict(reg="l2", lam=0.01, delta=1.25, reg_variant="authors"),
    dict(reg="l2init", lam=0.01, delta=1.25, reg_variant="authors"),
    dict(reg="singular", lam=0.001, delta=1.25, reg_variant="authors"),
    dict(reg="singular", lam=0.001, delta=1.0, reg_layers=("net.2",)),
    dict(reg="l2init", lam=0.01, delta=1.25, reg_layers=("net.2", "net.4")),
    dict(reg="l2", lam=0.01, delta=1.25, reg_every="target", target_update_period=4),
]


def _nets(cfgs: list[DQNConfig], obs_dim: int, n_actions: int) -> list[QNetwork]:
    nets = []
    for c in cfgs:
        torch.manual_seed(c.seed)
        nets.append(QNetwork(obs_dim, n_actions, c.hidden_sizes))
    return nets


@pytest.mark.parametrize(
    ("batch_size", "compile", "singular"),
    # n ≥ width and n < width for the singular Gram matrix; compiled: the split step with the
    # eager eigendecompositions, and the one-graph step of a batch without a singular penalty
    [(48, False, True), (16, False, True), (48, True, True), (48, True, False)],
)
def test_batched_update_equals_per_run_modules_with_autograd(batch_size: int, compile: bool, singular: bool) -> None:
    """Three Adam steps of a batch of every penalty kind (``BatchedUpdate``, eager and compiled)
    against each run's own QNetwork, its own Adam and ``pp.SuccessiveRegularizer``: losses,
    penalties, per-term values and parameters."""
    torch.manual_seed(123)
    obs_dim, n_actions, hidden = 5, 3, (24, 24)
    kinds = [p for p in PENALTIES if singular or p.get("reg") != "singular"]
    if singular:  # a singular penalty on target updates only: the compiled step's schedule changes at step 4
        kinds.append(dict(reg="singular", lam=0.001, delta=1.0, reg_every="target", target_update_period=4))
    cfgs = [DQNConfig(hidden_sizes=hidden, seed=s, **p) for s, p in enumerate(kinds)]  # type: ignore[arg-type]
    nets = _nets(cfgs, obs_dim, n_actions)
    online = StackedQ(nets)
    penalty = StackedPenalty(cfgs, nets, [p.clone() for p in online.params()], torch.device("cpu"))
    update = BatchedUpdate(online, penalty, lr=1e-2, gamma=0.99, compile=compile)
    # Adam moves an entry by about lr whatever its gradient's size, so where a gradient is ~0 the
    # compiled kernels' other rounding shows after three steps (measured: 7.6e-6 on 1 of 72 entries
    # of a run; 6.5e-5 on 1 of 120 with the target-only singular run in the batch): a hundredth of
    # one step's lr = 1e-2, where a wrong gradient or Adam step moves entries by about lr
    atol = 1e-4 if compile else 1e-6
    # independent references
    ref_q = [QNetwork(obs_dim, n_actions, hidden) for _ in cfgs]
    ref_t = [QNetwork(obs_dim, n_actions, hidden) for _ in cfgs]
    for q, t, n in zip(ref_q, ref_t, nets, strict=True):
        q.load_state_dict(n.state_dict())
        t.load_state_dict(n.state_dict())
        with torch.no_grad():  # a target different from the online network
            for p in t.parameters():
                p.add_(0.05 * torch.randn_like(p))
    ref_opt = [torch.optim.Adam(q.parameters(), lr=1e-2) for q in ref_q]
    regs = [
        None
        if c.reg.value == "none"
        else pp.SuccessiveRegularizer(
            q,
            c.reg.value,
            c.lam,
            c.delta,
            every=c.target_update_period if c.reg_every.value == "target" else 1,
            layers=list(c.reg_layers) or None,
            variant=c.reg_variant,
        )
        for c, q in zip(cfgs, ref_q, strict=True)
    ]
    k = len(cfgs)
    for step in (3, 4, 5):  # step 4: the target-only run's penalty is added
        batch = Batch(
            obs=torch.randn(k, batch_size, obs_dim),
            actions=torch.randint(0, n_actions, (k, batch_size)),
            rewards=torch.randn(k, batch_size),
            next_obs=torch.randn(k, batch_size, obs_dim),
            terminated=(torch.rand(k, batch_size) < 0.2).float(),
        )
        with torch.no_grad():  # what the replay buffer holds: max_a' Q_target(s', a'), from each run's target
            batch.next_value = torch.stack([t(o).amax(dim=1) for t, o in zip(ref_t, batch.next_obs, strict=True)])
        stats = update(step, batch)
        err_sq, pen = stats[:, 0], stats[:, 3]
        for r in range(k):
            loss, _, _ = td_loss(ref_q[r], ref_t[r], batch.run(r), 0.99)
            ref_pen = regs[r](step) if regs[r] is not None else torch.zeros(())  # type: ignore[misc]
            ref_opt[r].zero_grad()
            (loss + ref_pen).backward()
            ref_opt[r].step()
            assert float(err_sq[r]) == pytest.approx(float(loss), rel=1e-5)
            assert float(pen[r]) == pytest.approx(float(ref_pen), rel=1e-4, abs=1e-7), cfgs[r].run_name
            ref_terms = {n: float(v) for n, v in (regs[r].last_terms if regs[r] else {}).items()}  # type: ignore[union-attr]
            assert penalty.last_terms(r) == pytest.approx(ref_terms, rel=1e-4, abs=1e-7), cfgs[r].run_name
            for name, p in ref_q[r].state_dict().items():
                torch.testing.assert_close(
                    online.state_dict(r)[name], p, rtol=1e-4, atol=atol, msg=lambda m, r=r: f"{cfgs[r].run_name}: {m}"
                )
    if compile:  # one compiled graph per schedule: with and without the target-only singular run
        assert update._compiled is not None and len(update._compiled._graphs) == (2 if singular else 1)


def test_module_views_share_storage_with_the_stack() -> None:
    nets = _nets([DQNConfig(seed=s) for s in range(3)], 4, 2)
    stack = StackedQ(nets)
    view = stack.module(1)
    torch.testing.assert_close(view(torch.ones(2, 4)), nets[1](torch.ones(2, 4)))
    with torch.no_grad():
        view.net[2].weight.mul_(0.0)  # an intervention on the run's module reaches the stack
    assert float(stack.weights[1][1].abs().sum()) == 0.0 and float(stack.weights[1][0].abs().sum()) > 0


def test_q_values_match_each_runs_module_and_follow_in_place_changes() -> None:
    """``StackedQ.q_values`` (numpy on the CPU) against each run's own ``QNetwork``, before and after
    an in-place change of the stack (an Adam step, a target copy), on several rows per run."""
    nets = _nets([DQNConfig(seed=s, hidden_sizes=(16, 8)) for s in range(3)], 5, 3)
    stack = StackedQ(nets)
    x = np.random.default_rng(0).standard_normal((3, 7, 5)).astype(np.float32)
    on_gpu = StackedQ(nets)
    on_gpu._numpy = None  # the path a GPU stack takes (torch), exercised on the CPU
    for _ in range(2):
        out = stack.q_values(x)
        assert out.shape == (3, 7, 3) and out.dtype == np.float32
        for k in range(3):
            with torch.no_grad():
                expected = stack.module(k)(torch.from_numpy(x[k])).numpy()
            np.testing.assert_allclose(out[k], expected, rtol=1e-5, atol=1e-6)
        on_gpu.copy_from(stack)
        np.testing.assert_allclose(on_gpu.q_values(x), out, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            for p in stack.params():
                p.add_(torch.randn_like(p))


def _records(run: Path, kind: str) -> list[dict]:
    return [r for r in rundir.read_jsonl(run / "metrics.jsonl") if r["kind"] == kind]


def test_a_run_alone_equals_the_same_run_inside_a_batch(tmp_path: Path) -> None:
    """Seed 0 with the l2init penalty and seed 2 with the singular penalty, each alone (K = 1) and
    as one of 4 runs of a batch (other seeds, other penalties; the batch stacks the singular run
    first, ``update.stack_key``): the same losses, Q-values, targets and penalties over the first
    few hundred updates, in the run directories given."""
    common = dict(total_steps=900, learning_starts=300, log_every=50)
    me = tiny_config(reg="l2init", **common)
    singular = tiny_config(seed=2, reg="singular", lam=0.001, **common)
    others = [tiny_config(seed=1, **common), tiny_config(seed=3, reg="l2", reg_every="target", **common)]
    assert train(me, tmp_path / "alone").state == "finished"
    assert train(singular, tmp_path / "alone_singular").state == "finished"
    batch = train_batch([others[0], me, singular, others[1]], [tmp_path / f"b{i}" for i in range(4)])
    assert all(r.state == "finished" for r in batch)
    assert [r.run_dir for r in batch] == [tmp_path / f"b{i}" for i in range(4)]
    for alone_dir, batch_dir in (("alone", "b1"), ("alone_singular", "b2")):
        a, b = _records(tmp_path / alone_dir, "update"), _records(tmp_path / batch_dir, "update")
        assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) == 13  # 601 updates
        for ra, rb in zip(a, b, strict=True):
            for key in ("loss", "q_mean", "target_mean", "penalty"):
                assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), (alone_dir, ra["step"], key)
        episodes = _records(tmp_path / alone_dir, "train_episode")[:5]
        assert episodes == _records(tmp_path / batch_dir, "train_episode")[:5]
    assert _records(tmp_path / "b0", "update")[0]["loss"] != _records(tmp_path / "b1", "update")[0]["loss"]


def test_an_unconverged_hessian_is_recorded_in_the_run_not_warned_at_every_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real Lanczos given 5 products (no dense path): each such report has
    ``hessian_converged`` = 0 in plasticity.jsonl, the run's result names it once, and no
    ``ConvergenceWarning`` without the run's name reaches the terminal."""
    import plasticity_probe.probe as probe_module

    short = partial(probe_module.hessian_spectrum, max_iter=5, basis_size=5, dense_threshold=0)
    monkeypatch.setattr(probe_module, "hessian_spectrum", short)
    cfg = tiny_config(total_steps=600, learning_starts=200, probe_every=200, hessian_every=200)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(cfg, tmp_path / "run")
    assert result.state == "finished"
    assert not [w for w in caught if "Lanczos did not reach" in str(w.message)]
    rows = [json.loads(line) for line in (tmp_path / "run" / rundir.PLASTICITY).read_text().splitlines()]
    converged = {r["step"]: r["value"] for r in rows if r["metric"] == "hessian_converged"}
    assert converged == {200: 0.0, 400: 0.0, 600: 0.0}
    assert [w for w in result.warnings if w.startswith(UNCONVERGED)] == [
        f"{UNCONVERGED} at step 200 (and where plasticity.jsonl has hessian_converged = 0)"
    ]


@pytest.mark.parametrize("compile", [False, True])
def test_a_batch_resumes_all_its_runs_after_sigint(tmp_path: Path, compile: bool) -> None:
    """Byte-identical files after SIGINT and resume, with eager and with compiled updates."""
    cfgs = [tiny_config(reg="l2init"), tiny_config(seed=1, reg="singular", lam=0.001)]
    options = EngineOptions(compile=compile)
    full = train_batch(cfgs, [tmp_path / "full0", tmp_path / "full1"], options=options)
    assert [r.state for r in full] == ["finished", "finished"]

    def interrupt(step: int, total: int, info: dict[str, float]) -> None:
        if step == 700:
            os.kill(os.getpid(), signal.SIGINT)

    dirs = [tmp_path / "cut0", tmp_path / "cut1"]
    stopped = train_batch(cfgs, dirs, progress=interrupt, options=options)
    assert [(r.state, r.step) for r in stopped] == [("interrupted", 700)] * 2
    resumed = train_batch([None, None], dirs, resume=True, options=options)
    assert [r.state for r in resumed] == ["finished", "finished"]
    for i in (0, 1):
        for name in ("metrics.jsonl", "plasticity.jsonl"):
            assert (tmp_path / f"full{i}" / name).read_text() == (dirs[i] / name).read_text()


def test_a_batch_whose_checkpoints_are_at_different_steps_resumes_each_run(tmp_path: Path) -> None:
    """Runs stopped at different steps (a crash while their checkpoints were written) resume as
    separate batches, one after the other: each ends byte-identical to its uninterrupted run."""
    cfgs = [tiny_config(reg="l2init"), tiny_config(seed=1)]
    dirs = [tmp_path / "cut0", tmp_path / "cut1"]
    for cfg, run_dir, stop in zip(cfgs, dirs, (400, 700), strict=True):
        assert train(cfg, tmp_path / f"full_{run_dir.name}").state == "finished"

        def interrupt(step: int, total: int, info: dict[str, float], stop: int = stop) -> None:
            if step == stop:
                os.kill(os.getpid(), signal.SIGINT)

        assert (train(cfg, run_dir, progress=interrupt).state, status_step(run_dir)) == ("interrupted", stop)
    seen: list[tuple[int, int]] = []
    hooks = [lambda step, run: seen.append((step, run.index)) if step in (500, 800) else None]
    resumed = train_batch([None, None], dirs, resume=True, options=EngineOptions(hooks=hooks))
    assert [(r.state, r.step) for r in resumed] == [("finished", 1500)] * 2
    assert seen == [(500, 0), (800, 0), (800, 0)]  # two batches of one run each (index 0 in each)
    for run_dir in dirs:
        for name in ("metrics.jsonl", "plasticity.jsonl"):
            assert (tmp_path / f"full_{run_dir.name}" / name).read_text() == (run_dir / name).read_text()


def status_step(run_dir: Path) -> int:
    return int(json.loads((run_dir / "status.json").read_text())["step"])


def test_batches_need_a_shared_shape_and_hooks_see_each_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="share"):
        train_batch([tiny_config(), tiny_config(seed=1, batch_size=16)], [tmp_path / "a", tmp_path / "b"])
    assert batch_key(tiny_config(seed=3, reg="l2", lam=0.1)) == batch_key(tiny_config())
    seen: list[tuple[int, int, str]] = []

    def hook(step: int, run: RunState) -> None:
        if step % 200 == 0:
            seen.append((step, run.index, next(iter(run.optimizer_state()))))
            assert run.q(torch.zeros(1, 4)).shape == (1, 2)

    cfgs = [tiny_config(total_steps=600), tiny_config(seed=1, total_steps=600)]
    train_batch(cfgs, [tmp_path / "h0", tmp_path / "h1"], options=EngineOptions(hooks=[hook]))
    assert seen == [(s, i, "net.0.weight") for s in (400, 600) for i in (0, 1)]


def test_one_diverging_run_stops_alone(tmp_path: Path) -> None:
    bad = tiny_config(total_steps=1200, seed=5, reg="l2", lam=1e38)  # λ‖θ‖² overflows float32
    results = train_batch([bad, tiny_config(total_steps=1200, seed=6)], [tmp_path / "d", tmp_path / "g"])
    assert results[0].state == "diverged" and results[1].state == "finished"
    assert json.loads((tmp_path / "d" / "status.json").read_text())["state"] == "diverged"
    assert _records(tmp_path / "g", "eval")[-1]["step"] == 1200


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_end_to_end_matches_the_cpu(tmp_path: Path) -> None:
    cfg = tiny_config(reg="singular", lam=0.001, total_steps=600)
    cpu = train(cfg, tmp_path / "cpu")
    gpu = train(cfg, tmp_path / "gpu", options=EngineOptions(device="cuda"))
    assert cpu.state == gpu.state == "finished"
    a, b = _records(tmp_path / "cpu", "update"), _records(tmp_path / "gpu", "update")
    assert float(np.abs(a[0]["loss"] - b[0]["loss"])) <= 1e-3 * max(1.0, abs(a[0]["loss"]))
    assert (tmp_path / "gpu" / "plasticity.jsonl").read_text()


def test_interventions_act_on_their_run_only(tmp_path: Path) -> None:
    """ReDo inside a batch of 2 (seeds 0 and 1): each run's intervention equals the same run's
    alone (so it changed only its own slice of the stacked parameters and Adam moments)."""
    common = dict(total_steps=900, learning_starts=300, log_every=50, intervention="redo", intervention_every=200)
    me, other = tiny_config(**common), tiny_config(seed=1, **common)
    train(me, tmp_path / "alone")
    train_batch([other, me], [tmp_path / "b0", tmp_path / "b1"])
    alone = list(rundir.read_jsonl(tmp_path / "alone" / rundir.INTERVENTIONS))
    inside = list(rundir.read_jsonl(tmp_path / "b1" / rundir.INTERVENTIONS))
    assert [r["step"] for r in alone] == [500, 700, 900] == [r["step"] for r in inside]
    assert [r["units_reset"] for r in alone] == [r["units_reset"] for r in inside]
    for ra, rb in zip(alone, inside, strict=True):
        assert ra["dormant_after"] == pytest.approx(rb["dormant_after"], abs=1e-6)
    a, b = _records(tmp_path / "alone", "update"), _records(tmp_path / "b1", "update")
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4, abs=1e-6), ra["step"]


def test_run_adam_resets_exactly_its_own_slice() -> None:
    from reference_agent.engine import RunAdam

    torch.manual_seed(0)
    nets = [QNetwork(4, 2, (8, 8)) for _ in range(2)]
    stack = StackedQ(nets, torch.device("cpu"))
    optimizer = torch.optim.Adam(stack.params(), lr=1e-3)
    for p in stack.params():
        p.grad = torch.randn_like(p)
    optimizer.step()
    before = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in stack.params()}
    own = stack.module(1)
    bridge = RunAdam(optimizer, stack.params(), own, 1)
    first = next(own.parameters())
    bridge.state[first]["exp_avg"][0] = 0.0  # a per-entry reset (ReDo) writes into the stack
    bridge.state.pop(list(own.parameters())[-1])  # dropping a parameter's state zeroes its moments
    for j, p in enumerate(stack.params()):
        now, was = optimizer.state[p], before[id(p)]
        for key in ("exp_avg", "exp_avg_sq"):  # the other run's slice: untouched
            assert torch.equal(now[key][0], was[key][0])
        assert torch.equal(now["step"], was["step"])  # shared by the stack: kept
        if j == 0:
            assert not now["exp_avg"][1][0].any() and torch.equal(now["exp_avg"][1][1:], was["exp_avg"][1][1:])
        elif j == len(before) - 1:
            assert not now["exp_avg"][1].any() and not now["exp_avg_sq"][1].any()
        else:
            assert torch.equal(now["exp_avg"][1], was["exp_avg"][1])


def test_updates_compile_only_where_it_pays_off() -> None:
    from reference_agent.engine import use_compile

    cpu, paper = torch.device("cpu"), DQNConfig()  # 80,000 gradient steps
    assert use_compile(None, paper, cpu)
    assert not use_compile(None, tiny_config(), cpu)  # a short run: the compilation would dominate
    short = tiny_config(total_steps=4500, learning_starts=500)  # 4,000 updates per run
    assert not use_compile(None, short, cpu, k=4) and use_compile(None, short, cpu, k=5)  # paid once per batch
    assert not use_compile(None, paper, torch.device("cuda"))
    assert use_compile(True, tiny_config(), cpu) and not use_compile(False, paper, cpu)


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 60), size=st.integers(1, 8))
def test_run_chunks_cover_the_runs_in_near_equal_chunks(k: int, size: int) -> None:
    bounds = run_chunks(k, size)
    assert bounds[0][0] == 0 and bounds[-1][1] == k
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))  # contiguous, in order
    lengths = [b - a for a, b in bounds]
    assert max(lengths) <= size and max(lengths) - min(lengths) <= 1 and len(bounds) == -(-k // size)


def _step_args(k: int, seed: int, n: int = 48) -> tuple[tuple, StackedPenalty]:
    """The arguments of ``td_gradients`` for a batch of every penalty kind, at a step where the
    target-only run's penalty is added."""
    torch.manual_seed(seed)
    cfgs = [DQNConfig(hidden_sizes=(24, 24), seed=s, **p) for s, p in enumerate(PENALTIES[:k])]  # type: ignore[arg-type]
    nets = _nets(cfgs, 5, 3)
    online = StackedQ(nets)
    penalty = StackedPenalty(cfgs, nets, [p.clone() for p in online.params()], torch.device("cpu"))
    args = (
        online.params(),
        penalty.init,
        torch.randn(k, n, 5),
        torch.randint(0, 3, (k, n)),
        torch.randn(k, n),
        torch.randn(k, n),
        (torch.rand(k, n) < 0.2).float(),
        0.99,
        penalty.param_coefs,
        penalty.schedule(4).mask,
        penalty.singular_coefs,
    )
    return args, penalty


@pytest.mark.parametrize("size", [3, 4])
def test_a_step_in_chunks_equals_the_step_at_once(size: int) -> None:
    """``over_chunks`` (what the compiled step runs, here eager) against ``td_gradients`` on all
    runs at once: every output, for chunks that split the singular runs apart (size 4: singular
    runs 4 and 8 open a chunk)."""
    args, penalty = _step_args(len(PENALTIES), seed=7)
    runs = penalty.schedule(4).singular_runs
    assert sum(map(len, runs)) >= 4  # singular runs in more than one chunk
    whole = td_gradients(*args, runs=runs)
    chunked = over_chunks(td_gradients, run_chunks(len(PENALTIES), size))(*args, runs=runs)
    for a, b in zip(tree_flatten(whole)[0], tree_flatten(chunked)[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gram_extremes_against_numpy_with_dead_units_and_fallbacks() -> None:
    """Values and eigenvectors against ``numpy.linalg.eigh`` in float64, for tall and wide
    feature matrices, with dead units (exact zero columns), on the batched path and on the
    one-by-one fallback (``_extremes_one``); a non-finite matrix gives NaN and no gradient."""
    from reference_agent.penalties import _extremes_one, gram_extremes

    torch.manual_seed(3)
    for n, d in ((40, 12), (8, 12)):
        phi = torch.relu(torch.randn(3, n, d) + 0.3)
        phi[1, :, :4] = 0.0  # dead units
        value, ext, _ = gram_extremes(phi)
        for r in range(3):
            x = phi[r].double().numpy()
            g = x.T @ x if n >= d else x @ x.T
            evals, evecs = np.linalg.eigh(g)
            assert float(value[r]) == pytest.approx(evals[-1] - max(evals[0], 0.0), rel=1e-5, abs=1e-4)
            assert abs(float(ext[r, :, 0].double() @ torch.from_numpy(evecs[:, -1]))) == pytest.approx(1, abs=1e-5)
            one = _extremes_one(torch.from_numpy(g).float())
            assert float(one[0]) == pytest.approx(evals[-1] - max(evals[0], 0.0), rel=1e-5, abs=1e-4)
            assert abs(float(one[1][:, 0].double() @ torch.from_numpy(evecs[:, -1]))) == pytest.approx(1, abs=1e-5)
            if n >= d and r == 1:  # λ_min = 0 from the dead units: no gradient from the smallest
                assert not one[1][:, 1].any()
    bad = torch.full((1, 10, 4), float("nan"))
    value, ext, _ = gram_extremes(bad)
    assert bool(value.isnan().all()) and not ext.any()


@pytest.mark.parametrize("failure", ["raises", "not finite"])
def test_a_failed_eigendecomposition_redoes_the_step_eagerly(monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    """When the compiled step's plain ``eigh`` raises (as a compiled graph raises LAPACK's failure)
    or gives non-finite values, the step changes nothing and is redone eagerly with the library's
    fallbacks: the same statistics and parameters as an undisturbed eager update, to float32
    rounding (the compiled kernels round differently)."""
    import reference_agent.penalties as penalties

    results = []
    for fail in (False, True):
        args, penalty = _step_args(len(PENALTIES), seed=11)
        nets = _nets([DQNConfig(hidden_sizes=(24, 24), seed=s) for s in range(len(PENALTIES))], 5, 3)
        online = StackedQ(nets)
        if fail and failure == "not finite":
            plain = penalties._eigh_extremes

            def poisoned(phi: torch.Tensor, plain: Any = plain) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
                value, extremes, keep = plain(phi)
                return value * float("nan"), extremes, keep

            monkeypatch.setattr(penalties, "_eigh_extremes", poisoned)
        update = BatchedUpdate(online, penalty, lr=1e-2, gamma=0.99, compile=fail)
        if fail and failure == "raises":

            def failing(*a: object) -> object:
                raise RuntimeError("linalg.eigh: The algorithm failed to converge")

            monkeypatch.setattr(update, "_compiled", failing)
        obs, actions, rewards, next_value, terminated = args[2:7]
        batch = Batch(obs, actions, rewards, torch.zeros_like(obs), terminated, next_value)
        stats = update(4, batch)
        results.append((stats, [p.clone() for p in online.params()], update.optimizer.state_dict()))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(results[0][2]["state"].values(), results[1][2]["state"].values(), strict=True):
        assert float(a["step"]) == float(b["step"]) == 1.0  # the failed step did not count
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"])


def test_without_a_working_cpp_compiler_the_update_warns_and_goes_on_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inductor cannot build the compiled step (no C++ compiler, no cached graph): the update warns
    once, drops compilation and takes the same step as an eager update."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    results = []
    for broken in (False, True):
        args, penalty = _step_args(len(PENALTIES), seed=12)
        nets = _nets([DQNConfig(hidden_sizes=(24, 24), seed=s) for s in range(len(PENALTIES))], 5, 3)
        online = StackedQ(nets)
        update = BatchedUpdate(online, penalty, lr=1e-2, gamma=0.99, compile=broken)
        obs, actions, rewards, next_value, terminated = args[2:7]
        batch = Batch(obs, actions, rewards, torch.zeros_like(obs), terminated, next_value)
        if broken:
            with monkeypatch.context() as m:
                m.setattr(inductor_config.cpp, "cxx", (None, "/nonexistent/c++"))
                m.setattr(inductor_config, "fx_graph_cache", False)
                m.setattr(functorch_config, "enable_autograd_cache", False)
                with pytest.warns(UserWarning, match="continues without compiling"):
                    stats = update(4, batch)
            assert update._compiled is None
        else:
            stats = update(4, batch)
        results.append((stats, [p.clone() for p in online.params()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("capacity", [0, 700])  # 700 < 1,500 steps: the buffer wraps around
def test_the_buffer_holds_each_transitions_value_under_the_current_target(tmp_path: Path, capacity: int) -> None:
    """At the end of a run (after target updates, with rows added since the last one) every row's
    next-state value equals ``max_a' Q_target(s', a')`` of the checkpoint's own target network,
    computed here with a plain ``QNetwork``."""
    from reference_agent.checkpoint import load_checkpoint

    cfg = tiny_config(total_steps=1500, target_update_period=200, checkpoint_every=1500, buffer_size=capacity)
    assert cfg.total_steps % cfg.target_update_period != 0  # rows were added since the last target update
    train(cfg, tmp_path / "r")
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    target = QNetwork(4, 2, cfg.hidden_sizes)
    target.load_state_dict(ckpt["target"])
    buffer = ckpt["buffer"]
    with torch.no_grad():
        expected = target(buffer["next_obs"]).amax(dim=1)
    assert buffer["next_value"].shape == (buffer["size"],) and buffer["size"] == (capacity or 1500)
    torch.testing.assert_close(buffer["next_value"], expected, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_without_next_state_values_resumes_by_recomputing_them(tmp_path: Path) -> None:
    """A checkpoint written before the buffer held next-state values (no ``next_value``) resumes:
    the values are recomputed from its target network, and the run's updates after the resume
    equal an uninterrupted run's to float tolerance."""
    from reference_agent.checkpoint import load_checkpoint, save_checkpoint

    cfg = tiny_config(total_steps=1200, log_every=50)
    train(cfg, tmp_path / "full")

    def interrupt(step: int, total: int, info: dict[str, float]) -> None:
        if step == 700:
            os.kill(os.getpid(), signal.SIGINT)

    assert train(cfg, tmp_path / "cut", progress=interrupt).state == "interrupted"
    ckpt = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    del ckpt["buffer"]["next_value"]
    save_checkpoint(
        tmp_path / "cut" / "checkpoint.pt",
        {k: v for k, v in ckpt.items() if k not in ("format", "version", "checksum")},
    )
    assert train(None, tmp_path / "cut", resume=True).state == "finished"
    full, cut = _records(tmp_path / "full", "update"), _records(tmp_path / "cut", "update")
    after = [r for r in full if r["step"] > 700]
    assert len(after) == 10 and [r["step"] for r in after] == [r["step"] for r in cut if r["step"] > 700]
    for a, b in zip(after, [r for r in cut if r["step"] > 700], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6), a["step"]
