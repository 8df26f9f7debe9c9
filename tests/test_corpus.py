"""Tests for pfreeze.data.corpus: reading, Gutenberg stripping, tokenising and counting."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pfreeze.data import corpus
from pfreeze.data.corpus import (
    GUTENBERG_URL,
    CorpusStats,
    cache_dir,
    count_tokens,
    describe,
    read_corpus,
    strip_gutenberg,
    top_share,
)
from pfreeze.data.formats import Documents
from pfreeze.data.tokens import tokenize_documents
from pfreeze.errors import PfreezeError
from pfreeze.settings import DataConfig

MOBY = Path("/work/shared/data/moby-dick/pg2701.txt")


class WordTokenizer:
    """Whitespace-split words, each new word gets the next id (0, 1, 2, ...)."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def encode(self, text: str) -> list[int]:
        return [self.vocab.setdefault(word, len(self.vocab)) for word in text.split()]

    def decode(self, ids: list[int]) -> str:
        inverse = {i: w for w, i in self.vocab.items()}
        return " ".join(inverse[i] for i in ids)


class ListTokenizer:
    """Ignores the text and returns a fixed id list, to test counting on hand-made input."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def encode(self, text: str) -> list[int]:
        return list(self.ids)


def tokenize(text: str, tokenizer, validation_fraction: float = 0.1, top_k: int = 100,
             min_tokens: int = 2) -> CorpusStats:
    """The statistics pfreeze makes of a corpus of one text (pfreeze.data.tokens)."""
    data = DataConfig(corpus="text", validation_fraction=validation_fraction, top_k=top_k)
    return tokenize_documents(Documents("text", texts=[text]), tokenizer, data, min_tokens)


def raises(match: str, fn, *args, **kwargs) -> str:
    """Assert fn raises a one-line PfreezeError containing `match`; return the message."""
    with pytest.raises(PfreezeError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert match in message, message
    assert "\n" not in message
    assert info.value.fix, "every corpus error should say how to fix it"
    return message


# --- counting -------------------------------------------------------------------------------


def test_top_share_hand_counted() -> None:
    assert top_share([1, 1, 1, 2, 2, 3], {1, 2}) == pytest.approx(5 / 6)
    assert top_share([1, 1, 1, 2, 2, 3], [3]) == pytest.approx(1 / 6)
    assert top_share([], {1}) == 0.0
    assert top_share([4, 5], frozenset()) == 0.0


def test_top_k_table_hand_counted_with_ties() -> None:
    # counts: 7->3, 2->2, 5->2, 9->1, 1->1 ; ties broken by the smaller id
    ids = [5, 7, 2, 7, 9, 5, 7, 2, 1]
    stats = tokenize("x", ListTokenizer(ids), validation_fraction=0.0, top_k=3)
    assert stats.top_k == [(7, 3), (2, 2), (5, 2)]
    assert stats.frequency_table() == [(7, 3), (2, 2), (5, 2), (1, 1), (9, 1)]
    assert stats.n_unique == 5
    assert stats.n_total == 9
    assert stats.top_set == frozenset({7, 2, 5})
    assert stats.ids == ids


def test_validation_is_exact_tail() -> None:
    ids = list(range(100, 120))  # 20 tokens
    stats = tokenize("x", ListTokenizer(ids), validation_fraction=0.25)
    assert stats.n_train == 15
    assert stats.train_ids == ids[:15]
    assert stats.val_ids == ids[15:]
    assert stats.train_ids + stats.val_ids == ids


def test_frequencies_cover_whole_corpus_not_just_train() -> None:
    # id 9 only appears in the validation tail but is still the most frequent
    ids = [1, 2, 3, 4, 5, 6, 9, 9, 9, 9]
    stats = tokenize("x", ListTokenizer(ids), validation_fraction=0.4, top_k=1)
    assert stats.val_ids == [9, 9, 9, 9]
    assert stats.top_k == [(9, 4)]


def test_zero_validation_fraction_allows_empty_val() -> None:
    stats = tokenize("a b c", WordTokenizer(), validation_fraction=0.0, min_tokens=3)
    assert stats.n_train == 3
    assert stats.val_ids == []


def test_too_short_for_training_window() -> None:
    message = raises("needs 257", tokenize, "a " * 120, WordTokenizer(), 0.0, 100, 257)
    assert "120 tokens" in message
    assert "data.block_size" in message


def test_too_short_for_validation_window() -> None:
    # 20 tokens, 10% -> 2 validation tokens, but a window needs 5
    raises("validation part has 2 tokens", tokenize, "w " * 20, WordTokenizer(), 0.1, 10, 5)


@pytest.mark.parametrize("fraction", [-0.1, 0.6, 1.0])
def test_bad_validation_fraction(fraction: float) -> None:
    # DataConfig refuses such a fraction first; count_tokens refuses it for any other caller.
    raises("outside [0, 0.5]", count_tokens, [0, 1, 2, 3], fraction)


def test_describe_is_consistent() -> None:
    tok = WordTokenizer()
    text = "the cat the dog the cat a bird the end"  # 10 words
    stats = tokenize(text, tok, validation_fraction=0.2, top_k=2)
    info = describe(stats, tok.decode)
    assert info["n_total"] == 10
    assert info["n_train"] == 8
    assert info["n_val"] == 2
    assert info["n_unique"] == 6
    assert info["top"] == [
        {"id": tok.vocab["the"], "token": "the", "count": 4},
        {"id": tok.vocab["cat"], "token": "cat", "count": 2},
    ]
    # train: the cat the dog the cat a bird -> 5 of 8 in {the, cat}; val: the end -> 1 of 2
    assert info["p_train"] == pytest.approx(5 / 8)
    assert info["p_val"] == pytest.approx(1 / 2)
    assert json.loads(json.dumps(info)) == info


def test_stats_is_a_plain_dataclass() -> None:
    stats = CorpusStats(ids=[1, 2, 3], n_train=2, top_k=[(1, 1)], n_unique=3)
    assert stats.val_ids == [3]
    assert stats.top_set == frozenset({1})


# --- strip_gutenberg --------------------------------------------------------------------------


def test_strip_gutenberg_synthetic() -> None:
    text = (
        "The Project Gutenberg eBook of Foo\nlicence blah\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK FOO ***\n\n  Chapter 1.\nCall me X.\n\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK FOO ***\nmore licence\n"
    )
    assert strip_gutenberg(text) == "Chapter 1.\nCall me X."


def test_strip_gutenberg_variants() -> None:
    text = (
        "header\n  ***  start of this project gutenberg e-book bar ***\r\nBody text.\r\n"
        "***END OF THIS PROJECT GUTENBERG EBOOK BAR***\nfooter"
    )
    assert strip_gutenberg(text) == "Body text."


def test_strip_gutenberg_without_markers_unchanged() -> None:
    text = "  just some text\nthat mentions *** START OF nothing ***\n"
    assert strip_gutenberg(text) == text


def test_strip_gutenberg_ignores_marker_words_inside_a_sentence() -> None:
    text = "He said *** START OF THE PROJECT GUTENBERG EBOOK *** aloud.\nMore."
    assert strip_gutenberg(text) == text


@pytest.mark.skipif(not MOBY.is_file(), reason="shared Moby-Dick file not present")
def test_strip_gutenberg_moby_dick() -> None:
    text, desc = read_corpus(str(MOBY))
    assert "utf-8" in desc
    assert not text.startswith("\ufeff")
    assert "\r" not in text
    body = strip_gutenberg(text)
    assert body.startswith("MOBY-DICK;\n\nor, THE WHALE.")
    assert "The Project Gutenberg eBook" not in body[:1000]
    assert "END OF THE PROJECT GUTENBERG" in text
    assert "END OF THE PROJECT GUTENBERG" not in body
    assert "Project Gutenberg" not in body[-3000:]
    assert len(body) < len(text)


# --- local files ----------------------------------------------------------------------------


def test_reads_utf8_with_bom_and_normalises_line_endings(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_bytes(b"\xef\xbb\xbfone\r\ntwo\rthree\nfour \xe2\x80\x94 five\r\n")
    text, desc = read_corpus(str(path))
    assert text == "one\ntwo\nthree\nfour \u2014 five\n"
    assert str(path) in desc


def test_missing_file(tmp_path: Path) -> None:
    raises("does not exist", read_corpus, str(tmp_path / "nope.txt"))


def test_directory(tmp_path: Path) -> None:
    raises("is a directory", read_corpus, str(tmp_path))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read anything")
def test_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "secret.txt"
    path.write_text("hello")
    path.chmod(0)
    try:
        raises("permission denied", read_corpus, str(path))
    finally:
        path.chmod(0o644)


def test_unreadable_simulated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Same path as test_unreadable, but also runs as root (where chmod 0 does not stop reads).
    path = tmp_path / "secret.txt"
    path.write_text("hello")

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    message = raises("permission denied", read_corpus, str(path))
    assert "is not readable (" in message


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "e.txt"
    path.write_bytes(b"")
    raises("is empty", read_corpus, str(path))


def test_whitespace_only(tmp_path: Path) -> None:
    path = tmp_path / "w.txt"
    path.write_bytes(b"\xef\xbb\xbf  \r\n\t\n")
    raises("only whitespace", read_corpus, str(path))


def test_binary(tmp_path: Path) -> None:
    path = tmp_path / "b.bin"
    path.write_bytes(b"PK\x03\x04\x00\x00abc")
    raises("looks binary", read_corpus, str(path))


def test_cp1252_gives_hint_then_reads(tmp_path: Path) -> None:
    path = tmp_path / "win.txt"
    data = "line one\n\u201cquoted\u201d caf\u00e9\r\n".encode("cp1252")
    path.write_bytes(data)
    message = raises("not UTF-8", read_corpus, str(path))
    assert "offset 9" in message  # first byte of line 2 is the 0x93 left quote
    assert "line 2" in message
    assert "--encoding cp1252" in message
    assert "likely cp1252" in message
    text, desc = read_corpus(str(path), encoding="cp1252")
    assert text == "line one\n\u201cquoted\u201d caf\u00e9\n"
    assert "cp1252" in desc


def test_not_cp1252_suggests_latin1(tmp_path: Path) -> None:
    path = tmp_path / "l1.txt"
    path.write_bytes(b"abc \x81 def")  # 0x81 is undefined in cp1252
    message = raises("not UTF-8", read_corpus, str(path))
    assert "latin-1" in message
    assert "likely cp1252" not in message
    text, _ = read_corpus(str(path), encoding="latin-1")
    assert text == "abc \x81 def"


def test_given_encoding_that_fails(tmp_path: Path) -> None:
    path = tmp_path / "u.txt"
    path.write_bytes(b"abc \xff def")
    raises("cannot be decoded as ascii", read_corpus, str(path), encoding="ascii")


def test_unknown_encoding(tmp_path: Path) -> None:
    path = tmp_path / "u.txt"
    path.write_text("hello")
    raises("unknown text encoding", read_corpus, str(path), encoding="no-such-codec")


def test_utf16_allowed_when_named(tmp_path: Path) -> None:
    path = tmp_path / "u16.txt"
    path.write_bytes("hi\r\nthere".encode("utf-16"))
    raises("looks binary", read_corpus, str(path))
    text, _ = read_corpus(str(path), encoding="utf-16")
    assert text == "hi\nthere"


# --- gutenberg download ---------------------------------------------------------------------


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PFREEZE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PFREEZE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "pfreeze"


def test_gutenberg_downloads_once_and_caches(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PFREEZE_CACHE", str(tmp_path))
    calls: list[str] = []

    def fake_download(url: str) -> bytes:
        calls.append(url)
        return b"\xef\xbb\xbfHeader\r\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\nBody\r\n"

    text, desc = read_corpus("gutenberg:2701", download=fake_download)
    assert calls == [GUTENBERG_URL.format(id=2701)]
    assert calls[0] == "https://www.gutenberg.org/cache/epub/2701/pg2701.txt"
    cached = tmp_path / "gutenberg" / "pg2701.txt"
    assert cached.is_file()
    assert text.startswith("Header\n")
    assert "gutenberg:2701" in desc
    assert strip_gutenberg(text) == "Body"
    assert [p.name for p in cached.parent.iterdir()] == ["pg2701.txt"]  # no temp files left

    def must_not_download(url: str) -> bytes:
        raise AssertionError("downloaded again")

    text2, _ = read_corpus("gutenberg:2701", download=must_not_download)
    assert text2 == text


def test_gutenberg_download_failure_gives_corpus_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PFREEZE_CACHE", str(tmp_path))

    def offline(url: str) -> bytes:
        raise OSError("[Errno -3] Temporary failure\nin name resolution")

    message = raises("could not download", read_corpus, "gutenberg:11", download=offline)
    assert GUTENBERG_URL.format(id=11) in message
    assert "--corpus PATH" in message
    assert "data.corpus=PATH" in message
    assert not (tmp_path / "gutenberg" / "pg11.txt").exists()


def test_gutenberg_html_page_is_not_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PFREEZE_CACHE", str(tmp_path))
    html = b"<!DOCTYPE html><html><body>Too many requests</body></html>"
    raises(
        "did not return a plain-text book", read_corpus, "gutenberg:5", download=lambda url: html
    )
    assert not (tmp_path / "gutenberg" / "pg5.txt").exists()


def test_gutenberg_bad_id() -> None:
    raises("book number", read_corpus, "gutenberg:moby")


def test_default_download_is_urllib_with_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    class Response:
        def __enter__(self) -> Response:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

        def read(self) -> bytes:
            return b"ok"

    def fake_urlopen(request, timeout):  # noqa: ANN001
        seen["url"] = request.full_url
        seen["timeout"] = timeout
        return Response()

    monkeypatch.setattr(corpus.urllib.request, "urlopen", fake_urlopen)
    assert corpus._default_download("https://example.invalid/x") == b"ok"
    assert seen == {"url": "https://example.invalid/x", "timeout": 30}


def test_broken_cache_file_says_how_to_refetch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PFREEZE_CACHE", str(tmp_path))
    cached = tmp_path / "gutenberg" / "pg7.txt"
    cached.parent.mkdir()
    cached.write_bytes(b"")
    message = raises("is empty", read_corpus, "gutenberg:7", download=lambda url: b"unused")
    assert f"delete {cached}" in message


def test_strip_gutenberg_start_marker_only() -> None:
    text = "licence\n*** START OF THE PROJECT GUTENBERG EBOOK Z ***\nBody only\n"
    assert strip_gutenberg(text) == "Body only"
