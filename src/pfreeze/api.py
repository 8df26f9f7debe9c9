"""The Python API, for notebooks and scripts: run an experiment and get its results as tables,
and see what a selector trains as a table.

    import pfreeze
    result = pfreeze.run("configs/moby-dick.yaml", training={"max_steps": 10})
    result.table            # one row per arm: the headline figures
    result.metrics          # one row per step and arm (pandas)
    pfreeze.plan("random:llama", "layers=50%: roles=q,k,v")

Settings are the config's (README); what goes wrong is a PfreezeError, as on the command line.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pfreeze.config import (
    OVERRIDE_ERRORS,
    RunConfig,
    apply_override,
    load_config,
    override_problem,
    validate,
)
from pfreeze.errors import PfreezeError
from pfreeze.outputs.loggers import read_jsonl

if TYPE_CHECKING:
    import pandas as pd
    from torch import nn

ConfigLike = RunConfig | Mapping[str, Any] | str | Path


@dataclass
class Result:
    """What a run left in its directory, as Python objects.

    summary   summary.json as a dict (figures per arm under "arms")
    metrics   one row per training step and arm: step, arm, loss, lr, step_time_s,
              tokens_per_s, mem_mb, and ‖ΔW‖ per tracked matrix as dw.<name> / dw0.<name>
    evals     one row per evaluation and arm: step, arm, val_loss, train_loss
    samples   one row per generated sample: arm, moment (before/after/best), prompt, seed,
              sample, p, text
    paths     the run's files by name: dir, config, summary, metrics, samples, report_html,
              report_md, the figures (loss.png, ...) and each arm's trained tensors
              (trained:<arm>)
    repeats   a run with `repeats: n`: each repeat's Result; then `summary` is repeats.json
              (the statistics across repeats) and the tables hold every repeat's rows, with
              a `repeat` column
    """

    dir: Path
    summary: dict[str, Any]
    metrics: pd.DataFrame
    evals: pd.DataFrame
    samples: pd.DataFrame
    paths: dict[str, Path] = field(default_factory=dict)
    repeats: list[Result] = field(default_factory=list)

    @property
    def table(self) -> pd.DataFrame:
        """One row per arm: what trained and the headline figures (before → after); with
        repeats, one row per repeat and arm."""
        import pandas as pd

        if self.repeats:
            return pd.concat([r.table.assign(repeat=i) for i, r in enumerate(self.repeats)])
        rows = []
        for name, a in self.summary.get("arms", {}).items():
            rows.append({
                "arm": name, "description": a.get("description"),
                "trainable_params": a.get("trainable_params"),
                "median_step_time_s": a.get("median_step_time_s"),
                "last_loss": a.get("last_loss"),
                "val_loss_before": a.get("val_loss_before"),
                "val_loss_after": a.get("val_loss_after"),
                "p_before": (a.get("p_before") or {}).get("mean"),
                "p_after": (a.get("p_after") or {}).get("mean")})
        return pd.DataFrame(rows).set_index("arm") if rows else pd.DataFrame()

    @property
    def figures(self) -> dict[str, Path]:
        """The report's figures (PNG) by name, those the run has."""
        return {k: p for k, p in self.paths.items() if p.suffix == ".png"}

    def show(self) -> None:
        """Show the figures inline (in a notebook; elsewhere, their paths)."""
        try:
            from IPython.display import Image, display
        except ImportError:
            for name, path in self.figures.items():
                print(f"{name}: {path}")
            return
        for path in self.figures.values():
            display(Image(filename=str(path)))

    def export(self, arm: str, out: str | Path, best: bool = False) -> Path:
        """Write `arm` as a transformers model directory (see pfreeze.export_arm)."""
        from pfreeze.export import export_arm

        return export_arm(self.dir, arm, out, best)


