"""The Python API: pfreeze.run returns the run's results as tables, pfreeze.plan the plan table;
every public name is documented and `pfreeze.run` / `pfreeze.plan` stay callable whatever was
imported before."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import yaml

import pfreeze
from pfreeze.api import config_of
from pfreeze.config import RunConfig, dump_config, load_config
from pfreeze.errors import PfreezeError


@pytest.fixture(scope="module")
def result(make_config: Callable[..., RunConfig], tmp_path_factory: pytest.TempPathFactory
           ) -> pfreeze.Result:
    base = make_config("model.name=random:llama", "generation.samples_per_prompt=1")
    out = tmp_path_factory.mktemp("api") / "run"
    # A section as a dict, a setting by its __ path, a top-level one.
    return pfreeze.run(base, training={"max_steps": 4}, training__logging_steps=1,
                       output_dir=str(out))


def test_run_returns_the_runs_files_as_tables(result: pfreeze.Result) -> None:
    root = result.dir
    assert result.summary == json.loads((root / "summary.json").read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 4 * 2  # 4 steps, arms full and plan
    assert list(result.metrics["step"]) == [r["step"] for r in train]
    assert list(result.metrics["loss"]) == [r["loss"] for r in train]
    key = next(iter(train[0]["dw"]))
    assert list(result.metrics[f"dw.{key}"]) == [r["dw"][key] for r in train]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert list(result.evals["val_loss"]) == [r["val_loss"] for r in evals]
    samples = [json.loads(line) for line in (root / "samples.jsonl").read_text().splitlines()]
    assert list(result.samples["text"]) == [s["text"] for s in samples]
    assert set(result.samples["moment"]) == {"before", "after"}
    t = result.table
    assert list(t.index) == ["full", "plan"]
    assert t.loc["plan", "val_loss_after"] == result.summary["arms"]["plan"]["val_loss_after"]


def test_the_result_names_its_files_and_figures(result: pfreeze.Result) -> None:
    p = result.paths
    assert p["report_html"].is_file() and p["trained:plan"].is_file()
    assert "loss.png" in result.figures and all(f.is_file() for f in result.figures.values())
    # The same result read back from the directory.
    again = pfreeze.load_result(result.dir)
    assert again.summary == result.summary and again.metrics.equals(result.metrics)


def test_overrides_take_every_spelling(make_config: Callable[..., RunConfig],
                                       tmp_path: Path) -> None:
    cfg = make_config()
    want = config_of(cfg, **{"training.max_steps": 7})
    assert config_of(cfg, training__max_steps=7) == want
    assert config_of(cfg, training={"max_steps": 7}) == want
    assert config_of(cfg.model_dump(mode="json"), training__max_steps=7) == want
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg), encoding="utf-8")
    assert config_of(path, training__max_steps=7) == want
    assert want.training.max_steps == 7 and want.training.seed == cfg.training.seed
    assert config_of(None).model_dump() == RunConfig().model_dump()  # the defaults
    assert yaml.safe_load(dump_config(want))["training"]["max_steps"] == 7


def test_overrides_reach_list_items_as_set_does() -> None:
    """`arms.1.select` edits the second arm, as `--set arms.1.select=...` does."""
    cfg = config_of(None, **{"arms.1.select": "roles=q"})
    want = load_config(None, ["arms.1.select=roles=q"])
    assert cfg == want and cfg.arms[1].select == "roles=q" and cfg.arms[0].kind == "full"
    # A dict for one arm edits it, as for a section: its kind and name stay.
    assert config_of(None, arms__1={"select": "roles=q"}) == want


def test_a_bad_setting_is_one_line(make_config: Callable[..., RunConfig]) -> None:
    with pytest.raises(PfreezeError, match="unknown config key 'training.max_stepz'"):
        config_of(make_config(), training__max_stepz=3)
    with pytest.raises(PfreezeError, match="invalid value for 'training.max_steps'"):
        config_of(make_config(), training={"max_steps": "many"})
    with pytest.raises(PfreezeError, match="seed is not a section"):
        config_of(make_config(), training__seed__x=1)
    with pytest.raises(PfreezeError, match="holds no run summary"):
        pfreeze.load_result("/nonexistent")


def test_plan_is_the_plan_table(lively: Callable) -> None:
    from pfreeze.plan.selectors import compile_plan

    df = pfreeze.plan("random:llama", "layers=2,3 roles=q,k")
    assert isinstance(df, pd.DataFrame)
    assert set(df.columns) >= {"name", "shape", "layer", "role", "trainable", "total", "how"}
    trains = df[df.trainable > 0]
    assert list(trains.role) == ["q", "k", "q", "k"] and set(trains.layer) == {2, 3}
    lm = lively("random:llama")
    p = compile_plan(lm.model, lm.family, "layers=2,3 roles=q,k")
    assert df.attrs["trainable"] == p.trainable == trains.trainable.sum()
    assert df.attrs["total"] == p.total == df.total.sum()  # a tied weight is listed once
    assert df.name[0] == "model.embed_tokens.weight (tied: lm_head)"
    # A loaded model works as well as a name.
    assert pfreeze.plan(lm.model, "layers=2,3 roles=q,k").equals(df)


def test_every_public_name_resolves_and_is_documented() -> None:
    for name in pfreeze.__all__:
        if name == "__version__":
            continue
        obj = getattr(pfreeze, name)
        assert obj is not None and (obj.__doc__ or "").strip(), name
    assert "run" in pfreeze.__all__ and "plan" in pfreeze.__all__


def test_run_and_plan_stay_callable_whatever_was_imported_first() -> None:
    """Importing the subpackage pfreeze.run (or .plan) sets it as pfreeze's attribute; the
    call and the submodules must both still work, and module paths still resolve."""
    code = ("import pfreeze.run.session, pfreeze.plan.selectors, pfreeze\n"
            "import pytest\n"
            "assert callable(pfreeze.run) and callable(pfreeze.plan)\n"
            "assert pfreeze.run.session.Session and pfreeze.plan.selectors.compile_plan\n"
            "mp = pytest.MonkeyPatch(); mp.setattr('pfreeze.run.loop.load_model', None)\n"
            "df = pfreeze.plan('random:gpt2', 'roles=q')\n"
            "print(int(df.trainable.sum()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 0


def test_a_run_of_repeats_gives_every_repeats_rows(make_config: Callable[..., RunConfig],
                                                   tmp_path: Path) -> None:
    cfg = make_config("training.max_steps=2", "generation.samples_per_prompt=1",
                      "generation.max_new_tokens=2", "arms=[{kind: full}]")
    result = pfreeze.run(cfg, repeats=2, output_dir=str(tmp_path / "rep"))
    assert len(result.repeats) == 2
    assert result.summary == json.loads((tmp_path / "rep" / "repeats.json").read_text())
    assert list(result.metrics.repeat) == [0, 0, 1, 1]
    for i, r in enumerate(result.repeats):
        assert r.summary["config"]["training"]["seed"] == cfg.training.seed + i
        assert list(result.metrics[result.metrics.repeat == i].loss) == list(r.metrics.loss)
    assert list(result.table.repeat) == [0, 1]
    # The reports the command writes: each repeat's, and the evidence over them.
    for name in ("repeat-0/report.html", "repeat-1/report.html", "evidence.html"):
        assert (tmp_path / "rep" / name).is_file(), name
    with pytest.raises(PfreezeError, match="several repeats.*repeat-0"):
        result.export("full", tmp_path / "x")


def test_run_shows_progress_with_the_latest_losses(make_config: Callable[..., RunConfig],
                                                   tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    cfg = make_config("training.max_steps=2", "generation.samples_per_prompt=1",
                      "generation.max_new_tokens=2", "arms=[{kind: full}]")
    result = pfreeze.run(cfg, output_dir=str(tmp_path / "r"), report=False)
    err = capsys.readouterr().err
    assert "2/2" in err and f"full={result.metrics.loss.iloc[-1]:.3f}" in err
    seen: list[int] = []
    pfreeze.run(cfg, output_dir=str(tmp_path / "r"), overwrite=True, report=False,
                on_step=lambda step, losses: seen.append(step))
    assert seen == [1, 2] and "2/2" not in capsys.readouterr().err  # a callback instead
