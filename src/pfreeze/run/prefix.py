"""An exact cache of the frozen prefix: the input of the lowest trained block, per window.

When an arm trains nothing in the embedding or in blocks 0..f-1, and the model has no dropout,
the input of block f for a given window depends only on frozen weights: it is the same at
every step. With `data.sampling: epochs` windows recur (aligned chunks, reshuffled each
epoch), so block f's input is computed once per chunk and the step runs blocks f.. only:
forward and backward skip the lower half of the model, which the loss does not depend on.

The model is split into two views that share its parameters (no copies):
    lower   embedding + blocks 0..f-1 (final norm replaced by identity) -> block f's input
    upper   blocks f..L-1 + final norm + head, fed that input as `inputs_embeds`
Rotary families (Llama, GPT-NeoX) add nothing to `inputs_embeds` before block 0. GPT-2 and
GPT-Neo add learned position embeddings there, which block f's input already holds: their
upper view's position embedding returns zeros (x + 0 is exact); Granite multiplies them by
`embedding_multiplier`, 1 in its upper view. Decoders that mix attention types (Gemma 2/3,
Qwen2 with sliding layers) see `layer_types` from block f on. GPT-2's default dropout makes
the prefix random, so only a GPT-2 without dropout is cached.
"""

from __future__ import annotations

import copy
import os
import types
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from pfreeze.models.families import FAMILIES, ParamInfo, first_trained_block

# Dropout applied functionally (not as nn.Dropout modules), read from the config; a
# classification head's dropout does not touch a causal LM.
_DROPOUT_KEYS = ("attention_dropout", "hidden_dropout", "dropout", "attn_pdrop", "resid_pdrop",
                 "embd_pdrop")


def _shallow(module: nn.Module) -> nn.Module:
    """A copy of `module` whose submodule slots can be replaced without touching the original."""
    twin = copy.copy(module)
    twin._modules = dict(module._modules)
    # A method bound to the instance (kernel libraries bind fused-loss forwards so) would run
    # the original, whole model: bind it to the twin.
    for name, value in vars(module).items():
        if isinstance(value, types.MethodType) and value.__self__ is module:
            setattr(twin, name, types.MethodType(value.__func__, twin))
    return twin


def not_deterministic(model: nn.Module) -> str | None:
    """Why the model's training-mode forward is random (dropout, random expert routing), or
    None."""
    kind = getattr(model.config, "model_type", None)
    if kind == "phimoe":
        return "PhiMoE samples its experts at random in training (its sparsemixer router)"
    # Mixtral multiplies the router's input by uniform noise of this width (PhiMoE's key of
    # the same name is a fixed threshold); PhiMoE its MLP's input by input_jitter_noise.
    noise = ("router_jitter_noise",) if kind == "mixtral" else ("input_jitter_noise",)
    for key in (*_DROPOUT_KEYS, *noise):
        v = getattr(model.config, key, None)
        if isinstance(v, float) and v > 0:
            return f"the model has {'noise' if key in noise else 'dropout'} ({key}={v})"
    for name, m in model.named_modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            return f"the model has dropout ({name}: p={m.p})"
    return None


class NoPositions(nn.Module):
    """The upper view's position embedding: zeros, since block f's input already holds them."""

    def __init__(self, like: nn.Embedding) -> None:
        super().__init__()
        self.width, self.dtype = like.embedding_dim, like.weight.dtype

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros((*position_ids.shape, self.width), dtype=self.dtype,
                           device=position_ids.device)


class LayerTypesFrom:
    """The upper view's decoder config: the model's own, read live (attention implementation
    included), but with `layer_types` from block f on. Decoders that mix attention types
    (Gemma 2/3, Qwen2 with sliding layers) pick block i's mask and rotary table by
    `layer_types[i]`, i counted in the list they run; the upper view runs blocks f.. ."""

    def __init__(self, config: Any, f: int) -> None:
        self._config = config
        self.layer_types = list(config.layer_types[f:])

    def __getattr__(self, name: str) -> Any:
        if name == "_config":  # not yet set (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self._config, name)