def load_result(run_dir: str | Path) -> Result:
    """The results of the run in `run_dir` (finished or interrupted), read from its files."""
    import pandas as pd

    root = Path(run_dir)
    summary_path = root / "summary.json"
    if not summary_path.is_file() and (root / "repeats.json").is_file():
        return _repeats(root)
    from pfreeze.outputs.files import read_summary

    summary = read_summary(root)
    if summary is None:
        raise PfreezeError(f"{root} holds no run summary (summary.json missing or unreadable)",
                           "pass the output_dir of a run that finished or was interrupted")
    rows = read_jsonl(root / "metrics.jsonl")
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [{k: v for k, v in r.items() if k != "kind"} for r in rows if r.get("kind") == "eval"]
    metrics = pd.json_normalize(train).drop(columns=["kind"], errors="ignore")
    samples = read_jsonl(root / "samples.jsonl")
    paths = {"dir": root, "config": root / "config.yaml", "summary": summary_path,
             "metrics": root / "metrics.jsonl", "samples": root / "samples.jsonl",
             "report_html": root / "report.html", "report_md": root / "report.md"}
    paths |= {p.name: p for p in sorted(root.glob("*.png"))}
    trained = sorted(root.glob("arms/*/trained.safetensors"))
    paths |= {f"trained:{d.parent.name}": d for d in trained}
    return Result(root, summary, metrics, pd.DataFrame(evals),
                  pd.DataFrame([{k: v for k, v in s.items() if k != "ids"} for s in samples]),
                  {k: p for k, p in paths.items() if p.exists()})


def _repeats(root: Path) -> Result:
    """A run of n repeats: repeats.json, and every repeat's rows with its index."""
    import pandas as pd

    from pfreeze.outputs.files import repeat_dirs

    each = [load_result(d) for d in repeat_dirs(root)]

    def joined(name: str) -> pd.DataFrame:
        return pd.concat([getattr(r, name).assign(repeat=i) for i, r in enumerate(each)],
                         ignore_index=True)

    summary = json.loads((root / "repeats.json").read_text(encoding="utf-8"))
    paths = {"dir": root, "config": root / "config.yaml", "repeats": root / "repeats.json",
             "repeats_md": root / "repeats.md"}
    return Result(root, summary, joined("metrics"), joined("evals"), joined("samples"),
                  {k: p for k, p in paths.items() if p.exists()}, each)


def _at(tree: Any, path: list[str]) -> Any:
    """The node at `path` (dict keys and list indices), None where there is none."""
    for part in path:
        if isinstance(tree, list):
            tree = tree[int(part)] if part.isdigit() and int(part) < len(tree) else None
        else:
            tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _merge(tree: dict[str, Any], key: str, value: Any, defaults: dict[str, Any]) -> None:
    """Set one override as `--set` does (config.apply_override): "training.max_steps" or
    training__max_steps, list indices included (arms.1.select); a dict given for a section
    is merged into it."""
    path = key.replace("__", ".").split(".")
    node = _at(tree, path)
    if node is None:  # not set in the source yet: the section as the defaults have it
        node = _at(defaults, path)
    if isinstance(value, Mapping) and isinstance(node, dict):
        for k, v in value.items():
            _merge(tree, f"{'.'.join(path)}.{k}", v, defaults)
        return
    try:
        apply_override(tree, path, copy.deepcopy(value), defaults)
    except OVERRIDE_ERRORS as e:
        raise PfreezeError(f"override '{key}': {override_problem(e)}",
                           "check the key path") from None


def config_of(source: ConfigLike | None = None, /, **overrides: Any) -> RunConfig:
    """A validated RunConfig from a RunConfig, a dict of the YAML's shape, or a YAML path
    (None: the defaults), with `overrides` applied (as `run` takes them)."""
    if isinstance(source, RunConfig):
        tree, where = source.model_dump(mode="json"), "the config"
    elif isinstance(source, Mapping):
        tree, where = copy.deepcopy(dict(source)), "the config dict"
    else:
        tree = load_config(source).model_dump(mode="json") if source is not None else {}
        where = str(source) if source is not None else "the defaults"
    defaults = RunConfig().model_dump(mode="json")
    for key, value in overrides.items():
        _merge(tree, key, value, defaults)
    return validate(tree, where + (" + overrides" if overrides else ""))


