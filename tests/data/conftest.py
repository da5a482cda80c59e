"""Fixtures of the data tests: a tiny trained tokenizer and a JSONL file of ``DOCS``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tinydata import DOCS, write_jsonl


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


@pytest.fixture
def jsonl_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "docs.jsonl", DOCS)
