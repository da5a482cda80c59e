"""Packed sequences and prepare_data (mlkv.data.packing): every token exactly once, seeded shuffling, exact resumption
and data-parallel slices; the whole pipeline with its stats and errors."""

from __future__ import annotations

import lzma

import numpy as np
import pytest
import torch

from mlkv.data.packing import PackedDataset, prepare_data
from tinydata import DOCS, write_jsonl


# ---- packing, shuffling, batches -------------------------------------------------------------------------------------


def test_packing_every_token_exactly_once():
    tokens = np.arange(1000, dtype=np.uint16)  # distinct values, so positions can be checked
    ds = PackedDataset(tokens, seq_len=64, seed=1)
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
        PackedDataset(tokens[:10], seq_len=64, seed=0)


def test_fingerprint_changes_with_any_token_of_a_small_store_and_reads_a_fixed_amount_of_a_large_one():
    tokens = np.arange(5000, dtype=np.uint16) % 300
    base = PackedDataset(tokens, 64, seed=0).fingerprint()
    assert base == PackedDataset(tokens.copy(), 64, seed=9).fingerprint()  # the tokens, not the order
    for position in (0, 2500, 4999):  # under 64 blocks of 4096 tokens every token is read
        changed = tokens.copy()
        changed[position] += 1
        assert PackedDataset(changed, 64).fingerprint() != base
    assert PackedDataset(tokens[:-1], 64).fingerprint() != base
    assert PackedDataset(tokens.astype(np.uint32), 64).fingerprint() != base

    class Counting(np.ndarray):
        read = 0

        def __getitem__(self, key):
            if isinstance(key, slice):
                Counting.read += len(range(*key.indices(len(self))))
            return super().__getitem__(key)

    large = np.zeros(10_000_000, dtype=np.uint16).view(Counting)
    PackedDataset(large, 64).fingerprint()
    assert Counting.read == 64 * 4096


def test_shuffle_deterministic_by_seed():
    tokens = np.arange(64 * 50, dtype=np.uint16)
    a, b, c = (PackedDataset(tokens, 64, seed=s) for s in (7, 7, 8))
    assert np.array_equal(a.order(), b.order()) and not np.array_equal(a.order(), c.order())
    assert not np.array_equal(a.order(0), a.order(1))  # new permutation per epoch
    assert np.array_equal(PackedDataset(tokens, 64, seed=7, shuffle=False).order(), np.arange(50))


def test_batches_resume_exactly_and_cover_epochs():
    tokens = np.arange(8 * 23, dtype=np.int32)
    ds = PackedDataset(tokens, 8, seed=0)
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


# ---- prepare_data ----------------------------------------------------------------------------------------------------


def test_prepare_data_with_separate_val_source(tmp_path, tiny_tokenizer):
    train_file = write_jsonl(tmp_path / "train.jsonl", DOCS * 3)
    val_file = write_jsonl(tmp_path / "val.jsonl.xz", DOCS[:4], lzma.open)
    train, val, stats = prepare_data(
        [train_file], tiny_tokenizer, tmp_path / "cache", seq_len=16, val_sources=[val_file], seed=5, progress=False
    )
    assert stats["train_documents"] == 24 and stats["val_documents"] == 4
    for name, ds in (("train", train), ("val", val)):
        assert stats[f"{name}_sequences"] == len(ds)
        assert stats[f"{name}_sequences"] * 16 + stats[f"{name}_dropped_tail_tokens"] == stats[f"{name}_tokens"]
    assert not val.shuffle and train.shuffle
    assert stats["skipped_lines"] == 0 and stats["dtype"] == "uint16"
    again = prepare_data(
        [train_file], tiny_tokenizer, tmp_path / "cache", seq_len=16, val_sources=[val_file], seed=5, progress=False
    )
    assert again[2]["train_from_cache"] and again[2]["val_from_cache"]
    assert torch.equal(next(again[0].batches(4)), next(train.batches(4)))


def test_prepare_data_errors(tmp_path, jsonl_file, tiny_tokenizer):
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="not both"):
        prepare_data([jsonl_file], tiny_tokenizer, cache, val_sources=[jsonl_file], val_fraction=0.1)
    with pytest.raises(ValueError, match="files used for both training and validation: .*docs.jsonl"):
        prepare_data([jsonl_file], tiny_tokenizer, cache, val_sources=[jsonl_file])
    with pytest.raises(ValueError, match=r"training data from .*docs.jsonl has \d+ tokens, fewer than seq_len=2048"):
        prepare_data([jsonl_file], tiny_tokenizer, cache, progress=False)
    train, val, stats = prepare_data(
        [jsonl_file], tiny_tokenizer, cache, seq_len=4, val_fraction=0.25, progress=False
    )
    assert stats["train_documents"] + stats["val_documents"] == len(DOCS)
    assert (len(train), len(val)) == (stats["train_sequences"], stats["val_sequences"])
    assert not val.shuffle
