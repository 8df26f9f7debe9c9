"""The `pfreeze` command as a user runs it: run, plan, report, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file
from typer.testing import CliRunner

from pfreeze.api import phases_to
from pfreeze.cli import app
from pfreeze.errors import PfreezeError
from pfreeze.outputs.files import RunFiles
from pfreeze.run.loop import Loop
from pfreeze.run.session import run_loop

EXE = Path(sys.executable).with_name("pfreeze")
PFREEZE = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "pfreeze.cli"]


def pfreeze(*args: str | Path, columns: int = 200) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": str(columns), "NO_COLOR": "1"}
    return subprocess.run([*PFREEZE, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def sets(*items: str) -> list[str]:
    return [x for item in items for x in ("--set", item)]


def assert_one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    assert proc.stderr.rstrip().endswith(errors[0]), "the error is the last thing printed"
    assert needle in errors[0], errors[0]
    return errors[0]


# --------------------------------------------------------------------------- run, report

CLI_STEPS = 4  # with eval_steps=2: evaluation at 0, 2 and 4 (the end, not twice)


@pytest.fixture(scope="module")
def cli_run(corpus_file: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[Path, list[str], subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("cli") / "run"
    tiny = [s for s in TINY if not s.startswith("model.name=")]
    args = ["run", "--model", "random:gpt2", "--corpus", str(corpus_file), "-o", str(out),
            *sets(*tiny, f"training.max_steps={CLI_STEPS}", "training.logging_steps=3",
                  "arms=[{kind: full}, {kind: plan, name: qkv-upper-half}]")]
    return out, args, pfreeze(*args, columns=80)  # a plain terminal's width


def test_cli_run_writes_the_run_directory(cli_run) -> None:
    out, _, proc = cli_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "report:" in proc.stderr
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "samples.txt", "report.md",
                 "report.html", "loss.png", "arms/full/trained.safetensors",
                 "arms/qkv-upper-half/trained.safetensors"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert list(summary["arms"]) == ["full", "qkv-upper-half"]
    assert summary["arms"]["qkv-upper-half"]["trainable_params"] == 24_960
    assert summary["config"]["training"]["max_steps"] == CLI_STEPS
    # The auto settings as they resolved on the CPU (a GPU gets graphs, flash, pfreeze).
    assert summary["execution"] == {"compiled": False, "compile_mode": None,
                                    "attention": "model", "decoder": "generate",
                                    "gpu_reserved_peak_mb": None,
                                    "arms_placement": "together",
                                    # every θ₀ tensor but the 24,960 trained elements, fp32,
                                    # once for both arms (the full arm shares none)
                                    "frozen_shared_mib": round(
                                        (summary["model"]["total_params"] - 24_960) * 4
                                        / 2**20, 1),
                                    "decoder_note": "on the CPU generate is kept (this "
                                                    "sampler's gain is its CUDA graph)"}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for arm in summary["arms"]:
        assert [r["step"] for r in rows if r["kind"] == "train" and r["arm"] == arm] == [1, 2, 3, 4]
        assert [r["step"] for r in rows if r["kind"] == "eval" and r["arm"] == arm] == [0, 2, 4]
    # The closing table shows the key numbers whole, even 80 columns wide.
    for a in summary["arms"].values():
        assert f"{a['val_loss_before']:.3f}→{a['val_loss_after']:.3f}" in proc.stderr
        # p in % and the step in ms, as `pfreeze compare` and the evidence report show them
        assert f"{100 * a['p_before']['mean']:.1f}%→{100 * a['p_after']['mean']:.1f}%" \
            in proc.stderr
        assert f"{1e3 * a['median_step_time_s']:,.1f} ms" in proc.stderr
    report = (out / "report.md").read_text()
    assert summary["theta0_hash"] in report
    assert "qkv-upper-half" in report and "full" in report


def test_cli_report_rerenders_an_existing_run(cli_run) -> None:
    out, _, proc = cli_run
    assert proc.returncode == 0
    for name in ("report.md", "report.html", "loss.png"):
        (out / name).unlink()
    again = pfreeze("report", out)
    assert again.returncode == 0, again.stdout + again.stderr
    for name in ("report.md", "report.html", "loss.png"):
        assert (out / name).is_file(), name
    assert "md:" in again.stderr and "html:" in again.stderr


def test_cli_refuses_to_overwrite_an_existing_run(cli_run) -> None:
    out, args, proc = cli_run
    assert proc.returncode == 0
    before = (out / "summary.json").read_bytes()
    assert "--overwrite" in assert_one_line_error(pfreeze(*args), "already holds")
    assert (out / "summary.json").read_bytes() == before, "the old run must be left intact"


def test_cli_report_of_a_folder_without_a_run(tmp_path: Path) -> None:
    assert_one_line_error(pfreeze("report", tmp_path), "no pfreeze run")


# --------------------------------------------------------------------------- plan


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    return result.output


def test_cli_plan_lists_c_attn_of_the_upper_blocks_and_totals() -> None:
    out = invoke("plan", "--model", "random:gpt2")
    for layer in (2, 3):
        for what in ("weight", "bias"):
            assert f"transformer.h.{layer}.attn.c_attn.{what}" in out
    assert "transformer.h.0.attn.c_attn" not in out  # frozen rows are hidden without --all
    m = re.search(r"trainable: ([\d,]+) of ([\d,]+) parameters \(([\d.]+)%\) in (\d+) tensors", out)
    assert m, out
    trainable, total = (int(g.replace(",", "")) for g in m.group(1, 2))
    assert (trainable, total, int(m.group(4))) == (24_960, 249_280, 4)
    assert float(m.group(3)) == pytest.approx(100 * 24_960 / 249_280, abs=0.01)


def test_cli_plan_all_and_partial_heads() -> None:
    out = invoke("plan", "--model", "random:gpt2", "--select", "layers=0 roles=q heads=1", "--all")
    assert "transformer.h.3.mlp.c_fc.weight" in out  # --all lists frozen tensors too
    # One query head of block 0: 16 of the 192 columns of c_attn's weight (64 rows) and bias.
    assert re.search(r"trainable: 1,040 of 249,280 parameters", out), out


# --------------------------------------------------------------------------- errors


@pytest.fixture
def run_args(corpus_file: Path, tmp_path: Path) -> Callable[..., list[str]]:
    def make(*extra: str) -> list[str]:
        tiny = [s for s in TINY if not s.startswith("model.name=")]
        return ["run", "--model", "random:gpt2", "--corpus", str(corpus_file),
                "-o", str(tmp_path / "out"), "--no-report", *sets(*tiny), *extra]

    return make


def test_error_unknown_config_key_suggests_the_right_one(run_args) -> None:
    msg = assert_one_line_error(pfreeze(*run_args("--set", "training.learnig_rate=1e-3")),
                                "unknown config key 'training.learnig_rate'")
    assert "did you mean 'learning_rate'" in msg


def test_error_yaml_syntax(run_args, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  max_steps: [3\n  learning_rate: 1\n")
    assert_one_line_error(pfreeze(*run_args("--config", str(bad))), "YAML syntax error at line")


def test_error_negative_learning_rate(run_args) -> None:
    msg = assert_one_line_error(pfreeze(*run_args("--set", "training.learning_rate=-1")),
                                "'training.learning_rate'")
    assert "greater than 0" in msg


def test_error_set_without_equals(run_args) -> None:
    assert_one_line_error(pfreeze(*run_args("--set", "training.max_steps")), "has no '='")


def test_error_config_path_with_brackets_is_printed_verbatim(run_args, tmp_path: Path) -> None:
    # rich markup would swallow "[bold]" and crash on "[/x]" if the message were not escaped.
    missing = tmp_path / "[bold]a[/x].yaml"
    msg = assert_one_line_error(pfreeze(*run_args("--config", str(missing))), "not found")
    assert str(missing) in msg


def test_error_selector_matching_nothing(run_args) -> None:
    proc = pfreeze(*run_args("--set", "arms=[{kind: full}, {kind: plan, select: 're=nothing.*'}]"))
    assert_one_line_error(proc, "matches no parameter")


def test_error_unknown_random_family(run_args) -> None:
    msg = assert_one_line_error(pfreeze(*run_args("--model", "random:gpt3")),
                                "unknown random model family 'gpt3'")
    assert "random:gpt2" in msg


def test_error_missing_corpus(run_args, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-book.txt"
    assert_one_line_error(pfreeze(*run_args("--corpus", str(missing))), "does not exist")


def test_plan_with_a_bad_selector_raises_a_pfreeze_error() -> None:
    # In-process (main() turns this into the one-line exit-2 error tested above).
    result = CliRunner().invoke(app, ["plan", "--model", "random:gpt2", "--select", "roles=qq"])
    assert isinstance(result.exception, PfreezeError)
    assert "unknown role 'qq'" in str(result.exception)


def test_a_failed_start_does_not_block_the_corrected_retry(run_args, tmp_path: Path) -> None:
    assert pfreeze(*run_args("--model", "random:gpt3")).returncode == 2
    retry = pfreeze(*run_args("--set", "training.max_steps=1"))
    assert retry.returncode == 0, retry.stderr


def test_rank_prints_matrices_and_a_selector_that_compiles() -> None:
    from pfreeze.models.load import load_model
    from pfreeze.plan.selectors import compile_plan

    result = CliRunner().invoke(app, ["rank", "--model", "random:gpt2", "--roles", "q,k,v,o",
                                      "--top", "25"])
    assert result.exit_code == 0, result.output
    assert "random:gpt2" in result.output and "c_attn" in result.output
    selector = result.output.split("selector:")[1].replace("\n", "").strip()
    lm = load_model("random:gpt2")
    plan = compile_plan(lm.model, lm.family, selector)
    # The best 25% of 4 blocks is one matrix per type: a 64x64 q, k and v slice of a c_attn
    # (by role, not the whole fused matrix) and one 64x64 c_proj.
    assert plan.trainable == 4 * 64 * 64


def test_non_utf8_corpus_names_the_encoding_then_encoding_flag_reads_it(
        tmp_path: Path) -> None:
    text = "Queequeg’s harpoon — “a café on the deck”. " * 200
    corpus = tmp_path / "win.txt"
    corpus.write_bytes(text.encode("cp1252"))
    base = ["run", "--model", "random:gpt2", "--corpus", str(corpus), "-o",
            str(tmp_path / "out"), "--no-report",
            *sets(*[s for s in TINY if not s.startswith("model.name=")])]
    assert_one_line_error(pfreeze(*base), "--encoding cp1252")
    ok = pfreeze(*base, "--encoding", "cp1252")
    assert ok.returncode == 0, ok.stderr
    assert "(cp1252)" in (tmp_path / "out" / "summary.json").read_text()


def test_save_pretrained_writes_a_loadable_model(run_args, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    proc = pfreeze(*run_args("--set", "save_pretrained=true", "--set",
                             "arms=[{kind: plan, select: 'layers=3: roles=q'}]"))
    assert proc.returncode == 0, proc.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "arms" / "plan" / "model")
    trained = load_file(str(tmp_path / "out" / "arms" / "plan" / "trained.safetensors"))
    assert set(trained) == {"transformer.h.3.attn.c_attn.weight",
                            "transformer.h.3.attn.c_attn.bias"}
    params = dict(model.named_parameters())
    for name, t in trained.items():
        assert torch.equal(params[name].detach(), t)


def test_plan_with_a_config_shows_every_arm_and_phase(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {name: random:gpt2}\ntraining: {max_steps: 20}\narms:\n"
                   "  - {kind: plan, name: qkv, select: 'layers=50%: roles=q,k,v'}\n"
                   "  - {kind: unfreeze, name: thaw, every: 8}\n")
    result = CliRunner().invoke(app, ["plan", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    totals = re.findall(r"trainable: ([\d,]+) of", result.output)
    # qkv: c_attn weight+bias of blocks 2, 3; thaw: whole top block, then top 2, then top 3.
    block = 64 * 192 + 192 + 64 * 64 + 64 + 2 * (64 + 64) + 64 * 256 + 256 + 256 * 64 + 64
    assert totals == [f"{2 * (64 * 192 + 192):,}", f"{block:,}", f"{2 * block:,}",
                      f"{3 * block:,}"]
    assert "thaw, from step 16" in result.output.replace("\n", " ")
    # The memory plan per arm (pfreeze.plan.memory), in MiB.
    assert "memory plan" in result.output and "arms together:" in result.output
    rows = re.findall(r"│ (qkv|thaw)\s+│ ([\d.]+)", result.output)
    assert [r[0] for r in rows] == ["qkv", "thaw"] and float(rows[0][1]) > 0


def test_plan_says_why_an_arm_has_no_table_before_the_run(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {name: random:llama}\narms: [{kind: snr, name: s}, "
                   "{kind: grad, name: g}, {kind: lora, name: l}]\n")
    result = CliRunner().invoke(app, ["plan", "--config", str(cfg)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    line = {ln.split(":")[0]: ln for ln in result.output.splitlines()}
    assert "chosen from the weights at run time" in line["s"]
    assert "chosen from the training data at run time" in line["g"]
    assert "made at run time" in line["l"]


def test_plan_of_an_8b_config_loads_no_weights_and_says_what_misses(tmp_path: Path) -> None:
    # The plan is made on the meta device: 8B parameters (32 GB in fp32) never load, so this
    # finishes in seconds on a small machine; the full arm cannot fit the host and says so.
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {name: 'random:llama-3.1-8b', dtype: bfloat16}\n"
                   "data: {block_size: 2048}\ntraining: {per_device_train_batch_size: 4}\n"
                   "arms: [{kind: full}, {kind: plan, select: 'layers=50%: roles=q,k,v'}, "
                   "{kind: lora}]\n")
    result = CliRunner().invoke(app, ["plan", "--config", str(cfg)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "trainable: 402,653,184 of 8,030,261,248 parameters" in result.output
    assert re.search(r"arm 'full' needs [\d,]+ MiB: [\d,]+ MiB more than cpu has free",
                     result.output)


def test_families_lists_every_family_and_its_fused_layouts() -> None:
    from typer.testing import CliRunner

    from pfreeze.cli import app

    out = CliRunner().invoke(app, ["families"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    for text in ("phi3", "qkv_concat", "falcon", "qkv_grouped", "mixtral", "router experts",
                 "gemma3_text", "gptj"):
        assert text in out.output, text


# --------------------------------------------------------------------------- phases


def test_a_run_names_each_phase_as_it_begins(make_config, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """Minutes pass before an 8B model's first step (load, hashes, each arm's copy): the run
    names each phase as it begins, for the CLI's progress line."""
    caplog.set_level(logging.INFO, logger="pfreeze.run")
    cfg = make_config("training.max_steps=2", "arms=[{kind: full}, {kind: plan, name: qkv}]")
    run_loop(Loop(cfg, RunFiles(tmp_path / "run")))
    assert [r.getMessage() for r in caplog.records if r.name == "pfreeze.run"] == [
        f"loading {cfg.model.name}", "hashing θ₀", "building arm full", "building arm qkv",
        "measuring before training", "training", "measuring after training", "writing outputs"]


def test_a_sequential_run_names_each_turn_s_phases(make_config, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pfreeze.run")
    cfg = make_config("training.max_steps=2", "arms_placement=sequential",
                      "arms=[{kind: full}, {kind: plan, name: qkv}]")
    run_loop(Loop(cfg, RunFiles(tmp_path / "run")))
    said = [r.getMessage() for r in caplog.records if r.name == "pfreeze.run"]
    turn = ["measuring before training", "training", "measuring after training",
            "writing outputs"]
    assert said == [f"loading {cfg.model.name}", "hashing θ₀", "building arm full", *turn,
                    "building arm qkv", *turn]


def test_the_progress_line_shows_the_phases_of_its_run_only() -> None:
    shown: list[str] = []
    log = logging.getLogger("pfreeze.run")
    with phases_to(shown.append):
        log.info("building arm %s", "qkv")
    log.info("after the run")
    assert shown == ["building arm qkv"]
    assert not log.handlers and log.level == logging.NOTSET
    with phases_to(lambda phase: 1 / 0):  # a display that fails does not stop the run
        log.info("loading %s", "x")
