"""Corpus formats (pfreeze.data.formats) and the token stream made of them (pfreeze.data.tokens):
every format gives the token stream of the equivalent plain text, chats go through a chat
template, the cache spares a second tokenisation, and each bad input gets its one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pfreeze.data import tokens
from pfreeze.data.formats import Documents, read_documents
from pfreeze.data.tokens import documents_n_val, tokenize_documents
from pfreeze.errors import PfreezeError
from pfreeze.models.load import ByteTokenizer, HFTokenizer
from pfreeze.settings import DataConfig

DOCS = ["Call me Ishmael. Some years ago, never mind how long.",
        "It is a way I have of driving off the spleen.\nAnd regulating the circulation.",
        "Whenever I find myself growing grim about the mouth; café, naïve.",
        "There now is your insular city of the Manhattoes."]


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # datasets' Arrow files and the token cache go to the test's folder, not the user's.
    monkeypatch.setenv("PFREEZE_CACHE", str(tmp_path / "cache"))


def stream(spec: Path | str, tokenizer=None, **data) -> list[int]:
    cfg = DataConfig(corpus=str(spec), validation_fraction=0.0, **data)
    return tokenize_documents(read_documents(cfg), tokenizer or ByteTokenizer(), cfg,
                              min_tokens=1).ids


def one_line(match: str, spec: Path | str, **data) -> str:
    with pytest.raises(PfreezeError) as info:
        stream(spec, **data)
    message = str(info.value)
    assert match in message, message
    assert "\n" not in message and info.value.fix
    return message


def write_formats(root: Path) -> dict[str, Path]:
    """The DOCS in every format pfreeze reads."""
    import datasets

    root.mkdir(parents=True, exist_ok=True)
    rows = [{"id": i, "text": t} for i, t in enumerate(DOCS)]
    out = {"jsonl": root / "c.jsonl", "json": root / "c.json", "csv": root / "c.csv",
           "parquet": root / "c.parquet", "saved": root / "saved", "folder": root / "folder"}
    out["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out["json"].write_text(json.dumps(rows), encoding="utf-8")
    ds = datasets.Dataset.from_list(rows)
    ds.to_csv(str(out["csv"]), index=False)
    ds.to_parquet(str(out["parquet"]))
    ds.save_to_disk(str(out["saved"]))
    # Names whose sorted relative paths give the DOCS' order, across sub-folders and suffixes.
    for name, text in zip(["01.txt", "02/a.md", "02/b.txt", "03.md"], DOCS, strict=True):
        (out["folder"] / name).parent.mkdir(parents=True, exist_ok=True)
        (out["folder"] / name).write_text(text, encoding="utf-8")
    (out["folder"] / ".hidden.txt").write_text("never read", encoding="utf-8")
    (out["folder"] / "notes.pdf").write_bytes(b"%PDF not text")
    return out


def test_every_format_gives_the_plain_texts_token_stream(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("\n\n".join(DOCS), encoding="utf-8")
    expected = stream(plain)
    assert expected == list("\n\n".join(DOCS).encode())  # bytes: the tokenizer's own ids
    for kind, path in write_formats(tmp_path / "f").items():
        assert stream(path) == expected, kind


def test_a_bpe_tokenizer_gives_the_same_stream_where_it_does_not_merge_the_joint(
        tmp_path: Path) -> None:
    tok = _word_tokenizer()
    plain = tmp_path / "plain.txt"
    plain.write_text("\n\n".join(DOCS), encoding="utf-8")
    formats = write_formats(tmp_path / "f")
    assert stream(formats["jsonl"], tok) == stream(plain, tok) == stream(formats["folder"], tok)


def test_a_folder_keeps_its_order_and_the_text_field_is_chosen(tmp_path: Path) -> None:
    folder = tmp_path / "books"
    (folder / "b").mkdir(parents=True)
    (folder / "b" / "1.txt").write_text("second", encoding="utf-8")
    (folder / "a.md").write_text("first", encoding="utf-8")
    (folder / "empty.txt").write_text("", encoding="utf-8")
    (folder / "blank.txt").write_text(" \r\n\t\n", encoding="utf-8")  # a blank note: skipped
    assert read_documents(DataConfig(corpus=str(folder))).texts == ["first", "second"]
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"body": "x y", "text": "no"}\n{"body": "z", "text": "no"}\n')
    assert read_documents(DataConfig(corpus=str(rows), text_field="body")).texts == ["x y", "z"]


CHATS = [[{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Ishmael."}],
         [{"role": "user", "content": "Where?"}, {"role": "assistant", "content": "At sea."}]]
TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>\n{% endfor %}"


def chat_file(tmp_path: Path) -> Path:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CHATS), encoding="utf-8")
    return path


def rendered(chat: list[dict[str, str]]) -> str:
    return "".join(f"<{m['role']}>{m['content']}</s>\n" for m in chat)


def test_chat_rows_are_rendered_with_the_template(tmp_path: Path) -> None:
    path = chat_file(tmp_path)
    text = "\n\n".join(rendered(c) for c in CHATS)
    assert stream(path, chat_template=TEMPLATE) == list(text.encode())
    template_file = tmp_path / "t.jinja"
    template_file.write_text(TEMPLATE, encoding="utf-8")
    assert stream(path, chat_template=str(template_file)) == list(text.encode())


def test_chat_rows_use_the_models_own_template(tmp_path: Path) -> None:
    tok = _word_tokenizer()
    tok.tok.chat_template = TEMPLATE.replace("<{{ m.role }}>", "{{ m.role }} : ")
    text = "\n\n".join("".join(f"{m['role']} : {m['content']}</s>\n" for m in c) for c in CHATS)
    assert stream(chat_file(tmp_path), tok) == tok.encode(text)


def test_a_model_without_a_chat_template_is_refused_with_the_fix(tmp_path: Path) -> None:
    message = one_line("no chat template", chat_file(tmp_path))
    assert "data.chat_template" in message


def test_validation_by_documents_holds_out_whole_documents(tmp_path: Path) -> None:
    path = write_formats(tmp_path)["jsonl"]
    cfg = DataConfig(corpus=str(path), validation_split="documents", validation_fraction=0.3)
    stats = tokenize_documents(read_documents(cfg), ByteTokenizer(), cfg, min_tokens=8)
    sizes = [len(d.encode()) + 2 for d in DOCS[:-1]] + [len(DOCS[-1].encode())]
    # 30% of 252 tokens is 75.6: the last document (49) is nearer than the last two (118).
    assert sizes == [55, 79, 69, 49] and stats.n_total == 252
    assert stats.n_total - stats.n_train == 49 and stats.n_documents == 4
    assert bytes(stats.val_ids).decode() == DOCS[-1]
    assert documents_n_val([10, 10, 10, 10], 0.5) == 20
    assert documents_n_val([10, 10], 0.0) == 0
    with pytest.raises(PfreezeError, match="at least 2 documents"):
        documents_n_val([100], 0.1)


class CountingTokenizer(ByteTokenizer):
    calls = 0

    def encode(self, text: str) -> list[int]:
        CountingTokenizer.calls += 1
        return super().encode(text)


def test_a_second_tokenisation_comes_from_the_cache(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    folder = write_formats(tmp_path)["folder"]
    first = stream(folder, CountingTokenizer(), token_cache=True)
    assert CountingTokenizer.calls == len(DOCS)
    cached = list((tmp_path / "cache" / "tokens").glob("*.safetensors"))
    assert len(cached) == 1
    assert stream(folder, CountingTokenizer(), token_cache=True) == first
    assert CountingTokenizer.calls == len(DOCS)  # not tokenised again
    (folder / "03.md").write_text("An edited file.", encoding="utf-8")
    stream(folder, CountingTokenizer(), token_cache=True)
    assert CountingTokenizer.calls == 2 * len(DOCS)  # new content: tokenised
    stream(folder, CountingTokenizer(), token_cache=False)  # small corpora skip it under auto
    stream(folder, CountingTokenizer())
    assert CountingTokenizer.calls == 4 * len(DOCS)
    assert "tokenizing" not in capsys.readouterr().err


def test_a_long_tokenisation_shows_a_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "PROGRESS_CHARS", 10)
    stream(write_formats(tmp_path)["jsonl"])
    assert "tokenizing" in capsys.readouterr().err


def test_bad_inputs_get_one_line_each(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "a" "b"}\n', encoding="utf-8")
    message = one_line("line 3 is not JSON", bad)
    assert str(bad) in message
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"body": "x", "id": 1}\n', encoding="utf-8")
    message = one_line("has no field 'text'", rows)
    assert "(its fields: body, id)" in message and "data.text_field" in message
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "data.bin").write_bytes(b"\x00\x01")
    one_line("holds no text files", empty)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("plain café", encoding="utf-8")
    (mixed / "b.txt").write_bytes("naïve café".encode("cp1252"))
    message = one_line(f"{mixed / 'b.txt'} is not UTF-8", mixed)
    assert "iconv -f cp1252 -t utf-8 b.txt" in message
    one_line("is not JSON (line 1", _write(tmp_path / "x.json", "[{]"))
    one_line("row 1: field 'text' is int", _write(tmp_path / "n.jsonl", '{"text": 3}\n'))
    one_line("row 2: field 'text' is missing",
             _write(tmp_path / "o.jsonl", '{"text": "a"}\n\n{"other": 1}\n'))
    one_line("'messages' is not a list", _write(tmp_path / "m.jsonl", '{"messages": "hi"}\n'))
    # A JSON file that is not UTF-8 gets the JSON fix; one that is binary keeps its own.
    latin = tmp_path / "l.jsonl"
    latin.write_bytes('{"text": "naïve"}\n'.encode("cp1252"))
    assert "JSON is read as UTF-8" in one_line("is not UTF-8", latin)
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b'{"text": "a"}\n\x00\x01\n')
    assert "pass a plain-text file" in one_line("looks binary", binary)


def test_a_valid_jsonl_is_parsed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """datasets alone parses a good file; the line-by-line check runs only on its failure, and
    then names the file and line."""
    from pfreeze.data import formats

    checked: list[Path] = []
    check = formats._check_json
    monkeypatch.setattr(formats, "_check_json", lambda path: (checked.append(path), check(path)))
    good = _write(tmp_path / "good.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    assert stream(good) == list("\n\n".join(DOCS).encode())
    assert checked == []
    bad = _write(tmp_path / "bad.jsonl", '{"text": "fine"}\n{"text": "a" "b"}\n')
    assert f"{bad} line 2 is not JSON" in one_line("line 2 is not JSON", bad)
    assert checked == [bad]


def test_a_hub_dataset_offline_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    import huggingface_hub.constants

    # Offline for certain, with no retries: the hub must not be tried from a test.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = one_line("could not load hub dataset 'someone/moby'", "hf:someone/moby")
    assert "save_to_disk" in message


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _word_tokenizer() -> HFTokenizer:
    """A transformers tokenizer (words and punctuation, byte-free) with no files."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for d in DOCS + ["<user>", "<assistant>", "</s>", "user", "assistant",
                                       ":", "Who?", "Where?", "Ishmael.", "At sea."]
                    for w in d.replace("?", " ? ").replace(".", " . ").split()})
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return HFTokenizer(PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]"))


