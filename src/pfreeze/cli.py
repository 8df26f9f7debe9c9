"""`pfreeze` command line: run, plan, report.

Every user mistake is a PfreezeError and prints as one line (`error: problem; fix`) with exit
code 2; `--debug` shows the traceback as well.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from pfreeze.plan.selectors import Plan

from pfreeze.errors import PfreezeError
from pfreeze.run.interrupts import Interrupted

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Targeted fine-tuning with precision freezing, measured side by side.")
console = Console(stderr=True, emoji=False)  # `random:llama:` must not become an emoji
out = Console(emoji=False)
_state: dict[str, Any] = {"debug": False}


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False) -> None:
    _state["debug"] = debug


@app.command()
def run(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config.")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a config value: key.path=value (repeatable).")] = None,
    output_dir: Annotated[Path | None, typer.Option("--output-dir", "-o")] = None,
    corpus: Annotated[str | None, typer.Option(
        "--corpus", help="Text file or gutenberg:<id> (same as --set data.corpus=...).")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", help="smollm2-135m, an HF id/dir, or random:<family>.")] = None,
    encoding: Annotated[str | None, typer.Option(
        "--encoding", help="Text encoding of the corpus, e.g. cp1252 (default: UTF-8).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a run already in --output-dir.")] = False,
    resume: Annotated[Path | None, typer.Option(
        "--resume", help="Continue the run in this directory from its last checkpoint.")] = None,
    no_report: Annotated[bool, typer.Option("--no-report", help="Skip the report.")] = False,
) -> None:
    """Train every arm of the config side by side and write metrics, summary and report."""
    from pfreeze.outputs.files import finished

    cfg = _run_config(config, list(set_ or []), output_dir, corpus, model, encoding, resume)
    _state["output_dir"] = cfg.output_dir  # named by an interrupt's message
    if resume is not None and (done := finished(resume)) is not None:
        steps = max((a.get("steps") or 0 for a in done.get("arms", {}).values()), default=0)
        console.print(f"{escape(str(resume))}: the run is finished ({steps} steps); nothing to "
                      f"resume (`pfreeze report {escape(str(resume))}` re-renders its report)",
                      soft_wrap=True)
        return
    summary = _train(cfg, overwrite, resume is not None)
    if not _rank0():  # under torchrun, rank 0 reports for every rank
        return
    if cfg.repeats > 1:
        from pfreeze.outputs.repeats import render_markdown

        out.print(render_markdown(summary))
        console.print(f"repeats: {escape(str(Path(cfg.output_dir) / 'repeats.md'))}")
        return
    _print_summary(summary)
    if not no_report:
        from pfreeze.outputs.report import render_report

        written = render_report(Path(cfg.output_dir))
        html = written.get("html", Path(cfg.output_dir) / "report.html")
        console.print(f"report: {escape(str(html))}")


def _run_config(config: Path | None, overrides: list[str], output_dir: Path | None,
                corpus: str | None, model: str | None, encoding: str | None,
                resume: Path | None) -> Any:
    """The run's config from the command line's options (or, resuming, the run's own)."""
    from pfreeze.config import load_config

    if resume is not None:
        if config is not None or overrides or corpus or model or encoding or output_dir:
            raise PfreezeError("--resume takes the run's own config.yaml",
                               "pass only --resume DIR (change nothing mid-run)")
        config, output_dir = resume / "config.yaml", resume
        if not config.exists():
            raise PfreezeError(f"{resume} holds no pfreeze run (config.yaml missing)",
                               "pass the output_dir of a run started with `pfreeze run`")
    for key, value in (("data.corpus", corpus), ("model.name", model),
                       ("data.encoding", encoding)):
        if value:
            overrides.append(f"{key}={value}")
    cfg = load_config(config, overrides)
    if output_dir is not None:
        cfg.output_dir = str(output_dir)
    return cfg


def _train(cfg: Any, overwrite: bool, resume: bool) -> dict[str, Any]:
    """The run itself, with a progress bar and the latest losses."""
    from pfreeze.run.session import run as run_experiment

    arms = ", ".join(a.name or a.kind for a in cfg.arms)
    # User text (paths, names, selectors) is escaped: rich would eat `[x]` or choke on `[/x]`.
    if _rank0():
        console.print(f"[bold]pfreeze[/] {escape(cfg.model.name)} on {escape(cfg.data.corpus)}: "
                      f"arms {escape(arms)}, {cfg.training.max_steps} steps -> "
                      f"{escape(cfg.output_dir)}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.fields[losses]}"),
                  console=console, transient=False, disable=not _rank0()) as progress:
        task = progress.add_task("training", total=cfg.training.max_steps, losses="")

        def on_step(step: int, losses: dict[str, float]) -> None:
            shown = "  ".join(f"{k}={v:.3f}" for k, v in losses.items())
            progress.update(task, completed=step, **({"losses": shown} if shown else {}))

        return run_experiment(cfg, cfg.output_dir, overwrite=overwrite, on_step=on_step,
                              resume=resume, command=" ".join(["pfreeze", *sys.argv[1:]]))


