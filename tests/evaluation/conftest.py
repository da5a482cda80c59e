"""Shared by the evaluation tests: offline Hugging Face libraries and the loaded tiny model of ``tiny_dir``
(tests/conftest.py). The test modules that use them skip when the shared data folder (``$MLKV_DATA`` or
``../shared/data``) is missing."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """``(model, tokenizer)`` of ``tiny_dir``, loaded on CPU with ``mlkv.model.loading.load_model``."""
    from mlkv.model.loading import load_model

    return load_model(tiny_dir, device="cpu")
