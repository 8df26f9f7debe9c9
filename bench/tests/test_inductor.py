"""--inductor KEY=VALUE: typed torch._inductor.config settings, patched for the run only."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import driver as bench
from bench.inductor import inductor_settings
from bench.tests.test_bench import _run
from pfreeze import PfreezeError


def test_inductor_settings_apply_for_the_run_and_refuse_typos(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """--inductor KEY=VALUE patches torch._inductor.config while the cases run (and only
    then); a key inductor does not have is refused with the closest names."""
    import torch._inductor.config as inductor

    assert inductor_settings(["combo_kernels=True", "triton.cudagraph_trees=false",
                              "max_autotune_gemm_backends=ATEN", "compile_threads=3"]) == {
        "combo_kernels": True, "triton.cudagraph_trees": False,
        "max_autotune_gemm_backends": "ATEN", "compile_threads": 3}
    with pytest.raises(PfreezeError, match=r"did you mean combo_kernels"):
        inductor_settings(["combo_kernel=True"])
    with pytest.raises(PfreezeError, match=r"not KEY=VALUE"):
        inductor_settings(["combo_kernels"])
    for bad in ("combo_kernels=flase", "combo_kernels=", "compile_threads=two"):
        with pytest.raises(PfreezeError, match=r"not a value for this (bool|int) setting"):
            inductor_settings([bad])

    seen = []
    monkeypatch.setattr(bench.Bench, "run_shape", lambda self, shape: seen.append(
        inductor.combo_kernels))
    before = inductor.combo_kernels
    data = _run(tmp_path, "--methods", "eager", "--inductor", f"combo_kernels={not before}")
    assert seen == [not before] and inductor.combo_kernels == before
    assert data["settings"]["inductor"] == {"combo_kernels": not before}
