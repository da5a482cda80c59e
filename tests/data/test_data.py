"""Tests of the token data pipeline (mlkv.data.pipeline). Fast: a tiny trained tokenizer, small files under tmp_path,
and only the first 3 books of the shared Gutenberg val file (skipped when the shared data is absent)."""

from __future__ import annotations

import gzip
import json
import lzma
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mlkv.data import pipeline as D

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Alice was beginning to get very tired of sitting by her sister on the bank.",
    "It was the best of times, it was the worst of times.",
    "Call me Ishmael. Some years ago, never mind how long precisely.",
    "Über naïve café — unicode ✓ works too.",
    "A short one.",
    "In a hole in the ground there lived a hobbit. " * 5,
    "Happy families are all alike; every unhappy family is unhappy in its own way.",
]


# ---------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A small byte-level BPE (vocab 300) with EOS "<|endoftext|>" = id 0, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(DOCS * 4, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def write_jsonl(path: Path, docs: list[str], opener=open, field: str = "text") -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, field: doc}) + "\n")
    return path


def write_parquet(path: Path, docs: list[str], field: str = "text") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(docs))), field: docs}), path)
    return path


@pytest.fixture
def jsonl_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "docs.jsonl", DOCS)


def encode(tokenizer_path: Path, text: str) -> list[int]:
    return D.load_tokenizer(tokenizer_path).encode(text, add_special_tokens=False).ids


def shared_data() -> Path:
    root = D.default_data_dir()
    tokenizer = root / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
    val = root / "corpus" / "gutenberg" / "val.jsonl.xz"
    if not (tokenizer.is_file() and val.is_file()):
        pytest.skip(f"shared data not found at {root} (set MLKV_DATA)")
    return root


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.jsonl.gz", "docs.jsonl.xz", "docs.parquet"])
def test_read_each_record_format(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".parquet"):
        write_parquet(path, DOCS)
    else:
        write_jsonl(path, DOCS, {".gz": gzip.open, ".xz": lzma.open}.get(path.suffix, open))
    assert list(D.read_documents(path)) == DOCS
    assert list(D.read_documents(str(path), max_documents=3)) == DOCS[:3]


def test_read_txt_files_and_folder_sorted_recursive(tmp_path):
    (tmp_path / "b" / "c").mkdir(parents=True)
    (tmp_path / "b" / "c" / "2.txt").write_text(DOCS[2], encoding="utf-8")
    (tmp_path / "b" / "1.txt").write_text(DOCS[1], encoding="utf-8")
    (tmp_path / "a.txt").write_text(DOCS[0], encoding="utf-8")
    with gzip.open(tmp_path / "b" / "c" / "3.txt.gz", "wt", encoding="utf-8") as f:
        f.write(DOCS[3])
    write_jsonl(tmp_path / "z.jsonl", DOCS[4:6])
    (tmp_path / "index.tsv").write_text("ignored\n")
    (tmp_path / "README.md").write_text("ignored\n")
    expected_files = ["a.txt", "b/1.txt", "b/c/2.txt", "b/c/3.txt.gz", "z.jsonl"]
    assert [p.relative_to(tmp_path).as_posix() for p in D.list_source_files(tmp_path)] == expected_files
    stats = D.ReadStats()
    assert list(D.read_documents(tmp_path, stats=stats)) == DOCS[:6]
    assert (stats.files, stats.documents) == (5, 6)


def test_hf_datasets_route_with_local_json(tmp_path, jsonl_file):
    folder = tmp_path / "hf_folder"
    folder.mkdir()
    write_jsonl(folder / "part.jsonl", DOCS[:4])
    assert list(D.read_documents(f"hf:json@train?data_files={jsonl_file}")) == DOCS
    assert list(D.read_documents(f"hf:json?data_files={jsonl_file}&streaming=false", max_documents=2)) == DOCS[:2]
    assert list(D.read_documents(f"hf:{folder}@train")) == DOCS[:4]
    spec = D.HFSource.parse("hf:wikitext:wikitext-103-raw-v1@validation")
    assert (spec.name, spec.config, spec.split, spec.streaming) == (
        "wikitext",
        "wikitext-103-raw-v1",
        "validation",
        True,
    )
    assert D.HFSource.parse("hf:EleutherAI/the_pile_deduplicated").split == "train"


