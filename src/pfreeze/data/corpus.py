"""Read a plain-text corpus, strip Project Gutenberg boilerplate and count its tokens.

Here a corpus is a local text file or `gutenberg:<id>` (folders, JSONL, CSV, Parquet, saved
and hub datasets: pfreeze.data.formats, which reads text files through this module). Every way
the input can be wrong raises a PfreezeError that says what is wrong and what to pass instead,
because a bad corpus otherwise shows up much later as a confusing tokeniser or training
failure.
"""

from __future__ import annotations

import codecs
import os
import re
import urllib.request
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from pfreeze.atomic import write_bytes
from pfreeze.errors import PfreezeError

GUTENBERG_URL = "https://www.gutenberg.org/cache/epub/{id}/pg{id}.txt"

_UTF8_BOM = b"\xef\xbb\xbf"
_DOWNLOAD_TIMEOUT_S = 30
_OFFLINE_FIX = "pass a local text file with --corpus PATH (or --set data.corpus=PATH)"


def _marker(word: str) -> re.Pattern[str]:
    # Marker lines vary between releases ("THE"/"THIS", "EBOOK"/"E-BOOK", case, spacing), so
    # match loosely; anchoring to whole lines keeps a sentence that mentions them from matching.
    words = r"[ \t]+".join([word, "OF", "(?:THE|THIS)", "PROJECT", "GUTENBERG"])
    return re.compile(rf"^[ \t]*\*{{3}}[ \t]*{words}[^\n]*$", re.IGNORECASE | re.MULTILINE)


_START_RE = _marker("START")
_END_RE = _marker("END")


class Tokenizer(Protocol):
    """Anything that turns text into token ids (a Hugging Face tokenizer fits)."""

    def encode(self, text: str) -> list[int]: ...


def cache_dir() -> Path:
    """Where downloads are kept: $PFREEZE_CACHE, else ~/.cache/pfreeze."""
    env = os.environ.get("PFREEZE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pfreeze"


def _one_line(text: str) -> str:
    # Exception texts (e.g. from urllib) can span lines; the CLI promises one-line errors.
    return " ".join(str(text).split())


def _default_download(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "pfreeze"})
    with urllib.request.urlopen(request, timeout=_DOWNLOAD_TIMEOUT_S) as response:
        return response.read()


class Undecodable(PfreezeError):
    """A text file its encoding cannot decode; `guess`: the encoding it likely is."""

    def __init__(self, problem: str, fix: str, guess: str) -> None:
        super().__init__(problem, fix)
        self.guess = guess


def _decode(data: bytes, path: Path, encoding: str | None) -> tuple[str, str]:
    """Decode file bytes; return (text, encoding used). Never guesses an encoding silently."""
    if encoding is None:
        # Strip the BOM by hand rather than via utf-8-sig, so error offsets count file bytes.
        skip = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
        try:
            return data[skip:].decode("utf-8"), "utf-8"
        except UnicodeDecodeError as exc:
            offset = exc.start + skip
            line = data.count(b"\n", 0, offset) + 1
            problem = (
                f"corpus file {path} is not UTF-8 (byte 0x{data[offset]:02x} at offset {offset},"
                f" line {line})"
            )
            try:
                data.decode("cp1252")
            except UnicodeDecodeError:
                # cp1252 leaves five bytes undefined; latin-1 decodes any byte at all.
                guess, fix = "latin-1", "pass its real encoding, e.g. --encoding latin-1"
            else:
                guess, fix = "cp1252", "it is likely cp1252 (Windows): pass --encoding cp1252"
            raise Undecodable(problem, fix, guess) from None
    try:
        return data.decode(encoding), encoding
    except UnicodeDecodeError as exc:
        raise Undecodable(
            f"corpus file {path} cannot be decoded as {encoding} "
            f"(byte 0x{data[exc.start]:02x} at offset {exc.start})",
            "pass the file's real encoding with --encoding NAME", "latin-1",
        ) from None


def _read_local(path: Path, encoding: str | None) -> tuple[str, str]:
    """A plain-text file's text and a description naming its encoding; an empty or blank
    file is refused."""
    text, used = read_text(path, encoding)
    if not text and path.stat().st_size == 0:
        raise PfreezeError(f"corpus file {path} is empty", "pass a file that contains text")
    if not text.strip():
        raise PfreezeError(f"corpus file {path} contains only whitespace", "pass a real text")
    return text, f"{path} ({used})"


