"""The benchmark on the CPU: every method and arm yields a timed row; the FLOP count is right."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import driver as bench
from bench import results as bench_results
from bench.flops import model_flops, train_flops
from pfreeze import compile_plan, load_model


def test_train_flops_matches_a_hand_count() -> None:
    # L=4 blocks, d=8, T=16, N=32 tokens, 100 matrix elements per block, a 50-element head.
    attn = 2 * 16 * 8 * 32  # causal QK^T + AV of one block: 8192
    fwd = 2 * (4 * 100 + 50) * 32 + 4 * attn  # 28800 + 32768
    assert train_flops(4, 8, 16, 32, 100, 50, None, 0) == fwd == 61568
    assert train_flops(4, 8, 16, 32, 100, 50, 0, 4 * 100 + 50) == 3 * fwd
    # Blocks 2 and 3 pass gradients back, 30 trainable matrix elements get weight gradients.
    frozen = fwd + (2 * (2 * 100 + 50) * 32 + 2 * 2 * attn) + 2 * 30 * 32
    assert train_flops(4, 8, 16, 32, 100, 50, 2, 30) == frozen == 112256
    # With the prefix cache, blocks 0 and 1 run no forward: 2 x (2 * 100 * 32 + attn) fewer.
    assert train_flops(4, 8, 16, 32, 100, 50, 2, 30, cached=True) == 112256 - 29184
    assert train_flops(4, 8, 16, 32, 100, 50, 0, 450, cached=True) == 3 * fwd


def test_model_flops_of_the_tiny_llama() -> None:
    lm = load_model("random:llama")
    every = {n for n, _ in lm.model.named_parameters()}
    full = model_flops(lm.model, lm.family, every, 2, 32)
    # hidden 64, 4 blocks, 4 heads, 2 kv heads (32 wide), MLP 128, vocab 257 tied.
    block = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128
    fwd = 2 * (4 * block + 257 * 64) * 64 + 4 * 2 * 32 * 64 * 64
    assert full == 3 * fwd
    qkv = set(compile_plan(lm.model, lm.family, bench.ARMS["frozen"]).tensors)
    frozen = model_flops(lm.model, lm.family, qkv, 2, 32)
    assert fwd < frozen < full
    # The frozen arm's lowest trainable block is 2 (upper half of 4): blocks 0, 1 are cached.
    cached = model_flops(lm.model, lm.family, qkv, 2, 32, cached=True)
    assert frozen - cached == 2 * (2 * block * 64 + 2 * 32 * 64 * 64)
    # A LoRA arm adapting every block: forward, and activation gradients through all of it.
    bwd = 2 * (4 * block + 257 * 64) * 64 + 2 * 4 * 2 * 32 * 64 * 64
    assert model_flops(lm.model, lm.family, set(), 2, 32, adapters_from=0) == fwd + bwd


def _run(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "bench.json"
    result = bench.main(["--shapes", "tiny", "--batches", "2x32", "--steps", "2", "--warmup",
                         "1", "--no-gen", "--device", "cpu", "--out", str(out), *extra])
    data = json.loads(out.read_text())
    assert len(data["rows"]) == len(result["rows"])
    return data


def test_every_method_and_arm_gets_a_timed_row(tmp_path: Path) -> None:
    methods = ("pfreeze", "eager", "trainer")
    data = _run(tmp_path, "--methods", ",".join(methods))
    rows = {(r["arm"], r["method"]): r for r in data["rows"]}
    assert set(rows) == {(a, m) for a in ("full", "frozen") for m in methods}
    for r in rows.values():
        assert r["status"] == "ok", r.get("error")
        assert r["step_ms"] > 0 and r["tokens_per_s"] > 0 and len(r["step_ms_all"]) == 2
        assert r["warmup_s"] > 0 and r["mfu"] is None  # no peak known for a CPU
    for m in methods:
        full, frozen = rows[("full", m)], rows[("frozen", m)]
        assert frozen["trainable_params"] < full["trainable_params"]
        assert frozen["flops_per_step"] < full["flops_per_step"]
    kinds = {(r["kind"], r["arm"], r["method"]) for r in data["ratios"]}
    assert ("frozen/full", "", "trainer") in kinds and ("pfreeze/peer", "frozen", "eager") in kinds
    assert data["environment"]["command"].startswith("python -m bench --shapes tiny")


def test_a_failing_case_and_the_time_bound_are_recorded(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kw: object) -> None:
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(bench.Bench, "m_plain", boom)
    rows = _run(tmp_path, "--methods", "eager")["rows"]
    assert [r["status"] for r in rows] == ["error", "error"]
    assert "out of memory" in rows[0]["error"]
    rows = _run(tmp_path, "--methods", "eager,compiled", "--max-seconds", "0")["rows"]
    assert [r["status"] for r in rows] == ["skipped"] * 4


def test_the_cached_method_times_the_frozen_arm_from_its_cache(tmp_path: Path) -> None:
    data = _run(tmp_path, "--methods", "pfreeze,pfreeze_cached", "--warmup", "4")
    rows = {(r["arm"], r["method"]): r for r in data["rows"]}
    assert ("full", "pfreeze_cached") not in rows  # the full arm trains block 0
    cached = rows[("frozen", "pfreeze_cached")]
    assert cached["status"] == "ok", cached.get("error")
    # 4 batches of 2 windows are one epoch: the 4 warm-up steps compute, the 2 timed ones hit.
    assert cached["prefix_cache"]["misses"] == 8 and cached["prefix_cache"]["hits"] == 4
    # MFU's numerator is the arm's training; the FLOPs run leave out the cached forward.
    frozen = rows[("frozen", "pfreeze")]
    assert cached["flops_per_step"] == frozen["flops_per_step"]
    assert cached["flops_executed_per_step"] < frozen["flops_executed_per_step"]
    assert frozen["flops_executed_per_step"] == frozen["flops_per_step"]
    kinds = {(r["kind"], r["method"]) for r in data["ratios"]}
    assert ("frozen/full", "pfreeze_cached") in kinds


def test_generation_rows_time_pfreezes_own_sampling(tmp_path: Path) -> None:
    out = tmp_path / "gen.json"
    bench.main(["--methods", "none", "--gen-batch", "8", "--gen-new", "4", "--gen-reps", "1",
                "--gen-warmup", "1", "--device", "cpu", "--out", str(out)])
    rows = {r["variant"]: r for r in json.loads(out.read_text())["generation"]}
    assert set(rows) == {"pfreeze_eager", "pfreeze_static", "pfreeze_graph", "static_bf16"}
    for r in rows.values():
        assert r["status"] == "ok", r.get("error")
        assert r["new_tokens_per_s"] == pytest.approx(8 * 4 / r["seconds"])


def test_sync_sites_count_syncs_not_the_modes_notice() -> None:
    """CUDA's sync debug mode warns once per process that it is a prototype; session 5 counted
    that notice as a host sync in the first row of every bench run. It is dropped; a real sync
    is counted at its frame; other warnings pass on."""
    import warnings

    def warned(*messages: str) -> list[warnings.WarningMessage]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for m in messages:
                warnings.warn(m, UserWarning, stacklevel=1)
        return caught

    notice = ("Synchronization debug mode is a prototype feature and does not yet detect all "
              "synchronizing operations (Triggered internally at "
              "/pytorch/torch/csrc/cuda/Module.cpp:1136.)")  # torch's TORCH_WARN_ONCE text
    with warnings.catch_warnings(record=True) as passed:
        warnings.simplefilter("always")
        assert bench_results.sync_sites(warned(notice)) == []
        sites = bench_results.sync_sites(warned(notice, "called a synchronizing CUDA operation"))
        assert bench_results.sync_sites(warned("something else")) == []
    assert len(sites) == 1 and "tests/test_bench.py:" in sites[0]
    assert [str(w.message) for w in passed] == ["something else"]


def test_resume_keeps_finished_rows_and_measures_only_the_rest(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture
                                                               ) -> None:
    """A time-bounded first part, then --resume with more methods and another sampling
    variant: rows that finished are kept as they were (process 0), a skipped one and the new
    cases are measured (process 1), and ratios across the parts name both processes. A skipped
    row whose case this run does not measure stays, marked skipped."""
    out = tmp_path / "bench.json"
    first = ["--shapes", "tiny", "--batches", "2x32", "--steps", "2", "--warmup", "1",
             "--device", "cpu", "--out", str(out), "--gen-batch", "2", "--gen-new", "4",
             "--gen-reps", "1", "--gen-warmup", "1"]
    bench.main([*first, "--methods", "pfreeze,trainer", "--gen-variants", "pfreeze_eager"])
    data = json.loads(out.read_text())
    by = {(r["arm"], r["method"]): r for r in data["rows"]}
    by[("frozen", "pfreeze")]["status"] = "skipped"  # as if the first part ran out of time
    by[("full", "trainer")]["status"] = "skipped"  # a case the second part does not run
    out.write_text(json.dumps(data))
    kept, gen = by[("full", "pfreeze")], data["generation"][0]
    assert gen["status"] == "ok" and kept["status"] == "ok" and kept["process"] == 0

    capsys.readouterr()
    bench.main([*first, "--methods", "pfreeze,eager", "--resume",
                "--gen-variants", "pfreeze_eager,static_bf16"])
    printed = capsys.readouterr().out
    again = json.loads(out.read_text())
    assert len(again["processes"]) == 2
    gens = {g["variant"]: g for g in again["generation"]}
    assert gens["pfreeze_eager"] == gen and gens["static_bf16"]["process"] == 1
    rows = {(r["arm"], r["method"]): r for r in again["rows"]}
    assert len(again["rows"]) == len(rows) == 6  # the skipped row replaced, not added to
    assert rows[("full", "pfreeze")] == kept and "(kept: process 0)" in printed
    assert rows[("frozen", "pfreeze")]["status"] == "ok"
    assert rows[("frozen", "pfreeze")]["process"] == 1
    assert rows[("full", "trainer")]["status"] == "skipped"  # not measured, not dropped
    assert all(rows[(a, "eager")]["process"] == 1 for a in ("full", "frozen"))
    across = {(r["kind"], r["arm"], r["method"]): r["processes"] for r in again["ratios"]}
    assert across[("pfreeze/peer", "full", "eager")] == [0, 1]  # kept pfreeze vs new eager
    assert across[("pfreeze/peer", "frozen", "eager")] == [1]
    assert across[("frozen/full", "", "pfreeze")] == [0, 1]

    before = out.read_text()  # nothing left: the file stays as it was
    bench.main([*first, "--methods", "pfreeze,eager", "--resume",
                "--gen-variants", "pfreeze_eager,static_bf16"])
    assert out.read_text() == before and "nothing left to measure" in capsys.readouterr().out


def test_resume_continues_a_file_of_an_older_version(tmp_path: Path) -> None:
    """Files written before --resume have no process fields: all their rows are process 0."""
    data = _run(tmp_path, "--methods", "eager")
    out = tmp_path / "bench.json"
    data.pop("processes")
    for r in data["rows"]:
        r.pop("process")
    out.write_text(json.dumps(data))
    again = _run(tmp_path, "--methods", "eager,pfreeze", "--resume")
    assert again["processes"][0] == data["environment"] and len(again["processes"]) == 2
    assert sorted(r["process"] for r in again["rows"]) == [0, 0, 1, 1]


def test_resume_refuses_a_file_measured_otherwise(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    data = _run(tmp_path, "--methods", "eager")
    with pytest.raises(SystemExit, match=r"measured with steps=2, this run has 3; rerun with"):
        bench.main(["--shapes", "tiny", "--batches", "2x32", "--steps", "3", "--warmup", "1",
                    "--no-gen", "--device", "cpu", "--out", str(out), "--resume",
                    "--methods", "eager"])
    data["processes"][-1]["device_name"] = "NVIDIA H200"  # measured on another device
    out.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match=r"measured with device_name 'NVIDIA H200', this "
                                         r"machine has .*pass another --out"):
        _run(tmp_path, "--methods", "eager", "--resume")
    out.write_text("{not json")
    with pytest.raises(SystemExit, match=r"not a pfreeze.bench results file.*another --out"):
        _run(tmp_path, "--methods", "eager", "--resume")
    out.write_text(json.dumps({**data, "rows": [{"arm": "full"}]}))  # a row without its case
    with pytest.raises(SystemExit, match=r"not a pfreeze.bench results file \(KeyError"):
        _run(tmp_path, "--methods", "eager", "--resume")
    data = _run(tmp_path, "--methods", "eager")
    assert data["processes"] == [data["environment"]]  # without --resume: a fresh file


def test_the_sampling_batch_defaults_by_device_and_is_recorded_resolved(tmp_path: Path) -> None:
    """512 on a GPU (the generation target's batch) would take minutes on the CPU: 64 there.
    Only the CPU's default is checked here (no GPU in CI)."""
    argv = ["--methods", "none", "--device", "cpu", "--out", str(tmp_path / "b.json")]
    assert bench.Bench(bench.parse_args(argv), argv).out["settings"]["gen_batch"] == 64
    argv += ["--gen-batch", "8"]
    assert bench.Bench(bench.parse_args(argv), argv).out["settings"]["gen_batch"] == 8


def test_cached_rows_need_a_warm_up_that_fills_the_cache(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "pfreeze_cached", "--warmup", "3"])
    # refused for this reason, not by any argparse error
    assert f"needs --warmup {bench.ROTATED} or more" in capsys.readouterr().err


