"""What dynamo traces for pfreeze's training forward, against a plain loop's, on the CPU.

    python -m bench.graph_diff
    PYTHONPATH=/path/to/transformers-5.17:$PYTHONPATH python -m bench.graph_diff   # the device's

A 2-block Llama with grouped KV heads, bf16 autocast. Traced three ways with
torch._dynamo.explain: pfreeze's causal flash route as the step ran it before it passed
use_cache=False, as it runs now, and bench/means_probe.py's hand-written attention forward.
Prints graph and break counts, then the ops each pfreeze variant has more (or fewer) of than
the plain forward: where the two compiled steps can differ at all.
"""

from __future__ import annotations

from collections import Counter

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from bench.means_probe import attention_forward
from pfreeze import training_attention


def _model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=512, hidden_size=192, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=3, num_key_value_heads=1, tie_word_embeddings=True))


def _ops(explained) -> Counter:  # noqa: ANN001
    return Counter(str(n.target).split(" of ")[0] for g in explained.graphs
                   for n in g.graph.nodes if n.op in ("call_function", "call_method"))


def main() -> None:
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    x = torch.randint(0, 512, (4, 64))
    traced = {}
    for name, kw in (("pfreeze, KV cache built", {}), ("pfreeze, use_cache=False",
                                                        {"use_cache": False})):
        m = _model()
        with torch.autocast("cpu", torch.bfloat16), training_attention(m, "flash"):
            traced[name] = torch._dynamo.explain(m)(input_ids=x, labels=x, **kw)
    plain = _model()
    for layer in plain.model.layers:
        layer.self_attn._fused = False
        layer.self_attn.forward = attention_forward.__get__(layer.self_attn)
    with torch.autocast("cpu", torch.bfloat16):
        traced["plain"] = torch._dynamo.explain(plain)(input_ids=x, labels=x, use_cache=False)
    for name, e in traced.items():
        print(f"{name}: {e.graph_count} graph(s), {e.graph_break_count} break(s)")
    base = _ops(traced["plain"])
    for name in list(traced)[:2]:
        ops = _ops(traced[name])
        more = {k: v - base[k] for k, v in ops.items() if v > base[k]}
        fewer = {k: base[k] - ops[k] for k in base if base[k] > ops[k]}
        print(f"{name}, more than plain: {more}\n{name}, fewer than plain: {fewer}")


if __name__ == "__main__":
    main()
