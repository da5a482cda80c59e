import sys
from pathlib import Path

import pytest
import torch

# The shared test helpers (``tiny.py``) live here; the tests live in folders that mirror the package.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="module")
def one_thread():
    """Toy matrices: extra threads only add synchronisation (and thrash on a shared CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