def _rank0() -> bool:
    """Whether this process shows progress and results: always, except on the other ranks
    of a torchrun launch."""
    return os.environ.get("RANK", "0") in ("", "0")


def _print_summary(summary: dict) -> None:
    # Short headers keep the numbers whole on an 80-column terminal (rich squeezes wide tables).
    table = Table(title="pfreeze summary",
                  caption="step s: median seconds per step; val loss and p: before→after")
    for col in ("arm", "trainable", "step s", "last loss", "val loss", "p"):
        table.add_column(col, no_wrap=col != "arm")
    for name, a in summary["arms"].items():
        def f(x: float | None, fmt: str = ".3f") -> str:
            return "—" if x is None else format(x, fmt)

        table.add_row(escape(name), f"{a['trainable_params']:,}", f(a["median_step_time_s"]),
                      f(a["last_loss"]), f"{f(a['val_loss_before'])}→{f(a['val_loss_after'])}",
                      f"{f(a['p_before']['mean'])}→{f(a['p_after']['mean'])}")
    console.print(table)


@app.command()
def plan(
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Model to plan against (default: random:gpt2).")] = None,
    select: Annotated[str | None, typer.Option(
        "--select", "-s", help="Selector (see README); default: layers=50%: roles=q,k,v.")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="Show what every arm of this run config trains.")] = None,
    all_rows: Annotated[bool, typer.Option("--all", help="List frozen tensors too.")] = False,
) -> None:
    """Print what a selector (or every arm of a config) trains: per tensor, and totals."""
    from pfreeze.models.load import load_model
    from pfreeze.plan.selectors import compile_plan

    if config is None:
        name = model or "random:gpt2"
        lm = load_model(name)
        selector = select or "layers=50%: roles=q,k,v"
        _print_inferred(lm.family)
        _print_plan(f"{name} ({lm.family}): {selector}",
                    compile_plan(lm.model, lm.family, selector), all_rows)
        return
    if select:
        raise PfreezeError("--select and --config both say what trains",
                           "pass one of them")
    from pfreeze.config import load_config
    from pfreeze.run.arms import make_arm

    cfg = load_config(config)
    name = model or cfg.model.name
    lm = load_model(name, seed=cfg.training.seed)
    for acfg in cfg.arms:
        strat = make_arm(acfg, lm.family, cfg.training.max_steps)
        if not strat.plans_before_training:
            out.print(f"[bold]{escape(str(acfg.name))}[/]: {escape(strat.describe())}; "
                      "chosen from the training data at run time")
            continue
        strat.build(lm.model)
        out.print(f"[bold]{escape(str(acfg.name))}[/]: {escape(strat.describe())}")
        for step, p in sorted(strat.plans.items()):
            if p is None:
                out.print(f"  from step {step}: nothing trains")
            else:
                _print_plan(f"{acfg.name}, from step {step}: {p.selector}", p, all_rows)
    _print_memory(cfg)


def _print_memory(cfg: Any) -> None:
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


