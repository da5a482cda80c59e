"""The token pipeline: text sources in, tokenized and cached, packed into fixed-length training sequences.

``sources`` (reading documents), ``tokenizer`` (loading tokenizers, the EOS id), ``store`` (the token cache and
document splits), ``packing`` (packed sequences and ``prepare_data``, the entry point); ``paths`` is the one
data-folder resolver.
"""

from mlkv.data.packing import PackedDataset, prepare_data
from mlkv.data.paths import default_data_dir
from mlkv.data.sources import HFSource, ReadStats, is_hf_source, list_source_files, read_documents
from mlkv.data.store import (FORMAT_VERSION, TokenSegments, TokenStore, build_token_store, split_by_document,
                             token_dtype)
from mlkv.data.tokenizer import load_hf_tokenizer, load_tokenizer, resolve_eos_id

__all__ = ["FORMAT_VERSION", "HFSource", "PackedDataset", "ReadStats", "TokenSegments", "TokenStore",
           "build_token_store", "default_data_dir", "is_hf_source", "list_source_files", "load_hf_tokenizer",
           "load_tokenizer", "prepare_data", "read_documents", "resolve_eos_id", "split_by_document", "token_dtype"]