def test_a_repeated_method_or_shape_is_measured_once() -> None:
    args = bench.parse_args(["--methods", "eager,eager", "--shapes", "tiny,tiny"])
    assert args.methods == ["eager"]
    assert args.shapes == "tiny"


def test_the_benchmark_configs_are_valid() -> None:
    """The configs docs/BENCHMARKS.md names (bench/configs/) load as they are."""
    from pathlib import Path

    from pfreeze import load_config

    found = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert len(found) >= 3
    for path in found:
        load_config(path)
    # two-8b.yaml is the bench case's pair for `pfreeze plan --config`: the same arms.
    from bench.real_sizes import CASES

    two = load_config(Path(__file__).parents[1] / "configs" / "two-8b.yaml")
    case = CASES["8b-two-plans"]
    assert [a.model_dump(include={"kind", "name", "select"}) for a in two.arms] == case["arms"]
    assert (two.model.name, two.data.block_size, two.training.per_device_train_batch_size) \
        == (case["model"], case["seq"], case["batch"])


def test_a_lora_arm_s_flops_start_at_its_lowest_adapted_block() -> None:
    from bench.real_sizes import arm_flops
    from pfreeze import meta_of

    meta, family = meta_of("random:llama")
    arm = {"kind": "lora", "name": "l", "select": "layers=2: roles=q,v"}
    assert arm_flops("random:llama", arm, 2, 32) == model_flops(meta, family, set(), 2, 32,
                                                                 adapters_from=2)
    assert arm_flops("random:llama", arm, 2, 32) < model_flops(meta, family, set(), 2, 32,
                                                               adapters_from=0)


def test_a_raw_file_records_the_command_as_typed() -> None:
    """A script's JSON names its own module (`python -m bench.real_sizes ...`), not the
    driver's: BENCHMARKS.md copies the command from the raw file."""
    import torch

    env = bench_results.run_environment(torch.device("cpu"), ["--case", "8b-two-plans"], None,
                                        "bench.real_sizes")
    assert env["command"] == "python -m bench.real_sizes --case 8b-two-plans"
    assert bench_results.run_environment(torch.device("cpu"), ["--steps", "3"],
                                         None)["command"] == "python -m bench --steps 3"
