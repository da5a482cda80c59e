"""Tokenizers (mlkv.data.tokenizer): from a file or a folder, and the EOS id."""

from __future__ import annotations

import pytest

from mlkv.data.tokenizer import load_tokenizer, resolve_eos_id


def test_load_tokenizer_file_or_dir_and_eos(tiny_tokenizer, tmp_path):
    from_file = load_tokenizer(tiny_tokenizer)
    from_dir = load_tokenizer(tiny_tokenizer.parent)
    assert from_file.encode("fox").ids == from_dir.encode("fox").ids
    assert resolve_eos_id(from_file, tiny_tokenizer) == 0
    with pytest.raises(FileNotFoundError, match="tokenizer not found: .*missing"):
        load_tokenizer(tmp_path / "missing")