def run(source: ConfigLike | None = None, /, *, overwrite: bool = False,
        resume: bool = False, report: bool = True, progress: bool = True,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
        **overrides: Any) -> Result:
    """Run an experiment and return its results.

    `source` is a RunConfig, a dict shaped like the YAML, or the path of a YAML file (None:
    the defaults). `overrides` change settings: a section as a dict
    (`training={"max_steps": 10}`), one setting by its path with `__` for the dots
    (`training__max_steps=10`) or dotted (`**{"training.max_steps": 10}`), or a top-level
    one (`output_dir="runs/x"`). `overwrite` replaces a run in output_dir, `resume`
    continues it from its checkpoint; `report` renders report.html and the figures (a
    repeats run: each repeat's, and evidence.html); `progress` shows a progress bar with the
    latest losses (on stderr); `on_step(step, losses)` is called after every step instead.
    """
    from pfreeze.outputs.evidence import render_any
    from pfreeze.run.session import run as run_experiment

    cfg = config_of(source, **overrides)
    out = Path(cfg.output_dir)
    bar = _bar(cfg.training.max_steps) if progress and on_step is None else None
    try:
        with phases_to(bar.tqdm.set_description) if bar else nullcontext():
            run_experiment(cfg, out, overwrite=overwrite, resume=resume,
                           on_step=on_step or (bar and bar.step))
    finally:
        if bar:
            bar.close()
    if report:  # as the command does: a repeats run gets each repeat's report and the evidence
        render_any(out)
    return load_result(out)


class _Bar:
    """tqdm's plain text bar (it needs no notebook widgets), with the arms' latest losses."""

    def __init__(self, total: int) -> None:
        from tqdm.std import tqdm

        self.tqdm = tqdm(total=total, desc="training", unit="step", leave=True)

    def step(self, step: int, losses: dict[str, float]) -> None:
        if step < self.tqdm.n:  # the next repeat starts from step 1
            self.tqdm.reset()
        self.tqdm.update(step - self.tqdm.n)
        self.tqdm.set_description("training", refresh=False)
        if losses:
            self.tqdm.set_postfix({k: f"{v:.3f}" for k, v in losses.items()}, refresh=False)

    def close(self) -> None:
        self.tqdm.close()


@contextmanager
def phases_to(show: Callable[[str], None]) -> Iterator[None]:
    """Each phase of a run (the `pfreeze.run` log: loading, hashing θ₀, building and compiling
    each arm, measuring, writing) goes to `show` as it begins, while the block lasts: an 8B
    model spends minutes before its first step."""

    class Shown(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                show(record.getMessage())
            except Exception:  # a display that fails must not stop the run
                self.handleError(record)

    log, handler = logging.getLogger("pfreeze.run"), Shown(logging.INFO)
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def _bar(total: int) -> _Bar | None:
    try:
        return _Bar(total)
    except ImportError:  # tqdm comes with transformers; without it, no bar
        return None


def plan(model: str | nn.Module = "random:gpt2", select: str = "layers=50%: roles=q,k,v"
         ) -> pd.DataFrame:
    """What `select` trains in `model` (a name as in model.name, or a loaded transformers
    model): one row per tensor with its shape, layer, role, trainable and total elements and
    how it trains; frozen tensors included (trainable 0). `attrs` holds the totals."""
    import pandas as pd

    from pfreeze.models.load import family_of, meta_of
    from pfreeze.plan.selectors import compile_plan
    from pfreeze.plan.table import plan_rows

    if isinstance(model, str):  # shapes only: no weights load
        module, family = meta_of(model)
    else:
        module, family = model, family_of(model)
    p = compile_plan(module, family, select)
    df = pd.DataFrame(plan_rows(p))
    df.attrs.update({"selector": select, "family": family, "trainable": p.trainable,
                     "total": p.total})
    return df
