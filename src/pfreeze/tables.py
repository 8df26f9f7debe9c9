"""The tables the `pfreeze` command prints: a run's summary, a plan, the memory plan, an
inferred family's rules, the families. Each prints to the rich Console it is given."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pfreeze.outputs.units import fmt

if TYPE_CHECKING:
    from pfreeze.plan.selectors import Plan


def print_summary(console: Console, summary: dict) -> None:
    """The closing table of `pfreeze run`, in the units of `pfreeze compare` and the evidence
    report (pfreeze.outputs.units)."""
    # Short headers keep the numbers whole on an 80-column terminal (rich squeezes wide tables).
    table = Table(title="pfreeze summary",
                  caption="step: median time per step; val loss and p: before→after")
    for col in ("arm", "trainable", "step", "last loss", "val loss", "p"):
        table.add_column(col, no_wrap=col != "arm")
    for name, a in summary["arms"].items():
        p_before, p_after = (fmt((a.get(k) or {}).get("mean"), "%")
                             for k in ("p_before", "p_after"))
        table.add_row(escape(name), fmt(a.get("trainable_params"), "params"),
                      fmt(a.get("median_step_time_s"), "ms"), fmt(a.get("last_loss"), "nats"),
                      f"{fmt(a.get('val_loss_before'), 'nats')}→"
                      f"{fmt(a.get('val_loss_after'), 'nats')}", f"{p_before}→{p_after}")
    console.print(table)


def print_memory(out: Console, cfg: Any) -> None:
    """Per arm, what it needs on the run's device (pfreeze.plan.memory)."""
    from pfreeze.run.fit import memory_plan
    from pfreeze.run.runtime import Runtime

    rt = Runtime.without_model(cfg.training, cfg.generation)
    plan = memory_plan(cfg, rt.device, rt.bf16)
    table = Table(title="memory plan (MiB; an estimate: see pfreeze.plan.memory)")
    cols = ("arm", "weights_mib", "grads_mib", "optimizer_mib", "activations_mib", "total_mib")
    for col in (*cols, "note"):
        table.add_column(col.removesuffix("_mib"), overflow="fold")
    for r in plan.rows():
        table.add_row(*(escape(str(r[c])) for c in (*cols, "note")))
    out.print(table)
    fits = ("" if plan.fits else ": they fit one at a time only" if plan.fits_alone
            else ": they do not fit")
    out.print(plan.headline() + fits)
    for line in plan.misses():
        out.print(escape(line))


def print_inferred(console: Console, family: str) -> None:
    from pfreeze.models.families import FAMILIES
    from pfreeze.models.infer import describe_rules

    if family.startswith("inferred:"):
        console.print(f"no family entry covers this model; pfreeze inferred {family} from its "
                      "parameter names, with these rules:")
        for line in describe_rules(FAMILIES[family]):
            console.print(f"  {escape(line)}")


def print_plan(out: Console, title: str, p: Plan, all_rows: bool) -> None:
    from pfreeze.plan.masks import optimizer_state_bytes
    from pfreeze.plan.table import plan_rows

    table = Table(title=escape(title))
    for col in ("tensor", "shape", "trainable / total", "how"):
        table.add_column(col, overflow="fold")
    for r in plan_rows(p):
        if r["trainable"] or all_rows:
            shape = "×".join(map(str, r["shape"]))  # type: ignore[call-overload]
            table.add_row(escape(str(r["name"])), shape,
                          f"{r['trainable']:,} / {r['total']:,}", escape(str(r["how"])))
    out.print(table)
    trainable, total = p.trainable, p.total
    adam_bytes = optimizer_state_bytes(p, "adamw")
    out.print(f"trainable: {trainable:,} of {total:,} parameters "
              f"({100 * trainable / total:.2f}%) in {len(p.tensors)} tensors; "
              f"AdamW state: {fmt(adam_bytes / 2**20, 'MiB')}")
