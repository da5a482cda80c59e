"""The token pipeline: text sources in, tokenized and cached, packed into fixed-length training sequences.

``from mlkv.data import prepare_data`` is the entry point; the data-folder resolver is ``mlkv.data.paths``.
"""

from mlkv.data.paths import default_data_dir
from mlkv.data.pipeline import (HFSource, PackedDataset, ReadStats, TokenSegments, TokenStore, build_token_store,
                                is_hf_source, list_source_files, load_hf_tokenizer, load_tokenizer,
                                prepare_data, read_documents, resolve_eos_id, split_by_document, token_dtype)

__all__ = ["HFSource", "PackedDataset", "ReadStats", "TokenSegments", "TokenStore", "build_token_store",
           "default_data_dir", "is_hf_source", "list_source_files", "load_hf_tokenizer", "load_tokenizer",
           "prepare_data", "read_documents", "resolve_eos_id", "split_by_document", "token_dtype"]
