"""The token store: tokenized documents (EOS after each) in a memory-mapped on-disk cache, and whole-document
validation splits of it.

``build_token_store`` tokenizes sources in batches and writes the cache once, keyed by a hash of everything that
changes the tokens; a second call loads the cache without tokenizing. One process builds a cache folder at a time
(a second one waits for it, then loads the cache), and a killed build's temporary files are removed by the next.

Token-count invariant: a store holds exactly ``sum(len(doc_tokens) + 1)`` tokens (the ``+ 1`` is the EOS after each document). The only exception is
``max_tokens``: the stream is then cut at exactly ``max_tokens`` tokens, so the last document may be truncated (and
lose its EOS); ``meta["truncated_tokens"]`` says how many of its tokens were cut.

``split_by_document`` holds out a seeded random choice of whole documents as a view of the same memory map.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from glob import glob
from pathlib import Path
from typing import IO, Any

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from mlkv.data.sources import HFSource, ReadStats, is_hf_source, list_source_files, read_sources
from mlkv.data.tokenizer import encode_texts, fingerprint, load_tokenizer, resolve_eos_id
from mlkv.files import atomic_write, folder_lock

logger = logging.getLogger(__name__)

#: Bump when the cache layout or the tokenization rules change; old caches are then ignored.
FORMAT_VERSION = 1
#: Tokenization batch limits: documents and characters per ``encode_batch`` call.
BATCH_DOCUMENTS = 256
BATCH_CHARS = 8_000_000
#: Typical characters per token of English text; keeps batches small when ``max_tokens`` is near.
CHARS_PER_TOKEN = 4


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (vocab_size <= 65536), else ``uint32``."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


# ---- the store ------------------------------------------------------------------------------------------------------
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


# ---- the on-disk cache ----------------------------------------------------------------------------------------------
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
        key: dict[str, Any] = asdict(spec)
        if spec.data_files:  # local data files: key on their stats too
            key["files"] = [_file_fingerprint(Path(p)) for p in sorted(glob(spec.data_files, recursive=True))]
        return key
    return [_file_fingerprint(path) for path in list_source_files(source)]


def _file_fingerprint(path: Path) -> list[Any]:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _cache_key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


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


# ---- building a store -----------------------------------------------------------------------------------------------
def build_token_store(
    sources: Sequence[str | os.PathLike] | str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    cache_dir: str | os.PathLike,
    text_field: str = "text",
    max_documents: int | None = None,
    max_tokens: int | None = None,
    eos_id: int | None = None,
    progress: bool = True,
    allow_bad_text: bool = False,
) -> TokenStore:
    """Tokenize ``sources`` (in order) into a cached, memory-mapped token store; reuse the cache when it exists.

    The cache folder is ``cache_dir/tokens-<key>``, where ``key`` hashes the tokenizer file content, each source's
    files (path, size, mtime) or dataset name/config/split, ``text_field``, ``eos_id``, the limits and
    ``FORMAT_VERSION``. ``max_documents``/``max_tokens`` limit the whole run (all sources together).
    ``allow_bad_text``: clean mostly undecodable files instead of refusing them (``mlkv.data.sources``).
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
    key_payload = {
        "format_version": FORMAT_VERSION,
        "tokenizer_sha256": fingerprint(tokenizer_path),
        "sources": [_source_fingerprint(s) for s in sources],
        "text_field": text_field,
        "eos_id": eos_id,
        "max_documents": max_documents,
        "max_tokens": max_tokens,
    }
    paths = _CachePaths(Path(cache_dir).expanduser() / f"tokens-{_cache_key(key_payload)}")
    cached = _load_cached(paths)
    if cached is None:
        with _build_lock(paths.folder):
            cached = _load_cached(paths)  # another process may have built it while this one waited
            if cached is None:
                return _build(paths, key_payload, tokenizer, str(tokenizer_path), sources, max_documents, progress,
                              allow_bad_text)
    logger.info("loaded %d cached tokens from %s", cached.num_tokens, paths.folder)
    return cached


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """Build a cache folder one process at a time: ``mlkv.files.folder_lock`` that a second builder waits
    for. Temporary files a killed builder left in the folder are removed first."""
    with folder_lock(folder, "mlkv tokenize", wait=True):
        for stale in sorted(folder.glob(".*.tmp-*")):
            stale.unlink(missing_ok=True)
            logger.warning("removed %s, left by an interrupted earlier tokenization", stale)
        yield


