"""Every shape a corpus can come in, read into documents (texts, or chats to be rendered).

    a text file, gutenberg:<id>   one document (pfreeze.data.corpus reads it)
    a folder                      every *.txt and *.md below it, one document each, in the
                                  order of their relative paths (hidden files skipped)
    .jsonl .json .csv .parquet    one document per row: its `text_field`, or its `messages`
    a saved dataset folder        (datasets' save_to_disk) the same; a DatasetDict's train split
    hf:<id>                       a hub dataset's train split, where the hub is reachable

Rows with a `messages` list (and no `text_field`) are conversations: the model's chat
template, or data.chat_template, renders each into one document. Structured files are read
by the `datasets` library; what it reports as a failure is turned into one line that names
the file and, for JSONL, the line.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pfreeze.data.corpus import (
    Undecodable,
    cache_dir,
    read_corpus,
    read_text,
    strip_gutenberg,
)
from pfreeze.errors import PfreezeError
from pfreeze.settings import DataConfig

STRUCTURED = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
TEXT_SUFFIXES = (".txt", ".md")
HUB = "hf:"
MESSAGES = "messages"
_LOCAL_FIX = ("download it where the hub is reachable (datasets.load_dataset(...).save_to_disk"
              "(DIR)) and pass DIR, or pass a local file")


@dataclass
class Documents:
    """What a corpus holds before tokenisation: texts, or conversations (lists of messages)."""

    source: str
    texts: list[str] = field(default_factory=list)
    chats: list[list[dict[str, Any]]] = field(default_factory=list)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def read_documents(data: DataConfig) -> Documents:
    """The corpus of `data` as documents (Gutenberg boilerplate stripped where asked)."""
    docs = _read(data.corpus, data.text_field, data.encoding)
    if data.strip_gutenberg:
        docs.texts = [strip_gutenberg(t) for t in docs.texts]
    return docs


def _read(spec: str, text_field: str, encoding: str | None) -> Documents:
    if spec.startswith(HUB):
        return _from_hub(spec[len(HUB):].strip(), text_field)
    path = Path(spec).expanduser()
    if path.is_dir():
        if _is_saved_dataset(path):
            return _from_disk(path, text_field)
        return _from_folder(path, encoding)
    builder = STRUCTURED.get(path.suffix.lower())
    if builder is not None and path.is_file():
        return _from_file(path, builder, text_field, encoding)
    text, source = read_corpus(spec, encoding)
    return Documents(source, texts=[text])


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "dataset_info.json").is_file() and (path / "state.json").is_file())


def _from_folder(root: Path, encoding: str | None) -> Documents:
    def visible(p: Path) -> bool:
        return not any(part.startswith(".") for part in p.relative_to(root).parts)

    files = sorted((p for p in root.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES
                    and p.is_file() and visible(p)), key=lambda p: p.relative_to(root).as_posix())
    texts, used = [], set()
    for path in files:
        try:
            text, codec = read_text(path, encoding)
        except Undecodable as exc:
            if not texts:
                raise
            raise PfreezeError(
                f"{exc.problem}, while the {len(texts)} file(s) before it in {root} decoded",
                f"every file of a folder is read with one encoding ({encoding or 'utf-8'}): "
                f"convert that file to it, e.g. iconv -f {exc.guess} -t {encoding or 'utf-8'} "
                f"{path.name}") from None
        if not text.strip():
            continue  # an empty note in a folder of texts is no reason to stop
        texts.append(text)
        used.add(codec)
    if not texts:
        raise PfreezeError(
            f"corpus folder {root} holds no text files (*.txt or *.md with text, searched "
            "recursively)", "put the texts there as .txt or .md files, or pass one file")
    return Documents(f"{root} ({len(texts)} files, {', '.join(sorted(used))})", texts=texts)


def _datasets() -> Any:
    import datasets

    datasets.disable_progress_bars()  # a corpus of a few files is read in a blink
    # Its JSON reader logs each parse failure before raising it; pfreeze reports the failure
    # in its own one line.
    logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)
    return datasets


def _from_file(path: Path, builder: str, text_field: str, encoding: str | None) -> Documents:
    if encoding not in (None, "utf-8", "utf8"):
        raise PfreezeError(f"{path}: data.encoding={encoding} applies to text files only",
                           f"convert {path.name} to UTF-8, or drop data.encoding")
    if path.stat().st_size == 0:
        raise PfreezeError(f"corpus file {path} is empty", "pass a file that holds rows")
    ds = _datasets()
    try:
        rows = ds.load_dataset(builder, data_files=str(path), split="train",
                               cache_dir=str(cache_dir() / "datasets"))
        # pyarrow keeps bytes that are not UTF-8 until a value is read: inside the try too.
        return _rows(rows, text_field, str(path))
    except PfreezeError:
        raise
    except Exception as exc:  # datasets wraps each parser's own error types
        if builder == "json":  # datasets names neither the line nor the file of a parse
            _check_json(path)  # error: read the file again only to find them
        cause = exc.__cause__ or exc
        raise PfreezeError(f"cannot read {path} as {builder.upper()} "
                           f"({type(cause).__name__}: {_one_line(cause)})",
                           f"check that it is valid {builder.upper()} with a header/keys of "
                           "column names") from None


def _check_json(path: Path) -> None:
    """Raise, naming the line, where a .jsonl line (or a .json file) is not JSON (or not
    UTF-8, or a .jsonl line not an object); return where every line is."""
    try:
        text, _ = read_text(path, None)
    except Undecodable as exc:  # other refusals (binary, unreadable) keep their own fix
        raise PfreezeError(exc.problem, "JSON is read as UTF-8: convert the file to it "
                           "(e.g. iconv -f cp1252 -t utf-8)") from None
    if path.suffix.lower() == ".json":
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            raise PfreezeError(f"{path} is not JSON (line {e.lineno}, column {e.colno}: "
                               f"{e.msg})", "fix the file there") from None
        return
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PfreezeError(f"{path} line {number} is not JSON ({e.msg}, column {e.colno})",
                               "fix or remove that line: each line of a .jsonl file is one "
                               "JSON object") from None
        if not isinstance(row, dict):
            raise PfreezeError(f"{path} line {number} is a JSON {type(row).__name__}, not an "
                               "object", 'write each row as an object, e.g. {"text": "..."}')


def _from_disk(path: Path, text_field: str) -> Documents:
    ds = _datasets()
    try:
        saved = ds.load_from_disk(str(path))
    except Exception as exc:
        raise PfreezeError(f"cannot load the saved dataset {path} ({_one_line(exc)})",
                           "save it again with Dataset.save_to_disk") from None
    return _rows(_train_split(saved, str(path)), text_field, str(path))


def _from_hub(name: str, text_field: str) -> Documents:
    ds = _datasets()
    try:
        loaded = ds.load_dataset(name, cache_dir=str(cache_dir() / "datasets"))
    except Exception as exc:  # offline, unknown id, gated: all mean "not from here"
        raise PfreezeError(f"could not load hub dataset {name!r} ({type(exc).__name__}: "
                           f"{_one_line(exc)})", _LOCAL_FIX) from None
    return _rows(_train_split(loaded, f"{HUB}{name}"), text_field, f"{HUB}{name}")


def _train_split(loaded: Any, where: str) -> Any:
    if not hasattr(loaded, "keys"):  # a Dataset, not a DatasetDict
        return loaded
    splits = list(loaded.keys())
    if "train" in splits or len(splits) == 1:
        return loaded["train" if "train" in splits else splits[0]]
    raise PfreezeError(f"{where} has the splits {', '.join(splits)} and no 'train' split",
                       "save the split to train on alone (dataset[NAME].save_to_disk(DIR)) "
                       "and pass DIR")


def _rows(rows: Any, text_field: str, where: str) -> Documents:
    columns = list(rows.column_names)
    if len(rows) == 0:
        raise PfreezeError(f"{where} has no rows", "pass a dataset that holds text")
    if text_field in columns:
        texts = []
        for i, value in enumerate(rows[text_field]):
            if not isinstance(value, str):
                what = "missing" if value is None else f"{type(value).__name__}, not text"
                raise PfreezeError(f"{where} row {i + 1}: field {text_field!r} is {what}",
                                   "give every row text in that field")
            texts.append(value.replace("\r\n", "\n"))
        return Documents(f"{where} ({len(texts)} rows, field {text_field!r})", texts=texts)
    if MESSAGES in columns:
        chats = [_messages(m, i, where) for i, m in enumerate(rows[MESSAGES])]
        return Documents(f"{where} ({len(chats)} conversations)", chats=chats)
    raise PfreezeError(f"{where} has no field {text_field!r} (its fields: {', '.join(columns)})",
                       "set data.text_field to the field that holds the text (or give rows "
                       f"a {MESSAGES!r} list of {{role, content}} for chat data)")


def _messages(value: Any, i: int, where: str) -> list[dict[str, Any]]:
    ok = isinstance(value, list) and value and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value)
    if not ok:
        raise PfreezeError(f"{where} row {i + 1}: {MESSAGES!r} is not a list of "
                           "{role, content} objects",
                           'write it as [{"role": "user", "content": "..."}, ...]')
    # Arrow gives every message every key any message has; the absent ones come back None.
    return [{k: v for k, v in m.items() if v is not None} for m in value]


def render_chats(docs: Documents, tokenizer: Any, template: str | None) -> list[str]:
    """Each conversation as the text its chat template makes of it: `template` (a Jinja
    template, or a file holding one), else the tokenizer's own."""
    hf = getattr(tokenizer, "tok", None)  # pfreeze.models.load.HFTokenizer's transformers one
    if template is not None and "{" not in template:
        path = Path(template).expanduser()
        if not path.is_file():
            raise PfreezeError(f"data.chat_template {template!r} is neither a Jinja template "
                               "nor a file", "pass the template text or the path of a file")
        template = path.read_text(encoding="utf-8")
    template = template or getattr(hf, "chat_template", None)
    if not template:
        raise PfreezeError(f"{docs.source} holds chat messages, but the model's tokenizer has "
                           "no chat template to render them",
                           "set data.chat_template to a Jinja chat template (text or file), "
                           "use a model that has one (an -Instruct model), or give the rows a "
                           "text field")
    texts = []
    for i, chat in enumerate(docs.chats):
        try:
            if hf is not None and hasattr(hf, "apply_chat_template"):
                texts.append(hf.apply_chat_template(chat, tokenize=False,
                                                    chat_template=template))
            else:
                from transformers.utils.chat_template_utils import render_jinja_template

                texts.append(render_jinja_template([chat], chat_template=template)[0][0])
        except Exception as exc:  # a template error is jinja's or the template's own raise
            raise PfreezeError(f"the chat template failed on conversation {i + 1} of "
                               f"{docs.source} ({type(exc).__name__}: {_one_line(exc)})",
                               "fix that row's messages or data.chat_template") from None
    return texts
