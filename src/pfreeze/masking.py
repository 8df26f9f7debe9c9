"""Enforcing a plan: frozen elements stay bit-identical, whatever the optimizer does.

A zero gradient is not enough: AdamW's decoupled weight decay and stale momentum still move
masked elements. So a partially trainable tensor gets two treatments:
  1. its gradient is multiplied by the mask before clipping and the step (clipping and the
     optimizer's moments then only see trainable elements), and
  2. after every optimizer step its frozen elements are copied back from a reference.
Wholly frozen tensors never get `requires_grad` and never enter the optimizer's state.
The audit then checks every frozen element against θ₀ by hash (whole tensors) or by value
(partial tensors), and names the first tensor that moved.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn

from pfreeze.errors import PfreezeError
from pfreeze.plan import Geometry, ParamInfo, Plan, role_index


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


@dataclass
class _Partial:
    param: nn.Parameter
    mask: torch.Tensor  # bool, on the parameter's device
    ref: torch.Tensor  # values the frozen elements must keep


@dataclass
class Freezer:
    """Holds the current plan of one arm's model and enforces it around optimizer steps."""

    model: nn.Module
    params: dict[str, nn.Parameter] = field(init=False)
    partial: dict[str, _Partial] = field(init=False, default_factory=dict)
    # Which elements were ever trainable: the audit checks only the rest against θ₀.
    ever: dict[str, torch.Tensor | None] = field(init=False, default_factory=dict)
    theta0_digest: dict[str, str] = field(init=False, default_factory=dict)
    theta0_partial: dict[str, torch.Tensor] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.params = dict(self.model.named_parameters())
        self.theta0_digest = {n: tensor_digest(p) for n, p in self.params.items()}

    def apply(self, plan: Plan | None) -> None:
        """Make `plan` the one in force (None: everything frozen). Safe to call mid-run."""
        tensors = plan.tensors if plan is not None else {}
        self.partial.clear()
        for name, p in self.params.items():
            tp = tensors.get(name)
            p.requires_grad_(tp is not None)
            if tp is None:
                p.grad = None  # a stale gradient must not reach the optimizer
                continue
            if tp.mask is not None:
                mask = tp.mask.to(p.device)
                self.partial[name] = _Partial(p, mask, p.detach().clone())
            prev = self.ever.get(name, False)
            if tp.mask is None or prev is None:
                self.ever[name] = None
            else:
                m = tp.mask.to(p.device)
                self.ever[name] = m if prev is False else (prev | m)
            if name in self.partial and name not in self.theta0_partial and prev is False:
                # θ₀ values are needed to audit a tensor that is only partly trainable.
                self.theta0_partial[name] = p.detach().clone()

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.params.values() if p.requires_grad]

    @torch.no_grad()
    def mask_grads(self) -> None:
        for part in self.partial.values():
            if part.param.grad is not None:
                part.param.grad.mul_(part.mask)

    @torch.no_grad()
    def restore(self) -> None:
        for part in self.partial.values():
            part.param.copy_(torch.where(part.mask, part.param, part.ref))

    @torch.no_grad()
    def audit(self) -> dict[str, object]:
        """Check every never-trainable element against θ₀."""
        checked, tensors, violations = 0, 0, []
        for name, p in self.params.items():
            ever = self.ever.get(name, False)
            if ever is None:
                continue
            if ever is False:
                checked += p.numel()
                tensors += 1
                if tensor_digest(p) != self.theta0_digest[name]:
                    violations.append(name)
                continue
            frozen = ~ever
            checked += int(frozen.sum())
            tensors += 1
            if not torch.equal(p[frozen], self.theta0_partial[name][frozen]):
                violations.append(name)
        return {"ok": not violations, "checked_elements": checked, "frozen_tensors": tensors,
                "violations": violations}


def check_audit(arm: str, result: dict[str, object]) -> None:
    if not result["ok"]:
        names = result["violations"]
        raise PfreezeError(
            f"integrity violation in arm '{arm}': frozen elements of {names[0]} "  # type: ignore[index]
            f"changed ({len(names)} tensor(s) in all)",  # type: ignore[arg-type]
            "this is a pfreeze bug; please report it with the run's config",
        )


# --------------------------------------------------------------------------- ΔW tracking


@dataclass
class _Piece:
    key: str  # "L3.q"
    tensor: int  # index into Tracker.names
    dim: int
    index: torch.Tensor | None  # None: the whole tensor


class Tracker:
    """Per step: ‖W_t − W_{t−1}‖_F and ‖W_t − W₀‖_F of every tracked matrix, on the device.

    Fused matrices are split into their q/k/v pieces so every row of the output names one
    projection of one block. Norms stay on the device; the loop reads them every log interval.
    """

    def __init__(self, model: nn.Module, infos: dict[str, ParamInfo], names: list[str]) -> None:
        params = dict(model.named_parameters())
        g = Geometry.of(model)
        self.names = [n for n in names if len(infos[n].shape) >= 2]
        self.params = [params[n] for n in self.names]
        self.prev = [p.detach().clone() for p in self.params]
        self.w0 = [p.detach().clone() for p in self.params]
        self.pieces: list[_Piece] = []
        for i, n in enumerate(self.names):
            info = infos[n]
            prefix = f"L{info.layer}." if info.layer is not None else f"{n}:"
            if info.rule.role == "qkv":
                for r in "qkv":
                    idx = role_index(info, r, None, g).to(self.params[i].device)
                    self.pieces.append(_Piece(prefix + r, i, info.rule.dim, idx))
            else:
                self.pieces.append(_Piece(prefix + info.rule.role, i, 0, None))
        self.keys = [pc.key for pc in self.pieces]

    @torch.no_grad()
    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Norms for this step, as two 1-D tensors aligned with self.keys (no host sync)."""
        cur = [p.detach() for p in self.params]
        if not cur:
            z = torch.zeros(0)
            return z, z
        d_prev = torch._foreach_sub(cur, self.prev)
        d_0 = torch._foreach_sub(cur, self.w0)
        torch._foreach_copy_(self.prev, cur)
        out = []
        for diffs in (d_prev, d_0):
            norms = []
            for pc in self.pieces:
                d = diffs[pc.tensor]
                d = d if pc.index is None else d.index_select(pc.dim, pc.index)
                norms.append(torch.linalg.vector_norm(d.float()))
            out.append(torch.stack(norms))
        return out[0], out[1]