def test_a_run_on_jsonl_reports_the_plain_texts_statistics_and_p(
        make_config, tmp_path: Path) -> None:
    """A whole run on a JSONL corpus: the corpus statistics are the plain text's (the same
    token stream) and p is measured against its top-k set."""
    from conftest import corpus_text

    from pfreeze.data.corpus import describe
    from pfreeze.outputs.files import RunFiles
    from pfreeze.run.loop import Loop
    from pfreeze.run.session import run_loop

    paragraphs = [p for p in corpus_text().split("\n\n") if p.strip()]
    path = tmp_path / "moby.jsonl"
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs),
                    encoding="utf-8")
    cfg = make_config(f"data.corpus={path}", "training.max_steps=2",
                      "data.validation_split=documents", "arms=[{kind: plan}]")
    summary = run_loop(Loop(cfg, RunFiles(tmp_path / "run")))
    one_text = Documents("plain", texts=["\n\n".join(paragraphs)])
    plain = describe(tokenize_documents(one_text, ByteTokenizer(), DataConfig(top_k=cfg.data.top_k),
                                        min_tokens=32), ByteTokenizer().decode)
    corpus = summary["corpus"]
    assert corpus["n_documents"] == len(paragraphs) > 10
    assert corpus["top"] == plain["top"] and corpus["n_total"] == plain["n_total"]
    assert corpus["n_val"] != plain["n_val"]  # whole paragraphs, not the 10% tail
    assert 0 < summary["arms"]["plan"]["p_after"]["mean"] <= 1


def test_the_cli_gives_a_bad_jsonl_line_as_one_line(tmp_path: Path) -> None:
    from conftest import TINY
    from test_cli import assert_one_line_error, pfreeze, sets

    bad = _write(tmp_path / "bad.jsonl", '{"text": "fine"}\nnot json\n')
    proc = pfreeze("run", "--corpus", str(bad), "-o", str(tmp_path / "out"), *sets(*TINY))
    assert_one_line_error(proc, f"{bad} line 2 is not JSON")
    assert "Failed to load JSON" not in proc.stderr  # datasets' own log of the failure
    assert not (tmp_path / "out").exists()
