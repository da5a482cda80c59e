import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Toy matrices: extra threads only add synchronisation (and thrash on a shared CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
