"""Token data pipeline for training MLKV language models.

The pipeline, top to bottom:

1. ``read_documents``    -- stream documents (``str``) from local files/folders or Hugging Face ``datasets``.
2. ``load_tokenizer``    -- the checkpoint's HF tokenizer (``tokenizer.json`` or a tokenizer dir).
3. ``build_token_store`` -- batched tokenization, one EOS after every document, written once to an on-disk
                            cache (memory-mapped ``uint16``/``uint32``) keyed by a hash of everything that
                            changes the tokens; a second call loads the cache without tokenizing.
4. ``split_by_document`` -- deterministic held-out validation split by whole documents.
5. ``PackedDataset``     -- fixed-length packed sequences, deterministic shuffling by seed and a resumable
                            batch iterator (explicit sample position).
6. ``prepare_data``      -- all of the above in one call, plus a stats dict.

Token-count invariant: a store holds exactly ``sum(len(doc_tokens) + 1)`` tokens (the ``+ 1`` is the EOS
after each document). The only exception is ``max_tokens``: the stream is then cut at exactly ``max_tokens``
tokens, so the last document may be truncated (and lose its EOS); ``meta["truncated_tokens"]`` says how many
of its tokens were cut. Packing into ``seq_len`` sequences drops the last partial sequence; the number of
dropped tokens is reported as ``dropped_tail_tokens`` (it is always ``< seq_len``).

Samples follow the Hugging Face convention: a sample is ``seq_len`` tokens and ``labels = input_ids``; the
model shifts the labels internally.

Sources are strings: a path to a file or folder, or ``"hf:<name>[:<config>][@<split>][?key=value&...]"`` for
``datasets.load_dataset`` (keys: ``data_files``, ``streaming`` (default true), ``revision``). Examples::

    /data/corpus/gutenberg/train_00.jsonl.xz
    /data/corpus/gutenberg/                       # walked recursively, sorted
    hf:EleutherAI/the_pile_deduplicated@train     # streamed, so nothing is downloaded up front
    hf:json@train?data_files=/data/extra/*.jsonl
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import logging
import lzma
import os
import re
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from mlkv.data.paths import default_data_dir  # noqa: F401  (re-exported)

__all__ = [
    "FORMAT_VERSION",
    "PackedDataset",
    "ReadStats",
    "TokenSegments",
    "TokenStore",
    "build_token_store",
    "default_data_dir",
    "list_source_files",
    "load_tokenizer",
    "prepare_data",
    "read_documents",
    "resolve_eos_id",
    "split_by_document",
    "token_dtype",
]

logger = logging.getLogger(__name__)

#: Bump when the cache layout or the tokenization rules change; old caches are then ignored.
FORMAT_VERSION = 1

HF_PREFIX = "hf:"
TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
COMPRESSION_SUFFIXES = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
#: Errors that mean "this file cannot be read" (I/O, corrupt or truncated compressed stream).
READ_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error)

#: Token-id EOS candidates, tried in order when the tokenizer dir gives no ``eos_token``.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
#: Files that define a tokenizer in a checkpoint/tokenizer directory (hashed for the cache key).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
)

#: Tokenization batch limits: documents and characters per ``encode_batch`` call.
BATCH_DOCUMENTS = 256
BATCH_CHARS = 8_000_000
#: Typical characters per token of English text; keeps batches small when ``max_tokens`` is near.
CHARS_PER_TOKEN = 4


# ----------------------------------------------------------------------------------------------------------
# Reading documents
# ----------------------------------------------------------------------------------------------------------


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
) -> Iterator[str]:
    """Stream the documents of one source (a file, a folder or ``"hf:..."``), in a deterministic order.

    A ``.txt`` file is one document; a JSONL line / parquet row / dataset row is one document (its
    ``text_field``). Empty documents are skipped and counted. ``stats`` (optional) receives the counters.
    """
    stats = stats if stats is not None else ReadStats()
    if max_documents is not None and max_documents <= 0:
        return
    if is_hf_source(source):
        documents = _read_hf(HFSource.parse(source), text_field, stats)
    else:
        documents = (doc for path in list_source_files(source) for doc in _read_file(path, text_field, stats))
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


def _read_file(path: Path, text_field: str, stats: ReadStats) -> Iterator[str]:
    """Documents of one local file, with read errors re-raised as ``OSError`` naming the file."""
    kind, opener = _file_format(path)
    stats.files += 1
    try:
        if kind == "parquet":
            yield from _read_parquet(path, text_field, stats)
            return
        with opener(path, "rb") as f:
            if kind == "txt":
                yield from _read_txt(f, path, stats)
            else:
                yield from _read_jsonl(f, path, text_field, stats)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"data file not found: {path}") from exc
    except READ_ERRORS as exc:
        raise OSError(f"cannot read data file {path}: {exc}") from exc


def _read_txt(f: IO[bytes], path: Path, stats: ReadStats) -> Iterator[str]:
    """A whole text file as one document; invalid UTF-8 bytes are dropped and counted."""
    text = f.read().decode("utf-8", errors="surrogateescape")  # bad bytes -> lone surrogates U+DC80..U+DCFF
    text, n_bad = re.subn("[\udc80-\udcff]", "", text)
    if n_bad:
        stats.decode_errors += n_bad
        logger.warning("%s: dropped %d bytes that are not valid UTF-8", path, n_bad)
    if text:
        yield text
    else:
        stats.empty_documents += 1


def _read_jsonl(f: IO[bytes], path: Path, text_field: str, stats: ReadStats) -> Iterator[str]:
    """One document per JSON line; lines that are not valid UTF-8 are skipped and counted."""
    skipped = 0
    for lineno, raw in enumerate(f, 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped += 1
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {lineno}: invalid JSON ({exc.msg})") from None
        text = _record_text(record, text_field, f"{path}, line {lineno}")
        if text:
            yield text
        else:
            stats.empty_documents += 1
    if skipped:
        stats.skipped_lines += skipped
        logger.warning("%s: skipped %d lines that are not valid UTF-8", path, skipped)


def _record_text(record: Any, text_field: str, where: str) -> str | None:
    """The text of one record (``None`` for a null value); errors name the field, ``where`` and the keys found."""
    if not isinstance(record, dict):
        raise TypeError(f"{where}: expected a JSON object with a {text_field!r} field, got {type(record).__name__}")
    if text_field not in record:
        raise ValueError(f"{where}: record has no text field {text_field!r} (keys found: {sorted(record)})")
    text = record[text_field]
    if text is not None and not isinstance(text, str):
        raise ValueError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
    return text


def _read_parquet(path: Path, text_field: str, stats: ReadStats) -> Iterator[str]:
    """One document per row of column ``text_field``; null/empty values are skipped and counted."""
    import pyarrow as pa
    import pyarrow.parquet as pq

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
        raise OSError(f"cannot read parquet file {path}: {exc}") from exc


def _read_hf(spec: HFSource, text_field: str, stats: ReadStats) -> Iterator[str]:
    """Rows of a Hugging Face dataset (streamed by default, so a huge corpus is never downloaded whole)."""
    import datasets

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


# ----------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------


def _tokenizer_dir_or_file(path_or_dir: str | os.PathLike) -> Path:
    path = Path(path_or_dir).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    return path


def load_tokenizer(path_or_dir: str | os.PathLike) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` file or a dir (checkpoint or tokenizer dir).

    A dir with ``tokenizer.json`` loads that file; a dir with GPT-2 style ``vocab.json`` + ``merges.txt`` builds
    the byte-level BPE; any other dir goes through ``transformers.AutoTokenizer`` (fast tokenizers only).
    """
    path = _tokenizer_dir_or_file(path_or_dir)
    if path.is_file():
        return Tokenizer.from_file(str(path))
    if (path / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        from tokenizers import ByteLevelBPETokenizer

        return ByteLevelBPETokenizer(str(path / "vocab.json"), str(path / "merges.txt"))._tokenizer
    try:
        from transformers import AutoTokenizer

        backend = AutoTokenizer.from_pretrained(str(path)).backend_tokenizer
    except Exception as exc:  # any failure means "no usable tokenizer here"
        raise ValueError(f"no usable tokenizer in {path} (expected tokenizer.json): {exc}") from exc
    return backend


def load_hf_tokenizer(path_or_dir: str | os.PathLike, eos_token_id: int | None = None):
    """A transformers tokenizer for a checkpoint: ``AutoTokenizer`` where the directory has a full tokenizer setup,
    else a ``PreTrainedTokenizerFast`` around its ``tokenizer.json`` whose EOS (and pad) token is ``eos_token_id``
    (from the model's config), so that generation and lm-evaluation-harness know where documents end."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path_or_dir).expanduser()
    tok = None
    if path.is_dir() and (path / "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(path))
    if tok is None:
        tok = PreTrainedTokenizerFast(tokenizer_object=load_tokenizer(path))
    if tok.eos_token is None and eos_token_id is not None:
        tok.eos_token = tok.convert_ids_to_tokens(int(eos_token_id))
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def _tokenizer_fingerprint(path_or_dir: str | os.PathLike) -> str:
    """sha256 of the tokenizer file(s) content, for the cache key."""
    path = _tokenizer_dir_or_file(path_or_dir)
    files = [path] if path.is_file() else [path / n for n in TOKENIZER_FILES if (path / n).is_file()]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def resolve_eos_id(tokenizer: Tokenizer, tokenizer_path: str | os.PathLike | None = None) -> int:
    """The EOS id: ``eos_token`` of ``tokenizer_config.json`` next to the tokenizer, else a known EOS token."""
    names: list[str] = []
    if tokenizer_path is not None:
        path = Path(tokenizer_path)
        config = (path if path.is_dir() else path.parent) / "tokenizer_config.json"
        if config.is_file():
            eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if isinstance(eos, str):
                names.append(eos)
    for name in [*names, *EOS_CANDIDATES]:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    raise ValueError(
        f"cannot find an EOS token in tokenizer {tokenizer_path} (tried {names + list(EOS_CANDIDATES)}); pass eos_id"
    )


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (vocab_size <= 65536), else ``uint32``."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _encode_texts(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (batched: ``encode_batch`` uses all cores)."""
    return [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]


# ----------------------------------------------------------------------------------------------------------
# Token store (on-disk cache)
# ----------------------------------------------------------------------------------------------------------


class TokenSegments:
    """Zero-copy 1-D view of ``[start, end)`` ranges of a token array, concatenated (used for document splits).

    Supports ``len``, integer indexing, contiguous slicing (``view[a:b]`` -> ``np.ndarray``) and ``np.asarray``.
    """

    def __init__(self, base: np.ndarray, starts: np.ndarray, ends: np.ndarray):
        starts, ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
        keep = ends > starts
        starts, ends = starts[keep], ends[keep]
        if len(starts) > 1:  # merge touching ranges so that a mostly-contiguous split stays a few segments
            breaks = np.flatnonzero(starts[1:] != ends[:-1]) + 1
            starts, ends = starts[np.r_[0, breaks]], ends[np.r_[breaks - 1, len(ends) - 1]]
        self.base = base
        self.starts, self.ends = starts, ends  # (S,) int64 each
        self.offsets = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)  # (S+1,)

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ValueError("TokenSegments supports contiguous slices only")
            return self._gather(start, max(start, stop))
        index = int(key) + (len(self) if key < 0 else 0)
        if not 0 <= index < len(self):
            raise IndexError(f"index {key} out of range for {len(self)} tokens")
        return self._gather(index, index + 1)[0]

    def _gather(self, start: int, stop: int) -> np.ndarray:
        """(stop - start,) tokens of view positions [start, stop), copied only when they span segments."""
        if start >= stop:
            return np.zeros(0, self.dtype)
        segment = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces = []
        while start < stop:
            base_start = self.starts[segment] + (start - self.offsets[segment])
            take = min(stop, self.offsets[segment + 1]) - start
            pieces.append(self.base[base_start : base_start + take])
            start += take
            segment += 1
        return np.concatenate(pieces) if len(pieces) != 1 else np.asarray(pieces[0])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self._gather(0, len(self))
        return array.astype(dtype, copy=False) if dtype is not None else array


