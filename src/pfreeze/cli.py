"""`pfreeze` command line: run, plan, report, compare.

Every user mistake is a PfreezeError and prints as one line (`error: problem; fix`) with exit
code 2; `--debug` shows the traceback as well.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pfreeze import tables
from pfreeze.errors import PfreezeError
from pfreeze.run.interrupts import Interrupted

# add_completion: `pfreeze --install-completion` (bash, zsh, fish, PowerShell) from typer.
app = typer.Typer(add_completion=True, no_args_is_help=True,
                  help="Targeted fine-tuning with precision freezing, measured side by side.")
console = Console(stderr=True, emoji=False)  # `random:llama:` must not become an emoji
out = Console(emoji=False)
_state: dict[str, Any] = {"debug": False}


def _version(value: bool) -> None:
    if value:
        from pfreeze import __version__

        out.print(f"pfreeze {__version__}")
        raise typer.Exit()


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
          version: Annotated[bool, typer.Option(
              "--version", callback=_version, is_eager=True,
              help="Print pfreeze's version and exit.")] = False) -> None:
    _state["debug"] = debug


@app.command()
def run(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config.")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a config value: key.path=value (repeatable).")] = None,
    output_dir: Annotated[Path | None, typer.Option("--output-dir", "-o")] = None,
    corpus: Annotated[str | None, typer.Option(
        "--corpus", help="Text file, folder, .jsonl/.json/.csv/.parquet, saved dataset folder, "
        "hf:<id> or gutenberg:<id> (same as --set data.corpus=...).")] = None,
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
        if not no_report:
            from pfreeze.outputs.evidence import render_repeats

            written = render_repeats(Path(cfg.output_dir))
            console.print(f"evidence: {escape(str(written['html']))}")
        return
    tables.print_summary(console, summary)
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
    from pfreeze.api import phases_to
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
        task = progress.add_task("starting", total=cfg.training.max_steps, losses="")

        def on_step(step: int, losses: dict[str, float]) -> None:
            shown = "  ".join(f"{k}={v:.3f}" for k, v in losses.items())
            progress.update(task, completed=step, description="training",
                            **({"losses": shown} if shown else {}))

        with phases_to(lambda phase: progress.update(task, description=escape(phase))):
            summary = run_experiment(cfg, cfg.output_dir, overwrite=overwrite, on_step=on_step,
                                     resume=resume, command=" ".join(["pfreeze", *sys.argv[1:]]))
        progress.update(task, description="done")
        return summary



def _rank0() -> bool:
    """Whether this process shows progress and results: always, except on the other ranks
    of a torchrun launch."""
    return os.environ.get("RANK", "0") in ("", "0")


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
    from pfreeze.models.load import meta_of
    from pfreeze.plan.selectors import compile_plan

    if config is None:
        name = model or "random:gpt2"
        shapes, family = meta_of(name)
        selector = select or "layers=50%: roles=q,k,v"
        tables.print_inferred(console, family)
        tables.print_plan(out, f"{name} ({family}): {selector}",
                    compile_plan(shapes, family, selector), all_rows)
        return
    if select:
        raise PfreezeError("--select and --config both say what trains",
                           "pass one of them")
    from pfreeze.config import load_config
    from pfreeze.run.arms import make_arm
    from pfreeze.run.fit import arm_plans

    cfg = load_config(config)
    if model:
        cfg.model.name = model
    shapes, family = meta_of(cfg.model.name, cfg.model.revision)
    for acfg in cfg.arms:
        strat = make_arm(acfg, family, cfg.training.max_steps)
        note = arm_plans(strat, shapes, family)[2]  # built on the meta device
        head = f"[bold]{escape(str(acfg.name))}[/]: {escape(strat.describe())}"
        if note:  # chosen or made at run time: no table of it before
            out.print(f"{head}; {escape(note)}")
            continue
        out.print(head)
        for step, p in sorted(strat.plans.items()):
            if p is None:
                out.print(f"  from step {step}: nothing trains")
            else:
                tables.print_plan(out, f"{acfg.name}, from step {step}: {p.selector}", p, all_rows)
    tables.print_memory(out, cfg)


@app.command()
def families() -> None:
    """List the supported model families: their model_types, roles, fused layouts and the
    model_types pfreeze's sampler serves (the others sample with transformers' generate)."""
    from pfreeze.models.families import FAMILIES
    from pfreeze.models.layouts import FUSED, rule_roles

    table = Table("family", "model_types", "roles", "fused layouts", "sampler")
    for fam in FAMILIES.values():
        roles = dict.fromkeys(r for rule in fam.rules for r in rule_roles(rule))
        fused = sorted({f"{rule.role}: {rule.layout}" + " per expert" * rule.experts
                        for rule in fam.rules if rule.layout in FUSED})
        served = ("all" if fam.sampler_model_types == fam.model_types else
                  ", ".join(fam.sampler_model_types) or "—")
        table.add_row(fam.name, ", ".join(fam.model_types), " ".join(roles), ", ".join(fused),
                      served)
    console.print(table)


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
        table.add_row(str(i), escape(m.label), m.role, "×".join(map(str, m.shape)),
                      f"{m.snr:.3g}", f"{m.score:.3g}")
    out.print(table)
    out.print(f"top {top:g}% per type, as an arm: {{kind: snr, top_percent: {top:g}}}; "
                    f"selector:\n{escape(top_selector(scores, top))}", soft_wrap=True)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A pfreeze run's output_dir.")]) -> None:
    """Re-render plots, report.md and report.html from a run directory's files (of a repeats
    run: every repeat's report and the evidence report over all of them)."""
    from pfreeze.outputs.evidence import render_any

    written = render_any(run_dir)
    for kind, path in written.items():
        console.print(f"{kind}: {escape(str(path))}")


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Two or more runs' output_dirs.")],
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table.")] = False,
) -> None:
    """Put runs' summaries side by side (a repeats run: mean ± 95% CI over its repeats)."""
    from pfreeze.outputs.compare import compare as side_by_side
    from pfreeze.outputs.compare import to_markdown

    if len(run_dirs) < 2:
        raise PfreezeError("compare needs two or more run directories",
                           "pass them as `pfreeze compare DIR1 DIR2`")
    header, rows, notes = side_by_side(run_dirs)
    if markdown:
        out.print(escape(to_markdown(header, rows, notes)), soft_wrap=True)
        return
    table = Table(title="pfreeze compare")
    for col in header:
        table.add_column(escape(col), overflow="fold")
    for row in rows:
        table.add_row(*(escape(c) for c in row))
    out.print(table)
    for note in notes:
        out.print(escape(note), soft_wrap=True)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A pfreeze run's output_dir.")],
    arm: Annotated[str, typer.Option("--arm", "-a", help="The arm to export.")],
    out_dir: Annotated[Path, typer.Option("--out", help="The model directory to write.")],
    best: Annotated[bool, typer.Option(
        "--best", help="The weights of the best evaluation (training.keep_best).")] = False,
) -> None:
    """Write an arm as a standard transformers model directory (LoRA merged)."""
    from pfreeze.export import export_arm

    path = export_arm(run_dir, arm, out_dir, best)
    console.print(f"exported arm {escape(arm)}: {escape(str(path))}")


@app.command(name="apply")
def apply_(
    delta: Annotated[Path, typer.Argument(help="An arm's trained.safetensors.")],
    base: Annotated[str, typer.Option("--base", help="The base model (the run's θ₀).")],
    out_dir: Annotated[Path, typer.Option("--out", help="The model directory to write.")],
) -> None:
    """Apply a trained.safetensors to its base model; write a transformers model directory."""
    from pfreeze.export import apply_delta

    path = apply_delta(delta, base, out_dir)
    console.print(f"applied {escape(str(delta))} to {escape(base)}: {escape(str(path))}")


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