def test_hf_route_missing_field(jsonl_file):
    with pytest.raises(ValueError, match=r"row 0: record has no text field 'body' \(keys found: \['id', 'text'\]\)"):
        list(D.read_documents(f"hf:json@train?data_files={jsonl_file}", text_field="body"))


def test_hf_route_builds_store(tmp_path, jsonl_file, tiny_tokenizer):
    store = D.build_token_store([f"hf:json@train?data_files={jsonl_file}"], tiny_tokenizer, tmp_path / "cache")
    assert store.num_documents == len(DOCS)


# ---------------------------------------------------------------------------------------------------------
# Reading errors
# ---------------------------------------------------------------------------------------------------------


def test_error_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="data source not found: .*nope.jsonl"):
        list(D.read_documents(missing))


def test_error_unreadable_corrupt_file(tmp_path):
    bad = tmp_path / "broken.jsonl.xz"
    bad.write_bytes(b"this is not xz data at all")
    with pytest.raises(OSError, match="cannot read data file .*broken.jsonl.xz"):
        list(D.read_documents(bad))
    bad_parquet = tmp_path / "broken.parquet"
    bad_parquet.write_bytes(b"not parquet")
    with pytest.raises(OSError, match="cannot read parquet file .*broken.parquet"):
        list(D.read_documents(bad_parquet))


