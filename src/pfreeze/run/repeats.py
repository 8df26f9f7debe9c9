"""Running the paired experiment over n seeds: repeat r with seed `training.seed + r` (and
`generation.seed + r`) into `output_dir/repeat-<r>/`, then the statistics across repeats
(pfreeze.outputs.repeats)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pfreeze.atomic import write_json, write_text
from pfreeze.outputs import checkpoint
from pfreeze.outputs.files import RunFiles, finished
from pfreeze.outputs.repeats import aggregate, render_markdown
from pfreeze.run.runtime import release
from pfreeze.settings import RunSpec, dump


def run_repeats(cfg: RunSpec, output_dir: Path, run_one: Callable[..., dict[str, Any]],
                **kwargs: Any) -> dict[str, Any]:
    """Run (or, with resume=True, finish) every repeat, then aggregate them."""
    resume = kwargs.pop("resume", False)
    if not resume:
        # The top-level config makes the folder resumable with `pfreeze run --resume DIR`.
        top = RunFiles(output_dir, overwrite=kwargs.get("overwrite", False))
        top.check_target()
        top.check_free(dump(cfg))
    summaries = []
    for r in range(cfg.repeats):
        rcfg = cfg.model_copy(deep=True)
        rcfg.training.seed = cfg.training.seed + r
        rcfg.generation.seed = cfg.generation.seed + r
        rcfg.repeats = 1
        rdir = output_dir / f"repeat-{r}"
        rcfg.output_dir = str(rdir)
        if resume and (done := finished(rdir)) is not None:  # before the interruption
            summaries.append(done)
            continue
        again = resume and checkpoint.exists(rdir)
        opts = {**kwargs, "overwrite": kwargs.get("overwrite", False) or (resume and not again)}
        if r == 0 and not resume:
            # Written once the first repeat has read its corpus and model, so bad input leaves
            # nothing behind; clearing first removes every repeat of an overwritten run.
            opts["before_start"] = lambda: top.start(dump(cfg))
        summaries.append(run_one(rcfg, rdir, resume=again, **opts))
        release()  # each repeat's graphs and reserved-memory peak are its own
    agg = aggregate(summaries)
    write_json(output_dir / "repeats.json", agg)
    write_text(output_dir / "repeats.md", render_markdown(agg))
    return agg

