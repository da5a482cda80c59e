"""Shared by the evaluation tests: offline Hugging Face libraries, the real Pythia tokenizer and a tiny random
GPT-NeoX saved with it. The test modules that use them skip when the shared data folder (``$MLKV_DATA`` or
``../shared/data``) is missing."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from mlkv.data.paths import default_data_dir  # noqa: E402


@pytest.fixture(scope="session")
def pythia_tokenizer():
    from transformers import PreTrainedTokenizerFast

    tokenizer_file = default_data_dir() / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, pythia_tokenizer):
    """A random 2-layer GPT-NeoX (Pythia vocabulary) saved with the real Pythia tokenizer."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    path = tmp_path_factory.mktemp("tiny_neox")
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=50304, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=256, rotary_pct=0.25)
    GPTNeoXForCausalLM(config).save_pretrained(path)
    pythia_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """``(model, tokenizer)`` of ``tiny_dir``, loaded on CPU with ``mlkv.model.loading.load_model``."""
    from mlkv.model.loading import load_model

    return load_model(tiny_dir, device="cpu")
