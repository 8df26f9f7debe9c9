"""A run directory holds one run, whole, or says clearly what it lacks.

Overwrite, interrupts, a full disk, failures after training and bad input: each case checks
what the directory holds afterwards, not only what was printed.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pfreeze.config import load_config
from pfreeze.errors import PfreezeError
from pfreeze.run.interrupts import Interrupted
from pfreeze.run.session import run


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    p = tmp_path / "text.txt"
    p.write_text("It is not down in any map; true places never are. " * 60)
    return p


def _cfg(corpus: Path, *extra: str):
    return load_config(None, [
        f"data.corpus={corpus}", "model.name=random:llama", "data.block_size=32",
        "training.device=cpu", "training.max_steps=6", "training.logging_steps=2",
        "training.eval_steps=3", "generation.max_new_tokens=4",
        "generation.samples_per_prompt=1", "generation.prompts=[Call me]",
        "arms=[{kind: full}, {kind: plan, select: 'layers=3: roles=q'}]", *extra,
    ])


class Stop(Exception):
    """Raised from on_step: a run that dies mid-way without a signal."""


def _die_at(k: int):
    def on_step(step: int, losses: dict) -> None:
        if step == k:
            raise Stop

    return on_step


def test_overwrite_removes_the_old_run_so_it_cannot_be_resumed(corpus: Path,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "run"
    old = _cfg(corpus, "training.save_steps=2")
    run(old, out)
    (out / "notes.txt").write_text("mine")  # not pfreeze's: stays
    new = _cfg(corpus, "training.save_steps=4", "training.learning_rate=3e-4")
    with pytest.raises(Stop):  # dies before its first checkpoint
        run(new, out, overwrite=True, on_step=_die_at(1))
    assert not (out / "checkpoint").exists() and not (out / "summary.json").exists()
    assert not (out / "arms").exists()  # the old run's trained tensors are gone too
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(PfreezeError, match="has no checkpoint yet"):
        run(new, out, resume=True)  # not the old run's checkpoint, continued as this one


def test_a_checkpoint_of_another_config_is_refused(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(Stop):
        run(_cfg(corpus, "training.save_steps=2"), out, on_step=_die_at(3))
    other = _cfg(corpus, "training.save_steps=2", "training.learning_rate=5e-4")
    with pytest.raises(PfreezeError, match="belongs to another config") as e:
        run(other, out, resume=True)
    assert "--overwrite" in e.value.fix


def _sigterm_at(k: int):
    def on_step(step: int, losses: dict) -> None:
        if step == k:
            os.kill(os.getpid(), signal.SIGTERM)

    return on_step


def test_sigterm_stops_at_the_step_with_a_checkpoint_and_an_interrupted_summary(
        corpus: Path, tmp_path: Path) -> None:
    straight, out = tmp_path / "straight", tmp_path / "run"
    cfg = _cfg(corpus, "training.save_steps=4")
    expected = run(cfg, straight)
    with pytest.raises(Interrupted) as e:
        run(cfg, out, on_step=_sigterm_at(3))
    assert (e.value.step, e.value.exit_code) == (3, 143)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["interrupted_at_step"] == 3
    assert summary["arms"]["full"]["steps"] == 3 and summary["arms"]["full"]["p_after"] is None
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3  # saved at the interruption, not only every save_steps
    from pfreeze.outputs.report import render_report

    render_report(out)
    assert "Partial: interrupted at step 3 of 6" in (out / "report.md").read_text()
    resumed = run(cfg, out, resume=True)
    for arm in ("full", "plan"):
        for key in ("last_loss", "mean_loss", "val_loss_after", "p_after"):
            assert resumed["arms"][arm][key] == expected["arms"][arm][key], (arm, key)


def test_ctrl_c_exits_130_with_one_line(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pfreeze.cli", "run", "-o", str(out), "--set",
           f"data.corpus={corpus}", "--set", "model.name=random:llama", "--set",
           "data.block_size=32", "--set", "training.device=cpu", "--set",
           "training.max_steps=100000", "--set", "training.save_steps=50"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    for _ in range(600):  # until training has started
        if metrics.exists() and '"train"' in metrics.read_text():
            break
        proc.poll()
        assert proc.returncode is None, proc.stderr.read() if proc.stderr else ""
        import time

        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [x for x in err.splitlines() if x.startswith("interrupted")]
    assert len(lines) == 1 and "Traceback" not in err
    step = json.loads((out / "summary.json").read_text())["interrupted_at_step"]
    assert f"at step {step}; checkpoint at step {step} kept" in lines[0]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == step


def test_resume_of_a_finished_run_redoes_nothing(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = _cfg(corpus, "training.save_steps=4")
    first = run(cfg, out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    assert run(cfg, out, resume=True) == first
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == stamps
    res = subprocess.run([sys.executable, "-m", "pfreeze.cli", "run", "--resume", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "the run is finished (6 steps); nothing to resume" in res.stderr


def _enospc(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_at_the_end_keeps_summary_and_metrics(corpus: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import pfreeze.outputs.files

    out = tmp_path / "run"
    monkeypatch.setattr(pfreeze.outputs.files, "save_file", _enospc)  # the tensors' files
    with pytest.raises(PfreezeError) as e:
        run(_cfg(corpus), out)
    assert "training finished, but arms/full/trained.safetensors could not be written " \
           "(No space left on device) and 1 more" in str(e.value)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert [m["file"] for m in summary["missing_outputs"]] == [
        "arms/full/trained.safetensors", "arms/plan/trained.safetensors"]
    assert summary["arms"]["plan"]["p_after"]["n"] == 1  # the measurements are all there
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows if r["kind"] == "train") == 6


def test_free_space_is_checked_before_large_writes(corpus: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import pfreeze.outputs.files

    real = shutil.disk_usage
    # 1.5 MiB free: a 1 MiB margin plus the plan arm's 16 KiB fit; the full arm's 0.6 MiB of
    # tensors, its saved model and a checkpoint (2 MiB with AdamW's moments) do not.
    monkeypatch.setattr(pfreeze.outputs.files.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=3 * 2**19))
    out = tmp_path / "run"
    with pytest.raises(PfreezeError, match="not enough disk space for the|could not be written"):
        run(_cfg(corpus, "training.save_steps=2", "save_pretrained=true"), out)
    assert not (out / "checkpoint").exists()  # refused before writing, not half-written
    summary = json.loads((out / "summary.json").read_text())
    missing = {m["file"]: m["why"] for m in summary["missing_outputs"]}
    assert set(missing) == {"arms/full/trained.safetensors", "arms/full/model", "arms/plan/model"}
    assert "not enough disk space" in missing["arms/full/model"]
    assert "arms/plan/trained.safetensors" not in missing  # small enough: written
    assert (out / "arms" / "plan" / "trained.safetensors").exists()


def test_samples_jsonl_recomputes_p_exactly(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = run(_cfg(corpus, "generation.samples_per_prompt=3"), out)
    # The README's five lines:
    top = {t["id"] for t in json.load(open(out / "summary.json"))["corpus"]["top"]}  # noqa: SIM115
    rows = [json.loads(line) for line in open(out / "samples.jsonl")]  # noqa: SIM115
    after = [r for r in rows if r["arm"] == "plan" and r["moment"] == "after"]
    p = sum(sum(i in top for i in r["ids"]) / len(r["ids"]) for r in after) / len(after)
    assert len(after) == 3 and p == pytest.approx(summary["arms"]["plan"]["p_after"]["mean"],
                                                  abs=0, rel=1e-15)


@pytest.mark.parametrize(("setting", "message"), [
    ("model.name=random:gpt2", None),  # control: the same run with a fitting window starts
    ("data.block_size=1024", "data.block_size=1024 is longer than the model's 512 positions"),
    ("generation.max_new_tokens=600", "plus max_new_tokens=600 is longer than the model's 512"),
    ("generation.prompts=[]", "generation.prompts"),
    ("training.lr_scheduler_type=bogus", "unknown lr_scheduler_type 'bogus'"),
    ("training.device=gpu0", "'gpu0' is not a device"),
    ("arms=[{kind: plan, select: '*.c_attn.weight[:, 0:99999]'}]",
     "does not fit transformer.h.0.attn.c_attn.weight of shape [64, 192]"),
])
def test_bad_input_is_refused_before_anything_is_written(corpus: Path, tmp_path: Path,
                                                         setting: str, message: str) -> None:
    out = tmp_path / "run"
    try:
        cfg = _cfg(corpus, "model.name=random:gpt2", setting)
        if message is None:
            run(cfg.model_copy(update={"training": cfg.training.model_copy(
                update={"max_steps": 1})}), out)
            assert (out / "summary.json").exists()
            return
        run(cfg, out)
    except PfreezeError as e:
        assert message is not None and message in str(e), str(e)
        assert "\n" not in str(e)
        assert not out.exists() or not any(out.iterdir())  # nothing blocks the retry
        return
    pytest.fail("no error")


@pytest.mark.parametrize("where", ["file", "under_a_file", "virtual"])
def test_an_output_path_that_cannot_hold_a_run(corpus: Path, tmp_path: Path,
                                               where: str) -> None:
    f = tmp_path / "afile"
    f.write_text("x")
    out = {"file": f, "under_a_file": f / "run", "virtual": Path("/proc/pfreeze-run")}[where]
    with pytest.raises(PfreezeError, match="is a file, not a directory|cannot write into"):
        run(_cfg(corpus), out)
    assert f.read_text() == "x"


def test_the_embedded_gguf_model_saves_as_a_plain_model(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from pfreeze.models.load import load_model

    lm = load_model("smollm2-135m")
    lm.model.save_pretrained(str(tmp_path / "m"))  # refused as "quantized with gguf" before
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(lm.model(x).logits, again(x).logits)


def test_a_checkpoint_of_another_format_is_refused(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = _cfg(corpus, "training.save_steps=2")
    with pytest.raises(Stop):
        run(cfg, out, on_step=_die_at(3))
    path = out / "checkpoint" / "state.json"
    state = json.loads(path.read_text())
    del state["format"], state["pfreeze_version"]  # as the checkpoints of earlier commits
    path.write_text(json.dumps(state))
    with pytest.raises(PfreezeError, match=r"written by pfreeze before 0.1.0 in another format "
                                           r"\(1; this version reads 2\)") as e:
        run(cfg, out, resume=True)
    assert "--overwrite" in e.value.fix


def test_every_metric_sink_gets_the_rows_metrics_jsonl_gets(corpus: Path, tmp_path: Path) -> None:
    from pfreeze.outputs.files import RunFiles
    from pfreeze.run.loop import Loop
    from pfreeze.run.session import run_loop

    class Collect:  # a tracker, as far as the loop can tell
        def __init__(self) -> None:
            self.rows: list[dict] = []
            self.closed = False

        def log(self, rows: list[dict]) -> None:
            self.rows += rows

        def close(self) -> None:
            self.closed = True

    files = RunFiles(tmp_path / "run")
    sink = Collect()
    files.loggers.append(sink)
    run_loop(Loop(_cfg(corpus), files))
    written = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sink.rows == written and sink.closed
    assert {r["kind"] for r in written} == {"train", "eval"}


def test_metrics_rows_a_full_disk_refused_are_kept_and_reported(
        corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_open = builtins.open
    full = {"on": True}

    def open_(file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN202
        if str(file).endswith("metrics.jsonl") and "a" in mode and full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    with pytest.raises(PfreezeError, match="metrics.jsonl could not be written"):
        run(_cfg(corpus), tmp_path / "run")  # training itself went on to the end
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["arms"]["full"]["steps"] == 6
    assert summary["missing_outputs"][0]["why"].endswith("rows could not be appended (the "
                                                         "disk is full)")


def test_a_directory_without_a_run_keeps_every_file(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    mine = {"holiday.png": "a", "loss.png": "b", "arms/mine.txt": "c", "repeat-notes/a.txt": "d",
            ".secret.tmp": "e"}
    for name, text in mine.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    run(_cfg(corpus), out)  # no run lived here: nothing of the user's goes, not even loss.png
    assert (out / "summary.json").exists()
    for name, text in mine.items():
        if name != "loss.png":  # the run writes its own loss.png only when a report is drawn
            assert (out / name).read_text() == text, name
    run(_cfg(corpus), out, overwrite=True)  # a run lives here now: its files go, not the user's
    for name in ("holiday.png", "repeat-notes/a.txt", ".secret.tmp"):
        assert (out / name).exists(), name
    assert not (out / "arms" / "mine.txt").exists()  # arms/ of a run directory is pfreeze's


def test_a_signal_inside_a_step_waits_for_its_end(corpus: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from pfreeze.run.loop import Loop

    flush = Loop.flush

    def flush_then_signal(self: Loop) -> dict:
        rows = flush(self)
        if self.arms[0].losses and len(self.arms[0].losses) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # mid-step: inside the deferred block
        return rows

    monkeypatch.setattr(Loop, "flush", flush_then_signal)
    out = tmp_path / "run"
    with pytest.raises(Interrupted) as e:
        run(_cfg(corpus, "training.save_steps=5", "training.logging_steps=1"), out)
    assert e.value.step == 2 and not e.value.forced  # the step finished, then it stopped
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert [summary["arms"][a]["steps"] for a in ("full", "plan")] == [2, 2]


def test_a_second_signal_does_not_cost_the_summary(corpus: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from pfreeze.outputs.files import RunFiles

    write = RunFiles.write_summary

    def signal_then_write(self: RunFiles, summary: dict) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C again while the first one is handled
        write(self, summary)

    monkeypatch.setattr(RunFiles, "write_summary", signal_then_write)
    out = tmp_path / "run"
    with pytest.raises(Interrupted) as e:
        run(_cfg(corpus, "training.save_steps=2"), out, on_step=_sigterm_at(3))
    assert e.value.signum == signal.SIGTERM and e.value.step == 3
    assert "checkpoint at step 3 kept" in e.value.note
    assert json.loads((out / "summary.json").read_text())["interrupted_at_step"] == 3


def test_a_resume_refuses_metrics_shorter_than_its_checkpoint(corpus: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = _cfg(corpus, "training.save_steps=2")
    with pytest.raises(Stop):
        run(cfg, out, on_step=_die_at(3))
    metrics = out / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:100])  # rows lost after the checkpoint was made
    with pytest.raises(PfreezeError, match=r"shorter than at its checkpoint \(100 of \d+ bytes\)"):
        run(cfg, out, resume=True)


def test_a_torn_metrics_append_is_cut_back_and_written_once(tmp_path: Path) -> None:
    from pfreeze.outputs.loggers import JsonlLogger

    log = JsonlLogger(tmp_path / "metrics.jsonl")
    log.log([{"step": 1}])
    real_open = open

    class Torn:  # writes half of what it is given, then the disk is full
        def __init__(self, f) -> None:  # noqa: ANN001
            self.f = f

        def __enter__(self):  # noqa: ANN204
            return self

        def __exit__(self, *a: object) -> None:
            self.f.close()

        def write(self, text: str) -> None:
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    import builtins

    builtins.open = lambda p, m="r", *a, **k: (Torn(real_open(p, m, *a, **k)) if "a" in m  # type: ignore[assignment]
                                               else real_open(p, m, *a, **k))
    try:
        log.log([{"step": 2}, {"step": 3}])
    finally:
        builtins.open = real_open
    assert log.unwritten == [{"step": 2}, {"step": 3}]
    log.close()  # space again
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1}, {"step": 2}, {"step": 3}]
