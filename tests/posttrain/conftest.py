import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # on a shared 2-core machine, 2 OpenMP threads per process can be 10-100x slower than 1 (spin-waiting)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