class PrefixCache:
    """One arm's split of its model around block f, and block f's input per chunk id.

    Arms with the same f would hold the same values (their blocks 0..f-1 are θ₀), but each
    keeps its own: with a shared cache the first arm would pay every miss inside its timed
    step and the others none, and step times are what the arms are compared on.
    """

    def __init__(self, model: nn.Module, family: str, f: int, n_chunks: int) -> None:
        split = FAMILIES[family].split
        assert split is not None  # Caches.for_arm gives no cache to a family without one
        base_attr, layers_attr, norm_attr = split.decoder, split.blocks, split.norm
        positions_attr = split.positions
        base = getattr(model, base_attr)
        layers = list(getattr(base, layers_attr))
        self.f, self.n_layers = f, len(layers)
        self.lower = _shallow(base)
        setattr(self.lower, layers_attr, nn.ModuleList(layers[:f]))
        setattr(self.lower, norm_attr, nn.Identity())
        upper_base = _shallow(base)
        setattr(upper_base, layers_attr, nn.ModuleList(layers[f:]))
        if positions_attr is not None:
            setattr(upper_base, positions_attr, NoPositions(getattr(base, positions_attr)))
        if split.input_scale is not None and hasattr(base, split.input_scale):
            setattr(upper_base, split.input_scale, 1.0)
        if getattr(base.config, "layer_types", None) is not None:
            upper_base.config = LayerTypesFrom(base.config, f)
        self.upper = _shallow(model)
        setattr(self.upper, base_attr, upper_base)
        self.h: torch.Tensor | None = None  # [n_chunks, block, width], allocated on first use
        self.have = torch.zeros(n_chunks, dtype=torch.bool)  # on the host: no device sync
        self.hits = self.misses = 0  # since this process started (a resumed run starts empty)

    def inputs(self, x: torch.Tensor, windows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Block f's input for the windows `x` (chunk ids `windows` on the host, `idx` the same
        on x's device: the loop stages them with the batch, not with a blocking copy here)."""
        if self.h is not None and bool(self.have[windows].all()):
            self.hits += len(windows)
            return self.h[idx]
        # A batch with any new chunk is computed whole: one shape, so no recompilation.
        with torch.no_grad():
            h = self.lower(input_ids=x, use_cache=False).last_hidden_state
        if self.h is None:
            self.h = torch.empty((len(self.have), *h.shape[1:]), dtype=h.dtype, device=h.device)
        self.h[idx] = h
        self.misses += len(windows)
        self.have[windows] = True
        return h

    def summary(self) -> dict[str, Any]:
        h = self.h
        return {"blocks_cached": self.f, "of": self.n_layers, "hits": self.hits,
                "misses": self.misses,
                "mib": None if h is None else h.numel() * h.element_size() / 2**20}


def _memory_limit(device: torch.device) -> int:
    """A quarter of the device's memory (host RAM on CPU): the most the caches may take."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


class Caches:
    """The run's prefix caches, one per cached arm, together within a quarter of memory."""

    def __init__(self, n_chunks: int, block: int, device: torch.device,
                 limit: int | None = None) -> None:
        self.n_chunks, self.block = n_chunks, block
        self.left = _memory_limit(device) if limit is None else limit

    def for_arm(self, model: nn.Module, family: str, trained: set[str],
                infos: dict[str, ParamInfo], single_plan: bool
                ) -> tuple[PrefixCache | None, str]:
        """A cache for this arm, or None and the reason it cannot have one."""
        if family not in FAMILIES or FAMILIES[family].split is None:
            split = [name for name, fam in FAMILIES.items() if fam.split is not None]
            return None, (f"not for the {family} architecture (pfreeze splits "
                          f"{', '.join(split)} models only)")
        if not isinstance(model, PreTrainedModel):
            return None, "the arm's model is wrapped (an adapter)"
        if not single_plan:
            return None, "the arm's trainable set changes during training"
        if (why := not_deterministic(model)) is not None:
            return None, why
        f = first_trained_block(trained, infos, model.config.num_hidden_layers)
        if f == 0:
            return None, "the arm trains block 0 or the embedding"
        need = self.n_chunks * self.block * model.config.hidden_size * 4
        if need > self.left:
            return None, (f"the cache would need {need / 2**30:.1f} GiB, more than the "
                          f"{self.left / 2**30:.1f} GiB left of a quarter of memory")
        self.left -= need
        return PrefixCache(model, family, f, self.n_chunks), f"blocks 0-{f - 1} cached"
