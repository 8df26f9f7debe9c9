"""A corpus's documents as one token stream: tokenised once, cached, split into train and
held-out text.

The stream is each document's tokens in order, every document but the last tokenised with
data.document_separator appended, so a corpus of one text is that text's tokens exactly and
a folder of files is the tokens of its files joined by the separator (for tokenizers that do
not merge across the joint: a byte tokenizer never does, a BPE one at most at the joint).

The cache is keyed by content: the documents, the separator and the tokenizer itself (its
whole vocabulary and rules), so an edited file, another model or another separator is a
miss and the same corpus under another path is a hit. It lives in cache_dir()/tokens/
($PFREEZE_CACHE, else ~/.cache/pfreeze) as safetensors.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any, Literal

import torch

from pfreeze.atomic import atomic_write
from pfreeze.data.corpus import CorpusStats, Tokenizer, cache_dir, count_tokens
from pfreeze.data.formats import Documents, render_chats
from pfreeze.errors import PfreezeError
from pfreeze.settings import DataConfig

_VERSION = b"pfreeze-tokens-1"
# token_cache=auto caches corpora from this many characters on (Moby-Dick has 1.2 M); a bar
# shows from the same size, where tokenising takes seconds.
AUTO_CACHE_CHARS = 1_000_000
PROGRESS_CHARS = 1_000_000


def fingerprint(tokenizer: Any) -> str:
    """What a tokenizer does, as a hash: its class and, for a transformers tokenizer, its
    full serialised rules and vocabulary."""
    h = hashlib.sha256(f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}".encode())
    hf = getattr(tokenizer, "tok", None)
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    elif hf is not None and hasattr(hf, "get_vocab"):
        h.update(repr(sorted(hf.get_vocab().items())).encode())
    return h.hexdigest()


def cache_key(pieces: list[str], tokenizer: Any) -> str:
    h = hashlib.sha256(_VERSION)
    h.update(fingerprint(tokenizer).encode())
    for piece in pieces:  # length-prefixed: no two document lists hash alike
        data = piece.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:40]


def cache_path(key: str) -> Path:
    return cache_dir() / "tokens" / f"{key}.safetensors"


def encode_documents(texts: list[str], tokenizer: Tokenizer, separator: str = "\n\n",
                     cache: bool | Literal["auto"] = "auto") -> tuple[list[int], list[int]]:
    """(token ids of the whole stream, tokens per document); from the cache where it holds
    this content, else tokenised (with a progress bar on a long corpus) and cached."""
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    pieces = [t + separator for t in texts[:-1]] + texts[-1:]
    total = sum(len(p) for p in pieces)
    use = cache is True or (cache == "auto" and total >= AUTO_CACHE_CHARS)
    path = cache_path(cache_key(pieces, tokenizer)) if use else None
    if path is not None and path.is_file():
        try:
            held = load_file(str(path))
            return held["ids"].tolist(), held["lengths"].tolist()
        except Exception:  # a damaged cache file is made again below
            pass
    ids: list[int] = []
    lengths: list[int] = []
    with tqdm(total=total, unit="char", unit_scale=True, desc="tokenizing", leave=False,
              disable=total < PROGRESS_CHARS) as bar:
        for piece in pieces:
            part = [int(t) for t in tokenizer.encode(piece)]
            ids.extend(part)
            lengths.append(len(part))
            bar.update(len(piece))
    if path is not None:
        tensors = {"ids": torch.tensor(ids, dtype=torch.int64),
                   "lengths": torch.tensor(lengths, dtype=torch.int64)}
        with contextlib.suppress(OSError):  # the cache saves time only: an unwritable one
            atomic_write(path, lambda p: save_file(tensors, str(p)))  # costs nothing else
    return ids, lengths


def documents_n_val(lengths: list[int], fraction: float) -> int:
    """Tokens of the last whole documents whose sum is nearest `fraction` of the stream
    (at least one document on each side)."""
    if fraction == 0:
        return 0
    if len(lengths) < 2:
        raise PfreezeError("data.validation_split=documents needs at least 2 documents; the "
                           "corpus is one",
                           "use data.validation_split=tail, or a corpus of several documents")
    target = sum(lengths) * fraction
    tail, best = 0, None
    for k in range(1, len(lengths)):
        tail += lengths[-k]
        if best is None or abs(tail - target) < abs(best - target):
            best = tail
        if tail >= target:
            break
    return int(best or 0)


def tokenize_documents(docs: Documents, tokenizer: Tokenizer, data: DataConfig,
                       min_tokens: int = 2) -> CorpusStats:
    """The corpus statistics (ids, split, top-k) of `docs` as data asks: chats rendered with
    the chat template, held-out text by tail or by whole documents."""
    texts = render_chats(docs, tokenizer, data.chat_template) if docs.chats else docs.texts
    ids, lengths = encode_documents(texts, tokenizer, data.document_separator,
                                    data.token_cache)
    n_val = (documents_n_val(lengths, data.validation_fraction)
             if data.validation_split == "documents" else None)
    stats = count_tokens(ids, data.validation_fraction, data.top_k, min_tokens, n_val)
    stats.n_documents = len(lengths)
    return stats
