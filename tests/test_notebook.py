"""examples/moby_dick.ipynb executes end to end (nbclient, a real kernel) on a tiny random
model: its parameters cell is replaced, every other cell runs as a user would run it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "moby_dick.ipynb"


def test_the_example_notebook_runs_and_shows_its_figures(corpus_file: Path,
                                                          tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    first = nb.cells[0]
    assert "parameters" in first.metadata.get("tags", []), "the first cell holds the parameters"
    names = ("MODEL", "CORPUS", "TRAINING", "OUT", "OVERRIDES")
    assert all(f"\n{n} = " in "\n" + first.source for n in names)
    out = tmp_path / "run"
    overrides = {"data__block_size": 32, "training__per_device_train_batch_size": 2,
                 "training__eval_batches": 1, "training__device": "cpu",
                 "training__bf16": False, "generation__samples_per_prompt": 1,
                 "generation__max_new_tokens": 8, "data__top_k": 20}
    first.source = (f"MODEL = 'random:llama'\nCORPUS = {str(corpus_file)!r}\n"
                    f"TRAINING = {{'max_steps': 4, 'eval_steps': 2, 'logging_steps': 1}}\n"
                    f"OUT = {str(out)!r}\nOVERRIDES = {overrides!r}\n")
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    t0 = time.monotonic()
    client.execute()
    took = time.monotonic() - t0
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) >= 2  # the loss plot and the report's figures, inline
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert set(summary["arms"]) == {"full", "qkv-upper"} and summary["status"] == "finished"
    assert summary["model"]["name"] == "random:llama"
    assert (out / "export-qkv-upper" / "model.safetensors").is_file()
    assert took < 60, f"the notebook took {took:.0f} s on a tiny model"
