"""An arm's training as a standard transformers model directory: `pfreeze export` and
`pfreeze apply`.

    export   RUN_DIR/arms/NAME/trained.safetensors (best.safetensors with --best) applied onto
             θ₀, reloaded from the run's config (model.name, revision, dtype, seed) and checked
             against the θ₀ hash the run recorded in summary.json
    apply    the same from a delta file alone: its metadata holds the run's config and θ₀
             hash (pfreeze.outputs.files.RunFiles.save_arm); the base is the model the user
             names, refused when its hash differs

The directory holds config.json, generation_config.json, model.safetensors in the model's
storage dtype (model.dtype; float32 for random:<family> and for the embedded GGUF, which
exports dequantised), the tokenizer, a model card (README.md) and the run's config
(pfreeze_config.yaml). A LoRA arm is merged into the weights by peft.

A random:<family> model has no tokenizer files: it reads bytes (ids 0-255, EOS 256). Its
export gets a byte-level `tokenizers` tokenizer that gives exactly those ids, so that
AutoTokenizer loads it like any other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError
from torch import nn

from pfreeze.atomic import atomic_dir
from pfreeze.config import RunConfig
from pfreeze.errors import PfreezeError
from pfreeze.models.load import SMOLLM2, ByteTokenizer, LoadedModel, load_model, state_hash
from pfreeze.outputs.card import CardFacts, model_card
from pfreeze.outputs.files import ensure_space, is_repeats_dir, read_summary, tensors_bytes
from pfreeze.run.arms import make_arm
from pfreeze.settings import RunSpec

# What marks a folder as an export (so that writing one again may replace it).
CARD_CONFIG = "pfreeze_config.yaml"


@dataclass
class Delta:
    """A trained.safetensors (or best.safetensors) and what it says of its run."""

    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]


def read_delta(path: Path) -> Delta:
    """The tensors and metadata of a delta file; anything else is refused in one line."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise PfreezeError(f"{path}: no such file",
                           "pass an arm's trained.safetensors (RUN_DIR/arms/NAME/)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise PfreezeError(f"{path} is not a safetensors file ({e})",
                           "pass an arm's trained.safetensors (RUN_DIR/arms/NAME/)") from None
    return Delta(path, tensors, meta)


def _run_config(text: str, where: str) -> RunSpec:
    try:
        return RunConfig.model_validate(yaml.safe_load(text) or {})
    except (ValidationError, yaml.YAMLError):
        raise PfreezeError(f"{where}: the run's config does not validate with this pfreeze",
                           "export with the pfreeze version that ran it") from None


def _arm_config(cfg: RunSpec, name: str, where: str) -> Any:
    for a in cfg.arms:
        if a.name == name:
            return a
    names = ", ".join(str(a.name) for a in cfg.arms)
    raise PfreezeError(f"{where} has no arm '{name}' (its arms: {names})",
                       "pass --arm with one of those names")


def _base(cfg: RunSpec, name: str, want: str | None) -> LoadedModel:
    """θ₀: `name` loaded the way the run loaded its model, checked against the run's hash."""
    revision = cfg.model.revision if name == cfg.model.name else None
    lm = load_model(name, revision, seed=cfg.training.seed, dtype=cfg.model.dtype)
    if want is not None and (have := state_hash(lm.model)) != want:
        raise PfreezeError(
            f"the base model '{name}' is not the θ₀ the delta was trained from (its θ₀ hash "
            f"{have[:12]}…, the run's {want[:12]}…)",
            f"pass the run's model ('{cfg.model.name}', model.dtype={cfg.model.dtype}) with "
            "the same weights as when it ran")
    return lm


