"""Time, Hessian-vector products and peak memory for λ_max and λ_min of a TD loss, for
``hessian_spectrum`` against the Lanczos it replaced, ARPACK and the peers that install.

Networks: the paper's Q-network (8 → 64 → 64 → 4, batch 512, 4,996 parameters, with the dense
Hessian as reference) and CleanRL's Nature-CNN Q-network (4×84×84 input, 6 actions, batch 32,
1,687,206 parameters, ARPACK at tol 1e-10 as reference). Every method runs in its own
subprocess, so that its peak resident memory (``ru_maxrss``) is its own; one torch thread.

    python -m bench.bench_hessian            # both networks
    python -m bench.bench_hessian --net qnet # one

PyHessian (power iteration: λ of largest magnitude only) and hessian-eigenthings (Lanczos
without restarts, ``which="LA"`` then ``"SA"``) are optional: skipped when not installed.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bench.common import BATCH, N_ACTIONS, OBS_DIM, nature_cnn, one_thread

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("dense", "old", "new", "arpack", "pyhessian", "eigenthings")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def setup(net: str) -> tuple[nn.Module, Callable[[], torch.Tensor], tuple[torch.Tensor, ...]]:
    """The online network, its TD loss closure against a perturbed target, and the batch."""
    torch.manual_seed(0)
    if net == "qnet":
        from reference_agent.network import QNetwork

        q: nn.Module = QNetwork(OBS_DIM, N_ACTIONS)
        shape: tuple[int, ...] = (OBS_DIM,)
        n_act, batch = N_ACTIONS, BATCH
    else:
        q, shape, n_act, batch = nature_cnn(), (4, 84, 84), 6, 32
    target = copy.deepcopy(q)
    with torch.no_grad():  # a target that differs from the online net, as during training
        for p in target.parameters():
            p.add_(0.05 * torch.randn_like(p))
    obs, nxt = torch.rand(batch, *shape), torch.rand(batch, *shape)
    act, rew = torch.randint(0, n_act, (batch,)), torch.randn(batch)
    done = (torch.rand(batch) < 0.05).float()
    with torch.no_grad():
        y = rew + 0.99 * (1 - done) * target(nxt).max(1).values

    def loss() -> torch.Tensor:
        return ((q(obs).gather(1, act[:, None]).squeeze(1) - y) ** 2).mean()

    return q, loss, (obs, act, y)


def run_one(method: str, net: str) -> dict[str, float | int | str]:
    one_thread()
    q, loss, (obs, act, y) = setup(net)
    from plasticity_probe.hessian import HessianOperator

    params = list(q.parameters())
    base = _rss_mb()
    start = time.perf_counter()
    lmax, lmin, hvps = float("nan"), float("nan"), 0
    if method == "new":
        import plasticity_probe as pp

        spec = pp.hessian_spectrum(loss, q)
        lmax, lmin, hvps = spec.lambda_max, spec.lambda_min, spec.n_hvp
    elif method == "old":
        from bench._old_hessian import lanczos_extremes

        old_op = HessianOperator(loss, params)
        top, low, _ = lanczos_extremes(old_op.matvec, old_op.n)
        lmax, lmin, hvps = float(top[0]), float(low), old_op.n_hvp
    elif method == "dense":
        op = HessianOperator(loss, params)
        eig = torch.linalg.eigvalsh(op.dense())
        lmax, lmin, hvps = float(eig[-1]), float(eig[0]), op.n_hvp
    elif method == "arpack":
        import scipy.sparse.linalg as sla

        op = HessianOperator(loss, params)
        lin = sla.LinearOperator(
            (op.n, op.n), matvec=lambda v: op.matvec(torch.from_numpy(v.reshape(-1).copy())).numpy(), dtype=np.float64
        )
        v0 = np.ones(op.n)
        lmax = float(sla.eigsh(lin, k=1, which="LA", tol=1e-10, v0=v0, return_eigenvectors=False)[0])
        lmin = float(sla.eigsh(lin, k=1, which="SA", tol=1e-10, v0=v0, return_eigenvectors=False)[0])
        hvps = op.n_hvp
    elif method == "pyhessian":
        from pyhessian import hessian as pyhessian_cls

        def criterion(out: torch.Tensor, targets: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            return ((out.gather(1, targets[0][:, None]).squeeze(1) - targets[1]) ** 2).mean()

        hes = pyhessian_cls(q, criterion, data=(obs, (act, y)), cuda=False)
        eigs, _ = hes.eigenvalues(maxIter=100, tol=1e-3, top_n=1)
        lmax = float(eigs[0])  # largest magnitude (equal to λ_max here: λ_max > |λ_min|)
        hvps = -1
    elif method == "eigenthings":
        import hessian_eigenthings as he

        op = HessianOperator(loss, params)
        lam = he.LambdaOperator(op.matvec, size=op.n, dtype=torch.float64)
        steps = min(100, op.n - 1)
        lmax = float(he.lanczos(lam, k=1, max_iter=steps, which="LA", reorthogonalize=True, seed=0).eigenvalues[0])
        lmin = float(he.lanczos(lam, k=1, max_iter=steps, which="SA", reorthogonalize=True, seed=0).eigenvalues[0])
        hvps = op.n_hvp
    return {
        "method": method,
        "seconds": time.perf_counter() - start,
        "hvps": hvps,
        "lambda_max": lmax,
        "lambda_min": lmin,
        "base_rss_mb": base,
        "peak_rss_mb": _rss_mb(),
        "n_params": sum(p.numel() for p in params),
    }


def _subprocess(method: str, net: str) -> dict[str, float | int | str] | None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.bench_hessian", "--one", method, "--net", net],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        print(f"  {method}: skipped ({last})")
        return None
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def table(net: str) -> None:
    methods = [m for m in METHODS if not (net == "cnn" and m == "dense")]
    rows = [r for r in (_subprocess(m, net) for m in methods) if r is not None]
    ref = next(r for r in rows if r["method"] == ("dense" if net == "qnet" else "arpack"))
    print(f"\n{net}: {ref['n_params']:,} parameters; reference {ref['method']}")
    print("| method | time (s) | HVPs | peak RSS (MB) | λ_max | λ_min | λ_max rel. err | λ_min rel. err |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        errs = [abs(float(r[k]) - float(ref[k])) / abs(float(ref[k])) for k in ("lambda_max", "lambda_min")]
        print(
            f"| {r['method']} | {float(r['seconds']):.2f} | {r['hvps'] if int(r['hvps']) >= 0 else '—'} "
            f"| {float(r['peak_rss_mb']):.0f} (base {float(r['base_rss_mb']):.0f}) "
            f"| {float(r['lambda_max']):.6g} | {float(r['lambda_min']):.6g} | {errs[0]:.1e} | {errs[1]:.1e} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", choices=METHODS)
    parser.add_argument("--net", choices=("qnet", "cnn", "both"), default="both")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.net)))
        return
    for net in ("qnet", "cnn") if args.net == "both" else (args.net,):
        table(net)


if __name__ == "__main__":
    main()