def _build(paths: _CachePaths, key_payload: dict[str, Any], tokenizer: Tokenizer, tokenizer_path: str,
           sources: list[str], max_documents: int | None, progress: bool, allow_bad_text: bool) -> TokenStore:
    """Tokenize ``sources`` into the cache folder ``paths`` (its key's settings in ``key_payload``) and load it."""
    max_tokens, eos_id, text_field = key_payload["max_tokens"], key_payload["eos_id"], key_payload["text_field"]
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    started = time.perf_counter()
    stats = ReadStats()
    writer = _TokenWriter(tokenizer, eos_id, token_dtype(max(vocab_size, eos_id + 1)), max_tokens)
    _write_tokens(paths, writer, sources, text_field, max_documents, stats, progress, allow_bad_text)
    doc_offsets = writer.doc_offsets()  # (D+1,)
    meta = {
        **key_payload,
        "key": paths.folder.name,
        "source_names": sources,
        "tokenizer_path": tokenizer_path,
        "vocab_size": vocab_size,
        "dtype": writer.dtype.name,
        "num_tokens": int(doc_offsets[-1]),
        "num_documents": len(doc_offsets) - 1,
        "truncated_tokens": writer.truncated,
        "read_stats": asdict(stats),
        "build_seconds": round(time.perf_counter() - started, 3),
    }
    atomic_write(paths.doc_offsets, lambda f: np.save(f, doc_offsets))
    atomic_write(paths.meta, json.dumps(meta, indent=1))
    logger.info("tokenized %d documents -> %d tokens in %s", meta["num_documents"], meta["num_tokens"], paths.folder)
    store = _load_cached(paths)
    assert store is not None, f"cache just written to {paths.folder} does not load"
    store.from_cache = False
    return store


def _write_tokens(paths: _CachePaths, writer: _TokenWriter, sources: list[str], text_field: str,
                  max_documents: int | None, stats: ReadStats, progress: bool, allow_bad_text: bool) -> None:
    """Tokenize the sources into ``paths.tokens`` through ``atomic_write``: a failure (no documents included) leaves
    no partial file, nor an empty cache folder."""
    documents = read_sources(sources, text_field, max_documents, stats, allow_bad_text)

    def write(f: IO[bytes]) -> None:
        writer.write(f, documents, max_documents, progress)
        if not writer.lengths:
            raise ValueError(f"no documents found in {', '.join(sources)} (text field {text_field!r}; {asdict(stats)})")

    paths.folder.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(paths.tokens, write)
    except BaseException:
        _remove_if_empty(paths.folder)
        raise
    finally:
        documents.close()  # close the current file when max_tokens stopped reading early


class _TokenWriter:
    """Writes documents' token ids, EOS after each, to a binary file in batches; stops at exactly ``max_tokens``.

    After ``write``: ``lengths`` holds the tokens written per document (EOS included) and ``truncated`` the tokens
    cut from the last document by ``max_tokens``.
    """

    def __init__(self, tokenizer: Tokenizer, eos_id: int, dtype: np.dtype, max_tokens: int | None):
        self.tokenizer, self.eos_id, self.dtype, self.max_tokens = tokenizer, eos_id, dtype, max_tokens
        self.lengths: list[int] = []
        self.total = 0
        self.truncated = 0

    def write(self, f: IO[bytes], documents: Iterator[str], max_documents: int | None, progress: bool) -> None:
        """Encode ``documents`` in batches of ``BATCH_DOCUMENTS`` documents or ``BATCH_CHARS`` characters (fewer
        near ``max_tokens``) and append them to ``f``."""
        batch: list[str] = []
        chars = 0
        with tqdm(total=max_documents, unit="doc", desc="tokenizing", disable=None if progress else True) as bar:
            for text in documents:
                batch.append(text)
                chars += len(text)
                if len(batch) >= BATCH_DOCUMENTS or chars >= self._char_budget():
                    if not self._write_batch(f, batch, bar):
                        return
                    batch, chars = [], 0
            if batch:
                self._write_batch(f, batch, bar)

    def _char_budget(self) -> int:
        if self.max_tokens is None:
            return BATCH_CHARS
        return min(BATCH_CHARS, CHARS_PER_TOKEN * (self.max_tokens - self.total))

    def _write_batch(self, f: IO[bytes], batch: list[str], bar: tqdm) -> bool:
        """Write one batch; False once ``max_tokens`` is reached."""
        limit = np.iinfo(self.dtype).max
        for ids in encode_texts(self.tokenizer, batch):
            doc = np.asarray([*ids, self.eos_id], dtype=np.int64)  # (L+1,)
            if len(doc) and doc.max() > limit:
                raise ValueError(f"token id {doc.max()} does not fit {self.dtype.name}")
            if self.max_tokens is not None and self.total + len(doc) >= self.max_tokens:
                self.truncated = self.total + len(doc) - self.max_tokens
                doc = doc[: self.max_tokens - self.total]
            f.write(doc.astype(self.dtype).tobytes())
            self.lengths.append(len(doc))
            self.total += len(doc)
            if self.max_tokens is not None and self.total >= self.max_tokens:
                bar.update(len(self.lengths) - bar.n)
                return False
        bar.update(len(batch))
        bar.set_postfix(tokens=self.total, refresh=False)
        return True

    def doc_offsets(self) -> np.ndarray:
        """(D+1,) int64: document ``i`` is tokens ``[offsets[i], offsets[i+1])``."""
        return np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)]).astype(np.int64)  # (D+1,)


# ---- validation split by document -----------------------------------------------------------------------------------
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

