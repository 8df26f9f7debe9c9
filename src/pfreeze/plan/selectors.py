"""The selector language and the plan it compiles to: what trains, down to single elements.

A selector is clauses separated by `;`. A clause is space-separated terms, all of which must
hold (AND); clauses add up (OR); a clause starting with `!` removes what it matches.

    layers=15: roles=q,k,v          q, k, v of blocks 15 and up (also -6:, 0,2,5, 50%:)
    roles=q heads=0,3               query heads 0 and 3 of every block (GQA-aware for k/v)
    re=model\\.norm\\..*             anchored regex over parameter names
    *.q_proj.weight[:, 0:64]        glob over names, then an element slice
    roles=attn; !layers=0           all attention, except block 0
    roles=experts experts=0,3       experts 0 and 3 of every MoE layer (also roles=gate ...)

Roles: q k v o attn(=q,k,v,o) gate up down router experts mlp(=the whole MLP) embed norm
head. Each is exact even inside fused matrices (GPT-2 `c_attn` column blocks, GPT-NeoX and
Falcon `query_key_value`, Phi-3 `qkv_proj` and `gate_up_proj`, MoE expert tensors): see
`pfreeze.models.layouts`.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from pfreeze.errors import PfreezeError
from pfreeze.models.families import describe_params
from pfreeze.models.layouts import ROLES, Geometry, ParamInfo, role_index, roles_in

ROLE_ALIASES = {"attn": ("q", "k", "v", "o"), "qkv": ("q", "k", "v"),
                "mlp": ("gate", "up", "down", "router", "experts", "mlp")}
_ROLE_WORDS = ", ".join(dict.fromkeys(ROLES + tuple(ROLE_ALIASES)))


@dataclass
class TensorPlan:
    """What trains in one parameter: mask None means every element."""

    mask: torch.Tensor | None
    total: int
    notes: list[str] = field(default_factory=list)

    @property
    def trainable(self) -> int:
        return self.total if self.mask is None else int(self.mask.sum())


@dataclass
class Plan:
    selector: str
    tensors: dict[str, TensorPlan]  # only parameters with at least one trainable element
    params: dict[str, ParamInfo]
    geometry: Geometry | None = None  # heads per role, for describing masks by head

    @property
    def trainable(self) -> int:
        return sum(t.trainable for t in self.tensors.values())

    @property
    def total(self) -> int:
        return sum(math.prod(p.shape) for p in self.params.values())


# --------------------------------------------------------------------------- parsing


def _split_terms(clause: str) -> list[str]:
    """Split on spaces that are not inside [...], so `w[:, 0:64]` stays one term."""
    return re.findall(r"(?:\[[^\]]*\]?|[^\s\[])+", clause)


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """`6:`, `-6:`, `0,2,5`, `3:8`, `50%:` -> sorted block indices, range-checked."""

    def bound(tok: str) -> int | None:
        if tok == "":
            return None
        if tok.endswith("%"):
            return round(float(tok[:-1]) / 100 * n_layers)
        return int(tok)

    chosen: set[int] = set()
    for item in spec.split(","):
        item = item.strip()
        try:
            if ":" in item:
                a, b = item.split(":", 1)
                chosen.update(range(n_layers)[slice(bound(a), bound(b))])
            else:
                i = int(item)
                if not -n_layers <= i < n_layers:
                    raise PfreezeError(
                        f"layers={spec}: block {i} is out of range",
                        f"this model has {n_layers} blocks (0..{n_layers - 1})",
                    )
                chosen.add(i % n_layers)
        except (ValueError, OverflowError):  # OverflowError: `inf%`
            raise PfreezeError(
                f"layers={spec}: '{item}' is not a block index or slice",
                "write e.g. layers=6: or layers=-6: or layers=0,2,5 or layers=50%:",
            ) from None
    if not chosen:
        raise PfreezeError(
            f"layers={spec} selects no block",
            f"this model has {n_layers} blocks (0..{n_layers - 1})",
        )
    return sorted(chosen)


def _parse_index(expr: str, shape: tuple[int, ...], term: str,
                 name: str) -> tuple[slice | int, ...]:
    """`0:64, 3` -> (slice(0, 64), 3), every bound checked against `shape`: Python would clamp
    a slice past the end silently, and a plan must train exactly what it says."""
    parts = [p.strip() for p in expr.split(",")]  # callers skip tensors of lower rank
    idx: list[slice | int] = []
    for dim, p in enumerate(parts):
        try:
            if ":" in p:
                nums = [int(x) if x.strip() else None for x in p.split(":")]
                idx.append(slice(*nums))
            else:
                idx.append(int(p))
        except (ValueError, TypeError):  # TypeError: more than three parts (a:b:c:d)
            raise PfreezeError(f"'{term}': cannot read index '{p}'",
                               "use integers and slices like [:, 0:64]") from None
        n = shape[dim]
        item = idx[-1]
        bounds = [item] if isinstance(item, int) else [b for b in (item.start, item.stop)
                                                       if b is not None]
        limit = n - 1 if isinstance(item, int) else n
        if any(not -n <= b <= limit for b in bounds) or (
                isinstance(item, slice) and item.step is not None and item.step <= 0):
            raise PfreezeError(
                f"'{term}': [{expr}] does not fit {name} of shape {list(shape)} "
                f"('{p}' on dim {dim} of size {n})",
                f"use indices 0..{n - 1} on dim {dim} (a slice may end at {n})")
    return tuple(idx)


# --------------------------------------------------------------------------- compiling


@dataclass
class _Clause:
    """One clause, read: every term must hold for a parameter (or its elements) to train."""

    text: str
    layers: list[int] | None = None
    roles: set[str] | None = None
    asked: list[str] = field(default_factory=list)  # the roles as written (aliases unexpanded)
    heads: list[int] | None = None
    experts: list[int] | None = None
    filters: list[tuple[str, str, str | None]] = field(default_factory=list)  # kind, pat, idx


def _read_clause(clause: str, g: Geometry) -> _Clause:
    c = _Clause(clause)
    for term in _split_terms(clause):
        key, eq, val = term.partition("=")
        if eq and key == "layers":
            c.layers = parse_layers(val, g.n_layers)
        elif eq and key == "roles":
            c.roles = set()
            for r in val.split(","):
                if r not in ROLES and r not in ROLE_ALIASES:
                    raise PfreezeError(f"unknown role '{r}' in '{clause}'",
                                       f"roles are {_ROLE_WORDS}")
                c.roles.update(ROLE_ALIASES.get(r, (r,)))
                c.asked.append(r)
        elif eq and key in ("heads", "experts"):
            items = val.split(",")
            if not all(h.strip().isdigit() for h in items):  # -1 too: it would wrap around
                raise PfreezeError(f"{key}={val}: not a list of {key[:-1]} indices (0, 1, ...)",
                                   f"write e.g. {key}=0,3")
            setattr(c, key, sorted({int(h) for h in items}))
        elif eq and key == "re":
            c.filters.append(("re", val, None))
        elif not eq or "[" in key:
            m = re.fullmatch(r"([^\[]+)(?:\[(.*)\])?", term)
            if not m:
                raise PfreezeError(f"cannot read term '{term}'", "see `pfreeze plan --help`")
            c.filters.append(("glob", m.group(1), m.group(2)))
        else:
            raise PfreezeError(f"unknown selector key '{key}' in '{clause}'",
                               "keys are layers=, roles=, heads=, experts=, re=, or a name glob")
    if c.heads is not None and c.roles is None:
        raise PfreezeError(f"'{clause}': heads= needs roles=", "write e.g. roles=q heads=0,3")
    return c


def _check_experts(c: _Clause, params: dict[str, ParamInfo], family: str) -> None:
    """experts= needs expert tensors, and indices below their expert count."""
    counts = {p.shape[0] for p in params.values() if p.rule.experts}
    if c.experts is None:
        return
    if not counts:
        raise PfreezeError(f"'{c.text}': experts= but this {family} model has no experts",
                           "drop experts=, or select MLP parts with roles=gate,up,down")
    if c.experts[-1] >= min(counts):
        raise PfreezeError(f"experts={','.join(map(str, c.experts))}: the model has only "
                           f"{min(counts)} experts per layer",
                           f"use expert indices 0..{min(counts) - 1}")


def _check_roles(c: _Clause, params: dict[str, ParamInfo], g: Geometry, family: str) -> None:
    """Roles the family has, and head indices each role has (fewer k/v heads under GQA)."""
    _check_experts(c, params, family)
    if not c.roles:
        return
    have = {r for p in params.values() for r in roles_in(p)}
    # An alias needs one of its roles (a dense model's mlp has no router): a role, itself.
    if missing := [r for r in c.asked if not set(ROLE_ALIASES.get(r, (r,))) & have]:
        raise PfreezeError(
            f"the {family} architecture has no parameters with role {sorted(missing)}",
            f"roles present: {', '.join(r for r in ROLES if r in have)}",
        )
    for r in sorted(c.roles & {"q", "k", "v", "o"}) if c.heads else ():
        n = g.heads_of(r)
        if c.heads and c.heads[-1] >= n:
            raise PfreezeError(
                f"heads={','.join(map(str, c.heads))}: role {r} has only {n} heads",
                f"use head indices 0..{n - 1}"
                + (" (k and v are grouped-query heads)" if n < g.n_heads else ""))


_NO_MATCH = object()


def _mask(c: _Clause, name: str, info: ParamInfo, g: Geometry) -> torch.Tensor | None | object:
    """The elements of one parameter the clause trains: None (all of it), a bool mask, or
    _NO_MATCH."""
    if c.layers is not None and info.layer not in c.layers:
        return _NO_MATCH
    if c.experts is not None and not info.rule.experts:
        return _NO_MATCH
    index_expr = None
    for kind, pat, idx in c.filters:
        hit = re.fullmatch(pat, name) if kind == "re" else fnmatch.fnmatchcase(name, pat)
        if not hit:
            return _NO_MATCH
        index_expr = idx if idx is not None else index_expr
    mask: torch.Tensor | None = None
    if c.roles:
        present = [r for r in roles_in(info) if r in c.roles]
        if not present:
            return _NO_MATCH
        idxs = [role_index(info, r, c.heads, g) for r in present]
        if all(i is not None for i in idxs):
            sel = torch.cat([i for i in idxs if i is not None])
            if sel.numel() == 0:
                return _NO_MATCH
            mask = torch.zeros(info.shape, dtype=torch.bool)
            mask.index_fill_(info.rule.dim, sel, True)
    if c.experts is not None:  # dim 0 of an expert tensor is the expert
        chosen = torch.zeros(info.shape, dtype=torch.bool)
        chosen[c.experts] = True
        mask = chosen if mask is None else mask & chosen
    if index_expr is not None:
        if index_expr.count(",") + 1 > len(info.shape):
            return _NO_MATCH  # a glob may also hit lower-rank tensors (norms, biases)
        box = torch.zeros(info.shape, dtype=torch.bool)
        box[_parse_index(index_expr, info.shape, c.text, name)] = True
        mask = box if mask is None else mask & box
    if mask is not None and bool(mask.all()):
        return None
    return _NO_MATCH if mask is not None and not bool(mask.any()) else mask


def _clause_masks(clause: str, params: dict[str, ParamInfo], g: Geometry,
                  family: str) -> dict[str, torch.Tensor | None]:
    c = _read_clause(clause, g)
    _check_roles(c, params, g, family)
    out: dict[str, torch.Tensor | None] = {}
    for name, info in params.items():
        mask = _mask(c, name, info, g)
        if mask is not _NO_MATCH:
            out[name] = mask  # type: ignore[assignment]
    if not out:
        raise PfreezeError(
            f"selector clause '{clause}' matches no parameter",
            f"run `pfreeze plan --model ...` to list names; blocks are 0..{g.n_layers - 1}",
        )
    return out


def _merge(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return None if a is None or b is None else a | b


def compile_plan(model: nn.Module, family: str, selector: str) -> Plan:
    """Compile `selector` against `model` into per-tensor trainable masks."""
    params = describe_params(model, family)
    g = Geometry.of(model)
    clauses = [c.strip() for c in selector.split(";") if c.strip()]
    if not clauses:
        raise PfreezeError("the selector is empty", "write e.g. 'layers=50%: roles=q,k,v'")
    keep: dict[str, TensorPlan] = {}
    for clause in (c for c in clauses if not c.startswith("!")):
        for name, mask in _clause_masks(clause, params, g, family).items():
            total = math.prod(params[name].shape)
            tp = keep.setdefault(name, TensorPlan(mask, total))
            tp.mask = _merge(tp.mask, mask) if tp.notes else mask
            if tp.mask is not None and bool(tp.mask.all()):
                tp.mask = None  # clauses that together cover the tensor: train it whole
            tp.notes.append(clause)
    for clause in (c[1:].strip() for c in clauses if c.startswith("!")):
        for name, mask in _clause_masks(clause, params, g, family).items():
            if name not in keep:
                continue
            tp = keep[name]
            base = tp.mask if tp.mask is not None else torch.ones(params[name].shape,
                                                                  dtype=torch.bool)
            remaining = torch.zeros_like(base) if mask is None else base & ~mask
            if not bool(remaining.any()):
                del keep[name]
            else:
                tp.mask = None if bool(remaining.all()) else remaining
                tp.notes.append(f"!{clause}")
    if not keep:
        raise PfreezeError(f"selector '{selector}' leaves nothing trainable",
                           "check the ! clauses")
    return Plan(selector, keep, params, g)


def trainable_union(plans: Iterable[Plan | None]) -> int:
    """Elements trainable under at least one of `plans` (a schedule's phases, say)."""
    union: dict[str, tuple[int, torch.Tensor | None]] = {}
    for plan in (p for p in plans if p is not None):
        for name, tp in plan.tensors.items():
            seen = union.get(name)
            union[name] = (tp.total, _merge(seen[1], tp.mask) if seen else tp.mask)
    return sum(total if m is None else int(m.sum()) for total, m in union.values())


def full_plan(model: nn.Module, family: str) -> Plan:
    params = describe_params(model, family)
    return Plan("all", {n: TensorPlan(None, math.prod(i.shape), ["all"])
                        for n, i in params.items()}, params, Geometry.of(model))
