"""How much gradient energy GaLore's fast (subspace-iteration) projector refresh keeps, against the exact SVD.

Energy kept = ||P^T G||_F^2 / ||U_r^T G||_F^2, with P the refreshed rank-r projector and U_r the exact top-r singular
vectors of the same gradient G (1.0: the refresh found the optimal subspace). A warm refresh starts from the
projector of the gradient T steps earlier, G_prev; G = G_prev + drift * (an independent gradient of the same spectrum),
or an independent gradient (``new``: the subspace moved entirely).
Spectra: ``flat`` (i.i.d. Gaussian: singular values within a factor ~4, Marchenko-Pastur) and ``decaying``
(singular values 10^0 ... 10^-3, log-spaced). Float32, seed 0, CPU.

    python benchmarks/galore_refresh_energy.py [--shape 512 1376] [--rank 128]
"""

from __future__ import annotations

import argparse

import torch
from hf_memopt.galore.projector import refresh_projector


def gradient(m: int, n: int, spectrum: str, generator: torch.Generator) -> torch.Tensor:
    if spectrum == "flat":
        return torch.randn(m, n, generator=generator)
    k = min(m, n)
    left = torch.linalg.qr(torch.randn(m, k, generator=generator))[0]
    right = torch.linalg.qr(torch.randn(n, k, generator=generator))[0]
    return (left * torch.logspace(0, -3, k)) @ right.T


def energy_kept(grad: torch.Tensor, projector: tuple[torch.Tensor | None, torch.Tensor | None], rank: int) -> float:
    left, right = projector
    kept = (left.T @ grad if left is not None else grad @ right.T).square().sum()
    best = torch.linalg.svdvals(grad)[:rank].square().sum()
    return float(kept / best)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=(512, 1376))
    parser.add_argument("--rank", type=int, default=128)
    args = parser.parse_args()
    (m, n), r = args.shape, args.rank
    sides = (m < n, m >= n)
    print(f"gradient {m} x {n}, rank {r}, float32; energy kept by the refresh / by the exact top-{r} subspace")
    print("| spectrum | drift since last refresh | cold, 2 iterations | warm, 1 | warm, 2 (default) | warm, 4 |")
    print("|---|---:|---:|---:|---:|---:|")
    for spectrum in ("flat", "decaying"):
        for drift in (0.1, 0.5, 1.0, "new"):
            g = torch.Generator().manual_seed(0)
            previous, fresh = gradient(m, n, spectrum, g), gradient(m, n, spectrum, g)
            current = fresh if drift == "new" else previous + drift * fresh
            old = refresh_projector(previous, r, sides, method="exact")
            cold = refresh_projector(current, r, sides, method="subspace", iterations=2, generator=g)
            row = [energy_kept(current, cold, r)]
            for iterations in (1, 2, 4):
                warm = refresh_projector(current, r, sides, method="subspace", previous=old, iterations=iterations)
                row.append(energy_kept(current, warm, r))
            print(f"| {spectrum} | {drift} | " + " | ".join(f"{v:.3f}" for v in row) + " |")


if __name__ == "__main__":
    main()