@dataclass
class TokenStore:
    """Tokens of a corpus: every document's ids followed by EOS, concatenated.

    tokens:      (N,) uint16/uint32 -- ``np.memmap`` of the cache file (or a ``TokenSegments`` view for a split)
    doc_offsets: (D+1,) int64 -- document ``i`` is ``tokens[doc_offsets[i]:doc_offsets[i+1]]`` (EOS included)
    meta:        JSON-able dict (counts, sources, limits, read stats, ...), also saved as ``meta.json``
    """

    tokens: np.ndarray | TokenSegments
    doc_offsets: np.ndarray
    meta: dict[str, Any]
    path: Path | None = None  # cache folder
    from_cache: bool = False  # True when loaded without tokenizing

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.tokens.dtype)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_documents(self) -> int:
        return len(self.doc_offsets) - 1

    def document(self, index: int) -> np.ndarray:
        """(L,) token ids of document ``index``, EOS included (except a document cut by ``max_tokens``)."""
        return np.asarray(self.tokens[int(self.doc_offsets[index]) : int(self.doc_offsets[index + 1])])


@dataclass
class _CachePaths:
    folder: Path
    tokens: Path = field(init=False)  # raw (N,) array of the token dtype
    doc_offsets: Path = field(init=False)  # .npy (D+1,) int64
    meta: Path = field(init=False)  # JSON, written last: its presence marks a complete cache

    def __post_init__(self) -> None:
        self.tokens = self.folder / "tokens.bin"
        self.doc_offsets = self.folder / "doc_offsets.npy"
        self.meta = self.folder / "meta.json"


