"""`pfreeze plan` on a model directory of a type no family entry covers (it prints the rules
it inferred), and `pfreeze families` (every family, its roles, fused layouts and sampler)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pfreeze.cli import app
from pfreeze.errors import PfreezeError
from pfreeze.models.families import FAMILIES
from pfreeze.models.infer import describe_rules


def _save_tiny(kind: str, d: Path, **config: object) -> None:
    """A tiny random `kind` model with a word-level tokenizer in `d`: a local model directory
    as a user would bring one (no hub)."""
    from tokenizers import Tokenizer, models
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    cfg = AutoConfig.for_model(kind, vocab_size=257, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=4, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=128,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2, **config)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "whale": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                            bos_token="<s>", eos_token="</s>").save_pretrained(d)


@pytest.fixture
def forget_inferred() -> object:
    """Inferred families register themselves for the process: drop them after the test."""
    yield
    for name in [n for n in FAMILIES if n.startswith("inferred:")]:
        FAMILIES.pop(name)


def test_plan_on_an_unknown_llama_convention_model_prints_the_inferred_rules(
        tmp_path: Path, forget_inferred: object) -> None:
    # Helium (kyutai) is in transformers, not in pfreeze's registry; its names are Llama's.
    assert "helium" not in {t for f in FAMILIES.values() for t in f.model_types}
    _save_tiny("helium", tmp_path / "m", head_dim=16)
    out = CliRunner().invoke(app, ["plan", "--model", str(tmp_path / "m"), "--select",
                                   "layers=2: roles=q,k,v"], env={"COLUMNS": "250"})
    assert out.exit_code == 0, out.output
    text = out.output
    assert ("no family entry covers this model; pfreeze inferred inferred:helium from its "
            "parameter names, with these rules:") in text
    lines = text.splitlines()
    rules = describe_rules(FAMILIES["inferred:helium"])
    start = next(i for i, ln in enumerate(lines) if ln.startswith("no family entry"))
    assert [ln.strip() for ln in lines[start + 1:start + 1 + len(rules)]] == rules
    assert r".*(self_attn|attention|attn)\.q_proj\.(weight|bias) -> q (out, dim 0)" in rules
    assert r".*mlp\.gate_proj\.(weight|bias) -> gate" in rules
    # Blocks 2 and 3: q 64×64, k and v 32×64 (2 KV heads of 16) each, no biases.
    total = int(re.search(r"trainable: ([\d,]+) of", text).group(1).replace(",", ""))
    assert total == 2 * (64 * 64 + 32 * 64 + 32 * 64)
    for layer in (2, 3):
        for proj in ("q_proj", "k_proj", "v_proj"):
            assert f"model.layers.{layer}.self_attn.{proj}.weight" in text


def test_plan_on_a_known_family_prints_no_inferred_rules(tmp_path: Path) -> None:
    out = CliRunner().invoke(app, ["plan", "--model", "random:qwen2"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "inferred" not in out.output


def test_families_lists_every_family_its_roles_layouts_and_sampler() -> None:
    out = CliRunner().invoke(app, ["families"], env={"COLUMNS": "250"})
    assert out.exit_code == 0, out.output
    rows = {}
    for line in out.output.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]
        if len(cells) == 5 and cells[0] and cells[0] != "family":
            rows[cells[0]] = cells
    assert list(rows) == list(FAMILIES)
    assert rows["phi3"][1:] == ["phi3", "embed head norm q k v o gate up down mlp",
                                "gate_up: gate_up, qkv: qkv_concat", "all"]
    assert rows["moe"][2].split() == ["embed", "head", "norm", "q", "k", "v", "o", "gate", "up",
                                      "down", "router", "experts", "mlp"]
    assert rows["moe"][3] == "gate_up: gate_up per expert"
    assert rows["falcon"][3] == "qkv: qkv_grouped"
    assert rows["gpt-neo"][4] == "—"  # samples with generate
    assert rows["llama"][4] == "all"


def test_multimodal_gemma3_is_refused_in_one_line_naming_the_text_only_model(
        tmp_path: Path) -> None:
    """`gemma3` (Gemma 3 4B and up) loads as Gemma3ForConditionalGeneration; it is not
    covered: a directory of a tiny one gets the one-line error with the fix."""
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, Gemma3Config, PreTrainedTokenizerFast

    cfg = Gemma3Config(
        text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=128),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=299, boi_token_index=297, eoi_token_index=298)
    model = AutoModelForCausalLM.from_config(cfg)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    model.save_pretrained(tmp_path / "g3")
    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(tmp_path / "g3")
    out = CliRunner().invoke(app, ["plan", "--model", str(tmp_path / "g3")])
    e = out.exception  # main() prints it as its one line `error: problem; fix`, exit 2
    assert isinstance(e, PfreezeError), out.output
    assert (e.problem, e.fix) == (
        "'gemma3' is a multimodal model (Gemma3ForConditionalGeneration: a vision tower "
        "beside its language model); pfreeze's freeze plans cover text-only causal LMs",
        "use a text-only checkpoint (for Gemma 3: model_type gemma3_text, e.g. "
        "google/gemma-3-1b-pt)")
