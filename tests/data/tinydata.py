"""Small corpora for the data tests: a few documents, writers for JSONL and parquet files, and the shared data folder
(skipped when absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlkv.data import default_data_dir, load_tokenizer

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


def encode(tokenizer_path: Path, text: str) -> list[int]:
    return load_tokenizer(tokenizer_path).encode(text, add_special_tokens=False).ids


def shared_data() -> Path:
    root = default_data_dir()
    tokenizer = root / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
    val = root / "corpus" / "gutenberg" / "val.jsonl.xz"
    if not (tokenizer.is_file() and val.is_file()):
        pytest.skip(f"shared data not found at {root} (set MLKV_DATA)")
    return root