def _source_fingerprint(source: str) -> Any:
    """What identifies a source's content for the cache key: files with size and mtime, or the dataset spec."""
    if is_hf_source(source):
        spec = HFSource.parse(source)
        fingerprint: dict[str, Any] = asdict(spec)
        if spec.data_files:  # local data files: key on their stats too
            from glob import glob

            fingerprint["files"] = [_file_fingerprint(Path(p)) for p in sorted(glob(spec.data_files, recursive=True))]
        return fingerprint
    return [_file_fingerprint(path) for path in list_source_files(source)]


def _file_fingerprint(path: Path) -> list[Any]:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _cache_key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _atomic_path(path: Path) -> Path:
    """A unique temporary name next to ``path`` (same file system, so ``os.replace`` is atomic)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _write_atomic(path: Path, write: Any) -> None:
    """Call ``write(file)`` on a temp file, then ``os.replace`` it onto ``path``; never leaves a partial file."""
    tmp = _atomic_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # fails (harmlessly) when not empty, e.g. another process is writing there
    except OSError:
        pass


def _load_cached(paths: _CachePaths) -> TokenStore | None:
    """The cached store, or ``None`` if missing, incomplete or from another format version."""
    try:
        meta = json.loads(paths.meta.read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        if meta.get("format_version") != FORMAT_VERSION:
            return None
        if paths.tokens.stat().st_size != meta["num_tokens"] * dtype.itemsize:
            return None
        doc_offsets = np.load(paths.doc_offsets)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    tokens = np.memmap(paths.tokens, dtype=dtype, mode="r", shape=(meta["num_tokens"],))
    return TokenStore(tokens, doc_offsets, meta, paths.folder, from_cache=True)


def build_token_store(
    sources: Sequence[str | os.PathLike] | str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    cache_dir: str | os.PathLike,
    text_field: str = "text",
    max_documents: int | None = None,
    max_tokens: int | None = None,
    eos_id: int | None = None,
    progress: bool = True,
) -> TokenStore:
    """Tokenize ``sources`` (in order) into a cached, memory-mapped token store; reuse the cache when it exists.

    The cache folder is ``cache_dir/tokens-<key>``, where ``key`` hashes the tokenizer file content, each source's
    files (path, size, mtime) or dataset name/config/split, ``text_field``, ``eos_id``, the limits and
    ``FORMAT_VERSION``. ``max_documents``/``max_tokens`` limit the whole run (all sources together).
    """
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    if not sources:
        raise ValueError("no data sources given")
    sources = [str(s) for s in sources]
    for name, limit in (("max_documents", max_documents), ("max_tokens", max_tokens)):
        if limit is not None and limit < 1:
            raise ValueError(f"{name} must be >= 1 or None, got {limit}")
    tokenizer = load_tokenizer(tokenizer_path)
    eos_id = resolve_eos_id(tokenizer, tokenizer_path) if eos_id is None else int(eos_id)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(max(vocab_size, eos_id + 1))
    key_payload = {
        "format_version": FORMAT_VERSION,
        "tokenizer_sha256": _tokenizer_fingerprint(tokenizer_path),
        "sources": [_source_fingerprint(s) for s in sources],
        "text_field": text_field,
        "eos_id": eos_id,
        "max_documents": max_documents,
        "max_tokens": max_tokens,
    }
    paths = _CachePaths(Path(cache_dir).expanduser() / f"tokens-{_cache_key(key_payload)}")
    cached = _load_cached(paths)
    if cached is not None:
        logger.info("loaded %d cached tokens from %s", cached.num_tokens, paths.folder)
        return cached

    started = time.perf_counter()
    stats = ReadStats()
    documents = _iter_sources(sources, text_field, max_documents, stats)
    paths.folder.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_path(paths.tokens)
    try:
        with open(tmp, "wb") as f:
            doc_offsets, truncated = _tokenize_into(
                f, documents, tokenizer, eos_id, dtype, max_tokens, max_documents, progress
            )
        if len(doc_offsets) <= 1:
            raise ValueError(f"no documents found in {', '.join(sources)} (text field {text_field!r}; {asdict(stats)})")
        os.replace(tmp, paths.tokens)
    except BaseException:
        tmp.unlink(missing_ok=True)
        _remove_if_empty(paths.folder)
        raise
    finally:
        documents.close()  # close the current file when max_tokens stopped reading early

    meta = {
        **key_payload,
        "key": paths.folder.name,
        "source_names": sources,
        "tokenizer_path": str(tokenizer_path),
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "num_tokens": int(doc_offsets[-1]),
        "num_documents": len(doc_offsets) - 1,
        "truncated_tokens": truncated,
        "read_stats": asdict(stats),
        "build_seconds": round(time.perf_counter() - started, 3),
    }
    _write_atomic(paths.doc_offsets, lambda f: np.save(f, doc_offsets))
    _write_atomic(paths.meta, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    logger.info("tokenized %d documents -> %d tokens in %s", meta["num_documents"], meta["num_tokens"], paths.folder)
    store = _load_cached(paths)
    assert store is not None, f"cache just written to {paths.folder} does not load"
    store.from_cache = False
    return store


def _iter_sources(sources: list[str], text_field: str, max_documents: int | None, stats: ReadStats) -> Iterator[str]:
    """Documents of all sources in order, ``max_documents`` in total."""
    remaining = max_documents
    for source in sources:
        if remaining is not None and remaining <= 0:
            return
        before = stats.documents
        yield from read_documents(source, text_field, remaining, stats)
        if remaining is not None:
            remaining -= stats.documents - before


def _tokenize_into(
    f: IO[bytes],
    documents: Iterable[str],
    tokenizer: Tokenizer,
    eos_id: int,
    dtype: np.dtype,
    max_tokens: int | None,
    max_documents: int | None,
    progress: bool,
) -> tuple[np.ndarray, int]:
    """Encode documents in batches, append EOS to each, write ids to ``f``; stop at exactly ``max_tokens``.

    Returns ``(doc_offsets (D+1,) int64, tokens cut from the last document by max_tokens)``.
    """
    lengths: list[int] = []  # tokens written per document (EOS included)
    total, truncated = 0, 0
    limit = np.iinfo(dtype).max
    bar = tqdm(total=max_documents, unit="doc", desc="tokenizing", disable=None if progress else True)
    batch: list[str] = []
    chars = 0

    def flush() -> bool:
        """Write the batch; False once ``max_tokens`` is reached."""
        nonlocal total, truncated, chars
        for ids in _encode_texts(tokenizer, batch):
            doc = np.asarray([*ids, eos_id], dtype=np.int64)  # (L+1,)
            if len(doc) and doc.max() > limit:
                raise ValueError(f"token id {doc.max()} does not fit {dtype.name}")
            if max_tokens is not None and total + len(doc) >= max_tokens:
                truncated = total + len(doc) - max_tokens
                doc = doc[: max_tokens - total]
            f.write(doc.astype(dtype).tobytes())
            lengths.append(len(doc))
            total += len(doc)
            if max_tokens is not None and total >= max_tokens:
                bar.update(len(lengths) - bar.n)
                return False
        bar.update(len(batch))
        bar.set_postfix(tokens=total, refresh=False)
        batch.clear()
        chars = 0
        return True

    with bar:
        for text in documents:
            batch.append(text)
            chars += len(text)
            budget = BATCH_CHARS if max_tokens is None else min(BATCH_CHARS, CHARS_PER_TOKEN * (max_tokens - total))
            if (len(batch) >= BATCH_DOCUMENTS or chars >= budget) and not flush():
                break
        else:
            if batch:
                flush()
    doc_offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)  # (D+1,)
    return doc_offsets, int(truncated)


# ----------------------------------------------------------------------------------------------------------
# Validation split by document
# ----------------------------------------------------------------------------------------------------------


def split_by_document(
    store: TokenStore,
    val_fraction: float = 0.0,
    seed: int = 0,
    val_documents: int | None = None,
) -> tuple[TokenStore, TokenStore]:
    """(train, val) stores made of whole documents; the val documents are a seeded random choice.

    Give ``val_documents`` (a count) or ``val_fraction`` (rounded, at least 1 document). Both views share the
    parent's memory map (``TokenSegments``, no copy) and keep the documents' original order.
    """
    n_docs = store.num_documents
    if val_documents is None:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        val_documents = max(1, round(val_fraction * n_docs))
    if not 0 < val_documents < n_docs:
        raise ValueError(f"cannot hold out {val_documents} of {n_docs} documents: need at least 1 in each split")
    is_val = np.zeros(n_docs, dtype=bool)  # (D,)
    is_val[np.random.default_rng(seed).permutation(n_docs)[:val_documents]] = True
    split_meta = {"split_seed": seed, "val_documents": int(val_documents)}
    return _document_subset(store, ~is_val, "train", split_meta), _document_subset(store, is_val, "val", split_meta)


def _document_subset(store: TokenStore, keep: np.ndarray, name: str, split_meta: dict[str, Any]) -> TokenStore:
    """A store view of the documents where ``keep`` (D,) is True."""
    starts, ends = store.doc_offsets[:-1][keep], store.doc_offsets[1:][keep]  # (K,) each
    offsets = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)  # (K+1,)
    tokens = TokenSegments(store.tokens, starts, ends)
    meta = {**store.meta, **split_meta, "split": name, "num_tokens": len(tokens), "num_documents": int(keep.sum())}
    meta["document_indices"] = np.flatnonzero(keep).tolist() if name == "val" else None
    return TokenStore(tokens, offsets, meta, store.path, store.from_cache)


# ----------------------------------------------------------------------------------------------------------
# Packed, shuffled sequences
# ----------------------------------------------------------------------------------------------------------


class PackedDataset(torch.utils.data.Dataset):
    """Consecutive ``seq_len``-token windows of a 1-D token array, in a seeded random order.

    Sequence ``j`` is ``tokens[j*seq_len:(j+1)*seq_len]``; the last ``len(tokens) % seq_len`` tokens
    (``dropped_tail_tokens``) belong to no sequence. ``dataset[i]`` is the ``i``-th sample of epoch 0's order.
    The sample stream runs over epochs, each a fresh permutation from ``(seed, epoch)``: global sample ``g``
    is position ``g % len`` of epoch ``g // len``, so a training loop resumes exactly from a sample index.
    """

    def __init__(self, tokens: np.ndarray | TokenSegments, seq_len: int, seed: int = 0, shuffle: bool = True):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.tokens = tokens  # (N,)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.num_sequences = len(tokens) // self.seq_len
        self.dropped_tail_tokens = len(tokens) - self.num_sequences * self.seq_len
        if self.num_sequences == 0:
            raise ValueError(f"only {len(tokens)} tokens: not enough for one sequence of seq_len={seq_len}")
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_sequences

    def order(self, epoch: int = 0) -> np.ndarray:
        """(S,) int64 sequence indices in the order of ``epoch`` (identity when ``shuffle=False``)."""
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.clear()
            n = self.num_sequences
            rng = np.random.default_rng([self.seed, epoch])
            self._orders[epoch] = rng.permutation(n) if self.shuffle else np.arange(n, dtype=np.int64)
        return self._orders[epoch]

    def sequence(self, index: int) -> torch.Tensor:
        """(seq_len,) int64 tokens of packed sequence ``index`` (unshuffled numbering)."""
        start = int(index) * self.seq_len
        return torch.from_numpy(np.asarray(self.tokens[start : start + self.seq_len], dtype=np.int64))

    def sample(self, global_index: int) -> torch.Tensor:
        """(seq_len,) int64 sample at position ``global_index`` of the endless multi-epoch stream."""
        epoch, position = divmod(int(global_index), self.num_sequences)
        return self.sequence(self.order(epoch)[position])

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -self.num_sequences <= index < self.num_sequences:
            raise IndexError(f"sample {index} out of range for {self.num_sequences} sequences")
        return self.sample(index % self.num_sequences)

    def batches(
        self,
        batch_size: int,
        start: int = 0,
        loop: bool = False,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[torch.Tensor]:
        """(B, T) int64 batches of consecutive samples of the stream, starting at global sample ``start``.

        Each step consumes ``batch_size * world_size`` samples; ``rank`` gets its ``batch_size`` slice.
        ``loop=False``: one pass over samples ``[start, len)``, the last batch may be short unless
        ``drop_last`` (with ``drop_last``, every rank gets the same number of batches). ``loop=True``: endless,
        epochs reshuffled by ``(seed, epoch)`` and batches crossing epoch boundaries; resume with
        ``start = step * batch_size * world_size``.
        """
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size} / rank={rank} / world_size={world_size}")
        step_samples = batch_size * world_size
        first = int(start)
        while True:
            if not loop and (first >= self.num_sequences or (drop_last and first + step_samples > self.num_sequences)):
                return
            begin = first + rank * batch_size
            end = begin + batch_size if loop else min(begin + batch_size, self.num_sequences)
            if end > begin:
                yield torch.stack([self.sample(g) for g in range(begin, end)])  # (B, T)
            first += step_samples

    def iter_batches(
        self, batch_size: int, start_step: int = 0, rank: int = 0, world_size: int = 1
    ) -> Iterator[torch.Tensor]:
        """Endless (B, T) training batches from optimizer step ``start_step`` (for exact resumption)."""
        return self.batches(batch_size, start_step * batch_size * world_size, True, True, rank, world_size)

    def num_batches(self, batch_size: int, drop_last: bool = False, world_size: int = 1) -> int:
        """Steps in one ``loop=False`` pass from sample 0."""
        step_samples = batch_size * world_size
        full, rest = divmod(self.num_sequences, step_samples)
        return full + (0 if drop_last or rest == 0 else 1)


# ----------------------------------------------------------------------------------------------------------
# Everything together
# ----------------------------------------------------------------------------------------------------------


def _local_files(sources: Sequence[str]) -> set[Path]:
    return {p.resolve() for s in sources if not is_hf_source(s) for p in list_source_files(s)}


def prepare_data(
    train_sources: Sequence[str | os.PathLike] | str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    cache_dir: str | os.PathLike,
    seq_len: int = 2048,
    val_sources: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    text_field: str = "text",
    max_documents: int | None = None,
    max_tokens: int | None = None,
    val_max_documents: int | None = None,
    val_max_tokens: int | None = None,
    eos_id: int | None = None,
    progress: bool = True,
) -> tuple[PackedDataset, PackedDataset | None, dict[str, Any]]:
    """Train (shuffled by ``seed``) and optional validation (in order) datasets, plus stats.

    Validation comes from ``val_sources`` (e.g. the corpus' own ``val.jsonl.xz``) or, with ``val_fraction``,
    from held-out training documents -- not both. ``val_max_documents``/``val_max_tokens`` limit the val
    sources (default: the training limits). Stats: documents, tokens, sequences, dropped tail tokens per split,
    and read counters (skipped lines, decode errors, empty documents).
    """
    train_list = _as_source_list(train_sources)
    val_list = _as_source_list(val_sources) if val_sources is not None else []
    if val_list and val_fraction > 0:
        raise ValueError("give val_sources or val_fraction, not both")
    overlap = _local_files(train_list) & _local_files(val_list) if val_list else set()
    if overlap:
        raise ValueError(f"files used for both training and validation: {sorted(map(str, overlap))}")

    common = {
        "tokenizer_path": tokenizer_path,
        "cache_dir": cache_dir,
        "text_field": text_field,
        "eos_id": eos_id,
        "progress": progress,
    }
    train_store = build_token_store(train_list, max_documents=max_documents, max_tokens=max_tokens, **common)
    val_store = None
    if val_list:
        val_store = build_token_store(
            val_list,
            max_documents=max_documents if val_max_documents is None else val_max_documents,
            max_tokens=max_tokens if val_max_tokens is None else val_max_tokens,
            **common,
        )
    elif val_fraction > 0:
        train_store, val_store = split_by_document(train_store, val_fraction, seed)

    built = [train_store] + ([val_store] if val_list else [])  # stores read from sources (not split views)
    train = _packed(train_store, seq_len, seed, True, "training", train_list)
    val = _packed(val_store, seq_len, seed, False, "validation", val_list or train_list) if val_store else None
    stats = {"seq_len": seq_len, "seed": seed, "eos_id": train_store.meta["eos_id"], "dtype": train_store.dtype.name}
    for counter in ("skipped_lines", "decode_errors", "empty_documents"):
        stats[counter] = sum(store.meta["read_stats"][counter] for store in built)
    for name, store, dataset in (("train", train_store, train), ("val", val_store, val)):
        if store is None:
            continue
        stats.update(
            {
                f"{name}_documents": store.num_documents,
                f"{name}_tokens": store.num_tokens,
                f"{name}_sequences": len(dataset),
                f"{name}_dropped_tail_tokens": dataset.dropped_tail_tokens,
                f"{name}_truncated_tokens": store.meta["truncated_tokens"],
                f"{name}_cache": str(store.path),
                f"{name}_from_cache": store.from_cache,
            }
        )
    logger.info("data: %s", stats)
    return train, val, stats


def _as_source_list(sources: Sequence[str | os.PathLike] | str | os.PathLike) -> list[str]:
    return [str(sources)] if isinstance(sources, (str, os.PathLike)) else [str(s) for s in sources]


def _packed(store: TokenStore, seq_len: int, seed: int, shuffle: bool, what: str, sources: list[str]) -> PackedDataset:
    if store.num_tokens < seq_len:
        raise ValueError(
            f"{what} data from {', '.join(sources)} has {store.num_tokens} tokens, fewer than seq_len={seq_len}"
        )
    return PackedDataset(store.tokens, seq_len, seed, shuffle)