def _writable(out: Path) -> None:
    """An export goes into a new or empty folder, or replaces an earlier export: never a
    folder of other files."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                               and not (out / CARD_CONFIG).exists())):
        raise PfreezeError(f"{out} exists and is not an earlier pfreeze export",
                           "pass a new or empty --out directory")


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """The tokenizer files: a transformers tokenizer's own, or for the byte tokenizer of
    random models an equivalent byte-level one (ids = bytes, EOS at the model's id)."""
    if hasattr(tokenizer, "tok"):
        tokenizer.tok.save_pretrained(str(folder))
        return
    assert isinstance(tokenizer, ByteTokenizer)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = bytes_to_unicode()  # byte -> the printable character byte-level BPE uses
    vocab = {chars[b]: b for b in range(256)} | {"<|endoftext|>": tokenizer.eos_token_id}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(
        str(folder))


def _notes(cfg: RunSpec, lm: LoadedModel, kind: str) -> list[str]:
    notes = []
    if kind == "lora":
        notes.append("The LoRA adapters are merged into the weights (peft's merge_and_unload): "
                     "a plain model, no adapter files.")
    if cfg.model.name == SMOLLM2:
        notes.append("The base is pfreeze's embedded SmolLM2-135M-Instruct GGUF (Q4_1): its "
                     "weights were dequantised on loading, so this folder holds them as "
                     "plain float safetensors (larger than the GGUF, same values).")
    if not hasattr(lm.tokenizer, "tok"):
        notes.append("A random-init model reads bytes: the tokenizer here maps each UTF-8 "
                     "byte to its own id (0-255), EOS to "
                     f"{lm.tokenizer.eos_token_id}.")
    return notes


def _plain_modes(folder: Path) -> None:
    """The modes a plain mkdir and open() would give (the temporary folder is 0700, and some
    writers make 0600 files): an export is for others to read."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod((0o777 if f.is_dir() else 0o666) & ~umask)


def _write(out: Path, model: nn.Module, lm: LoadedModel, card: str, config_yaml: str) -> Path:
    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        save_tokenizer(lm.tokenizer, tmp)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        (tmp / CARD_CONFIG).write_text(config_yaml, encoding="utf-8")
        _plain_modes(tmp)

    out.parent.mkdir(parents=True, exist_ok=True)
    ensure_space(out.parent, tensors_bytes(dict(model.state_dict())), f"the export {out}")
    return atomic_dir(out, write)


def _apply(cfg: RunSpec, delta: Delta, acfg: Any, base: str, want: str | None
           ) -> tuple[LoadedModel, nn.Module]:
    lm = _base(cfg, base, want)
    strategy = make_arm(acfg, lm.family, cfg.training.max_steps)
    model = strategy.with_trained(lm.model, delta.tensors)
    return lm, model.eval()


def export_arm(run_dir: str | Path, arm: str, out: str | Path, best: bool = False) -> Path:
    """Write arm `arm` of the run in `run_dir` as a transformers model directory `out`: its
    trained tensors (at the best evaluation with `best`) on θ₀, a LoRA arm merged."""
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "config.yaml").is_file():
        raise PfreezeError(f"{run_dir} holds no pfreeze run (config.yaml missing)",
                           "pass the output_dir of a run")
    if is_repeats_dir(run_dir):
        raise PfreezeError(f"{run_dir} holds a run of several repeats, each with its arms",
                           f"export one repeat: pass {run_dir / 'repeat-0'} (or another)")
    config_yaml = (run_dir / "config.yaml").read_text(encoding="utf-8")
    cfg = _run_config(config_yaml, str(run_dir / "config.yaml"))
    acfg = _arm_config(cfg, arm, str(run_dir))
    _writable(out)
    summary = read_summary(run_dir) or {}
    path = run_dir / "arms" / arm / ("best.safetensors" if best else "trained.safetensors")
    if not path.is_file():
        raise _missing(run_dir, arm, best, summary)
    delta = read_delta(path)
    lm, model = _apply(cfg, delta, acfg, cfg.model.name, summary.get("theta0_hash"))
    a = summary.get("arms", {}).get(arm)
    weights = (f"the best evaluation (step {(a or {}).get('val_loss_best_step')})" if best
               else f"the last step ({(a or {}).get('steps', '?')})")
    card = model_card(CardFacts(
        arm, cfg.model.name, str(model.dtype).removeprefix("torch."),
        (a or {}).get("description") or delta.meta.get("description", arm), weights,
        summary.get("theta0_hash"), a, summary.get("corpus"), _notes(cfg, lm, acfg.kind)))
    return _write(out, model, lm, card, config_yaml)


def _missing(run_dir: Path, arm: str, best: bool, summary: dict[str, Any]) -> PfreezeError:
    if best:
        return PfreezeError(
            f"the run in {run_dir} kept no best weights of arm '{arm}' "
            "(training.keep_best was off, or no evaluation ran)",
            "export the last step's weights (drop --best), or rerun with "
            "--set training.keep_best=true")
    if summary.get("status") != "finished":
        return PfreezeError(f"the run in {run_dir} has not finished: arm '{arm}' has no "
                            "trained tensors yet",
                            f"finish it first (`pfreeze run --resume {run_dir}`)")
    return PfreezeError(f"{run_dir}/arms/{arm}/trained.safetensors is missing",
                        "rerun the experiment (its summary.json lists the missing outputs)")


def apply_delta(delta_path: str | Path, base: str, out: str | Path) -> Path:
    """Apply a trained.safetensors (or best.safetensors) to the model `base` and write the
    result as a transformers model directory `out`; `base` must be the run's θ₀ (by hash)."""
    delta_path, out = Path(delta_path), Path(out)
    delta = read_delta(delta_path)
    if "config" not in delta.meta or "theta0_hash" not in delta.meta:
        raise PfreezeError(
            f"{delta_path} does not say which run and θ₀ it belongs to (no pfreeze metadata)",
            "export it from its run instead: `pfreeze export RUN_DIR --arm NAME --out DIR`")
    cfg = _run_config(delta.meta["config"], str(delta_path))
    arm = delta.meta.get("arm", "")
    acfg = _arm_config(cfg, arm, str(delta_path))
    _writable(out)
    lm, model = _apply(cfg, delta, acfg, base, delta.meta["theta0_hash"])
    card = model_card(CardFacts(
        arm, cfg.model.name, str(model.dtype).removeprefix("torch."),
        delta.meta.get("description", arm), f"the tensors of {delta_path.name}",
        delta.meta["theta0_hash"], notes=_notes(cfg, lm, acfg.kind)))
    return _write(out, model, lm, card, delta.meta["config"])

