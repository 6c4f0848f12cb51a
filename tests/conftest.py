"""Suite-wide settings. The suite runs as 2 xdist workers on 2 cores; tiny models run fastest on one thread each
(two threads per worker oversubscribe the cores and spin against each other)."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread_per_worker():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
