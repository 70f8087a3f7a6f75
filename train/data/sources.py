"""Text sources: where documents come from (embedded, local files, Hugging Face datasets).

Every source yields plain `str` documents lazily, so a corpus larger than memory streams
through tokenization, and describes itself (cheaply or fully, see fingerprint.py) for cache keys.

Documents per file type:
- `.txt`: cut at blank lines into documents of about TXT_DOC_CHARS characters (consecutive
  paragraphs are joined until a document reaches that size). A file with no blank lines (each
  State of the Union address is one line) is one document; tinyshakespeare gives ~270.
- `.jsonl` (and `.json` holding one object per line): one document per line, the `text_field`.
- `.json` holding a list: one document per element, the `text_field`.
- `.parquet`: one document per row of the `text_field` column.
Empty or whitespace-only documents are dropped.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from train.data.embedded import embedded_description, embedded_docs
from train.data.errors import DataError
from train.data.fingerprint import TEXT_SUFFIXES, file_entry, resolve_paths

TXT_DOC_CHARS = 4096
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n(?:[ \t\r\f\v]*\n)*")


@dataclass
class TextSource:
    """A lazily read stream of documents plus its description for cache keys."""

    name: str                                   # for messages: "files", "embedded", "hf:<name>"
    key: str                                    # the config key errors about it name
    describe: Callable[[bool], dict[str, Any]]  # cheap (False) / full (True) description
    docs: Callable[[], Iterator[str]]           # a fresh iterator over the documents
    total_bytes: int | None                     # for the progress bar, when known


def decode(data: bytes, path: Path, errors: str, base_offset: int = 0) -> str:
    """UTF-8 text, or a DataError with the file and the byte offset of the first bad byte."""
    try:
        text = data.decode("utf-8", errors="strict" if errors == "error" else "replace")
    except UnicodeDecodeError as e:
        offset = base_offset + e.start
        raise DataError(str(path), f"invalid UTF-8 at byte offset {offset} "
                        f"(bytes {data[e.start:e.start + 4]!r}); fix the file, or set "
                        f"data.encoding_errors=replace to replace bad bytes with U+FFFD") from None
    return text[1:] if text.startswith("\ufeff") else text


def split_txt(text: str) -> Iterator[str]:
    """Cut at blank lines into documents of at least TXT_DOC_CHARS characters (the last may be shorter)."""
    start = 0
    for m in _BLANK_LINES.finditer(text):
        if m.start() + 1 - start >= TXT_DOC_CHARS:
            yield text[start:m.start() + 1]
            start = m.end()
    yield text[start:]


def _field(obj: Any, field: str, where: str) -> str:
    if not isinstance(obj, dict) or field not in obj:
        keys = ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(where, f"no '{field}' field (data.text_field); found: {keys}")
    value = obj[field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(where, f"field '{field}' is {type(value).__name__}, not text")
    return value


def _jsonl_docs(path: Path, field: str, errors: str) -> Iterator[str]:
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = decode(raw, path, errors, offset)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}", f"invalid JSON: {e.msg}") from None
            yield _field(obj, field, f"{path}:{lineno}")


def _json_docs(path: Path, field: str, errors: str) -> Iterator[str]:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        yield from _jsonl_docs(path, field, errors)
        return
    try:
        items = json.loads(decode(path.read_bytes(), path, errors))
    except json.JSONDecodeError as e:
        raise DataError(str(path), f"invalid JSON at line {e.lineno}: {e.msg}") from None
    for i, item in enumerate(items):
        yield _field(item, field, f"{path}[{i}]")


def _parquet_docs(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends for non-parquet bytes
        raise DataError(str(path), f"not a readable parquet file: {e}") from None
    if field not in pf.schema_arrow.names:
        raise DataError(str(path), f"no column '{field}' (data.text_field); columns: "
                        f"{', '.join(pf.schema_arrow.names)}")
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield str(value)


def file_docs(path: Path, field: str, errors: str) -> Iterator[str]:
    """The documents of one file (see the module docstring for the rules per type)."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield from split_txt(decode(path.read_bytes(), path, errors))
    elif suffix == ".jsonl":
        yield from _jsonl_docs(path, field, errors)
    elif suffix == ".json":
        yield from _json_docs(path, field, errors)
    elif suffix == ".parquet":
        yield from _parquet_docs(path, field)
    else:
        raise DataError(str(path), f"unsupported file type '{suffix}'")


def _nonempty(docs: Iterator[str]) -> Iterator[str]:
    for doc in docs:
        if doc and not doc.isspace():
            yield doc


def files_source(patterns: list[str], field: str, errors: str, key: str) -> TextSource:
    files = resolve_paths(patterns, TEXT_SUFFIXES, key)

    def describe(full: bool) -> dict[str, Any]:
        return {"kind": "files", "text_field": field, "encoding_errors": errors,
                "txt_doc_chars": TXT_DOC_CHARS, "files": [file_entry(f, full) for f in files]}

    def docs() -> Iterator[str]:
        for f in files:
            yield from _nonempty(file_docs(f, field, errors))

    return TextSource("files", key, describe, docs, sum(f.stat().st_size for f in files))


def embedded_source(max_bytes: int, key: str = "data.source") -> TextSource:
    return TextSource("embedded", key, lambda full: embedded_description(max_bytes, full),
                      lambda: embedded_docs(max_bytes), max_bytes)


def hf_source(dcfg: Any, key: str) -> TextSource:
    """A `datasets` dataset by name; `data.paths`, when given, are passed as its `data_files`
    (so `hf.name: json` with local files runs the same code path offline)."""
    h = dcfg.hf
    files = resolve_paths(dcfg.paths, (), f"{key}.paths") if dcfg.paths else []
    field = dcfg.text_field

    def describe(full: bool) -> dict[str, Any]:
        return {"kind": "hf", "name": h.name, "config": h.config, "split": h.split,
                "max_docs": h.max_docs, "text_field": field,
                "data_files": [file_entry(f, full) for f in files]}

    def docs() -> Iterator[str]:
        import datasets

        kwargs: dict[str, Any] = {"split": h.split, "streaming": h.streaming}
        if files:
            kwargs["data_files"] = [str(f) for f in files]
        try:
            ds = datasets.load_dataset(h.name, h.config, **kwargs)
        except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
            raise DataError(f"{key}.hf.name", f"cannot load dataset '{h.name}': {e}") from None
        names = ds.column_names  # None for some streaming datasets: checked on the first batch
        if names is not None and field in names:
            ds = ds.select_columns([field])
        taken = 0
        for batch in ds.iter(batch_size=1000):
            if field not in batch:
                raise DataError(f"{key}.text_field", f"dataset '{h.name}' has no column '{field}'; "
                                f"columns: {', '.join(batch)}")
            for value in batch[field]:
                if h.max_docs is not None and taken >= h.max_docs:
                    return
                taken += 1
                if isinstance(value, str) and value and not value.isspace():
                    yield value

    total = sum(f.stat().st_size for f in files) if files else None
    return TextSource(f"hf:{h.name}", f"{key}.hf", describe, docs, total)


def text_source(dcfg: Any, key: str = "data") -> TextSource:
    """The documents of one text data section (a registered source with `text = True`)."""
    from train.data.source import source

    kind = source(dcfg.source, f"{key}.source")
    if not kind.text or not hasattr(kind, "documents"):
        raise DataError(f"{key}.source", f"'{dcfg.source}' is not a text source of documents")
    return kind.documents(dcfg, key)
