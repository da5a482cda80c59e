"""Reading documents: local ``.txt`` / ``.jsonl`` (optionally ``.gz``/``.xz``/``.bz2``) / ``.parquet`` files and
folders, or Hugging Face ``datasets``, streamed as strings in a deterministic order, with counters (``ReadStats``).

Sources are strings: a path to a file or folder, or ``"hf:<name>[:<config>][@<split>][?key=value&...]"`` for
``datasets.load_dataset`` (keys: ``data_files``, ``streaming`` (default true), ``revision``). Examples::

    /data/corpus/gutenberg/train_00.jsonl.xz
    /data/corpus/gutenberg/                       # walked recursively, sorted
    hf:EleutherAI/the_pile_deduplicated@train     # streamed, so nothing is downloaded up front
    hf:json@train?data_files=/data/extra/*.jsonl

A ``.txt`` file is one document; a JSONL line, parquet row or dataset row is one document (its text field).

Bad input is an error naming the file (and line): a ``.txt`` file of which more than ``MAX_BAD_TEXT_FRACTION`` of
the characters are undecodable bytes or binary control characters, a JSONL file with more than that fraction of
undecodable lines (``allow_bad_text=True``, ``--allow-bad-text``: drop them with a warning instead), a JSONL line
that is not an object, a truncated or corrupt compressed stream (``DataFileError``).
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import logging
import lzma
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from mlkv.errors import UsageError, require_extra

logger = logging.getLogger(__name__)

HF_PREFIX = "hf:"
TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
COMPRESSION_SUFFIXES = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
#: Errors that mean "this file cannot be read" (I/O, corrupt or truncated compressed stream).
READ_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error)
#: The largest fraction of bad characters (.txt: undecodable bytes and binary control characters) or bad lines
#: (.jsonl: undecodable lines) a file may have before it is an error rather than cleaned with a warning.
MAX_BAD_TEXT_FRACTION = 0.01
#: Bytes of a ``.txt`` file that ``check_sources`` reads (its start: the whole file is read when tokenized).
CHECK_TEXT_BYTES = 1 << 16
#: Control characters that do not occur in text (NUL and the like; tab, newline, form feed and CR are text).
BINARY_CHARACTERS = re.compile("[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f]")


class DataFileError(UsageError, OSError):
    """A data file that cannot be read as text (corrupt, truncated, binary, malformed); the message names it."""


@dataclass
class ReadStats:
    """Counters filled while reading; reported in the cache meta and in ``prepare_data``'s stats."""

    files: int = 0
    documents: int = 0  # documents yielded (non-empty)
    empty_documents: int = 0  # records whose text was empty or null (skipped; they would add no tokens)
    skipped_lines: int = 0  # JSONL lines that were not valid UTF-8 (skipped)
    decode_errors: int = 0  # invalid UTF-8 bytes dropped from .txt files


@dataclass(frozen=True)
class HFSource:
    """A parsed ``hf:<name>[:<config>][@<split>][?data_files=...&streaming=...&revision=...]`` source."""

    name: str
    config: str | None = None
    split: str = "train"
    data_files: str | None = None
    streaming: bool = True
    revision: str | None = None

    @classmethod
    def parse(cls, source: str) -> HFSource:
        spec = source[len(HF_PREFIX) :]
        options: dict[str, str] = {}
        if "?" in spec:
            spec, query = spec.split("?", 1)
            for item in filter(None, query.split("&")):
                key, sep, value = item.partition("=")
                if not sep or key not in ("data_files", "streaming", "revision"):
                    raise ValueError(f"bad option {item!r} in {source!r}: use data_files=, streaming=, revision=")
                options[key] = value
        split = "train"
        if "@" in spec:
            spec, split = spec.rsplit("@", 1)
        name, _, config = spec.partition(":")
        if not name:
            raise ValueError(f"no dataset name in {source!r}: expected hf:<name>[:<config>][@<split>]")
        streaming = options.get("streaming", "true").lower() not in ("0", "false", "no")
        return cls(
            name, config or None, split or "train", options.get("data_files"), streaming, options.get("revision")
        )


def is_hf_source(source: str | os.PathLike) -> bool:
    return isinstance(source, str) and source.startswith(HF_PREFIX)


def _file_format(path: Path) -> tuple[str, Any]:
    """(format, opener) for a file name: format in {"txt", "jsonl", "parquet"}, opener opens it in binary mode."""
    suffixes = [s.lower() for s in path.suffixes]
    opener = open
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        opener = COMPRESSION_SUFFIXES[suffixes.pop()]
    last = suffixes[-1] if suffixes else ""
    if last in TEXT_SUFFIXES:
        return "txt", opener
    if last in JSONL_SUFFIXES:
        return "jsonl", opener
    if last in PARQUET_SUFFIXES and opener is open:
        return "parquet", opener
    raise ValueError(
        f"unsupported file type: {path} (supported: .txt, .jsonl, each optionally .gz/.xz/.bz2, and .parquet)"
    )


