"""‖ΔW‖: how far each tracked matrix moved in a step and since θ₀, measured on the device."""

from __future__ import annotations

import torch
from torch import nn

from pfreeze.models.layouts import Geometry, ParamInfo, pieces


class Tracker:
    """Per step: ‖W_t − W_{t−1}‖_F and ‖W_t − W₀‖_F of every tracked matrix, on the device.

    Fused matrices are split into their roles' pieces (q/k/v, gate/up) so every entry names
    one projection of one block. Matrices the arm never trains are reported as exact zeros
    without being read (the integrity audit proves they did not move). Whole matrices go
    through one foreach norm; norms stay on the device and the loop reads them every log
    interval.
    """

    def __init__(self, model: nn.Module, infos: dict[str, ParamInfo], names: list[str],
                 trained: set[str] | None = None) -> None:
        params = dict(model.named_parameters())
        g = Geometry.of(model)
        tracked = [n for n in names if len(infos[n].shape) >= 2]
        live = [n for n in tracked if trained is None or n in trained]
        self.params = [params[n] for n in live]
        self.prev = [p.detach().clone() for p in self.params]
        self.w0 = [p.detach().clone() for p in self.params]
        self.keys: list[str] = []
        self.frozen_keys: list[str] = []  # keys of matrices the arm never trains
        self.whole: list[tuple[int, int]] = []  # (output position, live tensor)
        self.parts: list[tuple[int, int, int, torch.Tensor | slice]] = []  # (pos, tensor, dim, idx)
        for n in tracked:
            info = infos[n]
            prefix = f"L{info.layer}." if info.layer is not None else f"{n}:"
            i = live.index(n) if n in live else None
            for r, idx in pieces(info, g):
                pos = len(self.keys)
                self.keys.append(prefix + r)
                if i is None:
                    self.frozen_keys.append(prefix + r)
                    continue
                if idx is None:
                    self.whole.append((pos, i))
                    continue
                lo = int(idx[0])
                # Contiguous pieces (GPT-2, Phi-3, gate/up halves) are views: no gather needed.
                contiguous = torch.equal(idx, torch.arange(lo, lo + len(idx)))
                sel = slice(lo, lo + len(idx)) if contiguous else idx.to(self.params[i].device)
                self.parts.append((pos, i, info.rule.dim, sel))
        # The model's device even where nothing is tracked: no step's norms are host tensors.
        device = next((p.device for p in params.values()), torch.device("cpu"))
        self._pos_whole = torch.tensor([p for p, _ in self.whole], dtype=torch.long, device=device)
        self._pos_parts = torch.tensor([p for p, *_ in self.parts], dtype=torch.long, device=device)

    def _norms(self, diffs: list[torch.Tensor]) -> torch.Tensor:
        device = self._pos_whole.device
        out = torch.zeros(len(self.keys), device=device)
        if self.whole:
            norms = torch._foreach_norm([diffs[i] for _, i in self.whole])
            out[self._pos_whole] = torch.stack(norms).float()
        if self.parts:
            norms = []
            for _, i, dim, sel in self.parts:
                d = diffs[i]
                d = (d.narrow(dim, sel.start, sel.stop - sel.start) if isinstance(sel, slice)
                     else d.index_select(dim, sel))
                norms.append(torch.linalg.vector_norm(d))
            out[self._pos_parts] = torch.stack(norms).float()
        return out

    @torch.no_grad()
    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Norms for this step, as two 1-D tensors aligned with self.keys (no host sync)."""
        if not self.params:
            z = torch.zeros(len(self.keys), device=self._pos_whole.device)
            return z, z
        cur = [p.detach() for p in self.params]
        d_0 = torch._foreach_sub(cur, self.w0)
        # W_{t-1} - W_t in place (a norm ignores the sign), then prev becomes W_t: no copy.
        torch._foreach_sub_(self.prev, cur)
        d_prev = self._norms(self.prev)
        torch._foreach_copy_(self.prev, cur)
        return d_prev, self._norms(d_0)

