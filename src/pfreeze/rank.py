"""Data-free ranking of weight matrices by signal-to-noise ratio (in the spirit of Spectrum).

For a matrix W (m × n) with singular values σ₁ ≥ … ≥ σ_k, treat the bulk of the spectrum as
noise (Marchenko–Pastur):
    noise scale   s = IQR(σ) / 1.349          (a robust estimate of the noise std)
    threshold     τ = s · (1 + √β),  β = min(m, n) / max(m, n)
    SNR           = Σ σᵢ>τ σᵢ  /  Σ σᵢ≤τ σᵢ    (∞ when nothing falls below τ)
    score         = SNR / σ₁                   (so large-norm matrices do not win by scale)
Matrices with a high score carry more structure than noise; Spectrum trains the top share of
each matrix type. Fused Q/K/V matrices are scored per role slice, like every other report.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from pfreeze.plan import Geometry, describe_params, role_index


@dataclass
class MatrixScore:
    name: str
    role: str  # q, k, v, o, or the mlp module (mlp.up_proj, …)
    layer: int | None
    shape: tuple[int, int]
    snr: float
    score: float


def snr_score(w: torch.Tensor) -> tuple[float, float]:
    """(SNR, SNR / σ_max) of one matrix, as defined in the module docstring."""
    s = torch.linalg.svdvals(w.detach().float())
    m, n = w.shape
    q1, q3 = torch.quantile(s, torch.tensor([0.25, 0.75], dtype=s.dtype))
    sigma = float(q3 - q1) / 1.349
    tau = sigma * (1 + math.sqrt(min(m, n) / max(m, n)))
    signal, noise = float(s[s > tau].sum()), float(s[s <= tau].sum())
    snr = signal / noise if noise > 0 else math.inf
    return snr, snr / float(s[0]) if float(s[0]) > 0 else 0.0


def _matrix_type(name: str, role: str) -> str:
    if role == "mlp":
        return "mlp." + name.split(".")[-2]  # gate_proj, c_fc, dense_h_to_4h, …
    return role


def snr_scores(model: nn.Module, family: str, roles: set[str] | None = None) -> list[MatrixScore]:
    """Score every 2-D block matrix (fused ones per q/k/v slice), highest score first."""
    infos = describe_params(model, family)
    params = dict(model.named_parameters())
    g = Geometry.of(model)
    out: list[MatrixScore] = []
    for name, info in infos.items():
        if info.layer is None or len(info.shape) != 2:
            continue
        pieces = ([(r, role_index(info, r, None, g)) for r in "qkv"]
                  if info.rule.role == "qkv" else [(info.rule.role, None)])
        for role, idx in pieces:
            if roles is not None and role not in roles:
                continue
            w = params[name] if idx is None else params[name].index_select(info.rule.dim, idx)
            snr, score = snr_score(w)
            out.append(MatrixScore(name, _matrix_type(name, role), info.layer,
                                   tuple(w.shape), snr, score))  # type: ignore[arg-type]
    return sorted(out, key=lambda m: -m.score)


def top_selector(scores: list[MatrixScore], percent: float) -> str:
    """A selector training the top `percent` % of each matrix type by score."""
    by_type: dict[str, list[MatrixScore]] = {}
    for m in scores:
        by_type.setdefault(m.role, []).append(m)
    clauses = []
    for kind, ms in sorted(by_type.items()):
        keep = max(1, math.ceil(len(ms) * percent / 100))
        for m in sorted(ms, key=lambda m: -m.score)[:keep]:
            clause = f"re={re.escape(m.name)}"
            if kind in ("q", "k", "v"):
                clause += f" roles={kind}"  # a fused matrix trains only this role's slice
            clauses.append(clause)
    return "; ".join(clauses)
