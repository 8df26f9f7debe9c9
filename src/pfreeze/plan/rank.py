"""Data-free ranking of weight matrices by signal-to-noise ratio (in the spirit of Spectrum).

For a matrix W (m × n) with singular values σ₁ ≥ … ≥ σ_k, treat the bulk of the spectrum as
noise (Marchenko–Pastur):
    noise scale   s = IQR(σ) / 1.349          (a robust estimate of the noise std)
    threshold     τ = s · (1 + √β),  β = min(m, n) / max(m, n)
    SNR           = Σ σᵢ>τ σᵢ  /  Σ σᵢ≤τ σᵢ    (∞ when nothing falls below τ)
    score         = SNR / σ₁                   (so large-norm matrices do not win by scale)
Matrices with a high score carry more structure than noise; Spectrum trains the top share of
each matrix type. Fused matrices (Q/K/V, gate/up) are scored per role slice, like every
other report, and MoE expert tensors (one 3-D parameter per layer, expert first) per expert
and role: expert e's gate is a matrix of type `experts.gate`, ranked among the other experts'.
The data-driven alternative, `grad_scores`, ranks by the mean gradient norm over a few batches.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from pfreeze.models.families import describe_params
from pfreeze.models.layouts import Geometry
from pfreeze.models.layouts import pieces as role_pieces
from pfreeze.plan.selectors import ROLE_ALIASES


@dataclass
class MatrixScore:
    name: str
    role: str  # q, k, v, o, gate, up, down, experts.<role>, or the mlp module of other parts
    layer: int | None
    shape: tuple[int, int]
    snr: float
    score: float
    expert: int | None = None  # the expert of a 3-D expert tensor this matrix is

    @property
    def label(self) -> str:
        """The parameter's name, with `[e]` for one expert of an expert tensor."""
        return self.name if self.expert is None else f"{self.name}[{self.expert}]"


class Piece(NamedTuple):
    """One scored matrix: `expert` (dim 0 of an expert tensor) first, then `idx` along `dim`
    (counted in the whole tensor) if the matrix is one role of a fused layout."""

    name: str
    kind: str
    layer: int | None
    dim: int
    idx: torch.Tensor | None
    expert: int | None = None


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


def _matrix_type(name: str, role: str, expert: bool = False) -> str:
    if expert:
        return "experts." + role
    if role == "mlp":
        return "mlp." + name.split(".")[-2]  # gate_proj, c_fc, dense_h_to_4h, …
    return role


def matrix_pieces(model: nn.Module, family: str, roles: set[str] | None = None) -> list[Piece]:
    """Every 2-D block matrix; fused ones per role, expert tensors per expert and role."""
    infos = describe_params(model, family)
    g = Geometry.of(model)
    wanted = {r for a in roles or () for r in ROLE_ALIASES.get(a, (a,))}
    out = []
    for name, info in infos.items():
        experts = info.rule.experts and len(info.shape) == 3
        if info.layer is None or (len(info.shape) != 2 and not experts):
            continue
        for role, idx in role_pieces(info, g):
            if roles is not None and role not in wanted and not (experts and "experts" in wanted):
                continue
            kind = _matrix_type(name, role, experts)
            for e in range(info.shape[0]) if experts else (None,):
                out.append(Piece(name, kind, info.layer, info.rule.dim, idx, e))
    return out


def _piece(t: torch.Tensor, pc: Piece) -> torch.Tensor:
    dim = pc.dim
    if pc.expert is not None:
        t, dim = t[pc.expert], dim - 1
    return t if pc.idx is None else t.index_select(dim, pc.idx.to(t.device))


def snr_scores(model: nn.Module, family: str, roles: set[str] | None = None) -> list[MatrixScore]:
    """Score every 2-D block matrix (fused ones per q/k/v slice), highest score first."""
    params = dict(model.named_parameters())
    out: list[MatrixScore] = []
    for pc in matrix_pieces(model, family, roles):
        w = _piece(params[pc.name], pc)
        snr, score = snr_score(w)
        out.append(MatrixScore(pc.name, pc.kind, pc.layer, tuple(w.shape),  # type: ignore[arg-type]
                               snr, score, pc.expert))
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
    for n in {pc.name for pc in pieces}:
        params[n].requires_grad_(True)
    sums = torch.zeros(len(pieces), dtype=torch.float64)
    for x in batches:
        model.zero_grad(set_to_none=True)
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
        with torch.no_grad():
            for i, pc in enumerate(pieces):
                sums[i] += float(torch.linalg.vector_norm(_piece(params[pc.name].grad, pc)))
    model.zero_grad(set_to_none=True)
    for n, p in params.items():
        p.requires_grad_(was[n])
    mean = sums / max(len(batches), 1)
    out = []
    for pc, m in zip(pieces, mean.tolist(), strict=True):
        shape = tuple(_piece(params[pc.name], pc).shape)
        out.append(MatrixScore(pc.name, pc.kind, pc.layer, shape, m, m,  # type: ignore[arg-type]
                               pc.expert))
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
            if m.expert is not None:  # one expert's matrix: its role's slice of that expert
                clause += f" roles={kind.removeprefix('experts.')} experts={m.expert}"
            elif kind in ("q", "k", "v", "gate", "up"):
                clause += f" roles={kind}"  # a fused matrix trains only this role's slice
            clauses.append(clause)
    return "; ".join(clauses)
