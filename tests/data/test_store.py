"""The token store (mlkv.data.store): the token-count invariant, the cache (reused, keyed, rebuilt when incomplete),
limits, whole-document splits and their zero-copy views. Fast: a tiny trained tokenizer, small files under tmp_path,
and only the first 3 books of the shared Gutenberg val file (skipped when the shared data is absent)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from mlkv.data import store as store_module
from mlkv.data.packing import prepare_data
from mlkv.data.sources import read_documents
from mlkv.data.store import TokenSegments, build_token_store, split_by_document, token_dtype
from mlkv.data.tokenizer import encode_texts, load_tokenizer, resolve_eos_id
from tinydata import DOCS, encode, shared_data


def test_token_dtype():
    assert token_dtype(50277) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    assert token_dtype(128256) == np.uint32


# ---- token store: invariants and cache -------------------------------------------------------------------------------


def test_store_token_invariant_and_dtype(tmp_path, jsonl_file, tiny_tokenizer):
    store = build_token_store([jsonl_file], tiny_tokenizer, tmp_path / "cache", progress=False)
    expected = [encode(tiny_tokenizer, doc) + [0] for doc in DOCS]
    assert store.num_tokens == sum(len(e) for e in expected)  # every doc's tokens + 1 EOS
    assert np.array_equal(np.asarray(store.tokens), np.concatenate(expected))
    assert store.dtype == np.uint16 and isinstance(store.tokens, np.memmap)
    assert store.doc_offsets.dtype == np.int64 and len(store.doc_offsets) == len(DOCS) + 1
    assert np.all(store.tokens[store.doc_offsets[1:] - 1] == 0)  # EOS closes every document
    assert [store.document(i).tolist() for i in range(len(DOCS))] == expected
    meta = json.loads((store.path / "meta.json").read_text())
    assert (meta["num_tokens"], meta["num_documents"], meta["dtype"]) == (store.num_tokens, len(DOCS), "uint16")
    assert np.array_equal(np.load(store.path / "doc_offsets.npy"), store.doc_offsets)
    assert not [p for p in store.path.iterdir() if ".tmp" in p.name]  # temp files were replaced


def test_a_killed_builds_temporary_file_is_removed_by_the_next_build(tmp_path, jsonl_file, tiny_tokenizer, caplog):
    first = build_token_store([jsonl_file], tiny_tokenizer, tmp_path / "cache", progress=False)
    for name in ("meta.json", "tokens.bin"):  # as a build killed while writing tokens.bin leaves the folder
        (first.path / name).unlink()
    stale = first.path / ".tokens.bin.tmp-99999-deadbeef"
    stale.write_bytes(b"\0" * 1000)
    again = build_token_store([jsonl_file], tiny_tokenizer, tmp_path / "cache", progress=False)
    assert not again.from_cache and again.num_tokens == first.num_tokens
    assert not stale.exists() and f"removed {stale}, left by an interrupted earlier tokenization" in caplog.text
    assert sorted(p.name for p in first.path.iterdir()) == ["doc_offsets.npy", "meta.json", "tokens.bin"]


def test_store_cache_reuse_does_not_tokenize(tmp_path, jsonl_file, tiny_tokenizer, monkeypatch):
    first = build_token_store([jsonl_file], tiny_tokenizer, tmp_path / "cache")
    assert not first.from_cache

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again instead of using the cache")

    monkeypatch.setattr(store_module, "encode_texts", no_tokenizing)
    monkeypatch.setattr(store_module, "read_sources", no_tokenizing)
    second = build_token_store([jsonl_file], tiny_tokenizer, tmp_path / "cache")
    assert second.from_cache and second.path == first.path
    assert np.array_equal(np.asarray(second.tokens), np.asarray(first.tokens))
    # any change of the key (limits, text field, eos id, tokenizer, file stats) misses the cache
    for kwargs in ({"max_documents": 2}, {"eos_id": 1}, {"max_tokens": 10}):
        with pytest.raises(AssertionError, match="tokenized again"):
            build_token_store([jsonl_file], tiny_tokenizer, tmp_path / "cache", **kwargs)
    os.utime(jsonl_file, ns=(1, 1))
    with pytest.raises(AssertionError, match="tokenized again"):
        build_token_store([jsonl_file], tiny_tokenizer, tmp_path / "cache")


def test_incomplete_cache_is_rebuilt(tmp_path, jsonl_file, tiny_tokenizer):
    first = build_token_store([jsonl_file], tiny_tokenizer, tmp_path / "cache")
    with open(first.path / "tokens.bin", "r+b") as f:  # simulate a truncated tokens file
        f.truncate(10)
    again = build_token_store([jsonl_file], tiny_tokenizer, tmp_path / "cache")
    assert not again.from_cache and again.num_tokens == first.num_tokens


def test_store_limits_max_documents_and_max_tokens(tmp_path, jsonl_file, tiny_tokenizer):
    full = build_token_store([jsonl_file], tiny_tokenizer, tmp_path / "cache")
    few = build_token_store([jsonl_file, jsonl_file], tiny_tokenizer, tmp_path / "cache", max_documents=3)
    assert few.num_documents == 3 and few.num_tokens == full.doc_offsets[3]
    # across sources: the limit is global, the second source continues the count
    both = build_token_store([jsonl_file, jsonl_file], tiny_tokenizer, tmp_path / "cache", max_documents=10)
    assert both.num_documents == 10
    cut = int(full.doc_offsets[2]) + 3  # three tokens into the third document
    limited = build_token_store([jsonl_file], tiny_tokenizer, tmp_path / "cache", max_tokens=cut)
    assert limited.num_tokens == cut and limited.num_documents == 3
    assert np.array_equal(np.asarray(limited.tokens), np.asarray(full.tokens[:cut]))
    assert limited.meta["truncated_tokens"] == int(full.doc_offsets[3]) - cut


def test_gutenberg_first_three_val_books(tmp_path):
    root = shared_data()
    tokenizer = root / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
    val = root / "corpus" / "gutenberg" / "val.jsonl.xz"
    tok = load_tokenizer(tokenizer)
    assert tok.encode("Hello world").ids == [12092, 1533]
    assert resolve_eos_id(tok, tokenizer) == 0
    docs = list(read_documents(val, max_documents=3))
    assert len(docs) == 3 and all(len(d) > 10_000 for d in docs)
    store = build_token_store([val], tokenizer, tmp_path / "cache", max_documents=3, progress=False)
    assert store.dtype == np.uint16 and store.meta["eos_id"] == 0
    lengths = [len(ids) + 1 for ids in encode_texts(tok, docs)]
    assert store.num_tokens == sum(lengths) and np.array_equal(np.diff(store.doc_offsets), lengths)
    assert np.all(store.tokens[store.doc_offsets[1:] - 1] == 0)
    train, val_ds, stats = prepare_data(
        [val], tokenizer, tmp_path / "cache", seq_len=2048, val_fraction=0.34, seed=0, max_documents=3, progress=False
    )
    assert stats["train_from_cache"] and stats["train_documents"] == 2 and stats["val_documents"] == 1
    assert stats["train_tokens"] + stats["val_tokens"] == store.num_tokens
    batch = next(train.batches(4))
    assert batch.shape == (4, 2048) and batch.dtype == torch.int64 and int(batch.max()) < 50277
    assert len(val_ds) == stats["val_tokens"] // 2048


# ---- validation split ------------------------------------------------------------------------------------------------


def test_split_by_document_disjoint_and_deterministic(tmp_path, jsonl_file, tiny_tokenizer):
    store = build_token_store([jsonl_file], tiny_tokenizer, tmp_path / "cache")
    train, val = split_by_document(store, val_fraction=0.25, seed=3)
    assert (train.num_documents, val.num_documents) == (6, 2)
    val_ids = val.meta["document_indices"]
    train_ids = sorted(set(range(len(DOCS))) - set(val_ids))
    for view, ids in ((train, train_ids), (val, val_ids)):
        expected = np.concatenate([store.document(i) for i in ids])
        assert np.array_equal(np.asarray(view.tokens), expected)
        assert [view.document(k).tolist() for k in range(len(ids))] == [store.document(i).tolist() for i in ids]
    assert train.num_tokens + val.num_tokens == store.num_tokens
    assert split_by_document(store, val_fraction=0.25, seed=3)[1].meta["document_indices"] == val_ids
    other_seeds = {tuple(split_by_document(store, 0.25, seed)[1].meta["document_indices"]) for seed in range(10)}
    assert len(other_seeds) > 1
    assert split_by_document(store, seed=0, val_documents=3)[1].num_documents == 3
    with pytest.raises(ValueError, match="cannot hold out 8 of 8 documents"):
        split_by_document(store, seed=0, val_documents=8)


def test_token_segments_slices_match_materialized():
    base = np.arange(100, dtype=np.uint16)
    view = TokenSegments(base, [5, 20, 30, 70], [10, 30, 40, 71])  # [20,30)+[30,40) merge into one segment
    flat = np.concatenate([base[5:10], base[20:40], base[70:71]])
    assert len(view) == len(flat) == 26 and len(view.starts) == 3
    for a in range(0, 27, 3):
        for b in range(a, 27, 4):
            assert np.array_equal(view[a:b], flat[a:b])
    assert view[-1] == 70 and view[5] == 20
    with pytest.raises(IndexError):
        view[26]