def _is_supported(path: Path) -> bool:
    try:
        _file_format(path)
    except ValueError:
        return False
    return True


def list_source_files(source: str | os.PathLike) -> list[Path]:
    """The data files of a local source: the file itself, or a folder's supported files (recursive, sorted).

    Hidden files/folders and unsupported files (README, .tsv, ...) in folders are ignored.
    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for a folder without data files.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data source not found: {path}")
    if path.is_file():
        _file_format(path)  # raises on an unsupported file type
        return [path]
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(root) / n for n in sorted(names) if not n.startswith(".") and _is_supported(Path(n))]
    files.sort()
    if not files:
        raise ValueError(f"no data files (.txt, .jsonl[.gz|.xz|.bz2], .parquet) found in folder {path}")
    return files


def read_documents(
    source: str | os.PathLike,
    text_field: str = "text",
    max_documents: int | None = None,
    stats: ReadStats | None = None,
    allow_bad_text: bool = False,
) -> Iterator[str]:
    """Stream the documents of one source (a file, a folder or ``"hf:..."``), in a deterministic order.

    A ``.txt`` file is one document; a JSONL line / parquet row / dataset row is one document (its
    ``text_field``). Empty documents are skipped and counted. ``stats`` (optional) receives the counters.
    ``allow_bad_text``: clean files with more than ``MAX_BAD_TEXT_FRACTION`` bad text (warning) instead of failing.
    """
    stats = stats if stats is not None else ReadStats()
    if max_documents is not None and max_documents <= 0:
        return
    if is_hf_source(source):
        documents = _read_hf(HFSource.parse(source), text_field, stats)
    else:
        documents = (doc for path in list_source_files(source)
                     for doc in _read_file(path, text_field, stats, allow_bad_text))
    count = 0
    try:
        for text in documents:
            count += 1
            stats.documents += 1
            yield text
            if max_documents is not None and count >= max_documents:
                return
    finally:
        documents.close()  # close the open file now, not at garbage collection
    if count == 0:
        raise ValueError(f"no documents in {source} (text field {text_field!r}; read stats so far: {asdict(stats)})")


class _Position:
    """The line a reader has reached, for errors that name it."""

    line: int = 0


def _read_file(path: Path, text_field: str, stats: ReadStats, allow_bad_text: bool = False,
               limit: int | None = None) -> Iterator[str]:
    """Documents of one local file, with read errors re-raised as ``DataFileError`` naming the file (and line).
    ``limit``: read only the first ``limit`` bytes of a ``.txt`` file (a check of its start)."""
    kind, opener = _file_format(path)
    stats.files += 1
    at = _Position()
    try:
        if kind == "parquet":
            yield from _read_parquet(path, text_field, stats)
            return
        with opener(path, "rb") as f:
            if kind == "txt":
                yield from _read_txt(io.BytesIO(f.read(limit)) if limit else f, path, stats, allow_bad_text)
            else:
                yield from _read_jsonl(f, path, text_field, stats, allow_bad_text, at)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"data file not found: {path}") from exc
    except DataFileError:
        raise
    except READ_ERRORS as exc:
        where = f" after line {at.line}" if at.line else ""
        raise DataFileError(f"cannot read data file {path}{where}: {exc}; the file is truncated or corrupt "
                            "(copy or download it again)") from exc


def _read_txt(f: IO[bytes], path: Path, stats: ReadStats, allow_bad_text: bool = False) -> Iterator[str]:
    """A whole text file as one document. Invalid UTF-8 bytes are dropped and counted; more than
    ``MAX_BAD_TEXT_FRACTION`` of bad characters (those bytes and binary control characters) is an error unless
    ``allow_bad_text``."""
    text = f.read().decode("utf-8", errors="surrogateescape")  # bad bytes -> lone surrogates U+DC80..U+DCFF
    text, n_bad = re.subn("[\udc80-\udcff]", "", text)
    n_binary = len(BINARY_CHARACTERS.findall(text))
    total = len(text) + n_bad
    if total and (n_bad + n_binary) / total > MAX_BAD_TEXT_FRACTION:
        problem = (f"{path}: {n_bad + n_binary} of {total} characters ({(n_bad + n_binary) / total:.1%}) are "
                   f"undecodable UTF-8 ({n_bad}) or binary control characters ({n_binary}): not a UTF-8 text file")
        if not allow_bad_text:
            raise DataFileError(f"{problem}; convert it to UTF-8, remove it, or pass --allow-bad-text to train on "
                                "what decodes")
        logger.warning("%s (--allow-bad-text: training on the rest)", problem)
    if n_bad:
        stats.decode_errors += n_bad
        logger.warning("%s: dropped %d bytes that are not valid UTF-8", path, n_bad)
    if text:
        yield text
    else:
        stats.empty_documents += 1


def _read_jsonl(f: IO[bytes], path: Path, text_field: str, stats: ReadStats, allow_bad_text: bool = False,
                at: _Position | None = None) -> Iterator[str]:
    """One document per JSON line. Lines that are not valid UTF-8 are skipped and counted; more than
    ``MAX_BAD_TEXT_FRACTION`` of them is an error unless ``allow_bad_text``."""
    at = at or _Position()
    skipped = lines = 0
    for lineno, raw in enumerate(f, 1):
        at.line = lineno
        if not raw.strip():
            continue
        lines += 1
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped += 1
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFileError(f"{path}, line {at.line}: invalid JSON ({exc.msg})") from None
        text = _record_text(record, text_field, f"{path}, line {at.line}")
        if text:
            yield text
        else:
            stats.empty_documents += 1
    if skipped:
        stats.skipped_lines += skipped
        problem = f"{path}: {skipped} of {lines} lines are not valid UTF-8"
        if skipped / lines > MAX_BAD_TEXT_FRACTION and not allow_bad_text:
            raise DataFileError(f"{problem}; convert the file to UTF-8 or pass --allow-bad-text to skip them")
        logger.warning("%s (skipped)", problem)


def _record_text(record: Any, text_field: str, where: str) -> str | None:
    """The text of one record (``None`` for a null value); errors name the field, ``where`` and the keys found."""
    if not isinstance(record, dict):
        raise DataFileError(f"{where}: expected a JSON object with a {text_field!r} field, got "
                            f"{type(record).__name__}")
    if text_field not in record:
        raise DataFileError(f"{where}: record has no text field {text_field!r} (keys found: {sorted(record)})")
    text = record[text_field]
    if text is not None and not isinstance(text, str):
        raise DataFileError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
    return text


def _read_parquet(path: Path, text_field: str, stats: ReadStats) -> Iterator[str]:
    """One document per row of column ``text_field``; null/empty values are skipped and counted."""
    pa = require_extra("pyarrow", "reading parquet files")
    pq = require_extra("pyarrow.parquet", "reading parquet files")

    try:
        parquet = pq.ParquetFile(path)
        columns = parquet.schema_arrow.names
        if text_field not in columns:
            raise ValueError(f"{path}: parquet file has no text field {text_field!r} (columns found: {columns})")
        for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if text:
                    yield text
                else:
                    stats.empty_documents += 1
    except pa.ArrowException as exc:  # corrupt file, wrong column type, ...
        raise DataFileError(f"cannot read parquet file {path}: {exc}") from exc


def _read_hf(spec: HFSource, text_field: str, stats: ReadStats) -> Iterator[str]:
    """Rows of a Hugging Face dataset (streamed by default, so a huge corpus is never downloaded whole)."""
    datasets = require_extra("datasets", "an hf: data source")
    dataset = datasets.load_dataset(
        spec.name,
        spec.config,
        split=spec.split,
        streaming=spec.streaming,
        data_files=spec.data_files,
        revision=spec.revision,
    )
    where = f"dataset {spec.name!r}" + (f" ({spec.config})" if spec.config else "") + f" split {spec.split!r}"
    for row_index, row in enumerate(dataset):
        text = _record_text(row, text_field, f"{where}, row {row_index}")
        if text:
            yield text
        else:
            stats.empty_documents += 1


def check_sources(sources: list[str], text_field: str = "text", allow_bad_text: bool = False) -> None:
    """Read the first document of every local data file of ``sources`` (of a ``.txt`` file its first
    ``CHECK_TEXT_BYTES``; ``hf:`` sources are read from the Hub later): a missing, unsupported, garbled or malformed
    file is named now, before a model loads or a progress bar starts, rather than when the tokenizer reaches it. A
    bad line further into a file is still found only there."""
    for source in sources:
        if is_hf_source(source):
            continue
        for path in list_source_files(source):
            documents = _read_file(path, text_field, ReadStats(), allow_bad_text, limit=CHECK_TEXT_BYTES)
            try:
                next(documents, None)
            finally:
                documents.close()


def read_sources(sources: list[str], text_field: str, max_documents: int | None, stats: ReadStats,
                 allow_bad_text: bool = False) -> Iterator[str]:
    """Documents of all sources in order, ``max_documents`` in total."""
    remaining = max_documents
    for source in sources:
        if remaining is not None and remaining <= 0:
            return
        before = stats.documents
        yield from read_documents(source, text_field, remaining, stats, allow_bad_text)
        if remaining is not None:
            remaining -= stats.documents - before