def test_error_unsupported_file_type(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type: .*table.csv"):
        list(D.read_documents(path))


def test_error_missing_text_field_names_field_file_line_and_keys(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n{"content": "oops", "id": 7}\n', encoding="utf-8")
    pattern = r"docs.jsonl, line 2: record has no text field 'text' \(keys found: \['content', 'id'\]\)"
    with pytest.raises(ValueError, match=pattern):
        list(D.read_documents(path))
    with pytest.raises(ValueError, match=r"docs.parquet: parquet file has no text field 'body' \(columns found"):
        list(D.read_documents(write_parquet(tmp_path / "docs.parquet", DOCS), text_field="body"))


def test_error_invalid_json_and_non_string_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "trunc\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 3: invalid JSON"):
        list(D.read_documents(path))
    path.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 1: field 'text' is int, not a string"):
        list(D.read_documents(path))


@pytest.mark.parametrize("kind", ["empty.jsonl", "empty.txt", "blank.jsonl", "folder"])
def test_error_empty_inputs(tmp_path, tiny_tokenizer, kind):
    path = tmp_path / kind
    if kind == "folder":
        path.mkdir()
        (path / "notes.md").write_text("no data here")
        match = "no data files .* found in folder .*folder"
    else:
        path.write_text("\n\n" if kind.startswith("blank") else "", encoding="utf-8")
        match = f"no documents in .*{kind}"
    with pytest.raises(ValueError, match=match):
        list(D.read_documents(path))
    with pytest.raises(ValueError, match=match):
        D.build_token_store([path], tiny_tokenizer, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*/*")) if (tmp_path / "cache").exists() else True


def test_non_utf8_lines_are_counted_and_skipped(tmp_path, tiny_tokenizer):
    path = tmp_path / "mixed.jsonl"
    good = [json.dumps({"text": d}).encode() for d in DOCS[:3]]
    path.write_bytes(good[0] + b"\n" + b'{"text": "bad \xff\xfe byte"}\n' + good[1] + b"\n" + good[2] + b"\n")
    stats = D.ReadStats()
    assert list(D.read_documents(path, stats=stats)) == DOCS[:3]
    assert stats.skipped_lines == 1
    store = D.build_token_store([path], tiny_tokenizer, tmp_path / "cache")
    assert store.meta["read_stats"]["skipped_lines"] == 1
    # .txt: invalid bytes are dropped and counted, the rest of the document is kept
    txt = tmp_path / "latin1.txt"
    txt.write_bytes("café ok".encode("latin-1"))
    stats = D.ReadStats()
    assert list(D.read_documents(txt, stats=stats)) == ["caf ok"]
    assert stats.decode_errors == 1
    # a file whose every line is undecodable is an error, not a silent empty dataset
    only_bad = tmp_path / "only_bad.jsonl"
    only_bad.write_bytes(b'{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"no documents in .*only_bad.jsonl .*'skipped_lines': 1"):
        D.build_token_store([only_bad], tiny_tokenizer, tmp_path / "cache")


# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------


def test_load_tokenizer_file_or_dir_and_eos(tiny_tokenizer, tmp_path):
    from_file = D.load_tokenizer(tiny_tokenizer)
    from_dir = D.load_tokenizer(tiny_tokenizer.parent)
    assert from_file.encode("fox").ids == from_dir.encode("fox").ids
    assert D.resolve_eos_id(from_file, tiny_tokenizer) == 0
    with pytest.raises(FileNotFoundError, match="tokenizer not found: .*missing"):
        D.load_tokenizer(tmp_path / "missing")


def test_token_dtype():
    assert D.token_dtype(50277) == np.uint16
    assert D.token_dtype(65536) == np.uint16
    assert D.token_dtype(65537) == np.uint32
    assert D.token_dtype(128256) == np.uint32


# ---------------------------------------------------------------------------------------------------------
# Token store: invariants and cache
# ---------------------------------------------------------------------------------------------------------


def test_store_token_invariant_and_dtype(tmp_path, jsonl_file, tiny_tokenizer):
    store = D.build_token_store([jsonl_file], tiny_tokenizer, tmp_path / "cache", progress=False)
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


def test_store_cache_reuse_does_not_tokenize(tmp_path, jsonl_file, tiny_tokenizer, monkeypatch):
    first = D.build_token_store([jsonl_file], tiny_tokenizer, tmp_path / "cache")
    assert not first.from_cache

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again instead of using the cache")

    monkeypatch.setattr(D, "_encode_texts", no_tokenizing)
    monkeypatch.setattr(D, "read_documents", no_tokenizing)
    second = D.build_token_store([jsonl_file], tiny_tokenizer, tmp_path / "cache")
    assert second.from_cache and second.path == first.path
    assert np.array_equal(np.asarray(second.tokens), np.asarray(first.tokens))
    # any change of the key (limits, text field, eos id, tokenizer, file stats) misses the cache
    for kwargs in ({"max_documents": 2}, {"eos_id": 1}, {"max_tokens": 10}):
        with pytest.raises(AssertionError, match="tokenized again"):
            D.build_token_store([jsonl_file], tiny_tokenizer, tmp_path / "cache", **kwargs)
    os.utime(jsonl_file, ns=(1, 1))
    with pytest.raises(AssertionError, match="tokenized again"):
        D.build_token_store([jsonl_file], tiny_tokenizer, tmp_path / "cache")


def test_incomplete_cache_is_rebuilt(tmp_path, jsonl_file, tiny_tokenizer):
    first = D.build_token_store([jsonl_file], tiny_tokenizer, tmp_path / "cache")
    with open(first.path / "tokens.bin", "r+b") as f:  # simulate a truncated tokens file
        f.truncate(10)
    again = D.build_token_store([jsonl_file], tiny_tokenizer, tmp_path / "cache")
    assert not again.from_cache and again.num_tokens == first.num_tokens


def test_store_limits_max_documents_and_max_tokens(tmp_path, jsonl_file, tiny_tokenizer):
    full = D.build_token_store([jsonl_file], tiny_tokenizer, tmp_path / "cache")
    few = D.build_token_store([jsonl_file, jsonl_file], tiny_tokenizer, tmp_path / "cache", max_documents=3)
    assert few.num_documents == 3 and few.num_tokens == full.doc_offsets[3]
    # across sources: the limit is global, the second source continues the count
    both = D.build_token_store([jsonl_file, jsonl_file], tiny_tokenizer, tmp_path / "cache", max_documents=10)
    assert both.num_documents == 10
    cut = int(full.doc_offsets[2]) + 3  # three tokens into the third document
    limited = D.build_token_store([jsonl_file], tiny_tokenizer, tmp_path / "cache", max_tokens=cut)
    assert limited.num_tokens == cut and limited.num_documents == 3
    assert np.array_equal(np.asarray(limited.tokens), np.asarray(full.tokens[:cut]))
    assert limited.meta["truncated_tokens"] == int(full.doc_offsets[3]) - cut


def test_gutenberg_first_three_val_books(tmp_path):
    root = shared_data()
    tokenizer = root / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
    val = root / "corpus" / "gutenberg" / "val.jsonl.xz"
    tok = D.load_tokenizer(tokenizer)
    assert tok.encode("Hello world").ids == [12092, 1533]
    assert D.resolve_eos_id(tok, tokenizer) == 0
    docs = list(D.read_documents(val, max_documents=3))
    assert len(docs) == 3 and all(len(d) > 10_000 for d in docs)
    store = D.build_token_store([val], tokenizer, tmp_path / "cache", max_documents=3, progress=False)
    assert store.dtype == np.uint16 and store.meta["eos_id"] == 0
    lengths = [len(ids) + 1 for ids in D._encode_texts(tok, docs)]
    assert store.num_tokens == sum(lengths) and np.array_equal(np.diff(store.doc_offsets), lengths)
    assert np.all(store.tokens[store.doc_offsets[1:] - 1] == 0)
    train, val_ds, stats = D.prepare_data(
        [val], tokenizer, tmp_path / "cache", seq_len=2048, val_fraction=0.34, seed=0, max_documents=3, progress=False
    )
    assert stats["train_from_cache"] and stats["train_documents"] == 2 and stats["val_documents"] == 1
    assert stats["train_tokens"] + stats["val_tokens"] == store.num_tokens
    batch = next(train.batches(4))
    assert batch.shape == (4, 2048) and batch.dtype == torch.int64 and int(batch.max()) < 50277
    assert len(val_ds) == stats["val_tokens"] // 2048


# ---------------------------------------------------------------------------------------------------------
# Validation split
# ---------------------------------------------------------------------------------------------------------


def test_split_by_document_disjoint_and_deterministic(tmp_path, jsonl_file, tiny_tokenizer):
    store = D.build_token_store([jsonl_file], tiny_tokenizer, tmp_path / "cache")
    train, val = D.split_by_document(store, val_fraction=0.25, seed=3)
    assert (train.num_documents, val.num_documents) == (6, 2)
    val_ids = val.meta["document_indices"]
    train_ids = sorted(set(range(len(DOCS))) - set(val_ids))
    for view, ids in ((train, train_ids), (val, val_ids)):
        expected = np.concatenate([store.document(i) for i in ids])
        assert np.array_equal(np.asarray(view.tokens), expected)
        assert [view.document(k).tolist() for k in range(len(ids))] == [store.document(i).tolist() for i in ids]
    assert train.num_tokens + val.num_tokens == store.num_tokens
    assert D.split_by_document(store, val_fraction=0.25, seed=3)[1].meta["document_indices"] == val_ids
    other_seeds = {tuple(D.split_by_document(store, 0.25, seed)[1].meta["document_indices"]) for seed in range(10)}
    assert len(other_seeds) > 1
    assert D.split_by_document(store, seed=0, val_documents=3)[1].num_documents == 3
    with pytest.raises(ValueError, match="cannot hold out 8 of 8 documents"):
        D.split_by_document(store, seed=0, val_documents=8)


def test_token_segments_slices_match_materialized():
    base = np.arange(100, dtype=np.uint16)
    view = D.TokenSegments(base, [5, 20, 30, 70], [10, 30, 40, 71])  # [20,30)+[30,40) merge into one segment
    flat = np.concatenate([base[5:10], base[20:40], base[70:71]])
    assert len(view) == len(flat) == 26 and len(view.starts) == 3
    for a in range(0, 27, 3):
        for b in range(a, 27, 4):
            assert np.array_equal(view[a:b], flat[a:b])
    assert view[-1] == 70 and view[5] == 20
    with pytest.raises(IndexError):
        view[26]


# ---------------------------------------------------------------------------------------------------------
# Packing, shuffling, batches
# ---------------------------------------------------------------------------------------------------------


def test_packing_every_token_exactly_once():
    tokens = np.arange(1000, dtype=np.uint16)  # distinct values, so positions can be checked
    ds = D.PackedDataset(tokens, seq_len=64, seed=1)
    assert len(ds) == 15 and ds.dropped_tail_tokens == 1000 - 15 * 64
    samples = torch.stack([ds[i] for i in range(len(ds))])
    assert samples.shape == (15, 64) and samples.dtype == torch.int64
    seen = np.sort(samples.flatten().numpy())
    assert np.array_equal(np.concatenate([seen, tokens[15 * 64 :]]), tokens)  # packed + tail == all tokens
    assert np.array_equal(torch.cat([ds.sequence(j) for j in range(15)]).numpy(), tokens[: 15 * 64])
    assert sorted(ds.order().tolist()) == list(range(15))
    with pytest.raises(IndexError):
        ds[15]
    with pytest.raises(ValueError, match="not enough for one sequence"):
        D.PackedDataset(tokens[:10], seq_len=64, seed=0)


def test_shuffle_deterministic_by_seed():
    tokens = np.arange(64 * 50, dtype=np.uint16)
    a, b, c = (D.PackedDataset(tokens, 64, seed=s) for s in (7, 7, 8))
    assert np.array_equal(a.order(), b.order()) and not np.array_equal(a.order(), c.order())
    assert not np.array_equal(a.order(0), a.order(1))  # new permutation per epoch
    assert np.array_equal(D.PackedDataset(tokens, 64, seed=7, shuffle=False).order(), np.arange(50))


def test_batches_resume_exactly_and_cover_epochs():
    tokens = np.arange(8 * 23, dtype=np.int32)
    ds = D.PackedDataset(tokens, 8, seed=0)
    one_pass = list(ds.batches(5))
    assert [len(b) for b in one_pass] == [5, 5, 5, 5, 3] and ds.num_batches(5) == 5
    assert len(list(ds.batches(5, drop_last=True))) == ds.num_batches(5, drop_last=True) == 4
    epoch0 = torch.cat(one_pass)
    assert sorted(epoch0[:, 0].tolist()) == list(range(0, 8 * 23, 8))
    stream = ds.iter_batches(5)
    first = [next(stream) for _ in range(10)]  # 50 samples: crosses into epochs 1 and 2
    assert torch.equal(torch.cat(first)[:23], epoch0)
    resumed = ds.iter_batches(5, start_step=7)
    for expected in first[7:]:
        assert torch.equal(next(resumed), expected)
    # data parallel: ranks take disjoint slices of each global batch
    ranks = [list(ds.batches(3, rank=r, world_size=2, drop_last=True)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 3
    rows = torch.cat([torch.cat([r0, r1]) for r0, r1 in zip(*ranks)])
    assert torch.equal(rows, epoch0[:18])


# ---------------------------------------------------------------------------------------------------------
# prepare_data
# ---------------------------------------------------------------------------------------------------------


def test_prepare_data_with_separate_val_source(tmp_path, tiny_tokenizer):
    train_file = write_jsonl(tmp_path / "train.jsonl", DOCS * 3)
    val_file = write_jsonl(tmp_path / "val.jsonl.xz", DOCS[:4], lzma.open)
    train, val, stats = D.prepare_data(
        [train_file], tiny_tokenizer, tmp_path / "cache", seq_len=16, val_sources=[val_file], seed=5, progress=False
    )
    assert stats["train_documents"] == 24 and stats["val_documents"] == 4
    for name, ds in (("train", train), ("val", val)):
        assert stats[f"{name}_sequences"] == len(ds)
        assert stats[f"{name}_sequences"] * 16 + stats[f"{name}_dropped_tail_tokens"] == stats[f"{name}_tokens"]
    assert not val.shuffle and train.shuffle
    assert stats["skipped_lines"] == 0 and stats["dtype"] == "uint16"
    again = D.prepare_data(
        [train_file], tiny_tokenizer, tmp_path / "cache", seq_len=16, val_sources=[val_file], seed=5, progress=False
    )
    assert again[2]["train_from_cache"] and again[2]["val_from_cache"]
    assert torch.equal(next(again[0].batches(4)), next(train.batches(4)))


def test_prepare_data_errors(tmp_path, jsonl_file, tiny_tokenizer):
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="not both"):
        D.prepare_data([jsonl_file], tiny_tokenizer, cache, val_sources=[jsonl_file], val_fraction=0.1)
    with pytest.raises(ValueError, match="files used for both training and validation: .*docs.jsonl"):
        D.prepare_data([jsonl_file], tiny_tokenizer, cache, val_sources=[jsonl_file])
    with pytest.raises(ValueError, match=r"training data from .*docs.jsonl has \d+ tokens, fewer than seq_len=2048"):
        D.prepare_data([jsonl_file], tiny_tokenizer, cache, progress=False)
    train, val, stats = D.prepare_data(
        [jsonl_file], tiny_tokenizer, cache, seq_len=4, val_fraction=0.25, progress=False
    )
    assert stats["train_documents"] + stats["val_documents"] == len(DOCS)
    assert (len(train), len(val)) == (stats["train_sequences"], stats["val_sequences"])
    assert not val.shuffle


def test_default_data_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("MLKV_DATA", str(tmp_path))
    assert D.default_data_dir() == tmp_path
    monkeypatch.delenv("MLKV_DATA")
    assert D.default_data_dir().parts[-2:] == ("shared", "data")
