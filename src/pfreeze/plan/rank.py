"""Data-free ranking of weight matrices by signal-to-noise ratio (in the spirit of Spectrum).

For a matrix W (m × n) with singular values σ₁ ≥ … ≥ σ_k, treat the bulk of the spectrum as
noise (Marchenko–Pastur):
    noise scale   s = IQR(σ) / 1.349          (a robust estimate of the noise std)
    threshold     τ = s · (1 + √β),  β = min(m, n) / max(m, n)
    SNR           = Σ σᵢ>τ σᵢ  /  Σ σᵢ≤τ σᵢ    (∞ when nothing falls below τ)
    score         = SNR / σ₁                   (so large-norm matrices do not win by scale)
Matrices with a high score carry more structure than noise; Spectrum trains the top share of
each matrix type. Fused matrices (Q/K/V, gate/up) are scored per role slice, like every
other report.
The data-driven alternative, `grad_scores`, ranks by the mean gradient norm over a few batches.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from pfreeze.models.families import describe_params
from pfreeze.models.layouts import Geometry
from pfreeze.models.layouts import pieces as role_pieces
from pfreeze.plan.selectors import ROLE_ALIASES


@dataclass
class MatrixScore:
    name: str
    role: str  # q, k, v, o, gate, up, down, or the mlp module of other MLP parts
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


def matrix_pieces(model: nn.Module, family: str, roles: set[str] | None = None
                  ) -> list[tuple[str, str, int | None, int, torch.Tensor | None]]:
    """(name, type, layer, dim, index) of every 2-D block matrix; fused ones per role."""
    infos = describe_params(model, family)
    g = Geometry.of(model)
    wanted = {r for a in roles or () for r in ROLE_ALIASES.get(a, (a,))}
    out = []
    for name, info in infos.items():
        if info.layer is None or len(info.shape) != 2:
            continue
        for role, idx in role_pieces(info, g):
            if roles is None or role in wanted:
                out.append((name, _matrix_type(name, role), info.layer, info.rule.dim, idx))
    return out


def _piece(t: torch.Tensor, dim: int, idx: torch.Tensor | None) -> torch.Tensor:
    return t if idx is None else t.index_select(dim, idx.to(t.device))


def snr_scores(model: nn.Module, family: str, roles: set[str] | None = None) -> list[MatrixScore]:
    """Score every 2-D block matrix (fused ones per q/k/v slice), highest score first."""
    params = dict(model.named_parameters())
    out: list[MatrixScore] = []
    for name, kind, layer, dim, idx in matrix_pieces(model, family, roles):
        w = _piece(params[name], dim, idx)
        snr, score = snr_score(w)
        out.append(MatrixScore(name, kind, layer, tuple(w.shape), snr, score))  # type: ignore[arg-type]
    return sorted(out, key=lambda m: -m.score)


def grad_scores(model: nn.Module, family: str, batches: list[torch.Tensor],
                roles: set[str] | None = None) -> list[MatrixScore]:
    """Score = mean over `batches` of ‖∂loss/∂W‖_F per matrix piece (data-driven, cheap).

    Gradients are computed on `model` (an arm's own copy) and cleared afterwards, and
    requires_grad is put back as it was, so nothing leaks into training.
    """
    params = dict(model.named_parameters())
    pieces = matrix_pieces(model, family, roles)
    was = {n: p.requires_grad for n, p in params.items()}
    for n in {pc[0] for pc in pieces}:
        params[n].requires_grad_(True)
    sums = torch.zeros(len(pieces), dtype=torch.float64)
    for x in batches:
        model.zero_grad(set_to_none=True)
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
        with torch.no_grad():
            for i, (name, _, _, dim, idx) in enumerate(pieces):
                sums[i] += float(torch.linalg.vector_norm(_piece(params[name].grad, dim, idx)))
    model.zero_grad(set_to_none=True)
    for n, p in params.items():
        p.requires_grad_(was[n])
    mean = sums / max(len(batches), 1)
    out = []
    for (name, kind, layer, dim, idx), m in zip(pieces, mean.tolist(), strict=True):
        shape = tuple(_piece(params[name], dim, idx).shape)
        out.append(MatrixScore(name, kind, layer, shape, m, m))  # type: ignore[arg-type]
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
            if kind in ("q", "k", "v", "gate", "up"):
                clause += f" roles={kind}"  # a fused matrix trains only this role's slice
            clauses.append(clause)
    return "; ".join(clauses)
