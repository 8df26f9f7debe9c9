"""Fault injection: a run killed at 20 seeded points never leaves a directory that lies.

Each trial starts from a directory that holds another finished run (a different learning
rate), starts the new run over it with overwrite, and SIGKILLs the process at one point: a
step before the first checkpoint, the n-th file moved into place (config, samples,
checkpoint state, summary, trained tensors), the n-th tensor file written, or the n-th plot of
the report. Afterwards the directory must either resume to exactly the uninterrupted result,
or be refused with one line; it must never continue, or report, the old run.

The runs are forked from the test process (no interpreter start per run): a tiny model's run
takes about a second.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from pfreeze.config import load_config
from pfreeze.errors import PfreezeError

BASE = ["model.name=random:llama", "data.block_size=32", "training.device=cpu",
        "training.max_steps=8", "training.save_steps=3", "training.logging_steps=2",
        "training.eval_steps=4", "training.weight_decay=0.1", "generation.max_new_tokens=4",
        "generation.samples_per_prompt=1", "generation.prompts=[Call me]",
        "arms=[{kind: full}, {kind: plan, select: 'layers=2: roles=q,k,v'}]"]
TRIALS = 20


def _fork(fn: Callable[[], Any]) -> int:
    """Run `fn` in a forked child: its exit code (2: a PfreezeError), or -signal if killed."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 3
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            fn()
            code = 0
        except PfreezeError:
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


class Killer:
    """Counts calls of the patched functions; SIGKILLs the process at the chosen one."""

    def __init__(self, point: str = "", n: int = 0) -> None:
        self.point, self.n, self.calls = point, n, {"replace": 0, "tensors": 0, "plot": 0}

    def tick(self, kind: str) -> None:
        self.calls[kind] += 1
        if kind == self.point and self.calls[kind] == self.n:
            os.kill(os.getpid(), signal.SIGKILL)

    def install(self, mp: pytest.MonkeyPatch) -> None:
        import pfreeze.atomic
        import pfreeze.outputs.checkpoint
        import pfreeze.outputs.files
        import pfreeze.outputs.plots

        real_replace, real_save = os.replace, pfreeze.outputs.checkpoint.save_file
        real_plot = pfreeze.outputs.plots._save

        def replace(a: Any, b: Any) -> None:
            self.tick("replace")
            real_replace(a, b)

        def save(*args: Any, **kwargs: Any) -> None:
            self.tick("tensors")
            real_save(*args, **kwargs)

        def plot(*args: Any, **kwargs: Any) -> Any:
            self.tick("plot")
            return real_plot(*args, **kwargs)

        mp.setattr(pfreeze.atomic.os, "replace", replace)
        mp.setattr(pfreeze.outputs.checkpoint, "save_file", save)
        mp.setattr(pfreeze.outputs.files, "save_file", save)
        mp.setattr(pfreeze.outputs.plots, "_save", plot)


def _run(cfg: Any, out: Path, killer: Killer, kill_step: int = 0, resume: bool = False,
         report: bool = True) -> None:
    from pfreeze.outputs.report import render_report
    from pfreeze.run.session import run

    def on_step(step: int, losses: dict) -> None:
        if step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)

    with pytest.MonkeyPatch.context() as mp:
        killer.install(mp)
        run(cfg, out, overwrite=not resume, on_step=on_step, resume=resume)
        if report:
            render_report(out)


def _result(out: Path) -> dict[str, Any]:
    """Everything that must equal the uninterrupted run's: tensors, step rows, figures."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    keys = ("last_loss", "mean_loss", "val_loss_best", "val_loss_after", "p_after", "steps")
    return {
        "tensors": {arm: load_file(str(out / "arms" / arm / "trained.safetensors"))
                    for arm in ("full", "plan")},
        "rows": [(r["step"], r["arm"], r.get("loss"), r.get("val_loss"), r.get("dw"),
                  r.get("batch_hash")) for r in rows],
        "figures": {arm: {k: summary["arms"][arm][k] for k in keys} for arm in ("full", "plan")},
        "lr": summary["config"]["training"]["learning_rate"],
    }


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    tensors = all(a["tensors"][arm].keys() == b["tensors"][arm].keys() and all(
        torch.equal(a["tensors"][arm][k], b["tensors"][arm][k]) for k in a["tensors"][arm])
        for arm in ("full", "plan"))
    return tensors and all(a[k] == b[k] for k in ("rows", "figures", "lr"))


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("faults")
    corpus = root / "text.txt"
    corpus.write_text("Whenever it is a damp, drizzly November in my soul, I go to sea. " * 60)
    new = load_config(None, [*BASE, f"data.corpus={corpus}", "training.learning_rate=2e-3"])
    old = load_config(None, [*BASE, f"data.corpus={corpus}", "training.learning_rate=5e-4"])
    counter = Killer()
    assert _fork(lambda: _run(old, root / "old", Killer())) == 0
    assert _fork(lambda: (_run(new, root / "ref", counter),
                          (root / "calls.json").write_text(json.dumps(counter.calls)))) == 0
    return {"root": root, "new": new, "ref": _result(root / "ref"),
            "calls": json.loads((root / "calls.json").read_text())}


def _points(calls: dict[str, int]) -> list[tuple[str, int]]:
    """20 kill points from a fixed seed, every kind of point represented."""
    rng = random.Random(20261207)
    kinds = ["step", "replace", "tensors", "plot"]
    out = []
    for i in range(TRIALS):
        kind = kinds[i % len(kinds)]
        # steps 1-2 come before the first checkpoint (save_steps=3)
        n = rng.randint(1, 2) if kind == "step" else rng.randint(1, calls[kind])
        out.append((kind, n))
    return out


def test_killed_at_any_point_the_directory_resumes_exactly_or_refuses(
        setting: dict[str, Any]) -> None:
    root, new, ref = setting["root"], setting["new"], setting["ref"]
    assert setting["calls"]["replace"] > 10 and setting["calls"]["plot"] >= 5
    outcomes = []
    for i, (kind, n) in enumerate(_points(setting["calls"])):
        out = root / f"trial{i}"
        shutil.copytree(root / "old", out)  # another run already lives here
        killer = Killer("" if kind == "step" else kind, n)
        code = _fork(lambda k=killer, s=(n if kind == "step" else 0), o=out:
                     _run(new, o, k, kill_step=s))
        assert code == -signal.SIGKILL, (kind, n, code)
        summary = out / "summary.json"
        if summary.exists() and json.loads(summary.read_text()).get("status") == "finished":
            outcome = "finished: report again"  # killed while rendering the report
            assert _fork(lambda o=out: _run(new, o, Killer(), resume=True)) == 0
        else:
            code = _fork(lambda o=out: _run(new, o, Killer(), resume=True))
            outcome = {0: "resumed", 2: "refused"}.get(code, f"exit {code}")
        assert outcome != f"exit {code}", (kind, n, outcome)
        if outcome == "refused":
            # one line, and nothing of the old run is taken for this one
            assert not (out / "summary.json").exists() or json.loads(
                (out / "summary.json").read_text())["config"]["training"]["learning_rate"] \
                == new.training.learning_rate
            with pytest.raises(PfreezeError, match="has no checkpoint yet") as e:
                from pfreeze.run.session import run

                run(new, out, resume=True)
            assert "\n" not in str(e.value)
        else:
            assert _same(_result(out), ref), (kind, n, outcome)
            assert (out / "report.html").exists()
        outcomes.append(outcome)
    # the seeds reach every kind of outcome: the test would notice if one stopped happening
    assert {"resumed", "refused", "finished: report again"} <= set(outcomes), outcomes
