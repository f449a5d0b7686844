"""Float32 accuracy of the singular penalty's gradient: σ² from the Gram matrix's eigenvalues
(``singular_penalty``) against ``svdvals``, both relative to a float64 SVD, on 512 × 64 feature
matrices with prescribed singular values (10 seeds per row).

    python -m bench.accuracy_singular
"""

from __future__ import annotations

import statistics

import torch

from plasticity_probe.regularizers import singular_penalty


def relative_errors(smallest_exponent: float, seed: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(512, 64, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    phi = u @ torch.diag(torch.logspace(1, smallest_exponent, 64, dtype=torch.float64)) @ v.T
    reference = phi.clone().requires_grad_()
    s = torch.linalg.svdvals(reference)
    (s[0] ** 2 - s[-1] ** 2).backward()
    gram = phi.float().requires_grad_()
    singular_penalty(gram).backward()
    svd = phi.float().requires_grad_()
    s32 = torch.linalg.svdvals(svd)
    (s32[0] ** 2 - s32[-1] ** 2).backward()
    ref = reference.grad
    assert ref is not None and gram.grad is not None and svd.grad is not None
    return (
        float((gram.grad.double() - ref).norm() / ref.norm()),
        float((svd.grad.double() - ref).norm() / ref.norm()),
    )


def main() -> None:
    print("| singular values | Gram + eigvalsh, median (max) | svdvals, median (max) |")
    print("|---|---|---|")
    for exponent in (0.0, -1.0, -2.0):
        errors = [relative_errors(exponent, seed) for seed in range(10)]
        gram, svd = [e[0] for e in errors], [e[1] for e in errors]
        print(
            f"| 10 … 10^{exponent:g} | {statistics.median(gram):.2g} ({max(gram):.2g}) "
            f"| {statistics.median(svd):.2g} ({max(svd):.2g}) |"
        )


if __name__ == "__main__":
    main()
