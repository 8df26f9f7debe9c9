"""The plan as a table: which slices of each tensor train, in words a person can check.

`pfreeze plan` prints these rows; the descriptions are read back from the masks themselves
(runs of rows/columns, heads, boxes), so they show what will train, not what was asked for.
"""

from __future__ import annotations

import math

import torch

from pfreeze.models.layouts import Geometry, ParamInfo, pieces, role_index
from pfreeze.plan.selectors import Plan


def _along(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """1-D: which indices along `dim` hold at least one selected element."""
    return mask.movedim(dim, 0).reshape(mask.shape[dim], -1).any(1)


def _runs(flags: torch.Tensor) -> list[tuple[int, int]]:
    """Contiguous runs of True in a 1-D bool tensor, as (start, stop)."""
    runs: list[tuple[int, int]] = []
    for i in flags.nonzero().flatten().tolist():
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _runs_text(runs: list[tuple[int, int]], axis: str) -> str:
    if len(runs) > 4:  # e.g. q of every NeoX head: a count says more than 12 ranges
        return f"{sum(b - a for a, b in runs)} {axis} in {len(runs)} runs"
    return f"{axis} " + ", ".join(f"{a}:{b}" for a, b in runs)


def _axis(ndim: int, dim: int) -> str:
    return ("rows", "cols")[dim] if ndim == 2 else "elements" if ndim == 1 else f"dim {dim}"


def _broadcast(flags: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    return flags.view([-1 if d == dim else 1 for d in range(ndim)])


def _describe_heads(info: ParamInfo, mask: torch.Tensor, g: Geometry) -> str | None:
    """'q heads 0,3 (cols 0:16, 48:64)' when the mask is whole heads of roles, else None."""
    dim = info.rule.dim
    along = _along(mask, dim)
    if not torch.equal(_broadcast(along, mask.ndim, dim).expand_as(mask), mask):
        return None  # the mask also cuts the other dimension
    parts = []
    for r, idx in pieces(info, g):
        if r not in ("q", "k", "v", "o"):  # gate/up halves: whole or not at all
            f = along if idx is None else along[idx]
            if bool(f.any()) and not bool(f.all()):
                return None
            parts += [r] if bool(f.all()) else []
            continue
        n = g.heads_of(r)
        per_head = [along[role_index(info, r, [h], g)] for h in range(n)]  # type: ignore[index]
        if any(bool(f.any()) and not bool(f.all()) for f in per_head):
            return None  # part of a head: only slices can say which part
        chosen = [h for h, f in enumerate(per_head) if bool(f.all())]
        if chosen:
            parts.append(r if len(chosen) == n else f"{r} heads {','.join(map(str, chosen))}")
    return f"{', '.join(parts)} ({_runs_text(_runs(along), _axis(mask.ndim, dim))})"


def _describe_box(mask: torch.Tensor) -> str:
    """'[:, 0:16]', 'rows 0:16, 48:64 × cols 0:16' (a grid), 'all but [0:4, 0:4]', or a count."""
    text = _grid(mask)
    if text is None and (text := _grid(~mask)) is not None:
        text = f"all but {text}"  # e.g. a `!` clause cut one box out of a tensor
    return text or f"{int(mask.sum())} of {mask.numel()} elements (irregular)"


def _grid(mask: torch.Tensor) -> str | None:
    alongs = [_along(mask, d) for d in range(mask.ndim)]
    grid = torch.ones_like(mask)
    for d, a in enumerate(alongs):
        grid &= _broadcast(a, mask.ndim, d)
    if not bool(mask.any()) or not torch.equal(grid, mask):
        return None
    runs = [_runs(a) if not bool(a.all()) else [] for a in alongs]  # [] = the whole axis
    if all(len(r) <= 1 for r in runs):
        return "[" + ", ".join(f"{r[0][0]}:{r[0][1]}" if r else ":" for r in runs) + "]"
    return " × ".join(_runs_text(r, _axis(mask.ndim, d)) for d, r in enumerate(runs) if r)


def describe_mask(info: ParamInfo, mask: torch.Tensor | None, g: Geometry | None) -> str:
    """Which elements of one tensor train, read back from the mask (not from the selector)."""
    if mask is None:
        return "whole"
    heads = g is not None and info.rule.layout != "whole"
    return (_describe_heads(info, mask, g) if heads else None) or _describe_box(mask)


def plan_rows(plan: Plan) -> list[dict[str, object]]:
    """One row per parameter for the plan table (frozen ones included)."""
    rows = []
    for name, info in plan.params.items():
        tp = plan.tensors.get(name)
        rows.append({
            "name": name + (f" (tied: {info.tied})" if info.tied else ""),
            "shape": list(info.shape),
            "layer": info.layer,
            "role": info.rule.role,
            "trainable": tp.trainable if tp else 0,
            "total": math.prod(info.shape),
            "how": describe_mask(info, tp.mask, plan.geometry) if tp else "frozen",
            "clauses": "; ".join(tp.notes) if tp else "",
        })
    return rows
