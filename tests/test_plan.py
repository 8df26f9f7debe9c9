"""The selector language, checked against hand-computed masks on four architectures.

Every expected mask below is written out with explicit index arithmetic for the tiny random
models (hidden 64, 4 heads of 16, 4 blocks; llama has 2 key/value heads), never derived from
architectures.role_index, so a wrong layout in architectures.FAMILIES cannot agree with itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
from torch import nn

from pfreeze.errors import PfreezeError
from pfreeze.models.families import FAMILIES
from pfreeze.models.load import load_model
from pfreeze.plan.selectors import compile_plan, trainable_union
from pfreeze.plan.table import plan_rows

E, H, HD, L, KV = 64, 4, 16, 4, 2  # hidden size, heads, head dim, blocks, llama kv heads
WHOLE = None  # the plan's marker for "every element of the tensor trains"


@functools.cache
def model(family: str) -> nn.Module:
    return load_model(f"random:{family}").model


def shapes(family: str) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model(family).named_parameters()}


def rows(shape: tuple[int, ...], *ranges: tuple[int, int]) -> torch.Tensor:
    """Mask with rows a:b set (for 1-D tensors: elements a:b)."""
    m = torch.zeros(shape, dtype=torch.bool)
    for a, b in ranges:
        m[a:b] = True
    return m


def cols(shape: tuple[int, ...], *ranges: tuple[int, int]) -> torch.Tensor:
    m = torch.zeros(shape, dtype=torch.bool)
    for a, b in ranges:
        m[:, a:b] = True
    return m


def neox_rows(role: int, heads: range | list[int]) -> list[tuple[int, int]]:
    """NeoX query_key_value rows: head h holds [q | k | v], each HD rows, from h * 3 * HD."""
    return [(h * 3 * HD + role * HD, h * 3 * HD + (role + 1) * HD) for h in heads]


def prefixed(family: str, *prefixes: str) -> dict[str, torch.Tensor | None]:
    return {n: WHOLE for n in shapes(family) if n.startswith(prefixes)}


G2 = "transformer.h.{}.attn.c_attn"
NX = "gpt_neox.layers.{}.attention.query_key_value"
NEO = "transformer.h.{}.attn.attention"
LL = "model.layers.{}.self_attn"
Expect = Callable[[], dict[str, torch.Tensor | None]]

# (family, selector, expected masks of exactly the tensors that train)
CASES: list[tuple[str, str, Expect]] = [
    # GPT-2 Conv1D c_attn weight is (in, 3E): q, k, v are column blocks; the bias slices alike.
    ("gpt2", "roles=q", lambda: {
        **{G2.format(i) + ".weight": cols((E, 3 * E), (0, E)) for i in range(L)},
        **{G2.format(i) + ".bias": rows((3 * E,), (0, E)) for i in range(L)}}),
    ("gpt2", "roles=k heads=1", lambda: {
        **{G2.format(i) + ".weight": cols((E, 3 * E), (E + HD, E + 2 * HD)) for i in range(L)},
        **{G2.format(i) + ".bias": rows((3 * E,), (E + HD, E + 2 * HD)) for i in range(L)}}),
    ("gpt2", "roles=q heads=0,3", lambda: {
        **{G2.format(i) + ".weight": cols((E, 3 * E), (0, HD), (3 * HD, 4 * HD))
           for i in range(L)},
        **{G2.format(i) + ".bias": rows((3 * E,), (0, HD), (3 * HD, 4 * HD)) for i in range(L)}}),
    ("gpt2", "roles=v layers=-1:", lambda: {
        G2.format(3) + ".weight": cols((E, 3 * E), (2 * E, 3 * E)),
        G2.format(3) + ".bias": rows((3 * E,), (2 * E, 3 * E))}),
    ("gpt2", "roles=q,k heads=0 layers=1", lambda: {
        G2.format(1) + ".weight": cols((E, 3 * E), (0, HD), (E, E + HD)),
        G2.format(1) + ".bias": rows((3 * E,), (0, HD), (E, E + HD))}),
    # c_proj is Conv1D too: its input (the concatenated heads) is dim 0, so heads are rows.
    ("gpt2", "roles=o heads=2 layers=0", lambda: {
        "transformer.h.0.attn.c_proj.weight": rows((E, E), (2 * HD, 3 * HD))}),
    ("gpt2", "transformer.h.0.attn.c_attn.weight[:, 64:128]", lambda: {
        G2.format(0) + ".weight": cols((E, 3 * E), (E, 2 * E))}),
    ("gpt2", "roles=head", lambda: {"transformer.wte.weight": WHOLE}),  # tied to lm_head
    ("gpt2", "layers=2:", lambda: prefixed("gpt2", "transformer.h.2.", "transformer.h.3.")),
    # GPT-NeoX query_key_value rows interleave per head: [head][q, k, v][head_dim].
    ("gpt-neox", "roles=q", lambda: {
        **{NX.format(i) + ".weight": rows((3 * E, E), *neox_rows(0, range(H))) for i in range(L)},
        **{NX.format(i) + ".bias": rows((3 * E,), *neox_rows(0, range(H))) for i in range(L)}}),
    ("gpt-neox", "roles=v heads=2 layers=1", lambda: {
        NX.format(1) + ".weight": rows((3 * E, E), (2 * 48 + 32, 2 * 48 + 48)),
        NX.format(1) + ".bias": rows((3 * E,), (2 * 48 + 32, 2 * 48 + 48))}),
    ("gpt-neox", "roles=k heads=1,3 layers=0", lambda: {
        NX.format(0) + ".weight": rows((3 * E, E), (48 + 16, 48 + 32), (144 + 16, 144 + 32)),
        NX.format(0) + ".bias": rows((3 * E,), (48 + 16, 48 + 32), (144 + 16, 144 + 32))}),
    ("gpt-neox", "roles=qkv heads=0 layers=2", lambda: {
        NX.format(2) + ".weight": rows((3 * E, E), (0, 48)),
        NX.format(2) + ".bias": rows((3 * E,), (0, 48))}),
    ("gpt-neox", "roles=o heads=1 layers=3", lambda: {
        "gpt_neox.layers.3.attention.dense.weight": cols((E, E), (HD, 2 * HD))}),
    ("gpt-neox", "roles=head", lambda: {"lm_head.weight": WHOLE}),  # not tied in this family
    ("gpt-neox", "layers=50%: roles=norm", lambda: {
        f"gpt_neox.layers.{i}.{ln}.{w}": WHOLE for i in (2, 3)
        for ln in ("input_layernorm", "post_attention_layernorm") for w in ("weight", "bias")}),
    # GPT-Neo: separate Linear q/k/v (out, in), no biases on them.
    ("gpt-neo", "roles=q heads=1", lambda: {
        NEO.format(i) + ".q_proj.weight": rows((E, E), (HD, 2 * HD)) for i in range(L)}),
    ("gpt-neo", "roles=o heads=0 layers=0", lambda: {
        NEO.format(0) + ".out_proj.weight": cols((E, E), (0, HD))}),
    ("gpt-neo", "layers=0,2 roles=norm", lambda: {
        f"transformer.h.{i}.{ln}.{w}": WHOLE for i in (0, 2)
        for ln in ("ln_1", "ln_2") for w in ("weight", "bias")}),
    # Llama with grouped-query attention: k_proj and v_proj have 2 heads of 16 rows.
    ("llama", "roles=q heads=0,3", lambda: {
        LL.format(i) + ".q_proj.weight": rows((E, E), (0, HD), (3 * HD, 4 * HD))
        for i in range(L)}),
    ("llama", "roles=k heads=1", lambda: {
        LL.format(i) + ".k_proj.weight": rows((KV * HD, E), (HD, 2 * HD)) for i in range(L)}),
    ("llama", "roles=v heads=0 layers=50%:", lambda: {
        LL.format(i) + ".v_proj.weight": rows((KV * HD, E), (0, HD)) for i in (2, 3)}),
    ("llama", "layers=0,2 roles=o heads=3", lambda: {
        LL.format(i) + ".o_proj.weight": cols((E, E), (3 * HD, 4 * HD)) for i in (0, 2)}),
    ("llama", "model.layers.0.self_attn.q_proj.weight[:, 0:16]", lambda: {
        LL.format(0) + ".q_proj.weight": cols((E, E), (0, 16))}),
    ("llama", "roles=q heads=0 *.q_proj.weight[:, 0:16]", lambda: {
        LL.format(i) + ".q_proj.weight": rows((E, E), (0, HD)) & cols((E, E), (0, 16))
        for i in range(L)}),
    ("llama", "layers=-1: roles=mlp", lambda: prefixed("llama", "model.layers.3.mlp.")),
    ("llama", "roles=attn; !layers=0", lambda: {
        LL.format(i) + f".{p}_proj.weight": WHOLE for i in (1, 2, 3) for p in "qkvo"}),
    ("llama", "roles=q; !roles=q heads=1", lambda: {
        LL.format(i) + ".q_proj.weight": rows((E, E), (0, HD), (2 * HD, E)) for i in range(L)}),
    ("llama", "roles=q heads=0,1; roles=q heads=2,3", lambda: {
        LL.format(i) + ".q_proj.weight": WHOLE for i in range(L)}),  # together: whole tensors
    ("llama", "roles=head", lambda: {"model.embed_tokens.weight": WHOLE}),  # tied embedding
    ("llama", r"re=model\.norm\..*", lambda: {"model.norm.weight": WHOLE}),
]


@pytest.mark.parametrize(("family", "selector", "expect"), CASES,
                         ids=[f"{f}:{s}" for f, s, _ in CASES])
def test_selector_masks(family: str, selector: str, expect: Expect) -> None:
    plan = compile_plan(model(family), family, selector)
    expected = expect()
    assert sorted(plan.tensors) == sorted(expected)
    for name, want in expected.items():
        got = plan.tensors[name].mask
        if want is None:
            assert got is None, f"{name}: expected the whole tensor"
            assert plan.tensors[name].trainable == plan.tensors[name].total
        else:
            assert got is not None and torch.equal(got, want), name
            assert plan.tensors[name].trainable == int(want.sum())


@pytest.mark.parametrize("family", ["gpt2", "gpt-neox"])
def test_fused_heads_partition_the_matrix(family: str) -> None:
    """Every (role, head) pair owns a disjoint piece; together they cover the fused matrix."""
    name = (G2 if family == "gpt2" else NX).format(0) + ".weight"
    count = torch.zeros(shapes(family)[name], dtype=torch.int32)
    for role in "qkv":
        for h in range(H):
            mask = compile_plan(model(family), family, f"roles={role} heads={h} layers=0")
            count += mask.tensors[name].mask.int()  # type: ignore[union-attr]
    assert bool((count == 1).all())


# (family, selector, tensor, trainable elements, readable description)
ROWS = [
    ("gpt2", "roles=q", G2.format(0) + ".weight", E * E, "q (cols 0:64)"),
    ("gpt2", "roles=q", G2.format(0) + ".bias", E, "q (elements 0:64)"),
    ("gpt2", "roles=q,k heads=0", G2.format(2) + ".weight", 2 * E * HD,
     "q heads 0, k heads 0 (cols 0:16, 64:80)"),
    ("gpt-neox", "roles=k heads=1", NX.format(0) + ".weight", HD * E, "k heads 1 (rows 64:80)"),
    ("gpt-neox", "roles=q", NX.format(0) + ".weight", E * E,
     "q (rows 0:16, 48:64, 96:112, 144:160)"),
    ("llama", "roles=q heads=0,3", LL.format(1) + ".q_proj.weight", 2 * HD * E,
     "q heads 0,3 (rows 0:16, 48:64)"),
    ("llama", "roles=k heads=1", LL.format(1) + ".k_proj.weight", HD * E,
     "k heads 1 (rows 16:32)"),
    ("llama", "model.layers.0.self_attn.q_proj.weight[:, 0:16]", LL.format(0) + ".q_proj.weight",
     E * 16, "[:, 0:16]"),
    ("llama", "roles=q heads=0,3 *.q_proj.weight[:, 0:16]", LL.format(0) + ".q_proj.weight",
     2 * HD * 16, "rows 0:16, 48:64 × cols 0:16"),
    ("llama", "layers=0 roles=mlp; !*.gate_proj.weight[0:4, 0:4]",
     "model.layers.0.mlp.gate_proj.weight", 128 * E - 16, "all but [0:4, 0:4]"),
    ("llama", "layers=-1: roles=mlp", "model.layers.3.mlp.up_proj.weight", 128 * E, "whole"),
    ("llama", "roles=head", "model.embed_tokens.weight (tied: lm_head)", 257 * E, "whole"),
    ("llama", "roles=head", LL.format(0) + ".q_proj.weight", 0, "frozen"),
]


@pytest.mark.parametrize(("family", "selector", "name", "trainable", "how"), ROWS,
                         ids=[f"{r[0]}:{r[1]}:{r[4]}" for r in ROWS])
def test_plan_rows_say_which_slices(family: str, selector: str, name: str, trainable: int,
                                    how: str) -> None:
    plan = compile_plan(model(family), family, selector)
    table = {r["name"]: r for r in plan_rows(plan)}
    assert len(table) == len(shapes(family))  # one row per parameter, frozen ones too
    assert (table[name]["trainable"], table[name]["how"]) == (trainable, how)
    assert sum(r["trainable"] for r in table.values()) == plan.trainable  # type: ignore[misc]


# (family, selector, phrase the one-line error must contain)
ERRORS = [
    ("llama", "model.layers.9.*", "matches no parameter"),
    ("llama", "roles=q; !model.nothing.*", "matches no parameter"),
    ("llama", "roles=foo", "unknown role 'foo'"),
    ("llama", "layers=40", "block 40 is out of range"),
    ("llama", "layers=10:", "selects no block"),
    ("llama", "layers=x", "not a block index or slice"),
    ("llama", "layers=inf%:", "not a block index or slice"),
    ("llama", "roles=k heads=3", "grouped-query"),
    ("gpt2", "roles=q heads=4", "role q has only 4 heads"),
    ("llama", "heads=1", "heads= needs roles="),
    ("llama", "roles=q heads=-1", "not a list of head indices"),
    ("llama", "roles=q heads=a", "not a list of head indices"),
    ("llama", "model.layers.0.self_attn.q_proj.weight[:, a:b]", "cannot read index 'a:b'"),
    ("llama", "model.layers.0.self_attn.q_proj.weight[0:16", "cannot read term"),
    ("llama", "model.layers.0.self_attn.q_proj.weight[100]", "does not fit"),
    ("llama", "model.layers.0.self_attn.q_proj.weight[::0]", "does not fit"),
    ("llama", "layer=2", "unknown selector key 'layer'"),
    ("llama", " ; ", "selector is empty"),
    ("llama", "roles=q; !roles=q", "leaves nothing trainable"),
]


@pytest.mark.parametrize(("family", "selector", "phrase"), ERRORS,
                         ids=[f"{f}:{s}" for f, s, _ in ERRORS])
def test_selector_errors(family: str, selector: str, phrase: str) -> None:
    with pytest.raises(PfreezeError) as err:
        compile_plan(model(family), family, selector)
    assert phrase in str(err.value)
    assert "\n" not in str(err.value)  # the CLI prints it as one line


def test_role_the_architecture_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    # No shipped family lacks a role, so describe one whose table has no output head.
    fam = FAMILIES["gpt-neox"]
    rules = tuple(r for r in fam.rules if r.role != "head")
    monkeypatch.setitem(FAMILIES, "gpt-neox", replace(fam, rules=rules))
    with pytest.raises(PfreezeError, match=r"has no parameters with role \['head'\]"):
        compile_plan(model("gpt-neox"), "gpt-neox", "roles=head")


def test_trainable_union_counts_each_element_once() -> None:
    m = model("llama")
    a = compile_plan(m, "llama", "roles=q heads=0,1")  # rows 0:32 of four 64x64 tensors
    b = compile_plan(m, "llama", "roles=q heads=1,2")  # rows 16:48
    c = compile_plan(m, "llama", "layers=0 roles=q")  # block 0's q whole
    assert trainable_union([a, b]) == 4 * 48 * E
    assert trainable_union([a, None, b, c]) == 3 * 48 * E + E * E

