"""The forgetting probe: loss on general text the run never trains on.

Fine-tuning on one corpus lowers the loss there (learning) and can raise it on text unlike the
corpus (forgetting: what the model loses of what it knew). The probe measures the second the
way the literature does, as the rise of the next-token loss on a fixed general-domain text
against the base model. Its windows are fixed (pfreeze.measure.heldout.fixed_windows), so every
arm and every moment is measured on exactly the same tokens.

`data.probe_corpus` names the text: `builtin:us-documents` (the default, installed with pfreeze;
provenance in texts/README.md), a text file, `gutenberg:<id>`, or `none` (no probe).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from pfreeze.data.corpus import read_corpus, strip_gutenberg
from pfreeze.errors import PfreezeError
from pfreeze.measure.heldout import fixed_windows, mean_loss

OFF = "none"
BUILTIN = "builtin:"
BUILTIN_TEXTS = {"us-documents": "us-documents.txt"}


@dataclass(frozen=True)
class Probe:
    """The probe's fixed windows and where their text came from."""

    source: str
    windows: torch.Tensor  # (n, block) token ids
    n_tokens: int  # tokens of the whole probe text

    def info(self) -> dict[str, Any]:
        """What summary.json says of the probe."""
        return {"source": self.source, "windows": len(self.windows),
                "window_tokens": int(self.windows.shape[1]), "text_tokens": self.n_tokens}


def read_probe_text(spec: str, encoding: str | None = None) -> tuple[str, str] | None:
    """(text, source) of `spec`; None when the probe is off."""
    if spec.strip().lower() == OFF:
        return None
    if spec.startswith(BUILTIN):
        name = spec[len(BUILTIN):]
        if name not in BUILTIN_TEXTS:
            raise PfreezeError(f"no built-in probe text {name!r}",
                               f"use one of {', '.join(BUILTIN + n for n in BUILTIN_TEXTS)}, a "
                               "text file, gutenberg:<id>, or none")
        ref = resources.files("pfreeze.measure").joinpath("texts", BUILTIN_TEXTS[name])
        return ref.read_text(encoding="utf-8"), f"{spec} (installed with pfreeze, public domain)"
    if ":" not in spec and not Path(spec).expanduser().is_file():
        raise PfreezeError(f"probe text {spec} does not exist (data.probe_corpus)",
                           "pass a text file, gutenberg:<id>, builtin:us-documents, or none to "
                           "turn the forgetting probe off")
    text, source = read_corpus(spec, encoding)
    return strip_gutenberg(text), source


def build_probe(spec: str, tokenizer: Any, block: int, count: int,
                encoding: str | None = None) -> Probe | None:
    """The probe of `spec`: `count` windows of `block` tokens spread evenly over its text (all
    that fit when fewer do); None when the probe is off."""
    read = read_probe_text(spec, encoding)
    if read is None:
        return None
    text, source = read
    ids = [int(t) for t in tokenizer.encode(text)]  # as the corpus is tokenised
    windows = fixed_windows(ids, block, count)
    if len(windows) == 0:
        raise PfreezeError(
            f"the probe text {source} has {len(ids)} tokens, less than one window of {block}",
            "pass a longer data.probe_corpus, lower data.block_size, or set "
            "data.probe_corpus=none")
    return Probe(source, windows, len(ids))


def probe_loss(model: torch.nn.Module, windows: torch.Tensor, batch_size: int,
               device: torch.device, bf16: bool) -> float | None:
    """The probe's loss: the token-weighted mean next-token loss over its fixed windows."""
    return mean_loss(model, windows, batch_size, device, bf16)


def learning_forgetting(val: tuple[float | None, float | None],
                        probe: tuple[float | None, float | None]) -> dict[str, float | None]:
    """Learning: the fall of held-out loss (before − then); forgetting: the rise of probe loss
    (then − before). Positive learning is good; positive forgetting is knowledge lost."""
    (v0, v), (p0, p) = val, probe
    return {"learning": None if v0 is None or v is None else v0 - v,
            "forgetting": None if p0 is None or p is None else p - p0}