def _print_inferred(family: str) -> None:
    from pfreeze.models.families import FAMILIES
    from pfreeze.models.infer import describe_rules

    if family.startswith("inferred:"):
        console.print(f"no family entry covers this model; pfreeze inferred {family} from its "
                      "parameter names, with these rules:")
        for line in describe_rules(FAMILIES[family]):
            console.print(f"  {escape(line)}")


@app.command()
def families() -> None:
    """List the supported model families: their model_types, roles and fused layouts."""
    from pfreeze.models.families import FAMILIES
    from pfreeze.models.layouts import FUSED

    table = Table("family", "model_types", "roles", "fused layouts")
    for fam in FAMILIES.values():
        roles = dict.fromkeys(r for rule in fam.rules for r in
                              FUSED.get(rule.layout, (rule.role,)) + ("experts",) * rule.experts)
        fused = sorted({f"{rule.role}: {rule.layout}" + " per expert" * rule.experts
                        for rule in fam.rules if rule.layout in FUSED})
        table.add_row(fam.name, ", ".join(fam.model_types), " ".join(roles), ", ".join(fused))
    console.print(table)


def _print_plan(title: str, p: Plan, all_rows: bool) -> None:
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
              f"AdamW state: {adam_bytes / 2**20:.1f} MiB")


@app.command()
def rank(
    model: Annotated[str, typer.Option("--model", "-m", help="Model to rank.")] = "random:gpt2",
    roles: Annotated[str, typer.Option(help="Matrix roles to score.")] = "q,k,v,o,mlp",
    top: Annotated[float, typer.Option(help="Show the selector for the top X% per type.")] = 25,
    limit: Annotated[int, typer.Option(help="Rows to print (0: all).")] = 40,
) -> None:
    """Rank weight matrices by SNR score (data-free, Spectrum-style); print a selector."""
    from pfreeze.models.load import load_model
    from pfreeze.plan.rank import snr_scores, top_selector

    lm = load_model(model)
    scores = snr_scores(lm.model, lm.family, set(roles.split(",")) if roles else None)
    table = Table(title=escape(f"{model}: matrices by SNR / sigma_max"))
    for col in ("#", "matrix", "type", "shape", "SNR", "score"):
        table.add_column(col)
    for i, m in enumerate(scores[: limit or None], 1):
        table.add_row(str(i), escape(m.name), m.role, "×".join(map(str, m.shape)),
                      f"{m.snr:.3g}", f"{m.score:.3g}")
    out.print(table)
    out.print(f"top {top:g}% per type, as an arm: {{kind: snr, top_percent: {top:g}}}; "
                    f"selector:\n{escape(top_selector(scores, top))}", soft_wrap=True)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A pfreeze run's output_dir.")]) -> None:
    """Re-render plots, report.md and report.html from a run directory's files."""
    from pfreeze.outputs.report import render_report

    written = render_report(run_dir)
    for kind, path in written.items():
        console.print(f"{kind}: {escape(str(path))}")


def _outside_a_run() -> str:
    """Ctrl-C where no run handles it (before one starts, between repeats, in the report)."""
    root = _state.get("output_dir")
    if root and (Path(root) / "config.yaml").exists():
        return (f"interrupted (SIGINT); {escape(root)} keeps what was written "
                f"(`pfreeze report {escape(root)}` renders it)")
    return "interrupted (SIGINT) before the run started; nothing was written"


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers' GGUF loader draws tqdm bars per tensor; the CLI has its own progress.
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        app(standalone_mode=False)
    except PfreezeError as e:
        if _state["debug"]:
            raise
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Interrupted as e:
        console.print(f"[yellow]{escape(e.message(_state.get('output_dir', '.')))}[/]",
                      highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print(_outside_a_run(), soft_wrap=True)
        sys.exit(130)
    except Exception as e:  # click's usage errors arrive here in standalone_mode=False
        import click

        if isinstance(e, click.exceptions.Abort):  # Ctrl-C that click caught first
            console.print(_outside_a_run(), soft_wrap=True)
            sys.exit(130)
        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