def read_text(path: Path, encoding: str | None) -> tuple[str, str]:
    """A plain-text file's text (BOM dropped, line endings as \\n; possibly blank) and the
    encoding it was decoded with. Unreadable, binary or undecodable files are refused."""
    codec = "utf-8"
    if encoding is not None:
        try:
            codec = codecs.lookup(encoding).name
        except LookupError:
            raise PfreezeError(
                f"unknown text encoding {encoding!r}",
                "use a Python codec name such as utf-8, cp1252 or latin-1",
            ) from None
    if not path.exists():
        raise PfreezeError(
            f"corpus file {path} does not exist",
            "check the path, or use --corpus gutenberg:<id> to download a book",
        )
    if path.is_dir():
        raise PfreezeError(f"corpus path {path} is a directory", "pass one plain-text file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        why = "permission denied" if isinstance(exc, PermissionError) else exc.strerror or exc
        raise PfreezeError(
            f"corpus file {path} is not readable ({_one_line(why)})",
            "fix its permissions (chmod u+r) or copy it somewhere readable",
        ) from None
    # NUL bytes mean a binary file (or UTF-16/32, which legitimately contain them).
    nul = data.find(b"\x00")
    if nul >= 0 and not codec.startswith(("utf-16", "utf-32")):
        raise PfreezeError(
            f"corpus file {path} looks binary (NUL byte at offset {nul})",
            "pass a plain-text file (if it is UTF-16, pass --encoding utf-16)",
        )
    text, used = _decode(data, path, encoding)
    # A BOM is never content, whichever encoding produced it.
    text = text.removeprefix("\ufeff")
    # Tokenisers treat "\r\n" and "\n" differently; one line-ending style keeps counts stable.
    return text.replace("\r\n", "\n").replace("\r", "\n"), used


def _read_gutenberg(
    book: str, spec: str, encoding: str | None, download: Callable[[str], bytes] | None
) -> tuple[str, str]:
    if not book.isdigit() or int(book) == 0:
        raise PfreezeError(
            f"corpus {spec!r} has no valid Project Gutenberg book number",
            "write gutenberg:<number>, e.g. gutenberg:2701",
        )
    book_id = int(book)
    url = GUTENBERG_URL.format(id=book_id)
    path = cache_dir() / "gutenberg" / f"pg{book_id}.txt"
    origin = "cached"
    if not path.is_file():
        try:
            data = (download or _default_download)(url)
        # Offline, DNS, TLS, HTTP status, timeout: urllib raises many unrelated types, and all
        # of them mean the same thing to the user.
        except Exception as exc:
            raise PfreezeError(
                f"could not download {url} ({type(exc).__name__}: {_one_line(exc)})",
                _OFFLINE_FIX,
            ) from None
        # Never cache an empty body or an HTML error page: it would poison every later run.
        head = data[:512].lstrip(_UTF8_BOM + b" \t\r\n").lower()
        if not data.strip() or head.startswith((b"<!doctype", b"<html")):
            raise PfreezeError(f"{url} did not return a plain-text book", _OFFLINE_FIX)
        try:
            write_bytes(path, data)
        except OSError as exc:
            raise PfreezeError(
                f"could not write the download cache {path}: {_one_line(exc.strerror or exc)}",
                "set PFREEZE_CACHE to a writable folder",
            ) from None
        origin = f"downloaded from {url}"
    try:
        text, desc = _read_local(path, encoding)
    except PfreezeError as exc:
        # The cache file is not the user's own text: also tell them how to refetch it.
        fix = f"{exc.fix} (or delete {path} to download it again)"
        raise PfreezeError(exc.problem, fix) from None
    return text, f"gutenberg:{book_id} {desc}, {origin}"


def read_corpus(
    spec: str, encoding: str | None = None, *, download: Callable[[str], bytes] | None = None
) -> tuple[str, str]:
    """Read a local path or 'gutenberg:<id>'; return (text, source_description).

    Books are cached under cache_dir()/gutenberg/ so a run downloads at most once. `download`
    replaces the network fetch (tests, proxies). Line endings come back as LF.
    """
    prefix, sep, rest = spec.partition(":")
    if sep and prefix.strip().lower() == "gutenberg":
        return _read_gutenberg(rest.strip(), spec, encoding, download)
    return _read_local(Path(spec).expanduser(), encoding)


def strip_gutenberg(text: str) -> str:
    """Return the text between the Gutenberg START/END marker lines, stripped.

    Text without markers comes back unchanged; with one marker, only that side is cut.
    """
    start = _START_RE.search(text)
    begin = start.end() if start else 0
    end = _END_RE.search(text, begin)
    if start is None and end is None:
        return text
    return text[begin : end.start() if end else len(text)].strip()


@dataclass
class CorpusStats:
    ids: list[int]  # all token ids of the (stripped) text, in order
    n_train: int  # the first n_train ids are training text, the rest validation
    top_k: list[tuple[int, int]]  # (token_id, count), most frequent first, ties by smaller id
    n_unique: int
    n_documents: int = 1  # documents the stream was made of (pfreeze.data.tokens)

    @property
    def n_total(self) -> int:
        return len(self.ids)

    @property
    def train_ids(self) -> list[int]:
        return self.ids[: self.n_train]

    @property
    def val_ids(self) -> list[int]:
        return self.ids[self.n_train :]

    @property
    def top_set(self) -> frozenset[int]:
        return frozenset(token for token, _ in self.top_k)

    def frequency_table(self) -> list[tuple[int, int]]:
        """Every (id, count), sorted like top_k."""
        return _ranked(Counter(self.ids))


def _ranked(counts: Counter[int]) -> list[tuple[int, int]]:
    # Explicit tie-break by id so the table is identical across runs and Python versions.
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def count_tokens(
    ids: list[int],
    validation_fraction: float = 0.1,
    top_k: int = 100,
    min_tokens: int = 2,
    n_val: int | None = None,
) -> CorpusStats:
    """The statistics of a token stream whose last `n_val` ids (default: the tail share
    `validation_fraction`) are validation text.

    Validation is a tail (not a random sample) so that no validation window overlaps
    training text; frequencies cover the whole stream."""
    if not 0.0 <= validation_fraction <= 0.5:
        raise PfreezeError(
            f"validation fraction {validation_fraction} is outside [0, 0.5]",
            "set data.validation_fraction between 0 (no validation) and 0.5",
        )
    n_total = len(ids)
    if n_val is None:
        n_val = round(n_total * validation_fraction)
    n_train = n_total - n_val
    if n_train < min_tokens:
        raise PfreezeError(
            f"the corpus has {n_total} tokens ({n_train} for training) but one training window"
            f" needs {min_tokens}",
            "use a longer text or lower data.block_size",
        )
    if validation_fraction > 0 and n_val < min_tokens:
        raise PfreezeError(
            f"the validation part has {n_val} tokens ({validation_fraction:g} of {n_total}) but"
            f" one window needs {min_tokens}",
            "use a longer text, raise data.validation_fraction or lower data.block_size",
        )
    counts = Counter(ids)
    return CorpusStats(ids, n_train, _ranked(counts)[: max(top_k, 0)], len(counts))


def top_share(ids: Sequence[int], top_set: Collection[int]) -> float:
    """Share of ids that are in top_set (0.0 for empty ids)."""
    if not ids:
        return 0.0
    members = top_set if isinstance(top_set, (set, frozenset)) else frozenset(top_set)
    return sum(1 for token in ids if token in members) / len(ids)


def describe(stats: CorpusStats, decode: Callable[[list[int]], str]) -> dict[str, Any]:
    """A JSON-able summary of the corpus: sizes, the top tokens, and their train/val share."""
    top = stats.top_set
    return {
        "n_total": stats.n_total,
        "n_documents": stats.n_documents,
        "n_unique": stats.n_unique,
        "n_train": stats.n_train,
        "n_val": stats.n_total - stats.n_train,
        "top": [{"id": t, "token": decode([t]), "count": c} for t, c in stats.top_k],
        "p_train": top_share(stats.train_ids, top),
        "p_val": top_share(stats.val_ids, top),
    }


class BatchStream:
    """Seeded windows of the training tokens, drawn one batch at a time.

    random   windows start anywhere (every step sees new text; nothing repeats exactly)
    epochs   the text cut into aligned chunks of `block` tokens, shuffled anew each epoch
             (seeded by seed and epoch number): every chunk once per epoch, the same chunk
             ids again in later epochs, which is what lets a frozen prefix be cached
    `windows` holds the last batch's chunk ids (epochs) or None (random).
    """

    def __init__(self, ids: list[int], block: int, batch: int, seed: int,
                 sampling: str = "random") -> None:
        self.ids = torch.tensor(ids, dtype=torch.long)
        self.block, self.batch, self.seed, self.sampling = block, batch, seed, sampling
        if len(self.ids) < block:
            raise PfreezeError(
                f"the training text has {len(self.ids)} tokens, fewer than one window "
                f"(data.block_size={block})",
                "use a longer corpus or a smaller data.block_size",
            )
        if batch * block > len(self.ids):
            raise PfreezeError(
                f"one batch ({batch} windows x {block} tokens) is larger than the whole "
                f"training text ({len(self.ids)} tokens)",
                "lower training.per_device_train_batch_size or data.block_size, or use a "
                "longer corpus",
            )
        self.gen = torch.Generator().manual_seed(seed)
        self.offsets = torch.arange(block)
        self.n_chunks = len(self.ids) // block
        self.drawn = 0  # windows handed out so far (the epochs mode's whole state)
        self.windows: torch.Tensor | None = None
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, its chunk order)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:  # drawn once per epoch
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(self.n_chunks, generator=g))
        return self._order[1]

    def next(self) -> torch.Tensor:
        if self.sampling == "epochs":
            # Stateless given `drawn`: a resumed run rebuilds the same order from the count.
            pos = torch.arange(self.drawn, self.drawn + self.batch)
            chunks = torch.cat([self._epoch_order(int(e))
                                for e in torch.unique(pos // self.n_chunks)])
            first = int(pos[0] // self.n_chunks) * self.n_chunks
            self.windows = chunks[pos - first]
            starts = self.windows * self.block
        else:
            starts = torch.randint(0, len(self.ids) - self.block + 1, (self.batch,),
                                   generator=self.gen)
        self.drawn += self.batch
        # On the host; the loop's Staging copies it to the GPU.
        return self.ids[starts[:, None] + self.offsets]
